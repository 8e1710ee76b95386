"""The Triton interpreter, patched once per kernel launch instead of once per helper call.

Triton 3.6's interpreter remaps ``triton.language`` to its numpy builtins when a kernel
launches (``GridExecutor.__call__``) and restores it when the launch ends. It also remaps the
language again on every call of a ``@triton.jit`` function inside the kernel (ours, and
``tl.zeros``-like library functions: ``InterpretedFunction.__call__``), and never restores
those: each call re-walks the language modules and wraps the already wrapped builtins once
more, so every op after it pays for every earlier call. Our kernels call helpers inside their
time loops; this was about a quarter of the interpreter pass's time.

Here a launch remaps each language module (``triton.language``, ``triton.language.core``)
the first time a function that sees it runs, and undoes all of it when the launch ends. What
the kernels compute is unchanged (every remapping is the same function of the same module
objects); only the repeated walks and the wrappers around wrappers go.

Applied by ``conftest.py`` under ``TRITON_INTERPRET=1`` only, and only when the interpreter
has the internals this relies on; otherwise it does nothing.
"""

from __future__ import annotations

import inspect


def patch_language_once_per_launch() -> bool:
    """Install the patch; returns whether it was installed."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    if not all(hasattr(interpreter, name) for name in ("_patch_lang", "_LangPatchScope")):
        return False
    # The protocol this relies on (triton 3.6): a launch restores the scope _patch_lang
    # returned to it, and a device function call patches without restoring. Another version
    # may do otherwise: then leave the interpreter as it is.
    try:
        launch = inspect.getsource(interpreter.GridExecutor.__call__)
        call = inspect.getsource(interpreter.InterpretedFunction.__call__)
    except (AttributeError, OSError, TypeError):
        return False
    if "patch_scope.restore()" not in launch or "_patch_lang(self.fn)" not in call:
        return False
    if getattr(interpreter, "_spikekernels_patched", False):
        return True

    patch_lang = interpreter._patch_lang
    empty_scope = interpreter._LangPatchScope

    class LaunchScope:
        """The launch's own remapping plus those its inner calls added: undone last first."""

        def __init__(self, first, modules):
            self.scopes, self.modules = [first], set(modules)

        def restore(self):
            global_state["launch"] = None
            for scope in reversed(self.scopes):
                scope.restore()

    global_state = {"launch": None}
    # By the function's globals and their size: the interpreter adds names to a module's
    # globals when it first rewrites a function of it.
    seen: dict[tuple[int, int], frozenset[int]] = {}

    def language_modules(fn) -> frozenset[int]:
        key = (id(fn.__globals__), len(fn.__globals__))
        if key not in seen:
            seen[key] = frozenset(
                id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)
            )
        return seen[key]

    def patch_lang_once(fn):
        modules = language_modules(fn)
        launch = global_state["launch"]
        if launch is None:  # the launch itself (GridExecutor): it calls restore() at its end
            launch = global_state["launch"] = LaunchScope(patch_lang(fn), modules)
            return launch
        if not modules <= launch.modules:  # a function that sees a module not yet remapped
            launch.scopes.append(patch_lang(fn))
            launch.modules |= modules
        return empty_scope()  # an inner call's scope is never restored by the interpreter

    interpreter._patch_lang = patch_lang_once
    interpreter._spikekernels_patched = True
    return True

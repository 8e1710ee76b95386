"""How a Python-defined op becomes ``torch.ops.spikekernels.<name>``, and how it is called.

On a normal run an op that launches Triton kernels is a ``torch.library.triton_op`` and
launches through ``wrap_triton``, so ``torch.compile`` sees (and can fuse around) the kernel.
Under ``TRITON_INTERPRET=1`` (or without triton) it is a plain ``custom_op``: opcheck and
torch.compile cannot trace an interpreted ``triton_op``, while a ``custom_op`` with a fake impl
passes both.

Calling. The public faces call ``call_op(name, *args)``. In plain eager mode it runs the op's
body directly; anything else (torch.compile, a dispatch mode such as FakeTensorMode or
functionalization, functorch transforms, tensor subclasses, inputs that need autograd) goes
through ``torch.ops.spikekernels.<name>``. Why: the Python ``custom_op``/``triton_op``
machinery adds 50-100 us to a call on this project's CPU machine (``bench/bench_host.py``;
under cProfile ``fill_defaults`` stands out, for the ops with a mutated argument), and
the exact ViT-S runner makes about 90 op calls per chunk: milliseconds of host time per
chunk, as much as the fused kernels' GPU time. The body is the same function either way,
so the two paths are bit-identical (``tests/test_registry.py``). The metadata checks run
once either way: the face runs them before ``call_op``, the registered op before the body.
"""

from __future__ import annotations

import functools
import inspect
import threading
import warnings
from collections.abc import Callable, Sequence

import torch

from spikekernels.kernels import INTERPRET, TRITON_AVAILABLE
from spikekernels.ops._checks import PLAIN_TENSOR_TYPES
from spikekernels.ops._dispatch import forced_backend

NAMESPACE = "spikekernels"
TRACEABLE_TRITON = TRITON_AVAILABLE and not INTERPRET

# name -> (body, positions of the arguments it mutates)
_BODIES: dict[str, tuple[Callable, tuple[int, ...]]] = {}
# name -> the metadata checks the registered op runs before the body (kernel_op's check)
_CHECKS: dict[str, Callable] = {}
# Set while a body runs outside the dispatcher: its launches need no wrap_triton (whose
# higher-order-op dispatch exists for tracing and costs far more than the launch).
_direct = threading.local()


def kernel_op(name: str, *, check: Callable, mutates_args: Sequence[str] = ()) -> Callable:
    """Decorator: register ``fn`` (type-annotated) as ``spikekernels::<name>``; ``call_op``
    calls it.

    ``check``: the op's metadata checks, whose parameters are arguments of the op (by name).
    The registered op runs them before ``fn``; ``call_op``'s direct path does not, as its
    caller has just run them (a public face checks before its data checks, which need them;
    a body that calls another op hands on arguments its own checks passed). ``mutates_args``
    names the arguments the op writes in place (none by default), so that
    functionalization and torch.compile keep the write and order it."""
    qualname = f"{NAMESPACE}::{name}"
    mutates = tuple(mutates_args)

    def register(fn: Callable):
        params = list(inspect.signature(fn).parameters)
        _BODIES[name] = (fn, tuple(params.index(arg) for arg in mutates))
        _CHECKS[name] = check
        registered = _checked(fn, check)
        if TRACEABLE_TRITON:
            op = torch.library.triton_op(qualname, registered, mutates_args=mutates)
        else:
            op = torch.library.custom_op(qualname, registered, mutates_args=mutates)
        if mutates:
            _register_version_bump(name)
        return op

    return register


def _checked(fn: Callable, check: Callable) -> Callable:
    """``fn`` after ``check``, with ``fn``'s signature (the schema is inferred from it).
    ``check`` takes some of the op's arguments, by their names (the dispatcher leaves out
    trailing defaults: each is filled in)."""
    signature = inspect.signature(fn)
    names = list(inspect.signature(check).parameters)
    if unknown := set(names) - set(signature.parameters):
        raise TypeError(f"{check.__name__} takes {sorted(unknown)}, not arguments of the op")

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        check(**{name: bound.arguments[name] for name in names})
        return fn(*args, **kwargs)

    return checked


# Our own registrations over torch's (kept alive: a Library unregisters what it holds when freed).
_OVERRIDES = torch.library.Library(NAMESPACE, "FRAGMENT")


def _register_version_bump(name: str) -> None:
    """The ADInplaceOrView kernel of a mutating op: bump the version of each mutated tensor it
    is given, then go on to the op's kernels. Why ours: torch before 2.13 (the GPU machine has
    2.11) registers one that indexes the mutated arguments in the positional arguments as the
    dispatcher hands them over, and the dispatcher drops trailing arguments left at their
    default; every mutated argument here is optional (None by default), so a call that leaves
    the last of them unset failed with an IndexError under FakeTensorMode, torch.compile,
    opcheck and with inputs that need autograd. torch 2.13 fills the defaults in first and
    redispatches the same way (``CustomOpDef._register_mutation_version_bump``)."""
    opoverload = getattr(torch.ops.spikekernels, name).default
    arguments = opoverload._schema.arguments
    positions = {a.name: i for i, a in enumerate(arguments)}
    mutated = [a.name for a in arguments if a.alias_info is not None and a.alias_info.is_write]
    after = torch._C._after_ADInplaceOrView_keyset

    def version_bump(keyset, *args, **kwargs):
        for arg in mutated:
            i = positions[arg]
            t = args[i] if i < len(args) else kwargs.get(arg)
            if t is not None:
                torch.autograd.graph.increment_version(t)
        return opoverload.redispatch(keyset & after, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Overriding a previously registered kernel")
        _OVERRIDES.impl(
            name, version_bump, "ADInplaceOrView", with_keyset=True, allow_override=True
        )


def launcher(kernel):
    """The callable to index with a grid: ``wrap_triton(kernel)`` inside a triton_op, the
    kernel itself when ``call_op`` runs the body directly."""
    if TRACEABLE_TRITON and not getattr(_direct, "on", False):
        return torch.library.wrap_triton(kernel)
    return kernel


def runs_directly(args: Sequence[object]) -> bool:
    """Whether ``call_op`` may skip the dispatcher for ``args``: plain eager mode, plain
    tensors, no autograd needed. (The fake impls, opcheck and torch.compile always see the
    registered op.)"""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in PLAIN_TENSOR_TYPES or (grad and a.requires_grad):
                return False
    return True


def call_op(name: str, *args):
    """``torch.ops.spikekernels.<name>(*args)``, by the shortest path that gives the same
    result (see the module docstring). The caller has run the op's metadata checks (the
    direct path leaves out those ``kernel_op`` was given)."""
    if torch.compiler.is_compiling() and forced_backend() is not None:
        # the op's body, where the backend is chosen, is traced once into the graph, unguarded
        raise RuntimeError(
            f"force_backend({forced_backend()!r}) does not reach code compiled by torch.compile "
            "(the graph keeps the backend chosen when it was traced): call the ops eagerly"
        )
    if not runs_directly(args):
        return getattr(torch.ops.spikekernels, name)(*args)
    body, mutated = _BODIES[name]
    outer, _direct.on = getattr(_direct, "on", False), True
    try:
        if torch.autograd._profiler_enabled():  # keep the op's line in profiles
            with torch.profiler.record_function(f"{NAMESPACE}::{name}"):
                out = body(*args)
        else:
            out = body(*args)
    finally:
        _direct.on = outer
    for i in mutated:
        if i < len(args) and args[i] is not None:
            torch.autograd.graph.increment_version(args[i])
    return out

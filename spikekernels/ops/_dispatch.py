"""Which backend runs an op on a tensor: decided here, in one place, for every op.

Backends:

- ``"triton"``: the Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``);
- ``"cpp"``: the C++ CPU kernels of ``spikekernels._C``;
- ``"torch"``: vectorised PyTorch (the CPU path of ops without a C++ kernel, and any device);
- ``"reference"``: ``spikekernels.reference``, SPEC.md step by step. Never chosen by default:
  only under ``force_backend("reference")`` (the slow per-step baseline and the tests' oracle
  runs). It is imported only then, so the oracle is no run-time dependency of the library.

``force_backend(name)`` pins the choice for every op its own thread calls inside it (tests,
benchmarks, the reference runner). An op that lacks the forced backend falls back to
``"torch"`` (for example ``"cpp"`` on a CUDA tensor), never to a different kernel family
silently: that is what the fallback order below says.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch

from spikekernels._extension import HAS_EXTENSION
from spikekernels.kernels import use_triton

BACKENDS = ("triton", "cpp", "torch", "reference")

# Per thread, not a global: another thread's `with` block neither changes this thread's
# backend nor, exiting out of order, restores a stale one. (threading.local, not a
# ContextVar: torch.compile traces its read in `call_op` and guards on it, so a compiled call
# inside a block is traced again, and refused there: the op bodies, where the backend is
# chosen, go into the graph once.)
_thread = threading.local()


@contextlib.contextmanager
def force_backend(name: str | None) -> Iterator[None]:
    """Run every op this thread calls inside the ``with`` block on backend ``name`` (None:
    the default choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    previous, _thread.forced = forced_backend(), name
    try:
        yield
    finally:
        _thread.forced = previous


def forced_backend() -> str | None:
    """The backend ``force_backend`` pins for this thread, or None."""
    return getattr(_thread, "forced", None)


def backend_for(
    t: torch.Tensor,
    available: Sequence[str] = ("triton", "cpp", "torch"),
    *,
    cpp_devices: Sequence[str] = ("cpu",),
) -> str:
    """The backend that runs an op on ``t``, among the op's ``available`` ones.

    Default order: the order of ``available`` (Triton where it runs on ``t``'s device, then
    the extension's kernel where the op has one for ``t``'s device type, listed in
    ``cpp_devices``, then PyTorch). A forced backend wins where it can run on ``t``
    (``"reference"`` always can); otherwise ``"torch"``.
    """
    forced = forced_backend()
    if forced is not None:
        if forced == "reference":
            return "reference"
        if forced in available and _can_run(forced, t, cpp_devices):
            return forced
        return "torch"
    for name in available:
        if _can_run(name, t, cpp_devices):
            return name
    return "torch"


def _can_run(name: str, t: torch.Tensor, cpp_devices: Sequence[str]) -> bool:
    if name == "triton":
        return use_triton(t)
    if name == "cpp":
        return HAS_EXTENSION and t.device.type in cpp_devices
    return True

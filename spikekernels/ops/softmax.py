"""``torch.ops.spikekernels.spike_softmax``: multi-step Spike-Softmax (SPEC.md §3).

The op's schema and its CPU and CUDA kernels are C++ (csrc/spike_softmax.cpp,
csrc/cuda/spike_softmax.cu, loaded with ``spikekernels._C``). This module adds the fake impl
for torch.compile, a vectorised PyTorch implementation (``spike_softmax_torch``) and, where no
compiled kernel exists for a device (extension not built, or built without CUDA), registers
that implementation with the same checks, so the op works everywhere.
"""

from __future__ import annotations

import torch

from spikekernels import _extension
from spikekernels.ops._checks import FLOAT_DTYPES, check_state, check_tensor, check_time_major
from spikekernels.ops._dispatch import backend_for
from spikekernels.ops._inplace import check_inplace
from spikekernels.ops.layernorm import running_sums, step_differences

QUALNAME = "spikekernels::spike_softmax"
SCHEMA = (
    "(Tensor x, Tensor? x_acc=None, Tensor? y_prev=None) "
    "-> (Tensor out, Tensor x_acc, Tensor y_prev)"
)


def _check_spike_softmax(
    x: torch.Tensor, x_acc: torch.Tensor | None, y_prev: torch.Tensor | None
) -> None:
    """Metadata checks, the same (and in the same order) as the C++ op's."""
    check_tensor(x, "x", dtypes=FLOAT_DTYPES, min_ndim=2)
    check_time_major(x, "x")
    shape = x.shape[1:]
    check_state(x_acc, "x_acc", shape, (torch.float32,), x, "x")
    check_state(y_prev, "y_prev", shape, (torch.float32,), x, "x")


def _masked_softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where a fully ``-inf`` row gives zeros, not NaN."""
    dead = (x == float("-inf")).all(dim=-1, keepdim=True)
    return torch.softmax(x.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def spike_softmax_torch(
    x: torch.Tensor, x_acc: torch.Tensor | None = None, y_prev: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PyTorch path (no compiled kernel for the device, or forced): checks, running sums
    step by step (cheap float32 adds in time order), then one masked softmax over all ``T``
    steps at once and the differences of consecutive steps. Each row goes through PyTorch's
    own float32 softmax, so the error is that of the per-step float32 rule (SPEC.md §8)."""
    _check_spike_softmax(x, x_acc, y_prev)
    sums = running_sums(x, x_acc)
    y = _masked_softmax(sums)
    out = step_differences(y, None if y_prev is None else y_prev.to(torch.float32), x.dtype)
    return out, sums[-1].clone(), y[-1].clone()


if not _extension.HAS_EXTENSION:
    torch.library.define(QUALNAME, SCHEMA)
    torch.library.impl(QUALNAME, ("cpu", "cuda"), spike_softmax_torch)
    _CPP_DEVICES: tuple[str, ...] = ()
elif not torch._C._dispatch_has_kernel_for_dispatch_key(QUALNAME, "CUDA"):
    torch.library.impl(QUALNAME, "cuda", spike_softmax_torch)
    _CPP_DEVICES = ("cpu",)
else:
    _CPP_DEVICES = ("cpu", "cuda")


@torch.library.register_fake(QUALNAME)
def _(x, x_acc=None, y_prev=None):
    _check_spike_softmax(x, x_acc, y_prev)
    shape = x.shape[1:]
    out = x.new_empty(x.shape)
    return out, x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)


def _no_backward(ctx, *grads):
    raise RuntimeError(
        "spikekernels::spike_softmax has no backward: the op is inference only (call it "
        "under torch.no_grad())"
    )


# Without an autograd kernel, the dispatcher's fallback only warns and backward leaves the
# input's grad None: a silent wrong answer. This one fails loudly, as the Python ops' do.
torch.library.register_autograd(QUALNAME, _no_backward)


def spike_softmax(
    x: torch.Tensor,
    x_acc: torch.Tensor | None = None,
    y_prev: torch.Tensor | None = None,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-step Spike-Softmax over the last dim (SPEC.md §3), all T steps in one kernel.

    Per row, with state ``X`` (running sum of the inputs) and ``Y_prev``, both float32 and
    zero when fresh, each step computes ``X = X + x_t; Y = softmax(X); out_t = Y - Y_prev;
    Y_prev = Y``. So the outputs up to step ``t`` sum to ``softmax(X_t)``, and the first output
    is the whole ``softmax(x_0)``. ``-inf`` entries are masked out; a row whose entries are all
    ``-inf`` gives ``Y = 0`` (never NaN).

    Args:
        x: ``[T, *rows, N]`` float32, float16 or bfloat16 input increments, ``T >= 1``
            (made contiguous if it is not). The math is float32 whatever the input dtype.
        x_acc, y_prev: optional incoming state, float32 ``[*rows, N]`` on ``x``'s device
            (each may be given alone; a missing one is zeros).
        inplace: write the new state into the given ``x_acc`` and ``y_prev`` (both required,
            contiguous, sharing no memory with ``x`` or each other) and return those same
            tensors (``ops._inplace``). On this op it is the public face's: the op (C++ or
            CUDA kernel, PyTorch or reference path) still allocates a fresh state, which is
            then copied into the given tensors. So the state keeps its addresses (what a
            CUDA graph needs), but a call allocates as many bytes as without ``inplace``.

    Returns:
        ``(out [T, *rows, N] in x.dtype, x_acc, y_prev)``. The state is fresh, never an alias
        of an input (with ``inplace``: the given tensors, updated), so chunked time (feeding
        the state back) equals a whole run.

    Accuracy: within 2x of the float32 per-step PyTorch loop's own error against a float64
    reference (SPEC.md §8). Kernels: C++ on CPU (threads over rows, T loop inside), CUDA on GPU
    (a warp per row up to N = 1024, a block per row beyond), ``spike_softmax_torch`` where no
    kernel was built (or under ``force_backend("torch")``; ``"reference"`` runs the oracle).
    Bad arguments raise ``TypeError`` (dtype) or ``ValueError`` (rank,
    ``T == 0``, state shape or device), naming the argument, before dispatch (whose own error
    for a non-tensor names no argument). Inference only: no autograd.
    """
    _check_spike_softmax(x, x_acc, y_prev)
    check_inplace(inplace, (("x_acc", x_acc), ("y_prev", y_prev)), (x,))
    backend = backend_for(x, ("cpp", "torch"), cpp_devices=_CPP_DEVICES)
    if backend == "reference":  # force_backend("reference"): the per-step oracle
        from spikekernels import reference

        out = reference.spike_softmax(x.contiguous(), x_acc, y_prev)
    elif backend == "torch":
        out = spike_softmax_torch(x, x_acc, y_prev)
    else:
        out = torch.ops.spikekernels.spike_softmax(x, x_acc, y_prev)
    if not inplace:
        return out
    # The C++ schema returns a fresh state (csrc/ is left as it is): copied in after the op.
    x_acc.copy_(out[1])
    y_prev.copy_(out[2])
    return out[0], x_acc, y_prev

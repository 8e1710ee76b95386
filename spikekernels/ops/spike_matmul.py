"""``torch.ops.spikekernels.spike_matmul``: the spike product of SESA attention (SPEC.md §5).

The running counts ``(a_acc, b_acc)`` come back fresh, or with ``inplace=True`` written into
the given tensors (``ops._inplace``)."""

from __future__ import annotations

import math

import torch

from spikekernels.ops._attention import slabs_fit
from spikekernels.ops._checks import (
    check_finite_nonzero,
    check_running_counts,
    check_scalar_tensor,
    check_spike_pair,
    check_state,
    check_ternary,
)
from spikekernels.ops._dispatch import backend_for
from spikekernels.ops._inplace import check_inplace, own_state, placeholder, state_result
from spikekernels.ops._registry import call_op, kernel_op, launcher

# float32 holds every integer below 2^24 exactly. An output element sums 2K products of an
# int8 count (|c| <= 128) and a spike, so the float32 matmuls of the dense path are exact
# (in any summation order, and even where a backend rounds operands to bf16 or tf32, which
# hold integers up to 256 exactly) while 2 * 128 * K < 2^24, i.e. K < 65536. Longer K uses
# float64 (exact up to 2^53).
_FLOAT32_EXACT_MAX_K = (1 << 24) // 256 - 1
# The dense path processes time in chunks of at most this many float elements of temporaries.
_DENSE_CHUNK_ELEMENTS = 1 << 25


def _check_spike_matmul(a, b, scale, a_acc, b_acc, inplace=False) -> None:
    """Metadata checks (no data read), for the op body and its fake alike; with ``inplace``
    both counts given, contiguous and sharing no memory with an input or each other."""
    check_spike_pair(a, b, "a", "b")
    check_scalar_tensor(scale, "scale", a, "a")
    check_state(a_acc, "a_acc", a.shape[1:], (torch.int8,), a, "a")
    check_state(b_acc, "b_acc", b.shape[1:], (torch.int8,), b, "b")
    check_inplace(inplace, (("a_acc", a_acc), ("b_acc", b_acc)), (a, b, scale))


def spike_matmul_torch(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    a_acc: torch.Tensor | None = None,
    b_acc: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's arithmetic batched over time: the CPU path (and any empty shape).

    For a chunk of steps, ``A_{t-1}`` (exclusive running sum) and ``B_t`` (inclusive) come
    from one cumsum each, then ``a_t @ B_t + A_{t-1} @ b_t`` is two batched float matmuls,
    exact (see ``_FLOAT32_EXACT_MAX_K``), scaled once in float32 like the reference: bit for
    bit the same result. Counts are carried between chunks in int32 and returned as int8.
    """
    k = a.shape[-1]
    ftype = torch.float32 if k <= _FLOAT32_EXACT_MAX_K else torch.float64
    a_cnt = (
        torch.zeros(a.shape[1:], dtype=torch.int32, device=a.device)
        if a_acc is None
        else a_acc.to(torch.int32)
    )
    b_cnt = (
        torch.zeros(b.shape[1:], dtype=torch.int32, device=b.device)
        if b_acc is None
        else b_acc.to(torch.int32)
    )
    scale32 = scale.to(torch.float32).reshape(())
    per_step = 2 * (a[0].numel() + b[0].numel() + math.prod(a.shape[1:-1]) * b.shape[-1])
    chunk = max(1, _DENSE_CHUNK_ELEMENTS // max(per_step, 1))
    outs = []
    for a_c, b_c in zip(a.split(chunk), b.split(chunk), strict=True):
        a_f, b_f = a_c.to(ftype), b_c.to(ftype)
        a_prev = torch.cumsum(a_f, 0) - a_f + a_cnt.to(ftype)
        b_cur = torch.cumsum(b_f, 0) + b_cnt.to(ftype)
        integer = torch.matmul(a_f, b_cur) + torch.matmul(a_prev, b_f)
        outs.append(scale32 * integer.to(torch.float32))
        a_cnt = a_cnt + a_c.sum(0, dtype=torch.int32)
        b_cnt = b_cnt + b_c.sum(0, dtype=torch.int32)
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return (
        out.contiguous(),
        a_cnt.to(torch.int8).contiguous(),
        b_cnt.to(torch.int8).contiguous(),
    )


@kernel_op("spike_matmul", mutates_args=("a_acc", "b_acc"), check=_check_spike_matmul)
def _spike_matmul_op(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    a_acc: torch.Tensor | None = None,
    b_acc: torch.Tensor | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    backend = backend_for(a, ("triton", "torch"))
    # slabs past the kernels' int32 offsets take the PyTorch path
    fits = slabs_fit(m, k, n) and min(math.prod(a.shape[1:-2]), m, k, n) > 0
    if backend == "triton" and fits:
        from spikekernels.kernels.spike_matmul import spike_matmul_triton

        out = spike_matmul_triton(launcher, a, b, scale, a_acc, b_acc, inplace=inplace)
        return (out[0], placeholder(a_acc), placeholder(b_acc)) if inplace else out
    if backend == "reference":
        from spikekernels import reference

        out = reference.spike_matmul(a, b, scale, a_acc, b_acc)
    else:
        out = spike_matmul_torch(a, b, scale, a_acc, b_acc)
    return out[0], state_result(inplace, out[1], a_acc), state_result(inplace, out[2], b_acc)


@_spike_matmul_op.register_fake
def _(a, b, scale, a_acc=None, b_acc=None, inplace=False):
    _check_spike_matmul(a, b, scale, a_acc, b_acc, inplace)
    out = a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.float32)
    if inplace:
        return out, placeholder(a_acc), placeholder(b_acc)
    return (
        out,
        a.new_empty(a.shape[1:], dtype=torch.int8),
        b.new_empty(b.shape[1:], dtype=torch.int8),
    )


def spike_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    a_acc: torch.Tensor | None = None,
    b_acc: torch.Tensor | None = None,
    *,
    inplace: bool = False,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spike product of SESA attention (SPEC.md §5), all T steps in one kernel on GPU.

    With running counts ``A_t = A_init + sum_{tau<=t} a_tau`` and ``B_t`` likewise, each step
    emits the increment of the product of the running values:

    ``out_t = scale * (A_t @ B_t - A_{t-1} @ B_{t-1}) = scale * (a_t @ B_t + A_{t-1} @ b_t)``

    so ``sum_t out_t = scale * (A_T @ B_T - A_init @ B_init)``: once both trains have settled
    it is the product of the quantized operands. Attention uses it for the scores ``Q K^T``
    (``b = k.transpose(-1, -2)``, ``scale = theta_q * theta_k / sqrt(d)``) and the context
    ``A V``.

    Args:
        a: ``[T, *batch, M, K]`` int8 ternary spikes (values in {-1, 0, 1}), any strides.
        b: ``[T, *batch, K, N]`` int8 ternary spikes, any strides: a transposed view such as
            ``k.transpose(-1, -2)`` is read in place, not copied.
        scale: one-element float tensor (``theta_a * theta_b`` times any extra factor), read
            on the device (never ``.item()``), used in float32.
        a_acc, b_acc: optional incoming running counts, int8 ``[*batch, M, K]`` and
            ``[*batch, K, N]``; zero when omitted.
        inplace: write the outgoing counts into the given ``a_acc`` and ``b_acc`` (both
            required, contiguous, sharing no memory with an input or each other) and return
            those same tensors (``ops._inplace``): counts at fixed addresses, as a CUDA graph
            replays them.
        validate: also check on a GPU (reads all the data; a host sync) what is always
            checked on CPU tensors: the spikes are ternary, every running count stays in int8
            range at every step, and ``scale`` is finite and nonzero.

    Returns:
        ``(out, a_acc, b_acc)``: ``out`` float32 ``[T, *batch, M, N]`` and the outgoing counts
        (int8, contiguous, fresh tensors, never aliases of the given ones; with ``inplace``
        the given tensors, updated). Feeding the counts back into the next call makes a
        chunked run equal a whole run bit for bit.

    Exactness: the integer part is computed exactly (int8 operands, int32 accumulation on the
    GPU; exact float matmuls on CPU) and scaled once in float32 (``scale * float(int)``), so
    the result is bit-identical to ``reference.spike_matmul`` on every path.

    Bounds: every running count must stay in int8, ``[-128, 127]``, at every step. That holds
    for the paper's quantizers (levels 8-32) and any level up to 256 signed / 128 unsigned,
    since ST-BIF counts stay inside the level bounds. A count that leaves int8 is a
    ``ValueError`` on CPU tensors always and on a GPU with ``validate=True``. On a GPU
    without ``validate`` it is not detected (that would need a host sync per call): the
    Triton kernel then wraps the count in int8 and its answer is wrong.

    Dispatch: CUDA tensors run the Triton kernel (fused over T, silent tiles skipped; K > 64
    through a split-K path), unless one operand or output slab holds 2^31 elements or more
    (its int32 offsets), which takes the dense path; CPU tensors run the batched dense path
    above (the Triton kernel under ``TRITON_INTERPRET=1``). Inference only: no autograd.
    """
    # Metadata only (free): a non-tensor argument would otherwise meet the dispatcher's
    # less helpful schema error first.
    _check_spike_matmul(a, b, scale, a_acc, b_acc, inplace)
    check_finite_nonzero(scale, "scale", validate)
    check_ternary(a, "a", validate)
    check_ternary(b, "b", validate)
    check_running_counts(a, a_acc, "a", validate)
    check_running_counts(b, b_acc, "b", validate)
    out = call_op("spike_matmul", a, b, scale, a_acc, b_acc, inplace)
    return own_state(out, (1, 2), (a_acc, b_acc)) if inplace else out

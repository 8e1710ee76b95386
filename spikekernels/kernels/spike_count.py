"""Spikes per step, counted in one pass: what ``evaluate.sops.SpikeCounter``'s hooks add up.

A neuron's output ``[T, M]`` (int8 spikes, or the integer view of float ``sigma * theta``)
gives ``out[t] += #{m : x[t, m] != 0}``; a neuron that returns its count after each step
(``counts_out``) gives ``out[t] += #{m : x[t, m] != x[t - 1, m]}``, with ``x[-1]`` the count
``before`` the call, which is then set to ``x[T - 1]`` in place for the next call.

PyTorch needs several passes for either (``count_nonzero`` along a dim materialises a
``!= 0`` tensor and reduces it; the counts' differences are one more tensor the size of the
output), which under CUDA graphs made counting as costly as the run itself (ViT-S, H200,
2026-12-04: 94% more time). Here each program reads its elements once: a bounded grid,
each program striding over blocks of ``BLOCK`` elements and keeping the ``T`` step counts
in one vector, then one atomic add per step and program (integers: the order of the adds
changes nothing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spikekernels.kernels import cdiv, on_device

# Elements a program reads per step and block: two 16-byte loads a thread for int8 at 4 warps
# (more bytes in flight per step: each step ends in a reduction across the warps).
_BLOCK = 4096
_NUM_WARPS = 4
# The largest M: the offsets within a step are int32 (the steps' pointers advance in 64 bits).
MAX_ELEMENTS = 2**31 - 1 - _BLOCK
# At most this many programs (a few per SM of a large GPU): each then adds its T counts once,
# so the atomics on the T counters stay few whatever the size of the output.
MAX_PROGRAMS = 1024


@triton.jit
def nonzero_per_step_kernel(
    x_ptr,  # [T, M] integer, contiguous
    before_ptr,  # [M] x's dtype: the count before the call, then x[T - 1] (DIFF only)
    out_ptr,  # [T] int32, added to
    T,
    M,
    DIFF: tl.constexpr,
    T_BLOCK: tl.constexpr,  # a power of two >= T
    BLOCK: tl.constexpr,
):
    """out[t] += #(x[t] != 0), or with DIFF #(x[t] != x[t - 1]), x[-1] = before."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    steps = tl.arange(0, T_BLOCK)
    counts = tl.zeros([T_BLOCK], tl.int32)
    lanes = tl.arange(0, BLOCK)
    for block in range(pid, tl.cdiv(M, BLOCK), programs):
        offs = block * BLOCK + lanes  # int32: M <= MAX_ELEMENTS
        mask = offs < M
        ptrs = x_ptr + offs
        if DIFF:
            prev = tl.load(before_ptr + offs, mask=mask, other=0)
        for t in range(T):
            cur = tl.load(ptrs, mask=mask, other=0)
            if DIFF:
                n = tl.sum((cur != prev).to(tl.int32))
                prev = cur
            else:
                n = tl.sum((cur != 0).to(tl.int32))
            counts += tl.where(steps == t, n, 0)
            ptrs += M
        if DIFF:
            # this program alone reads and writes these elements of ``before``
            tl.store(before_ptr + offs, prev, mask=mask)
    tl.atomic_add(out_ptr + steps, counts, mask=(steps < T) & (counts != 0))


@on_device
def nonzero_per_step_triton(
    launch, x: torch.Tensor, before: torch.Tensor | None = None
) -> torch.Tensor:
    """``[T]`` int32 counts of ``x`` ``[T, M]`` (an integer dtype, contiguous): its nonzero
    elements per step, or with ``before`` (``[M]``, x's dtype, contiguous) the elements that
    changed from the step before, ``before`` then holding ``x[T - 1]``.
    ``M <= MAX_ELEMENTS``."""
    T, M = x.shape
    out = torch.zeros(T, dtype=torch.int32, device=x.device)
    if T == 0 or M == 0:
        return out
    grid = min(cdiv(M, _BLOCK), MAX_PROGRAMS)
    launch(nonzero_per_step_kernel)[(grid,)](
        x, x if before is None else before, out, T, M,
        DIFF=before is not None, T_BLOCK=triton.next_power_of_2(T), BLOCK=_BLOCK,
        num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out

"""Exact mode's residual stream update (SPEC.md §9.2, §9.4): ``D_t + fl64(theta) * count_t``
for all T steps in one launch.

Each program owns BLOCK elements of a step and keeps their running count in registers (int32)
for all T steps: per element and step it reads one int8 spike and, unless ``D`` is absent,
one float64 ``D_t`` (both prefetched one step ahead), and writes one float64. No count or
product goes through memory.

Per step, the operations of the PyTorch formula in its order, one rounding each:
``count += sigma_t`` (int32); ``p = fl64(theta) * fl64(count)``; ``out = D_t + p``. The
product is exact (an int32 count far below 2^29 times a float32 step), and so is the sum while
the residual steps span at most 2^16 (``convert`` checks it): any order would give these bits,
but the kernel still rounds once per operation. Triton lets the compiler contract a multiply
with the add after it into one FMA; here the product reaches the add through a select on the
lane mask, which blocks that: ``D + select(m, p, +0.0)`` cannot be rewritten as
``select(m, D + p, D)`` (it differs at ``D = -0.0``), so the add's operand is no multiply.
tests/triton_sm90.py checks that the PTX holds no ``fma.rn.f64``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spikekernels.kernels import cdiv, on_device

# BLOCK=1024, 4 warps: 8 elements per thread, two 16-byte float64 loads and stores each.
# Untuned on hardware so far: see bench/results/.
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def residual_value(d, theta, count, mask, HAS_D: tl.constexpr):
    """``D_t + fl64(theta) * fl64(count)`` (or the product alone), one rounding each: the
    select keeps the product out of an FMA with the add (module docstring). Zero where
    ``mask`` is off. Shared with the fused LayerNorm neuron, which forms ``D_t`` the same way."""
    value = tl.where(mask, theta * count.to(tl.float64), 0.0)
    if HAS_D:
        value = d + value
    return value


@triton.jit
def exact_residual_add_kernel(
    d_ptr,  # [T, numel] float64 spike-driven residual D_t (HAS_D only)
    spikes_ptr,  # [T, numel] int8 spikes of the branch neuron
    theta_ptr,  # [1] threshold of the branch neuron (any float dtype)
    count_ptr,  # [numel] int8 count before the first step (HAS_COUNT only)
    out_ptr,  # [T, numel] float64
    numel,
    T,
    HAS_D: tl.constexpr,
    HAS_COUNT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """count += sigma_t; out_t = D_t + fl64(theta) * fl64(count) (or the product alone)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    theta = tl.load(theta_ptr).to(tl.float64)
    if HAS_COUNT:
        count = tl.load(count_ptr + offs, mask=mask, other=0).to(tl.int32)
    else:
        count = tl.zeros([BLOCK], tl.int32)
    spikes_ptrs = spikes_ptr + offs
    d_ptrs = d_ptr + offs
    out_ptrs = out_ptr + offs
    sigma_next = tl.load(spikes_ptrs, mask=mask, other=0)
    d_next = 0.0  # a placeholder residual_value does not read
    if HAS_D:
        d_next = tl.load(d_ptrs, mask=mask, other=0.0)
    for t in range(T):
        count += sigma_next.to(tl.int32)
        spikes_ptrs += numel
        sigma_next = tl.load(spikes_ptrs, mask=mask & (t + 1 < T), other=0)
        value = residual_value(d_next, theta, count, mask, HAS_D)
        if HAS_D:
            d_ptrs += numel
            d_next = tl.load(d_ptrs, mask=mask & (t + 1 < T), other=0.0)
        tl.store(out_ptrs, value, mask=mask)
        out_ptrs += numel


@on_device
def exact_residual_add_triton(
    launch,
    spikes: torch.Tensor,
    d: torch.Tensor | None,
    threshold: torch.Tensor,
    count: torch.Tensor | None,
) -> torch.Tensor:
    """Host side: ``spikes`` ``[T, *shape]`` int8, ``d`` the same shape float64 or None,
    ``threshold`` one element, ``count`` ``[*shape]`` int8 or None (checked by the op).
    Returns a fresh ``[T, *shape]`` float64."""
    spikes = spikes.contiguous()
    out = torch.empty(spikes.shape, dtype=torch.float64, device=spikes.device)
    numel = spikes[0].numel()
    if numel == 0:
        return out
    launch(exact_residual_add_kernel)[(cdiv(numel, BLOCK),)](
        out if d is None else d.contiguous(),
        spikes,
        threshold.contiguous(),
        spikes if count is None else count.contiguous(),
        out,
        numel,
        spikes.shape[0],
        HAS_D=d is not None,
        HAS_COUNT=count is not None,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    return out

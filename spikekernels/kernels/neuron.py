"""Fused multi-step ST-BIF neuron (SPEC.md §2): the whole T loop in one launch.

Each program owns BLOCK neurons, keeps their membrane ``v`` and count ``s`` in registers for
all T steps, reads each input element once and writes each spike once (int8, or
``sigma * theta`` in the input dtype). The threshold is read on the device: no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spikekernels.kernels import on_device
from spikekernels.kernels.rounding import bf16_bits_rtne

# BLOCK=1024, 4 warps: 8 neurons per thread, so a step loads 32 B of fp32 and stores 8 B of
# int8 per thread (vectorised). Untuned on hardware so far: see bench/results/.
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def st_bif_kernel(
    x_ptr,  # [T, numel] float32 / float16 / bfloat16 increments u_t
    theta_ptr,  # [1] threshold (any float dtype)
    v_in_ptr,  # [numel] float32 membrane, read when HAS_STATE
    s_in_ptr,  # [numel] integer count, read when HAS_STATE
    out_ptr,  # [T, numel] int8 spikes, or sigma * theta in x's dtype (int16 bits for bf16)
    v_out_ptr,  # [numel] float32
    s_out_ptr,  # [numel] integer count
    numel,
    T,
    n_min,
    p_max,
    HAS_STATE: tl.constexpr,
    FLOAT_OUT: tl.constexpr,
    OUT_BF16_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """v += u_t / theta (correctly rounded); fire +1 if v >= 1 and s < p_max, -1 if v < 0 and
    s > n_min; s += sigma; v -= sigma."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    theta = tl.load(theta_ptr).to(tl.float32)
    if HAS_STATE:
        v = tl.load(v_in_ptr + offs, mask=mask, other=0.5)
        s = tl.load(s_in_ptr + offs, mask=mask, other=0).to(tl.int32)
    else:
        v = tl.full([BLOCK], 0.5, tl.float32)
        s = tl.zeros([BLOCK], tl.int32)
    x_ptrs = x_ptr + offs
    out_ptrs = out_ptr + offs
    for _ in range(T):
        u = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        # div_rn: Triton's `/` on fp32 is an approximate division on NVIDIA GPUs; SPEC.md asks
        # for the correctly rounded one so that spikes match the reference bit for bit.
        v = v + tl.div_rn(u, theta)
        fire_pos = (v >= 1.0) & (s < p_max)
        fire_neg = (v < 0.0) & (s > n_min)
        sigma = fire_pos.to(tl.int32) - fire_neg.to(tl.int32)
        s = s + sigma
        v = v - sigma.to(tl.float32)
        if OUT_BF16_BITS:
            spike = bf16_bits_rtne(sigma.to(tl.float32) * theta)
        elif FLOAT_OUT:
            spike = (sigma.to(tl.float32) * theta).to(out_ptr.dtype.element_ty)
        else:
            spike = sigma.to(tl.int8)
        tl.store(out_ptrs, spike, mask=mask)
        x_ptrs += numel
        out_ptrs += numel
    tl.store(v_out_ptr + offs, v, mask=mask)
    tl.store(s_out_ptr + offs, s.to(s_out_ptr.dtype.element_ty), mask=mask)


@on_device
def st_bif_triton(
    launch,
    x: torch.Tensor,
    theta: torch.Tensor,
    n_min: int,
    p_max: int,
    v: torch.Tensor | None,
    s: torch.Tensor | None,
    float_out: bool,
    count_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host side: allocate outputs and launch ``st_bif_kernel`` over contiguous ``x``."""
    x = x.contiguous()
    shape = x.shape[1:]
    numel = x[0].numel()
    out = torch.empty(x.shape, dtype=x.dtype if float_out else torch.int8, device=x.device)
    v_out = torch.empty(shape, dtype=torch.float32, device=x.device)
    s_out = torch.empty(shape, dtype=count_dtype if s is None else s.dtype, device=x.device)
    if numel == 0:
        return out, v_out, s_out
    has_state = v is not None
    v_in = v.contiguous() if has_state else v_out
    s_in = s.contiguous() if has_state else s_out
    grid = (triton.cdiv(numel, BLOCK),)
    bf16_bits = float_out and x.dtype == torch.bfloat16
    launch(st_bif_kernel)[grid](
        x,
        theta,
        v_in,
        s_in,
        out.view(torch.int16) if bf16_bits else out,
        v_out,
        s_out,
        numel,
        x.shape[0],
        n_min,
        p_max,
        HAS_STATE=has_state,
        FLOAT_OUT=float_out,
        OUT_BF16_BITS=bf16_bits,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    return out, v_out, s_out

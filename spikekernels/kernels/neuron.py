"""Fused multi-step ST-BIF neuron (SPEC.md §2): the whole T loop in one launch.

Each program owns BLOCK neurons, keeps their membrane ``v`` and count ``s`` in registers for
all T steps, reads each input element once and writes each spike once (int8, or
``sigma * theta`` in the input dtype). The threshold is read on the device: no host sync.
The new state goes into fresh tensors, or with ``inplace`` into the given ones (the program
that reads a neuron's state is the one that writes it back).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spikekernels.kernels import cdiv, on_device
from spikekernels.kernels.activity import (
    active_layout,
    block_samples,
    record_active_elements,
)
from spikekernels.kernels.rounding import bf16_bits_rtne

# BLOCK=1024, 4 warps: 8 neurons per thread, so a step loads 32 B of fp32 and stores 8 B of
# int8 per thread (vectorised). Untuned on hardware so far: see bench/results/.
BLOCK = 1024
NUM_WARPS = 4
# steps of input in flight, the computing one included (see the kernel's step loop)
STAGES = 4
# (BLOCK, NUM_WARPS, STAGES): the default, then alternatives for bench/bench_neuron.py's
# test_st_bif_launches to time on a GPU (tests/triton_sm90.py compiles each). On the H200 the
# default streamed 87% of copy bandwidth at T = 1 but 57-63% at T >= 8 (2026-12-04), where the
# pipelined loop takes over: no pipelining (occupancy alone hides the loads, as at T = 1),
# fewer stages, and wider or narrower blocks.
TILE_CANDIDATES = [
    (BLOCK, NUM_WARPS, STAGES),
    (1024, 4, 1),
    (1024, 4, 2),
    (2048, 8, 4),
    (512, 4, 4),
    (4096, 8, 2),
]


@triton.jit
def st_bif_step(u, theta, v, count, n_min, p_max):
    """One SPEC.md §2 step on float32 inputs ``u``: returns ``(sigma, v, count)`` (int32
    sigma and count). ``div_rn``: Triton's ``/`` on fp32 is an approximate division on NVIDIA
    GPUs; SPEC.md asks for the correctly rounded one, so spikes match the reference bit for
    bit."""
    v = v + tl.div_rn(u, theta)
    # two selects rather than the difference of two casts: 233 instructions a step instead
    # of 272 for st_bif_kernel's 8 neurons a thread on sm_90 (the same integers)
    fire = (v >= 1.0) & (count < p_max)
    sigma = tl.where(fire, 1, tl.where((v < 0.0) & (count > n_min), -1, 0))
    return sigma, v - sigma.to(tl.float32), count + sigma


@triton.jit
def st_bif_kernel(
    x_ptr,  # [T, numel] float32 / float16 / bfloat16 increments u_t
    theta_ptr,  # [1] threshold (any float dtype)
    v_in_ptr,  # [numel] float32 membrane, read when HAS_STATE
    s_in_ptr,  # [numel] integer count, read when HAS_STATE
    out_ptr,  # [T, numel] int8 spikes, or sigma * theta in x's dtype (int16 bits for bf16)
    v_out_ptr,  # [numel] float32
    s_out_ptr,  # [numel] integer count
    active_ptr,  # [T, B] int32 per-sample flags, set where a sample fires (HAS_ACTIVE only)
    numel,
    T,
    n_min,
    p_max,
    B,  # samples (HAS_ACTIVE only)
    per_sample,  # elements of one sample in one step (HAS_ACTIVE only)
    HAS_STATE: tl.constexpr,
    FLOAT_OUT: tl.constexpr,
    OUT_BF16_BITS: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    WIDE_SAMPLES: tl.constexpr,  # per_sample >= BLOCK (HAS_ACTIVE only)
    BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
):
    """v += u_t / theta (correctly rounded); fire +1 if v >= 1 and s < p_max, -1 if v < 0 and
    s > n_min; s += sigma; v -= sigma; active[t, i // per_sample] = 1 where sigma != 0."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    theta = tl.load(theta_ptr).to(tl.float32)
    # v_in/v_out and s_in/s_out may be one tensor each (inplace): safe, as each program reads
    # its own BLOCK neurons' state here, before the loop, and writes those same elements (and
    # no others) after it; no program touches another's.
    if HAS_STATE:
        v = tl.load(v_in_ptr + offs, mask=mask, other=0.5)
        s = tl.load(s_in_ptr + offs, mask=mask, other=0).to(tl.int32)
    else:
        v = tl.full([BLOCK], 0.5, tl.float32)
        s = tl.zeros([BLOCK], tl.int32)
    out_ptrs = out_ptr + offs
    if HAS_ACTIVE:
        first = pid * BLOCK // per_sample
        active_ptr += first
        # lanes of `first` (clamped first: past 2^31 elements a sample, int32 would wrap)
        split = tl.minimum((first + 1) * per_sample - pid * BLOCK, BLOCK).to(tl.int32)
    # The loop is a chain of dependent steps: the kernel streams only if later steps' inputs
    # are in flight while a step computes. Triton's pipeliner keeps STAGES - 1 steps' loads
    # ahead as asynchronous copies into shared memory (sm_90: about 3x the bytes in flight
    # that a hand prefetch of the next step kept, in fewer registers).
    step = tl.cast(numel, tl.int64)  # t * numel in int64: T * numel may pass 2^31
    for t in tl.range(T, num_stages=STAGES):
        # indexed, not a pointer carried round the loop (the pipeliner would keep one a stage)
        u = tl.load(x_ptr + (offs + t * step), mask=mask, other=0.0)
        u = u.to(tl.float32)
        sigma, v, s = st_bif_step(u, theta, v, s, n_min, p_max)
        if OUT_BF16_BITS:
            spike = bf16_bits_rtne(sigma.to(tl.float32) * theta)
        elif FLOAT_OUT:
            spike = (sigma.to(tl.float32) * theta).to(out_ptr.dtype.element_ty)
        else:
            spike = sigma.to(tl.int8)
        tl.store(out_ptrs, spike, mask=mask)
        if HAS_ACTIVE:
            record_active_elements(
                active_ptr, mask & (sigma != 0), split, per_sample, BLOCK, WIDE_SAMPLES
            )
            active_ptr += B
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
    active: torch.Tensor | None = None,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host side: allocate outputs and launch ``st_bif_kernel`` over contiguous ``x``;
    ``active`` ``[T, B]`` int32 contiguous (checked by the op) or None. Returns ``(spikes,
    v, count)``, the state fresh, or with ``inplace`` the given ``v`` and ``s`` (both given
    and contiguous, checked by the op), written by the program that read them."""
    x = x.contiguous()
    shape = x.shape[1:]
    numel = x[0].numel()
    out = torch.empty(x.shape, dtype=x.dtype if float_out else torch.int8, device=x.device)
    if inplace:
        v_out, s_out = v, s
    else:
        v_out = torch.empty(shape, dtype=torch.float32, device=x.device)
        s_out = torch.empty(shape, dtype=count_dtype if s is None else s.dtype, device=x.device)
    if numel == 0:
        return out, v_out, s_out
    has_state = v is not None
    v_in = v.contiguous() if has_state else v_out
    s_in = s.contiguous() if has_state else s_out
    grid = (cdiv(numel, BLOCK),)
    bf16_bits = float_out and x.dtype == torch.bfloat16
    samples, per_sample = active_layout(active, numel)
    launch(st_bif_kernel)[grid](
        x,
        theta,
        v_in,
        s_in,
        out.view(torch.int16) if bf16_bits else out,
        v_out,
        s_out,
        s_out if active is None else active,
        numel,
        x.shape[0],
        n_min,
        p_max,
        samples,
        per_sample,
        HAS_STATE=has_state,
        FLOAT_OUT=float_out,
        OUT_BF16_BITS=bf16_bits,
        HAS_ACTIVE=active is not None,
        WIDE_SAMPLES=block_samples(per_sample, BLOCK),
        BLOCK=BLOCK,
        STAGES=STAGES,
        num_warps=NUM_WARPS,
    )
    return out, v_out, s_out

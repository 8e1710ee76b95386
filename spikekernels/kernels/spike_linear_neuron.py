"""Fused spike linear + ST-BIF neuron (SPEC.md §6 then §2, float mode): the T loop inside.

Time-major spikes ``[T, rows, K]`` (int8, ternary) in, the output neuron's spikes
``[T, rows, N]`` out (int8, or ``sigma * theta`` float32); the membrane ``v`` (float32) and
the count stay in registers for the whole chunk and only the final ones are written (into
fresh tensors, or with ``inplace`` into the given ones), so the float32 ``[T, rows, N]``
linear output never exists. Two launches:

1. ``kernels.tile_flags.step_tile_any_kernel``: whether each (step, row tile)
   holds a nonzero spike.
2. ``spike_linear_neuron_kernel``: one program per (row tile, output tile). For each step:
   ``acc = s_t @ W^T`` from zero (float mode feeds increments), by ``spike_dot``: a float32
   weight as three bf16 tensor-core dots of its exact split, half weights directly; a silent
   spike tile runs the K loop zero times. Then the epilogue of ``spike_linear_kernel``,
   ``y = fma(theta_in, acc, +0.0)`` (no contraction with the bias add) ``+ bias_share`` on
   due steps, and the SPEC.md §2 step on ``y``. The epilogue runs on silent steps too: the
   bias may be due, and a membrane left above 1 by a large step keeps firing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spikekernels.kernels import INTERPRET, cdiv, on_device
from spikekernels.kernels.activity import active_layout, record_active_rows
from spikekernels.kernels.neuron import st_bif_step
from spikekernels.kernels.spike_linear import dot_flags, dot_operands, even_tiles, spike_dot
from spikekernels.kernels.target import load_threshold
from spikekernels.kernels.tile_flags import step_tile_flags

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) on a GPU: BLOCK_M = 64 rows per
# warpgroup for Hopper's wgmma and a fine skip granularity; BLOCK_N = 64 (the spikes arrive
# in the weight's dtype, so no conversion in registers: spike_linear.dot_operands), and 32 for
# float_out, whose float spikes' stores spilled at 64 (tests/triton_sm90.py checks). v and
# the count live in registers across the T loop next to the float32 accumulator and the
# three weight parts' loads. Untuned on hardware so far: see bench/results/.
_GPU_TILES = (64, 64, 64, 4, 3)
_GPU_TILES_FLOAT_OUT = (64, 32, 64, 4, 3)
# The default (int8 spikes out) and the alternatives that also compile for sm_90 without a
# spill (32 columns: 162 registers; 128 rows at 8 warps; a 32-wide K tile with a stage more),
# for bench/bench_tiles.py to time; tests/triton_sm90.py compiles each.
TILE_CANDIDATES = [_GPU_TILES, (64, 32, 64, 4, 3), (128, 64, 64, 8, 3), (64, 64, 32, 4, 4)]
# Under the numpy interpreter: small tiles so that CPU tests cover several row, column and K
# tiles (and silent and active tiles side by side) at small shapes.
_INTERPRET_TILES = (16, 16, 32, 4, 1)


def tile_config(float_out: bool = False) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)``, for int8 spikes out or
    ``float_out``."""
    if INTERPRET:
        return _INTERPRET_TILES
    return _GPU_TILES_FLOAT_OUT if float_out else _GPU_TILES


@triton.jit
def spike_linear_neuron_kernel(
    s_ptr,  # [T, rows, K] ternary spikes in the weight's dtype (spike_linear.dot_operands)
    w_ptr,  # [N, K] float16 / bfloat16, or [PARTS, N, K] bf16 parts of a float32 weight
    theta_in_ptr,  # [1] threshold of the neuron feeding the spikes (any float dtype)
    bias_ptr,  # [N] float32 bias share per due step (HAS_BIAS only)
    theta_ptr,  # [1] or [N] threshold of the output neuron (any float dtype)
    flag_ptr,  # [T, num_m] int32 from step_tile_any_kernel
    v_in_ptr,  # [rows, N] float32 incoming membrane (HAS_STATE; else never read)
    count_in_ptr,  # [rows, N] integer incoming count (HAS_STATE; else never read)
    out_ptr,  # [T, rows, N] int8 spikes, or float32 sigma * theta (FLOAT_OUT)
    v_out_ptr,  # [rows, N] float32
    count_out_ptr,  # [rows, N] integer count
    active_ptr,  # [T, B] int32 per-sample flags, set where a sample fires (HAS_ACTIVE only)
    T,
    rows,
    N,
    K,
    num_m,
    s_step,  # rows * K, out_step: rows * N: elements between two steps of s and of out (host
    out_step,  # ints: i64 arguments from 2^31 on, where an in-kernel rows * K would wrap)
    due_steps,  # this chunk's steps [0, due_steps) get the bias share
    part_stride,  # N * K: elements between weight parts (PARTS > 1)
    n_min,
    p_max,
    B,  # samples (HAS_ACTIVE only)
    rows_per_sample,  # (HAS_ACTIVE only)
    HAS_BIAS: tl.constexpr,
    HAS_STATE: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    FLOAT_OUT: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    INT8_W: tl.constexpr,  # always False: int8 weights are exact mode's (exact_linear)
    PARTS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    EVEN_M: tl.constexpr,  # spike_linear.even_tiles'
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc = s_t @ W^T; y = fl32(theta_in * acc) (+ share); v += y / theta; fire; v -= sigma."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rs < rows
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    ks = tl.arange(0, BLOCK_K)
    state_offs = rs[:, None] * N + cols[None, :]

    theta_in = tl.load(theta_in_ptr).to(tl.float32)
    if HAS_BIAS:
        share = tl.load(bias_ptr + cols, mask=col_mask, other=0.0)[None, :]
    theta = load_threshold(theta_ptr, cols, col_mask, PER_CHANNEL)
    # v_in/v_out and count_in/count_out may be one tensor each (inplace): safe, as each
    # program reads its own (row tile, output tile)'s state here, before the T loop, and
    # writes those same elements (state_offs, mask) and no others after it; the tiles of
    # the grid do not overlap.
    if HAS_STATE:
        v = tl.load(v_in_ptr + state_offs, mask=mask, other=0.5)
        count = tl.load(count_in_ptr + state_offs, mask=mask, other=0).to(tl.int32)
    else:
        # the fresh state, from loads that never read (T >= 1) rather than constant tiles: from
        # the constants, sm_90's first chunk of a qkv layer (per-channel thresholds, activity)
        # at rows not a multiple of BLOCK_M spilled 24-48 B at 255 registers, now 0-12 B
        fresh = mask & (T < 0)
        v = tl.load(v_in_ptr + state_offs, mask=fresh, other=0.5)
        count = tl.load(count_in_ptr + state_offs, mask=fresh, other=0).to(tl.int32)

    # the weight tile is read as [BLOCK_K, BLOCK_N] straight from [N, K] (K-major B)
    w_start = w_ptr + cols[None, :] * K + ks[:, None]
    s_start = s_ptr + rs[:, None] * K + ks[None, :]
    out_ptrs = out_ptr + state_offs
    if HAS_ACTIVE:
        active_ptrs = active_ptr + rs // rows_per_sample
    for t in range(T):
        # The step's flag by index, not by a pointer carried through the loop: triton 3.6's
        # tritongpu-remove-layout-conversions dropped that pointer's increment (the flag feeds
        # the K loop's bound), so every step read step 0's flag, and a chunk whose first step
        # was silent in a row tile skipped that tile's products at every step (H200,
        # 2026-12-04). tests/triton_sm90.py checks that no argument the TTIR reads is lost.
        k_end = tl.where(tl.load(flag_ptr + pid_m + t * num_m) != 0, K, 0)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc = spike_dot(
            acc,
            s_start,
            w_start,
            row_mask,
            col_mask,
            K,
            k_end,
            part_stride,
            INT8_W,
            PARTS,
            DOT_FP32,
            EVEN_M,
            EVEN_N,
            EVEN_K,
            BLOCK_K,
        )
        y = tl.fma(acc, theta_in, 0.0)
        if HAS_BIAS:
            y = tl.where(t < due_steps, y + share, y)
        sigma, v, count = st_bif_step(y, theta, v, count, n_min, p_max)
        if FLOAT_OUT:
            tl.store(out_ptrs, sigma.to(tl.float32) * theta, mask=mask)
        else:
            tl.store(out_ptrs, sigma.to(tl.int8), mask=mask)
        if HAS_ACTIVE:
            record_active_rows(active_ptrs, sigma, row_mask, col_mask, BLOCK_M, BLOCK_N)
            active_ptrs += B
        s_start += s_step
        out_ptrs += out_step
    tl.store(v_out_ptr + state_offs, v, mask=mask)
    tl.store(count_out_ptr + state_offs, count.to(count_out_ptr.dtype.element_ty), mask=mask)


@on_device
def spike_linear_neuron_triton(
    launch,
    s: torch.Tensor,
    weight: torch.Tensor,
    in_threshold: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    bias_share: torch.Tensor | None,
    due_steps: int,
    v: torch.Tensor | None,
    count: torch.Tensor | None,
    float_out: bool,
    count_dtype: torch.dtype,
    active: torch.Tensor | None = None,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host side: ``s`` ``[T, rows, K]`` int8 and ``weight`` contiguous, ``[N, K]`` float16 /
    bfloat16 or the ``[3, N, K]`` bf16 split of a float32 weight; ``bias_share`` float32
    ``[N]`` added on the first ``due_steps`` steps; ``v``/``count`` ``[rows, N]`` contiguous
    or None; ``active`` ``[T, B]`` int32 contiguous or None.
    Returns ``(spikes [T, rows, N], v [rows, N] float32, count [rows, N])``: the state fresh,
    or with ``inplace`` the given ``v`` and ``count`` (views of the caller's contiguous
    state), written by the program that read them."""
    T, rows = s.shape[:2]
    N = weight.shape[-2]
    out_dtype = torch.float32 if float_out else torch.int8
    out = torch.empty((T, rows, N), dtype=out_dtype, device=s.device)
    if inplace:
        v_out, count_out = v, count
    else:
        v_out = torch.empty((rows, N), dtype=torch.float32, device=s.device)
        count_out = torch.empty((rows, N), dtype=count_dtype, device=s.device)
    if rows == 0 or N == 0:
        return out, v_out, count_out
    block_m, block_n, block_k, num_warps, num_stages = tile_config(float_out)
    flags, num_m = step_tile_flags(launch, s, block_m, num_warps)
    s, weight = dot_operands(s, weight)
    K = s.shape[-1]
    launch(spike_linear_neuron_kernel)[(num_m, cdiv(N, block_n))](
        s,
        weight,
        in_threshold,
        in_threshold if bias_share is None else bias_share,
        threshold.contiguous(),
        flags,
        v_out if v is None else v,
        count_out if count is None else count,
        out,
        v_out,
        count_out,
        flags if active is None else active,
        T,
        rows,
        N,
        K,
        num_m,
        rows * K,
        rows * N,
        due_steps,
        N * K,
        n_min,
        p_max,
        *active_layout(active, rows),
        HAS_BIAS=bias_share is not None,
        HAS_STATE=v is not None,
        PER_CHANNEL=threshold.numel() > 1,
        FLOAT_OUT=float_out,
        HAS_ACTIVE=active is not None,
        **dot_flags(weight),
        **even_tiles(rows, N, K, block_m, block_n, block_k),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out, v_out, count_out

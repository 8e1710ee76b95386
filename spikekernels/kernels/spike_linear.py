"""Spike linear (SPEC.md §6) on tensor cores, skipping row tiles whose spikes are all zero.

Time and the leading dims are flattened into rows: spikes ``[R, K]`` with ``R = T * rows``,
output ``[R, N]`` float32. Two launches:

1. ``kernels.tile_flags.step_tile_any_kernel`` (the rows as one step): whether each tile of
   ``BLOCK_M`` rows holds a spike.
2. ``spike_linear_kernel``: one program per ``BLOCK_M x BLOCK_N`` output tile. A silent row
   tile skips the whole K loop (no weight traffic, no MMA) and writes only the bias where due.
   Otherwise ``acc = s @ W^T`` with ``tl.dot`` (``spike_dot``): int8 x int8 -> int32 (exact)
   for int8 weights, spikes cast to the weight dtype (exact: they are -1, 0, 1) with float32
   accumulation for float16 / bfloat16, and for a float32 weight three bf16 dots of its exact
   split ``[3, N, K]`` (``ops.weight_split``) into one float32 accumulator: bf16 tensor cores,
   the same exact products as an IEEE float32 dot, summed in another order.

Epilogue: ``y = c[n] * float(acc)`` with ``c = theta * w_scale[n]`` (int8) or ``c = theta``,
then ``y + bias_share[n]`` on rows of global steps ``< bias_steps``. The product is formed
with ``fma(c, acc, +0.0)`` so that the compiler cannot contract it with the bias add into
one FMA (Triton fuses mul+add by default): two roundings, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from spikekernels.kernels import INTERPRET, cdiv, on_device
from spikekernels.kernels.tile_flags import step_tile_flags

# Tile shapes per weight dtype, (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Chosen for
# Hopper wgmma (BLOCK_M = 64 per warpgroup, K-major weight operand) and a fine skip
# granularity (64 rows); untuned on hardware so far: see bench/results/. A float32 weight
# runs as its bf16 split: three B tiles per stage, hence one stage less.
_GPU_TILES = {
    torch.int8: (64, 128, 128, 4, 4),
    torch.float16: (64, 128, 64, 4, 4),
    torch.bfloat16: (64, 128, 64, 4, 4),
    torch.float32: (64, 128, 64, 4, 3),
}
# Under the numpy interpreter: small tiles so that CPU tests cover several row, column and K
# tiles (and silent and active row tiles side by side) at small shapes.
_INTERPRET_TILES = (16, 16, 32, 4, 1)


def tile_config(weight_dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` for a weight dtype (float32: its
    bf16 split)."""
    return _INTERPRET_TILES if INTERPRET else _GPU_TILES[weight_dtype]


def dot_flags(weight: torch.Tensor) -> dict[str, object]:
    """The ``spike_dot`` constexprs for a kernel weight: ``[N, K]`` int8/float16/bfloat16, or
    the ``[3, N, K]`` bf16 split of a float32 weight."""
    return dict(
        INT8_W=weight.dtype == torch.int8,
        PARTS=weight.shape[0] if weight.dim() == 3 else 1,
        # the interpreter's bfloat16 dot is wrong; bf16 -> fp32 is exact, so nothing changes
        DOT_FP32=INTERPRET and weight.dtype == torch.bfloat16,
    )


# spike_dot's K (the spikes' and the weight's row stride) is padded to a multiple of this
K_ALIGN = 16


def aligned_k(*ts: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``ts`` (sharing their last dim, K; None passes through), zero-padded along K to a
    multiple of ``K_ALIGN`` where K is not one (``dot_operands`` says why)."""
    pad = -next(t for t in ts if t is not None).shape[-1] % K_ALIGN
    if not pad:
        return ts
    return tuple(None if t is None else F.pad(t, (0, pad)) for t in ts)


def dot_operands(s: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The spikes and the weight as ``spike_dot`` reads them; K is their last dim.

    The spikes are ``s`` itself for int8 weights, else converted once to the weight's dtype
    (bfloat16 for a split float32 weight): every output tile would otherwise convert each
    int8 spike tile for the tensor cores, about four instructions an element on sm_90 (half
    the K loop's), N / BLOCK_N times over. A K that is not a multiple of ``K_ALIGN`` is
    zero-padded up to one in both: row strides (and the split's part stride) divisible by 16
    are what lets the compiler vectorise the loads, without which sm_90 spilled 1-7 KB inside
    the step loop (K = 45). The zeros fall in the last K tile, where the loads' masks put
    zeros anyway: the same products, the same bits. (A copy per call, for such K only.)"""
    if weight.dtype != torch.int8:
        s = s.to(weight.dtype)
    return aligned_k(s, weight)


def even_tiles(rows: int, n: int, k: int, block_m: int, block_n: int, block_k: int) -> dict:
    """``EVEN_M``, ``EVEN_N``, ``EVEN_K``: whether ``rows``, ``n``, ``k`` are multiples of their
    tiles, so that a K loop's loads need no mask on that dim (about 10 instructions a thread
    and K tile each on sm_90; every dim of ViT-S at batch 64 is)."""
    return dict(EVEN_M=rows % block_m == 0, EVEN_N=n % block_n == 0, EVEN_K=k % block_k == 0)


@triton.jit
def spike_dot(
    acc,
    s_ptrs,  # [BLOCK_M, BLOCK_K] pointers to the first K tile of the spikes (int8)
    w_ptrs,  # [BLOCK_K, BLOCK_N] pointers to the first K tile of weight part 0 ([N, K])
    row_mask,
    col_mask,
    K,
    k_end,  # K, or 0 for a silent spike tile (the loop runs zero times)
    part_stride,  # elements between weight parts (PARTS > 1)
    INT8_W: tl.constexpr,
    PARTS: tl.constexpr,  # 3: the bf16 split of a float32 weight, summed into one acc
    DOT_FP32: tl.constexpr,  # IEEE float32 dot of upcast operands (bf16 in the interpreter)
    EVEN_M: tl.constexpr,  # even_tiles'
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc + s @ W^T over K: int32 for int8 weights, float32 otherwise (every product exact).

    A loop bound (``k_end``) rather than an ``if`` around the loop, so that the compiler
    still pipelines the loop. An ``EVEN_*`` dim's mask is all true, which the compiler drops.
    """
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, k_end, BLOCK_K):
        k_mask = ((k0 + ks) < K) | EVEN_K
        s = tl.load(s_ptrs, mask=(row_mask | EVEN_M)[:, None] & k_mask[None, :], other=0)
        w_mask = k_mask[:, None] & (col_mask | EVEN_N)[None, :]
        if INT8_W:
            acc = tl.dot(s, tl.load(w_ptrs, mask=w_mask, other=0), acc, out_dtype=tl.int32)
        else:
            for part in tl.static_range(PARTS):
                w = tl.load(w_ptrs + part * part_stride, mask=w_mask, other=0)
                if DOT_FP32:
                    acc = tl.dot(s.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(s.to(w.dtype), w, acc, out_dtype=tl.float32)
        s_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def spike_linear_kernel(
    s_ptr,  # [R, K] ternary spikes, R = T * rows: int8, or the weight's dtype (dot_operands)
    w_ptr,  # [N, K] weight (int8, float16, bfloat16), or [PARTS, N, K] bf16 parts
    theta_ptr,  # [1] threshold (any float dtype), read on the device
    w_scale_ptr,  # [N] float32 per-output-channel scale (INT8_W only)
    bias_ptr,  # [N] float32 bias share per due step (HAS_BIAS only)
    flag_ptr,  # [cdiv(R, BLOCK_M)] int32 from kernels.tile_flags.step_tile_any_kernel
    out_ptr,  # [R, N] float32
    R,
    N,
    K,
    due_rows,  # rows [0, due_rows) belong to global steps < bias_steps
    part_stride,  # N * K: elements between weight parts (PARTS > 1)
    HAS_BIAS: tl.constexpr,
    INT8_W: tl.constexpr,
    PARTS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    EVEN_M: tl.constexpr,  # even_tiles'
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[r, n] = c[n] * sum_k s[r, k] * w[n, k] (+ bias_share[n] if r < due_rows)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < R
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)

    if INT8_W:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # a silent row tile runs the K loop zero times (no weight reads, no MMA)
    k_end = tl.where(tl.load(flag_ptr + pid_m) != 0, K, 0)
    # the weight tile is read as [BLOCK_K, BLOCK_N] straight from [N, K] (K-major B)
    acc = spike_dot(
        acc,
        s_ptr + rows[:, None] * K + ks[None, :],
        w_ptr + cols[None, :] * K + ks[:, None],
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

    theta = tl.load(theta_ptr).to(tl.float32)
    if INT8_W:
        scale = theta * tl.load(w_scale_ptr + cols, mask=col_mask, other=0.0)
        y = tl.fma(scale[None, :], acc.to(tl.float32), 0.0)
    else:
        y = tl.fma(acc, theta, 0.0)
    if HAS_BIAS:
        share = tl.load(bias_ptr + cols, mask=col_mask, other=0.0)
        y = tl.where((rows < due_rows)[:, None], y + share[None, :], y)
    out_ptrs = out_ptr + rows[:, None] * N + cols[None, :]
    tl.store(out_ptrs, y, mask=row_mask[:, None] & col_mask[None, :])


@on_device
def spike_linear_triton(
    launch,
    s: torch.Tensor,
    weight: torch.Tensor,
    threshold: torch.Tensor,
    bias_share: torch.Tensor | None,
    weight_scale: torch.Tensor | None,
    due_rows: int,
) -> torch.Tensor:
    """Host side: ``s`` ``[R, K]`` int8 and ``weight`` contiguous, ``[N, K]`` int8 / float16 /
    bfloat16 or the ``[3, N, K]`` bf16 split of a float32 weight; returns ``[R, N]`` float32.
    ``bias_share`` (float32 ``[N]``) goes on rows ``[0, due_rows)``."""
    R = s.shape[0]
    N = weight.shape[-2]
    out = torch.empty((R, N), dtype=torch.float32, device=s.device)
    if R == 0 or N == 0:
        return out
    split = weight.dim() == 3
    block_m, block_n, block_k, num_warps, num_stages = tile_config(
        torch.float32 if split else weight.dtype
    )
    flags, num_m = step_tile_flags(launch, s[None], block_m, num_warps)  # one "step": all rows
    s, weight = dot_operands(s, weight)
    K = s.shape[-1]
    launch(spike_linear_kernel)[(num_m, cdiv(N, block_n))](
        s,
        weight,
        threshold,
        threshold if weight_scale is None else weight_scale,
        out if bias_share is None else bias_share,
        flags,
        out,
        R,
        N,
        K,
        due_rows,
        N * K,
        HAS_BIAS=bias_share is not None,
        **dot_flags(weight),
        **even_tiles(R, N, K, block_m, block_n, block_k),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out

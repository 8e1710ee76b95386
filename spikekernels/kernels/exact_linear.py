"""Fused exact linear + target-driven neuron (SPEC.md §9.2-§9.4): the T loop inside.

Time-major spikes ``[T, rows, K]`` (int8, ternary) in, int8 spikes ``[T, rows, N]`` out; the
int32 accumulator ``acc = q_in @ W^T`` and the count stay in registers for the whole
chunk, and only the final count is written. The accumulator is not state: it is always the
input count times ``W^T``, so a program starts it from ``S_{-1} @ W^T``, ``S_{-1}`` the input
count before these steps, which it forms from the input neuron's count after them less the
chunk's spikes (read back to front, so every partial value is a count of some step and
fits int8). At ViT-S, batch 64, an int32 accumulator read and written per chunk was 4.2 GB
of traffic; the prologue is one dense int8 step of the layer instead (reading the spikes of
only the steps whose tile flag is set). Two launches:

1. ``kernels.tile_flags.step_tile_any_kernel``: whether each (step, tile of ``BLOCK_M``
   rows) holds a spike (reading K tiles only up to the first spike).
2. ``exact_linear_kernel``: one program per (row tile, output tile). For each step:
   ``acc += s_t @ W^T`` with ``tl.dot`` int8 x int8 -> int32 (exact; int8 tensor cores),
   where a silent spike tile runs the K loop zero times (no weight traffic, no MMA). A
   weight of a few K tiles (ViT-S's K = 384) is instead resident: read once into shared
   memory, so a busy step reads only its spike tiles, and the step loop is software-pipelined
   two deep (the next step's flag is read while this step computes; its spike tiles are
   copied straight to shared memory, masked off, so not read, on a silent step). Then the
   value ``y = fl32(fl32(m[n] * fl32(acc)) + b[n])`` with ``m = fl32(theta_in * ws[n])``
   and the §9.3 neuron on ``y`` (``kernels.target.target_tile``).
   The product is formed as ``fma(m, acc, +0.0)`` so that the compiler cannot contract it
   with the bias add into one FMA (Triton fuses mul+add by default): two roundings, as
   SPEC.md §9.2 and the reference.
   The epilogue runs on silent steps too (the neuron may still be moving toward its target),
   unless the tile is *quiet*: no spike in its rows this step (so ``acc`` held) and none fired
   from it at the last step. Then every target equals its count (``sigma = sign(target -
   count)`` was 0 for the same target; a NaN target gives 0 always) and ``sigma`` is 0 again,
   bit for bit, without the value and the division. Late chunks, where most of a run's steps
   are, are mostly quiet tiles.

With ``row_settled`` (the layer's own rows that did not fire at the step before these, so
whose neurons sit at their targets) a settled tile is quiet from the first step, not only
after it; and a tile that stays settled and silent for the whole call (the flag pass marks
its unsettled tiles in a row ahead of the steps' flags: a reduction over the tile's rows here
spilled registers) runs no prologue at all: it reads no weight tile and no count tile, writes
zero spikes and passes its count through. The flags are written back for the next call: the
flag pass sets each tile's to 1 once it has read them, and a tile that fires at the last step
clears its rows here (a superset of the rows that fired, as ``row_active``). So the layer's
state needs no pass of its own between calls.

With ``group_active`` a tile that fired also sets the flag of each (sample, column group) it
overlaps: a few scalar stores, where the flags per row that ``active`` takes would hold a
vector of them across the step loop (they spilled registers). A qkv layer's groups are its
heads' q, k and v, which ``exact_attention`` reads back to skip what did not change.

With ``row_active`` a tile that fired sets the flags of its rows (a superset of the rows that
fired, at the tile's granularity: the next ``exact_linear`` skips whole row tiles anyway). That
layer takes them as ``s_row_active``, and its flag pass then reads 4 bytes a row-step instead
of the row's spikes (a silent row's whole K).

With ``count_before`` each program copies the count tile it reads (a quiet tile's too) before
its steps: the next layer's ``s_before``, which a clone took a launch and a read of its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spikekernels.kernels import INTERPRET, cdiv, on_device
from spikekernels.kernels.activity import (
    active_layout,
    record_active_rows,
    record_tile_groups,
    tile_groups,
)
from spikekernels.kernels.spike_linear import aligned_k, even_tiles
from spikekernels.kernels.target import (
    inverse_threshold,
    load_threshold,
    target_estimate_tile,
    target_exact_tile,
)
from spikekernels.kernels.tile_flags import any_nonzero, step_tile_flags

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, RESIDENT_K_TILES) on a GPU: BLOCK_M = 64
# rows per warpgroup for Hopper's int8 wgmma and a fine skip granularity; BLOCK_N = 64 because
# acc and count ([BLOCK_M, BLOCK_N] tiles) live in registers across the T loop, and 128
# columns spill (tests/triton_sm90.py checks). RESIDENT_K_TILES: a weight of at most this many
# K tiles is read once and held in shared memory for the chunk (weight_residency): ViT-S's
# qkv, proj and fc1 (K = 384, 24 KB a program; 78 KB of shared memory with the pipelined
# spike tiles, so still two programs an SM), where a streamed weight tile was re-read from L2
# at every busy step (as many bytes as the step's spikes); fc2 (K = 1536) streams. A fourth
# resident tile (K up to 512) spills 24-96 B, so K <= 384 at these tiles. Untuned on hardware
# so far: see bench/results/.
_GPU_TILES = (64, 64, 128, 4, 3, 3)
# The default and the alternatives that also compile for sm_90 without a spill (streamed
# weights, as before residency; 32 columns: 167 registers, so three programs an SM; 128 x 64
# at 8 warps; shorter and longer K tiles; fewer stages), each resident up to K = 384 at most,
# for bench/bench_tiles.py to time on a GPU. tests/triton_sm90.py compiles each at that K.
# (256-deep K tiles resident spill; streamed, they spill 16 B in the qkv layer's variant,
# which records group_active: the others compile it without.)
TILE_CANDIDATES = [
    _GPU_TILES, (64, 64, 128, 4, 3, 0), (64, 32, 128, 4, 3, 3), (128, 64, 128, 8, 3, 3),
    (64, 64, 64, 4, 4, 6), (64, 64, 128, 4, 2, 0), (64, 64, 256, 4, 2, 0),
]  # fmt: skip
# Under the numpy interpreter: small tiles so that CPU tests cover several row, column and K
# tiles (and silent and active tiles side by side) at small shapes; K up to 96 resident.
_INTERPRET_TILES = (16, 16, 32, 4, 1, 3)


def tile_config() -> tuple[int, int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, RESIDENT_K_TILES)``."""
    return _INTERPRET_TILES if INTERPRET else _GPU_TILES


def weight_residency(K: int, block_k: int, resident_k_tiles: int) -> dict[str, int]:
    """The kernel's ``K_TILES`` and ``STEP_STAGES``: a weight of at most ``resident_k_tiles``
    K tiles stays resident, its step loop pipelined two deep (three stages spill 4-8 B on
    sm_90 where activity is recorded); a longer one (or none, K = 0) streams through the K
    loop (``K_TILES=0``; that loop is pipelined, the step loop not)."""
    k_tiles = cdiv(K, block_k)
    if k_tiles == 0 or k_tiles > resident_k_tiles:
        return dict(K_TILES=0, STEP_STAGES=1)
    return dict(K_TILES=k_tiles, STEP_STAGES=2)


@triton.jit
def _count_before(
    c_ptrs, s_start, flag_ptrs, num_m, k0, ks, row_mask, K, T, s_step, S_BEFORE: tl.constexpr
):
    """The input count before the chunk at K tile ``k0``: given (``S_BEFORE``), or the count
    after it less the chunk's spikes, read back to front (so every partial value is a count
    of some step and fits int8). A step whose tile flag is 0 is masked off, not read: in a
    quiet late chunk the prologue reads one count tile, not the chunk's spikes, in each of the
    layer's column programs."""
    tile_mask = row_mask[:, None] & ((k0 + ks) < K)[None, :]
    before = tl.load(c_ptrs + k0, mask=tile_mask, other=0)
    if not S_BEFORE:
        s_ptrs = s_start + k0 + tl.cast(T - 1, tl.int64) * s_step
        flag_ptrs += tl.cast(T - 1, tl.int64) * num_m
        for _ in range(T):
            moved = tl.load(flag_ptrs)
            before -= tl.load(s_ptrs, mask=tile_mask & (moved != 0), other=0)
            s_ptrs -= s_step
            flag_ptrs -= num_m
    return before


@triton.jit
def _quiet_chunk(
    count_in_ptr, out_ptr, count_out_ptr, before_ptr, pid_m, pid_n, rows, N, T, out_step,
    HAS_COUNT: tl.constexpr, COUNTS_OUT: tl.constexpr, COUNT_IN_PLACE: tl.constexpr,
    HAS_BEFORE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """A quiet tile's chunk: no neuron moves, so every step's spikes are 0 (``COUNTS_OUT``:
    every step's count is the incoming one) and the count goes out as it came in (in place:
    neither read nor written). (Its offsets formed here, not before the branch: held across
    the busy path, they spilled.)"""
    rs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rs < rows)[:, None] & (cols < N)[None, :]
    state_offs = rs[:, None] * N + cols[None, :]
    zero = tl.zeros([BLOCK_M, BLOCK_N], tl.int8)
    count = zero
    if HAS_COUNT and (COUNTS_OUT or not COUNT_IN_PLACE or HAS_BEFORE):
        count = tl.load(count_in_ptr + state_offs, mask=mask, other=0)
    if HAS_BEFORE:
        tl.store(before_ptr + state_offs, count, mask=mask)
    value = count if COUNTS_OUT else zero
    out_ptrs = out_ptr + state_offs
    for _ in range(T):
        tl.store(out_ptrs, value, mask=mask)
        out_ptrs += out_step
    if not COUNT_IN_PLACE:
        tl.store(count_out_ptr + state_offs, count, mask=mask)


@triton.jit
def exact_linear_kernel(
    s_ptr,  # [T, rows, K] int8 ternary spikes
    w_ptr,  # [N, K] int8 integer weight W_int
    ws_ptr,  # [N] float32 per-output-channel weight scale
    bias_ptr,  # [N] float32 bias (HAS_BIAS only)
    theta_in_ptr,  # [1] threshold of the neuron feeding the spikes (any float dtype)
    theta_ptr,  # [1] or [N] threshold of the output neuron (any float dtype)
    flag_ptr,  # [T, num_m] int32 from step_tile_any_kernel
    s_count_ptr,  # [rows, K] int8 input neuron's count after these steps, or before them
    # (S_BEFORE) (HAS_S_COUNT only)
    count_in_ptr,  # [rows, N] int8 incoming count (HAS_COUNT; else any int8 tensor, never read)
    out_ptr,  # [T, rows, N] int8 spikes (COUNTS_OUT: the count after each step)
    count_out_ptr,  # [rows, N] int8
    before_ptr,  # [rows, N] int8: a copy of the incoming count, zeros when fresh (HAS_BEFORE)
    active_ptr,  # [T, B] int32 per-sample flags, set where a sample fires (HAS_ACTIVE only)
    group_active_ptr,  # [T, B, groups] int32 flags per sample and column group (HAS_GROUPS)
    row_active_ptr,  # [T, rows] int32 flags per row, set where its tile fires (HAS_ROW_ACTIVE)
    unsettled_ptr,  # [num_m] int32: 1 where a row tile holds a row not settled (HAS_SETTLED)
    settled_ptr,  # [rows] int32 row_settled, all 1 after the flag pass: cleared here on the
    # rows of a tile that fires at the last step (HAS_SETTLED)
    T,
    rows,
    N,
    K,
    num_m,
    s_step,  # rows * K, out_step: rows * N: elements between two steps of s and of out (host
    out_step,  # ints: i64 arguments from 2^31 on, where an in-kernel rows * K would wrap)
    n_min,
    p_max,
    B,  # samples (HAS_ACTIVE or HAS_GROUPS only)
    rows_per_sample,  # (HAS_ACTIVE or HAS_GROUPS only)
    groups,  # column groups of group_active (HAS_GROUPS only)
    group_size,  # N // groups (HAS_GROUPS only)
    HAS_BIAS: tl.constexpr,
    HAS_S_COUNT: tl.constexpr,
    S_BEFORE: tl.constexpr,
    HAS_COUNT: tl.constexpr,
    COUNT_IN_PLACE: tl.constexpr,  # count_out is count_in (inplace)
    PER_CHANNEL: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    HAS_ROW_ACTIVE: tl.constexpr,
    HAS_SETTLED: tl.constexpr,
    COUNTS_OUT: tl.constexpr,
    HAS_BEFORE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_M: tl.constexpr,  # spike_linear.even_tiles
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    K_TILES: tl.constexpr,  # > 0: the weight's K tiles (all of them) resident; 0: streamed
    STEP_STAGES: tl.constexpr,  # the step loop's software pipeline depth (1: none)
):
    """acc = (s_count - sum_t s_t) @ W^T, then per step acc += s_t @ W^T;
    y = fl32(fl32(m[n] * fl32(acc)) + b[n]); target-driven neuron on y;
    active[t, row // rows_per_sample] = 1 where a row fires; group_active[t, b, g] = 1 for
    every sample b and column group g that a tile which fired overlaps; row_active[t, r] = 1
    for every row r of a tile which fired; settled[r] = 0 for every row r of a tile which
    fired at the last step."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rs < rows
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    ks = tl.arange(0, BLOCK_K)
    if HAS_SETTLED:
        # A tile whose rows are settled and whose spikes are silent at every step is quiet
        # throughout the chunk (module docstring): its outputs are known without the prologue
        busy = tl.load(unsettled_ptr + pid_m) != 0
        for t in range(T):
            busy |= tl.load(flag_ptr + pid_m + t * num_m) != 0
        if not busy:
            _quiet_chunk(count_in_ptr, out_ptr, count_out_ptr, before_ptr, pid_m, pid_n, rows,
                         N, T, out_step, HAS_COUNT, COUNTS_OUT, COUNT_IN_PLACE, HAS_BEFORE,
                         BLOCK_M, BLOCK_N)  # fmt: skip
            return
    state_offs = rs[:, None] * N + cols[None, :]

    theta_in = tl.load(theta_in_ptr).to(tl.float32)
    m = theta_in * tl.load(ws_ptr + cols, mask=col_mask, other=0.0)
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0)
    inv_theta = inverse_threshold(load_threshold(theta_ptr, cols, col_mask, PER_CHANNEL))
    # the weight tile is read as [BLOCK_K, BLOCK_N] straight from [N, K] (K-major B)
    w_start = w_ptr + cols[None, :] * K + ks[:, None]
    s_start = s_ptr + rs[:, None] * K + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    # Resident weights: the program's weight tiles read once, held in shared memory for the
    # whole chunk (a busy step then reads only its spike tiles from L2, half the bytes)
    w_tiles = ()
    for i in tl.static_range(K_TILES):
        k_mask = ((i * BLOCK_K + ks) < K) | EVEN_K
        w_mask = k_mask[:, None] & (col_mask | EVEN_N)[None, :]
        w_tiles = w_tiles + (tl.load(w_start + i * BLOCK_K, mask=w_mask, other=0),)
    # With resident weights acc enters the step loop straight from a dot: from the zero
    # constant or an `if`, Triton's layout pass carries acc and the whole neuron epilogue in
    # two layouts (sm_90: 644-1808 B of spills). So every K tile's dot runs (a few MMAs once a
    # chunk), and a fresh acc is a product of zeros (exact: 0 @ W = 0).
    if HAS_S_COUNT:
        # S_{-1} = s_count - s_{T-1} - ... - s_0 (S_BEFORE: given), a K tile at a time; a
        # streamed tile of zero counts skips its weight read and dot (the first chunk's are
        # all zero)
        c_ptrs = s_count_ptr + rs[:, None] * K + ks[None, :]
        if K_TILES > 0:
            for i in tl.static_range(K_TILES):
                before = _count_before(c_ptrs, s_start, flag_ptr + pid_m, num_m, i * BLOCK_K, ks,
                                       row_mask, K, T, s_step, S_BEFORE)  # fmt: skip
                acc = tl.dot(before, w_tiles[i], acc, out_dtype=tl.int32)
        else:
            for k0 in range(0, K, BLOCK_K):
                before = _count_before(c_ptrs, s_start, flag_ptr + pid_m, num_m, k0, ks, row_mask,
                                       K, T, s_step, S_BEFORE)  # fmt: skip
                if any_nonzero(before):
                    k_mask = (k0 + ks) < K
                    w = tl.load(w_start + k0, mask=k_mask[:, None] & col_mask[None, :], other=0)
                    acc = tl.dot(before, w, acc, out_dtype=tl.int32)
    elif K_TILES > 0:
        acc = tl.dot(tl.zeros([BLOCK_M, BLOCK_K], tl.int8), w_tiles[0], acc, out_dtype=tl.int32)
    # the count as int16: an int8 tile's add unpacks and repacks bytes (sm_90: 155 instructions
    # a thread-step at 32 lanes, 95 as int16); int32 spilled
    if HAS_COUNT:
        count = tl.load(count_in_ptr + state_offs, mask=mask, other=0).to(tl.int16)
    else:
        # zero, from a load that never reads (T >= 1) rather than a constant tile: from the
        # constant, sm_90's first chunk at ViT-S, batch 64 (qkv; proj and fc1) spilled 24 and
        # 8 B at 255 registers, now none (qkv at rows not a multiple of BLOCK_M: 0 -> 12 B)
        count = tl.load(count_in_ptr + state_offs, mask=mask & (T < 0), other=0).to(tl.int16)
    if HAS_BEFORE:
        # the count before these steps, for the next layer's s_before: copied as it is read
        # (the caller's clone of it was a launch and a read of its own)
        tl.store(before_ptr + state_offs, count.to(tl.int8), mask=mask)

    out_ptrs = out_ptr + state_offs
    flag_ptrs = flag_ptr + pid_m
    if HAS_ACTIVE:
        active_ptrs = active_ptr + rs // rows_per_sample
    if HAS_GROUPS:
        first_group, samples, spread = tile_groups(
            pid_m, pid_n, rows, N, rows_per_sample, groups, group_size, BLOCK_M, BLOCK_N
        )
    # whether the tile fired at the last step (at first: where a row is not settled; unknown
    # without row_settled, so yes)
    if HAS_SETTLED:
        fired = tl.load(unsettled_ptr + pid_m)
    else:
        fired = tl.full((), 1, tl.int32)
    for _ in tl.range(T, num_stages=STEP_STAGES):
        moved = tl.load(flag_ptrs)  # whether acc changes at this step
        if K_TILES > 0:
            # The spike tiles load unconditionally, masked off on a silent step (no traffic),
            # so that the step loop pipelines (an `if` around the loads would stop it). Their
            # copies then start once the next step's flag is in: after this step's neuron at
            # two stages; three would overlap them with it, but spill.
            s_tiles = ()
            for i in tl.static_range(K_TILES):
                k_mask = ((i * BLOCK_K + ks) < K) | EVEN_K
                s_mask = ((row_mask | EVEN_M) & (moved != 0))[:, None] & k_mask[None, :]
                s_tiles = s_tiles + (tl.load(s_start + i * BLOCK_K, mask=s_mask, other=0),)
            if moved != 0:
                for i in tl.static_range(K_TILES):
                    acc = tl.dot(s_tiles[i], w_tiles[i], acc, out_dtype=tl.int32)
        else:
            # A silent spike tile runs the K loop zero times: a loop bound rather than an
            # `if` around the loop, so that the compiler still pipelines the loop.
            k_end = tl.where(moved != 0, K, 0)
            s_ptrs = s_start
            w_ptrs = w_start
            for k0 in range(0, k_end, BLOCK_K):
                k_mask = ((k0 + ks) < K) | EVEN_K
                s = tl.load(s_ptrs, mask=(row_mask | EVEN_M)[:, None] & k_mask[None, :], other=0)
                w = tl.load(w_ptrs, mask=k_mask[:, None] & (col_mask | EVEN_N)[None, :], other=0)
                acc = tl.dot(s, w, acc, out_dtype=tl.int32)
                s_ptrs += BLOCK_K
                w_ptrs += BLOCK_K
        if (moved | fired) != 0:
            y = tl.fma(m[None, :], acc.to(tl.float32), 0.0)
            if HAS_BIAS:
                y = y + b[None, :]
            sigma, fired = target_estimate_tile(y, inv_theta, count, n_min, p_max, mask)
            if fired > 1:  # a lane next to a rounding step: the division, for the tile
                # y again rather than kept live through the reduction (registers: no spill
                # at 255); `fired >> 8` is 0 but keeps the compiler from reusing the first y
                y = tl.fma(m[None, :], (acc + (fired >> 8)).to(tl.float32), 0.0)
                if HAS_BIAS:
                    y = y + b[None, :]
                theta = load_threshold(theta_ptr, cols, col_mask, PER_CHANNEL)
                sigma, fired = target_exact_tile(y, theta, count, n_min, p_max, mask)
            count = count + sigma.to(tl.int16)
            if not COUNTS_OUT:
                tl.store(out_ptrs, sigma.to(tl.int8), mask=mask)
            if HAS_ACTIVE:
                # only a tile that fired has a row to flag: a step that fired nothing skips
                # the rows' reductions (about 110 instructions a thread-step on sm_90)
                if fired != 0:
                    record_active_rows(active_ptrs, sigma, row_mask, col_mask, BLOCK_M, BLOCK_N)
        else:
            # quiet (module docstring): sigma is 0, bit for bit, and the count holds; zero
            # spikes are stored as a constant (no conversion of a sigma tile, no count add)
            fired = tl.full((), 0, tl.int32)
            if not COUNTS_OUT:
                tl.store(out_ptrs, tl.zeros([BLOCK_M, BLOCK_N], tl.int8), mask=mask)
        if COUNTS_OUT:
            tl.store(out_ptrs, count.to(tl.int8), mask=mask)
        if HAS_ACTIVE:
            active_ptrs += B
        if HAS_GROUPS:
            if fired != 0:
                record_tile_groups(group_active_ptr, first_group, samples, spread, groups)
            group_active_ptr += B * groups
        if HAS_ROW_ACTIVE:
            # the tile's rows, formed in the branch from the scalar base: no vector of
            # pointers held across the step loop
            if fired != 0:
                tl.store(row_active_ptr + rs, 1, mask=row_mask)
            row_active_ptr += rows
        s_start += s_step
        out_ptrs += out_step
        flag_ptrs += num_m
    tl.store(count_out_ptr + state_offs, count.to(tl.int8), mask=mask)
    if HAS_SETTLED:
        # the next call's settled rows: the flag pass set them all, each column tile that
        # fired at the last step clears its rows (only clears: any order gives the same)
        if fired != 0:
            tl.store(settled_ptr + rs, 0, mask=row_mask)


@on_device
def exact_linear_triton(
    launch,
    s: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_threshold: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    s_count: torch.Tensor | None,
    count: torch.Tensor | None,
    active: torch.Tensor | None = None,
    *,
    inplace: bool = False,
    counts_out: bool = False,
    s_before: bool = False,
    group_active: torch.Tensor | None = None,
    row_active: torch.Tensor | None = None,
    s_row_active: torch.Tensor | None = None,
    row_settled: torch.Tensor | None = None,
    count_before: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host side: ``s`` ``[T, rows, K]`` int8, ``weight`` ``[N, K]`` int8, ``weight_scale``
    and ``bias`` float32 ``[N]``, all contiguous; ``s_count`` ``[rows, K]`` int8 contiguous or
    None; ``count`` ``[rows, N]`` or None; ``active`` ``[T, B]`` and ``group_active`` ``[T, B,
    groups]`` (``groups`` dividing N) and ``row_active`` ``[T, rows]`` int32 contiguous or
    None; ``s_row_active`` ``[T, rows]`` int32 contiguous or None: 0 where a row of ``s`` is
    silent at a step, which the flag pass then takes instead of reading the spikes;
    ``row_settled`` ``[rows]`` int32 contiguous or None: 1 where the row's output neurons sit
    at their targets before the steps, so that its tile may skip the first step's neuron;
    written in place: 1 where no neuron of the row's tile fired at the last step.
    ``count_before`` ``[rows, N]`` int8 contiguous or None: receives the incoming count (zeros
    when fresh), written by the program that reads it.
    Returns ``(spikes [T, rows, N] int8, count [rows, N] int8)``: fresh, or with ``inplace``
    the given ``count`` (a view of the caller's contiguous state), written by the program
    that read it. ``counts_out``: the count after each step comes out instead of the
    spikes. ``s_before``: ``s_count`` is the input count before the steps, not after."""
    T, rows, K = s.shape
    N = weight.shape[0]
    out = torch.empty((T, rows, N), dtype=torch.int8, device=s.device)
    if inplace:
        count_out = count
    else:
        count_out = torch.empty((rows, N), dtype=torch.int8, device=s.device)
    if rows == 0 or N == 0:
        return out, count_out
    block_m, block_n, block_k, num_warps, num_stages, resident_k_tiles = tile_config()
    # zeros past K: exact zero products, aligned strides (spike_linear.dot_operands)
    s, weight, s_count = aligned_k(s, weight, s_count)
    K = s.shape[-1]
    rows_or_spikes = s if s_row_active is None else s_row_active.view(T, rows, 1)
    flags, num_m = step_tile_flags(launch, rows_or_spikes, block_m, num_warps, row_settled)
    unsettled = flags
    if row_settled is not None:
        unsettled, flags = flags[0], flags[1:]
    groups = 1 if group_active is None else group_active.shape[2]
    launch(exact_linear_kernel)[(num_m, cdiv(N, block_n))](
        s,
        weight,
        weight_scale,
        weight_scale if bias is None else bias,
        in_threshold,
        threshold.contiguous(),
        flags,
        s if s_count is None else s_count,
        count_out if count is None else count,
        out,
        count_out,
        out if count_before is None else count_before,
        flags if active is None else active,
        flags if group_active is None else group_active,
        flags if row_active is None else row_active,
        unsettled,
        flags if row_settled is None else row_settled,
        T,
        rows,
        N,
        K,
        num_m,
        rows * K,
        rows * N,
        n_min,
        p_max,
        *active_layout(active if group_active is None else group_active, rows),
        groups,
        N // groups,
        HAS_BIAS=bias is not None,
        HAS_S_COUNT=s_count is not None,
        S_BEFORE=s_before,
        HAS_COUNT=count is not None,
        COUNT_IN_PLACE=inplace,
        PER_CHANNEL=threshold.numel() > 1,
        HAS_ACTIVE=active is not None,
        HAS_GROUPS=group_active is not None,
        HAS_ROW_ACTIVE=row_active is not None,
        HAS_SETTLED=row_settled is not None,
        COUNTS_OUT=counts_out,
        HAS_BEFORE=count_before is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        **even_tiles(rows, N, K, block_m, block_n, block_k),
        **weight_residency(K, block_k, resident_k_tiles),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out, count_out

"""Fused exact-mode residual read + LayerNorm + target-driven neuron (SPEC.md §9.2-§9.4): the
T loop inside one launch.

Each program owns ``ROWS`` rows of ``C`` channels, padded with zero lanes to ``BLOCK_C``, the
next power of two. The constant part ``c`` of the residual stream (float64) and the neuron's
count (int8, as int32) stay in registers for all T steps; each step reads the spike-driven
part ``D_t`` (float64) once, prefetched one step ahead, and writes int8 spikes once. No float
value leaves the kernel.

Per step, the operations of ``exact_math.residual_read`` and ``exact_math.layer_norm_rows``
in their order, one rounding each, so the bits equal the QANN's row function:

- with a pending branch, ``D_t = d_t + fl64(theta_b) * count_b`` by ``exact_residual_add``'s
  own jit piece (``kernels.exact_residual.residual_value``: the same bits, no FMA), the
  branch's int8 spikes read and its count kept in registers; with a second pending branch
  its term is added to that the same way (``D_t + fl64(theta_b2) * count_b2``); ``D_t``
  stored when asked (``RESIDUAL_OUT``); else ``D_t = d_t``;
- ``x = fl32(c + D_t)`` (float64 add, one rounding to float32);
- ``mean = tree_sum(x) / C``: ``tree_sum_rows`` halves the row ``log2(BLOCK_C)`` times, each
  level adding neighbours (``exact_math.tree_sum``'s order; the zero lanes are its zero
  padding);
- ``xc = x - mean`` (zero on the padding lanes), ``var = tree_sum(xc * xc) / C``;
- ``y = xc / sqrt(var + eps)``, ``y = y * w``, ``y = y + b``;
- the §9.3 neuron on ``y``, by the division-free estimate of ``kernels.target`` on an
  estimate of ``y`` itself (``layer_norm_estimate``: no division a lane), and on ``y`` and
  with the division only for a tile where a lane fell within the margin;
- unless the tile is *quiet*: ``x`` bit for bit as at the last step and no lane fired then.
  Its values are then the last step's, so every target equals its count (``sigma = sign(
  target - count)`` was 0 for the same target) and ``sigma`` is 0 again, bit for bit: the
  tile skips the row function and the neuron (a compare a lane and one or-reduction). The
  first step of a launch is never quiet. Late chunks, where most of a run's steps are, are
  mostly quiet rows, and so are the late steps of a long first chunk: a fresh count is zeros,
  read as any other (one variant, no count-less one).

The float64 stream is most of the kernel's traffic (a ViT block moves 27 bytes of it per
element and step). So it travels with row flags: with ``d``'s (``HAS_D_MOVED``) a row whose
flag is 0 at a step *is* the step before's, and is not read: that ``d`` is kept in registers,
the load masked off (so still issued a step ahead, its flag read a step before that). A
kernel that writes ``D`` writes its flags too (``MOVED_OUT``): a row may have moved where
``d``'s flag says so (every row without flags) or a branch spike falls in it (the branch's
row flag is set, where it comes with them: ``HAS_BRANCH_ROWS``), and every row at the first
step (a reader keeps nothing across launches); the rows whose flag is 0 are not
written. A quiet row then costs the stream little more than its flags. Where every input's
rows come with flags or are read whole (``d`` with ``HAS_D_MOVED``, or no ``d``: the
branches' rows from their flags or their spikes), a tile none of whose rows moved and that
did not fire at the last step is quiet by its flags alone: ``D_t`` and ``x`` are not formed,
nor a branch's count advanced (its spikes in such a tile are all 0). On sm_90 a settled
ViT-S norm1's step takes 141 instructions a thread and no barrier, against 401 and 5 when
the quiet test compared ``x``'s bits (norm2's 89 against 218 and 3).

Divisions are ``div_rn`` and the root ``sqrt_rn`` (Triton's ``/`` and ``sqrt`` on float32 are
approximate on NVIDIA GPUs). Products that feed an add are formed as ``fma(a, b, +0.0)``:
Triton lets the compiler contract a multiply with the add after it into one FMA, which would
round once where PyTorch rounds twice (``xc * xc`` into the first level of the tree sum,
``y * w`` into ``+ b``). ``fma(a, b, +0.0)`` differs from ``a * b`` only in the sign of a
zero product, which no later operation here can see.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spikekernels.kernels import cdiv, on_device
from spikekernels.kernels.activity import active_layout, record_active_rows
from spikekernels.kernels.exact_residual import residual_value
from spikekernels.kernels.exact_rows import tree_sum_rows
from spikekernels.kernels.target import (
    inverse_threshold,
    load_threshold,
    target_estimate_tile_margin,
    target_exact_tile,
)
from spikekernels.kernels.tile_flags import any_nonzero

# A program holds ROWS x BLOCK_C = 1024 lanes: 8 per thread at 4 warps. c and the prefetched
# D (float64), the count and a step's temporaries then take 96-120 registers on sm_90, 128-158
# with a pending branch (its count, prefetched spikes and theta besides), 151-162 with two (2048
# lanes: 168-212, so fewer programs per SM to overlap the tree sums' shuffles and barriers with
# loads; 4096 spills): tests/triton_sm90.py. Untuned on hardware so far: see bench/results/.
ELEMENTS_PER_PROGRAM = 1024
NUM_WARPS = 4
# The default and the alternatives (96 and 255 registers with one pending branch, no spill),
# for bench/bench_tiles.py to time; tests/triton_sm90.py compiles each. (At 2048 lanes a
# later block's norm1, two pending branches with D written, spills: 48 B, and 360 B with the
# stream's row flags; 1024 lanes take it at 229 registers with them, 512 at 123.)
TILE_CANDIDATES = [ELEMENTS_PER_PROGRAM, 512, 2048]


def launch_config(c: int) -> tuple[int, int, int]:
    """``(BLOCK_C, ROWS, num_warps)`` for rows of ``c`` channels (``c <= 1024``)."""
    block_c = triton.next_power_of_2(c)
    return block_c, max(1, ELEMENTS_PER_PROGRAM // block_c), NUM_WARPS


@triton.jit
def load_affine(
    w_ptr,
    b_ptr,
    cols,
    col_mask,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The LayerNorm's weight and bias as ``[1, BLOCK_C]`` float32 (zeros where absent: a
    placeholder that ``layer_norm_rows_fp32`` does not read)."""
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0)[None, :]
    else:
        w = tl.zeros([1, BLOCK_C], tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0)[None, :]
    else:
        b = tl.zeros([1, BLOCK_C], tl.float32)
    return w, b


@triton.jit
def layer_norm_rows_fp32(
    x,  # [ROWS, BLOCK_C] float32 rows, zero past C
    w,  # [1, BLOCK_C] float32 weight (HAS_WEIGHT only)
    b,  # [1, BLOCK_C] float32 bias (HAS_BIAS only)
    eps,  # float32
    col_mask,  # [BLOCK_C] lanes < C
    c_f,  # C as a float32
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    LOG2_C: tl.constexpr,
):
    """``exact_math.layer_norm_rows`` of each row, operation by operation:
    ``mean = tree_sum(x) / C``; ``xc = x - mean``; ``var = tree_sum(xc * xc) / C``;
    ``y = xc / sqrt(var + eps)``; ``y = y * w``; ``y = y + b``. Returns ``[ROWS, BLOCK_C]``
    (the padding lanes hold 0, or ``b`` there: masked by the caller's stores)."""
    xc, sd = layer_norm_moments(x, eps, col_mask, c_f, ROWS, BLOCK_C, LOG2_C)
    return layer_norm_scale(xc, sd, w, b, HAS_WEIGHT, HAS_BIAS)


@triton.jit
def layer_norm_moments(
    x, eps, col_mask, c_f, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, LOG2_C: tl.constexpr
):
    """``layer_norm_rows_fp32`` up to its division: ``(xc [ROWS, BLOCK_C], sd [ROWS])``,
    ``sd = sqrt(var + eps)``."""
    mean = tl.div_rn(tree_sum_rows(x, ROWS, BLOCK_C, LOG2_C), c_f)
    # zero padding lanes again: tree_sum pads xc * xc with zeros, not with mean^2
    xc = tl.where(col_mask[None, :], x - mean[:, None], 0.0)
    var = tl.div_rn(tree_sum_rows(tl.fma(xc, xc, 0.0), ROWS, BLOCK_C, LOG2_C), c_f)
    return xc, tl.sqrt_rn(var + eps)


@triton.jit
def layer_norm_scale(xc, sd, w, b, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``layer_norm_rows_fp32`` from its division on: ``y = xc / sd``, ``y * w``, ``+ b``."""
    y = tl.div_rn(xc, sd[:, None])
    if HAS_WEIGHT:
        y = tl.fma(y, w, 0.0)
    if HAS_BIAS:
        y = y + b
    return y


# The neuron's division-free path (kernels.target.target_estimate) on an estimate of the row
# function's value: y' = fl(xc * fl(1/sd)) in place of fl(xc / sd), then w and b as the row
# function has them, z' = fl(fl(y' w) + b). Per lane that is one multiply for the division's
# ten-odd instructions (sd is one per row). Why the wider margin keeps it exact: y' is within
# 3 * 2^-24 |y| of y (three roundings against one), so z' is within 5 * 2^-24 |y w| + 2^-23 |z|
# of z, and |y w| <= |z| + |b| to first order. In steps of theta, on top of q's own 2^-23 |q|:
# about 9 * 2^-24 |q| + 5 * 2^-24 |b| / theta. Added to the rounding steps' spread (kernels.
# target), the target is exact when q is farther than about 2^-20 |q| + 2^-21.7 |b / theta| +
# 2^-21.9 from every half-integer; the margin is 2^-18 |q| + 2^-19 |b / theta| + 2^-18, at
# least 4 times that. Values below 2^-126 lose relative accuracy: their absolute errors, a few
# 2^-149 (|w| + 1) / theta, stay under 2^-47 in the margin's slack where (|w| + 1) / theta <=
# 2^100. The bias term is the largest of the program's columns: one edge a program, in one
# register (a per-column edge was recomputed every step on sm_90).
_LN_SLOPE = tl.constexpr(-(2.0**-18))
_LN_EDGE = tl.constexpr(0.5 - 2.0**-18)
_B_SLOPE = tl.constexpr(2.0**-19)
_W_MAX = tl.constexpr(2.0**100)


@triton.jit
def layer_norm_estimate_edge(
    w, b, inv_theta, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr
):
    """The ``edge`` of ``target_estimate``'s margin for ``layer_norm_estimate``'s values, one
    for the columns of ``w``, ``b`` ``[1, BLOCK_C]`` and ``inv_theta``
    (``inverse_threshold``'s, scalar or ``[1, BLOCK_C]``), formed once; its slope is
    ``_LN_SLOPE``. A column with a weight past the bound above, or a non-finite weight, bias or
    threshold, makes the edge -1/2: every lane unsure, so the exact path."""
    inv = tl.abs(inv_theta) + tl.zeros([1, BLOCK_C], tl.float32)
    if HAS_BIAS:
        term = tl.fma(tl.fma(tl.abs(b), _B_SLOPE, 0.0), inv, 0.0)
    else:
        term = tl.zeros([1, BLOCK_C], tl.float32)
    if HAS_WEIGHT:
        scale = tl.fma(tl.abs(w) + 1.0, inv, 0.0)
    else:
        scale = tl.fma(inv, 2.0, 0.0)
    ok = (term <= 1.0) & (scale <= _W_MAX)  # false for NaN
    return _LN_EDGE - tl.max(tl.where(ok, term, 1.0))


@triton.jit
def layer_norm_estimate(xc, sd, w, b, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``layer_norm_scale`` with ``xc * fl(1 / sd)`` for its division: the value the neuron's
    estimate takes (the margin above)."""
    y = tl.fma(xc, tl.div_rn(tl.full(sd.shape, 1.0, tl.float32), sd)[:, None], 0.0)
    if HAS_WEIGHT:
        y = tl.fma(y, w, 0.0)
    if HAS_BIAS:
        y = y + b
    return y


@triton.jit
def _branch_start(
    spikes_ptr, theta_ptr, count_ptr, offs, mask, load_mask, HAS_COUNT: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """A pending branch at the first step: its neuron's step (float64), its count before
    (int32; fresh 0), the pointers to its spikes and the first step's spikes, prefetched
    (``load_mask``: the rows its row flags call silent masked off)."""
    theta = tl.load(theta_ptr).to(tl.float64)
    if HAS_COUNT:
        count = tl.load(count_ptr + offs, mask=mask, other=0).to(tl.int32)
    else:
        count = tl.zeros([ROWS, BLOCK_C], tl.int32)
    ptrs = spikes_ptr + offs
    return theta, count, ptrs, tl.load(ptrs, mask=load_mask, other=0)


@triton.jit
def _row_flags_start(flags_ptr, rows, row_ok, R, T, HAS_FLAGS: tl.constexpr):
    """A branch's row flags (``HAS_FLAGS``), which run a step ahead of its spikes' loads:
    ``(pointers at step 1, step 0's flags, step 1's)``; without flags, every row set."""
    if HAS_FLAGS:
        ptrs = flags_ptr + R + rows
        now = tl.load(ptrs - R, mask=row_ok, other=0)
        ahead = tl.load(ptrs, mask=row_ok & (T > 1), other=0)
    else:
        ptrs = flags_ptr + rows
        now = tl.full(rows.shape, 1, tl.int32)
        ahead = now
    return ptrs, now, ahead


@triton.jit
def _row_flags_step(ptrs, ahead, row_ok, R, t, T, HAS_FLAGS: tl.constexpr):
    """The row flags a step on: ``(pointers, step t + 1's flags, step t + 2's)`` at the end of
    step ``t`` (the new ones loaded here)."""
    if HAS_FLAGS:
        ptrs += R
        after = tl.load(ptrs, mask=row_ok & (t + 2 < T), other=0)
    else:
        after = ahead
    return ptrs, ahead, after


@triton.jit
def _branch_step(ptrs, next_mask, step):
    """One step of a pending branch: the next step's spikes prefetched (``next_mask``).
    Returns ``(ptrs, next spikes)``; its count advances by this step's spikes, and its term of
    ``D_t`` (``residual_value``) is formed, where the tile is not quiet (a quiet tile's spikes
    are all 0)."""
    ptrs += step
    return ptrs, tl.load(ptrs, mask=next_mask, other=0)


@triton.jit
def _layer_norm_neuron_step(
    x, w, b, eps, theta, inv_theta, edge, count, n_min, p_max, mask, col_mask, c_f, active_ptrs,
    row_active_ptrs, row_mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ACTIVE: tl.constexpr, HAS_ROW_ACTIVE: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr, LOG2_C: tl.constexpr,
):  # fmt: skip
    """One step of the row function and the neuron on the float32 rows ``x``: ``(sigma, fired,
    count)``, the sample flags set where a row fired (``HAS_ACTIVE``), and the row flags
    (``HAS_ROW_ACTIVE``). The neuron takes an estimate of the row function's value, and the
    row function itself only for a tile with a lane unsure on the estimate (the margin above):
    one multiply a lane, not a division."""
    xc, sd = layer_norm_moments(x, eps, col_mask, c_f, ROWS, BLOCK_C, LOG2_C)
    y = layer_norm_estimate(xc, sd, w, b, HAS_WEIGHT, HAS_BIAS)
    sigma, fired = target_estimate_tile_margin(
        y, inv_theta, count, n_min, p_max, mask, _LN_SLOPE, edge
    )
    if fired > 1:
        y = layer_norm_scale(xc, sd, w, b, HAS_WEIGHT, HAS_BIAS)
        sigma, fired = target_exact_tile(y, theta, count, n_min, p_max, mask)
    # only a tile that fired has a row to flag (as exact_linear)
    if fired != 0:
        if HAS_ACTIVE:
            record_active_rows(active_ptrs, sigma, row_mask, col_mask, ROWS, BLOCK_C)
        if HAS_ROW_ACTIVE:
            record_active_rows(row_active_ptrs, sigma, row_mask, col_mask, ROWS, BLOCK_C)
    return sigma, fired, count + sigma


@triton.jit
def exact_layernorm_neuron_kernel(
    d_ptr,  # [T, R, C] float64 spike-driven residual d_t (float32 rows x_t when not HAS_C)
    branch_ptr,  # [T, R, C] int8 spikes of the pending branch (HAS_BRANCH only)
    branch_theta_ptr,  # [1] the branch neuron's threshold (HAS_BRANCH only)
    branch_count_ptr,  # [R, C] int8 the branch neuron's count before T (HAS_BRANCH_COUNT only)
    branch2_ptr,  # [T, R, C] int8 spikes of a second pending branch (HAS_BRANCH2 only)
    branch2_theta_ptr,  # [1] its neuron's threshold (HAS_BRANCH2 only)
    branch2_count_ptr,  # [R, C] int8 its neuron's count before T (HAS_BRANCH2_COUNT only)
    branch_rows_ptr,  # [T, R] int32 flags: 0 where a row of the branch's spikes is silent
    # (HAS_BRANCH_ROWS only)
    branch2_rows_ptr,  # [T, R] int32 the same of the second branch (HAS_BRANCH2_ROWS only)
    residual_out_ptr,  # [T, R, C] float64 D_t written out (RESIDUAL_OUT only)
    c_ptr,  # [RC, C] float64 constant part; row r of a step adds c[r % RC] (HAS_C only)
    w_ptr,  # [C] float32 LayerNorm weight (HAS_WEIGHT only)
    b_ptr,  # [C] float32 LayerNorm bias (HAS_BIAS only)
    theta_ptr,  # [1] or [C] neuron threshold (any float dtype)
    count_in_ptr,  # [R, C] int8 incoming count (zeros when fresh)
    out_ptr,  # [T, R, C] int8 spikes
    count_out_ptr,  # [R, C] int8
    before_ptr,  # [R, C] int8: a copy of the incoming count (HAS_BEFORE only)
    active_ptr,  # [T, B] int32 per-sample flags, set where a sample fires (HAS_ACTIVE only)
    d_moved_ptr,  # [T, R] int32 flags: row r of d_t may differ from d_{t-1} (HAS_D_MOVED only)
    moved_out_ptr,  # [T, R] int32 the same flags of D_t, written (MOVED_OUT only)
    row_active_ptr,  # [T, R] int32 flags per row, set where a row fires (HAS_ROW_ACTIVE only)
    T,
    R,
    C,
    RC,
    eps,  # float32
    n_min,
    p_max,
    B,  # samples (HAS_ACTIVE only)
    rows_per_sample,  # (HAS_ACTIVE only)
    HAS_D: tl.constexpr,
    HAS_BRANCH: tl.constexpr,
    HAS_BRANCH_COUNT: tl.constexpr,
    HAS_BRANCH2: tl.constexpr,
    HAS_BRANCH2_COUNT: tl.constexpr,
    HAS_BRANCH_ROWS: tl.constexpr,
    HAS_BRANCH2_ROWS: tl.constexpr,
    RESIDUAL_OUT: tl.constexpr,
    HAS_C: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    HAS_D_MOVED: tl.constexpr,
    MOVED_OUT: tl.constexpr,
    HAS_ROW_ACTIVE: tl.constexpr,
    HAS_BEFORE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    LOG2_C: tl.constexpr,
):
    """D_t = d_t + fl64(theta_b) * count_b (with a pending branch: ``residual_value``), then
    + fl64(theta_b2) * count_b2 (with a second), stored when RESIDUAL_OUT; else d_t;
    x = fl32(c + D_t); y = layer_norm_rows(x); target-driven
    neuron on y; active[t, row // rows_per_sample] = 1 and row_active[t, row] = 1 where a row
    fires."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < R)[:, None] & col_mask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    # int64: R * C in int32 would wrap for a step of 2^31 elements or more
    step = tl.cast(R, tl.int64) * C
    # C as a float (exact: C <= 1024) for the correctly rounded divisions by it
    c_f = tl.cast(C, tl.float32)

    if HAS_C:
        const = tl.load(c_ptr + (rows % RC)[:, None] * C + cols[None, :], mask=mask, other=0.0)
    w, b = load_affine(w_ptr, b_ptr, cols, col_mask, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
    theta = load_threshold(theta_ptr, cols, col_mask, PER_CHANNEL)
    inv_theta = inverse_threshold(theta)
    edge = layer_norm_estimate_edge(w, b, inv_theta, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
    count = tl.load(count_in_ptr + offs, mask=mask, other=0).to(tl.int32)
    if HAS_BEFORE:
        # the count before these steps, for the next linear's s_before: copied as it is read
        tl.store(before_ptr + offs, count.to(tl.int8), mask=mask)

    d_ptrs = d_ptr + offs
    out_ptrs = out_ptr + offs
    row_ok = rows < R
    d_next = 0.0  # a placeholder residual_value does not read
    if HAS_D:
        d_next = tl.load(d_ptrs, mask=mask, other=0.0)
    if HAS_D_MOVED:
        # d's flags run one step ahead of its loads (which run one ahead of the step), so that
        # a row's load is issued without waiting for its flag; step 0 is always read
        flag_ptrs = d_moved_ptr + R + rows
        flag_next = tl.load(flag_ptrs, mask=row_ok & (T > 1), other=0)
        flag_now = tl.full([ROWS], 1, tl.int32)
    if MOVED_OUT:
        moved_out_ptrs = moved_out_ptr + rows
    if RESIDUAL_OUT:  # (the op asks for D only with a pending branch)
        residual_out_ptrs = residual_out_ptr + offs
    # A branch's spikes in a row its flags call silent are not read (the load masked off, so
    # still issued a step ahead; the flags read a step before that)
    if HAS_BRANCH:
        bf_ptrs, bf_now, bf_next = _row_flags_start(
            branch_rows_ptr, rows, row_ok, R, T, HAS_BRANCH_ROWS
        )
        b_theta, b_count, b_ptrs, b_next = _branch_start(
            branch_ptr, branch_theta_ptr, branch_count_ptr, offs, mask,
            mask & (bf_now != 0)[:, None], HAS_BRANCH_COUNT, ROWS, BLOCK_C,
        )  # fmt: skip
    if HAS_BRANCH2:
        b2f_ptrs, b2f_now, b2f_next = _row_flags_start(
            branch2_rows_ptr, rows, row_ok, R, T, HAS_BRANCH2_ROWS
        )
        b2_theta, b2_count, b2_ptrs, b2_next = _branch_start(
            branch2_ptr, branch2_theta_ptr, branch2_count_ptr, offs, mask,
            mask & (b2f_now != 0)[:, None], HAS_BRANCH2_COUNT, ROWS, BLOCK_C,
        )  # fmt: skip
    active_ptrs = active_ptr  # a placeholder that the step does not read without HAS_ACTIVE
    if HAS_ACTIVE:
        active_ptrs = active_ptr + rows // rows_per_sample
    row_active_ptrs = row_active_ptr + rows  # read by the step with HAS_ROW_ACTIVE only
    fired = tl.full((), 1, tl.int32)  # whether the tile fired at the last step (at first: yes)
    last_bits = tl.zeros([ROWS, BLOCK_C], tl.int32)  # the last step's x, as bits
    for t in range(T):
        d = d_next
        if HAS_D:
            d_ptrs += step
            if HAS_D_MOVED:
                # a row of d_{t+1} equal to d_t is not read: d_t is kept
                flag_ptrs += R
                flag_after = tl.load(flag_ptrs, mask=row_ok & (t + 2 < T), other=0)
                fresh = (flag_next != 0)[:, None]
                loaded = tl.load(d_ptrs, mask=mask & (t + 1 < T) & fresh, other=0.0)
                d_next = tl.where(fresh, loaded, d)
            else:
                d_next = tl.load(d_ptrs, mask=mask & (t + 1 < T), other=0.0)
        if MOVED_OUT or HAS_D_MOVED or not HAS_D:
            # whether a row of D_t may differ from D_{t-1}: the first step, d's row moved (no
            # flags: assumed), or a branch spike in the row
            row_moved = tl.zeros([ROWS], tl.int32) + tl.where(t == 0, 1, 0)
            if HAS_D:
                if HAS_D_MOVED:
                    row_moved = row_moved | (flag_now != 0).to(tl.int32)
                else:
                    row_moved = tl.full([ROWS], 1, tl.int32)
            # (a branch's row flags where given: no reduction over the row)
            if HAS_BRANCH:
                if HAS_BRANCH_ROWS:
                    row_moved = row_moved | (bf_now != 0).to(tl.int32)
                else:
                    row_moved = row_moved | tl.max((b_next != 0).to(tl.int32), axis=1)
            if HAS_BRANCH2:
                if HAS_BRANCH2_ROWS:
                    row_moved = row_moved | (b2f_now != 0).to(tl.int32)
                else:
                    row_moved = row_moved | tl.max((b2_next != 0).to(tl.int32), axis=1)
        if MOVED_OUT:
            tl.store(moved_out_ptrs, row_moved, mask=row_ok)
            moved_out_ptrs += R
        if HAS_D_MOVED:
            flag_now = flag_next
            flag_next = flag_after
        if HAS_BRANCH:
            next_mask = mask & (t + 1 < T) & (bf_next != 0)[:, None]
            b_spikes = b_next
            b_ptrs, b_next = _branch_step(b_ptrs, next_mask, step)
            bf_ptrs, bf_now, bf_next = _row_flags_step(
                bf_ptrs, bf_next, row_ok, R, t, T, HAS_BRANCH_ROWS
            )
            if HAS_BRANCH2:
                next_mask = mask & (t + 1 < T) & (b2f_next != 0)[:, None]
                b2_spikes = b2_next
                b2_ptrs, b2_next = _branch_step(b2_ptrs, next_mask, step)
                b2f_ptrs, b2f_now, b2f_next = _row_flags_step(
                    b2f_ptrs, b2f_next, row_ok, R, t, T, HAS_BRANCH2_ROWS
                )
        # Where the rows' flags tell (d's, where there is a d), a tile none of whose rows moved
        # has D_t = D_{t-1}: with no lane fired at the last step it is quiet (below) without
        # forming D_t or x (their stores masked off anyway: no row moved)
        stirred = tl.full((), 1, tl.int32)
        if HAS_D_MOVED or not HAS_D:
            stirred = fired | tl.max(row_moved)
        if stirred != 0:
            stream = d  # D_t
            if HAS_BRANCH:
                b_count += b_spikes.to(tl.int32)
                stream = residual_value(d, b_theta, b_count, mask, HAS_D)
                if HAS_BRANCH2:
                    b2_count += b2_spikes.to(tl.int32)
                    stream = residual_value(stream, b2_theta, b2_count, mask, True)
                if RESIDUAL_OUT:
                    if MOVED_OUT:  # a row that did not move is not written (its flag says so)
                        moved_rows = mask & (row_moved != 0)[:, None]
                        tl.store(residual_out_ptrs, stream, mask=moved_rows)
                    else:
                        tl.store(residual_out_ptrs, stream, mask=mask)
            # the padding lanes load 0 and stay 0: tree_sum's zero padding
            if HAS_C:
                x = (const + stream).to(tl.float32)
            else:
                x = stream.to(tl.float32)
            # A quiet tile (its rows' bits as at the last step, no lane fired then) has every
            # target equal to its count, so sigma 0 again, bit for bit: it skips the row
            # function and the neuron (module docstring).
            bits = x.to(tl.int32, bitcast=True)
            moved = any_nonzero(bits ^ last_bits).to(tl.int32)
            last_bits = bits
            if (moved | fired) != 0:
                sigma, fired, count = _layer_norm_neuron_step(
                    x, w, b, eps, theta, inv_theta, edge, count, n_min, p_max, mask, col_mask,
                    c_f, active_ptrs, row_active_ptrs, rows < R, HAS_WEIGHT, HAS_BIAS,
                    HAS_ACTIVE, HAS_ROW_ACTIVE, ROWS, BLOCK_C, LOG2_C,
                )  # fmt: skip
                tl.store(out_ptrs, sigma.to(tl.int8), mask=mask)
            else:
                fired = tl.full((), 0, tl.int32)
                tl.store(out_ptrs, tl.zeros([ROWS, BLOCK_C], tl.int8), mask=mask)
        else:  # zero spikes, stored as a constant
            fired = tl.full((), 0, tl.int32)
            tl.store(out_ptrs, tl.zeros([ROWS, BLOCK_C], tl.int8), mask=mask)
        if RESIDUAL_OUT:
            residual_out_ptrs += step
        if HAS_ACTIVE:
            active_ptrs += B
        if HAS_ROW_ACTIVE:
            row_active_ptrs += R
        out_ptrs += step
    tl.store(count_out_ptr + offs, count.to(tl.int8), mask=mask)


@on_device
def exact_layernorm_neuron_triton(
    launch,
    threshold: torch.Tensor,
    x: torch.Tensor | None,
    c: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    n_min: int,
    p_max: int,
    count: torch.Tensor | None,
    active: torch.Tensor | None = None,
    branch: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    residual_out: bool = False,
    *,
    branch2: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    inplace: bool = False,
    d_moved: torch.Tensor | None = None,
    residual_moved: torch.Tensor | None = None,
    row_active: torch.Tensor | None = None,
    branch_rows: torch.Tensor | None = None,
    branch2_rows: torch.Tensor | None = None,
    count_before: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Host side (``threshold`` first: ``on_device`` takes the device from it, as ``x`` may be
    None): ``threshold`` ``[1]`` or ``[C]`` on the device; ``x`` ``[T, R, C]`` contiguous,
    float64 ``d`` with ``c`` ``[RC, C]`` float64 (row ``r`` adds ``c[r % RC]``), or the
    float32 rows themselves with ``c`` None (and no branch); ``x`` None when the pending
    branch is all of ``D``; ``branch`` None or ``(spikes [T, R, C] int8 contiguous,
    threshold [1], count [R, C] int8 or None)``; ``branch2`` None or a second pending branch
    of the same form, added after the first (which it needs); ``weight``/``bias`` ``[C]`` float32
    contiguous or None; ``count`` ``[R, C]`` or None; ``active`` ``[T, B]`` int32 contiguous
    or None; ``d_moved`` ``[T, R]`` int32 contiguous or None (with ``x`` float64 ``d``): 0
    where a row of ``d`` equals the step before's, which is then not read;
    ``residual_moved`` ``[T, R]`` int32 contiguous or None (with ``residual_out``): the same
    flags of ``D``, written (1 at step 0, and where ``d``'s flag or a branch spike, or that
    branch's row flag, says the row may have moved); ``row_active`` ``[T, R]`` int32
    contiguous or None: set to 1 where a row fires; ``branch_rows``/``branch2_rows`` ``[T,
    R]`` int32 contiguous or None (with that branch): 0 where a row of the branch's spikes
    is silent, which is then not read; ``count_before`` ``[R, C]`` int8 contiguous or None:
    receives the incoming count (zeros when fresh). Returns ``(spikes [T, R, C] int8, count
    [R, C] int8, D)``, ``D`` ``[T, R, C]`` float64 with ``residual_out``, else None: fresh, or with
    ``inplace`` the given ``count`` (a view of the caller's contiguous state), written by the
    program that read it."""
    T, R, C = (x if branch is None else branch[0]).shape
    device = threshold.device
    out = torch.empty((T, R, C), dtype=torch.int8, device=device)
    if inplace:
        count_out = count
    elif count is None:
        # a fresh count is zeros, read like any other (the kernel has no count-less variant,
        # so a long first chunk skips its quiet tiles too); the program that reads a count
        # tile writes it
        count = count_out = torch.zeros((R, C), dtype=torch.int8, device=device)
    else:
        count_out = torch.empty((R, C), dtype=torch.int8, device=device)
    d_out = torch.empty((T, R, C), dtype=torch.float64, device=device) if residual_out else None
    if R == 0:
        return out, count_out, d_out
    block_c, rows, num_warps = launch_config(C)
    b_spikes, b_theta, b_count = (out, out, None) if branch is None else branch
    b2_spikes, b2_theta, b2_count = (out, out, None) if branch2 is None else branch2
    launch(exact_layernorm_neuron_kernel)[(cdiv(R, rows),)](
        out if x is None else x,
        b_spikes,
        b_theta,
        count_out if b_count is None else b_count,
        b2_spikes,
        b2_theta,
        count_out if b2_count is None else b2_count,
        count_out if branch_rows is None else branch_rows,
        count_out if branch2_rows is None else branch2_rows,
        out if d_out is None else d_out,
        out if c is None else c,
        out if weight is None else weight,
        out if bias is None else bias,
        threshold.contiguous(),
        count,
        out,
        count_out,
        out if count_before is None else count_before,
        count_out if active is None else active,
        count_out if d_moved is None else d_moved,
        count_out if residual_moved is None else residual_moved,
        count_out if row_active is None else row_active,
        T,
        R,
        C,
        1 if c is None else c.shape[0],
        eps,
        n_min,
        p_max,
        *active_layout(active, R),
        HAS_D=x is not None,
        HAS_BRANCH=branch is not None,
        HAS_BRANCH_COUNT=b_count is not None,
        HAS_BRANCH2=branch2 is not None,
        HAS_BRANCH2_COUNT=b2_count is not None,
        HAS_BRANCH_ROWS=branch_rows is not None,
        HAS_BRANCH2_ROWS=branch2_rows is not None,
        RESIDUAL_OUT=d_out is not None,
        HAS_C=c is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        PER_CHANNEL=threshold.numel() > 1,
        HAS_ACTIVE=active is not None,
        HAS_D_MOVED=d_moved is not None,
        MOVED_OUT=residual_moved is not None,
        HAS_ROW_ACTIVE=row_active is not None,
        HAS_BEFORE=count_before is not None,
        ROWS=rows,
        BLOCK_C=block_c,
        LOG2_C=block_c.bit_length() - 1,
        num_warps=num_warps,
    )
    return out, count_out, d_out


@triton.jit
def layer_norm_rows_kernel(
    x_ptr,  # [R, C] float32 rows
    w_ptr,  # [C] float32 weight (HAS_WEIGHT only)
    b_ptr,  # [C] float32 bias (HAS_BIAS only)
    y_ptr,  # [R, C] float32
    R,
    C,
    eps,  # float32
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    LOG2_C: tl.constexpr,
):
    """y = layer_norm_rows(x): the fused kernel's row function on its own, values out."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < R)[:, None] & col_mask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    w, b = load_affine(w_ptr, b_ptr, cols, col_mask, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    y = layer_norm_rows_fp32(
        x, w, b, eps, col_mask, tl.cast(C, tl.float32), HAS_WEIGHT, HAS_BIAS, ROWS, BLOCK_C, LOG2_C
    )
    tl.store(y_ptr + offs, y, mask=mask)


@on_device
def layer_norm_rows_triton(
    launch,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``exact_math.layer_norm_rows`` by the fused kernel's own row function: ``x``
    ``[*, C]`` float32 (``C <= 1024``), ``weight``/``bias`` ``[C]`` float32 or None. The same
    bits as ``exact_math.layer_norm_rows``; a QANN on a GPU can call it to share the SNN's
    code, and the tests compare it bit for bit."""
    x = x.contiguous()
    C = x.shape[-1]
    R = x.numel() // C if C else 0
    y = torch.empty_like(x)
    if R == 0:
        return y
    block_c, rows, num_warps = launch_config(C)
    launch(layer_norm_rows_kernel)[(cdiv(R, rows),)](
        x,
        x if weight is None else weight.contiguous(),
        x if bias is None else bias.contiguous(),
        y,
        R,
        C,
        eps,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        ROWS=rows,
        BLOCK_C=block_c,
        LOG2_C=block_c.bit_length() - 1,
        num_warps=num_warps,
    )
    return y

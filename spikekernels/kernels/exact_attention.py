"""Fused exact-mode attention (SPEC.md §5, §9.2-§9.4): the two spike products of SESA, each
with what reads it, the T loop inside one launch.

``exact_attention_probs_kernel`` (scores product + softmax + attention neuron): one program
per (batch entry, block of ``BLOCK_M`` query rows), all ``N`` keys in one tile (padded to a
power of two). The tile is transposed, ``[keys, queries]``: it holds ``S^T = K Q^T``, so that
the keys are the tensor cores' M (a Hopper wgmma needs 64 rows a warpgroup; 64 query rows of
256 keys do not fit the registers, 16 rows do) and each query's softmax runs down a column.
The int32 scores and the neuron's count stay in registers for the whole chunk. ``S`` is not
state: it always equals ``Q K^T`` of the running counts, so a program starts from
``K_{-1} Q_{-1}^T`` of the incoming counts (int8 ``tl.dot`` into int32, exact) and never
writes it. For each step:

- ``S^T += K_t q_t^T + k_t Q_{t-1}^T``, over the head dim in ``BLOCK_D`` slices: int8
  ``tl.dot`` into int32 (exact; int8 wgmma), a slice whose spike tile is all zero skips its
  dot and the read of the count tile it would multiply;
- ``probs = softmax_rows(fl32(g * fl32(S)))`` by the operations of ``exact_math`` in their
  order (``softmax_columns``): the max over the keys, ``exp_rows``' Cody-Waite reduction and
  polynomial, ``tree_sum``'s pairwise order, a correctly rounded division;
- the §9.3 neuron on ``probs`` (``kernels.target.target_tile``), int8 spikes out;
- a *quiet* tile (no dot this step, no spike at the last) skips the softmax and the
  neuron: its targets equal its counts, so its spikes are 0, bit for bit. Late chunks,
  where most of a run's steps are, are mostly quiet tiles, and so are a long first chunk's
  late steps (a fresh count is zeros, read as any other).

``exact_context_kernel`` (context product + neuron): one program per (batch entry, block of
query rows), all head channels in one tile, the keys (the contraction) in ``BLOCK_K`` slices:
``Z += a_t @ V_t + A_{t-1} @ v_t`` (int32, in registers, starting from ``A_{-1} @ V_{-1}`` of
the incoming counts), ``y = fl32(fl32(theta_a * theta_v) * fl32(Z))``, the §9.3 neuron on
``y``; a quiet tile skips the value and the neuron, as above.

The running spike counts (``Q_{t-1}``, ``K_t``; ``A_{t-1}``, ``V_t``) come from
``kernels.spike_matmul.running_count_kernel``, one pass each that writes the count of every
step (int8, the size of the spikes). It starts from the operand's neuron count after the
chunk (the op's ``*_count``, that neuron's own state, read in place through its strides) and
walks the steps backwards, so the ops keep no copy of those counts. They are not carried in
registers: at ViT sizes the key count is a ``[256, 64]`` int8 tile per program (16 KB), and
every register-resident variant compiled for sm_90 spilled (800 B to 27 KB a thread over
BLOCK_M 16-64, 4-16 warps), while the product reads a count tile only where the matching
spike tile is active. The scores kernel reads keys (spikes and counts) as ``[N, D]`` and
queries as ``[M, D]``, the head dim contiguous (K-major, as int8 wgmma takes both operands):
the host copies a layout whose head dim is strided. Spikes take two batch dims with their
own strides (``kernels.spike_matmul._split_batch``), so the model's q, k and v, strided
slices of the packed qkv spikes, are read in place. Only the int8 spikes and the neuron's
count are written. The starting ``S``/``Z`` reads the counts before the chunk from the
per-step counts: the exclusive count's step 0 is ``Q_{-1}`` (``A_{-1}``); the inclusive
one's step 0 less the first spikes is ``K_{-1} = K_0 - k_0`` (int8, exact: the op checks
that every running count fits). With ``inplace`` the new neuron count goes into the
caller's buffer: a program reads its tile of it (its rows, all columns) at its start and
writes the same tile at its end; no other program touches those elements.

``exact_attention_kernel`` (the two in one, on running counts; what ``ExactAttention`` runs):
the scores kernel's program and tile, then per step, with the attention neuron's count
``A_t^T`` ``[keys, queries]`` int8 in registers, ``Z^T = V_t^T A_t^T`` (``[channels,
queries]``, one int8 dot over all keys) and the context neuron on it, its count in registers
too. The attention counts never leave the kernel; only the context spikes (heads merged when
asked) and the two final counts are written. Each neuron's quiet tiles are skipped as below.
``V_t^T`` is the wgmma's A operand, which int8 takes only K-major (the keys contiguous): the
host lays the values out so first (``values_key_major_kernel``: ``[T, B * H, BLOCK_DV,
BLOCK_N]``, the keys in the tile's order, zeros past N and DV), one pass over V a call, and the
kernel loads a plain ``[channels, keys]`` tile into shared memory. (Transposing the ``[keys,
channels]`` tile in the kernel took about 530 of its 2,200 instructions a thread-step on
sm_90, byte permutes and shared memory round trips, in every program of a head.)

With ``qkv_active`` (the qkv layer's flags per step, sample, head and operand: whether q's,
k's and v's counts moved) a step also skips reads. Where q and k did not move, their count
tiles are not read (the loads are masked off, so the step loop still pipelines them) and
``S`` is the last step's (the dots add zeros; the compare with the last step is skipped).
The context product runs only where v or the attention counts moved. V is read at the top
of a step where v, q or k moved or the attention neuron fired at the last step (the only
steps where Z can be needed: the attention neuron fires only where S moved or it fired
before), so the load is issued before the attention neuron rather than after it; v's flag
is read a step ahead for it. Every program re-reads its head's K and V (13 query blocks a
head at ViT-S: about 32 KB a program-step from L2, the kernel's largest traffic), so a quiet
head's step then reads little more than the flags (by count; unmeasured on a GPU).

No product is carried in, so without more a program forms both products at a call's first
step and runs both neurons. With the settled flags (per query row: the attention or context
neuron did not fire at the step before the call; with ``qkv_active`` and the incoming counts)
a block whose rows are all settled starts as after a quiet step: where q and k did not move
at the first step it neither forms ``S`` nor runs the attention neuron, and where v and its
attention counts did not move either, the same for ``Z``. A product not yet formed is formed
where its neuron must run, and then counts as moved (``s_known``, ``z_known``): compared with
the placeholder, one of zeros would pass for unchanged. At its end a program writes its rows'
flags of the last step (every row of a block that fired: 0), in place, for the next call.

With ``COUNTS_IN`` the operands are the running counts themselves (the producing kernels'
``COUNTS_OUT``: the neuron's count after each step, the same bytes as its spikes), and each
step forms the product directly, ``S^T = K_t Q_t^T`` and ``Z = A_t V_t``: no running-count
pass, no product carried in from the incoming counts, one dense int8 dot per step instead of
two sparse ones. The quiet test then compares the product with the last step's (equal
integers: the same softmax and the same targets), so the skip is as fine as the tile. At ViT-S
(batch 64) the passes this removes moved about 60 MB per block and step; the added dense
dots are about 4 GOP per block and step, under 5 us on int8 tensor cores.

Rows past M, keys past N and channels past D are masked to zero (zero spikes and counts add
nothing to the products). In the softmax the padded keys take no part in the row max and are
exact zeros after ``exp``: ``tree_sum``'s own zero padding of the row to a power of two (any
power of two at least the row's: the extra levels add ``+0.0`` to each lane, exactly).

The keys sit in the scores tile's rows in ``key_order``'s order, not in row order: row ``p``
holds key ``permuted_rows(p)`` (every load, store and mask indexes keys through it, so only
the tree sum sees the difference), and ``tree_sum_columns`` adds the rows in the order that
makes its levels ``tree_sum``'s, neighbouring keys first. Chosen so that the levels inside a
thread come first and those across warps last (``key_order``).

The neurons take ``kernels.target``'s division-free estimate, and the division only for a
tile with a lane next to a rounding step (``_attention_neuron``, ``_context_neuron``), except
in the spike-form variants (without ``COUNTS_IN``, which hold the running-count tiles too):
they divide outright, as the estimate's branch spilled there on sm_90. The attention neuron's
count is held as float32 where it takes the estimate: its sigma (``target - count`` clamped
to +-1, exact on integers), its update and its comparison with the target then take no
conversion (on sm_90 about 90 instructions a thread-step fewer than an int16 count in the
fused kernel, 80 fewer than int32 in the scores kernel).

No contracted FMA: Triton lets LLVM fuse a multiply with the add after it into one FMA, and
ptxas may do the same with a plain ``mul.f32`` (PTX without a rounding modifier), which
rounds once where PyTorch rounds twice. So every float product here is ``fma(a, b, +0.0)``
(``_mul``), which differs from ``a * b`` only in the sign of a zero product; no later
operation here can see that sign (a zero product is added to a nonzero value, or divided
into a neuron's target, where floor(+-0 + 1/2) agree). Divisions are ``div_rn`` (Triton's
``/`` on float32 is approximate on NVIDIA GPUs). The GPU's floor flushes subnormals to zero,
which changes nothing: every floor here is of a sum with 1/2, zero or at least 2^-26 in
magnitude. tests/triton_sm90.py checks the PTX: no ``mul.f32``, no FMA with a nonzero
addend, ``div.rn`` only.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from spikekernels.exact_math import _EXP_MIN, _EXP_POLY, _LN2_HI, _LN2_LO, _LOG2E
from spikekernels.kernels import INTERPRET, cdiv, on_device
from spikekernels.kernels.activity import active_layout, add_spike_tally, record_active_tile
from spikekernels.kernels.exact_rows import bit_order_codes, permuted_rows, tree_sum_columns
from spikekernels.kernels.spike_matmul import (
    _running_counts,
    _split_batch,
    _split_dims,
    _split_state,
)
from spikekernels.kernels.target import (
    inverse_threshold,
    target_estimate_tile,
    target_exact_tile,
)
from spikekernels.kernels.tile_flags import any_nonzero


def _f32(x: float) -> float:
    """``x`` rounded to float32, as PyTorch rounds a Python scalar against a float32 tensor:
    the kernels' constants are exactly those ``exact_math`` computes with."""
    return torch.tensor(x, dtype=torch.float32).item()


LOG2E = tl.constexpr(_f32(_LOG2E))
LN2_HI = tl.constexpr(_f32(_LN2_HI))
LN2_LO = tl.constexpr(_f32(_LN2_LO))
EXP_MIN = tl.constexpr(_f32(_EXP_MIN))
P0, P1, P2, P3, P4, P5 = (tl.constexpr(_f32(c)) for c in _EXP_POLY)

# The scores kernel holds whole rows of keys in registers: up to 256 keys (ViT at 224 px with
# patches of 16 has 197 tokens). The context kernel holds whole rows of head channels: up to
# 64, the head dim of ViT-S/B/L (128 spilled 1.2 KB a thread on sm_90). Larger shapes take
# the op's PyTorch path.
MAX_KEYS = 256
MAX_HEAD_DIM = 64

# (BLOCK_M, BLOCK_D, num_warps) of the scores kernel on a GPU: 256 keys x 16 query rows keep
# S^T, the count and the softmax's temporaries in registers at 8 warps (230-255 registers, no
# spill; 64 query rows spilled 4 KB a thread, 32 rows 1 KB), and a 32-wide slice of the head
# dim (int8 wgmma's K) keeps the [256, 32] key tiles small. On running counts the slices are
# unrolled (D_SLICES), so Triton pipelines the step loop itself: the next steps' K and Q load
# asynchronously while a step computes (about 70 KB of shared memory, which the one program
# an SM its registers allow has). The keys are the wgmma's M (two warpgroups of 128), the 16
# queries its N. tests/triton_sm90.py records the register counts. Untuned on hardware.
_PROBS_GPU = (16, 32, 8)
# The fused kernel's (BLOCK_M, BLOCK_D, num_warps): the whole head dim (64) in one slice, one
# dot a step. Its query tile [64, 16] then loads 4 bytes a thread, which Triton copies
# asynchronously in the pipelined step loop; a 32-wide slice loads 2 bytes a thread, too few
# for an asynchronous copy, so each of its two slices waited on an L2 read every step (sm_90
# SASS; the spike-form scores kernel keeps 32: it spills 36 B at 64).
_ATTENTION_GPU = (16, 64, 8)
# The default and the alternatives that compile without a spill in the fused kernel, for
# bench/bench_tiles.py; tests/triton_sm90.py compiles each. (16 query rows at 4 or 16 warps,
# or 32 rows, spill; a 16-wide slice does not compile.)
TILE_CANDIDATES = [_ATTENTION_GPU, _PROBS_GPU]
# (BLOCK_M, BLOCK_K, num_warps) of the context kernel on a GPU: 64 rows x 64 channels
# (a Hopper wgmma per warpgroup), keys in slices of 64.
_CONTEXT_GPU = (64, 64, 4)
# Under the numpy interpreter: small tiles, so that CPU tests cover several row blocks and
# several slices of the contraction (silent and active ones side by side) at small shapes.
_PROBS_INTERPRET = (16, 32, 4)
_CONTEXT_INTERPRET = (16, 32, 4)


def probs_config(n: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_D, num_warps)`` of the scores kernel for ``n`` keys:
    BLOCK_N is ``n`` padded to a power of two (at least 16, the tensor cores' N)."""
    block_m, block_d, num_warps = _PROBS_INTERPRET if INTERPRET else _PROBS_GPU
    return block_m, max(16, triton.next_power_of_2(n)), block_d, num_warps


def key_order(block_n: int, num_warps: int) -> tuple[int, ...]:
    """The order of the keys in the scores tile ``[BLOCK_N keys, BLOCK_M queries]``, as
    ``exact_rows.bit_order_codes`` takes it: tile row ``p`` holds key ``sum_i bit(p, order[i])
    << i``. ``tree_sum`` adds neighbouring keys first, so its levels take the row bits in this
    order: those in a thread's registers first, then those across lanes, then those across
    warps, each later level with fewer values a thread to exchange.

    In sm_90's int8 wgmma accumulator (keys as M) row bits 0-2 are lanes, bit 3 a register,
    the next ``log2(num_warps)`` bits warps and any above registers again. The warp bits go
    from the highest: the order that compiled without a spill in every variant (from the
    lowest, the fused kernel spilled 8 B). The bits do not depend on the order (the sum's
    order is the keys', whatever the rows); at ViT-S on sm_90 the fused kernel takes about
    100 instructions a thread-step fewer with this order than with the keys in row order,
    most of them the tree sum's exchanges between lanes and warps."""
    bits = block_n.bit_length() - 1
    warp_bits = num_warps.bit_length() - 1
    registers = [3, *range(4 + warp_bits, bits)]
    lanes = [0, 1, 2]
    return tuple(bit for bit in registers + lanes + _warp_bits(block_n, num_warps) if bit < bits)


def _warp_bits(block_n: int, num_warps: int) -> list[int]:
    """The row bits of the scores tile that sm_90's wgmma layout spreads across warps,
    ``key_order``'s last levels, from the highest."""
    bits, warp_bits = block_n.bit_length() - 1, num_warps.bit_length() - 1
    return list(range(min(4 + warp_bits, bits) - 1, 3, -1))


def key_codes(
    block_n: int, num_warps: int, *, by_layout: bool = True, gather: bool = True
) -> dict[str, int]:
    """``KEY_PERM`` and ``KEY_TREE`` of the scores kernels: for ``key_order``, its levels
    across warps gathered into a thread (``exact_rows.tree_sum_columns``) unless not
    ``gather``, or without ``by_layout`` for the keys in row order."""
    perm, tree = _key_codes(block_n, num_warps, by_layout, gather)
    return {"KEY_PERM": perm, "KEY_TREE": tree}


@functools.cache
def _key_codes(block_n: int, num_warps: int, by_layout: bool, gather: bool) -> tuple[int, int]:
    """``key_codes``' pair, once per tile shape: a launch pays a dict, not the derivation
    (about 6 us, a dozen attention launches a chunk)."""
    if not by_layout:
        return bit_order_codes(tuple(range(block_n.bit_length() - 1)))
    # key_order's last levels are the warp bits
    order = key_order(block_n, num_warps)
    return bit_order_codes(order, len(_warp_bits(block_n, num_warps)) if gather else 0)


def context_config(d: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_K, BLOCK_D, num_warps)`` of the context kernel for head dim ``d``:
    BLOCK_D is ``d`` padded to a power of two (at least 16)."""
    block_m, block_k, num_warps = _CONTEXT_INTERPRET if INTERPRET else _CONTEXT_GPU
    return block_m, block_k, max(16, triton.next_power_of_2(d)), num_warps


@triton.jit
def _mul(a, b):
    """``fl32(a * b)`` that the compiler cannot contract with a following add."""
    return tl.fma(a, b, 0.0)


@triton.jit
def exp_rows(x):
    """``exact_math.exp_rows`` for float32 ``x <= 0``, operation for operation:
    ``k = floor(x log2e + 1/2)``, ``r = x - k ln2_hi - k ln2_lo``, Horner's polynomial,
    ``y = p r^2 + r + 1``, times ``2^clamp(k, -126, 0)`` built from its bits; 0 below -87.
    The clamp is left out, the same bits: ``k <= 0`` for every ``x <= 0``, and ``k >= -126``
    for ``x >= -87`` (``x log2e >= -125.52``), below which the result is 0 whatever ``k``."""
    k = tl.floor(_mul(x, LOG2E) + 0.5)
    r = x - _mul(k, LN2_HI)
    r = r - _mul(k, LN2_LO)
    p = _mul(tl.full(r.shape, P0, tl.float32), r) + P1
    p = _mul(p, r) + P2
    p = _mul(p, r) + P3
    p = _mul(p, r) + P4
    p = _mul(p, r) + P5
    y = _mul(p, _mul(r, r)) + r + 1.0
    scale = ((k.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(x < EXP_MIN, 0.0, _mul(y, scale))


@triton.jit
def softmax_columns(
    z, key_mask, KEYS: tl.constexpr, COLS: tl.constexpr, LOG2_KEYS: tl.constexpr,
    KEY_TREE: tl.constexpr,
):  # fmt: skip
    """``exact_math.softmax_rows`` of each column of the float32 transposed scores ``z``
    ``[KEYS, COLS]`` (a column is one query's row of scores, its keys in the order of
    ``key_order``, whose ``TREE_CODE`` is ``KEY_TREE``), over the lanes where ``key_mask``
    ``[KEYS]`` holds."""
    e, total = softmax_terms(z, key_mask, KEYS, COLS, LOG2_KEYS, KEY_TREE)
    return tl.div_rn(e, total[None, :])


@triton.jit
def softmax_terms(
    z, key_mask, KEYS: tl.constexpr, COLS: tl.constexpr, LOG2_KEYS: tl.constexpr,
    KEY_TREE: tl.constexpr,
):  # fmt: skip
    """``softmax_columns`` before its division: ``(e [KEYS, COLS], total [COLS])``, the
    softmax being ``fl(e / total)``; ``total`` is positive (1 for a column of no keys)."""
    peak = tl.max(tl.where(key_mask[:, None], z, float("-inf")), axis=0)  # exact in any order
    peak = tl.where(peak == float("-inf"), 0.0, peak)
    # padded keys: exp of 0 (no inf - inf on the way), then an exact zero
    x = tl.where(key_mask[:, None], z - peak[None, :], 0.0)
    e = tl.where(key_mask[:, None], exp_rows(x), 0.0)
    total = tree_sum_columns(e, KEYS, COLS, LOG2_KEYS, KEY_TREE)
    return e, tl.where(total > 0.0, total, 1.0)


@triton.jit
def _attention_neuron(
    s, gain, mask_n, mask_m, theta, inv_theta, count, n_min, p_max, KEYS: tl.constexpr,
    COLS: tl.constexpr, LOG2_KEYS: tl.constexpr, KEY_TREE: tl.constexpr, ESTIMATE: tl.constexpr,
):  # fmt: skip
    """The attention neuron's step on the softmax of the transposed scores ``s``: ``(sigma,
    fired)``, as ``kernels.target.target_tile`` on the softmax but without the softmax's
    division either; the rare tile that needs the divisions forms the softmax again rather
    than keep it live through the reduction (registers: no spill at 255). Without
    ``ESTIMATE``, the divisions outright (module docstring)."""
    mask_s = mask_n[:, None] & mask_m[None, :]
    # exact_math.score_value, then the row function
    if not ESTIMATE:
        z = _mul(gain, s.to(tl.float32))
        probs = softmax_columns(z, mask_n, KEYS, COLS, LOG2_KEYS, KEY_TREE)
        return target_exact_tile(probs, theta, count, n_min, p_max, mask_s)
    # Neither division: the target of fl(e / total) is estimated from e and one reciprocal
    # per query, fl(fl(1/total) fl(1/theta)) (kernels.target: a target of two divisions).
    # No lane mask: a padded key's e is 0 and a padded query's reciprocal is made 0, so
    # their estimate is a sure target 0 (n_min <= 0 <= p_max), which their count (0: masked
    # in, and the divisions below leave it alone) matches: sigma 0.
    z = _mul(gain, s.to(tl.float32))
    e, total = softmax_terms(z, mask_n, KEYS, COLS, LOG2_KEYS, KEY_TREE)
    inv = tl.where(mask_m, _mul(inverse_threshold(total), inv_theta), 0.0)
    sigma, fired = target_estimate_tile(e, inv[None, :], count, n_min, p_max, True)
    if fired > 1:
        # `fired >> 8` is 0 but keeps the compiler from reusing the first softmax
        z = _mul(gain, (s + (fired >> 8)).to(tl.float32))
        probs = softmax_columns(z, mask_n, KEYS, COLS, LOG2_KEYS, KEY_TREE)
        sigma, fired = target_exact_tile(probs, theta, count, n_min, p_max, mask_s)
        sigma = tl.where(mask_s, sigma, 0)
    return sigma, fired


@triton.jit
def _context_neuron(z, m, theta, inv_theta, count, n_min, p_max, mask, ESTIMATE: tl.constexpr):
    """The context neuron's step on the integer context ``z``: ``(sigma, fired)``, as
    ``_attention_neuron`` (the value formed again for the rare tile that needs the
    division)."""
    if not ESTIMATE:
        return target_exact_tile(_mul(m, z.to(tl.float32)), theta, count, n_min, p_max, mask)
    sigma, fired = target_estimate_tile(
        _mul(m, z.to(tl.float32)), inv_theta, count, n_min, p_max, mask
    )
    if fired > 1:
        y = _mul(m, (z + (fired >> 8)).to(tl.float32))
        sigma, fired = target_exact_tile(y, theta, count, n_min, p_max, mask)
    return sigma, fired


@triton.jit
def scores_step(
    s, q_ptr, k_ptr, q_prev_ptr, k_cur_ptr, offs_m, offs_n, offs_d, mask_m, mask_n, D,
    stride_qm, stride_qd, stride_kn, stride_kd, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One step of the transposed scores product: ``s += K_t @ q_t^T + k_t @ Q_{t-1}^T``
    (``[keys, queries]`` int32, exact) over the head dim in ``BLOCK_D`` slices, the pointers
    at this step's spikes (``stride_*``) and running counts (contiguous ``[R, D]``). Returns
    ``(s, moved)``: ``moved`` is nonzero when any slice held a spike (else ``s`` is
    unchanged)."""
    moved = tl.full((), 0, tl.int32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + offs_d
        mask_q = (ds < D)[:, None] & mask_m[None, :]
        mask_k = mask_n[:, None] & (ds < D)[None, :]
        # a silent spike tile skips its dot and the read of the count it would multiply;
        # the key term first, so that the key spike tile is dead before the key count
        # tile is read (integer sums: the order is free)
        k_t = tl.load(
            k_ptr + (offs_n[:, None] * stride_kn + ds[None, :] * stride_kd),
            mask=mask_k,
            other=0,
        )
        k_any = any_nonzero(k_t)
        if k_any:
            q_cnt = tl.load(q_prev_ptr + (offs_m[None, :] * D + ds[:, None]), mask=mask_q, other=0)
            s = tl.dot(k_t, q_cnt, s, out_dtype=tl.int32)
        q_t = tl.load(
            q_ptr + (offs_m[None, :] * stride_qm + ds[:, None] * stride_qd),
            mask=mask_q,
            other=0,
        )
        q_any = any_nonzero(q_t)
        if q_any:
            k_cnt = tl.load(k_cur_ptr + (offs_n[:, None] * D + ds[None, :]), mask=mask_k, other=0)
            s = tl.dot(k_cnt, q_t, s, out_dtype=tl.int32)
        moved = moved | k_any.to(tl.int32) | q_any.to(tl.int32)
    return s, moved


@triton.jit
def _changed(now, last):
    """Nonzero when the integer product tile ``now`` differs from the last step's anywhere
    (``COUNTS_IN``'s quiet test: equal products give equal values, so equal targets): one
    xor and one or-reduction, two operations a lane."""
    return any_nonzero(now ^ last).to(tl.int32)


@triton.jit
def scores_of_counts(
    q_ptr, k_ptr, offs_m, offs_n, offs_d, mask_m, mask_n, D, stride_qm, stride_qd, stride_kn,
    stride_kd, moved, s_last, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, D_SLICES: tl.constexpr, SKIP: tl.constexpr,
):  # fmt: skip
    """``S^T = K_t @ Q_t^T`` (``[keys, queries]`` int32, exact) of this step's running counts
    (``COUNTS_IN``), dense, over the head dim in ``D_SLICES`` slices of ``BLOCK_D``. With
    ``SKIP``, where the scalar ``moved`` is false (Q and K as at the last step) it is
    ``s_last`` instead, and the count tiles are not read: their loads are masked off, not
    branched around, so that the step loop still pipelines them, and the dots add zeros."""
    if SKIP:
        s = tl.where(moved, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32), s_last)
        mask_n = mask_n & moved
        mask_m = mask_m & moved
    else:
        s = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    # unrolled (the slice count is a constant): with no loop inside the caller's step loop,
    # Triton pipelines that one, loading the next steps' K and Q while a step computes
    for d0 in tl.static_range(0, D_SLICES * BLOCK_D, BLOCK_D):
        ds = d0 + offs_d
        k_cnt = tl.load(
            k_ptr + (offs_n[:, None] * stride_kn + ds[None, :] * stride_kd),
            mask=mask_n[:, None] & (ds < D)[None, :],
            other=0,
        )
        q_cnt = tl.load(
            q_ptr + (offs_m[None, :] * stride_qm + ds[:, None] * stride_qd),
            mask=(ds < D)[:, None] & mask_m[None, :],
            other=0,
        )
        s = tl.dot(k_cnt, q_cnt, s, out_dtype=tl.int32)
    return s


@triton.jit
def exact_attention_probs_kernel(
    q_ptr,  # [T, B, H, M, D] int8 query spikes q_t (COUNTS_IN: counts Q_t), any strides
    k_ptr,  # [T, B, H, N, D] int8 key spikes k_t (COUNTS_IN: counts K_t), any strides
    q_prev_ptr,  # [T, B, M, D] int8 running query count before step t, Q_{t-1}, contiguous
    k_cur_ptr,  # [T, B, N, D] int8 running key count after step t, K_t, contiguous
    gain_ptr,  # [1] float32 score gain g
    theta_ptr,  # [1] attention neuron's threshold (any float dtype)
    count_in_ptr,  # [B, M, N] int8 incoming neuron count (zeros when fresh)
    out_ptr,  # [T, B, M, N] int8 spikes
    count_out_ptr,  # [B, M, N] int8
    active_ptr,  # [T, samples] int32 flags, set where a sample fires (HAS_ACTIVE only)
    T,
    M,
    N,
    D,
    H,
    stride_qt,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kt,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    n_min,
    p_max,
    samples,  # (HAS_ACTIVE only)
    rows_per_sample,  # rows of the flattened [B * M] (HAS_ACTIVE only)
    HAS_ACC: tl.constexpr,  # both incoming counts given: S starts at Q_{-1} @ K_{-1}^T
    HAS_ACTIVE: tl.constexpr,
    COUNTS_IN: tl.constexpr,  # q_ptr, k_ptr hold running counts: S^T = K_t @ Q_t^T per step
    COUNTS_OUT: tl.constexpr,  # write the neuron's count after each step, not its spikes
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_SLICES: tl.constexpr,  # cdiv(D, BLOCK_D), for COUNTS_IN's unrolled slices
    LOG2_N: tl.constexpr,
    KEY_PERM: tl.constexpr,  # key_order's codes: tile row p holds key permuted_rows(p)
    KEY_TREE: tl.constexpr,
):
    """``S^T = K_{-1} @ Q_{-1}^T``, then per step: ``S^T += K_t @ q_t^T + k_t @ Q_{t-1}^T``
    (``COUNTS_IN``: ``S^T = K_t @ Q_t^T``); ``probs = softmax_rows(fl32(g * fl32(S)))``;
    target-driven neuron on ``probs``; ``active[t, row // rows_per_sample] = 1`` where a query
    row fires. Tiles are transposed, ``[BLOCK_N keys, BLOCK_M queries]`` (module docstring)."""
    # One flat grid axis (axis 1 would cap the batch at 65535): the query blocks of one batch
    # entry are neighbours, so they share its key tiles in L2.
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    bid = (pid // num_m).to(tl.int64)
    nb = tl.num_programs(0) // num_m
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = permuted_rows(tl.arange(0, BLOCK_N), LOG2_N, KEY_PERM)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_s = mask_n[:, None] & mask_m[None, :]

    # Scalar base pointers advance through batch and time; the tile offsets inside one
    # [M, D] / [N, D] / [M, N] slab are int32 (the host guarantees they fit), which keeps
    # per-element 64-bit pointers out of the loop-carried registers.
    q_ptr += (bid // H) * stride_qb + (bid % H) * stride_qh
    k_ptr += (bid // H) * stride_kb + (bid % H) * stride_kh
    q_prev_ptr += bid * M * D
    k_cur_ptr += bid * N * D
    out_ptr += bid * M * N
    s_offs = offs_m[None, :] * N + offs_n[:, None]  # element (key n, query m) of [M, N]
    count_in_ptr += bid * M * N
    count_out_ptr += bid * M * N
    step_q = nb.to(tl.int64) * M * D
    step_k = nb.to(tl.int64) * N * D
    step_s = nb.to(tl.int64) * M * N

    s = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    if HAS_ACC:
        # the incoming counts from step 0 of the running ones (module docstring): Q_{-1}
        # directly, K_{-1} = K_0 - k_0
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + offs_d
            mask_q = (ds < D)[:, None] & mask_m[None, :]
            mask_k = mask_n[:, None] & (ds < D)[None, :]
            q_cnt = tl.load(q_prev_ptr + (offs_m[None, :] * D + ds[:, None]), mask=mask_q, other=0)
            k_cnt = tl.load(k_cur_ptr + (offs_n[:, None] * D + ds[None, :]), mask=mask_k, other=0)
            k_offs = offs_n[:, None] * stride_kn + ds[None, :] * stride_kd
            k_cnt -= tl.load(k_ptr + k_offs, mask=mask_k, other=0)
            s = tl.dot(k_cnt, q_cnt, s, out_dtype=tl.int32)
    # the neuron's count: float32 where the neuron takes the estimate (its sigma, the count's
    # update and the comparison with the target need no conversion), else int32 (float32
    # spilled there, holding the running-count tiles too)
    count_dtype = tl.float32 if COUNTS_IN else tl.int32
    count = tl.load(count_in_ptr + s_offs, mask=mask_s, other=0).to(count_dtype)
    gain = tl.load(gain_ptr)
    theta = tl.load(theta_ptr).to(tl.float32)
    inv_theta = inverse_threshold(theta)
    if HAS_ACTIVE:  # the tile's sample (all its queries are one head's)
        active_ptr += (bid * M) // rows_per_sample

    fired = tl.full((), 1, tl.int32)  # whether the tile fired at the last step (at first: yes)
    for _ in range(T):
        if COUNTS_IN:
            s_now = scores_of_counts(
                q_ptr, k_ptr, offs_m, offs_n, offs_d, mask_m, mask_n, D, stride_qm, stride_qd,
                stride_kn, stride_kd, True, s, BLOCK_M, BLOCK_N, BLOCK_D, D_SLICES, False,
            )  # fmt: skip
            moved = _changed(s_now, s)
            s = s_now
        else:
            s, moved = scores_step(
                s, q_ptr, k_ptr, q_prev_ptr, k_cur_ptr, offs_m, offs_n, offs_d, mask_m, mask_n,
                D, stride_qm, stride_qd, stride_kn, stride_kd, BLOCK_D,
            )  # fmt: skip
        # The softmax and the neuron run on silent steps too (the neuron may still be moving
        # toward its target), unless the tile is quiet: S did not change and no neuron fired
        # at the last step, so every target equals its count (sigma = sign(target - count)
        # was 0 for the same target) and sigma is 0 again, bit for bit (a fresh count is
        # zeros, read as any other: the first chunk skips too).
        if (moved | fired) != 0:
            sigma, fired = _attention_neuron(
                s, gain, mask_n, mask_m, theta, inv_theta, count, n_min, p_max, BLOCK_N,
                BLOCK_M, LOG2_N, KEY_TREE, COUNTS_IN,
            )  # fmt: skip
        else:
            sigma = tl.zeros([BLOCK_N, BLOCK_M], dtype=count_dtype)
            fired = tl.full((), 0, tl.int32)
        count = count + sigma
        if COUNTS_OUT:
            tl.store(out_ptr + s_offs, count.to(tl.int8), mask=mask_s)
        else:
            tl.store(out_ptr + s_offs, sigma.to(tl.int8), mask=mask_s)
        if HAS_ACTIVE:
            record_active_tile(active_ptr, fired)
            active_ptr += samples
        q_ptr += stride_qt
        k_ptr += stride_kt
        q_prev_ptr += step_q
        k_cur_ptr += step_k
        out_ptr += step_s

    tl.store(count_out_ptr + s_offs, count.to(tl.int8), mask=mask_s)


@triton.jit
def context_step(
    z, a_ptr, v_ptr, a_prev_ptr, v_cur_ptr, offs_m, offs_k, offs_d, mask_m, mask_d, N, D,
    stride_am, stride_an, stride_vn, stride_vd, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One step of the context product: ``z += a_t @ V_t + A_{t-1} @ v_t`` (``[rows,
    channels]`` int32, exact) over the keys in ``BLOCK_K`` slices, the pointers at this step's
    spikes (``stride_*``) and running counts (contiguous ``[M, N]``, ``[N, D]``). Returns
    ``(z, moved)``: ``moved`` is nonzero when any slice held a spike (else ``z`` is
    unchanged)."""
    moved = tl.full((), 0, tl.int32)
    for k0 in range(0, N, BLOCK_K):
        ks = k0 + offs_k
        mask_a = mask_m[:, None] & (ks < N)[None, :]
        mask_v = (ks < N)[:, None] & mask_d[None, :]
        # the value term first, so that the value spike tile is dead before the value count
        # tile is read (integer sums: the order is free)
        v_t = tl.load(
            v_ptr + (ks[:, None] * stride_vn + offs_d[None, :] * stride_vd),
            mask=mask_v,
            other=0,
        )
        v_any = any_nonzero(v_t)
        if v_any:
            a_cnt = tl.load(a_prev_ptr + (offs_m[:, None] * N + ks[None, :]), mask=mask_a, other=0)
            z = tl.dot(a_cnt, v_t, z, out_dtype=tl.int32)
        a_t = tl.load(
            a_ptr + (offs_m[:, None] * stride_am + ks[None, :] * stride_an),
            mask=mask_a,
            other=0,
        )
        a_any = any_nonzero(a_t)
        if a_any:
            v_cnt = tl.load(v_cur_ptr + (ks[:, None] * D + offs_d[None, :]), mask=mask_v, other=0)
            z = tl.dot(a_t, v_cnt, z, out_dtype=tl.int32)
        moved = moved | v_any.to(tl.int32) | a_any.to(tl.int32)
    return z, moved


@triton.jit
def context_of_counts(
    a_ptr, v_ptr, offs_m, offs_k, offs_d, mask_m, mask_d, N, stride_am, stride_an, stride_vn,
    stride_vd, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``Z = A_t @ V_t`` (``[rows, channels]`` int32, exact) of this step's running counts
    (``COUNTS_IN``), dense, over the keys in ``BLOCK_K`` slices."""
    z = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.int32)
    for k0 in range(0, N, BLOCK_K):
        ks = k0 + offs_k
        a_cnt = tl.load(
            a_ptr + (offs_m[:, None] * stride_am + ks[None, :] * stride_an),
            mask=mask_m[:, None] & (ks < N)[None, :],
            other=0,
        )
        v_cnt = tl.load(
            v_ptr + (ks[:, None] * stride_vn + offs_d[None, :] * stride_vd),
            mask=(ks < N)[:, None] & mask_d[None, :],
            other=0,
        )
        z = tl.dot(a_cnt, v_cnt, z, out_dtype=tl.int32)
    return z


@triton.jit
def exact_context_kernel(
    a_ptr,  # [T, B, H, M, N] int8 attention spikes a_t (COUNTS_IN: counts A_t), any strides
    v_ptr,  # [T, B, H, N, D] int8 value spikes v_t (COUNTS_IN: counts V_t), any strides
    a_prev_ptr,  # [T, B, M, N] int8 running attention count before step t, A_{t-1}, contiguous
    v_cur_ptr,  # [T, B, N, D] int8 running value count after step t, V_t, contiguous
    theta_a_ptr,  # [1] attention neuron's threshold (any float dtype)
    theta_v_ptr,  # [1] value neuron's threshold (any float dtype)
    theta_ptr,  # [1] output neuron's threshold (any float dtype)
    count_in_ptr,  # [B, M, D] int8 incoming neuron count (zeros when fresh)
    out_ptr,  # [T, B, H, M, D] int8 spikes, any strides but a contiguous D
    count_out_ptr,  # [B, M, D] int8
    active_ptr,  # [T, samples] int32 flags, set where a sample fires (HAS_ACTIVE only)
    row_active_ptr,  # [T, rows] int32 flags per row of the spikes, set where its block of
    # query rows fires (HAS_ROW_ACTIVE only)
    T,
    M,
    N,
    D,
    H,
    row_heads,  # heads per row of the spikes: H merged, else 1 (HAS_ROW_ACTIVE only)
    rows_per_step,  # rows of the spikes per step: B * H * M / row_heads (HAS_ROW_ACTIVE only)
    stride_at,
    stride_ab,
    stride_ah,
    stride_am,
    stride_an,
    stride_vt,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ot,
    stride_ob,
    stride_oh,
    stride_om,
    n_min,
    p_max,
    samples,  # (HAS_ACTIVE only)
    rows_per_sample,  # rows of the flattened [B * M] (HAS_ACTIVE only)
    HAS_ACC: tl.constexpr,  # both incoming counts given: Z starts at A_{-1} @ V_{-1}
    HAS_ACTIVE: tl.constexpr,
    COUNTS_IN: tl.constexpr,  # a_ptr, v_ptr hold running counts: Z = A_t @ V_t per step
    HAS_ROW_ACTIVE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``Z = A_{-1} @ V_{-1}``, then per step: ``Z += a_t @ V_t + A_{t-1} @ v_t``
    (``COUNTS_IN``: ``Z = A_t @ V_t``); ``y = fl32(fl32(theta_a * theta_v) * fl32(Z))``;
    target-driven neuron on ``y``; ``active[t, row // rows_per_sample] = 1`` where a row
    fires; with ``HAS_ROW_ACTIVE`` every row of the spikes in a block of query rows that
    fired flagged (as ``exact_attention_kernel``)."""
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    bid = (pid // num_m).to(tl.int64)
    nb = tl.num_programs(0) // num_m
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    mask_z = mask_m[:, None] & mask_d[None, :]

    a_ptr += (bid // H) * stride_ab + (bid % H) * stride_ah
    v_ptr += (bid // H) * stride_vb + (bid % H) * stride_vh
    a_prev_ptr += bid * M * N
    v_cur_ptr += bid * N * D
    out_ptr += (bid // H) * stride_ob + (bid % H) * stride_oh
    out_offs = offs_m[:, None] * stride_om + offs_d[None, :]
    state_offs = bid * M * D + offs_m[:, None] * D + offs_d[None, :]
    step_a = nb.to(tl.int64) * M * N
    step_v = nb.to(tl.int64) * N * D

    z = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.int32)
    if HAS_ACC:
        # the incoming counts from step 0 of the running ones (module docstring): A_{-1}
        # directly, V_{-1} = V_0 - v_0
        for k0 in range(0, N, BLOCK_K):
            ks = k0 + offs_k
            mask_a = mask_m[:, None] & (ks < N)[None, :]
            mask_v = (ks < N)[:, None] & mask_d[None, :]
            a_cnt = tl.load(a_prev_ptr + (offs_m[:, None] * N + ks[None, :]), mask=mask_a, other=0)
            v_cnt = tl.load(v_cur_ptr + (ks[:, None] * D + offs_d[None, :]), mask=mask_v, other=0)
            v_offs = ks[:, None] * stride_vn + offs_d[None, :] * stride_vd
            v_cnt -= tl.load(v_ptr + v_offs, mask=mask_v, other=0)
            z = tl.dot(a_cnt, v_cnt, z, out_dtype=tl.int32)
    count = tl.load(count_in_ptr + state_offs, mask=mask_z, other=0).to(tl.int32)
    m = _mul(tl.load(theta_a_ptr).to(tl.float32), tl.load(theta_v_ptr).to(tl.float32))
    theta = tl.load(theta_ptr).to(tl.float32)
    inv_theta = inverse_threshold(theta)
    if HAS_ACTIVE:  # the tile's sample (all its rows are one head's)
        active_ptr += (bid * M) // rows_per_sample
    if HAS_ROW_ACTIVE:
        row_active_ptr += (bid // row_heads) * M

    fired = tl.full((), 1, tl.int32)  # whether the tile fired at the last step (at first: yes)
    for _ in range(T):
        if COUNTS_IN:
            z_now = context_of_counts(
                a_ptr, v_ptr, offs_m, offs_k, offs_d, mask_m, mask_d, N, stride_am, stride_an,
                stride_vn, stride_vd, BLOCK_M, BLOCK_K, BLOCK_D,
            )  # fmt: skip
            moved = _changed(z_now, z)
            z = z_now
        else:
            z, moved = context_step(
                z, a_ptr, v_ptr, a_prev_ptr, v_cur_ptr, offs_m, offs_k, offs_d, mask_m, mask_d,
                N, D, stride_am, stride_an, stride_vn, stride_vd, BLOCK_K,
            )  # fmt: skip
        # The epilogue runs on silent steps too (the neuron may still be moving), unless the
        # tile is quiet, as in the scores kernel: Z did not change and no neuron fired at the
        # last step, so sigma is 0 again, bit for bit (a fresh count is zeros, read as any
        # other: the first chunk skips too).
        if (moved | fired) != 0:
            sigma, fired = _context_neuron(
                z, m, theta, inv_theta, count, n_min, p_max, mask_z, COUNTS_IN
            )
        else:
            sigma = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.int32)
            fired = tl.full((), 0, tl.int32)
        count = count + sigma
        tl.store(out_ptr + out_offs, sigma.to(tl.int8), mask=mask_z)
        if HAS_ACTIVE:
            record_active_tile(active_ptr, fired)
            active_ptr += samples
        if HAS_ROW_ACTIVE:
            if fired != 0:
                tl.store(row_active_ptr + offs_m, 1, mask=mask_m)
            row_active_ptr += rows_per_step
        a_ptr += stride_at
        v_ptr += stride_vt
        a_prev_ptr += step_a
        v_cur_ptr += step_v
        out_ptr += stride_ot

    tl.store(count_out_ptr + state_offs, count.to(tl.int8), mask=mask_z)


@triton.jit
def exact_attention_kernel(
    q_ptr,  # [T, B, H, M, D] int8 running query counts Q_t, any strides (the batch flat: B * H)
    k_ptr,  # [T, B, H, N, D] int8 running key counts K_t, any strides
    vt_ptr,  # [T, B * H, BLOCK_DV, BLOCK_N] int8 running value counts V_t, key-major in the
    # tile's key order, zero past N and DV (values_key_major), contiguous
    gain_ptr,  # [1] float32 score gain g
    attn_theta_ptr,  # [1] attention neuron's threshold (any float dtype)
    theta_a_ptr,  # [1] the attention step in the context value (any float dtype)
    theta_v_ptr,  # [1] the value step (any float dtype)
    theta_ptr,  # [1] context neuron's threshold (any float dtype)
    attn_count_in_ptr,  # [B, M, N] int8 incoming attention neuron count (HAS_COUNT only)
    count_in_ptr,  # [B, M, DV] int8 incoming context neuron count (HAS_COUNT only)
    out_ptr,  # [T, B, H, M, DV] int8 context spikes, any strides but a contiguous DV
    attn_count_out_ptr,  # [B, M, N] int8
    count_out_ptr,  # [B, M, DV] int8
    before_ptr,  # [B, H, M, DV] int8 the incoming context count, laid out as a step of the
    # spikes (HAS_BEFORE only)
    attn_active_ptr,  # [T, samples] int32 flags of the attention neuron (HAS_ATTN_ACTIVE only)
    active_ptr,  # [T, samples] int32 flags of the context neuron (HAS_ACTIVE only)
    qkv_active_ptr,  # [T, B, H, 3] int32 flags: Q, K, V changed at the step (HAS_QKV_ACTIVE)
    row_active_ptr,  # [T, rows] int32 flags per row of the spikes, set where its query block
    # fires (HAS_ROW_ACTIVE only)
    attn_settled_ptr,  # [B * H * M] int32: 1 where the row's attention neuron did not fire at
    # the step before these (read: READ_SETTLED), then at the last of them (written:
    # WRITE_SETTLED)
    settled_ptr,  # [B * H * M] int32: the same of the context neuron
    attn_tally_ptr,  # [T] int64: the attention neuron's spikes at each step, added (HAS_TALLY)
    tally_ptr,  # [T] int64: the context neuron's (HAS_TALLY only)
    T,
    M,
    N,
    D,
    DV,
    H,
    row_heads,  # batch entries whose spikes share a row: H with the heads merged, else 1
    rows_per_step,  # rows of the spikes per step: B * H * M / row_heads (HAS_ROW_ACTIVE only)
    stride_qt,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kt,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vt,  # vt_ptr's step: B * H * BLOCK_DV * BLOCK_N
    stride_ot,
    stride_ob,
    stride_oh,
    stride_om,
    stride_flag_t,  # qkv_active's strides (HAS_QKV_ACTIVE only)
    stride_flag_b,
    stride_flag_h,
    stride_flag_i,
    attn_n_min,
    attn_p_max,
    n_min,
    p_max,
    samples,  # (HAS_ATTN_ACTIVE or HAS_ACTIVE only)
    rows_per_sample,  # rows of the flattened [B * M] (HAS_ATTN_ACTIVE or HAS_ACTIVE only)
    HAS_COUNT: tl.constexpr,  # both incoming counts given
    HAS_ATTN_ACTIVE: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    HAS_QKV_ACTIVE: tl.constexpr,
    HAS_ROW_ACTIVE: tl.constexpr,
    READ_SETTLED: tl.constexpr,  # the settled flags hold the step before's (with HAS_QKV_ACTIVE)
    WRITE_SETTLED: tl.constexpr,  # write the last step's into them
    HAS_BEFORE: tl.constexpr,  # copy the incoming context count (proj's s_before) out
    HAS_TALLY: tl.constexpr,  # add each neuron's spikes per step into its tally
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_SLICES: tl.constexpr,  # cdiv(D, BLOCK_D): the scores' slices, unrolled
    BLOCK_DV: tl.constexpr,
    LOG2_N: tl.constexpr,
    KEY_PERM: tl.constexpr,  # key_order's codes: tile row p holds key permuted_rows(p)
    KEY_TREE: tl.constexpr,
):
    """Per step: ``S^T = K_t @ Q_t^T``; the attention neuron on ``softmax_rows(fl32(g *
    fl32(S)))``, its count ``A_t`` kept in registers; ``Z^T = V_t^T @ A_t^T``; the context
    neuron on ``fl32(fl32(theta_a * theta_v) * fl32(Z))``; its spikes out, and with
    ``HAS_ROW_ACTIVE`` every query row of a block whose context neuron fired flagged. Tiles are
    transposed, ``[keys, queries]`` and ``[channels, queries]`` (module docstring)."""
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    bid = (pid // num_m).to(tl.int64)
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = permuted_rows(tl.arange(0, BLOCK_N), LOG2_N, KEY_PERM)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_dv = offs_dv < DV
    mask_s = mask_n[:, None] & mask_m[None, :]
    mask_z = mask_dv[:, None] & mask_m[None, :]

    q_ptr += (bid // H) * stride_qb + (bid % H) * stride_qh
    k_ptr += (bid // H) * stride_kb + (bid % H) * stride_kh
    vt_ptr += bid * (BLOCK_DV * BLOCK_N)
    out_ptr += (bid // H) * stride_ob + (bid % H) * stride_oh
    vt_offs = offs_dv[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    out_offs = offs_m[None, :] * stride_om + offs_dv[:, None]
    a_offs = bid * M * N + offs_m[None, :] * N + offs_n[:, None]
    c_offs = bid * M * DV + offs_m[None, :] * DV + offs_dv[:, None]

    # the counts held wider than int8 (a tile add on int8 unpacks and repacks bytes): A_t as
    # float32 (module docstring), converted for the context product's int8 operand; the
    # context count as int32 (float32 took more instructions there)
    if HAS_COUNT:
        attn_count = tl.load(attn_count_in_ptr + a_offs, mask=mask_s, other=0).to(tl.float32)
        count = tl.load(count_in_ptr + c_offs, mask=mask_z, other=0).to(tl.int32)
        if HAS_BEFORE:
            # proj's s_before, heads merged as its spikes are: copied as it is read
            before_ptr += (bid // H) * stride_ob + (bid % H) * stride_oh
            tl.store(before_ptr + out_offs, count.to(tl.int8), mask=mask_z)
    else:
        attn_count = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        count = tl.zeros([BLOCK_DV, BLOCK_M], dtype=tl.int32)
    gain = tl.load(gain_ptr)
    attn_theta = tl.load(attn_theta_ptr).to(tl.float32)
    attn_inv_theta = inverse_threshold(attn_theta)
    m = _mul(tl.load(theta_a_ptr).to(tl.float32), tl.load(theta_v_ptr).to(tl.float32))
    theta = tl.load(theta_ptr).to(tl.float32)
    inv_theta = inverse_threshold(theta)
    # the tile's sample (all its queries are one head's)
    if HAS_ATTN_ACTIVE:
        attn_active_ptr += (bid * M) // rows_per_sample
    if HAS_ACTIVE:
        active_ptr += (bid * M) // rows_per_sample

    # Quiet tiles, as in the two kernels: a product equal to the last step's, with no spike
    # from its neuron at the last step, gives sigma = 0 again, bit for bit. No product is
    # carried in (s_known, z_known: 0 until formed), so at the first step a neuron that may
    # have fired at the step before (unknown without the settled flags: yes) needs its
    # product, and the first product formed counts as moved.
    s = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    z = tl.zeros([BLOCK_DV, BLOCK_M], dtype=tl.int32)
    s_known = tl.full((), 0, tl.int32)
    z_known = tl.full((), 0, tl.int32)
    row = bid * M + offs_m
    if READ_SETTLED:
        # the block fired at the step before where one of its rows is not settled
        attn_fired = tl.max((tl.load(attn_settled_ptr + row, mask=mask_m, other=1) == 0)
                            .to(tl.int32), axis=0)  # fmt: skip
        fired = tl.max((tl.load(settled_ptr + row, mask=mask_m, other=1) == 0).to(tl.int32),
                       axis=0)  # fmt: skip
    else:
        attn_fired = tl.full((), 1, tl.int32)
        fired = tl.full((), 1, tl.int32)
    if HAS_QKV_ACTIVE:
        qkv_active_ptr += (bid // H) * stride_flag_b + (bid % H) * stride_flag_h
        # V's flag a step ahead: the V^T load below waits on it, and Triton pipelines the Q
        # and K flags (they predicate pipelined loads), not this one
        v_flag = tl.load(qkv_active_ptr + 2 * stride_flag_i)
    if HAS_ROW_ACTIVE:
        row_active_ptr += (bid // row_heads) * M
    for t in range(T):
        # With the producer's flags, a step whose Q and K did not change reads neither (S is
        # the last step's), one whose A and V did not change does not form Z, and one where
        # none of Q, K and V changed does not read V (module docstring). A product not yet
        # formed is formed where its neuron must run.
        if HAS_QKV_ACTIVE:
            q_or_k = tl.load(qkv_active_ptr) | tl.load(qkv_active_ptr + stride_flag_i)
            qk_moved = (q_or_k != 0) | ((attn_fired & (s_known == 0)) != 0)
            v_moved = (v_flag != 0) | ((fired & (z_known == 0)) != 0)
            qkv_active_ptr += stride_flag_t
            # the next step's
            v_flag = tl.load(qkv_active_ptr + 2 * stride_flag_i, mask=t + 1 < T, other=0)
            # Z is formed where V moved or the attention neuron fires at this step, which it
            # can only where S moved (so Q or K did) or it fired at the last step: V^T is read
            # on that, known before the attention neuron, so the load is issued first
            vt = tl.load(vt_ptr + vt_offs, mask=v_moved | qk_moved | (attn_fired != 0), other=0)
            s_now = scores_of_counts(
                q_ptr, k_ptr, offs_m, offs_n, offs_d, mask_m, mask_n, D, stride_qm, stride_qd,
                stride_kn, stride_kd, qk_moved, s, BLOCK_M, BLOCK_N, BLOCK_D, D_SLICES, True,
            )  # fmt: skip
            s_moved = tl.full((), 0, tl.int32)
            if qk_moved:
                s_moved = _changed(s_now, s) | (s_known == 0).to(tl.int32)
                s_known = tl.full((), 1, tl.int32)
        else:
            vt = tl.load(vt_ptr + vt_offs)  # zeros past N and DV
            s_now = scores_of_counts(
                q_ptr, k_ptr, offs_m, offs_n, offs_d, mask_m, mask_n, D, stride_qm, stride_qd,
                stride_kn, stride_kd, True, s, BLOCK_M, BLOCK_N, BLOCK_D, D_SLICES, False,
            )  # fmt: skip
            s_moved = _changed(s_now, s) | (s_known == 0).to(tl.int32)
            s_known = tl.full((), 1, tl.int32)
        # (a quiet neuron's count holds: each branch updates its own, no zero tile added)
        if (s_moved | attn_fired) != 0:
            sigma, attn_fired = _attention_neuron(
                s_now, gain, mask_n, mask_m, attn_theta, attn_inv_theta, attn_count, attn_n_min,
                attn_p_max, BLOCK_N, BLOCK_M, LOG2_N, KEY_TREE, True,
            )  # fmt: skip
            attn_count = attn_count + sigma
            if HAS_TALLY:
                add_spike_tally(attn_tally_ptr + t, sigma)
        else:
            attn_fired = tl.full((), 0, tl.int32)
        s = s_now
        if HAS_ATTN_ACTIVE:
            record_active_tile(attn_active_ptr, attn_fired)
            attn_active_ptr += samples

        # Z^T = V_t^T @ A_t^T over all keys at once (int8 wgmma, exact int32; V^T key-major
        # from values_key_major, the operand as the tensor cores take it: no transpose here)
        if HAS_QKV_ACTIVE:
            z_moved = tl.full((), 0, tl.int32)
            if v_moved | (attn_fired != 0):
                z_now = tl.dot(vt, attn_count.to(tl.int8), out_dtype=tl.int32)
                z_moved = _changed(z_now, z) | (z_known == 0).to(tl.int32)
                z_known = tl.full((), 1, tl.int32)
                z = z_now
        else:
            z_now = tl.dot(vt, attn_count.to(tl.int8), out_dtype=tl.int32)
            z_moved = _changed(z_now, z) | (z_known == 0).to(tl.int32)
            z_known = tl.full((), 1, tl.int32)
            z = z_now
        if (z_moved | fired) != 0:
            sigma_c, fired = _context_neuron(
                z, m, theta, inv_theta, count, n_min, p_max, mask_z, True
            )
            count = count + sigma_c
            tl.store(out_ptr + out_offs, sigma_c.to(tl.int8), mask=mask_z)
            if HAS_TALLY:
                add_spike_tally(tally_ptr + t, sigma_c)
        else:  # zero spikes, stored as a constant
            fired = tl.full((), 0, tl.int32)
            tl.store(out_ptr + out_offs, tl.zeros([BLOCK_DV, BLOCK_M], tl.int8), mask=mask_z)
        if HAS_ACTIVE:
            record_active_tile(active_ptr, fired)
            active_ptr += samples
        if HAS_ROW_ACTIVE:
            # the block's query rows, from the scalar base in the branch (as exact_linear)
            if fired != 0:
                tl.store(row_active_ptr + offs_m, 1, mask=mask_m)
            row_active_ptr += rows_per_step
        q_ptr += stride_qt
        k_ptr += stride_kt
        vt_ptr += stride_vt
        out_ptr += stride_ot

    tl.store(attn_count_out_ptr + a_offs, attn_count.to(tl.int8), mask=mask_s)
    tl.store(count_out_ptr + c_offs, count.to(tl.int8), mask=mask_z)
    if WRITE_SETTLED:
        # the block's rows: settled where the block did not fire at the last step (the
        # program read these rows' flags, and no other program touches them)
        quiet = tl.zeros([BLOCK_M], dtype=tl.int32)
        tl.store(attn_settled_ptr + row, quiet + (attn_fired == 0).to(tl.int32), mask=mask_m)
        tl.store(settled_ptr + row, quiet + (fired == 0).to(tl.int32), mask=mask_m)


@triton.jit
def values_key_major_kernel(
    v_ptr,  # [T, B, H, N, DV] int8 running value counts, any strides
    out_ptr,  # [T, B * H, BLOCK_DV, BLOCK_N] int8, contiguous
    N,
    DV,
    H,
    nb,  # B * H
    stride_vt,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    BLOCK_N: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    LOG2_N: tl.constexpr,
    KEY_PERM: tl.constexpr,
):
    """One program per step and batch entry: ``out[t, b, c, p] = v[t, b, permuted_rows(p),
    c]``, zero past N and DV. The fused kernel's value operand ``V_t^T`` as int8 wgmma takes
    it, the contraction (the keys) contiguous, in the scores tile's key order: a plain
    16-byte-vector load to shared memory there, where transposing the ``[keys, channels]``
    tile in registers took about 530 instructions a thread-step (byte permutes and shared
    memory round trips; sm_90 SASS)."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid // nb
    bid = pid % nb
    offs_n = permuted_rows(tl.arange(0, BLOCK_N), LOG2_N, KEY_PERM)
    offs_dv = tl.arange(0, BLOCK_DV)
    v_ptr += t * stride_vt + (bid // H) * stride_vb + (bid % H) * stride_vh
    v = tl.load(
        v_ptr + (offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd),
        mask=(offs_n < N)[:, None] & (offs_dv < DV)[None, :],
        other=0,
    )
    out = out_ptr + pid * (BLOCK_DV * BLOCK_N)
    tl.store(out + (offs_dv[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]), tl.trans(v))


class _Launch(NamedTuple):
    """The host-side pieces both kernels take: operands ``[T, B, H, R, C]``, their running
    counts (``A_{t-1}`` exclusive, ``B_t`` inclusive, ``[T, B * H, R, C]``), whether both
    operands' counts are given (the product then starts from their incoming counts), the
    spikes out (and the same as ``[T, B, H, M, N]``, strided where the heads are merged into
    the channels), the outgoing neuron count and the incoming one (zeros when fresh), and the
    count's shape. The outgoing count is fresh, or with ``inplace`` a view of the caller's
    (contiguous) one, or when fresh the zeros read: ``count_out is count_in``."""

    a: torch.Tensor
    b: torch.Tensor
    a_prev: torch.Tensor
    b_cur: torch.Tensor
    has_acc: bool
    out: torch.Tensor
    out5: torch.Tensor
    count_out: torch.Tensor
    count_in: torch.Tensor
    count_shape: tuple[int, ...]


def _unit_inner_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dim is contiguous (the tensor cores' K-major operand), else a
    contiguous copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _prepare(
    launch, a, b, a_count, b_count, count, inplace, *, transpose_b=False, merge_heads=False,
    counts_in=False,
) -> _Launch:  # fmt: skip
    """``a`` ``[T, *batch, M, K]`` times ``b`` ``[T, *batch, K, N]`` (int8, any strides), with
    the counts of their neurons after these steps (``[*batch, M, K]``, ``[*batch, K, N]``,
    any strides; None: zero before them). With ``inplace`` the neuron's ``count`` is given
    and contiguous (the op checks), so the kernel writes the new count where it read the
    old.

    ``transpose_b``: the kernel reads ``b``'s transpose ``[T, B, H, N, K]`` with K contiguous
    (a copy only where K is strided) and its running counts in that layout. ``merge_heads``:
    the spikes come out ``[T, *batch[:-1], M, H * N]``, the last batch dim ``H`` merged into
    the channels. ``counts_in``: ``a`` and ``b`` are the operands' running counts (no counts
    after the steps given), so no running-count pass runs and the kernel reads no
    ``a_prev``/``b_cur`` (the operands stand in for those pointers)."""
    steps, batch = a.shape[0], a.shape[1:-2]
    m, n = a.shape[-2], b.shape[-1]
    a5 = _split_batch(a)
    nb = a5.shape[1] * a5.shape[2]
    a_after = None if a_count is None else _split_state(a_count)
    b_after = None if b_count is None else _split_state(b_count)
    if transpose_b:
        a5 = _unit_inner_stride(a5)
        b5 = _unit_inner_stride(_split_batch(b.transpose(-1, -2)))
        b_after = None if b_after is None else b_after.transpose(-1, -2)
    else:
        b5 = _split_batch(b)
    if counts_in:
        a_prev, b_cur = a5, b5
    else:
        a_prev = _running_counts(launch, a5, a_after, exclusive=True, after=a_after is not None)
        b_cur = _running_counts(launch, b5, b_after, exclusive=False, after=b_after is not None)
    if count is None:
        # a fresh count is zeros, read as any other (the kernels have no count-less variant,
        # so a run's first chunk skips its quiet tiles too); the program that reads a count
        # tile writes it
        count_in = count_out = torch.zeros((nb, m, n), dtype=torch.int8, device=a.device)
    else:
        count_in = count.reshape(nb, m, n).contiguous()
        count_out = count_in if inplace else torch.empty_like(count_in)
    h = a5.shape[2]
    if merge_heads:
        out = torch.empty((steps, *batch[:-1], m, h * n), dtype=torch.int8, device=a.device)
        out5 = out.view(steps, -1, m, h, n).transpose(2, 3)
    else:
        out = torch.empty((steps, *batch, m, n), dtype=torch.int8, device=a.device)
        out5 = out.view(steps, -1, h, m, n)
    return _Launch(
        a5,
        b5,
        a_prev,
        b_cur,
        a_count is not None and b_count is not None,
        out,
        out5,
        count_out,
        count_in,
        (*batch, m, n),
    )


def _batch(p: _Launch) -> int:
    """The flat batch ``B * H`` of the operands ``[T, B, H, R, C]``."""
    return p.a.shape[1] * p.a.shape[2]


def _grid(p: _Launch, block_m: int) -> tuple[int]:
    return (cdiv(p.a.shape[3], block_m) * _batch(p),)


def _results(p: _Launch) -> tuple[torch.Tensor, torch.Tensor]:
    return p.out, p.count_out.reshape(p.count_shape)


@on_device
def exact_attention_probs_triton(
    launch,
    q: torch.Tensor,
    k_t: torch.Tensor,
    gain: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    q_count: torch.Tensor | None,
    k_count: torch.Tensor | None,
    count: torch.Tensor | None,
    active: torch.Tensor | None = None,
    *,
    inplace: bool = False,
    counts_in: bool = False,
    counts_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host side: ``q`` ``[T, *batch, M, D]``, ``k_t`` ``[T, *batch, D, N]`` int8 (any strides,
    at least one batch entry, ``1 <= N <= MAX_KEYS``, ``M, D >= 1``), their neurons' counts
    after these steps (any strides, or None), ``active`` ``[T, B]`` int32 contiguous or None.
    ``counts_in``: ``q`` and ``k_t`` are running counts (``q_count``, ``k_count`` None);
    ``counts_out``: the neuron's count after each step comes out instead of its spikes.
    Returns ``(spikes [T, *batch, M, N] int8, count int8)``: the count fresh, or with
    ``inplace`` a view of the given one, written by the program that read it."""
    p = _prepare(
        launch, q, k_t, q_count, k_count, count, inplace, transpose_b=True, counts_in=counts_in
    )
    m, d = q.shape[-2:]
    n = k_t.shape[-1]
    block_m, block_n, block_d, num_warps = probs_config(n)
    launch(exact_attention_probs_kernel)[_grid(p, block_m)](
        p.a,
        p.b,
        p.a_prev,
        p.b_cur,
        gain,
        threshold,
        p.count_in,
        p.out,
        p.count_out,
        p.count_out if active is None else active,
        q.shape[0],
        m,
        n,
        d,
        p.a.shape[2],
        *p.a.stride(),
        *p.b.stride(),
        n_min,
        p_max,
        *active_layout(active, _batch(p) * m),
        HAS_ACC=p.has_acc,
        HAS_ACTIVE=active is not None,
        COUNTS_IN=counts_in,
        COUNTS_OUT=counts_out,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        D_SLICES=cdiv(d, block_d),
        LOG2_N=block_n.bit_length() - 1,
        # the levels across warps not gathered: on running counts that spilled 8 B on sm_90
        **key_codes(block_n, num_warps, gather=False),
        num_warps=num_warps,
    )
    return _results(p)


@on_device
def exact_context_triton(
    launch,
    a: torch.Tensor,
    v: torch.Tensor,
    theta_a: torch.Tensor,
    theta_v: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    a_count: torch.Tensor | None,
    v_count: torch.Tensor | None,
    count: torch.Tensor | None,
    active: torch.Tensor | None = None,
    *,
    inplace: bool = False,
    merge_heads: bool = False,
    counts_in: bool = False,
    row_active: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host side: ``a`` ``[T, *batch, M, N]``, ``v`` ``[T, *batch, N, D]`` int8 (any strides,
    at least one batch entry, ``1 <= D <= MAX_HEAD_DIM``, ``M, N >= 1``), their neurons'
    counts after these steps (any strides, or None), ``active`` ``[T, B]`` int32 contiguous
    or None, ``row_active`` int32 contiguous, one flag per step and row of the spikes, or
    None. Returns ``(spikes [T, *batch, M, D] int8, count int8)``, or with
    ``merge_heads`` the spikes ``[T, *batch[:-1], M, H * D]`` (written there directly): the
    count fresh, or with ``inplace`` a view of the given one, written by the program that
    read it. ``counts_in``: ``a`` and ``v`` are running counts (``a_count``, ``v_count``
    None)."""
    p = _prepare(
        launch, a, v, a_count, v_count, count, inplace, merge_heads=merge_heads,
        counts_in=counts_in,
    )  # fmt: skip
    m, n = a.shape[-2:]
    d = v.shape[-1]
    block_m, block_k, block_d, num_warps = context_config(d)
    h = p.a.shape[2]
    row_heads = h if merge_heads else 1
    launch(exact_context_kernel)[_grid(p, block_m)](
        p.a,
        p.b,
        p.a_prev,
        p.b_cur,
        theta_a,
        theta_v,
        threshold,
        p.count_in,
        p.out5,
        p.count_out,
        p.count_out if active is None else active,
        p.count_out if row_active is None else row_active,
        a.shape[0],
        m,
        n,
        d,
        h,
        row_heads,
        _batch(p) * m // row_heads,
        *p.a.stride(),
        *p.b.stride(),
        *p.out5.stride()[:4],
        n_min,
        p_max,
        *active_layout(active, _batch(p) * m),
        HAS_ACC=p.has_acc,
        HAS_ACTIVE=active is not None,
        COUNTS_IN=counts_in,
        HAS_ROW_ACTIVE=row_active is not None,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return _results(p)


def attention_config(n: int, dv: int) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, num_warps)`` of the fused attention kernel: the
    scores kernel's tile for ``n`` keys, at least 32 keys (the context product contracts over
    them, and an int8 ``tl.dot`` needs K >= 32: 16 did not compile for sm_90), and ``dv``
    value channels padded to a power of two (at least 16)."""
    block_m, block_d, num_warps = _PROBS_INTERPRET if INTERPRET else _ATTENTION_GPU
    block_n = max(32, triton.next_power_of_2(n))
    return block_m, block_n, block_d, max(16, triton.next_power_of_2(dv)), num_warps


def _state(count: torch.Tensor | None, nb: int, rows: int, cols: int, inplace: bool, like):
    """A neuron count ``[nb, rows, cols]`` in (None when fresh) and out (the same with
    ``inplace``, else fresh)."""
    count_in = None if count is None else count.reshape(nb, rows, cols).contiguous()
    if inplace:
        return count_in, count_in
    return count_in, torch.empty((nb, rows, cols), dtype=torch.int8, device=like.device)


def _values_key_major(
    launch, v5: torch.Tensor, block_n: int, block_dv: int, key_perm: int
) -> torch.Tensor:
    """``values_key_major_kernel`` on ``v5`` ``[T, B, H, N, DV]``: ``[T, B * H, block_dv,
    block_n]`` int8, the keys in the fused kernel's order (its ``KEY_PERM``)."""
    steps, b, h, n, dv = v5.shape
    out = torch.empty((steps, b * h, block_dv, block_n), dtype=torch.int8, device=v5.device)
    launch(values_key_major_kernel)[(steps * b * h,)](
        v5,
        out,
        n,
        dv,
        h,
        b * h,
        *v5.stride(),
        BLOCK_N=block_n,
        BLOCK_DV=block_dv,
        LOG2_N=block_n.bit_length() - 1,
        KEY_PERM=key_perm,
        num_warps=4,
    )
    return out


@on_device
def exact_attention_triton(
    launch,
    q: torch.Tensor,
    k_t: torch.Tensor,
    v: torch.Tensor,
    gain: torch.Tensor,
    attn_threshold: torch.Tensor,
    attn_n_min: int,
    attn_p_max: int,
    theta_a: torch.Tensor,
    theta_v: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    attn_count: torch.Tensor | None,
    count: torch.Tensor | None,
    attn_active: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    *,
    inplace: bool = False,
    merge_heads: bool = False,
    qkv_active: torch.Tensor | None = None,
    row_active: torch.Tensor | None = None,
    attn_row_settled: torch.Tensor | None = None,
    row_settled: torch.Tensor | None = None,
    count_before: torch.Tensor | None = None,
    attn_tally: torch.Tensor | None = None,
    tally: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host side: running counts ``q`` ``[T, *batch, M, D]``, ``k_t`` ``[T, *batch, D, N]``,
    ``v`` ``[T, *batch, N, DV]`` int8 (any strides, at least one batch entry, ``1 <= N <=
    MAX_KEYS``, ``1 <= DV <= MAX_HEAD_DIM``, ``M, D >= 1``), the two neurons' counts (both or
    neither), ``attn_active``/``active`` ``[T, B]`` int32 contiguous or None, ``qkv_active``
    ``[T, *batch, 3]`` int32 (any strides) or None, ``row_active`` int32 contiguous, one flag
    per step and row of the spikes (``[T, *batch, M]``, merged: ``[T, *batch[:-1], M]``), or
    None, the settled flags ``[*batch, M]`` int32 contiguous, both or neither, written with the
    last step's (read first only with both counts and ``qkv_active``: without those every
    product is formed at the first step anyway), ``count_before`` int8 contiguous, shaped as
    one step of the spikes, or None (with the counts): receives the incoming context count;
    ``attn_tally``/``tally`` int64 ``[T]`` contiguous, both or neither: each step's spikes of
    the attention (context) neuron added to them.
    Returns
    ``(spikes [T, *batch, M, DV] int8 (merge_heads: [T, *batch[:-1], M, H * DV]), attn_count,
    count)``, the counts fresh or, with ``inplace``, views of the given ones."""
    steps, batch = q.shape[0], q.shape[1:-2]
    m, d = q.shape[-2:]
    n, dv = k_t.shape[-1], v.shape[-1]
    q5 = _unit_inner_stride(_split_batch(q))
    k5 = _unit_inner_stride(_split_batch(k_t.transpose(-1, -2)))
    v5 = _unit_inner_stride(_split_batch(v))
    h = q5.shape[2]
    nb = q5.shape[1] * h
    attn_in, attn_out = _state(attn_count, nb, m, n, inplace, q)
    count_in, count_out = _state(count, nb, m, dv, inplace, q)
    if merge_heads:
        out = torch.empty((steps, *batch[:-1], m, h * dv), dtype=torch.int8, device=q.device)
        out5 = out.view(steps, -1, m, h, dv).transpose(2, 3)
    else:
        out = torch.empty((steps, *batch, m, dv), dtype=torch.int8, device=q.device)
        out5 = out.view(steps, -1, h, m, dv)
    before5 = out5[0]  # a placeholder never written
    if count_before is not None and count_in is None:
        count_before.zero_()  # fresh: no count tile to copy
    elif count_before is not None and merge_heads:  # the strides of one step of out5
        before5 = count_before.view(-1, m, h, dv).transpose(1, 2)
    elif count_before is not None:
        before5 = count_before.view(-1, h, m, dv)
    block_m, block_n, block_d, block_dv, num_warps = attention_config(n, dv)
    keys = key_codes(block_n, num_warps)
    vt = _values_key_major(launch, v5, block_n, block_dv, keys["KEY_PERM"])
    flags = active if active is not None else attn_active
    if qkv_active is not None:
        qkv_active = qkv_active.reshape(steps, *_split_dims(batch), 3)
    has_settled = attn_row_settled is not None
    read_settled = has_settled and qkv_active is not None and attn_in is not None
    launch(exact_attention_kernel)[(cdiv(m, block_m) * nb,)](
        q5,
        k5,
        vt,
        gain,
        attn_threshold,
        theta_a,
        theta_v,
        threshold,
        attn_out if attn_in is None else attn_in,
        count_out if count_in is None else count_in,
        out5,
        attn_out,
        count_out,
        before5,
        attn_out if attn_active is None else attn_active,
        attn_out if active is None else active,
        attn_out if qkv_active is None else qkv_active,
        attn_out if row_active is None else row_active,
        attn_row_settled if has_settled else attn_out,
        row_settled if has_settled else attn_out,
        attn_out if attn_tally is None else attn_tally,
        attn_out if tally is None else tally,
        steps,
        m,
        n,
        d,
        dv,
        h,
        h if merge_heads else 1,
        nb * m // (h if merge_heads else 1),
        *q5.stride(),
        *k5.stride(),
        vt.stride(0),
        *out5.stride()[:4],
        *((0, 0, 0, 0) if qkv_active is None else qkv_active.stride()),
        attn_n_min,
        attn_p_max,
        n_min,
        p_max,
        *active_layout(flags, nb * m),
        HAS_COUNT=attn_in is not None,
        HAS_ATTN_ACTIVE=attn_active is not None,
        HAS_ACTIVE=active is not None,
        HAS_QKV_ACTIVE=qkv_active is not None,
        HAS_ROW_ACTIVE=row_active is not None,
        READ_SETTLED=read_settled,
        WRITE_SETTLED=has_settled,
        HAS_BEFORE=count_before is not None and count_in is not None,
        HAS_TALLY=attn_tally is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        D_SLICES=cdiv(d, block_d),
        BLOCK_DV=block_dv,
        LOG2_N=block_n.bit_length() - 1,
        **keys,
        num_warps=num_warps,
    )
    return out, attn_out.reshape(*batch, m, n), count_out.reshape(*batch, m, dv)

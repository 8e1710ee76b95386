"""Per-sample activity flags, recorded by the neuron kernels as they write spikes.

A runner needs to know, per step, which samples fired anywhere (a sample whose neurons are all
quiet at a step has settled, see ``models.spiking_vit``). Re-reading every neuron's spikes for
that costs a pass and a few launches per neuron; the kernels instead store the constant 1 into
``active[t, b]`` where a spike of sample ``b`` is nonzero. Programs that share a sample race
on its flag with the same value, harmlessly: no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def active_layout(active: torch.Tensor | None, per_step: int) -> tuple[int, int]:
    """``(B, per_sample)``: the samples of ``active`` ``[T, B]`` and how many of one step's
    ``per_step`` rows (or elements) each owns; ``(1, 1)`` placeholders without ``active``."""
    if active is None:
        return 1, 1
    samples = active.shape[1]
    return samples, per_step // samples


def block_samples(per_sample: int, block: int) -> bool:
    """``WIDE`` for ``record_active_elements``: a sample spans at least a block, so a block of
    an elementwise kernel touches at most two samples."""
    return per_sample >= block


@triton.jit
def record_active_elements(
    active_ptr, fired, split, per_sample, BLOCK: tl.constexpr, WIDE: tl.constexpr
):
    """Elementwise kernels: ``active_ptr[sample of lane i] = 1`` where ``fired[i]``, for a
    block of ``BLOCK`` lanes whose first ``split`` lanes belong to the sample at
    ``active_ptr`` and the rest to the following ones (``per_sample`` lanes each).

    Samples are large (a whole image's neurons: ``WIDE``), so a block lies in one or two: a
    reduction and one store each, and no per-lane sample index held in registers (that
    doubled the neuron kernel's registers). Small samples: a store per later lane."""
    lane = tl.arange(0, BLOCK)
    head = lane < split
    if WIDE:
        # reduced per group of 8 adjacent lanes (a thread's own, no exchange between threads),
        # then a store per group that fired: a whole-block reduction costs shared memory and a
        # barrier every step
        groups: tl.constexpr = BLOCK // 8
        in_head = tl.max(tl.reshape((fired & head).to(tl.int32), [groups, 8]), axis=1)
        in_tail = tl.max(tl.reshape((fired & ~head).to(tl.int32), [groups, 8]), axis=1)
        at = active_ptr + tl.zeros([groups], tl.int32)
        tl.store(at, 1, mask=in_head != 0)
        tl.store(at + 1, 1, mask=in_tail != 0)
    else:
        sample = tl.where(head, 0, 1 + (lane - split) // per_sample)
        tl.store(active_ptr + sample, 1, mask=fired)


@triton.jit
def record_active_rows(
    active_ptrs, sigma, row_mask, col_mask, ROWS: tl.constexpr, COLS: tl.constexpr
):
    """Set ``*active_ptrs[r] = 1`` for each row ``r`` of the ``[ROWS, COLS]`` spike tile
    ``sigma`` with a nonzero spike among the ``col_mask`` lanes (``active_ptrs`` and
    ``row_mask`` are ``[ROWS]``, ``col_mask`` ``[COLS]``). A plain store of one constant:
    programs (and column groups) that share a sample race on its flag, harmlessly, so no
    atomics. The row is reduced in groups of 32 adjacent columns, a store per group that
    fired: a whole-row reduction exchanges partials between warps, which spilled registers
    in the scores kernel (tests/triton_sm90.py)."""
    GROUP: tl.constexpr = COLS if COLS < 32 else 32
    lanes = ((sigma != 0) & col_mask[None, :]).to(tl.int32)
    fired = tl.max(tl.reshape(lanes, [ROWS, COLS // GROUP, GROUP]), axis=2) != 0
    where = active_ptrs[:, None] + tl.zeros([1, COLS // GROUP], tl.int32)
    tl.store(where, 1, mask=row_mask[:, None] & fired)


@triton.jit
def tile_groups(
    pid_m, pid_n, rows, cols, rows_per_sample, groups, group_size, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``(first, samples, spread)`` for ``record_tile_groups``: the flag offset of the first
    sample and column group that the ``[BLOCK_M, BLOCK_N]`` output tile (row tile ``pid_m``,
    column tile ``pid_n`` of ``[rows, cols]``) overlaps, and how many samples
    (``rows_per_sample`` rows each) and groups (``group_size`` columns each) it overlaps."""
    first_row = pid_m * BLOCK_M
    first_col = pid_n * BLOCK_N
    b0 = first_row // rows_per_sample
    g0 = first_col // group_size
    b1 = (tl.minimum(first_row + BLOCK_M, rows) - 1) // rows_per_sample
    g1 = (tl.minimum(first_col + BLOCK_N, cols) - 1) // group_size
    return (b0 * groups + g0).to(tl.int32), (b1 - b0 + 1).to(tl.int32), (g1 - g0 + 1).to(tl.int32)


@triton.jit
def record_tile_groups(group_ptr, first, samples, spread, groups):
    """For an output tile that fired: ``group_ptr[b * groups + g] = 1`` for every sample
    ``b`` and column group ``g`` it overlaps (``tile_groups``). A flag per sample and group
    set at the tile's granularity: where a tile straddles two samples it sets both, a
    superset of the per-row truth, and a few scalars per program (a per-row record spilled
    registers in ``exact_linear``)."""
    for b in range(samples):
        for g in range(spread):
            tl.store(group_ptr + first + b * groups + g, 1)


@triton.jit
def record_active_tile(active_ptr, fired):
    """``*active_ptr = 1`` where the scalar ``fired`` is nonzero: a tile whose lanes all
    belong to one sample (an attention tile holds queries of one head of one sample), whose
    neuron step already reduced whether any lane fired. One store, no reduction of its own
    (a per-column one cost about 100 instructions a thread-step in the scores kernels)."""
    tl.store(active_ptr, 1, mask=fired != 0)


@triton.jit
def add_spike_tally(tally_ptr, sigma):
    """``*tally_ptr += `` the number of nonzero spikes in the 2-D tile ``sigma`` (int64, one
    relaxed atomic add per program and only where the tile fired). Programs add into one
    step's total in any order: integer adds, so the total is exact whatever the order. For a
    counter that needs a fused neuron's spikes per step but not the spikes (the fused
    attention keeps its attention neuron's in registers)."""
    spikes = tl.sum(tl.sum((sigma != 0).to(tl.int32), axis=1), axis=0)
    if spikes != 0:
        tl.atomic_add(tally_ptr, spikes.to(tl.int64), sem="relaxed")

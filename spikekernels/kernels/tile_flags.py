"""Which spike tiles hold a spike: the flag pass before the kernels that skip silent tiles
(``exact_linear``, ``spike_linear_neuron``, ``spike_linear``).

Where the producer of the spikes recorded which rows fired (``exact_linear``'s
``s_row_active``), the same pass reads those flags instead: ``4 * BLOCK_M`` bytes a tile-step,
where a silent tile's rows of spikes are ``BLOCK_M * K``. With a layer's settled rows
(``exact_linear``'s ``row_settled``) it also flags each tile that holds a row not settled: a
scalar for the main kernel, where a reduction over the tile's rows there spilled registers.
Having read a tile's settled flags, it sets them to 1: the main kernel, which does not read
them, then clears the rows of each tile that fires at its last step, so that on return they
are that step's (each column tile of a row only clears: no order between them matters).

One program per (step, tile of ``BLOCK_M`` rows) reads that step's int8 spikes of the tile and
writes 1 if any is nonzero. It stops at the first K tile that holds a spike: spikes are dense
enough while a network is active (about a quarter of them nonzero at ViT-S) that the first
``BLOCK_M x FLAG_BLOCK_K`` tile decides an active tile, so the pass reads whole rows only of the
silent tiles it lets the main kernel skip. (A full pass would read every spike once more per
linear: at ViT-S, batch 64, about 3 GB per 8-step chunk, a fifth of the int8 work's time.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spikekernels.kernels import INTERPRET, cdiv

# K tile of the flag pass (no MMA here, so any power of two).
FLAG_BLOCK_K = 128


# any_nonzero's reduction: a bitwise or on a GPU; under the numpy interpreter, which runs a
# custom combine in Python (about 100x slower there), the maximum of the tile's != 0 (not of
# its absolute values: abs(-2^31) is -2^31, which an xor of float bits that differ in the
# sign alone gives)
_OR_REDUCE = tl.constexpr(not INTERPRET)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def any_nonzero(tile):
    """Whether an integer tile (spikes, counts) holds a nonzero value: a scalar, by one
    bitwise-or reduction. (The maximum of the absolute values unpacked every int8 byte: on
    sm_90 more instructions than the rest of a spike-form product step.) ``_OR_REDUCE`` is
    named in the body, not as a default: torch.compile re-emits a user kernel's helpers with
    the globals their bodies name, and a default's global was left out."""
    return any_nonzero_by(tile, _OR_REDUCE)


@triton.jit
def any_nonzero_by(tile, OR_REDUCE: tl.constexpr):
    """``any_nonzero`` with the reduction chosen: a bitwise or, or the maximum of ``!= 0``."""
    if OR_REDUCE:
        return tl.reduce(tile.to(tl.int32), None, _bit_or) != 0
    return tl.max((tile != 0).to(tl.int32)) != 0


@triton.jit
def step_tile_any_kernel(
    s_ptr,  # [T, rows, K] int8 spikes
    flag_ptr,  # [T, num_m] int32: 1 where the step's row tile holds a nonzero spike
    # ([1 + T, num_m] with HAS_SETTLED: row 0 the unsettled tiles)
    rows,
    K,
    num_m,
    settled_ptr,  # [rows] int32, read then set to 1 (HAS_SETTLED only)
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_SETTLED: tl.constexpr,
):
    """flag[t, m] = any(s[t, m * BLOCK_M : (m + 1) * BLOCK_M, :] != 0); with ``HAS_SETTLED``
    the steps' flags are rows 1 to T, row 0 is any(settled[m * BLOCK_M : ...] == 0), and then
    those settled flags are 1."""
    # one grid axis (x): the row tiles and the steps can each pass axis y's 65,535
    pid = tl.program_id(0).to(tl.int64)
    t, pid_m = pid // num_m, pid % num_m
    rs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rs < rows
    if HAS_SETTLED:
        if t == 0:
            settled = tl.load(settled_ptr + rs, mask=row_mask, other=1)
            tl.store(flag_ptr + pid_m, any_nonzero(settled == 0).to(tl.int32))
            # the only program that reads these rows' flags (module docstring)
            tl.store(settled_ptr + rs, 1, mask=row_mask)
            return
        flag_ptr += num_m
        t -= 1
    cols = tl.arange(0, BLOCK_K)
    base = s_ptr + t * rows * K
    # Only scalars cross the loop (a carried [BLOCK_M, BLOCK_K] pointer tile would hold two
    # registers per element): the tile's pointers are recomputed from k0.
    seen = tl.zeros([], tl.int32)
    k0 = 0
    while (seen == 0) & (k0 < K):
        ks = k0 + cols
        s = tl.load(
            base + rs[:, None] * K + ks[None, :],
            mask=row_mask[:, None] & (ks[None, :] < K),
            other=0,
        )
        seen = any_nonzero(s).to(tl.int32)
        k0 += BLOCK_K
    tl.store(flag_ptr + t * num_m + pid_m, seen)


def step_tile_flags(
    launch, s: torch.Tensor, block_m: int, num_warps: int, settled: torch.Tensor | None = None
):
    """``(flags [T, num_m] int32, num_m)``: whether each step's tile of ``block_m`` rows of
    ``s`` ``[T, rows, K]`` (contiguous) holds a nonzero value. ``s`` may be spikes, or a
    producer's flags per row as ``[T, rows, 1]`` int32 (``exact_linear``'s ``s_row_active``):
    then a tile is read as ``block_m`` flags, not its rows of spikes. With ``settled`` (int32
    ``[rows]``, contiguous) the flags are ``[1 + T, num_m]``: row 0 marks the tiles that hold
    a 0 of ``settled``, rows 1 to T the steps; ``settled`` is all 1 then (for the main kernel
    to clear)."""
    T, rows, K = s.shape
    num_m = cdiv(rows, block_m)
    extra = 0 if settled is None else 1
    flags = torch.empty((extra + T, num_m), dtype=torch.int32, device=s.device)
    block_k = min(FLAG_BLOCK_K, triton.next_power_of_2(max(K, 1)))
    launch(step_tile_any_kernel)[((extra + T) * num_m,)](
        s, flags, rows, K, num_m, flags if settled is None else settled, BLOCK_M=block_m,
        BLOCK_K=block_k, HAS_SETTLED=settled is not None, num_warps=num_warps,
    )  # fmt: skip
    return flags, num_m

"""Triton helpers shared by exact mode's row kernels (SPEC.md §9.2)."""

from __future__ import annotations

import triton
import triton.language as tl

# where ``bit_order_codes`` puts the count of gathered levels in ``TREE_CODE`` (the jit code
# spells it out: the interpreter does not shift a plain int by a constexpr global)
GATHERED_SHIFT = 56


def bit_order_codes(order: tuple[int, ...], gathered: int = 0) -> tuple[int, int]:
    """A tile whose row ``p`` holds element ``k(p) = sum_i bit(p, order[i]) << i`` of each
    column: ``(PERM_CODE, TREE_CODE)``, the constexprs of ``permuted_rows`` and
    ``tree_sum_columns``, four bits a level: ``order[i]``, and its position among the row
    bits not yet summed at level ``i``. The identity order gives ``TREE_CODE`` 0.
    ``gathered``: how many of the last levels ``tree_sum_columns`` adds after gathering each
    column's remaining rows into one thread (bits 56-59 of ``TREE_CODE``, above the levels'
    codes for up to 14 levels): the levels whose rows sit in different warps, each of which
    otherwise takes its own exchange through shared memory."""
    if sorted(order) != list(range(len(order))) or len(order) > 14:
        raise ValueError(
            f"order must be a permutation of 0..{len(order) - 1} (at most 14 bits), got {order}"
        )
    if not 0 <= gathered <= len(order):
        raise ValueError(f"gathered must be in 0..{len(order)}, got {gathered}")
    perm = tree = 0
    for i, bit in enumerate(order):
        perm |= bit << (4 * i)
        tree |= (bit - sum(b < bit for b in order[:i])) << (4 * i)
    return perm, tree | gathered << GATHERED_SHIFT


@triton.jit
def permuted_rows(p, LOG2_ROWS: tl.constexpr, PERM_CODE: tl.constexpr):
    """``k(p)`` of ``bit_order_codes``: the element that tile row ``p`` holds."""
    k = tl.zeros_like(p)
    for i in tl.static_range(LOG2_ROWS):
        k |= ((p >> ((PERM_CODE >> (4 * i)) & 15)) & 1) << i
    return k


@triton.jit
def tree_sum_rows(x, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, LOG2_C: tl.constexpr):
    """``exact_math.tree_sum`` of each row of ``x`` ``[ROWS, BLOCK_C]`` (``BLOCK_C = 2^LOG2_C``,
    lanes past the row's end zero): ``LOG2_C`` levels, each adding neighbours, one add per
    pair. Returns ``[ROWS]``.

    A row's adjacent lanes sit in one thread (vectorised loads: 8 on sm_90 at 4 warps), so the
    first levels are that thread's own adds and each later level exchanges one value a
    thread. (Upper half plus lower half, the order before, crossed warps first with all 8
    values a thread live: about 110 more instructions a tree sum on sm_90.)"""
    for level in tl.static_range(LOG2_C):
        # [ROWS, h, 2] row-major: element (r, i, j) is x[r, 2 * i + j], so the sum over j is
        # a pair of neighbours, a single add (a two-element sum has no other order)
        x = tl.sum(tl.reshape(x, (ROWS, BLOCK_C >> (level + 1), 2)), axis=2)
    return tl.reshape(x, (ROWS,))


@triton.jit
def tree_sum_columns(
    x, ROWS: tl.constexpr, COLS: tl.constexpr, LOG2_ROWS: tl.constexpr, TREE_CODE: tl.constexpr
):
    """``exact_math.tree_sum`` of each column of ``x`` ``[ROWS, COLS]`` (``ROWS =
    2^LOG2_ROWS``, lanes past the column's end zero) whose rows hold the column's elements in
    ``bit_order_codes``' order: level ``i`` adds the two rows that differ in row bit
    ``order[i]``, which are neighbouring elements ``2j, 2j + 1`` of the level. ``TREE_CODE``
    0: rows in element order. Returns ``[COLS]``.

    The order lets a kernel sum a tile's column in whatever order of threads, lanes and warps
    its layout puts the rows (``exact_attention.key_order``). The last ``gathered`` levels
    (``bit_order_codes``; those across warps) add the same pairs after one transpose, which
    gathers each column's remaining rows into a thread: one exchange through shared memory
    for them all, where a level across warps took one of its own (at ViT-S on sm_90, 7
    barriers and 60 instructions a thread-step fewer in the fused attention)."""
    GATHERED: tl.constexpr = (TREE_CODE >> 56) & 15  # GATHERED_SHIFT
    for level in tl.static_range(LOG2_ROWS - GATHERED):
        # [hi, 2, lo, COLS], lo = 2^(position of the level's bit among the rows left): the
        # sum over the 2 adds the pair of rows that differ in that bit, a single add
        x = tl.sum(
            tl.reshape(
                x,
                (
                    (ROWS >> (level + 1)) >> ((TREE_CODE >> (4 * level)) & 15),
                    2,
                    1 << ((TREE_CODE >> (4 * level)) & 15),
                    COLS,
                ),
            ),
            axis=1,
        )
        x = tl.reshape(x, (ROWS >> (level + 1), COLS))
    if GATHERED > 0:
        # [COLS, rows left]: the level's pair dim moved last and split, one add a pair
        y = tl.trans(x)
        for level in tl.static_range(LOG2_ROWS - GATHERED, LOG2_ROWS):
            y = tl.reshape(
                y,
                (
                    COLS,
                    (ROWS >> (level + 1)) >> ((TREE_CODE >> (4 * level)) & 15),
                    2,
                    1 << ((TREE_CODE >> (4 * level)) & 15),
                ),
            )
            a, b = tl.split(tl.permute(y, (0, 1, 3, 2)))
            y = tl.reshape(a + b, (COLS, ROWS >> (level + 1)))
        x = tl.trans(y)
    return tl.reshape(x, (COLS,))

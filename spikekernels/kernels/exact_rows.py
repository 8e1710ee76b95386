"""Triton helpers shared by exact mode's row kernels (SPEC.md §9.2)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tree_sum_rows(x, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, LOG2_C: tl.constexpr):
    """``exact_math.tree_sum`` of each row of ``x`` ``[ROWS, BLOCK_C]`` (``BLOCK_C = 2^LOG2_C``,
    lanes past the row's end zero): ``LOG2_C`` levels, each ``x[:, :h] + x[:, h:]`` with
    ``h`` half the current width, one add per element. Returns ``[ROWS]``."""
    for level in tl.static_range(LOG2_C):
        # [ROWS, 2, h] row-major: element (r, j, i) is x[r, j * h + i], so the sum over j is
        # lower half + upper half, a single add (a two-element sum has no other order)
        x = tl.sum(tl.reshape(x, (ROWS, 2, BLOCK_C >> (level + 1))), axis=1)
    return tl.reshape(x, (ROWS,))


@triton.jit
def tree_sum_columns(x, ROWS: tl.constexpr, COLS: tl.constexpr, LOG2_ROWS: tl.constexpr):
    """``tree_sum_rows`` of ``x``'s transpose: ``exact_math.tree_sum`` of each column of
    ``x`` ``[ROWS, COLS]`` (``ROWS = 2^LOG2_ROWS``, lanes past the column's end zero), each
    level ``x[:h] + x[h:]``. Returns ``[COLS]``."""
    for level in tl.static_range(LOG2_ROWS):
        # [2, h, COLS]: element (j, i, c) is x[j * h + i, c], so the sum over j is upper half
        # + lower half, a single add
        x = tl.sum(tl.reshape(x, (2, ROWS >> (level + 1), COLS)), axis=0)
    return tl.reshape(x, (COLS,))

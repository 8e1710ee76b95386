"""Per-sample activity flags (``active``) on the paths without a fused kernel.

Every neuron op takes an optional int32 ``active`` ``[T, B]`` and sets ``active[t, b] = 1``
where sample ``b`` fired at step ``t``. The Triton kernels store it in their epilogue
(``kernels/activity.py``); the PyTorch, C++ and reference paths call ``record_active`` on the
spikes they return, so every backend gives the same flags. The argument is checked by
``_checks.check_active``. ``exact_linear`` also takes ``group_active`` ``[T, B, G]``, the same
per group of output columns (a head's q, k or v), which ``exact_attention`` reads back, and
the exact ops ``row_active`` ``[T, *rows]``, the same per row of the spikes, which the next
``exact_linear`` (``s_row_active``) or LayerNorm (``branch_row_active``) reads back instead of
scanning the spikes. Those two are the truth here; the Triton kernels of ``exact_linear`` and
``exact_attention`` record them per output tile that fired (a superset: the readers take
them as hints, where a 0 promises silence and a 1 may stand for it). ``record_settled`` writes
the settled flags (the rows that did not fire at the last step) of ``exact_linear`` and
``exact_attention``, which the Triton kernels write per tile. ``record_tally`` adds a neuron's
spikes per step to ``exact_attention``'s ``attn_tally``/``tally`` (a counter's totals of the
neurons the fused kernel keeps to itself), which its Triton kernel adds per program.
"""

from __future__ import annotations

import torch


def record_active(active: torch.Tensor | None, spikes: torch.Tensor) -> None:
    """``active[t, b] = 1`` where sample ``b`` (the spikes' dim 1) fired at step ``t``; never
    cleared. The PyTorch and reference paths' counterpart of the kernels' epilogue store."""
    if active is None or spikes.numel() == 0:
        return
    # the extremes per sample: several times faster than any() on CPU, and no abs() (whose
    # int8 -> int promotion broke Inductor's C++ max reduction)
    lo, hi = torch.aminmax(spikes.reshape(spikes.shape[0], spikes.shape[1], -1), dim=-1)
    active.masked_fill_((lo != 0) | (hi != 0), 1)


def record_group_active(group_active: torch.Tensor | None, spikes: torch.Tensor) -> None:
    """``group_active[t, b, g] = 1`` where sample ``b`` fired at step ``t`` in column group
    ``g`` (``G`` groups of equal width over the spikes' last dim); never cleared."""
    if group_active is None or spikes.numel() == 0:
        return
    steps, batch, groups = group_active.shape
    tiles = spikes.reshape(steps, batch, -1, groups, spikes.shape[-1] // groups)
    group_active.masked_fill_((tiles != 0).any(dim=4).any(dim=2), 1)


def record_row_active(row_active: torch.Tensor | None, spikes: torch.Tensor) -> None:
    """``row_active[t, *r] = 1`` where row ``r`` of the spikes ``[T, *rows, C]`` fired at step
    ``t``; never cleared."""
    if row_active is None or spikes.numel() == 0:
        return
    row_active.masked_fill_((spikes != 0).any(dim=-1), 1)


def record_tally(tally: torch.Tensor | None, spikes: torch.Tensor) -> None:
    """``tally[t] +=`` the number of nonzero spikes ``[T, ...]`` at step ``t`` (over every
    sample): the paths without a fused kernel, which adds per program instead."""
    if tally is None or spikes.numel() == 0:
        return
    tally += torch.count_nonzero(spikes.reshape(spikes.shape[0], -1), dim=1)


def spikes_of_counts(counts: torch.Tensor, before: torch.Tensor | None) -> torch.Tensor:
    """A neuron's spikes ``[T, ...]`` int8 from its count after each step (an op's
    ``counts_out``) and its count ``before`` the steps (``[...]``; None: 0)."""
    first = torch.zeros_like(counts[:1]) if before is None else before.to(counts.dtype)[None]
    return torch.diff(counts, dim=0, prepend=first)


def record_active_of(
    active: torch.Tensor | None,
    out: torch.Tensor,
    before: torch.Tensor | None,
    counts: bool,
    group_active: torch.Tensor | None = None,
    row_active: torch.Tensor | None = None,
) -> None:
    """``record_active`` (and ``record_group_active``, ``record_row_active``) from a neuron
    op's output: its spikes, or with ``counts`` (the op's ``counts_out``) its count after
    each step, whose differences from ``before`` (its count before the steps; None: 0) are
    the spikes."""
    if active is None and group_active is None and row_active is None:
        return
    if counts and out.numel():
        out = spikes_of_counts(out, before)
    record_active(active, out)
    record_group_active(group_active, out)
    record_row_active(row_active, out)


def record_settled(
    row_settled: torch.Tensor | None, out: torch.Tensor, before: torch.Tensor | None, counts: bool
) -> None:
    """``row_settled[*r]`` = 1 where row ``r`` of a neuron op's output ``[T, *rows, C]`` (its
    spikes, or with ``counts`` its count after each step, ``before`` its count before them;
    None: 0) did not fire at the last step, 0 where it did: the settled flags that the
    exact ops write in place for their next call (whatever the flags held). The Triton
    kernels clear them per tile that fired (a subset of these 1s)."""
    if row_settled is None or out.shape[0] == 0:
        return
    prev = (out[-2] if out.shape[0] > 1 else before) if counts else None
    fired = out[-1] != (0 if prev is None else prev)
    row_settled.copy_(~fired.any(dim=-1))

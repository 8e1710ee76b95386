"""What both modes' fused attention ops share (``ops.exact_attention``,
``ops.spike_attention``): the checks of the two spike trains of a product and of their
neurons' counts, the shapes the Triton kernels take, and the merging of heads."""

from __future__ import annotations

import math

import torch

from spikekernels.ops._checks import (
    check_running_counts,
    check_spike_pair,
    check_state,
    check_ternary,
    check_threshold_values,
    may_read_data,
)
from spikekernels.ops.exact_linear import _count_before

# The contraction (head dim D for the scores, keys N for the context) is at most 65535: a
# step's increment sums 2 x 65535 products of a spike and an int8 count, below 2^24, so the
# float32 matmuls of the PyTorch path are exact (as for RunningSpikeMatmul), and the running
# product (at most 128 * 128 * 65535 in magnitude) fits int32.
MAX_CONTRACTION = 2**16 - 1


def count_name(name: str) -> str:
    """The argument that carries the count of spikes ``name``: ``q_count`` for ``q``,
    ``k_count`` for ``k_t``."""
    return name.removesuffix("_t") + "_count"


def check_product(a, b, a_name, b_name, a_count, b_count) -> None:
    """Two spike trains ``a`` ``[T, *batch, M, K]`` and ``b`` ``[T, *batch, K, N]``, int8, with
    the optional counts of their neurons after these steps (metadata only)."""
    check_spike_pair(a, b, a_name, b_name)
    if a.shape[-1] > MAX_CONTRACTION:
        raise ValueError(
            f"the product contracts K={a.shape[-1]} ({a_name}'s last dim); at most "
            f"{MAX_CONTRACTION} keep it exact"
        )
    check_state(a_count, count_name(a_name), a.shape[1:], (torch.int8,), a, a_name)
    check_state(b_count, count_name(b_name), b.shape[1:], (torch.int8,), b, b_name)


def count_before_steps(x: torch.Tensor, after: torch.Tensor | None) -> torch.Tensor | None:
    """The count before these steps (int32) of the neuron behind spikes ``x``, from its count
    ``after`` them; None (a count of 0) when ``after`` is None."""
    return None if after is None else _count_before(x, after)


def check_counts_consistent(x, after, name: str, validate: bool) -> None:
    """The running count of ``x`` from its count before these steps (``after`` less the
    spikes, or 0) stays in int8 at every step, that count included."""
    if not may_read_data(x, validate):
        return  # before forming the count: on a GPU without validate, not even its sum
    hint = "" if after is None else f"; {count_name(name)} must be the count after them"
    check_running_counts(x, count_before_steps(x, after), name, validate, hint)


def check_data(a, b, a_name, b_name, a_count, b_count, scalars, validate, counts_in=False) -> None:
    """Data checks: on CPU tensors always, on a GPU when ``validate`` (host syncs). Running
    counts (``counts_in``) need none: any int8 counts give an exact product."""
    for t, name in scalars:
        check_threshold_values(t, name, validate)
    if counts_in:
        return
    check_ternary(a, a_name, validate)
    check_ternary(b, b_name, validate)
    check_counts_consistent(a, a_count, a_name, validate)
    check_counts_consistent(b, b_count, b_name, validate)


# room past a slab's last element for the padded lanes of its last tile, whose int32 offsets
# must not wrap either (the running count masks its blocks of 1024 by offset)
_TILE_PADDING = 2**16


def slabs_fit(m: int, k: int, n: int) -> bool:
    """Whether the product kernels' int32 tile offsets reach every element of one
    ``[M, K]``, ``[K, N]`` and ``[M, N]`` slab, and the padded lanes past it (attention over
    more than 46K tokens passes 2^31): the host's side of the kernels' int32 offsets."""
    return max(m * k, k * n, m * n) < 2**31 - _TILE_PADDING


def fused_probs_fits(q: torch.Tensor, k_t: torch.Tensor) -> bool:
    """Whether the Triton kernel takes the shape: no empty dim, all keys in one tile, and
    int32 offsets within a slab."""
    from spikekernels.kernels.exact_attention import MAX_KEYS

    m, d, n = q.shape[-2], q.shape[-1], k_t.shape[-1]
    return min(math.prod(q.shape[1:-2]), m, d, n) > 0 and n <= MAX_KEYS and slabs_fit(m, d, n)


def fused_context_fits(a: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Triton kernel takes the shape: no empty dim, all head channels in one
    tile, and int32 offsets within a slab."""
    from spikekernels.kernels.exact_attention import MAX_HEAD_DIM

    m, n, d = a.shape[-2], a.shape[-1], v.shape[-1]
    return min(math.prod(a.shape[1:-2]), m, n, d) > 0 and d <= MAX_HEAD_DIM and slabs_fit(m, n, d)


def heads_merged(spikes: torch.Tensor) -> torch.Tensor:
    """``[T, *batch, M, D]`` -> ``[T, *batch[:-1], M, H * D]``, ``H = batch[-1]``."""
    t, *batch, m, d = spikes.shape
    return spikes.movedim(-3, -2).reshape(t, *batch[:-1], m, batch[-1] * d)

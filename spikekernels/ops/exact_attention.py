"""``torch.ops.spikekernels.exact_attention_probs`` and ``exact_context``: the two spike
products of exact-mode attention, each fused with what reads it (SPEC.md §5, §9.2-§9.4)."""

from __future__ import annotations

import torch

from spikekernels.exact_math import context_value, int_matmul, score_value, softmax_rows
from spikekernels.ops._activity import (
    record_active,
    record_active_of,
    record_row_active,
    record_settled,
    record_tally,
    spikes_of_counts,
)
from spikekernels.ops._attention import (
    MAX_CONTRACTION,
    check_data,
    check_product,
    count_before_steps,
    count_name,
    fused_context_fits,
    fused_probs_fits,
    heads_merged,
)
from spikekernels.ops._checks import (
    check_active,
    check_bounds,
    check_flag,
    check_in_bounds,
    check_row_active,
    check_same_device,
    check_scalar_tensor,
    check_state,
    check_tally,
    check_tensor,
    check_threshold,
    check_threshold_values,
    check_time_major,
    may_read_data,
)
from spikekernels.ops._dispatch import backend_for
from spikekernels.ops._inplace import (
    check_count_before,
    check_inplace,
    fill_count_before,
    own_state,
    placeholder,
    state_result,
)
from spikekernels.ops._registry import call_op, kernel_op, launcher
from spikekernels.ops.spike_matmul import spike_matmul_torch
from spikekernels.ops.target import target_spikes_torch


def _check_counts_in(counts_in: object, a_count, b_count, a_name: str, b_name: str) -> None:
    """``counts_in`` is a bool; with it the operands are the running counts themselves, so
    the counts after the steps are not taken."""
    check_flag(counts_in, "counts_in")
    if counts_in:
        for t, name in ((a_count, a_name), (b_count, b_name)):
            if t is not None:
                raise ValueError(
                    f"{count_name(name)} must be None with counts_in=True: {name} is then the "
                    "running count itself"
                )


def _running_product(a, b, a_count, b_count, counts_in=False) -> torch.Tensor:
    """``S_t`` for every step ``[T, *batch, M, N]`` int32: the running product of the counts,
    ``S_t = S_{t-1} + a_t @ B_t + A_{t-1} @ b_t``, exactly as ``nn.RunningSpikeMatmul`` forms
    it (``spike_matmul``'s dense path at scale 1, exact integers in float32, then an int32
    cumulative sum) onto ``S_{-1} = A_{-1} @ B_{-1}`` of the counts before these steps
    (``int_matmul``, exact), which are the counts after them less the spikes.
    ``counts_in``: ``a`` and ``b`` are the running counts, and ``S_t = A_t @ B_t``."""
    if counts_in:
        return int_matmul(a, b)
    a_in, b_in = count_before_steps(a, a_count), count_before_steps(b, b_count)
    unit = torch.ones((), dtype=torch.float32, device=a.device)
    to_int8 = lambda t: None if t is None else t.to(torch.int8)  # noqa: E731
    step, _, _ = spike_matmul_torch(a, b, unit, to_int8(a_in), to_int8(b_in))
    running = torch.cumsum(step.to(torch.int32), dim=0, dtype=torch.int32)
    if a_in is not None and b_in is not None:
        running += int_matmul(a_in.to(torch.int8), b_in.to(torch.int8))
    return running


def _fake_outputs(a: torch.Tensor, b: torch.Tensor, count, inplace) -> tuple[torch.Tensor, ...]:
    """Both ops' outputs, shapes only: spikes ``[T, *batch, M, N]`` int8 and the neuron's
    count int8 (with ``inplace`` a placeholder for ``count``)."""
    shape = (*a.shape[1:-1], b.shape[-1])
    spikes = a.new_empty((a.shape[0], *shape), dtype=torch.int8)
    return spikes, placeholder(count) if inplace else a.new_empty(shape, dtype=torch.int8)


def _state_result(out, count, inplace) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh result of the PyTorch or reference path as the registered op returns it: with
    ``inplace`` the new count copied into the given ``count`` and a placeholder returned."""
    return out[0], state_result(inplace, out[1], count)


def _triton_result(out, count, inplace) -> tuple[torch.Tensor, torch.Tensor]:
    """A Triton path's result as the registered op returns it: with ``inplace`` the kernel
    wrote the new count into ``count``, and a placeholder is returned."""
    return (out[0], placeholder(count)) if inplace else out


# ---------------------------------------------------------------------------------------------
# scores product + softmax + attention neuron


def _check_probs(
    q, k_t, gain, threshold, n_min, p_max, q_count, k_count, count, active, inplace, counts_in,
    counts_out,
) -> None:  # fmt: skip
    """Metadata checks (no data read)."""
    _check_counts_in(counts_in, q_count, k_count, "q", "k_t")
    check_flag(counts_out, "counts_out")
    check_product(q, k_t, "q", "k_t", q_count, k_count)
    # float32 only: score_value multiplies in the gain's dtype
    check_scalar_tensor(gain, "gain", q, "q", (torch.float32,))
    check_threshold(threshold, "threshold", None, q, "q")
    check_bounds(n_min, p_max)
    shape = (*q.shape[1:-1], k_t.shape[-1])
    check_state(count, "count", shape, (torch.int8,), q, "q")
    check_active(active, (q.shape[0], *shape), q, "q")
    check_inplace(inplace, (("count", count),), (q, k_t, gain, threshold, q_count, k_count, active))


def exact_attention_probs_torch(
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
    counts_in: bool = False,
    counts_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised PyTorch (any device, any shape): what ``RunningSpikeMatmul``,
    ``ExactSoftmax`` and ``TargetNeuron`` compute in a row, from the same functions."""
    running = _running_product(q, k_t, q_count, k_count, counts_in)
    if running.numel():
        probs = softmax_rows(score_value(running, gain.reshape(())))
    else:  # no keys or no rows: nothing to normalise
        probs = running.to(torch.float32)
    return target_spikes_torch(probs, threshold, n_min, p_max, count, active, counts_out)


@kernel_op("exact_attention_probs", mutates_args=("count", "active"), check=_check_probs)
def _exact_attention_probs_op(
    q: torch.Tensor,
    k_t: torch.Tensor,
    gain: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    q_count: torch.Tensor | None = None,
    k_count: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    inplace: bool = False,
    counts_in: bool = False,
    counts_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (q, k_t, gain, threshold, n_min, p_max, q_count, k_count, count)
    flags = (counts_in, counts_out)
    backend = backend_for(q, ("triton", "torch"))
    if backend == "triton" and fused_probs_fits(q, k_t):
        from spikekernels.kernels.exact_attention import exact_attention_probs_triton

        out = exact_attention_probs_triton(
            launcher, *args, active, inplace=inplace, counts_in=counts_in, counts_out=counts_out
        )
        return _triton_result(out, count, inplace)
    if backend == "reference":
        from spikekernels import reference

        out = reference.exact_attention_probs(*args, *flags)
        record_active_of(active, out[0], count, counts_out)
    else:
        out = exact_attention_probs_torch(*args, active, *flags)
    return _state_result(out, count, inplace)


@_exact_attention_probs_op.register_fake
def _(
    q, k_t, gain, threshold, n_min, p_max, q_count=None, k_count=None, count=None,
    active=None, inplace=False, counts_in=False, counts_out=False,
):  # fmt: skip
    args = (q, k_t, gain, threshold, n_min, p_max, q_count, k_count, count)
    _check_probs(*args, active, inplace, counts_in, counts_out)
    return _fake_outputs(q, k_t, count, inplace)


def exact_attention_probs(
    q: torch.Tensor,
    k_t: torch.Tensor,
    gain: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    q_count: torch.Tensor | None = None,
    k_count: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    *,
    active: torch.Tensor | None = None,
    inplace: bool = False,
    counts_in: bool = False,
    counts_out: bool = False,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-mode attention probabilities: the scores product, the softmax row function and
    the attention neuron, fused (SPEC.md §5, §9.2-§9.4).

    State: the attention neuron's ``count`` (int8, fresh 0). The running counts ``Q`` and
    ``K`` of the two spike trains are the counts of the neurons that produced them, which the
    op takes after these steps (``q_count``, ``k_count``: that neuron's own count, no copy
    kept here); their counts before the steps are those less the spikes. The running scores
    are not state either: ``S = Q @ K`` of the counts, so each call starts from
    ``S = Q_{-1} @ K_{-1}`` (exact, int32). Per step ``t``::

        S += q_t @ K_t + Q_{t-1} @ k_t                  # exact, int32 (K_t: after step t)
        z  = fl32(g * fl32(S))                          # exact_math.score_value
        p  = softmax_rows(z)                            # exact_math's row function
        target = clamp(floor(p / theta + 1/2), n_min, p_max)
        sigma  = sign(target - count);  count += sigma;  out_t = sigma

    i.e. ``target_spikes`` (§9.3) on ``ExactSoftmax``'s value of ``RunningSpikeMatmul``'s
    scores, bit for bit: ``softmax_rows`` is the row max, ``exp_rows``' polynomial and
    ``tree_sum``'s pairwise order, one rounding per operation, no fused multiply-add and a
    correctly rounded division, on every path. Only the int8 spikes and the final count
    are produced; the scores and probabilities of a step never leave the kernel.

    Args:
        q: ``[T, *batch, M, D]`` int8 ternary query spikes, any strides.
        k_t: ``[T, *batch, D, N]`` int8 ternary key spikes, any strides (a transposed view
            such as ``k.transpose(-1, -2)`` is read in place). ``D <= 65535``.
        gain: one-element float32 score gain ``g = fl32(fl32(theta_q * theta_k) *
            fl32(D^-1/2))`` (``exact_math.score_gain``), read on the device.
        threshold: one-element float tensor ``theta``, the attention neuron's step (read as
            float32 on the device).
        n_min, p_max: Python ints, ``n_min <= 0 <= p_max``, inside int8's ``[-128, 127]``
            (the attention neuron is unsigned: ``0, level - 1``).
        q_count, k_count: optional int8 counts ``[*batch, M, D]`` and ``[*batch, D, N]``
            (any strides) of the q and k neurons after these steps; None: that count was 0
            before them (a fresh run). The starting ``S`` is the product of the counts
            before the steps; with either None it is 0.
        count: optional incoming int8 neuron count ``[*batch, M, N]``.
        active: optional int32 ``[T, B]`` per-sample flags, ``B`` the spikes' dim 1 (the first
            batch dim, e.g. the images of ``[T, B, heads, M, N]``), set in place as the
            kernel writes the spikes (``target_spikes``' contract: ``active[t, b] = 1``
            where sample ``b`` fires at step ``t``). Not returned.
        inplace: write the new ``count`` into the given one (required, contiguous, sharing
            no memory with an input) and return that same tensor (``ops._inplace``): a state
            at a fixed address, as a CUDA graph replays it.
        counts_in: ``q`` and ``k_t`` are the running counts ``Q_t``, ``K_t`` of the q and k
            neurons after each step (int8, any strides; ``exact_linear``'s ``counts_out``),
            not their spikes; ``q_count`` and ``k_count`` must be None. Then ``S = Q_t @ K_t``
            at each step, the same integers as the running sum: no pass forms the running
            counts, and nothing but the neuron's count is carried between calls.
        counts_out: return the attention neuron's count after each step ``[T, *batch, M,
            N]`` int8 in place of its spikes (what ``exact_context`` takes with
            ``counts_in``).
        validate: on a GPU also run the data checks (host syncs): ``gain`` and ``threshold``
            positive, finite and normal; the spikes ternary; every running count, from the
            count before the steps on, inside int8 (spikes only: running counts need no
            check); ``count`` inside ``[n_min, p_max]``. On CPU they always run.

    Returns:
        ``(spikes [T, *batch, M, N] int8, count)``, fresh tensors (with ``inplace``: the
        given ``count``, updated), so chunked time (feeding the count back, with each
        chunk's ``q_count``/``k_count``) equals a whole run bit for bit.

    Dispatch (``ops._dispatch.backend_for``): CUDA tensors run the Triton kernel (one program
    per batch entry and block of query rows, all keys in one tile, ``S`` formed from the
    incoming counts, then the T loop inside with ``S`` and the count in registers; int8
    tensor-core products, silent spike tiles skipped) when ``N <= 256``, the PyTorch path
    otherwise; CPU tensors run vectorised PyTorch (the Triton kernel under
    ``TRITON_INTERPRET=1``); ``force_backend("reference")`` runs
    ``reference.exact_attention_probs``. Inference only: no autograd.
    """
    args = (q, k_t, gain, threshold, n_min, p_max, q_count, k_count, count)
    _check_probs(*args, active, inplace, counts_in, counts_out)
    scalars = ((gain, "gain"), (threshold, "threshold"))
    check_data(q, k_t, "q", "k_t", q_count, k_count, scalars, validate, counts_in)
    check_in_bounds(count, "count", n_min, p_max, validate)
    out = call_op("exact_attention_probs", *args, active, inplace, counts_in, counts_out)
    return own_state(out, (1,), (count,)) if inplace else out


# ---------------------------------------------------------------------------------------------
# context product + neuron


def _check_context(
    a, v, theta_a, theta_v, threshold, n_min, p_max, a_count, v_count, count, active, inplace,
    merge_heads, counts_in, row_active=None,
) -> None:  # fmt: skip
    """Metadata checks (no data read)."""
    check_flag(merge_heads, "merge_heads")
    _check_counts_in(counts_in, a_count, v_count, "a", "v")
    if merge_heads and a.dim() < 4:
        raise ValueError(
            "merge_heads=True merges the last batch dim (the heads) into the channels: "
            f"a needs one, [T, *batch, M, N], got shape {tuple(a.shape)}"
        )
    check_product(a, v, "a", "v", a_count, v_count)
    check_threshold(theta_a, "theta_a", None, a, "a")
    check_threshold(theta_v, "theta_v", None, a, "a")
    check_threshold(threshold, "threshold", None, a, "a")
    check_bounds(n_min, p_max)
    shape = (*a.shape[1:-1], v.shape[-1])
    check_state(count, "count", shape, (torch.int8,), a, "a")
    check_active(active, (a.shape[0], *shape), a, "a")
    batch = a.shape[1:-3] if merge_heads else a.shape[1:-2]  # the spikes' (heads merged)
    check_row_active(row_active, (a.shape[0], *batch, a.shape[-2], v.shape[-1]), a, "a")
    inputs = (a, v, theta_a, theta_v, threshold, a_count, v_count, active, row_active)
    check_inplace(inplace, (("count", count),), inputs)


def exact_context_torch(
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
    counts_in: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised PyTorch (any device, any shape): what ``RunningSpikeMatmul``,
    ``exact_math.context_value`` and ``TargetNeuron`` compute in a row."""
    running = _running_product(a, v, a_count, v_count, counts_in)
    y = context_value(running, theta_a.reshape(()), theta_v.reshape(()))
    return target_spikes_torch(y, threshold, n_min, p_max, count, active)


@kernel_op("exact_context", mutates_args=("count", "active", "row_active"), check=_check_context)
def _exact_context_op(
    a: torch.Tensor,
    v: torch.Tensor,
    theta_a: torch.Tensor,
    theta_v: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    a_count: torch.Tensor | None = None,
    v_count: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    inplace: bool = False,
    merge_heads: bool = False,
    counts_in: bool = False,
    row_active: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (a, v, theta_a, theta_v, threshold, n_min, p_max, a_count, v_count, count)
    backend = backend_for(a, ("triton", "torch"))
    if backend == "triton" and fused_context_fits(a, v):
        from spikekernels.kernels.exact_attention import exact_context_triton

        out = exact_context_triton(
            launcher, *args, active, inplace=inplace, merge_heads=merge_heads,
            counts_in=counts_in, row_active=row_active,
        )  # fmt: skip
        return _triton_result(out, count, inplace)
    if backend == "reference":
        from spikekernels import reference

        out = reference.exact_context(*args, counts_in)
        record_active(active, out[0])
    else:
        out = exact_context_torch(*args, active, counts_in)
    if merge_heads:
        out = (heads_merged(out[0]), out[1])
    record_row_active(row_active, out[0])
    return _state_result(out, count, inplace)


@_exact_context_op.register_fake
def _(
    a, v, theta_a, theta_v, threshold, n_min, p_max, a_count=None, v_count=None, count=None,
    active=None, inplace=False, merge_heads=False, counts_in=False, row_active=None,
):  # fmt: skip
    args = (a, v, theta_a, theta_v, threshold, n_min, p_max, a_count, v_count, count)
    _check_context(*args, active, inplace, merge_heads, counts_in, row_active)
    spikes, count_out = _fake_outputs(a, v, count, inplace)
    return (heads_merged(spikes) if merge_heads else spikes), count_out


def exact_context(
    a: torch.Tensor,
    v: torch.Tensor,
    theta_a: torch.Tensor,
    theta_v: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    a_count: torch.Tensor | None = None,
    v_count: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    *,
    active: torch.Tensor | None = None,
    inplace: bool = False,
    merge_heads: bool = False,
    counts_in: bool = False,
    row_active: torch.Tensor | None = None,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-mode attention context: the context product and the neuron after it, fused
    (SPEC.md §5, §9.2-§9.4).

    State: the neuron's ``count`` (int8, fresh 0). The running counts ``A`` (attention) and
    ``V`` (values) are their neurons' counts, which the op takes after these steps
    (``a_count``, ``v_count``); their counts before the steps are those less the spikes.
    The running context is not state either: ``Z = A @ V`` of the counts, so each call
    starts from ``Z = A_{-1} @ V_{-1}`` (exact, int32). Per step::

        Z += a_t @ V_t + A_{t-1} @ v_t                  # exact, int32 (V_t: after step t)
        y  = fl32(fl32(theta_a * theta_v) * fl32(Z))    # exact_math.context_value
        target = clamp(floor(y / theta + 1/2), n_min, p_max)
        sigma  = sign(target - count);  count += sigma;  out_t = sigma

    i.e. ``target_spikes`` (§9.3) on ``context_value`` of ``RunningSpikeMatmul``'s product,
    bit for bit (two roundings, a correctly rounded division). Only the int8 spikes and the
    final count are produced.

    Args:
        a: ``[T, *batch, M, N]`` int8 ternary attention spikes, any strides. ``N <= 65535``.
        v: ``[T, *batch, N, D]`` int8 ternary value spikes, any strides (a head-split view
            is read in place).
        theta_a, theta_v: one-element float tensors, the steps of the attention and value
            neurons (read as float32 on the device).
        threshold: one-element float tensor ``theta``, the output neuron's step.
        n_min, p_max: Python ints, ``n_min <= 0 <= p_max``, inside int8's ``[-128, 127]``
            (the output neuron is signed: ``-(level // 2), level // 2 - 1``).
        a_count, v_count: optional int8 counts ``[*batch, M, N]`` and ``[*batch, N, D]``
            (any strides) of the attention and value neurons after these steps; None: that
            count was 0 before them. The starting ``Z`` is the product of the counts before
            the steps; with either None it is 0.
        count: optional incoming int8 neuron count ``[*batch, M, D]``.
        active: optional int32 ``[T, B]`` per-sample flags, ``B`` the spikes' dim 1, set in
            place as the kernel writes the spikes (``target_spikes``' contract). Not returned.
        inplace: write the new ``count`` into the given one (required, contiguous, sharing
            no memory with an input) and return that same tensor (``ops._inplace``): a state
            at a fixed address, as a CUDA graph replays it.
        merge_heads: return the spikes with the last batch dim (the heads, ``H``) merged
            into the channels, ``[T, *batch[:-1], M, H * D]``: what the attention's
            projection reads. The kernel writes them there, no copy.
        counts_in: ``a`` and ``v`` are the running counts ``A_t``, ``V_t`` of the attention
            and value neurons after each step (int8, any strides; the ``counts_out`` of
            ``exact_attention_probs`` and ``exact_linear``), not their spikes; ``a_count``
            and ``v_count`` must be None. Then ``Z = A_t @ V_t`` at each step, the same
            integers as the running sum.
        row_active: optional int32 zeros, one flag per step and row of the spikes
            (``[T, *batch, M]``, with ``merge_heads`` ``[T, *batch[:-1], M]``), contiguous,
            set in place where a row fires: the truth on the PyTorch paths; the Triton kernel
            flags every row of a block of query rows whose neuron fired (a superset, at the
            granularity ``exact_linear`` skips at). What the projection takes as
            ``s_row_active``. Never cleared.
        validate: on a GPU also run the data checks (host syncs): the three thresholds
            positive, finite and normal; the spikes ternary; every running count, from the
            count before the steps on, inside int8 (spikes only); ``count`` inside ``[n_min,
            p_max]``. On CPU they always run.

    Returns:
        ``(spikes [T, *batch, M, D] int8, count)`` (with ``merge_heads`` the spikes
        ``[T, *batch[:-1], M, H * D]``), fresh tensors (with ``inplace``: the given
        ``count``, updated), so chunked time (feeding the count back, with each chunk's
        ``a_count``/``v_count``) equals a whole run bit for bit.

    Dispatch: CUDA tensors run the Triton kernel (one program per batch entry and block of
    query rows, all head channels in one tile, the keys in slices; ``Z`` formed from the
    incoming counts, then the T loop inside with ``Z`` and the count in registers; int8
    tensor-core products, silent spike tiles skipped) when ``D <= 64``, the PyTorch path
    otherwise; CPU tensors run vectorised PyTorch (the Triton kernel under
    ``TRITON_INTERPRET=1``); ``force_backend("reference")`` runs ``reference.exact_context``.
    Inference only: no autograd.
    """
    args = (a, v, theta_a, theta_v, threshold, n_min, p_max, a_count, v_count, count)
    _check_context(*args, active, inplace, merge_heads, counts_in, row_active)
    scalars = ((theta_a, "theta_a"), (theta_v, "theta_v"), (threshold, "threshold"))
    check_data(a, v, "a", "v", a_count, v_count, scalars, validate, counts_in)
    check_in_bounds(count, "count", n_min, p_max, validate)
    out = call_op("exact_context", *args, active, inplace, merge_heads, counts_in, row_active)
    return own_state(out, (1,), (count,)) if inplace else out


# ---------------------------------------------------------------------------------------------
# the whole of it: scores product + softmax + attention neuron + context product + neuron


def _check_attention(
    q, k_t, v, gain, attn_threshold, attn_n_min, attn_p_max, theta_a, theta_v, threshold, n_min,
    p_max, attn_count, count, attn_active, active, inplace, merge_heads, qkv_active=None,
    row_active=None, attn_row_settled=None, row_settled=None, count_before=None,
    attn_tally=None, tally=None,
) -> None:  # fmt: skip
    """Metadata checks (no data read)."""
    check_flag(merge_heads, "merge_heads")
    check_product(q, k_t, "q", "k_t", None, None)
    attn_shape = (q.shape[0], *q.shape[1:-1], k_t.shape[-1])
    check_tensor(v, "v", dtypes=(torch.int8,), min_ndim=3)
    check_time_major(v, "v")
    check_same_device("q", q, "v", v)
    if tuple(v.shape[:-1]) != (q.shape[0], *q.shape[1:-2], k_t.shape[-1]):
        raise ValueError(
            f"v must be [T, *batch, N, DV] with q's T and batch dims and k_t's N keys: "
            f"expected {(q.shape[0], *q.shape[1:-2], k_t.shape[-1], 'DV')}, got "
            f"{tuple(v.shape)}"
        )
    if k_t.shape[-1] > MAX_CONTRACTION:
        raise ValueError(
            f"the context product contracts N={k_t.shape[-1]} keys; at most {MAX_CONTRACTION} "
            "keep it exact"
        )
    if merge_heads and q.dim() < 4:
        raise ValueError(
            "merge_heads=True merges the last batch dim (the heads) into the channels: "
            f"q needs one, [T, *batch, M, D], got shape {tuple(q.shape)}"
        )
    check_scalar_tensor(gain, "gain", q, "q", (torch.float32,))
    for t, name in ((attn_threshold, "attn_threshold"), (theta_a, "theta_a"),
                    (theta_v, "theta_v"), (threshold, "threshold")):  # fmt: skip
        check_threshold(t, name, None, q, "q")
    check_bounds(attn_n_min, attn_p_max, names=("attn_n_min", "attn_p_max"))
    check_bounds(n_min, p_max)
    out_shape = (*q.shape[1:-1], v.shape[-1])
    check_state(attn_count, "attn_count", attn_shape[1:], (torch.int8,), q, "q")
    check_state(count, "count", out_shape, (torch.int8,), q, "q")
    if (attn_count is None) != (count is None):
        raise ValueError(
            "attn_count and count go together: both neurons' counts (a later call), or "
            "neither (a fresh run)"
        )
    check_active(attn_active, attn_shape, q, "q", "attn_active")
    check_active(active, (q.shape[0], *out_shape), q, "q")
    if qkv_active is not None:
        check_tensor(qkv_active, "qkv_active", dtypes=(torch.int32,))
        want = (q.shape[0], *q.shape[1:-2], 3)
        if tuple(qkv_active.shape) != want:
            raise ValueError(
                f"qkv_active must be [T, *batch, 3] (q's steps and batch dims; q, k, v), "
                f"expected {want}, got {tuple(qkv_active.shape)}"
            )
        check_same_device("q", q, "qkv_active", qkv_active)
    batch = q.shape[1:-3] if merge_heads else q.shape[1:-2]  # the spikes' (heads merged)
    check_row_active(row_active, (q.shape[0], *batch, q.shape[-2], v.shape[-1]), q, "q")
    _check_settled_flags(q, attn_row_settled, row_settled)
    if (attn_tally is None) != (tally is None):
        raise ValueError("attn_tally and tally go together: both neurons' totals, or neither")
    check_tally(attn_tally, q.shape[0], q, "q", "attn_tally")
    check_tally(tally, q.shape[0], q, "q", "tally")
    # (the flags and the tallies may be shared between the two neurons: set or added to)
    inputs = (q, k_t, v, gain, attn_threshold, theta_a, theta_v, threshold, attn_active, active,
              qkv_active, row_active, attn_tally, tally)  # fmt: skip
    spikes_step = (*batch, q.shape[-2], v.shape[-1] * (q.shape[-3] if merge_heads else 1))
    check_count_before(count_before, spikes_step, q, "q")
    written = (("attn_row_settled", attn_row_settled), ("row_settled", row_settled),
               ("count_before", count_before))  # fmt: skip
    check_inplace(inplace, (("attn_count", attn_count), ("count", count)), inputs, written)


def _check_settled_flags(q, attn_row_settled, row_settled) -> None:
    """The settled flags: int32 ``[*batch, M]`` (one per query row), both or neither,
    contiguous and apart (the op writes them)."""
    if (attn_row_settled is None) != (row_settled is None):
        raise ValueError(
            "attn_row_settled and row_settled go together: both neurons' flags, or neither"
        )
    if attn_row_settled is None:
        return
    for flags, name in ((attn_row_settled, "attn_row_settled"), (row_settled, "row_settled")):
        check_tensor(flags, name, dtypes=(torch.int32,))
        if tuple(flags.shape) != tuple(q.shape[1:-1]):
            raise ValueError(
                f"{name} must have shape {tuple(q.shape[1:-1])} (one flag per query row: q's "
                f"batch dims and M), got {tuple(flags.shape)}"
            )
        check_same_device("q", q, name, flags)
        if not flags.is_contiguous():
            raise ValueError(f"{name} must be contiguous: the op writes it in place")


def _check_qkv_active(q, k_t, v, qkv_active, validate: bool) -> None:
    """Data check of ``qkv_active`` (CPU always, a GPU with ``validate``): nonzero wherever
    its operand's running count differs from the step before. (The first step's step before
    is not in the op's input: without settled flags a kernel reads every operand there
    whatever the flag, with them ``_check_settled`` checks what it skips.)"""
    if qkv_active is None or q.shape[0] < 2 or not may_read_data(qkv_active, validate):
        return
    for i, (x, name) in enumerate(((q, "q"), (k_t, "k_t"), (v, "v"))):
        moved = (x[1:] != x[:-1]).flatten(-2).any(dim=-1)
        if bool((moved & (qkv_active[1:, ..., i] == 0)).any()):
            raise ValueError(
                f"qkv_active[..., {i}] is 0 at a step where {name} changed: the flags must "
                f"be set wherever {name}'s neuron fired (exact_linear's group_active)"
            )


def exact_attention_torch(
    q, k_t, v, gain, attn_threshold, attn_n_min, attn_p_max, theta_a, theta_v, threshold, n_min,
    p_max, attn_count, count, attn_active=None, active=None, attn_row_settled=None,
    row_settled=None, attn_tally=None, tally=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Vectorised PyTorch (any device, any shape): the two ops' PyTorch paths in a row, the
    attention neuron's counts between them."""
    a, new_attn = exact_attention_probs_torch(
        q, k_t, gain, attn_threshold, attn_n_min, attn_p_max, None, None, attn_count,
        attn_active, counts_in=True, counts_out=True,
    )  # fmt: skip
    spikes, count = exact_context_torch(
        a, v, theta_a, theta_v, threshold, n_min, p_max, None, None, count, active, counts_in=True
    )
    _record_settled(attn_row_settled, row_settled, a, attn_count, spikes)
    _record_tallies(attn_tally, tally, a, attn_count, spikes)
    return spikes, new_attn, count


def _record_tallies(attn_tally, tally, a, attn_before, spikes) -> None:
    """Each step's spikes of the attention neuron (its counts ``a`` after each step,
    ``attn_before`` before them) and of the context neuron added to the tallies (the paths
    without the kernel)."""
    if attn_tally is not None and a.numel():
        record_tally(attn_tally, spikes_of_counts(a, attn_before))
    record_tally(tally, spikes)


def _record_settled(attn_row_settled, row_settled, a, attn_before, spikes) -> None:
    """The settled flags of the last step, in place (the paths without the kernel): 1 where
    the query row's attention neuron (its counts ``a`` after each step, ``attn_before``
    before them) and the context neuron (``spikes``, heads not merged) did not fire."""
    record_settled(attn_row_settled, a, attn_before, counts=True)
    record_settled(row_settled, spikes, None, counts=False)


def _check_settled(
    q, k_t, v, gain, attn_threshold, attn_n_min, attn_p_max, theta_a, theta_v, threshold, n_min,
    p_max, attn_count, count, qkv_active, attn_row_settled, row_settled, validate,
) -> None:  # fmt: skip
    """Data check of the settled flags (CPU always, a GPU with ``validate``; read only with
    ``qkv_active``): where a row is flagged settled and its operands did not move at the first
    step, its neuron must not fire there (the kernel skips it). One step of the op."""
    if attn_row_settled is None or qkv_active is None or attn_count is None:
        return
    if not may_read_data(attn_row_settled, validate) or q.shape[0] == 0:
        return
    first = (q[:1], k_t[:1], v[:1])
    spikes, attn_after, _ = exact_attention_torch(
        *first, gain, attn_threshold, attn_n_min, attn_p_max, theta_a, theta_v, threshold,
        n_min, p_max, attn_count, count,
    )  # fmt: skip
    attn_fired = (attn_after != attn_count).any(dim=-1)  # [*batch, M]
    still = qkv_active[0, ..., None] == 0  # [*batch, 3, 1]: q, k, v as before these steps
    if bool(((attn_row_settled != 0) & still[..., 0, :] & still[..., 1, :] & attn_fired).any()):
        raise ValueError(
            "attn_row_settled marks a row whose attention neuron fires at the first step "
            "though q and k did not move: a 1 promises that the row did not fire at the step "
            "before these (give the flags the last call wrote, or None)"
        )
    context_fired = (spikes[0] != 0).any(dim=-1)
    if bool(((row_settled != 0) & still[..., 2, :] & ~attn_fired & context_fired).any()):
        raise ValueError(
            "row_settled marks a row whose context neuron fires at the first step though v "
            "and its attention counts did not move: a 1 promises that the row did not fire at "
            "the step before these (give the last call's row_active, as 0 where it fired, or "
            "None)"
        )


def _fused_attention_fits(q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Triton kernel takes the shape: the scores kernel's and the context
    kernel's limits together."""
    return fused_probs_fits(q, k_t) and fused_context_fits(q, v)


@kernel_op(
    "exact_attention",
    mutates_args=(
        "attn_count",
        "count",
        "attn_active",
        "active",
        "row_active",
        "attn_row_settled",
        "row_settled",
        "count_before",
        "attn_tally",
        "tally",
    ),
    check=_check_attention,
)
def _exact_attention_op(
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
    attn_count: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    attn_active: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
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
    args = (q, k_t, v, gain, attn_threshold, attn_n_min, attn_p_max, theta_a, theta_v,
            threshold, n_min, p_max, attn_count, count)  # fmt: skip
    backend = backend_for(q, ("triton", "torch"))
    if backend == "triton" and _fused_attention_fits(q, k_t, v):
        from spikekernels.kernels.exact_attention import exact_attention_triton

        out = exact_attention_triton(
            launcher, *args, attn_active, active, inplace=inplace, merge_heads=merge_heads,
            qkv_active=qkv_active, row_active=row_active, attn_row_settled=attn_row_settled,
            row_settled=row_settled, count_before=count_before, attn_tally=attn_tally,
            tally=tally,
        )  # fmt: skip
        if inplace:
            return out[0], placeholder(attn_count), placeholder(count)
        return out
    if count_before is not None:  # laid out as the spikes are
        merged = count is not None and merge_heads
        fill_count_before(count_before, heads_merged(count[None])[0] if merged else count)
    if backend == "reference":
        from spikekernels import reference

        a, new_attn = reference.exact_attention_probs(
            q, k_t, gain, attn_threshold, attn_n_min, attn_p_max, None, None, attn_count,
            counts_in=True, counts_out=True,
        )  # fmt: skip
        record_active_of(attn_active, a, attn_count, counts=True)
        spikes, new_count = reference.exact_context(
            a, v, theta_a, theta_v, threshold, n_min, p_max, None, None, count, counts_in=True
        )
        record_active(active, spikes)
        _record_settled(attn_row_settled, row_settled, a, attn_count, spikes)
        _record_tallies(attn_tally, tally, a, attn_count, spikes)
    else:
        spikes, new_attn, new_count = exact_attention_torch(
            *args, attn_active, active, attn_row_settled, row_settled, attn_tally, tally
        )
    if merge_heads:
        spikes = heads_merged(spikes)
    record_row_active(row_active, spikes)
    return (
        spikes,
        state_result(inplace, new_attn, attn_count),
        state_result(inplace, new_count, count),
    )


@_exact_attention_op.register_fake
def _(
    q, k_t, v, gain, attn_threshold, attn_n_min, attn_p_max, theta_a, theta_v, threshold, n_min,
    p_max, attn_count=None, count=None, attn_active=None, active=None, inplace=False,
    merge_heads=False, qkv_active=None, row_active=None, attn_row_settled=None,
    row_settled=None, count_before=None, attn_tally=None, tally=None,
):  # fmt: skip
    args = (q, k_t, v, gain, attn_threshold, attn_n_min, attn_p_max, theta_a, theta_v,
            threshold, n_min, p_max, attn_count, count)  # fmt: skip
    rows = (row_active, attn_row_settled, row_settled, count_before, attn_tally, tally)
    _check_attention(*args, attn_active, active, inplace, merge_heads, qkv_active, *rows)
    steps, *batch, m, _ = q.shape
    spikes = q.new_empty((steps, *batch, m, v.shape[-1]), dtype=torch.int8)
    spikes = heads_merged(spikes) if merge_heads else spikes
    if inplace:
        return spikes, placeholder(attn_count), placeholder(count)
    attn = q.new_empty((*batch, m, k_t.shape[-1]), dtype=torch.int8)
    return spikes, attn, q.new_empty((*batch, m, v.shape[-1]), dtype=torch.int8)


def exact_attention(
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
    attn_count: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    *,
    attn_active: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    inplace: bool = False,
    merge_heads: bool = False,
    qkv_active: torch.Tensor | None = None,
    row_active: torch.Tensor | None = None,
    attn_row_settled: torch.Tensor | None = None,
    row_settled: torch.Tensor | None = None,
    count_before: torch.Tensor | None = None,
    attn_tally: torch.Tensor | None = None,
    tally: torch.Tensor | None = None,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact-mode self-attention between ``qkv`` and ``proj``, fused: the scores product, the
    softmax, the attention neuron, the context product and its neuron, on running counts
    (SPEC.md §5, §9.2-§9.4).

    ``exact_attention_probs(q, k_t, ..., counts_in=True, counts_out=True)`` then
    ``exact_context(a, v, ..., counts_in=True)``, bit for bit, without the attention
    neuron's counts ``[T, *batch, M, N]`` ever leaving the kernel: a program keeps its
    queries' row of them in registers and multiplies it with ``V_t`` there. Per step::

        S = Q_t @ K_t                                   # exact, int32
        attention neuron on softmax_rows(fl32(g * fl32(S)))  ->  A_t (its count)
        Z = A_t @ V_t                                   # exact, int32
        y = fl32(fl32(theta_a * theta_v) * fl32(Z));  context neuron on y  ->  out_t

    Args:
        q, k_t, v: int8 running counts after each step of the q, k and v neurons, ``[T,
            *batch, M, D]``, ``[T, *batch, D, N]``, ``[T, *batch, N, DV]`` (any strides;
            ``exact_linear``'s ``counts_out``, as views of the qkv layout).
        gain: one-element float32 score gain (``exact_math.score_gain``).
        attn_threshold, attn_n_min, attn_p_max: the attention neuron's step and bounds.
        theta_a, theta_v: the steps in the context value (the attention and value neurons').
        threshold, n_min, p_max: the context neuron's step and bounds.
        attn_count, count: the two neurons' incoming int8 counts, ``[*batch, M, N]`` and
            ``[*batch, M, DV]``: both (a later call) or neither (fresh).
        attn_active, active: optional int32 ``[T, B]`` flags of the two neurons
            (``target_spikes``' contract), set in place.
        inplace: write the new counts into the given ones (both required, contiguous).
        merge_heads: the spikes ``[T, *batch[:-1], M, H * DV]``, as ``proj`` reads them.
        qkv_active: optional int32 ``[T, *batch, 3]`` (any strides), read only: nonzero
            wherever q's, k's or v's neuron (index 0, 1, 2) fired at step ``t`` in that batch
            entry, i.e. wherever its running count differs from the step before (at the
            first step: the last call's last; read there only with the settled flags)
            (``exact_linear``'s ``group_active`` of the qkv layer, one group per head's q, k
            and v, viewed). Then a step whose q and k did not change reads neither (the
            scores are the last step's), one whose v and attention counts did not change
            skips the context product, and one where none of q, k and v changed does not
            read v either: late steps mostly read only these flags. A flag may be set
            where nothing changed; a zero where something did is refused on CPU (and on a
            GPU with ``validate``): it would skip a change.
        row_active: optional int32, one flag per step and row of the spikes (``[T, *batch,
            M]``; with ``merge_heads`` ``[T, *batch[:-1], M]``), contiguous: ``active`` per
            row, set in place where the row fires (never cleared). The Triton kernel sets
            every row of a block of queries whose context neuron fired (a superset); the
            other paths from the spikes. ``proj`` takes them as ``exact_linear``'s
            ``s_row_active``.
        attn_row_settled, row_settled: optional int32 ``[*batch, M]`` (one per query row,
            heads not merged), both or neither, contiguous, read and then written in place:
            1 where the row's attention (context) neuron did not fire at the step before
            these (0 promises nothing), and on return the same of the last of these steps
            (the Triton kernel: 0 on every row of a block of queries that fired), which the
            next call reads. They are read with the incoming counts and ``qkv_active``, whose
            first step then says whether q, k and v moved since that step: a block of settled
            rows whose operands did not move skips its neurons from the first step, as at
            every later one (without the flags the first step forms the products and runs
            both neurons: a late chunk's whole cost where the attention has settled).
            Checked on CPU (and on a GPU with ``validate``): a settled row whose neuron fires
            at the first step although its operands did not move is refused.
        count_before: optional int8, shaped as one step of the spikes (with ``merge_heads``
            ``[*batch[:-1], M, H * DV]``), contiguous, written: the context neuron's count
            before these steps (``count`` as it comes in, heads merged as the spikes; zeros
            when fresh), which ``proj`` takes as ``s_before``. The Triton kernel copies each
            count tile as it reads it: no clone and transpose of its own.
        attn_tally, tally: optional int64 ``[T]``, both or neither, contiguous: the number of
            spikes (nonzero, over every sample) that the attention (context) neuron fires at
            each step, added in place; the two may be one tensor (then both neurons'). For a
            counter (``evaluate.SpikeCounter``) of the attention neuron's spikes, which never
            leave the kernel: its programs add their tiles' totals (an integer atomic add
            per program and step that fired, exact in any order), so a counted run keeps
            the fused kernel.
        validate: on a GPU also check the thresholds and the gain, that the incoming counts
            lie inside their bounds, ``qkv_active`` and the settled flags (host syncs); on
            CPU always.

    Returns:
        ``(spikes, attn_count, count)``: the context neuron's int8 spikes and the two new
        counts (with ``inplace``: the given ones, updated).

    Dispatch: CUDA tensors run one Triton kernel (per batch entry and block of 16 queries:
    all keys, the head's value channels; int8 wgmma for both products, the T loop inside,
    both counts in registers) when ``N <= 256`` and ``DV <= 64``, else the two ops' PyTorch
    paths in a row; CPU tensors run those (the Triton kernel under ``TRITON_INTERPRET=1``);
    ``force_backend("reference")`` runs the two oracles in a row. Inference only.
    """
    args = (q, k_t, v, gain, attn_threshold, attn_n_min, attn_p_max, theta_a, theta_v,
            threshold, n_min, p_max, attn_count, count)  # fmt: skip
    rows = (row_active, attn_row_settled, row_settled, count_before, attn_tally, tally)
    _check_attention(*args, attn_active, active, inplace, merge_heads, qkv_active, *rows)
    for t, name in ((gain, "gain"), (attn_threshold, "attn_threshold"), (theta_a, "theta_a"),
                    (theta_v, "theta_v"), (threshold, "threshold")):  # fmt: skip
        check_threshold_values(t, name, validate)
    check_in_bounds(attn_count, "attn_count", attn_n_min, attn_p_max, validate)
    check_in_bounds(count, "count", n_min, p_max, validate)
    _check_qkv_active(q, k_t, v, qkv_active, validate)
    _check_settled(*args, qkv_active, attn_row_settled, row_settled, validate)
    out = call_op(
        "exact_attention", *args, attn_active, active, inplace, merge_heads, qkv_active, *rows
    )
    return own_state(out, (1, 2), (attn_count, count)) if inplace else out

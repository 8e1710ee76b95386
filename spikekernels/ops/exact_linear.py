"""``torch.ops.spikekernels.exact_linear``: integer-weight linear fused with the target-driven
neuron (exact mode, SPEC.md §9.2-§9.4)."""

from __future__ import annotations

import math

import torch

from spikekernels.exact_math import INT32_MAX_TERMS, int_matmul, linear_value
from spikekernels.ops._activity import record_active_of, record_settled
from spikekernels.ops._checks import (
    check_active,
    check_bounds,
    check_flag,
    check_group_active,
    check_in_bounds,
    check_row_active,
    check_rows_flagged,
    check_same_device,
    check_state,
    check_tensor,
    check_ternary,
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
from spikekernels.ops.target import target_spikes_torch

# acc = q_in @ W^T with |q_in| <= 128 and |W| <= 127 stays inside int32 while K < 2^17; the
# same bound keeps every per-step sum of the float32 CPU path (|.| <= 127 K) below 2^24.
MAX_K = INT32_MAX_TERMS


def _check_exact_linear(
    s,
    weight,
    weight_scale,
    bias,
    in_threshold,
    threshold,
    n_min,
    p_max,
    s_count,
    count,
    active,
    inplace,
    counts_out,
    s_before=None,
    group_active=None,
    row_active=None,
    s_row_active=None,
    row_settled=None,
    count_before=None,
) -> None:
    """Metadata checks (no data read)."""
    check_flag(counts_out, "counts_out")
    if s_count is not None and s_before is not None:
        raise ValueError(
            "give s_count (the input count after these steps) or s_before (before them), not both"
        )
    check_tensor(s, "s", dtypes=(torch.int8,))
    check_time_major(s, "s")
    if s.dim() < 2:
        raise ValueError(f"s must be [T, *, K] with at least 2 dims, got shape {tuple(s.shape)}")
    check_tensor(weight, "weight", dtypes=(torch.int8,), ndim=2)
    check_same_device("s", s, "weight", weight)
    n, k = weight.shape
    if s.shape[-1] != k:
        raise ValueError(
            f"s has K={s.shape[-1]} input features (last dim) but weight [N, K] has K={k}"
        )
    if k > MAX_K:
        raise ValueError(
            f"weight has K={k} input features; at most {MAX_K} keep the int32 accumulator exact"
        )
    check_tensor(weight_scale, "weight_scale", dtypes=(torch.float32,), ndim=1)
    if weight_scale.shape[0] != n:
        raise ValueError(
            f"weight_scale must have shape ({n},) (weight's N), got {tuple(weight_scale.shape)}"
        )
    check_same_device("s", s, "weight_scale", weight_scale)
    if bias is not None:
        check_tensor(bias, "bias", dtypes=(torch.float32,), ndim=1)
        if bias.shape[0] != n:
            raise ValueError(f"bias must have shape ({n},) (weight's N), got {tuple(bias.shape)}")
        check_same_device("s", s, "bias", bias)
    check_threshold(in_threshold, "in_threshold", None, s, "s")
    check_threshold(threshold, "threshold", n, s, "s")
    check_bounds(n_min, p_max)
    shape = (*s.shape[1:-1], n)
    check_state(s_count, "s_count", s.shape[1:], (torch.int8,), s, "s")
    check_state(s_before, "s_before", s.shape[1:], (torch.int8,), s, "s")
    check_state(count, "count", shape, (torch.int8,), s, "s")
    check_active(active, (s.shape[0], *shape), s, "s")
    check_group_active(group_active, (s.shape[0], *shape), s, "s")
    check_row_active(row_active, (s.shape[0], *shape), s, "s")
    check_row_active(s_row_active, s.shape, s, "s", "s_row_active", written=False)
    if row_settled is not None:
        check_tensor(row_settled, "row_settled", dtypes=(torch.int32,))
        if row_settled.shape != s.shape[1:-1]:
            raise ValueError(
                f"row_settled must have shape {tuple(s.shape[1:-1])} (one flag per row of the "
                f"output), got {tuple(row_settled.shape)}"
            )
        check_same_device("s", s, "row_settled", row_settled)
        if not row_settled.is_contiguous():
            raise ValueError("row_settled must be contiguous: the op writes it in place")
    check_count_before(count_before, shape, s, "s")
    inputs = (s, weight, weight_scale, bias, in_threshold, threshold, s_count, s_before, active,
              group_active, row_active, s_row_active)  # fmt: skip
    written = (("row_settled", row_settled), ("count_before", count_before))
    check_inplace(inplace, (("count", count),), inputs, written)


def _count_before(s: torch.Tensor, s_count: torch.Tensor) -> torch.Tensor:
    """The input count before these steps, ``s_count - sum_t s_t``, as int32."""
    return s_count.to(torch.int32) - s.sum(0, dtype=torch.int32)


def _input_before(s, s_count, s_before) -> torch.Tensor | None:
    """The input count before these steps from ``s_count`` or ``s_before`` (None: fresh)."""
    return _count_before(s, s_count) if s_count is not None else s_before


def _value(acc, in_threshold, weight_scale, bias) -> torch.Tensor:
    """The linear's current value of ``acc`` (SPEC.md §9.2), ``m = fl32(theta_in * ws)``."""
    return linear_value(acc, in_threshold.to(torch.float32).reshape(()) * weight_scale, bias)


def _check_data(
    s, weight, weight_scale, in_threshold, threshold, s_count, validate, s_before=None
) -> None:
    """Data checks: on CPU tensors always, on a GPU when ``validate`` (host syncs)."""
    check_threshold_values(in_threshold, "in_threshold", validate)
    check_threshold_values(threshold, "threshold", validate)
    check_ternary(s, "s", validate)
    if s_count is not None and may_read_data(s_count, validate):
        before = _count_before(s, s_count)
        if bool(((before < -128) | (before > 127)).any()):
            raise ValueError(
                "s_count less the spikes of s is not an int8 count: s_count must be the input "
                "neuron's count after these steps"
            )
    if s_before is not None and may_read_data(s_before, validate):
        after = s_before.to(torch.int32) + s.sum(0, dtype=torch.int32)
        if bool(((after < -128) | (after > 127)).any()):
            raise ValueError(
                "s_before plus the spikes of s is not an int8 count: s_before must be the "
                "input neuron's count before these steps"
            )
    if may_read_data(weight_scale, validate):
        if not bool((torch.isfinite(weight_scale) & (weight_scale > 0)).all()):
            raise ValueError("weight_scale must be finite and positive (SPEC.md §9.1)")
    if may_read_data(weight, validate) and bool((weight == -128).any()):
        raise ValueError("weight must lie in [-127, 127] (symmetric int8, SPEC.md §9.1)")


def _check_settled(
    s, weight, weight_scale, bias, in_threshold, threshold, n_min, p_max, s_count, count,
    s_before, row_settled, validate,
) -> None:  # fmt: skip
    """Data check of ``row_settled`` (CPU always, a GPU with ``validate``): a row flagged
    settled must hold no neuron that moves on the accumulator before these steps (the kernel
    may skip its tile's neuron while its input is silent). One dense step of the layer."""
    if row_settled is None or not may_read_data(row_settled, validate):
        return
    before = _input_before(s, s_count, s_before)
    if before is None:
        before = torch.zeros(s.shape[1:], dtype=torch.int32, device=s.device)
    value = _value(int_matmul(before, weight.t())[None], in_threshold, weight_scale, bias)
    sigma, _ = target_spikes_torch(value, threshold, n_min, p_max, count)
    if bool(((row_settled != 0) & (sigma[0] != 0).any(dim=-1)).any()):
        raise ValueError(
            "row_settled marks a row whose neurons are not at their targets before these "
            "steps: a 1 promises that none moves while its input is silent (give the layer's "
            "own row_active of the step before these, as 0 where it fired, or None)"
        )


def exact_linear_torch(
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
    counts_out: bool = False,
    s_before: torch.Tensor | None = None,
    group_active: torch.Tensor | None = None,
    row_active: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised PyTorch (any device): one float32 matmul over all ``T * rows`` rows, a
    cumulative sum over T in int32 plus the starting ``(s_count - sum_t s_t) @ W^T``
    (``exact_math.int_matmul``), the value formula, then the target neuron (sequential in T,
    vectorised per step), which records ``active`` (and ``group_active``, ``row_active`` from
    its spikes).

    Exact: every partial sum of ``s_t @ W^T`` is an integer of magnitude ``<= 127 K < 2^24``,
    so the float32 matmul is exact in any order (TF32 or bf16 operands hold int8 exactly too),
    and the running sums are integer arithmetic.
    """
    n, k = weight.shape
    steps, lead = s.shape[0], s.shape[1:-1]
    rows = math.prod(lead)
    step = torch.matmul(s.reshape(steps * rows, k).to(torch.float32), weight.to(torch.float32).t())
    acc_t = torch.cumsum(step.to(torch.int32).reshape(steps, *lead, n), dim=0, dtype=torch.int32)
    before = _input_before(s, s_count, s_before)
    if before is not None:
        acc_t += int_matmul(before, weight.t())
    value = _value(acc_t, in_threshold, weight_scale, bias)
    out = target_spikes_torch(value, threshold, n_min, p_max, count, active, counts_out)
    record_active_of(None, out[0], count, counts_out, group_active, row_active)
    return out


@kernel_op(
    "exact_linear",
    mutates_args=("count", "active", "group_active", "row_active", "row_settled", "count_before"),
    check=_check_exact_linear,
)
def _exact_linear_op(
    s: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_threshold: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    s_count: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    inplace: bool = False,
    counts_out: bool = False,
    s_before: torch.Tensor | None = None,
    group_active: torch.Tensor | None = None,
    row_active: torch.Tensor | None = None,
    s_row_active: torch.Tensor | None = None,
    row_settled: torch.Tensor | None = None,
    count_before: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (s, weight, weight_scale, bias, in_threshold, threshold, n_min, p_max, s_count, count)
    backend = backend_for(s, ("triton", "torch"))
    if backend == "triton":
        from spikekernels.kernels.exact_linear import exact_linear_triton

        n, k = weight.shape
        lead = s.shape[1:-1]
        rows = math.prod(lead)
        given = s_count if s_before is None else s_before
        s_count_in = None if given is None else given.contiguous().reshape(rows, k)
        count_in = None if count is None else count.contiguous().reshape(rows, n)
        spikes, count_out = exact_linear_triton(
            launcher,
            s.contiguous().reshape(s.shape[0], rows, k),
            weight.contiguous(),
            weight_scale.contiguous(),
            None if bias is None else bias.contiguous(),
            in_threshold,
            threshold,
            n_min,
            p_max,
            s_count_in,
            count_in,
            active,
            inplace=inplace,
            counts_out=counts_out,
            s_before=s_before is not None,
            group_active=group_active,
            row_active=None if row_active is None else row_active.view(s.shape[0], rows),
            s_row_active=(
                None if s_row_active is None else s_row_active.contiguous().view(s.shape[0], rows)
            ),
            row_settled=None if row_settled is None else row_settled.view(rows),
            count_before=None if count_before is None else count_before.view(rows, n),
        )
        shape = (*lead, n)
        spikes = spikes.reshape(s.shape[0], *shape)
        return spikes, placeholder(count) if inplace else count_out.reshape(shape)
    fill_count_before(count_before, count)
    if backend == "reference":
        from spikekernels import reference

        out = reference.exact_linear(*args, counts_out, s_before)
        record_active_of(active, out[0], count, counts_out, group_active, row_active)
    else:
        out = exact_linear_torch(*args, active, counts_out, s_before, group_active, row_active)
    record_settled(row_settled, out[0], count, counts_out)
    return out[0], state_result(inplace, out[1], count)


@_exact_linear_op.register_fake
def _(
    s,
    weight,
    weight_scale,
    bias,
    in_threshold,
    threshold,
    n_min,
    p_max,
    s_count=None,
    count=None,
    active=None,
    inplace=False,
    counts_out=False,
    s_before=None,
    group_active=None,
    row_active=None,
    s_row_active=None,
    row_settled=None,
    count_before=None,
):
    args = (s, weight, weight_scale, bias, in_threshold, threshold, n_min, p_max, s_count, count)
    flags = (group_active, row_active, s_row_active, row_settled, count_before)
    _check_exact_linear(*args, active, inplace, counts_out, s_before, *flags)
    shape = (*s.shape[1:-1], weight.shape[0])
    return (
        s.new_empty((s.shape[0], *shape), dtype=torch.int8),
        placeholder(count) if inplace else s.new_empty(shape, dtype=torch.int8),
    )


def exact_linear(
    s: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_threshold: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    s_count: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    *,
    active: torch.Tensor | None = None,
    inplace: bool = False,
    counts_out: bool = False,
    s_before: torch.Tensor | None = None,
    group_active: torch.Tensor | None = None,
    row_active: torch.Tensor | None = None,
    s_row_active: torch.Tensor | None = None,
    row_settled: torch.Tensor | None = None,
    count_before: torch.Tensor | None = None,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-mode spiking linear layer fused with its output neuron (SPEC.md §9.2-§9.4).

    State: the output neuron's ``count`` (int8, fresh 0). The accumulator ``acc = q_in @
    W_int^T`` of the input counts is not state: it starts at the input count before these
    steps times ``W^T``, and that count is ``s_count`` (the input neuron's count after these
    steps, which its own op has just written) less the spikes of ``s``. So a layer reads no
    int32 state and writes none. Then per step ``t``::

        acc += s_t @ W^T                                  # exact, int32
        m[n] = fl32(theta_in * ws[n])
        y    = fl32(fl32(m[n] * fl32(acc)) + b[n])        # two roundings, no FMA
        target = clamp(floor(y / theta + 1/2), n_min, p_max)
        sigma  = sign(target - count);  count += sigma;  out_t = sigma

    i.e. ``target_spikes`` (§9.3) on the linear's current value (§9.2). Only the int8 spikes
    and the final ``count`` are produced; the float value never leaves the kernel.

    Args:
        s: ``[T, *, K]`` int8 ternary spikes of the input neuron.
        weight: ``[N, K]`` int8 integer weight ``W_int`` (SPEC.md §9.1: ``|w| <= 127``),
            ``K <= 2^17 - 1`` (the int32 accumulator stays exact).
        weight_scale: ``[N]`` float32 per-output-channel scale ``ws`` (positive).
        bias: ``[N]`` float32 or None.
        in_threshold: one-element float tensor ``theta_in``, the step of the neuron feeding
            ``s`` (read as float32 on the device).
        threshold: the output neuron's ``theta``: one element, or ``[N]`` per output channel
            (one qkv output feeding the q, k and v neurons). Read as float32 on the device.
        n_min, p_max: Python ints, ``n_min <= 0 <= p_max``, inside int8's ``[-128, 127]``.
        s_count: optional int8 ``[*, K]``: the count of the neuron that produced ``s``, after
            these steps (so ``s_count - sum_t s_t`` is its count before them, an int8 count:
            checked on CPU, on a GPU with ``validate``). None: ``s`` has no earlier steps
            (the same as ``s.sum(0)``).
        count: optional incoming state ``[*, N]`` int8 (fresh when None).
        active: optional int32 ``[T, B]`` per-sample flags, ``B = s.shape[1]``, set in place
            as the kernel writes the spikes (``target_spikes``' contract: ``active[t, b] = 1``
            where sample ``b`` fires at step ``t``, never cleared). Not returned.
        inplace: write the new ``count`` into the given one (required, contiguous, sharing no
            memory with an input) and return that same tensor (``ops._inplace``): a state at
            a fixed address, as a CUDA graph replays it.
        counts_out: return the neuron's count after each step, ``[T, *, N]`` int8 (the
            running count, what ``exact_attention_probs`` and ``exact_context`` take with
            ``counts_in``), in place of its spikes. The same bytes as the spikes: a reader
            that needs the running counts then needs no pass to form them.
        s_before: the input neuron's count *before* these steps, ``[*, K]`` int8, in place of
            ``s_count`` (give one or neither): the starting accumulator is then its product
            directly, and the kernel's prologue does not read the chunk's spikes back to
            subtract them (T reads of the input less per chunk, for one copy of that count
            the caller takes before the input neuron's call).
        group_active: optional int32 ``[T, B, G]``: ``active`` per group of ``N / G``
            adjacent output channels (``group_active[t, b, g] = 1`` where sample ``b`` fires
            at step ``t`` in group ``g``; never cleared), set in place. The Triton kernel
            sets it per output tile that fired, for every sample and group the tile overlaps
            (a superset: a tile that straddles two samples sets both); the other paths from
            the spikes. With one group per head's q, k and v (a qkv layer), they are
            ``exact_attention``'s ``qkv_active``.
        row_active: optional int32 ``[T, *]`` (the spikes' shape without ``N``): ``active``
            per row, set in place (``row_active[t, *r] = 1`` where row ``r`` fires at step
            ``t``; never cleared). The Triton kernel sets every row of an output tile that
            fired (a superset, at the granularity the next ``exact_linear`` skips at); the
            other paths from the spikes. The next ``exact_linear`` takes them as
            ``s_row_active``.
        s_row_active: optional int32 ``[T, *]`` (``s``'s shape without ``K``), read only: the
            input neuron's ``row_active``. A 0 promises that the row of ``s`` is silent at that
            step (checked on CPU, and with ``validate``; 1 may stand for a silent row). The
            Triton path then finds its silent row tiles from these flags (4 bytes a row-step)
            instead of scanning the spikes (up to K bytes a row-step); the other paths ignore
            them. No bit of the result depends on them.
        row_settled: optional int32 ``[*]`` (the output's shape without ``N``), contiguous,
            read and then written in place. Read: nonzero where the row's output neurons sit
            at their targets before these steps (on the accumulator of the input count
            before them, each neuron's target equals its count: none would move while the
            row's input stays silent); 0 promises nothing. The flags this op wrote at the
            layer's last call are such a promise where this call's input continues that
            call's (its input count before these steps is the one that call's spikes summed
            to; not where a hook replaced spikes in between: give zeros then). Checked on
            CPU, and with ``validate`` (one dense step of the layer). The Triton path then
            skips the neuron of a tile whose rows are settled until its input first spikes,
            and a tile that stays settled and silent for the whole call reads no weight and
            no count: it writes zero spikes (with ``counts_out`` its unchanged count) and
            passes its count through. The other paths ignore them. No bit of the result
            depends on a true one. Written: 1 where no neuron of the row fired at the last
            of these steps, which the next call reads (the Triton kernel: 0 on every row of
            an output tile that fired, as ``row_active``; on a fresh call too). So a layer
            keeps them as state with no pass of its own.
        count_before: optional int8 ``[*, N]`` (``count``'s shape), contiguous, written: the
            output neuron's count before these steps (``count`` as it comes in, zeros when
            fresh), which the next layer takes as ``s_before``. The Triton kernel copies each
            count tile as it reads it: no clone of its own (a launch and a read) before a call
            that updates the count in place.
        validate: on a GPU also run the data checks (host syncs): thresholds positive, finite
            and normal; ``weight_scale`` finite and positive; ``weight`` in ``[-127, 127]``;
            ``s`` ternary; ``s_count`` consistent with ``s``; ``count`` inside ``[n_min,
            p_max]``; ``s_row_active`` 0 only on silent rows; ``row_settled`` nonzero only on
            settled rows. On CPU they always run.

    Returns:
        ``(spikes [T, *, N] int8, count [*, N] int8)``, fresh tensors (with ``inplace``: the
        given ``count``, updated), so chunked time (feeding ``count`` back, and the input
        neuron's count as ``s_count``) equals a whole run bit for bit.

    Exactness: bit-identical to ``reference.exact_linear`` on every path and device. ``acc``
    is integer arithmetic (int8 tensor cores on a GPU; exact float32 and float64 matmuls on
    the CPU), the value has the two roundings above, and the neuron divides correctly rounded.

    Dispatch (``ops._dispatch.backend_for``): CUDA tensors run the Triton kernel (one program
    per row and output tile: a prologue forms the starting ``acc`` from ``s_count`` less the
    chunk's spikes, K tile by K tile, skipping tiles of zero counts; then the T loop with
    ``acc`` and ``count`` in registers, steps whose spike tile is all zero skip the matmul);
    CPU tensors run vectorised PyTorch (the Triton kernel under ``TRITON_INTERPRET=1``);
    ``force_backend("reference")`` runs the oracle. Inference only: no autograd.
    """
    args = (s, weight, weight_scale, bias, in_threshold, threshold, n_min, p_max, s_count, count)
    flags = (group_active, row_active, s_row_active, row_settled, count_before)
    _check_exact_linear(*args, active, inplace, counts_out, s_before, *flags)
    _check_data(s, weight, weight_scale, in_threshold, threshold, s_count, validate, s_before)
    check_rows_flagged(s, s_row_active, "s_row_active", "s", validate)
    check_in_bounds(count, "count", n_min, p_max, validate)
    _check_settled(*args, s_before, row_settled, validate)
    out = call_op("exact_linear", *args, active, inplace, counts_out, s_before, *flags)
    return own_state(out, (1,), (count,)) if inplace else out

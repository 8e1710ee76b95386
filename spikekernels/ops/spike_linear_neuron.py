"""``torch.ops.spikekernels.spike_linear_neuron``: spike linear fused with the ST-BIF neuron
it feeds (float mode, SPEC.md §6 then §2). The neuron state ``(v, count)`` comes back fresh,
or with ``inplace=True`` written into the given tensors (``ops._inplace``)."""

from __future__ import annotations

import math

import torch

from spikekernels.ops._activity import record_active
from spikekernels.ops._checks import (
    FLOAT_DTYPES,
    check_active,
    check_finite_weight,
    check_flag,
    check_in_bounds,
    check_ternary,
    check_threshold,
    check_threshold_values,
)
from spikekernels.ops._dispatch import backend_for
from spikekernels.ops._inplace import check_inplace, own_state, placeholder, state_result
from spikekernels.ops._registry import call_op, kernel_op, launcher
from spikekernels.ops.neuron import check_neuron_state, neuron_count_dtype
from spikekernels.ops.spike_linear import (
    bias_share,
    check_linear_inputs,
    check_weight,
    due_steps,
    float32_weight,
    spike_linear_torch,
    tensor_core_weight,
    weight_offsets_fit,
)


def _check_spike_linear_neuron(
    s, weight, in_threshold, threshold, n_min, p_max, bias, t0, bias_steps, v, count, active,
    inplace,
) -> torch.dtype:  # fmt: skip
    """Metadata checks (no data read); returns the dtype of the outgoing count."""
    if isinstance(weight, torch.Tensor) and weight.dtype == torch.int8:
        raise TypeError(
            "weight is int8: integer weights are exact mode's; use ops.exact_linear "
            "(fused with the target-driven neuron) instead"
        )
    check_weight(weight, FLOAT_DTYPES)
    n = check_linear_inputs(s, weight, in_threshold, bias, t0, bias_steps)
    check_threshold(threshold, "threshold", n, s, "s")
    shape = (*s.shape[1:-1], n)
    check_active(active, (s.shape[0], *shape), s, "s")
    count_dtype = check_neuron_state(n_min, p_max, v, count, shape, s, "s")
    inputs = (s, weight, in_threshold, threshold, bias, active)
    check_inplace(inplace, (("v", v), ("count", count)), inputs)
    return count_dtype


def spike_linear_neuron_torch(
    s,
    weight,
    in_threshold,
    threshold,
    n_min,
    p_max,
    bias,
    t0,
    bias_steps,
    v,
    count,
    float_out,
    active,
):
    """Vectorised PyTorch (any device): ``spike_linear``'s float32 matmul a step, then the
    ST-BIF op on ``y / theta`` with threshold 1.

    A per-channel ``theta`` runs the neuron on ``y / theta`` with threshold 1: the same bits,
    since ``v + (y / theta) / 1`` is ``v + y / theta`` (dividing by 1 is exact), so it needs no
    per-channel neuron.
    """
    y = spike_linear_torch(s, weight, in_threshold, bias, t0, bias_steps, None)
    theta = threshold.to(torch.float32)
    if theta.numel() == 1:
        theta = theta.reshape(())
        u, neuron_theta = y, theta
    else:
        u, neuron_theta = y / theta, torch.ones((), dtype=torch.float32, device=s.device)
    spikes, v_out, count_out = call_op(
        "st_bif", u, neuron_theta, n_min, p_max, v, count, False, active
    )
    if float_out:
        spikes = spikes.to(torch.float32) * theta
    return spikes, v_out, count_out


@kernel_op(
    "spike_linear_neuron",
    mutates_args=("v", "count", "active"),
    check=_check_spike_linear_neuron,
)
def _spike_linear_neuron_op(
    s: torch.Tensor,
    weight: torch.Tensor,
    in_threshold: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    bias: torch.Tensor | None = None,
    t0: int = 0,
    bias_steps: int = 1,
    v: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    float_out: bool = False,
    active: torch.Tensor | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (s, weight, in_threshold, threshold, n_min, p_max, bias, t0, bias_steps, v, count)
    count_dtype = neuron_count_dtype(n_min, p_max, count)
    backend = backend_for(s, ("triton", "torch"))
    if backend == "triton" and weight_offsets_fit(weight):
        from spikekernels.kernels.spike_linear_neuron import spike_linear_neuron_triton

        n, k = weight.shape[-2:]
        lead = s.shape[1:-1]
        rows = math.prod(lead)
        spikes, v_out, count_out = spike_linear_neuron_triton(
            launcher,
            s.contiguous().reshape(s.shape[0], rows, k),
            tensor_core_weight(weight),
            in_threshold,
            threshold,
            n_min,
            p_max,
            bias_share(bias, bias_steps),
            due_steps(t0, s.shape[0], bias_steps),
            None if v is None else v.contiguous().reshape(rows, n),
            None if count is None else count.contiguous().reshape(rows, n),
            float_out,
            count_dtype,
            active,
            inplace=inplace,  # v, count: views of the given (contiguous) state then
        )
        shape = (*lead, n)
        spikes = spikes.reshape(s.shape[0], *shape)
        if inplace:
            return spikes, placeholder(v), placeholder(count)
        return spikes, v_out.reshape(shape), count_out.reshape(shape)
    if backend == "reference":
        from spikekernels import reference

        spikes, v_out, count_out = reference.spike_linear_neuron(
            s, float32_weight(weight), *args[2:], float_out=float_out
        )
        record_active(active, spikes)
        count_out = count_out.to(count_dtype)
    else:
        spikes, v_out, count_out = spike_linear_neuron_torch(*args, float_out, active)
    return spikes, state_result(inplace, v_out, v), state_result(inplace, count_out, count)


@_spike_linear_neuron_op.register_fake
def _(
    s,
    weight,
    in_threshold,
    threshold,
    n_min,
    p_max,
    bias=None,
    t0=0,
    bias_steps=1,
    v=None,
    count=None,
    float_out=False,
    active=None,
    inplace=False,
):
    args = (s, weight, in_threshold, threshold, n_min, p_max, bias, t0, bias_steps, v, count)
    count_dtype = _check_spike_linear_neuron(*args, active, inplace)
    shape = (*s.shape[1:-1], weight.shape[-2])
    spikes = s.new_empty((s.shape[0], *shape), dtype=torch.float32 if float_out else torch.int8)
    if inplace:
        return spikes, placeholder(v), placeholder(count)
    return spikes, s.new_empty(shape, dtype=torch.float32), s.new_empty(shape, dtype=count_dtype)


def spike_linear_neuron(
    s: torch.Tensor,
    weight: torch.Tensor,
    in_threshold: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    bias: torch.Tensor | None = None,
    *,
    t0: int = 0,
    bias_steps: int = 1,
    v: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    float_out: bool = False,
    active: torch.Tensor | None = None,
    inplace: bool = False,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spike linear fused with the ST-BIF neuron it feeds (float mode: SPEC.md §6, then §2).

    Per step ``t`` (global step ``t0 + t``), per output element::

        y  = fl32(theta_in * (s_t @ W^T))  (+ bias_share on global steps < bias_steps)
        v  = v + y / theta                                  # correctly rounded division
        sigma = +1 if v >= 1 and count < p_max; -1 if v < 0 and count > n_min; else 0
        count += sigma;  v -= sigma;  out_t = sigma  (or sigma * theta)

    i.e. ``spike_linear`` then ``st_bif``, without the float32 ``[T, *, N]`` linear output
    in memory: ``v`` and ``count`` stay in registers for the whole chunk on a GPU.

    Args:
        s: ``[T, *, K]`` int8 ternary spikes of the input neuron.
        weight: ``[N, K]`` float32, float16 or bfloat16; or ``[3, N, K]`` bfloat16, the three
            bf16 parts of a float32 weight, from ``split_weight_bf16x3`` (split once per
            layer; a 2-D float32 weight is split on every GPU call). int8 weights are exact
            mode's: ``TypeError``, use ``exact_linear``.
        in_threshold: one-element float tensor ``theta_in``, the feeding neuron's threshold.
        threshold: the output neuron's ``theta``: one element, or ``[N]`` per output channel
            (one qkv linear feeding the q, k and v neurons: three thresholds, each repeated
            over its channel block). Read as float32 on the device (no host sync).
        n_min, p_max: integer count bounds, ``n_min <= 0 <= p_max`` (``levels.level_bounds``).
        bias: optional ``[N]`` float bias, as ``spike_linear``: all at global step 0
            (``bias_steps == 1``), else ``bias / bias_steps`` on each global step
            ``< bias_steps``.
        t0: global index of this chunk's first step (for the bias schedule).
        v, count: optional incoming neuron state ``[*, N]`` (both or neither): ``v`` float32,
            ``count`` an integer dtype. Fresh: ``v = 0.5``, count 0 with dtype
            ``levels.count_dtype(n_min, p_max)``.
        float_out: spikes as ``sigma * theta`` float32 instead of int8.
        active: optional int32 ``[T, B]`` flags (``B = s.shape[1]``), set in place, never
            cleared: ``active[t, b] = 1`` when any output neuron of sample ``b`` (the
            ``b``-th of ``B`` equal blocks of a step's rows) fires at step ``t``. The kernel
            records it while it writes the spikes (no extra pass). Not returned.
        inplace: write the new state into the given ``v`` and ``count`` (both required,
            contiguous, sharing no memory with an input or each other; the count keeps its
            dtype) and return those same tensors (``ops._inplace``): a state at a fixed
            address, as a CUDA graph replays it.
        validate: on a GPU also run the data checks (host syncs): thresholds positive,
            finite and normal; ``s`` ternary; a float ``weight`` finite; ``count`` inside the
            bounds. On CPU they always run.

    Returns:
        ``(spikes [T, *, N], v [*, N] float32, count [*, N])``, fresh tensors, never an alias
        of the given ``v``/``count`` (with ``inplace``: the given ``v`` and ``count``,
        updated), so chunked time (feeding ``v``, ``count`` back and advancing ``t0``) equals
        a whole run bit for bit.

    Exactness: ``spike_linear``'s: every product is exact and the sums are float32 in a
    blocked order (tensor cores on a GPU; a float32 weight as three bf16 dots of its exact
    split), so bit-identical to ``reference.spike_linear_neuron`` whenever the linear's sums
    are exact (e.g. dyadic weights ``k / 2^8`` with small ``k``), else within float32
    summation error of ``y`` (a neuron may then flip on a rounding tie). The neuron itself is
    SPEC.md §2 exactly: given ``y``, bit for bit.

    Dispatch (``ops._dispatch.backend_for``): CUDA tensors run the Triton kernel (one program
    per row and output tile, the T loop inside, silent spike tiles skip the matmul; a weight
    too big for its int32 offsets, ``spike_linear.weight_offsets_fit``: the CPU path); CPU
    tensors run a float32 matmul a step and the ST-BIF op (the Triton kernel under
    ``TRITON_INTERPRET=1``); ``force_backend("reference")`` runs the oracle. Inference only.
    """
    args = (s, weight, in_threshold, threshold, n_min, p_max, bias, t0, bias_steps, v, count)
    _check_spike_linear_neuron(*args, active, inplace)
    check_flag(float_out, "float_out")
    check_threshold_values(in_threshold, "in_threshold", validate)
    check_threshold_values(threshold, "threshold", validate)
    check_finite_weight(weight, validate)
    check_ternary(s, "s", validate)
    check_in_bounds(count, "count", n_min, p_max, validate)
    out = call_op("spike_linear_neuron", *args, float_out, active, inplace)
    return own_state(out, (1, 2), (v, count)) if inplace else out

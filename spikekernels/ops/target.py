"""``torch.ops.spikekernels.target_spikes``: the target-driven neuron (exact mode, SPEC.md §9.3)."""

from __future__ import annotations

import torch

from spikekernels.ops._activity import record_active
from spikekernels.ops._checks import (
    FLOAT_DTYPES,
    check_active,
    check_bounds,
    check_in_bounds,
    check_state,
    check_tensor,
    check_threshold,
    check_threshold_values,
    check_time_major,
)
from spikekernels.ops._dispatch import backend_for
from spikekernels.ops._inplace import check_inplace, own_state, placeholder, state_result
from spikekernels.ops._registry import call_op, kernel_op, launcher


def _check_target_spikes(value, threshold, n_min, p_max, count, active, inplace) -> None:
    """Metadata checks (no data read)."""
    check_tensor(value, "value", dtypes=FLOAT_DTYPES)
    check_time_major(value, "value")
    channels = value.shape[-1] if value.dim() >= 2 else None
    check_threshold(threshold, "threshold", channels, value, "value")
    check_bounds(n_min, p_max)
    check_state(count, "count", value.shape[1:], (torch.int8,), value, "value")
    check_active(active, value.shape, value, "value")
    check_inplace(inplace, (("count", count),), (value, threshold, active))


def target_spikes_torch(
    value: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    count: torch.Tensor | None,
    active: torch.Tensor | None = None,
    counts_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised PyTorch (any device): the targets of all T steps in one pass (elementwise,
    so the same bits as step by step), then the sequential count update, one step at a time;
    ``active`` (``[T, B]`` int32 or None) records which samples fired (``record_active``).
    ``counts_out``: the count after each step comes out in place of the spikes."""
    theta = threshold.to(torch.float32)
    theta = theta.reshape(()) if theta.numel() == 1 else theta
    # torch.clamp keeps NaN, and NaN compares false both ways below: sigma = 0
    target = torch.floor(value.to(torch.float32) / theta + 0.5).clamp_(n_min, p_max)
    c = torch.zeros(value.shape[1:], dtype=torch.float32, device=value.device)
    if count is not None:
        c = count.to(torch.float32)
    spikes = torch.empty(value.shape, dtype=torch.int8, device=value.device)
    counts = torch.empty_like(spikes) if counts_out else None
    for t in range(value.shape[0]):
        sigma = (target[t] > c).to(torch.int8) - (target[t] < c).to(torch.int8)
        spikes[t] = sigma
        c = c + sigma
        if counts_out:
            counts[t] = c
    record_active(active, spikes)
    return spikes if counts is None else counts, c.to(torch.int8)


@kernel_op("target_spikes", mutates_args=("count", "active"), check=_check_target_spikes)
def _target_spikes_op(
    value: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    count: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    backend = backend_for(value, ("triton", "torch"))
    if backend == "triton":
        from spikekernels.kernels.target import target_spikes_triton

        spikes, count_out = target_spikes_triton(
            launcher, value, threshold, n_min, p_max, count, active, inplace=inplace
        )
        return spikes, placeholder(count) if inplace else count_out
    if backend == "reference":
        from spikekernels import reference

        out = reference.target_spikes(value, threshold, n_min, p_max, count)
        record_active(active, out[0])
    else:
        out = target_spikes_torch(value, threshold, n_min, p_max, count, active)
    return out[0], state_result(inplace, out[1], count)


@_target_spikes_op.register_fake
def _(value, threshold, n_min, p_max, count=None, active=None, inplace=False):
    _check_target_spikes(value, threshold, n_min, p_max, count, active, inplace)
    spikes = value.new_empty(value.shape, dtype=torch.int8)
    if inplace:
        return spikes, placeholder(count)
    return spikes, value.new_empty(value.shape[1:], dtype=torch.int8)


def target_spikes(
    value: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    count: torch.Tensor | None = None,
    *,
    active: torch.Tensor | None = None,
    inplace: bool = False,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-step target-driven neuron (SPEC.md §9.3), all T steps in one fused kernel on GPU.

    The state is the count ``c`` only. Per element and step, with the *current value* ``y_t``
    of the neuron's input (not an increment)::

        target = clamp(floor(y_t / theta + 1/2), n_min, p_max)   # float32
        sigma  = sign(target - c);  c = c + sigma;  out_t = sigma

    ``y_t / theta`` is a correctly rounded float32 division and the rounding is half up,
    exactly as ``spikekernels.levels.quantize``. At most one spike per element per step; the
    neuron is silent when ``target == c``. With a value held constant at ``y`` the count
    reaches ``clamp(floor(y / theta + 1/2), n_min, p_max)`` within ``p_max - n_min`` steps
    and stays there. A NaN value gives ``sigma = 0`` (the count holds): non-finite inputs are
    the caller's (the runner's) to handle; ``+-inf`` drives the count to a bound.

    Args:
        value: ``[T, *shape]`` float32, float16 or bfloat16 current values (math in float32).
        threshold: float tensor read on the device (no ``.item()``): one element, or ``[C]``
            per channel with ``C == value.shape[-1]`` (one qkv output feeding the q, k and v
            neurons: three thresholds, each repeated over its channel block). Read as float32.
        n_min, p_max: Python ints, ``n_min <= 0 <= p_max``, inside int8's ``[-128, 127]``
            (levels up to 128 unsigned, 256 signed); otherwise a ValueError.
        count: optional incoming int8 count ``[*shape]``; fresh is 0.
        active: optional int32 ``[T, B]`` flags, ``B = value.shape[1]``, set in place (never
            cleared): ``active[t, b] = 1`` when any neuron of sample ``b`` fires at step
            ``t``; sample ``b`` owns the ``b``-th of ``B`` equal blocks of one step's rows
            (``value``'s dims 1 to -2, flattened).
            The fused kernel records it as it writes the spikes (no extra pass), so a runner
            can tell when a sample falls silent. Not returned.
        inplace: write the new count into the given ``count`` (required, contiguous,
            sharing no memory with an input) and return that same tensor
            (``ops._inplace``): a state at a fixed address, as a CUDA graph replays it.
        validate: check on a GPU too (a host sync) that the threshold is positive, finite
            and normal, and the incoming ``count`` inside ``[n_min, p_max]``. On CPU always.

    Returns:
        ``(spikes [T, *shape] int8 in {-1, 0, 1}, count [*shape] int8)``, fresh tensors (never
        an alias of ``count``; with ``inplace``: the given ``count``, updated), so chunked
        time (feeding the count back) equals a whole run bit for bit.

    Dispatch (``ops._dispatch.backend_for``): CUDA tensors run the Triton kernel (the T loop
    inside, the count in registers); CPU tensors run vectorised PyTorch (the Triton kernel
    under ``TRITON_INTERPRET=1``); ``force_backend("reference")`` runs
    ``reference.target_spikes``. Bit-exact with the reference on every path and device.
    Inference only: no autograd.
    """
    _check_target_spikes(value, threshold, n_min, p_max, count, active, inplace)
    check_threshold_values(threshold, "threshold", validate)
    check_in_bounds(count, "count", n_min, p_max, validate)
    out = call_op("target_spikes", value, threshold, n_min, p_max, count, active, inplace)
    return own_state(out, (1,), (count,)) if inplace else out

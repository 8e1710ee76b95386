"""``torch.ops.spikekernels.exact_residual_add``: a branch's spikes added to exact mode's
residual stream (SPEC.md §9.2, §9.4) in one pass."""

from __future__ import annotations

import torch

from spikekernels.ops._checks import (
    check_same_device,
    check_scalar_tensor,
    check_state,
    check_tensor,
    check_ternary,
    check_threshold_values,
    check_time_major,
)
from spikekernels.ops._dispatch import backend_for
from spikekernels.ops._registry import call_op, kernel_op, launcher


def _check_exact_residual_add(d, spikes, threshold, count) -> None:
    """Metadata checks (no data read)."""
    check_tensor(spikes, "spikes", dtypes=(torch.int8,))
    check_time_major(spikes, "spikes")
    if d is not None:
        check_tensor(d, "d", dtypes=(torch.float64,))
        if d.shape != spikes.shape:
            raise ValueError(
                f"d must have the shape of spikes {tuple(spikes.shape)}, got {tuple(d.shape)}"
            )
        check_same_device("spikes", spikes, "d", d)
    check_scalar_tensor(threshold, "threshold", spikes, "spikes")
    check_state(count, "count", spikes.shape[1:], (torch.int8,), spikes, "spikes")


def exact_residual_add_torch(
    d: torch.Tensor | None,
    spikes: torch.Tensor,
    threshold: torch.Tensor,
    count: torch.Tensor | None,
) -> torch.Tensor:
    """Vectorised PyTorch (any device): the running counts as an int32 cumulative sum, then
    ``d + theta * count`` over all T steps at once (elementwise: the bits of step by step).
    The product and the sum are formed in place, operands swapped (IEEE ``*`` and ``+``
    commute bit for bit)."""
    counts = torch.cumsum(spikes, dim=0, dtype=torch.int32)
    if count is not None:
        counts += count
    out = counts.to(torch.float64).mul_(threshold.to(torch.float64).reshape(()))
    return out if d is None else out.add_(d)


@kernel_op("exact_residual_add")
def _exact_residual_add_op(
    d: torch.Tensor | None,
    spikes: torch.Tensor,
    threshold: torch.Tensor,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    _check_exact_residual_add(d, spikes, threshold, count)
    backend = backend_for(spikes, ("triton", "torch"))
    if backend == "triton":
        from spikekernels.kernels.exact_residual import exact_residual_add_triton

        return exact_residual_add_triton(launcher, spikes, d, threshold, count)
    if backend == "reference":
        from spikekernels import reference

        return reference.exact_residual_add(d, spikes, threshold, count)
    return exact_residual_add_torch(d, spikes, threshold, count)


@_exact_residual_add_op.register_fake
def _(d, spikes, threshold, count=None):
    _check_exact_residual_add(d, spikes, threshold, count)
    return spikes.new_empty(spikes.shape, dtype=torch.float64)


def exact_residual_add(
    d: torch.Tensor | None,
    spikes: torch.Tensor,
    threshold: torch.Tensor,
    count: torch.Tensor | None = None,
    *,
    validate: bool = False,
) -> torch.Tensor:
    """Exact mode's residual update for one branch (SPEC.md §9.2, §9.4), all T steps in one
    pass: per element and step::

        count_t = count + sum_{tau <= t} spikes[tau]         # int32, exact
        out[t]  = d[t] + fl64(theta) * fl64(count_t)         # float64, one rounding each

    ``theta`` is the branch neuron's step (attention's ``proj``, the MLP's ``fc2``, the patch
    neuron) and ``count`` its count before these steps, so ``out`` is the residual stream's
    spike-driven part ``D`` after the branch. The product is exact and, while the residual
    steps span at most 2^16 (``convert`` checks it), so is the sum.

    Args:
        d: ``[T, *shape]`` float64, ``D`` before the branch at each step (current values), or
            None: then ``out[t] = fl64(theta) * fl64(count_t)`` (no add).
        spikes: ``[T, *shape]`` int8 in ``{-1, 0, 1}``, the branch neuron's spikes.
        threshold: one-element float tensor on the device (no host sync), converted to
            float64 exactly.
        count: optional int8 ``[*shape]``, the neuron's count before the first of these steps
            (fresh: 0). Its count after them is the neuron's own (``TargetNeuron.count``), so
            it is not returned.
        validate: also check on a GPU (a host sync) that the threshold is positive, finite
            and a normal float32 and the spikes are ternary; on CPU always.

    Returns:
        ``out`` ``[T, *shape]`` float64, a fresh tensor: chunked time (feeding ``count``
        back) equals a whole run bit for bit.

    Exactness: bit-identical to ``reference.exact_residual_add`` and to
    ``d + theta.double() * (count + spikes.cumsum(0)).double()`` on every path and device.

    Dispatch (``ops._dispatch.backend_for``): CUDA tensors run the Triton kernel (one program
    per block of elements, the T loop inside with the count in registers: 17 bytes of memory
    traffic per element and step, 9 without ``d``); CPU tensors run vectorised PyTorch (the
    Triton kernel under ``TRITON_INTERPRET=1``); ``force_backend("reference")`` runs the
    oracle. Inference only: no autograd.
    """
    _check_exact_residual_add(d, spikes, threshold, count)
    check_threshold_values(threshold, "threshold", validate)
    check_ternary(spikes, "spikes", validate)
    return call_op("exact_residual_add", d, spikes, threshold, count)

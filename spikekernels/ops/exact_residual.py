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


def _check_exact_residual_add(d, branch_spikes, branch_threshold, branch_count) -> None:
    """Metadata checks (no data read)."""
    check_tensor(branch_spikes, "branch_spikes", dtypes=(torch.int8,))
    check_time_major(branch_spikes, "branch_spikes")
    if d is not None:
        check_tensor(d, "d", dtypes=(torch.float64,))
        if d.shape != branch_spikes.shape:
            raise ValueError(
                f"d must have the shape of branch_spikes {tuple(branch_spikes.shape)}, got "
                f"{tuple(d.shape)}"
            )
        check_same_device("branch_spikes", branch_spikes, "d", d)
    check_scalar_tensor(branch_threshold, "branch_threshold", branch_spikes, "branch_spikes")
    check_state(
        branch_count,
        "branch_count",
        branch_spikes.shape[1:],
        (torch.int8,),
        branch_spikes,
        "branch_spikes",
    )


def exact_residual_add_torch(
    d: torch.Tensor | None,
    branch_spikes: torch.Tensor,
    branch_threshold: torch.Tensor,
    branch_count: torch.Tensor | None,
) -> torch.Tensor:
    """Vectorised PyTorch (any device): the running counts as an int32 cumulative sum, then
    ``d + theta * count`` over all T steps at once (elementwise: the bits of step by step).
    The product and the sum are formed in place, operands swapped (IEEE ``*`` and ``+``
    commute bit for bit)."""
    counts = torch.cumsum(branch_spikes, dim=0, dtype=torch.int32)
    if branch_count is not None:
        counts += branch_count
    out = counts.to(torch.float64).mul_(branch_threshold.to(torch.float64).reshape(()))
    return out if d is None else out.add_(d)


@kernel_op("exact_residual_add", check=_check_exact_residual_add)
def _exact_residual_add_op(
    d: torch.Tensor | None,
    branch_spikes: torch.Tensor,
    branch_threshold: torch.Tensor,
    branch_count: torch.Tensor | None = None,
) -> torch.Tensor:
    backend = backend_for(branch_spikes, ("triton", "torch"))
    if backend == "triton":
        from spikekernels.kernels.exact_residual import exact_residual_add_triton

        return exact_residual_add_triton(launcher, branch_spikes, d, branch_threshold, branch_count)
    if backend == "reference":
        from spikekernels import reference

        return reference.exact_residual_add(d, branch_spikes, branch_threshold, branch_count)
    return exact_residual_add_torch(d, branch_spikes, branch_threshold, branch_count)


@_exact_residual_add_op.register_fake
def _(d, branch_spikes, branch_threshold, branch_count=None):
    _check_exact_residual_add(d, branch_spikes, branch_threshold, branch_count)
    return branch_spikes.new_empty(branch_spikes.shape, dtype=torch.float64)


def exact_residual_add(
    d: torch.Tensor | None,
    branch_spikes: torch.Tensor,
    branch_threshold: torch.Tensor,
    branch_count: torch.Tensor | None = None,
    *,
    validate: bool = False,
) -> torch.Tensor:
    """Exact mode's residual update for one branch (SPEC.md §9.2, §9.4), all T steps in one
    pass: per element and step::

        count_t = branch_count + sum_{tau <= t} branch_spikes[tau]  # int32, exact
        out[t]  = d[t] + fl64(theta) * fl64(count_t)  # float64, one rounding each

    ``theta`` (``branch_threshold``) is the branch neuron's step (attention's ``proj``, the
    MLP's ``fc2``, the patch neuron) and ``branch_count`` its count before these steps, so
    ``out`` is the residual stream's spike-driven part ``D`` after the branch. The product is
    exact and, while the residual steps span at most 2^16 (``convert`` checks it), so is the sum.

    Args:
        d: ``[T, *shape]`` float64, ``D`` before the branch at each step (current values), or
            None: then ``out[t] = fl64(theta) * fl64(count_t)`` (no add).
        branch_spikes: ``[T, *shape]`` int8 in ``{-1, 0, 1}``, the branch neuron's spikes.
        branch_threshold: one-element float tensor on the device (no host sync), converted to
            float64 exactly.
        branch_count: optional int8 ``[*shape]``, the neuron's count before the first of these
            steps (fresh: 0). Its count after them is the neuron's own
            (``TargetNeuron.count``), so it is not returned.
        validate: also check on a GPU (a host sync) that the threshold is positive, finite
            and a normal float32 and the spikes are ternary; on CPU always.

    Returns:
        ``out`` ``[T, *shape]`` float64, a fresh tensor: chunked time (feeding ``branch_count``
        back) equals a whole run bit for bit.

    Exactness: bit-identical to ``reference.exact_residual_add`` and to
    ``d + theta.double() * (branch_count + branch_spikes.cumsum(0)).double()`` on every path
    and device.

    Dispatch (``ops._dispatch.backend_for``): CUDA tensors run the Triton kernel (one program
    per block of elements, the T loop inside with the count in registers: 17 bytes of memory
    traffic per element and step, 9 without ``d``); CPU tensors run vectorised PyTorch (the
    Triton kernel under ``TRITON_INTERPRET=1``); ``force_backend("reference")`` runs the
    oracle. Inference only: no autograd.
    """
    _check_exact_residual_add(d, branch_spikes, branch_threshold, branch_count)
    check_threshold_values(branch_threshold, "branch_threshold", validate)
    check_ternary(branch_spikes, "branch_spikes", validate)
    return call_op("exact_residual_add", d, branch_spikes, branch_threshold, branch_count)

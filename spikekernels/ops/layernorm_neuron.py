"""``torch.ops.spikekernels.spike_layernorm_neuron``: Spike-LayerNorm fused with the ST-BIF
neuron it feeds (float mode, SPEC.md §4 then §2)."""

from __future__ import annotations

import torch

from spikekernels.ops._activity import record_active
from spikekernels.ops._checks import (
    check_active,
    check_float,
    check_in_bounds,
    check_positive,
    check_scalar_tensor,
)
from spikekernels.ops._dispatch import backend_for
from spikekernels.ops._registry import call_op, kernel_op, launcher
from spikekernels.ops.layernorm import check_spike_layernorm
from spikekernels.ops.neuron import check_neuron_state


def _check_spike_layernorm_neuron(
    x, weight, bias, eps, threshold, n_min, p_max, x_acc, y_prev, v, count, active
) -> torch.dtype:
    """Metadata checks (no data read), both ops' own; returns the outgoing count's dtype."""
    check_spike_layernorm(x, weight, bias, eps, x_acc, y_prev)
    check_scalar_tensor(threshold, "threshold", x, "x")
    check_active(active, x.shape, x, "x")
    return check_neuron_state(n_min, p_max, v, count, x.shape[1:], x, "x")


@kernel_op("spike_layernorm_neuron", mutates_args=("active",))
def _spike_layernorm_neuron_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    x_acc: torch.Tensor | None = None,
    y_prev: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (x, weight, bias, eps, threshold, n_min, p_max, x_acc, y_prev, v, count)
    count_dtype = _check_spike_layernorm_neuron(*args, active)
    backend = backend_for(x, ("triton", "torch"))
    if backend == "triton":
        from spikekernels.kernels.layernorm_neuron import spike_layernorm_neuron_triton

        return spike_layernorm_neuron_triton(launcher, *args, count_dtype, active)
    if backend == "reference":
        from spikekernels import reference

        *out, count_out = reference.spike_layernorm_neuron(*args)
        record_active(active, out[0])
        return (*out, count_out.to(count_dtype))
    return spike_layernorm_neuron_torch(*args, active)


def spike_layernorm_neuron_torch(
    x, weight, bias, eps, threshold, n_min, p_max, x_acc, y_prev, v, count, active
):
    """Without the fused kernel: the two ops in turn, each on its own backend for ``x``
    (the LayerNorm's PyTorch path, the neuron's C++ kernel on CPU), so the same bits as
    calling them, at the cost of the ``[T, *, C]`` increments in memory."""
    u, x_acc_out, y_prev_out = call_op("spike_layernorm", x, weight, bias, eps, x_acc, y_prev)
    spikes, v_out, count_out = call_op(
        "st_bif", u, threshold, n_min, p_max, v, count, False, active
    )
    return spikes, x_acc_out, y_prev_out, v_out, count_out


@_spike_layernorm_neuron_op.register_fake
def _(
    x,
    weight,
    bias,
    eps,
    threshold,
    n_min,
    p_max,
    x_acc=None,
    y_prev=None,
    v=None,
    count=None,
    active=None,
):
    args = (x, weight, bias, eps, threshold, n_min, p_max, x_acc, y_prev, v, count)
    count_dtype = _check_spike_layernorm_neuron(*args, active)
    shape = x.shape[1:]
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty(shape, dtype=torch.float32),
        x.new_empty(shape, dtype=torch.float32),
        x.new_empty(shape, dtype=torch.float32),
        x.new_empty(shape, dtype=count_dtype),
    )


def spike_layernorm_neuron(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    x_acc: torch.Tensor | None = None,
    y_prev: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    *,
    active: torch.Tensor | None = None,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spike-LayerNorm fused with the ST-BIF neuron it feeds (float mode: SPEC.md §4, §2).

    Per step, per row of ``C`` channels::

        X = X + x_t;  Y = layer_norm(X, weight, bias, eps);  u = Y - Y_prev;  Y_prev = Y
        v = v + u / theta                                   # correctly rounded division
        sigma = +1 if v >= 1 and count < p_max; -1 if v < 0 and count > n_min; else 0
        count += sigma;  v -= sigma;  out_t = sigma

    i.e. ``spike_layernorm`` then ``st_bif``, bit for bit on every backend (``u`` is rounded
    to ``x.dtype``, as ``spike_layernorm`` returns it), without the ``[T, *, C]`` increments
    in memory: on a GPU one kernel keeps ``X``, ``Y_prev``, ``v`` and the count in registers
    for the whole chunk.

    Args:
        x: ``[T, *, C]`` float32, float16 or bfloat16 increments (math in float32).
        weight, bias: optional ``[C]`` LayerNorm affine parameters; ``eps`` the QANN's.
        threshold: one-element float tensor ``theta``, read on the device (no host sync).
        n_min, p_max: integer count bounds, ``n_min <= 0 <= p_max`` (``levels.level_bounds``).
        x_acc, y_prev: optional incoming LayerNorm state, float32 ``x.shape[1:]``, each
            independently; fresh: zeros (so the first ``u`` is the whole ``layer_norm(x_0)``).
        v, count: optional incoming neuron state ``x.shape[1:]`` (both or neither): ``v``
            float32, ``count`` an integer dtype. Fresh: ``v = 0.5``, count 0 with dtype
            ``levels.count_dtype(n_min, p_max)``.
        active: optional int32 ``[T, B]`` flags (``B = x.shape[1]``), set in place, never
            cleared: ``active[t, b] = 1`` when any neuron of sample ``b`` (the ``b``-th of
            ``B`` equal blocks of a step's rows) fires at step ``t``. The kernel records it
            while it writes the spikes (no extra pass). Not returned.
        validate: on a GPU also run the data checks (host syncs): the threshold positive,
            finite and normal, ``count`` inside the bounds. On CPU they always run.

    Returns:
        ``(spikes [T, *, C] int8, x_acc, y_prev, v, count)``, fresh tensors (never aliases of
        the state given), so chunked time (feeding the state back) equals a whole run.

    Bad input: ``TypeError``/``ValueError`` naming the argument, before dispatch.

    Dispatch (``ops._dispatch.backend_for``): CUDA tensors run the fused Triton kernel;
    CPU tensors run ``spike_layernorm`` and then ``st_bif`` (the fused kernel under
    ``TRITON_INTERPRET=1``); ``force_backend("reference")`` runs the oracle. Inference only.
    """
    eps = check_float(eps, "eps")
    args = (x, weight, bias, eps, threshold, n_min, p_max, x_acc, y_prev, v, count)
    _check_spike_layernorm_neuron(*args, active)
    check_positive(threshold, "threshold", validate)
    check_in_bounds(count, "count", n_min, p_max, validate)
    return call_op("spike_layernorm_neuron", *args, active)

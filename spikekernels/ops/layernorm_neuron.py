"""``torch.ops.spikekernels.spike_layernorm_neuron``: Spike-LayerNorm fused with the ST-BIF
neuron it feeds (float mode, SPEC.md §4 then §2)."""

from __future__ import annotations

import torch

from spikekernels.ops._activity import record_active
from spikekernels.ops._checks import (
    check_active,
    check_float,
    check_in_bounds,
    check_same_device,
    check_scalar_tensor,
    check_tensor,
    check_ternary,
    check_threshold_values,
)
from spikekernels.ops._dispatch import backend_for
from spikekernels.ops._inplace import check_inplace, own_state, placeholder, state_result
from spikekernels.ops._registry import call_op, kernel_op, launcher
from spikekernels.ops.layernorm import check_spike_layernorm
from spikekernels.ops.neuron import check_neuron_state, neuron_count_dtype


def _check_branches(x, branch, branch2, residual_out) -> None:
    """The pending branches ``(spikes, threshold)``: each whole or absent, the second only
    after the first, spikes int8 shaped like ``x`` (float32: the stream's dtype);
    ``residual_out`` needs a branch (without one the stream is ``x`` itself)."""
    if not isinstance(residual_out, bool):
        raise TypeError(f"residual_out must be a bool, got {type(residual_out).__name__}")
    for prefix, (spikes, threshold) in (("branch", branch), ("branch2", branch2)):
        if (spikes is None) != (threshold is None):
            raise ValueError(
                f"{prefix}_spikes and {prefix}_threshold go together (the pending branch's "
                "spikes and its neuron's step)"
            )
        if spikes is None:
            continue
        check_tensor(spikes, f"{prefix}_spikes", dtypes=(torch.int8,))
        if spikes.shape != x.shape:
            raise ValueError(
                f"{prefix}_spikes must have x's shape {tuple(x.shape)}, got {tuple(spikes.shape)}"
            )
        check_same_device("x", x, f"{prefix}_spikes", spikes)
        check_scalar_tensor(threshold, f"{prefix}_threshold", x, "x")
        if x.dtype != torch.float32:
            raise TypeError(
                f"pending branches add to a float32 stream: x must be float32, got {x.dtype}"
            )
    if branch[0] is None:
        if branch2[0] is not None:
            raise ValueError("branch2_spikes needs branch_spikes (the first pending branch)")
        if residual_out:
            raise ValueError("residual_out needs branch_spikes (without one the stream is x)")


def _check_spike_layernorm_neuron(
    x, weight, bias, eps, threshold, n_min, p_max, x_acc, y_prev, v, count, active,
    branch_spikes=None, branch_threshold=None, branch2_spikes=None, branch2_threshold=None,
    residual_out=False, inplace=False,
) -> torch.dtype:  # fmt: skip
    """Metadata checks (no data read), both ops' own; returns the outgoing count's dtype."""
    check_spike_layernorm(x, weight, bias, eps, x_acc, y_prev)
    check_scalar_tensor(threshold, "threshold", x, "x")
    check_active(active, x.shape, x, "x")
    branch, branch2 = (branch_spikes, branch_threshold), (branch2_spikes, branch2_threshold)
    _check_branches(x, branch, branch2, residual_out)
    count_dtype = check_neuron_state(n_min, p_max, v, count, x.shape[1:], x, "x")
    states = (("x_acc", x_acc), ("y_prev", y_prev), ("v", v), ("count", count))
    inputs = (x, weight, bias, threshold, active, *branch, *branch2)
    check_inplace(inplace, states, inputs)
    return count_dtype


def _branches(branch, branch2) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """The given pending branches, in order."""
    return tuple(b for b in (branch, branch2) if b[0] is not None)


def with_branches(x: torch.Tensor, branches) -> torch.Tensor:
    """``x`` plus each branch's ``sigma * theta`` in order, one float32 rounding per add: the
    residual stream the model's adds form (``sigma * theta`` is exact)."""
    for spikes, threshold in branches:
        x = x + spikes.to(torch.float32) * threshold.to(torch.float32).reshape(())
    return x


def _no_residual(x: torch.Tensor) -> torch.Tensor:
    """The op's sixth output without ``residual_out`` (a fixed return schema)."""
    return x.new_empty(0)


_STATE_NAMES = ("x_acc", "y_prev", "v", "count")
_STATE_POSITIONS = (1, 2, 3, 4)  # in the op's outputs


@kernel_op(
    "spike_layernorm_neuron",
    mutates_args=(*_STATE_NAMES, "active"),
    check=_check_spike_layernorm_neuron,
)
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
    branch_spikes: torch.Tensor | None = None,
    branch_threshold: torch.Tensor | None = None,
    branch2_spikes: torch.Tensor | None = None,
    branch2_threshold: torch.Tensor | None = None,
    residual_out: bool = False,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (x, weight, bias, eps, threshold, n_min, p_max, x_acc, y_prev, v, count)
    branch, branch2 = (branch_spikes, branch_threshold), (branch2_spikes, branch2_threshold)
    count_dtype = neuron_count_dtype(n_min, p_max, count)
    branches = _branches(branch, branch2)
    targets = (x_acc, y_prev, v, count)
    backend = backend_for(x, ("triton", "torch"))
    if backend == "triton":
        from spikekernels.kernels.layernorm_neuron import spike_layernorm_neuron_triton

        out = spike_layernorm_neuron_triton(
            launcher, *args, count_dtype, active, branches, residual_out, inplace=inplace
        )
        if inplace:  # the kernel wrote the new state into the given tensors
            return (out[0], *(placeholder(t) for t in targets), out[5])
        return out
    h = with_branches(x, branches)
    if backend == "reference":
        from spikekernels import reference

        *out, count_out = reference.spike_layernorm_neuron(h, *args[1:])
        record_active(active, out[0])
        out = (*out, count_out.to(count_dtype))
    else:
        out = spike_layernorm_neuron_torch(h, *args[1:], active)
    states = (state_result(inplace, fresh, t) for fresh, t in zip(out[1:], targets, strict=True))
    return (out[0], *states, h if residual_out else _no_residual(h))


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
    branch_spikes=None,
    branch_threshold=None,
    branch2_spikes=None,
    branch2_threshold=None,
    residual_out=False,
    inplace=False,
):
    args = (x, weight, bias, eps, threshold, n_min, p_max, x_acc, y_prev, v, count)
    branch, branch2 = (branch_spikes, branch_threshold), (branch2_spikes, branch2_threshold)
    count_dtype = _check_spike_layernorm_neuron(
        *args, active, *branch, *branch2, residual_out, inplace
    )
    shape = x.shape[1:]
    if inplace:
        states = tuple(placeholder(t) for t in (x_acc, y_prev, v, count))
    else:
        states = (
            x.new_empty(shape, dtype=torch.float32),
            x.new_empty(shape, dtype=torch.float32),
            x.new_empty(shape, dtype=torch.float32),
            x.new_empty(shape, dtype=count_dtype),
        )
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        *states,
        x.new_empty(x.shape if residual_out else 0),
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
    branch_spikes: torch.Tensor | None = None,
    branch_threshold: torch.Tensor | None = None,
    branch2_spikes: torch.Tensor | None = None,
    branch2_threshold: torch.Tensor | None = None,
    residual_out: bool = False,
    active: torch.Tensor | None = None,
    inplace: bool = False,
    validate: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Spike-LayerNorm fused with the ST-BIF neuron it feeds (float mode: SPEC.md §4, §2),
    optionally on the residual stream with up to two pending branches.

    Per step, per row of ``C`` channels::

        h_t = x_t (+ branch_t * theta_b) (+ branch2_t * theta_b2)   # in order, float32
        X = X + h_t;  Y = layer_norm(X, weight, bias, eps);  u = Y - Y_prev;  Y_prev = Y
        v = v + u / theta                                   # correctly rounded division
        sigma = +1 if v >= 1 and count < p_max; -1 if v < 0 and count > n_min; else 0
        count += sigma;  v -= sigma;  out_t = sigma

    i.e. the residual adds, ``spike_layernorm`` then ``st_bif``, bit for bit on every
    backend in eager mode (``u`` is rounded to ``x.dtype``, as ``spike_layernorm`` returns
    it), without the ``[T, *, C]`` increments in memory: on a GPU one kernel keeps ``X``,
    ``Y_prev``, ``v`` and the count in registers for the whole chunk. Under ``torch.compile``
    on a CPU, Inductor compiles the PyTorch path's LayerNorm with its own reduction order:
    ``y_prev`` and ``v`` may then differ by a few ulp (a membrane on a firing boundary could
    flip a spike), within the LayerNorm's float tolerance.

    Pending branches: float mode's blocks add the attention and MLP outputs (``sigma *
    theta`` of their last neurons) to the residual stream. Given those neurons' int8 spikes
    and steps, the op adds them in registers (``x + sigma * theta``, one rounding per add, as
    the model's adds of the float outputs), so the branch outputs never exist as float32
    tensors and the stream is written only with ``residual_out``.

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
        branch_spikes, branch_threshold: optional pending branch: int8 spikes shaped like
            ``x`` and the step of the neuron that fired them (one element); ``x`` must then
            be float32 (the stream). ``branch2_*``: a second one, added after the first.
        residual_out: also return ``h``, the stream with the branches, ``[T, *, C]`` float32
            (needs a branch).
        active: optional int32 ``[T, B]`` flags (``B = x.shape[1]``), set in place, never
            cleared: ``active[t, b] = 1`` when any neuron of sample ``b`` (the ``b``-th of
            ``B`` equal blocks of a step's rows) fires at step ``t``. The kernel records it
            while it writes the spikes (no extra pass). Not returned.
        inplace: write the new state into the given ``x_acc``, ``y_prev``, ``v`` and
            ``count`` (all four required, contiguous, sharing no memory with an input or
            each other) and return those same tensors (``ops._inplace``): a state at a fixed
            address, as a CUDA graph replays it. ``h`` (``residual_out``) is fresh either way.
        validate: on a GPU also run the data checks (host syncs): the threshold positive,
            finite and normal, ``count`` inside the bounds. On CPU they always run.

    Returns:
        ``(spikes [T, *, C] int8, x_acc, y_prev, v, count)``, and ``h`` last with
        ``residual_out``: fresh tensors (never aliases of the state given; with ``inplace``
        the state is the given tensors, updated), so chunked time (feeding the state back)
        equals a whole run.

    Accuracy: ``spike_layernorm``'s, within its range (a row's sum of squared deviations
    finite in float32).

    Bad input: ``TypeError``/``ValueError`` naming the argument, before dispatch.

    Dispatch (``ops._dispatch.backend_for``): CUDA tensors run the fused Triton kernel;
    CPU tensors run ``spike_layernorm`` and then ``st_bif`` (the fused kernel under
    ``TRITON_INTERPRET=1``); ``force_backend("reference")`` runs the oracle. Inference only.
    """
    eps = check_float(eps, "eps")
    args = (x, weight, bias, eps, threshold, n_min, p_max, x_acc, y_prev, v, count)
    branch, branch2 = (branch_spikes, branch_threshold), (branch2_spikes, branch2_threshold)
    _check_spike_layernorm_neuron(*args, active, *branch, *branch2, residual_out, inplace)
    check_threshold_values(threshold, "threshold", validate)
    check_in_bounds(count, "count", n_min, p_max, validate)
    for prefix, (spikes, theta) in (("branch", branch), ("branch2", branch2)):
        if spikes is not None:
            check_threshold_values(theta, f"{prefix}_threshold", validate)
            check_ternary(spikes, f"{prefix}_spikes", validate)
    out = call_op("spike_layernorm_neuron", *args, active, *branch, *branch2, residual_out, inplace)
    if inplace:
        out = own_state(out, _STATE_POSITIONS, (x_acc, y_prev, v, count))
    return tuple(out) if residual_out else tuple(out[:5])

"""``torch.ops.spikekernels.exact_layernorm_neuron``: the residual stream's read, the LayerNorm
row function and the target-driven neuron, fused (exact mode, SPEC.md §9.2-§9.4)."""

from __future__ import annotations

import math

import torch

from spikekernels.exact_math import layer_norm_rows, pool_patch_tokens, residual_read
from spikekernels.ops._checks import (
    check_active,
    check_float,
    check_same_device,
    check_state,
    check_tensor,
    check_time_major,
)
from spikekernels.ops._dispatch import backend_for
from spikekernels.ops._registry import kernel_op, launcher
from spikekernels.ops.target import (
    check_bounds,
    check_threshold,
    check_threshold_values,
    record_active,
    target_spikes_torch,
)

# The Triton kernel holds whole rows in registers (padded to the next power of two): ViT-L's
# width, 1024, is the widest row it takes. The other paths follow the same contract.
MAX_CHANNELS = 1024


def out_shape(d: torch.Tensor, pool: bool) -> tuple[int, ...]:
    """One step of the spikes: ``d``'s step without the token dim when pooling."""
    step = tuple(d.shape[1:])
    return (*step[:-2], step[-1]) if pool else step


def _check_exact_layernorm_neuron(
    d, c, weight, bias, eps, threshold, n_min, p_max, count, pool, active
) -> None:
    """Metadata checks (no data read)."""
    if not isinstance(pool, bool):
        raise TypeError(f"pool must be a bool, got {type(pool).__name__}")
    check_tensor(d, "d", dtypes=(torch.float64,))
    check_time_major(d, "d")
    min_dims = 3 if pool else 2
    if d.dim() < min_dims:
        layout = "[T, *rows, tokens, C]" if pool else "[T, *rows, C]"
        raise ValueError(
            f"d must be {layout} with at least {min_dims} dims, got shape {tuple(d.shape)}"
        )
    channels = d.shape[-1]
    if not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(
            f"d has C={channels} channels (last dim); the fused LayerNorm takes 1 to "
            f"{MAX_CHANNELS} (a row is held in registers)"
        )
    if pool and d.shape[-2] < 2:
        raise ValueError(
            f"pool=True needs the class token and at least one patch token in d's dim -2, got "
            f"{d.shape[-2]} tokens"
        )
    check_tensor(c, "c", dtypes=(torch.float64,))
    check_same_device("d", d, "c", c)
    try:
        broadcast = torch.broadcast_shapes(c.shape, d.shape[1:])
    except RuntimeError:
        broadcast = None
    if broadcast != d.shape[1:]:
        raise ValueError(
            f"c must broadcast to one step of d {tuple(d.shape[1:])}, got shape {tuple(c.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(t, name, dtypes=(torch.float32,), ndim=1)
            if t.shape[0] != channels:
                raise ValueError(
                    f"{name} must have shape ({channels},) (d's C), got {tuple(t.shape)}"
                )
            check_same_device("d", d, name, t)
    check_float(eps, "eps")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    check_threshold(threshold, "threshold", channels, d, "d")
    check_bounds(n_min, p_max)
    check_state(count, "count", out_shape(d, pool), (torch.int8,), d, "d")
    check_active(active, (d.shape[0], *out_shape(d, pool)), d, "d")


def _norm_input(d: torch.Tensor, c: torch.Tensor, pool: bool) -> torch.Tensor:
    """The float32 rows the LayerNorm reads at every step, as exact mode computes them."""
    return pool_patch_tokens(c, d) if pool else residual_read(c, d)


def exact_layernorm_neuron_torch(
    d: torch.Tensor,
    c: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    count: torch.Tensor | None,
    pool: bool,
    active: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised PyTorch (any device): the unfused chain of exact mode over all T steps at
    once (``residual_read`` or ``pool_patch_tokens``, ``layer_norm_rows``, the target neuron,
    which records ``active``). Every float operation is elementwise (``tree_sum`` included),
    so a whole chunk gives the bits of one step at a time."""
    y = layer_norm_rows(_norm_input(d, c, pool), weight, bias, eps)
    return target_spikes_torch(y, threshold, n_min, p_max, count, active)


def _constant_rows(c: torch.Tensor, step: tuple[int, ...]) -> torch.Tensor:
    """``c`` as ``[Rc, C]`` rows, contiguous, such that row ``r`` of one step of ``d`` (flat
    ``[R, C]``) adds row ``r % Rc``: ``c``'s broadcast dims must lead (``[1, N, C]`` against
    ``[B, N, C]``, the ViT's case); any other broadcast is expanded to the full step."""
    dims = (1,) * (len(step) - c.dim()) + tuple(c.shape)
    lead = 0
    while lead < len(step) - 1 and dims[lead] == 1:
        lead += 1
    if dims[-1] == step[-1] and tuple(dims[lead:]) == tuple(step[lead:]):
        return c.reshape(-1, step[-1]).contiguous()
    return c.expand(step).reshape(-1, step[-1]).contiguous()


@kernel_op("exact_layernorm_neuron", mutates_args=("active",))
def _exact_layernorm_neuron_op(
    d: torch.Tensor,
    c: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    count: torch.Tensor | None = None,
    pool: bool = False,
    active: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (d, c, weight, bias, eps, threshold, n_min, p_max, count, pool)
    _check_exact_layernorm_neuron(*args, active)
    backend = backend_for(d, ("triton", "torch"))
    if backend == "triton":
        from spikekernels.kernels.exact_layernorm import exact_layernorm_neuron_triton

        steps, channels = d.shape[0], d.shape[-1]
        shape = out_shape(d, pool)
        rows = math.prod(shape[:-1])
        if pool:
            # The readout's one pooled row per sample: its float64 token sum runs in PyTorch
            # (elementwise adds, the bits of exact_math), the LayerNorm and neuron fused.
            x, rows_c = pool_patch_tokens(c, d).reshape(steps, rows, channels), None
        else:
            x, rows_c = d.contiguous().reshape(steps, rows, channels), _constant_rows(c, shape)
        spikes, count_out = exact_layernorm_neuron_triton(
            launcher,
            x,
            rows_c,
            None if weight is None else weight.contiguous(),
            None if bias is None else bias.contiguous(),
            eps,
            threshold,
            n_min,
            p_max,
            None if count is None else count.contiguous().reshape(rows, channels),
            active,
        )
        return spikes.reshape(steps, *shape), count_out.reshape(shape)
    if backend == "reference":
        from spikekernels import reference

        out = reference.exact_layernorm_neuron(*args)
        record_active(active, out[0])
        return out
    return exact_layernorm_neuron_torch(*args, active)


@_exact_layernorm_neuron_op.register_fake
def _(d, c, weight, bias, eps, threshold, n_min, p_max, count=None, pool=False, active=None):
    _check_exact_layernorm_neuron(
        d, c, weight, bias, eps, threshold, n_min, p_max, count, pool, active
    )
    shape = out_shape(d, pool)
    return (
        d.new_empty((d.shape[0], *shape), dtype=torch.int8),
        d.new_empty(shape, dtype=torch.int8),
    )


def exact_layernorm_neuron(
    d: torch.Tensor,
    c: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    count: torch.Tensor | None = None,
    *,
    pool: bool = False,
    active: torch.Tensor | None = None,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mode's residual read + LayerNorm + target-driven neuron, fused (SPEC.md §9.2-§9.4).

    State: the neuron's ``count`` (int8, fresh 0); the residual stream's exact state ``D`` is
    the caller's. Per step ``t``, with ``D_t = d[t]`` and ``C`` channels::

        x = fl32(fl64(c + D_t))                     # exact_math.residual_read
        mean = fl32(tree_sum(x) / C)                # exact_math.layer_norm_rows, op by op
        xc = x - mean;  var = fl32(tree_sum(xc * xc) / C)
        y = fl32(fl32(xc / fl32(sqrt(var + fl32(eps)))) * w) + b
        target = clamp(floor(y / theta + 1/2), n_min, p_max)
        sigma  = sign(target - count);  count += sigma;  out_t = sigma

    ``tree_sum`` pads the row with zeros to a power of two and adds the upper half to the
    lower half until one element is left; every operation rounds once (no fused multiply-add;
    ``sqrt`` and ``/`` correctly rounded). With ``pool=True`` (the ``global_pool`` readout of
    ViT-B/L) the row is instead ``exact_math.pool_patch_tokens(c, D_t)``: the float64 mean of
    the patch tokens (dim -2, the class token at index 0 excluded), then ``fl32``. Only the
    int8 spikes and the final count are produced.

    Args:
        d: ``[T, *rows, C]`` float64 (``[T, *rows, tokens, C]`` with ``pool``): the residual
            stream's spike-driven part ``D`` at each step (current values, not increments).
            ``1 <= C <= 1024``.
        c: float64 constant part (class token and position embedding), broadcastable to one
            step of ``d`` (e.g. ``[1, N, C]`` against ``d`` ``[T, B, N, C]``).
        weight, bias: ``[C]`` float32 or None: the LayerNorm's affine parameters.
        eps: Python float, finite, ``>= 0``; added to the variance as float32 (``fl32(eps)``,
            as PyTorch does with a scalar).
        threshold: the neuron's ``theta`` (the norm quantizer's step): one element, or ``[C]``
            per channel. Read as float32 on the device (no host sync).
        n_min, p_max: Python ints, ``n_min <= 0 <= p_max``, inside int8's ``[-128, 127]``.
        count: optional incoming int8 count, shape of one step of the spikes; fresh 0.
        pool: read the pooled patch tokens instead of every row (see above).
        active: optional int32 ``[T, B]`` per-sample flags, ``B`` the spikes' dim 1, set in
            place as the kernel writes the spikes (``target_spikes``' contract:
            ``active[t, b] = 1`` where sample ``b`` fires at step ``t``). Not returned.
        validate: on a GPU also check the threshold's values (a host sync): positive, finite,
            normal. On CPU always.

    Returns:
        ``(spikes [T, *rows, C] int8 in {-1, 0, 1}, count [*rows, C] int8)``, fresh tensors,
        so chunked time (feeding ``count`` back) equals a whole run bit for bit.

    Exactness: bit-identical to ``reference.exact_layernorm_neuron`` and to the unfused chain
    ``residual_read`` -> ``ExactLayerNorm`` -> ``TargetNeuron`` on every path and device.
    A row with NaN gives NaN values and no spikes; a constant row with ``eps == 0`` likewise.

    Dispatch (``ops._dispatch.backend_for``): CUDA tensors run the Triton kernel (one program
    per block of rows, whole rows in registers, the T loop inside with the count in
    registers; with ``pool`` the token mean runs in PyTorch first); CPU tensors run vectorised
    PyTorch (the Triton kernel under ``TRITON_INTERPRET=1``); ``force_backend("reference")``
    runs the oracle. Inference only: no autograd.
    """
    args = (d, c, weight, bias, eps, threshold, n_min, p_max, count, pool)
    _check_exact_layernorm_neuron(*args, active)
    check_threshold_values(threshold, "threshold", validate)
    return torch.ops.spikekernels.exact_layernorm_neuron(
        d, c, weight, bias, float(eps), threshold, n_min, p_max, count, pool, active
    )

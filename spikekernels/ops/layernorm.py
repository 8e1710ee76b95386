"""``torch.ops.spikekernels.spike_layernorm``: multi-step Spike-LayerNorm (SPEC.md §4)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from spikekernels.ops._checks import (
    FLOAT_DTYPES,
    check_float,
    check_same_device,
    check_state,
    check_tensor,
    check_time_major,
)
from spikekernels.ops._dispatch import backend_for
from spikekernels.ops._inplace import check_inplace, own_state, placeholder, state_result
from spikekernels.ops._registry import call_op, kernel_op, launcher

# The kernels hold a row in one tile of next_power_of_2(C) lanes: Triton's largest.
MAX_CHANNELS = 2**20


def check_spike_layernorm(x, weight, bias, eps, x_acc, y_prev) -> None:
    """Metadata checks (no data read)."""
    check_tensor(x, "x", dtypes=FLOAT_DTYPES)
    check_time_major(x, "x")
    if x.dim() < 2:
        raise ValueError(f"x must be [T, *, C] with at least 2 dims, got shape {tuple(x.shape)}")
    c = x.shape[-1]
    if c == 0:
        raise ValueError("x has C == 0 channels (last dim); layer norm needs at least one")
    if c > MAX_CHANNELS:
        raise ValueError(
            f"x has C = {c} channels (last dim); at most {MAX_CHANNELS} (the kernels hold a "
            "row in one tile)"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(t, name, dtypes=FLOAT_DTYPES + (torch.float64,), ndim=1)
        if t.shape[0] != c:
            raise ValueError(f"{name} must have shape ({c},) (x's last dim), got {tuple(t.shape)}")
        check_same_device("x", x, name, t)
    check_float(eps, "eps")
    if isinstance(eps, (int, float)) and not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    shape = x.shape[1:]
    check_state(x_acc, "x_acc", shape, (torch.float32,), x, "x")
    check_state(y_prev, "y_prev", shape, (torch.float32,), x, "x")


def _check_spike_layernorm_op(x, weight, bias, eps, x_acc, y_prev, inplace=False) -> None:
    """The op's own metadata checks: ``check_spike_layernorm`` (shared with
    ``spike_layernorm_neuron``, which checks its four states' ``inplace`` itself) and
    ``inplace``'s."""
    check_spike_layernorm(x, weight, bias, eps, x_acc, y_prev)
    check_inplace(inplace, (("x_acc", x_acc), ("y_prev", y_prev)), (x, weight, bias))


_STATE_POSITIONS = (1, 2)  # x_acc, y_prev in the op's outputs


@kernel_op("spike_layernorm", mutates_args=("x_acc", "y_prev"), check=_check_spike_layernorm_op)
def _spike_layernorm_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    x_acc: torch.Tensor | None = None,
    y_prev: torch.Tensor | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = backend_for(x, ("triton", "torch"))
    if backend == "triton":
        from spikekernels.kernels.layernorm import spike_layernorm_triton

        out = spike_layernorm_triton(launcher, x, weight, bias, eps, x_acc, y_prev, inplace=inplace)
        if inplace:  # the kernel wrote the new state into the given tensors
            return (out[0], placeholder(x_acc), placeholder(y_prev))
        return out
    if backend == "reference":
        from spikekernels import reference

        out = reference.spike_layernorm(x, weight, bias, eps, x_acc, y_prev)
    else:
        out = spike_layernorm_torch(x, weight, bias, eps, x_acc, y_prev)
    return (out[0], state_result(inplace, out[1], x_acc), state_result(inplace, out[2], y_prev))


def running_sums(x: torch.Tensor, x_acc: torch.Tensor | None) -> torch.Tensor:
    """``X_t = X_init + x_0 + ... + x_t`` for every step, float32 ``[T, *shape]``.

    One float32 add per step, in time order: exactly the rounding of the per-step rule, so
    the outgoing ``X`` (the last slab) equals the reference's and chunked time equals whole.
    (``torch.cumsum`` would not do: on CPU it accumulates float32 in float64, so a chunked
    run, which restarts from the rounded state, would differ from a whole one.)
    """
    sums = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    acc = None if x_acc is None else x_acc.to(torch.float32)
    for t in range(x.shape[0]):
        step = x[t].to(torch.float32)
        acc = step if acc is None else acc + step
        sums[t] = acc
    return sums


def step_differences(
    y: torch.Tensor, y_prev: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``out_t = Y_t - Y_{t-1}`` for every step at once (``Y_{-1} = y_prev``, zero when None)."""
    out = torch.empty(y.shape, dtype=dtype, device=y.device)
    out[0] = y[0] if y_prev is None else y[0] - y_prev
    if y.shape[0] > 1:
        out[1:] = y[1:] - y[:-1]
    return out


def spike_layernorm_torch(x, weight, bias, eps, x_acc, y_prev):
    """The PyTorch path (CPU, or forced): running sums step by step (cheap adds), then one
    ``layer_norm`` over all ``T`` steps at once and the differences of consecutive steps.
    Every row is normalised by the same float32 ``layer_norm`` as a per-step run, so the
    error is PyTorch's own float32 layer norm error (SPEC.md §8)."""
    c = x.shape[-1]
    sums = running_sums(x, x_acc)
    w = None if weight is None else weight.to(torch.float32)
    b = None if bias is None else bias.to(torch.float32)
    y = F.layer_norm(sums, (c,), w, b, eps)
    out = step_differences(y, None if y_prev is None else y_prev.to(torch.float32), x.dtype)
    return out, sums[-1].clone(), y[-1].clone()


@_spike_layernorm_op.register_fake
def _(x, weight, bias, eps, x_acc=None, y_prev=None, inplace=False):
    _check_spike_layernorm_op(x, weight, bias, eps, x_acc, y_prev, inplace)
    shape = x.shape[1:]
    if inplace:
        states = (placeholder(x_acc), placeholder(y_prev))
    else:
        states = (
            x.new_empty(shape, dtype=torch.float32),
            x.new_empty(shape, dtype=torch.float32),
        )
    return (torch.empty_like(x, memory_format=torch.contiguous_format), *states)


def spike_layernorm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    x_acc: torch.Tensor | None = None,
    y_prev: torch.Tensor | None = None,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-step Spike-LayerNorm (SPEC.md §4), all T steps in one fused kernel on GPU.

    Per row of ``C`` channels: ``X = X + h_t``; ``Y = layer_norm(X, weight, bias, eps)``;
    output ``Y - Y_prev``; ``Y_prev = Y``. So the outputs up to ``t`` sum to ``Y_t``.

    Args:
        x: ``[T, *, C]`` float32, float16 or bfloat16 increments (math in float32).
        weight, bias: optional ``[C]`` affine parameters (None: no scale / no shift).
        eps: added to the variance. Copy it from the QANN's LayerNorm (1e-6 for the ViT);
            the official SpikeZIP-TF SNN code used 1e-5 regardless, which we do not.
        x_acc, y_prev: optional incoming state, float32 of shape ``x.shape[1:]`` (zeros when
            None, each independently).
        inplace: write the new state into the given ``x_acc`` and ``y_prev`` (both required,
            contiguous, sharing no memory with an input or each other) and return those same
            tensors (``ops._inplace``): a state at a fixed address, as a CUDA graph replays
            it. The Triton kernel writes it there directly; the PyTorch and reference paths
            compute a fresh state and copy it in.

    Returns:
        ``(out [T, *, C] in x.dtype, x_acc, y_prev)``, the state float32 and fresh (never an
        alias of the inputs; with ``inplace`` the given tensors, updated), so chunked time
        equals a whole run.

    Accuracy: ``x_acc`` is bit-identical to the reference (the same float32 adds in the same
    order). The outputs are float32 math rounded once to ``x.dtype``; their error against a
    float64 evaluation is within 2x of ``reference.spike_layernorm``'s float32 error (the
    reductions sum in a different order; sqrt and division are correctly rounded). That
    holds while the sum of a row's squared deviations is finite in float32 (every
    ``|x_acc - mean|`` below ``2^64 / sqrt(C)``, far past any model's values); past it no
    path is accurate and they differ (PyTorch's ``layer_norm`` gives NaN, the kernel the
    bias).

    Bad input: ``TypeError``/``ValueError`` naming the argument (``eps`` must be a real
    number, not a bool or a tensor), before dispatch.

    Dispatch (``ops._dispatch.backend_for``): CUDA tensors run the Triton kernel (state in
    registers across the T loop, one read of ``x`` and one write of ``out``); CPU tensors run
    ``spike_layernorm_torch`` (running sums, then one ``layer_norm`` over all steps; the
    Triton kernel under ``TRITON_INTERPRET=1``). Inference only: no autograd.
    """
    eps = check_float(eps, "eps")
    _check_spike_layernorm_op(x, weight, bias, eps, x_acc, y_prev, inplace)
    out = call_op("spike_layernorm", x, weight, bias, eps, x_acc, y_prev, inplace)
    if inplace:
        out = own_state(out, _STATE_POSITIONS, (x_acc, y_prev))
    return out

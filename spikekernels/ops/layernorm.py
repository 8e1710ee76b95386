"""``torch.ops.spikekernels.spike_layernorm``: multi-step Spike-LayerNorm (SPEC.md §4)."""

from __future__ import annotations

import math

import torch

from spikekernels import reference
from spikekernels.kernels import use_triton
from spikekernels.ops._checks import (
    FLOAT_DTYPES,
    check_same_device,
    check_state,
    check_tensor,
    check_time_major,
)
from spikekernels.ops._registry import kernel_op, launcher


def _check_spike_layernorm(x, weight, bias, eps, x_acc, y_prev) -> None:
    """Metadata checks (no data read)."""
    check_tensor(x, "x", dtypes=FLOAT_DTYPES)
    check_time_major(x, "x")
    if x.dim() < 2:
        raise ValueError(f"x must be [T, *, C] with at least 2 dims, got shape {tuple(x.shape)}")
    c = x.shape[-1]
    if c == 0:
        raise ValueError("x has C == 0 channels (last dim); layer norm needs at least one")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(t, name, dtypes=FLOAT_DTYPES + (torch.float64,), ndim=1)
        if t.shape[0] != c:
            raise ValueError(f"{name} must have shape ({c},) (x's last dim), got {tuple(t.shape)}")
        check_same_device("x", x, name, t)
    if not (isinstance(eps, float) and math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    shape = x.shape[1:]
    check_state(x_acc, "x_acc", shape, (torch.float32,), x, "x")
    check_state(y_prev, "y_prev", shape, (torch.float32,), x, "x")


@kernel_op("spike_layernorm")
def _spike_layernorm_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    x_acc: torch.Tensor | None = None,
    y_prev: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_spike_layernorm(x, weight, bias, eps, x_acc, y_prev)
    if use_triton(x):
        from spikekernels.kernels.layernorm import spike_layernorm_triton

        return spike_layernorm_triton(launcher, x, weight, bias, eps, x_acc, y_prev)
    return reference.spike_layernorm(x, weight, bias, eps, x_acc, y_prev)


@_spike_layernorm_op.register_fake
def _(x, weight, bias, eps, x_acc=None, y_prev=None):
    _check_spike_layernorm(x, weight, bias, eps, x_acc, y_prev)
    shape = x.shape[1:]
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty(shape, dtype=torch.float32),
        x.new_empty(shape, dtype=torch.float32),
    )


def spike_layernorm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    x_acc: torch.Tensor | None = None,
    y_prev: torch.Tensor | None = None,
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

    Returns:
        ``(out [T, *, C] in x.dtype, x_acc, y_prev)``, the state float32 and fresh (never an
        alias of the inputs), so chunked time equals a whole run.

    Accuracy: ``x_acc`` is bit-identical to the reference (the same float32 adds in the same
    order). The outputs are float32 math rounded once to ``x.dtype``; their error against a
    float64 evaluation is within 2x of ``reference.spike_layernorm``'s float32 error (the
    reductions sum in a different order; sqrt and division are correctly rounded).

    Dispatch: CUDA tensors run the Triton kernel (state in registers across the T loop, one
    read of ``x`` and one write of ``out``); CPU tensors run the reference, vectorised across
    rows (the Triton kernel under ``TRITON_INTERPRET=1``). Inference only: no autograd.
    """
    if isinstance(eps, int) and not isinstance(eps, bool):
        eps = float(eps)
    return torch.ops.spikekernels.spike_layernorm(x, weight, bias, eps, x_acc, y_prev)

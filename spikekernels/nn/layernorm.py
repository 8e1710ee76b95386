"""``SpikeLayerNorm``: multi-step Spike-LayerNorm as a stateful module (SPEC.md §4)."""

from __future__ import annotations

import torch
from torch import nn

from spikekernels.ops.layernorm import spike_layernorm


class SpikeLayerNorm(nn.Module):
    """Spike-LayerNorm over the last dim of ``[T, B, ..., C]``, state kept until ``reset()``.

    ``X = X + h_t; Y = layer_norm(X, weight, bias, eps); out_t = Y - Y_prev``: the outputs
    summed over steps equal the LayerNorm of the summed input. Build it with
    ``SpikeLayerNorm.from_layernorm(ln)``, which copies the QANN LayerNorm's weight, bias and
    **eps** (1e-6 for the ViT; the official SpikeZIP-TF SNN code used 1e-5 whatever the QANN
    had, which we do not copy). Output in the input dtype; state float32. Inference only.
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-6,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = float(eps)
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and tuple(t.shape) != (num_channels,):
                raise ValueError(f"{name} must have shape ({num_channels},), got {tuple(t.shape)}")
        # detach(), not clone(): a converted network shares the QANN's weights (one copy).
        self.register_buffer("weight", None if weight is None else weight.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.reset()

    @classmethod
    def from_layernorm(cls, ln: nn.LayerNorm) -> SpikeLayerNorm:
        """From a QANN ``nn.LayerNorm`` over one (the last) dim; eps copied from it."""
        if not isinstance(ln, nn.LayerNorm):
            raise TypeError(f"ln must be an nn.LayerNorm, got {type(ln).__name__}")
        if len(ln.normalized_shape) != 1:
            raise ValueError(
                f"SpikeLayerNorm normalizes the last dim only; got normalized_shape "
                f"{tuple(ln.normalized_shape)}"
            )
        return cls(ln.normalized_shape[0], ln.eps, ln.weight, ln.bias)

    def reset(self) -> None:
        """Back to the fresh state (``X = 0``, ``Y_prev = 0``): call between inputs."""
        self.x_acc: torch.Tensor | None = None
        self.y_prev: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, self.x_acc, self.y_prev = spike_layernorm(
            x, self.weight, self.bias, self.eps, self.x_acc, self.y_prev
        )
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, eps={self.eps:g}, affine="
            f"{self.weight is not None}, bias={self.bias is not None}"
        )

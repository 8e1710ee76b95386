"""``ExactAttention``: spike-equivalent self-attention in exact mode (SPEC.md §9.2-9.4)."""

from __future__ import annotations

import torch
from torch import nn

from spikekernels import exact_math
from spikekernels.nn.exact_layers import ExactLinearNeuron, ExactSoftmax
from spikekernels.nn.spike_matmul import RunningSpikeMatmul
from spikekernels.nn.target_neuron import TargetNeuron

__all__ = ["ExactAttention"]


class ExactAttention(nn.Module):
    """Multi-head attention of exact mode: ``[T, B, N, C]`` spikes in, ``proj``'s spikes out.

    Per step, every value is the current one, computed from exact state:

    1. ``qkv``: ``ExactLinearNeuron`` (int32 accumulator fused with one target-driven neuron
       with per-channel thresholds: the steps of ``quan_q``, ``quan_k``, ``quan_v``);
    2. scores: ``S = Q @ K^T`` as a running int32 product, per head;
    3. ``softmax``: ``softmax_rows(fl32(g * fl32(S)))`` -> ``attn_if`` (unsigned);
    4. context: ``Z = A @ V`` running int32 -> ``fl32(fl32(theta_a * theta_v) * fl32(Z))``
       -> ``after_attn_if`` (signed);
    5. merge heads -> ``proj`` (``ExactLinearNeuron``, the ``quan_proj`` neuron).

    State lives in the parts until ``reset()``. Inference only.
    """

    def __init__(
        self,
        qkv: ExactLinearNeuron,
        softmax: ExactSoftmax,
        attn_if: TargetNeuron,
        after_attn_if: TargetNeuron,
        proj: ExactLinearNeuron,
        *,
        num_heads: int,
        theta_v: torch.Tensor,
    ) -> None:
        super().__init__()
        self.dim = proj.out_features
        if self.dim % num_heads or qkv.out_features != 3 * self.dim:
            raise ValueError(
                f"qkv must map to 3 x {self.dim} channels split over {num_heads} heads, "
                f"got {qkv.out_features}"
            )
        self.num_heads = int(num_heads)
        self.qkv = qkv
        self.scores, self.softmax, self.attn_if = RunningSpikeMatmul(), softmax, attn_if
        self.context, self.after_attn_if = RunningSpikeMatmul(), after_attn_if
        self.proj = proj
        theta_a = attn_if.threshold.reshape(())
        self.register_buffer("theta_a", theta_a.clone())
        self.register_buffer("theta_v", torch.as_tensor(theta_v, dtype=torch.float32).reshape(()))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def reset(self) -> None:
        for m in self.children():
            m.reset()

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """``s``: ``[T, B, N, C]`` int8 spikes. Returns the ``quan_proj`` neuron's spikes."""
        t, b, n, c = s.shape
        h, dh = self.num_heads, self.head_dim
        qkv = self.qkv(s).view(t, b, n, 3, h, dh)
        q = qkv[:, :, :, 0].transpose(2, 3)  # [T, B, H, N, Dh], strided views
        k_t = qkv[:, :, :, 1].permute(0, 1, 3, 4, 2)  # [T, B, H, Dh, N]
        v = qkv[:, :, :, 2].transpose(2, 3)
        attn = self.attn_if(self.softmax(self.scores(q, k_t)))
        z = self.context(attn, v)
        context = self.after_attn_if(exact_math.context_value(z, self.theta_a, self.theta_v))
        merged = context.transpose(2, 3).reshape(t, b, n, c)
        return self.proj(merged)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"

"""``SpikeAttention``: the spiking self-attention (SESA) block, multi-step (SPEC.md §5, §7)."""

from __future__ import annotations

import torch
from torch import nn

from spikekernels.nn.conversion import neuron_from_quantizer
from spikekernels.nn.linear_neuron import SpikeLinearNeuron
from spikekernels.nn.neuron import STBIF
from spikekernels.nn.softmax import SpikeSoftmax
from spikekernels.nn.spike_matmul import SpikeMatmul

__all__ = ["SpikeAttention"]


class SpikeAttention(nn.Module):
    """Multi-head spiking self-attention, ``[T, B, N, C]`` spikes in, ``[T, B, N, C]`` out.

    Per step (SPEC.md §7), with ``H`` heads of ``Dh = C / H`` channels:

    1. ``qkv``: spike linear of the input spikes (threshold ``in_threshold``, the norm1
       neuron's), its bias at global step 0, fused with the q, k and v signed ST-BIF neurons
       (``SpikeLinearNeuron`` with per-channel thresholds: ``quan_q/k/v``'s steps over their
       channel blocks): int8 spikes ``[T, B, N, 3C]``, no float32 linear output in memory.
       The count's channel blocks viewed ``[B, N, H, Dh]`` and transposed are the QANN's
       ``[B, H, N, Dh]`` integers.
    2. scores: spike product ``q @ k^T`` with scale ``theta_q * theta_k * head_dim^-0.5``
       (the QANN's ``scale``), then ``SpikeSoftmax`` over the keys.
    3. ``attn_if``: unsigned neuron (``attn_quan``) on ``[T, B, H, N, N]``.
    4. context: spike product ``attn @ v`` with scale ``theta_attn * theta_v``, then
       ``after_attn_if`` (signed, ``after_attn_quan``) on ``[T, B, H, N, Dh]``.
    5. merge heads -> ``proj``: spike linear (threshold ``theta_after_attn``, bias at step 0)
       fused with the signed ``quan_proj`` neuron (``SpikeLinearNeuron``).

    The output is ``proj``'s: int8 spikes, or ``spikes * theta`` (float32, the residual
    increment) when built with ``float_out=True``. State (neurons, softmax, linear steps, the
    two products' running counts) is kept between calls until ``reset()``, so chunked time
    equals a whole run. Thresholds stay tensors: no host sync. Inference only.
    """

    def __init__(
        self,
        qkv: SpikeLinearNeuron,
        softmax: nn.Module,
        attn_if: STBIF,
        after_attn_if: STBIF,
        proj: SpikeLinearNeuron,
        num_heads: int,
        scale: float,
    ) -> None:
        super().__init__()
        dim = proj.out_features
        if qkv.out_features != 3 * dim or dim % num_heads:
            raise ValueError(
                f"qkv must have 3 * dim outputs and dim ({dim}) be divisible by num_heads "
                f"({num_heads}); got qkv with {qkv.out_features} outputs"
            )
        self.dim = int(dim)
        self.qkv, self.proj = qkv, proj
        self.softmax = softmax
        self.attn_if, self.after_attn_if = attn_if, after_attn_if
        self.num_heads = int(num_heads)
        self.scale = float(scale)
        theta_q, theta_k, theta_v = qkv.threshold.expand(3 * dim)[::dim]
        self.scores = SpikeMatmul(theta_q * theta_k * self.scale)
        self.context = SpikeMatmul(attn_if.threshold * theta_v)
        self.reset()

    @classmethod
    def from_quant(
        cls, qattn: nn.Module, in_threshold: torch.Tensor, *, float_out: bool = False
    ) -> SpikeAttention:
        """Build from a QANN attention (``QuantAttention`` or the official ``QAttention``).

        ``in_threshold``: the threshold of the neuron whose spikes come in (the norm1
        quantizer's step). The linear weights are shared with ``qattn``, not copied (a
        ``QuantLinear``'s int8 weight is dequantized: float mode of an integer QANN).
        """
        for name in ("qkv", "proj", "quan_q", "quan_k", "quan_v", "attn_quan",
                     "after_attn_quan", "quan_proj", "num_heads", "scale"):  # fmt: skip
            if not hasattr(qattn, name):
                raise TypeError(
                    f"SpikeAttention.from_quant: {type(qattn).__name__} has no `{name}`; "
                    "expected a QuantAttention / QAttention"
                )
        if getattr(qattn, "is_softmax", True) is False:
            raise ValueError("SpikeAttention supports softmax attention only (is_softmax=True)")
        in_threshold = torch.as_tensor(in_threshold, dtype=torch.float32).detach()
        qkv_neurons = [neuron_from_quantizer(getattr(qattn, f"quan_{x}")) for x in "qkv"]
        after_attn_if = neuron_from_quantizer(qattn.after_attn_quan)
        proj_if = neuron_from_quantizer(qattn.quan_proj, float_out=float_out)
        return cls(
            qkv=SpikeLinearNeuron.from_linear_and_neuron(qattn.qkv, qkv_neurons, in_threshold),
            softmax=SpikeSoftmax(),
            attn_if=neuron_from_quantizer(qattn.attn_quan),
            after_attn_if=after_attn_if,
            proj=SpikeLinearNeuron.from_linear_and_neuron(
                qattn.proj, proj_if, after_attn_if.threshold
            ),
            num_heads=qattn.num_heads,
            scale=qattn.scale,
        )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def reset(self) -> None:
        """Back to the fresh state, every part included: call between inputs."""
        for m in (self.qkv, self.scores, self.softmax, self.attn_if, self.context,
                  self.after_attn_if, self.proj):  # fmt: skip
            m.reset()

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """``s``: ``[T, B, N, C]`` int8 spikes of the input neuron."""
        if s.dim() != 4:
            raise ValueError(f"SpikeAttention expects s of shape [T, B, N, C], got {list(s.shape)}")
        t, b, n, c = s.shape
        h = self.num_heads
        if c != self.dim:
            raise ValueError(f"s has {c} channels, the attention expects {self.dim}")
        dh = c // h
        qkv = self.qkv(s).view(t, b, n, 3, h, dh)
        # strided views of the packed qkv, read in place by the spike products
        q = qkv[:, :, :, 0].transpose(2, 3)  # [T, B, H, N, Dh]
        k_t = qkv[:, :, :, 1].permute(0, 1, 3, 4, 2)  # [T, B, H, Dh, N]
        v = qkv[:, :, :, 2].transpose(2, 3)  # [T, B, H, N, Dh]
        attn = self.attn_if(self.softmax(self.scores(q, k_t)))
        context = self.after_attn_if(self.context(attn, v))  # [T, B, H, N, Dh]
        merged = context.transpose(2, 3).reshape(t, b, n, c)
        return self.proj(merged)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, scale={self.scale:.4g}"

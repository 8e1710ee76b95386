"""Float mode's spiking self-attention (SESA), multi-step (SPEC.md §5, §7): the block
``SpikeAttention`` and its two fused layers, ``SpikeAttentionProbs`` (scores product,
Spike-Softmax and the attention neuron) and ``SpikeContext`` (context product and its
neuron)."""

from __future__ import annotations

import torch
from torch import nn

from spikekernels.nn.conversion import neuron_from_quantizer
from spikekernels.nn.exact_layers import check_token_spikes, require_input_counts
from spikekernels.nn.linear_neuron import SpikeLinearNeuron
from spikekernels.nn.neuron import STBIF, scalar_tensor
from spikekernels.ops.spike_attention import spike_attention_probs, spike_context

__all__ = ["SpikeAttention", "SpikeAttentionProbs", "SpikeContext"]


class SpikeAttentionProbs(STBIF):
    """Scores spike product, Spike-Softmax and the attention-probability neuron, fused
    (``spikekernels.ops.spike_attention_probs``): q ``[T, *batch, M, D]`` and k transposed
    ``[T, *batch, D, N]`` spikes in, int8 spikes ``[T, *batch, M, N]`` out. Per step
    ``X += scale * (q_t @ K_t + Q_{t-1} @ k_t)``, the neuron reads ``Y - Y_prev``, ``Y`` the
    softmax of ``X`` by the library's row function (``exact_math.softmax_rows``).

    An ``STBIF`` (``threshold``, bounds, ``v``, ``count``, ``fanout``, ``watch``) whose state
    also holds ``X`` and ``Y_prev`` (``x_acc``, ``y_prev``). The running counts of q and k
    are their neurons' (each call takes them after its steps). Inference only."""

    STATE = {"x_acc": 0, "y_prev": 0, "v": 0.5, "count": 0}

    def __init__(self, neuron: STBIF, scale: torch.Tensor) -> None:
        super().__init__(neuron.threshold, neuron.level, neuron.signed)
        if neuron.float_out:
            raise ValueError("the attention neuron feeds a spike product: int8 spikes out")
        self.fanout = neuron.fanout
        self.register_buffer("scale", scalar_tensor(scale, "scale"))

    def reset(self) -> None:
        """Back to the fresh state (``X = Y_prev = 0``, ``v = 0.5``, ``count = 0``)."""
        super().reset()
        self.x_acc: torch.Tensor | None = None
        self.y_prev: torch.Tensor | None = None

    def forward(
        self,
        q: torch.Tensor,
        k_t: torch.Tensor,
        q_count: torch.Tensor | None = None,
        k_count: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q_count`` ``[*batch, M, D]`` and ``k_count`` ``[*batch, D, N]``: the counts of the
        q and k neurons after these steps (any strides); None only on a fresh input."""
        require_input_counts(self, q_count=q_count, k_count=k_count)
        stateful = self.stateful_call()  # first: it may replace the state with a copy
        state = (self.x_acc, self.y_prev, self.v, self.count) if stateful else None
        spikes, (self.x_acc, self.y_prev, self.v, self.count) = spike_attention_probs(
            q, k_t, self.scale, self.threshold, self.n_min, self.p_max, q_count, k_count,
            state, active=self.activity, inplace=stateful,
        )  # fmt: skip
        self.keep_last_step(spikes)
        return spikes


class SpikeContext(STBIF):
    """Context spike product and the neuron after it, fused (``spikekernels.ops.
    spike_context``): attention ``[T, *batch, M, N]`` and v ``[T, *batch, N, Dh]`` spikes
    in, int8 spikes out. Per step the neuron reads ``scale * (a_t @ V_t + A_{t-1} @ v_t)``.

    An ``STBIF`` (``threshold``, bounds, ``v``, ``count``, ``fanout``, ``watch``); the
    running counts of a and v are their neurons' (each call takes them after its steps).
    Inference only."""

    def __init__(self, neuron: STBIF, scale: torch.Tensor) -> None:
        super().__init__(neuron.threshold, neuron.level, neuron.signed)
        if neuron.float_out:
            raise ValueError("the context neuron feeds a spike linear: int8 spikes out")
        self.fanout = neuron.fanout
        self.register_buffer("scale", scalar_tensor(scale, "scale"))

    def forward(
        self,
        a: torch.Tensor,
        v: torch.Tensor,
        a_count: torch.Tensor | None = None,
        v_count: torch.Tensor | None = None,
        *,
        merge_heads: bool = False,
    ) -> torch.Tensor:
        """``a_count`` ``[*batch, M, N]`` and ``v_count`` ``[*batch, N, D]``: the counts of the
        attention and value neurons after these steps (any strides); None only on a fresh
        input. ``merge_heads``: spikes ``[T, *batch[:-1], M, H * D]`` (``ops.spike_context``)."""
        require_input_counts(self, a_count=a_count, v_count=v_count)
        stateful = self.stateful_call()  # first: it may replace the state with a copy
        state = (self.v, self.count) if stateful else None
        spikes, (self.v, self.count) = spike_context(
            a, v, self.scale, self.threshold, self.n_min, self.p_max, a_count, v_count, state,
            active=self.activity, merge_heads=merge_heads, inplace=stateful,
        )  # fmt: skip
        self.keep_last_step(spikes)
        return spikes


class SpikeAttention(nn.Module):
    """Multi-head spiking self-attention, ``[T, B, N, C]`` spikes in, ``[T, B, N, C]`` out.

    Per step (SPEC.md §7), with ``H`` heads of ``Dh = C / H`` channels:

    1. ``qkv``: spike linear of the input spikes (threshold ``in_threshold``, the norm1
       neuron's), its bias at global step 0, fused with the q, k and v signed ST-BIF neurons
       (``SpikeLinearNeuron`` with per-channel thresholds: ``quan_q/k/v``'s steps over their
       channel blocks): int8 spikes ``[T, B, N, 3C]``, no float32 linear output in memory.
       The count's channel blocks viewed ``[B, N, H, Dh]`` and transposed are the QANN's
       ``[B, H, N, Dh]`` integers.
    2. ``attn_if`` (``SpikeAttentionProbs``): the scores spike product ``q @ k^T`` with scale
       ``theta_q * theta_k * head_dim^-0.5`` (the QANN's ``scale``), Spike-Softmax over the
       keys and the unsigned ``attn_quan`` neuron, fused: int8 spikes ``[T, B, H, N, N]``.
       It reads q, k and their counts (the qkv neuron's) in place.
    3. ``after_attn_if`` (``SpikeContext``): the context spike product ``attn @ v`` with
       scale ``theta_attn * theta_v`` and the signed ``after_attn_quan`` neuron, fused; its
       spikes come out with the heads merged, ``[T, B, N, C]``.
    4. ``proj``: spike linear (threshold ``theta_after_attn``, bias at step 0) fused with the
       signed ``quan_proj`` neuron (``SpikeLinearNeuron``).

    The output is ``proj``'s: int8 spikes, or ``spikes * theta`` (float32, the residual
    increment) when built with ``float_out=True``. State (neurons, softmax, linear steps) is
    kept between calls until ``reset()``, so chunked time equals a whole run; the products'
    running counts are the neurons' own counts, read in place. Thresholds stay tensors: no
    host sync. Inference only.

    ``attn_if`` and ``after_attn_if`` may be given as the plain neurons (``STBIF``): they are
    wrapped in a ``SpikeAttentionProbs`` and a ``SpikeContext`` with the products' scales.
    """

    def __init__(
        self,
        qkv: SpikeLinearNeuron,
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
        self.num_heads = int(num_heads)
        self.scale = float(scale)
        theta_q, theta_k, theta_v = qkv.threshold.expand(3 * dim)[::dim]
        if not isinstance(attn_if, SpikeAttentionProbs):
            attn_if = SpikeAttentionProbs(attn_if, theta_q * theta_k * self.scale)
        if not isinstance(after_attn_if, SpikeContext):
            after_attn_if = SpikeContext(after_attn_if, attn_if.threshold * theta_v)
        self.attn_if, self.after_attn_if = attn_if, after_attn_if
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
        for m in (self.qkv, self.attn_if, self.after_attn_if, self.proj):
            m.reset()

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """``s``: ``[T, B, N, C]`` int8 spikes of the input neuron."""
        check_token_spikes(s, self.dim, "SpikeAttention")
        t, b, n, c = s.shape
        h = self.num_heads
        dh = c // h
        qkv = self.qkv(s).view(t, b, n, 3, h, dh)
        # strided views of the packed qkv, read in place by the spike products
        q = qkv[:, :, :, 0].transpose(2, 3)  # [T, B, H, N, Dh]
        k_t = qkv[:, :, :, 1].permute(0, 1, 3, 4, 2)  # [T, B, H, Dh, N]
        v = qkv[:, :, :, 2].transpose(2, 3)  # [T, B, H, N, Dh]
        # the running counts of q, k, v are the qkv neuron's count, in the same layouts
        counts = self.qkv.count.view(b, n, 3, h, dh)
        q_count = counts[:, :, 0].transpose(1, 2)  # [B, H, N, Dh]
        k_count = counts[:, :, 1].permute(0, 2, 3, 1)  # [B, H, Dh, N]
        v_count = counts[:, :, 2].transpose(1, 2)
        attn = self.attn_if(q, k_t, q_count, k_count)  # [T, B, H, N, N]
        # [T, B, N, C]: the kernel writes the heads merged, as proj reads them
        context = self.after_attn_if(attn, v, self.attn_if.count, v_count, merge_heads=True)
        return self.proj(context)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, scale={self.scale:.4g}"

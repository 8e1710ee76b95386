"""``SpikeLinearNeuron``: a float-mode spike linear and the ST-BIF neuron it feeds, fused."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from spikekernels.nn.linear import SpikeLinear, TensorCoreWeight
from spikekernels.nn.neuron import STBIF, threshold_tensor
from spikekernels.nn.quant_linear import QuantLinear
from spikekernels.ops._checks import (
    check_int,
    check_tensor,
    check_threshold,
    check_threshold_values,
)
from spikekernels.ops.spike_linear_neuron import spike_linear_neuron


class SpikeLinearNeuron(TensorCoreWeight, STBIF):
    """``SpikeLinear`` followed by ``STBIF``, as one fused op (``ops.spike_linear_neuron``):
    ``[T, *, K]`` spikes in, the neuron's ``[T, *, N]`` spikes out.

    It is an ``STBIF`` (threshold, bounds, ``count``, ``fanout``, ``silent()``; code that
    walks neurons finds it) that also keeps the linear's step counter ``t0`` for the bias
    schedule. ``threshold`` may be per output channel (the q, k, v neurons of one qkv
    linear). ``weight`` is shared with the QANN (``detach()``, not a copy). Where the Triton
    kernels run, a float32 weight is split into its three bf16 parts once and cached, keyed
    by the weight's ``(data_ptr, _version, device)``: an in-place update (``load_state_dict``,
    ``copy_``), a new tensor or a move re-splits. Inference only.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        in_threshold: float | torch.Tensor,
        threshold: float | torch.Tensor,
        level: int,
        signed: bool,
        *,
        bias_steps: int = 1,
        float_out: bool = False,
    ) -> None:
        theta = torch.as_tensor(threshold, dtype=torch.float32).detach().clone()
        theta = theta.reshape(()) if theta.numel() == 1 else theta
        # STBIF checks the bounds and one threshold; the per-channel ones are checked below
        super().__init__(theta.reshape(-1)[0], level, signed, float_out=float_out)
        if check_int(bias_steps, "bias_steps") < 1:
            raise ValueError(f"bias_steps must be >= 1, got {bias_steps}")
        check_tensor(weight, "weight", ndim=2)
        self.out_features, self.in_features = weight.shape
        check_threshold(theta, "threshold", self.out_features, theta, "threshold")
        check_threshold_values(theta, "threshold", validate=False)
        self.threshold = theta
        self.bias_steps = bias_steps
        self.register_buffer("weight", weight.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.register_buffer("in_threshold", threshold_tensor(in_threshold, "in_threshold"))

    @classmethod
    def from_linear_and_neuron(
        cls,
        linear: nn.Linear | SpikeLinear,
        neuron: STBIF | Sequence[STBIF],
        in_threshold: float | torch.Tensor | None = None,
        bias_steps: int | None = None,
    ) -> SpikeLinearNeuron:
        """From a QANN ``nn.Linear`` (give ``in_threshold``, the feeding neuron's) or a float
        ``SpikeLinear``, and the neuron it feeds; or several neurons of one level and sign
        that split the output channels evenly (q, k, v), each keeping its threshold."""
        neurons = [neuron] if isinstance(neuron, STBIF) else list(neuron)
        if isinstance(linear, SpikeLinear):
            if linear.weight_scale is not None:
                raise TypeError("int8 weights are exact mode's: use nn.ExactLinearNeuron")
            in_threshold = linear.in_threshold if in_threshold is None else in_threshold
            bias_steps = linear.bias_steps if bias_steps is None else bias_steps
        elif in_threshold is None:
            raise ValueError("give in_threshold (the feeding neuron's) with an nn.Linear")
        first = neurons[0]
        if any(
            (n.level, n.signed, n.float_out) != (first.level, first.signed, first.float_out)
            for n in neurons
        ):
            raise ValueError("the neurons must share level, signed and float_out")
        out_features = linear.weight.shape[0]
        if out_features % len(neurons):
            raise ValueError(f"{len(neurons)} neurons do not split {out_features} channels evenly")
        theta = torch.stack([n.threshold.reshape(()) for n in neurons])
        theta = theta.repeat_interleave(out_features // len(neurons)) if len(neurons) > 1 else theta
        weight = linear.weight
        if isinstance(linear, QuantLinear):  # float mode of an integer QANN: its float weight
            w_int, ws = linear.int_weights()
            weight = w_int.to(torch.float32) * ws[:, None]
        module = cls(
            weight,
            linear.bias,
            in_threshold,
            theta,
            first.level,
            first.signed,
            bias_steps=1 if bias_steps is None else bias_steps,
            float_out=first.float_out,
        )
        module.fanout = first.fanout
        return module

    def reset(self) -> None:
        """Back to the fresh neuron and global step 0 (the bias is due again)."""
        super().reset()
        self.t0 = 0

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        stateful = self.stateful_call()  # first: it may replace the state with a copy
        spikes, self.v, self.count = spike_linear_neuron(
            s,
            self.kernel_weight(),
            self.in_threshold,
            self.threshold,
            self.n_min,
            self.p_max,
            self.bias,
            t0=self.t0,
            bias_steps=self.bias_steps,
            v=self.v,
            count=self.count,
            float_out=self.float_out,
            active=self.activity,
            inplace=stateful,
        )
        self.t0 += s.shape[0]
        self.keep_last_step(spikes)
        return spikes

    def extra_repr(self) -> str:
        theta = self.threshold.reshape(-1)
        shown = f"{theta.item():.4g}" if theta.numel() == 1 else f"[{theta.numel()} per channel]"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bias_steps={self.bias_steps}, "
            f"weight_dtype={self.weight.dtype}, threshold={shown}, level={self.level}, "
            f"signed={self.signed}, bounds=[{self.n_min}, {self.p_max}]"
        )

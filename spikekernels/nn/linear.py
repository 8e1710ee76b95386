"""``SpikeLinear``: a linear layer fed by ternary spikes, multi-step (SPEC.md §6)."""

from __future__ import annotations

import torch
from torch import nn

from spikekernels.kernels import use_triton
from spikekernels.nn.neuron import FixedDtypeBuffers, threshold_tensor
from spikekernels.nn.plain_state import PlainState
from spikekernels.nn.quant_linear import QuantLinear
from spikekernels.ops._checks import check_int, check_tensor
from spikekernels.ops.spike_linear import spike_linear
from spikekernels.ops.weight_split import split_weight_bf16x3


class TensorCoreWeight:
    """What a module with a float32 ``weight`` buffer passes to the spike linear ops: where the
    Triton kernels run, its exact bf16 split (``split_weight_bf16x3``), made once and cached
    for the weight tensor itself at its ``_version``, so that an in-place update
    (``load_state_dict``, ``copy_``), a new tensor or a move re-splits; else the weight. (The
    cache holds the tensor it split, not its address: a new weight allocated where a freed one
    was, at the same version, is another tensor.) A write through ``weight.data`` is not
    seen: torch gives ``.data`` a version counter of its own, so the split stays the old
    weight's. Write the weight itself (``copy_`` under ``torch.no_grad()``) or assign a new
    one. Under ``torch.compile``, the weight itself: the op splits it inside the graph at each
    call (the same parts, unchecked: ``bf16x3_parts``), since a guard on ``_version`` would
    break the graph at every layer."""

    _split_of: torch.Tensor | None = None
    _split_version: int | None = None
    _split: torch.Tensor | None = None

    def kernel_weight(self) -> torch.Tensor:
        w = self.weight
        if w.dtype != torch.float32 or not use_triton(w):
            return w
        if torch.compiler.is_compiling():  # a few weight-sized elementwise passes a call
            return w
        if self._split_of is not w or self._split_version != w._version:
            self._split, self._split_of, self._split_version = (
                split_weight_bf16x3(w), w, w._version
            )  # fmt: skip
        return self._split


class SpikeLinear(FixedDtypeBuffers, TensorCoreWeight, PlainState, nn.Module):
    """Linear map of ternary spikes ``[T, B, ..., K]`` to float32 ``[T, B, ..., N]``.

    ``out_t = theta * (s_t @ W^T)`` plus the bias on the first ``bias_steps`` global steps
    (all of it at step 0 when ``bias_steps == 1``, the ViT rule; ``bias / bias_steps`` per step
    otherwise). ``theta`` (``in_threshold``) is the threshold of the neuron that produced the
    spikes. The module counts the steps it has seen (``t0``), so feeding time in chunks equals
    one whole call; ``reset()`` starts a new input. ``weight`` may be float32/float16/bfloat16,
    or int8 with a per-output-channel ``weight_scale``. Inference only.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        in_threshold: float | torch.Tensor,
        *,
        bias_steps: int = 1,
        weight_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if check_int(bias_steps, "bias_steps") < 1:
            raise ValueError(f"bias_steps must be >= 1, got {bias_steps}")
        check_tensor(weight, "weight", ndim=2)
        self.out_features, self.in_features = weight.shape
        self.bias_steps = bias_steps
        # detach(), not clone(): a converted network shares the QANN's weights (one copy).
        self.register_buffer("weight", weight.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.register_buffer(
            "weight_scale", None if weight_scale is None else weight_scale.detach()
        )
        # the feeding neuron's step
        self.register_buffer("in_threshold", threshold_tensor(in_threshold, "in_threshold"))
        self.reset()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, in_threshold: float | torch.Tensor, bias_steps: int = 1
    ) -> SpikeLinear:
        """From a QANN ``nn.Linear`` and the threshold of the neuron feeding it. A
        ``QuantLinear`` (int8 weights) keeps its integer weight and per-channel scale, the
        weight its QANN computes with (not the float parameter it was trained from)."""
        if isinstance(linear, QuantLinear):
            w_int, ws = linear.int_weights()
            return cls(w_int, linear.bias, in_threshold, bias_steps=bias_steps, weight_scale=ws)
        return cls(linear.weight, linear.bias, in_threshold, bias_steps=bias_steps)

    def reset(self) -> None:
        """Back to global step 0 (the bias is due again): call between inputs."""
        self.t0 = 0

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        out = spike_linear(
            s,
            self.kernel_weight(),
            self.in_threshold,
            self.bias,
            t0=self.t0,
            bias_steps=self.bias_steps,
            weight_scale=self.weight_scale,
        )
        self.t0 += s.shape[0]
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bias_steps={self.bias_steps}, "
            f"weight_dtype={self.weight.dtype}"
        )

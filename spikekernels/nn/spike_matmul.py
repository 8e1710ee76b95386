"""The spike products of SESA attention as modules that own their running counts (SPEC.md §5).

``SpikeMatmul`` (float mode) emits the scaled increment of the product of the running values
per step; ``RunningSpikeMatmul`` (exact mode's arithmetic, SPEC.md §9.4) emits the running
integer product itself, ``A_t @ B_t`` as int32. Both run ``spikekernels.ops.spike_matmul``.
The converted models run the fused attention ops instead (``ops.spike_attention_probs``,
``ops.exact_attention``); these are the unfused building blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from spikekernels.nn.inplace_state import InPlaceState
from spikekernels.nn.neuron import FixedDtypeBuffers, scalar_tensor
from spikekernels.nn.plain_state import PlainState
from spikekernels.ops.spike_matmul import spike_matmul

__all__ = ["RunningSpikeMatmul", "SpikeMatmul"]


class SpikeMatmul(FixedDtypeBuffers, InPlaceState, PlainState, nn.Module):
    """``out_t = scale * (a_t @ B_t + A_{t-1} @ b_t)`` over ``[T, *batch, M, K]`` x
    ``[T, *batch, K, N]`` ternary int8 spikes; the running counts ``A``, ``B`` are kept
    between calls until ``reset()``, updated in place after the first call
    (``nn.inplace_state``). ``scale``: one-element tensor (a buffer). Float32 out.
    """

    STATE = {"a_acc": 0, "b_acc": 0}

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scalar_tensor(scale, "scale"))
        self.reset()

    def reset(self) -> None:
        """Back to zero running counts: call between inputs."""
        self.a_acc: torch.Tensor | None = None
        self.b_acc: torch.Tensor | None = None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        stateful = self.stateful_call()  # first: it may replace the state with a copy
        out, self.a_acc, self.b_acc = spike_matmul(
            a, b, self.scale, self.a_acc, self.b_acc, inplace=stateful
        )
        return out


class RunningSpikeMatmul(InPlaceState, PlainState, nn.Module):
    """The running integer product ``S_t = A_t @ B_t`` (int32, ``[T, *batch, M, N]``) of two
    ternary spike trains, updated exactly by ``S_t = S_{t-1} + a_t @ B_t + A_{t-1} @ b_t``.

    State (``A``, ``B`` as int8 counts, ``S`` int32) is kept between calls until ``reset()``,
    updated in place after the first call (``nn.inplace_state``).
    The per-step increments come from ``spike_matmul`` with scale 1: integers below 2^24 in
    magnitude (``2 * 128 * K``, K < 65536), so exact in float32.
    """

    STATE = {"a_acc": 0, "b_acc": 0, "product": 0}

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("unit", torch.ones(()))
        self.reset()

    def reset(self) -> None:
        """Back to zero counts and products: call between inputs."""
        self.a_acc: torch.Tensor | None = None
        self.b_acc: torch.Tensor | None = None
        self.product: torch.Tensor | None = None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        stateful = self.stateful_call()  # first: it may replace the state with a copy
        out, self.a_acc, self.b_acc = spike_matmul(
            a, b, self.unit, self.a_acc, self.b_acc, inplace=stateful
        )
        running = torch.cumsum(out.to(torch.int32), dim=0, dtype=torch.int32)
        if stateful:
            running += self.product
            self.product.copy_(running[-1])
        else:
            self.product = running[-1].clone()
        return running

"""``SpikeSoftmax``: multi-step Spike-Softmax as a stateful module (SPEC.md §3)."""

from __future__ import annotations

import torch
from torch import nn

from spikekernels.nn.inplace_state import InPlaceState
from spikekernels.nn.plain_state import PlainState
from spikekernels.ops.softmax import spike_softmax


class SpikeSoftmax(InPlaceState, PlainState, nn.Module):
    """Spike-Softmax over the last dim of ``[T, *rows, N]``, state kept between calls.

    Each call continues the running sum ``X`` and the last softmax ``Y_prev`` (float32,
    ``[*rows, N]``) from the previous call until ``reset()``, so feeding time in chunks gives
    the same outputs as one whole call. ``forward`` returns ``Y_t - Y_{t-1}`` per step, in the
    input dtype. ``-inf`` entries are masked; a fully masked row gives zeros. The state is
    updated in place after the first call (``nn.inplace_state``): keep a ``clone()`` of what
    must outlive the next call. Inference only.
    """

    STATE = {"x_acc": 0, "y_prev": 0}

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        """Back to the fresh state (``X = 0``, ``Y_prev = 0``): call between inputs."""
        self.x_acc: torch.Tensor | None = None
        self.y_prev: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stateful = self.stateful_call()  # first: it may replace the state with a copy
        out, self.x_acc, self.y_prev = spike_softmax(x, self.x_acc, self.y_prev, inplace=stateful)
        return out

"""``TargetNeuron``: the target-driven ST-BIF neuron of exact mode (SPEC.md §9.3)."""

from __future__ import annotations

import torch
from torch import nn

from spikekernels.levels import level_bounds
from spikekernels.nn.inplace_state import InPlaceState
from spikekernels.nn.neuron import ActivityWatcher, FixedDtypeBuffers, threshold_tensor
from spikekernels.nn.plain_state import PlainState
from spikekernels.ops._checks import check_flag
from spikekernels.ops.target import target_spikes

__all__ = ["TargetNeuron"]


class TargetNeuron(FixedDtypeBuffers, ActivityWatcher, InPlaceState, PlainState, nn.Module):
    """Exact mode's neuron over ``[T, B, ...]``: it fires toward the quantizer's integer.

    At each step, with ``y_t`` the *current value* of its input (not an increment):
    ``target = clamp(floor(y_t / theta + 1/2), n_min, p_max)``; ``sigma = sign(target - c)``;
    ``c += sigma``; output ``sigma`` (int8). Its state is the int8 count ``c`` only, kept
    between calls until ``reset()``. ``threshold`` is one value or one per channel (last dim),
    so one qkv output can feed the q, k and v neurons. With exact input this is SPEC.md §2's
    ST-BIF rule; at silence ``count`` is the QANN quantizer's integer. ``fanout``: synaptic
    operations one spike causes downstream (set by ``spikekernels.convert``; for SOP counts).
    ``watch(flags)`` makes its op record which samples fired (the runner's silence test).
    Its state is updated in place after the first call (``nn.inplace_state``). Inference only.
    """

    STATE = {"count": 0}

    def __init__(
        self, threshold: float | torch.Tensor, level: int, signed: bool, *, fanout: int = 0
    ) -> None:
        super().__init__()
        check_flag(signed, "signed")
        self.level = level
        self.signed = signed
        self.n_min, self.p_max = level_bounds(level, signed)  # TypeError for a float level
        if self.n_min < -128 or self.p_max > 127:
            raise ValueError(
                f"level {level} ({'signed' if signed else 'unsigned'}) needs counts in "
                f"[{self.n_min}, {self.p_max}], which overflow the int8 count of exact mode "
                "(levels up to 256 signed / 128 unsigned)"
            )
        self.register_buffer("threshold", threshold_tensor(threshold, per_channel=True))
        self.fanout = int(fanout)
        self.reset()

    def reset(self) -> None:
        """Back to the fresh state (count 0): call between inputs. Keeps ``activity``."""
        self.count: torch.Tensor | None = None

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        stateful = self.stateful_call()  # first: it may replace the state with a copy
        spikes, self.count = target_spikes(
            value,
            self.threshold,
            self.n_min,
            self.p_max,
            self.count,
            active=self.activity,
            inplace=stateful,
        )
        return spikes

    def extra_repr(self) -> str:
        theta = self.threshold
        shown = f"{theta.item():.4g}" if theta.numel() == 1 else f"[{theta.numel()} channels]"
        return (
            f"threshold={shown}, level={self.level}, signed={self.signed}, "
            f"bounds=[{self.n_min}, {self.p_max}]"
        )


class SettledRowsNeuron(TargetNeuron):
    """A neuron of an exact op that keeps its own settled rows (``ExactLinearNeuron``, the
    fused attention's two): its state is ``count`` and ``row_settled`` (int32, one flag per
    row of its output: 1 where the row did not fire at the last step; 0, the fresh value,
    promises nothing). The op (``ops.exact_linear``, ``ops.exact_attention``) reads the flags
    and writes the call's last step's in place, so the next call skips the neurons of rows
    that sit at their targets from its first step on."""

    STATE = {"count": 0, "row_settled": 0}

    def reset(self) -> None:
        """Back to the fresh state: count 0, no row known settled."""
        super().reset()
        self.row_settled: torch.Tensor | None = None

    def forget_settled(self, shape: torch.Size, device: torch.device) -> None:
        """``row_settled`` zeros (no row promised settled), in place where it exists with that
        shape and device (the state keeps its address for a replayed graph)."""
        flags = self.row_settled
        if flags is None or tuple(flags.shape) != tuple(shape) or flags.device != device:
            self.row_settled = torch.zeros(shape, dtype=torch.int32, device=device)
        else:
            self.row_settled.zero_()

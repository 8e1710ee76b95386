"""``STBIF``: the multi-step ST-BIF neuron as a stateful module (SPEC.md §2)."""

from __future__ import annotations

import torch
from torch import nn

from spikekernels.levels import level_bounds
from spikekernels.nn.inplace_state import InPlaceState
from spikekernels.nn.plain_state import PlainState
from spikekernels.ops._checks import check_flag, check_threshold_values
from spikekernels.ops.neuron import st_bif


def scalar_tensor(value: object, name: str) -> torch.Tensor:
    """One value as a 0-d float32 copy (a module's scale or gain): never the caller's storage,
    so that later edits of a QANN parameter leave a converted module alone."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    theta = torch.as_tensor(value, dtype=torch.float32).detach().clone()
    if theta.numel() != 1:
        raise ValueError(
            f"{name} must be one value (a float or a one-element tensor), got shape "
            f"{tuple(theta.shape)}"
        )
    return theta.reshape(())


def threshold_tensor(value: object, name: str = "threshold", *, per_channel: bool = False):
    """A module's threshold as a float32 copy: from a Python number or a tensor, one value
    (0-d), or with ``per_channel`` one value or one per channel (``[C]``, kept as given);
    positive, finite and normal (a data read: checked on CPU tensors only, no GPU sync)."""
    if not per_channel:
        theta = scalar_tensor(value, name)
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
            raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
        theta = torch.as_tensor(value, dtype=torch.float32).detach().clone()
        if theta.dim() > 1:
            raise ValueError(
                f"{name} must be one value or one per channel [C], got shape {tuple(theta.shape)}"
            )
    check_threshold_values(theta, name)
    return theta


class FixedDtypeBuffers:
    """Module casts (``.half()``, ``.to(torch.bfloat16)``, a parent's ``.to(...)``) move the
    buffers named in ``_FIXED_DTYPE`` but keep their dtype: a neuron's steps, a product's
    scale or gain, an int8 weight's scale, exact mode's float64 residual constant. A step
    rounded to half would change which spikes fire (the ops take half inputs with float32
    steps). Devices move as usual."""

    _FIXED_DTYPE: tuple[str, ...] = (
        "threshold", "in_threshold", "scale", "gain", "theta_a", "theta_v", "weight_scale",
        "residual_constant",
    )  # fmt: skip

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers.get(name) for name in self._FIXED_DTYPE}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers.get(name)
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self


class ActivityWatcher:
    """What a neuron module needs for ``watch``: the flags its op records into (``activity``,
    passed as the op's ``active``), kept across ``reset()``."""

    activity: torch.Tensor | None = None

    def watch(self, flags: torch.Tensor | None) -> None:
        """Record into ``flags`` (int32 ``[T, B]`` zeros, the next call's steps and batch, this
        neuron's own) which samples fired at which step: the op sets ``flags[t, b] = 1`` as
        its kernel writes the spikes, so the runner needs no extra pass over them, and a
        float neuron's ``silent()`` reads their last step (no copy of its spikes kept). None
        stops."""
        self.activity = flags


class STBIF(FixedDtypeBuffers, ActivityWatcher, InPlaceState, PlainState, nn.Module):
    """Multi-step ST-BIF neuron over ``[T, B, ...]``, state kept between calls until ``reset()``.

    Built from a QANN quantizer's step (``threshold``) and its ``level`` / ``signed`` bounds.
    ``forward`` returns int8 spikes in {-1, 0, 1} (``float_out=False``) or ``sigma * theta``
    in the input dtype. ``count`` is the spike count (after silence it equals the
    quantizer's integer), ``silent()`` / ``active_samples()`` report as tensors whether the
    neuron fired at the last step (no host sync); ``watch(flags)`` makes its op record which
    samples fired (the runner's silence test). ``fanout``: synaptic operations one spike
    causes downstream (set by ``spikekernels.convert``; for SOP counts). The state (``v``,
    ``count``) is updated in place after the first call (``nn.inplace_state``): keep a
    ``clone()`` of what must outlive the next call. Inference only.
    """

    STATE = {"v": 0.5, "count": 0}
    fanout: int = 0

    def __init__(
        self,
        threshold: float | torch.Tensor,
        level: int,
        signed: bool,
        *,
        float_out: bool = False,
    ) -> None:
        super().__init__()
        check_flag(signed, "signed")
        check_flag(float_out, "float_out")
        self.n_min, self.p_max = level_bounds(level, signed)  # TypeError for a float level
        self.level = level
        self.signed = signed
        self.float_out = float_out
        self.register_buffer("threshold", threshold_tensor(threshold))
        self.reset()

    def reset(self) -> None:
        """Back to the fresh state (``v = 0.5``, count 0): call between inputs."""
        self.v: torch.Tensor | None = None
        self.count: torch.Tensor | None = None  # the spike count (integer), None when fresh
        # The last step's spikes, or while watched the flags' last step (which samples
        # fired): silence is derived from them only when asked.
        self.last_spikes: torch.Tensor | None = None  # [B, ...]
        self.last_fired: torch.Tensor | None = None  # [B] int32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stateful = self.stateful_call()  # first: it may replace the state with a copy
        spikes, self.v, self.count = st_bif(
            x,
            self.threshold,
            self.n_min,
            self.p_max,
            self.v,
            self.count,
            float_out=self.float_out,
            active=self.activity,
            inplace=stateful,
        )
        self.keep_last_step(spikes)
        return spikes

    def keep_last_step(self, spikes: torch.Tensor) -> None:
        """Keep what ``silent()`` needs of the last step: while watched, the last step of the
        flags the op recorded (a view: no work); else a copy of ``spikes[-1]``, since a view
        would keep the whole chunk's ``[T, B, ...]`` output alive between calls (a launch
        and a copy a call, which the runner's neurons, watched, do not pay)."""
        if self.activity is not None:
            self.last_fired, self.last_spikes = self.activity[-1], None
        else:
            self.last_fired, self.last_spikes = None, spikes[-1].clone()

    def silent(self) -> torch.Tensor:
        """0-d bool tensor: no element fired at the last step (True before any input)."""
        if self.last_fired is not None:
            return ~(self.last_fired != 0).any()
        if self.last_spikes is None:
            return torch.ones((), dtype=torch.bool, device=self.threshold.device)
        return ~self.last_spikes.any()

    def active_samples(self) -> torch.Tensor | None:
        """``[B]`` bool: which samples (dim 0 of a step) fired at the last step."""
        if self.last_fired is not None:
            return self.last_fired != 0
        if self.last_spikes is None:
            return None
        return self.last_spikes.reshape(self.last_spikes.shape[0], -1).any(dim=1)

    def extra_repr(self) -> str:
        return (
            f"threshold={self.threshold.item():.4g}, level={self.level}, signed={self.signed}, "
            f"bounds=[{self.n_min}, {self.p_max}]"
        )

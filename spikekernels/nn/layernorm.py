"""``SpikeLayerNorm``: multi-step Spike-LayerNorm as a stateful module (SPEC.md §4), and
``SpikeLayerNormNeuron``, the same fused with the ST-BIF neuron it feeds (§4 then §2)."""

from __future__ import annotations

import math

import torch
from torch import nn

from spikekernels.nn.inplace_state import InPlaceState
from spikekernels.nn.neuron import STBIF
from spikekernels.nn.plain_state import PlainState
from spikekernels.ops._checks import check_float, check_int, check_tensor
from spikekernels.ops.layernorm import spike_layernorm
from spikekernels.ops.layernorm_neuron import spike_layernorm_neuron


def _check_norm(num_channels: object, eps: object, weight: object, bias: object) -> None:
    """The constructor's arguments, named in each error (the op checks them again per call,
    but a module built wrong should fail where it is built)."""
    if check_int(num_channels, "num_channels") < 1:
        raise ValueError(f"num_channels must be >= 1, got {num_channels}")
    if not (math.isfinite(check_float(eps, "eps")) and eps >= 0):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(check_tensor(t, name).shape) != (num_channels,):
            raise ValueError(f"{name} must have shape ({num_channels},), got {tuple(t.shape)}")


def _check_channels(x: object, num_channels: int) -> None:
    """``x``'s last dim is the module's channels (an unaffine norm would take any)."""
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] != num_channels:
        raise ValueError(
            f"x must have {num_channels} channels (last dim), got shape {tuple(x.shape)}"
        )


class SpikeLayerNorm(InPlaceState, PlainState, nn.Module):
    """Spike-LayerNorm over the last dim of ``[T, B, ..., C]``, state kept until ``reset()``.

    ``X = X + h_t; Y = layer_norm(X, weight, bias, eps); out_t = Y - Y_prev``: the outputs
    summed over steps equal the LayerNorm of the summed input. Build it with
    ``SpikeLayerNorm.from_layernorm(ln)``, which copies the QANN LayerNorm's weight, bias and
    **eps** (1e-6 for the ViT; the official SpikeZIP-TF SNN code used 1e-5 whatever the QANN
    had, which we do not copy). Output in the input dtype; state float32, updated in place
    after the first call (``nn.inplace_state``): keep a ``clone()`` of what must outlive the
    next call. Inference only.
    """

    STATE = {"x_acc": 0, "y_prev": 0}

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-6,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        _check_norm(num_channels, eps, weight, bias)
        self.num_channels = num_channels
        self.eps = float(eps)
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
        _check_channels(x, self.num_channels)
        stateful = self.stateful_call()  # first: it may replace the state with a copy
        out, self.x_acc, self.y_prev = spike_layernorm(
            x, self.weight, self.bias, self.eps, self.x_acc, self.y_prev, inplace=stateful
        )
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, eps={self.eps:g}, affine="
            f"{self.weight is not None}, bias={self.bias is not None}"
        )


class SpikeLayerNormNeuron(STBIF):
    """``SpikeLayerNorm`` followed by ``STBIF``, as one fused op (``ops.spike_layernorm_neuron``):
    ``[T, B, ..., C]`` increments in, the neuron's int8 ``[T, B, ..., C]`` spikes out, the
    same bits as the two modules in turn.

    It is an ``STBIF`` (threshold, bounds, ``count``, ``fanout``, ``silent()``, ``watch()``;
    code that walks neurons finds it) that also holds the LayerNorm's ``weight``, ``bias``
    and ``eps`` and its state ``x_acc``, ``y_prev`` until ``reset()``. Build it with
    ``from_layernorm_and_neuron``. Inference only.
    """

    STATE = {"x_acc": 0, "y_prev": 0, "v": 0.5, "count": 0}

    def __init__(
        self,
        num_channels: int,
        threshold: float | torch.Tensor,
        level: int,
        signed: bool,
        *,
        eps: float = 1e-6,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__(threshold, level, signed)
        _check_norm(num_channels, eps, weight, bias)
        self.num_channels = num_channels
        self.eps = float(eps)
        # detach(), not clone(): a converted network shares the QANN's weights (one copy).
        self.register_buffer("weight", None if weight is None else weight.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())

    @classmethod
    def from_layernorm_and_neuron(
        cls, ln: nn.LayerNorm | SpikeLayerNorm, neuron: STBIF
    ) -> SpikeLayerNormNeuron:
        """From a QANN ``nn.LayerNorm`` (eps copied, as ``SpikeLayerNorm.from_layernorm``) or
        a ``SpikeLayerNorm``, and the neuron it feeds (int8 spikes: not ``float_out``)."""
        norm = ln if isinstance(ln, SpikeLayerNorm) else SpikeLayerNorm.from_layernorm(ln)
        if not isinstance(neuron, STBIF):
            raise TypeError(f"neuron must be an STBIF, got {type(neuron).__name__}")
        if neuron.float_out:
            raise ValueError("the fused op writes int8 spikes: neuron must not be float_out")
        module = cls(
            norm.num_channels,
            neuron.threshold,
            neuron.level,
            neuron.signed,
            eps=norm.eps,
            weight=norm.weight,
            bias=norm.bias,
        )
        module.fanout = neuron.fanout
        return module

    def reset(self) -> None:
        """Back to the fresh state (``X = 0``, ``Y_prev = 0``, ``v = 0.5``, count 0)."""
        super().reset()
        self.x_acc: torch.Tensor | None = None
        self.y_prev: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None

    def take_residual(self) -> torch.Tensor:
        """The stream of the last ``residual_out`` call, released here (a whole stream)."""
        residual, self.residual = self.residual, None
        if residual is None:
            raise RuntimeError("no residual stream: call with residual_out=True first")
        return residual

    def forward(
        self,
        x: torch.Tensor,
        *branches: tuple[torch.Tensor, torch.Tensor],
        residual_out: bool = False,
    ) -> torch.Tensor:
        """``x``: ``[T, *, C]`` increments; ``branches``: up to two pending residual branches
        ``(int8 spikes like x, threshold)`` added to ``x`` in order before the LayerNorm
        (``ops.spike_layernorm_neuron``); with ``residual_out`` the stream with them is kept
        for ``take_residual()``. Returns the int8 spikes."""
        _check_channels(x, self.num_channels)
        if len(branches) > 2:
            raise ValueError(f"at most two pending branches, got {len(branches)}")
        kwargs = {}
        for prefix, (spikes, theta) in zip(("branch", "branch2"), branches, strict=False):
            kwargs |= {f"{prefix}_spikes": spikes, f"{prefix}_threshold": theta}
        stateful = self.stateful_call()  # first: it may replace the state with a copy
        spikes, self.x_acc, self.y_prev, self.v, self.count, *residual = spike_layernorm_neuron(
            x,
            self.weight,
            self.bias,
            self.eps,
            self.threshold,
            self.n_min,
            self.p_max,
            self.x_acc,
            self.y_prev,
            self.v,
            self.count,
            **kwargs,
            residual_out=residual_out,
            active=self.activity,
            inplace=stateful,
        )
        if residual_out:
            self.residual = residual[0]
        self.keep_last_step(spikes)
        return spikes

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, eps={self.eps:g}, affine={self.weight is not None}, "
            f"bias={self.bias is not None}, {super().extra_repr()}"
        )

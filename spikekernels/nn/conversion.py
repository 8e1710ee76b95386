"""Where a QANN quantizer becomes a neuron: the one place, for every converter.

A quantizer (``spikekernels.nn.Quantizer`` or anything with the official ``MyQuan``
attributes ``s``, ``level``, ``sym``) becomes an ``STBIF`` (float mode, SPEC.md §2) or a
``TargetNeuron`` (exact mode, §9.3) with its step as threshold and its level bounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from spikekernels.nn.neuron import STBIF
from spikekernels.nn.target_neuron import TargetNeuron

__all__ = ["neuron_from_quantizer", "quantizer_signature", "target_neuron_from_quantizers"]


def quantizer_signature(quantizer: nn.Module) -> tuple[torch.Tensor, int, bool]:
    """``(step, level, signed)`` of a quantizer; TypeError/ValueError when it is none."""
    if not hasattr(quantizer, "s") or not (
        hasattr(quantizer, "signed") or hasattr(quantizer, "sym")
    ):
        raise TypeError(f"expected a quantizer with a step `s`, got {type(quantizer).__name__}")
    if not getattr(quantizer, "enabled", True):
        raise ValueError("a disabled quantizer (float network) has no spiking equivalent")
    signed = bool(getattr(quantizer, "signed", getattr(quantizer, "sym", False)))
    return quantizer.s.detach().to(torch.float32).reshape(()), int(quantizer.level), signed


def neuron_from_quantizer(quantizer: nn.Module, *, float_out: bool = False) -> STBIF:
    """The ST-BIF neuron that replaces ``quantizer``: threshold ``s``, the same bounds."""
    step, level, signed = quantizer_signature(quantizer)
    return STBIF(step, level, signed, float_out=float_out)


def target_neuron_from_quantizers(
    quantizers: Sequence[nn.Module], channels: Sequence[int] | None = None
) -> TargetNeuron:
    """One target-driven neuron for one quantizer, or for several that share level and sign
    and quantize consecutive channel blocks of one tensor (``channels[i]`` channels each:
    the q, k, v quantizers of one qkv output). Per-channel thresholds in the second case."""
    sigs = [quantizer_signature(q) for q in quantizers]
    if len({(level, signed) for _, level, signed in sigs}) != 1:
        raise ValueError("quantizers sharing one neuron must have the same level and sign")
    _, level, signed = sigs[0]
    if channels is None:
        if len(sigs) != 1:
            raise ValueError("give the channels of each quantizer when there are several")
        return TargetNeuron(sigs[0][0], level, signed)
    theta = torch.cat([step.expand(c) for (step, _, _), c in zip(sigs, channels, strict=True)])
    return TargetNeuron(theta, level, signed)

"""``QuantLinear``: a QANN linear with per-channel int8 weights (SPEC.md §9.1)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from spikekernels.exact_math import int_weights

__all__ = ["QuantLinear", "all_integer"]


def all_integer(linears: Iterable[tuple[str, nn.Module]]) -> bool:
    """True when every one of the named ``linears`` is a ``QuantLinear`` (an exact QANN's),
    False when none is. A model with some of each is neither a float nor an exact QANN:
    ValueError naming one of each kind."""
    kinds: dict[bool, str] = {}
    for name, module in linears:
        kinds.setdefault(isinstance(module, QuantLinear), name)
    if len(kinds) > 1:
        raise ValueError(
            f"the QANN mixes integer-weight linears (e.g. `{kinds[True]}`) and float ones "
            f"(e.g. `{kinds[False]}`): call spikekernels.models.quantize_weights(qann) to make "
            "every linear integer"
        )
    return True in kinds


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose effective weight is ``ws[n] * W_int[n, k]``, int8 per output channel.

    The float weight stays the parameter (the state_dict is an ``nn.Linear``'s, so checkpoints
    round-trip and QAT keeps training it); ``int_weights()`` derives ``(W_int int8, ws)`` from
    it by SPEC.md §9.1. ``forward`` is the float fake-quantized linear, with a straight-through
    estimator for the weight rounding: what training uses. The exact integer forward of an
    evaluating QANN lives in ``QuantViT`` (it needs the input's integers and step).
    """

    weight_bits = 8

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantLinear:
        """A QuantLinear sharing ``linear``'s parameters (no copy)."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = linear.in_features, linear.out_features
        q.weight = linear.weight
        q.bias = linear.bias
        return q

    def int_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_int int8 [N, K], ws float32 [N])`` of the current float weight."""
        return int_weights(self.weight)

    def dequantized_weight(self) -> torch.Tensor:
        """``ws[:, None] * W_int`` with the gradient of the float weight (straight through)."""
        w_int, ws = self.int_weights()
        w_q = (w_int.to(torch.float32) * ws[:, None]).to(self.weight.dtype)
        return self.weight + (w_q - self.weight).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_bits={self.weight_bits}"

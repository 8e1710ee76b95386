"""Quantizer levels and the rounding rule (SPEC.md §1), shared by the library and its oracle.

``level_bounds`` gives a quantizer's integer range, ``quantize`` the QANN's round-half-up
quantization, ``count_dtype`` the narrowest integer type that holds a neuron's count.
"""

from __future__ import annotations

import torch

__all__ = ["count_dtype", "level_bounds", "quantize"]


def level_bounds(level: int, signed: bool) -> tuple[int, int]:
    """Integer bounds ``(n_min, p_max)`` of a quantizer with ``level`` levels (SPEC.md §1).

    Signed: ``[-(L // 2), L // 2 - 1]``; unsigned: ``[0, L - 1]``.
    """
    if isinstance(level, bool) or not isinstance(level, int):
        raise TypeError(f"level must be an int, got {type(level).__name__}")
    if level < 2:
        raise ValueError(f"level must be >= 2, got {level}")
    if signed:
        return -(level // 2), level // 2 - 1
    return 0, level - 1


def quantize(x: torch.Tensor, s: torch.Tensor, n_min: int, p_max: int) -> torch.Tensor:
    """``s * clamp(floor(x / s + 1/2), n_min, p_max)``: round half up (SPEC.md §1)."""
    return s * torch.clamp(torch.floor(x / s + 0.5), n_min, p_max)


def count_dtype(n_min: int, p_max: int) -> torch.dtype:
    """The narrowest signed integer dtype that holds every count in ``[n_min, p_max]``.

    Fresh ST-BIF state uses it: int8 for every level the paper uses, which is also what the
    spike product needs for its running counts.
    """
    for dtype in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= n_min and p_max <= info.max:
            return dtype
    return torch.int64

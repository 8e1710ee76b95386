"""Activity flags carved from one slab of zeros: a composite module's kernels set flags in
several int32 tensors that must start at zero, and each zeros of its own is a memset launch
on a GPU. A module states the shapes it needs; its caller zeros them all at once and hands
down a flat slab, which the module carves into views (an exact ViT: one memset a chunk for
all its blocks, where each block once made four). Every flag here says that a row fired and
a reader skips only rows whose flag is clear: a slab that was not zeroed costs work, never
a bit (``tests/test_flags.py``), so the zeros are not checked (it would read the slab)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# each view starts on a 128-byte boundary, so that a kernel handed one sees the alignment a
# fresh allocation has (Triton specialises its loads on a pointer's divisibility by 16)
_ALIGN = 32  # int32 elements


def _padded(numel: int) -> int:
    return -(-numel // _ALIGN) * _ALIGN


def slab_numel(shapes: Sequence[Sequence[int]]) -> int:
    """The int32 elements of a slab that ``carve`` cuts into ``shapes``."""
    return sum(_padded(math.prod(shape)) for shape in shapes)


def carve(slab: torch.Tensor | None, shapes: Sequence[Sequence[int]], device: torch.device):
    """Views of ``shapes`` cut in order from ``slab`` (int32 zeros, flat and contiguous, at
    least ``slab_numel(shapes)`` elements), or from a slab of zeros made here where it is
    None. The views share nothing and each starts on a 128-byte boundary."""
    need = slab_numel(shapes)
    if slab is None:
        slab = torch.zeros(need, dtype=torch.int32, device=device)
    elif (
        slab.dtype != torch.int32
        or slab.dim() != 1
        or not slab.is_contiguous()
        or slab.numel() < need
        or slab.device != device
    ):
        raise ValueError(
            f"flags must be a contiguous 1-D int32 tensor of at least {need} elements on "
            f"{device}, got {slab.dtype} of shape {tuple(slab.shape)} on {slab.device}"
        )
    views, start = [], 0
    for shape in shapes:
        numel = math.prod(shape)
        views.append(slab[start : start + numel].view(shape))
        start += _padded(numel)
    return views

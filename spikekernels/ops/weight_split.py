"""A float32 weight as three bfloat16 parts, so that spike linears run on bf16 tensor cores.

``w = w1 + w2 + w3`` exactly, each part bfloat16: ``w1 = bf16(w)``, ``r = w - w1`` (exact in
float32), ``w2 = bf16(r)``, ``w3 = bf16(r - w2)``. Each part holds 8 significant bits and
together they hold float32's 24. Spikes are -1, 0 or +1, so every product ``s * w_i`` is exact
in a bf16 x bf16 -> fp32 MMA: three bf16 dots into one float32 accumulator compute the same
sum of exact products as an IEEE float32 dot, only in another order.
"""

from __future__ import annotations

import torch

from spikekernels.ops._checks import check_tensor

# Every nonzero |w| >= 2^-103 has its lowest significant bit at >= 2^-126, so its parts and
# every partial sum of parts are 0 or normal float32: nothing a GPU flushes to zero.
SMALLEST_SPLIT_WEIGHT = 2.0**-103
SPLIT_DOC = "the three bf16 parts of a float32 weight, from split_weight_bf16x3"


def _bf16_toward_zero(w: torch.Tensor) -> torch.Tensor:
    """bf16 rounded toward zero: the top 16 bits of each float32 pattern (exact in bf16)."""
    return (w.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def bf16x3_parts(weight: torch.Tensor) -> torch.Tensor:
    """``[3, *weight.shape]`` bfloat16 parts of ``weight`` (float32), unchecked: no data read,
    so no host sync (the per-call split of a GPU op)."""
    w = weight.to(torch.float32)
    w1 = w.to(torch.bfloat16)
    # Within half a bf16 ulp of float32's max, round to nearest gives inf: truncate instead,
    # w2 too, so that no partial sum (w1 + w2) exceeds |w| and overflows.
    toward_zero = torch.isinf(w1) & torch.isfinite(w)
    w1 = torch.where(toward_zero, _bf16_toward_zero(w), w1)
    r = w - w1.to(torch.float32)
    w2 = torch.where(toward_zero, _bf16_toward_zero(r), r.to(torch.bfloat16))
    w3 = (r - w2.to(torch.float32)).to(torch.bfloat16)
    return torch.stack((w1, w2, w3))


def merge_bf16x3(parts: torch.Tensor) -> torch.Tensor:
    """The float32 weight back from its parts ``[3, ...]``: ``(w1 + w2) + w3``, exact for a
    split (``w1 + w2`` spans at most 18 bits, and the whole sum is the float32 ``w``)."""
    p = parts.to(torch.float32)
    return (p[0] + p[1]) + p[2]


def split_weight_bf16x3(weight: torch.Tensor) -> torch.Tensor:
    """Split a float32 weight ``[N, K]`` into ``[3, N, K]`` bfloat16 parts summing to it exactly.

    Split once per layer (a module caches it) and pass the parts to ``spike_linear`` or
    ``spike_linear_neuron`` as the weight: a GPU then runs the layer as three bf16 tensor-core
    dots instead of float32 CUDA-core FMAs, with the same exact products.

    Raises ``ValueError`` (naming ``weight``) for a non-finite weight, or a nonzero one below
    ``2^-103`` in magnitude (its smallest parts would be float32 subnormals, which a GPU may
    flush to zero). Checks that the parts sum to the weight exactly (reads the data: a host
    sync on a GPU, once per split).
    """
    check_tensor(weight, "weight", dtypes=(torch.float32,), ndim=2)
    if weight.device.type == "meta":  # shapes only: no data to check
        return bf16x3_parts(weight)
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight must be finite to be split into bf16 parts")
    tiny = (weight != 0) & (weight.abs() < SMALLEST_SPLIT_WEIGHT)
    if bool(tiny.any()):
        raise ValueError(
            f"weight has {int(tiny.sum())} nonzero elements below 2^-103 in magnitude: their "
            "bf16 parts would be float32 subnormals, which the GPU may flush to zero"
        )
    parts = bf16x3_parts(weight)
    if not torch.equal(merge_bf16x3(parts), weight):
        raise ValueError("weight does not split exactly into three bf16 parts")
    return parts

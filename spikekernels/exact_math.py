"""Exact mode's arithmetic (SPEC.md §9), written once and called by both sides.

The integer-weight QANN (``spikekernels.models.QuantViT`` with ``weight_bits=8``) and its
exact SNN compute every float value a quantizer or a target-driven neuron reads with the
functions below, so the bits agree:

- integer parts are exact (int32 state, or float64 products of small integers);
- every float operation is one PyTorch elementwise op: one IEEE rounding (``+ - * /`` and
  ``floor`` are correctly rounded on every device; ``sqrt`` is made so by ``sqrt_rn``), never
  a fused multiply-add
  (eager PyTorch launches ``mul`` and ``add`` separately);
- reductions are ``tree_sum``: pairwise additions of neighbours whose order depends on the row
  length alone, and ``exp`` is ``exp_rows``'s polynomial of such operations. So LayerNorm and
  softmax give the same bits for a row whatever the batch, the number of time steps, the thread
  count or the vectorisation around it, on CPU and GPU alike; a fused kernel reproduces them by
  running the same operations in the same order.

Not for autograd: the QANN trains through its float path (``QuantLinear`` in training mode).
"""

from __future__ import annotations

import torch

__all__ = [
    "INT32_MAX_TERMS",
    "INT8_WEIGHT_MAX",
    "context_value",
    "exp_rows",
    "int_matmul",
    "int_weights",
    "layer_norm_rows",
    "linear_value",
    "pool_patch_tokens",
    "residual_read",
    "score_gain",
    "score_value",
    "softmax_rows",
    "sqrt_rn",
    "target",
    "tree_sum",
]

INT8_WEIGHT_MAX = 127
# A sum of products of 8-bit integers (|.| <= 128 each) stays inside int32 for up to this many
# terms: 128 * 128 * (2^17 - 1) < 2^31.
INT32_MAX_TERMS = 2**17 - 1


def int_weights(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 weights (SPEC.md §9.1): ``(W_int int8, ws float32)``.

    ``ws[n] = max_k |W[n, k]| / 127`` (1 where the row is all zero) and
    ``W_int = clamp(round_half_even(W / ws), -127, 127)``, in float32.
    """
    w = weight.detach().to(torch.float32)
    ws = divide_by_count(w.abs().amax(dim=1), INT8_WEIGHT_MAX)  # the same bits on every device
    ws = torch.where(ws > 0, ws, torch.ones_like(ws))
    w_int = torch.clamp(torch.round(w / ws[:, None]), -INT8_WEIGHT_MAX, INT8_WEIGHT_MAX)
    return w_int.to(torch.int8), ws


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of 8-bit integer tensors (counts, int8 weights), exact, as int32, on any
    device. Sums of more than ``INT32_MAX_TERMS`` terms could pass int32: refused.

    float64 products, exact far beyond int32's range, which CPU and CUDA both run (torch has
    no int32 matmul on CUDA).
    """
    if a.shape[-1] > INT32_MAX_TERMS:
        raise ValueError(
            f"int_matmul sums K = {a.shape[-1]} products; at most {INT32_MAX_TERMS} keep an "
            "int32 result exact"
        )
    return torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.int32)


def linear_value(acc: torch.Tensor, m: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``fl32(fl32(m[n] * fl32(acc)) + b[n])``: a linear's value from its integer accumulator.

    ``acc`` int32 (or exact float64) ``[..., N]``; ``m = fl32(theta_in * ws)`` ``[N]``.
    """
    y = m * acc.to(torch.float32)
    return y if bias is None else y + bias.to(torch.float32)


def target(y: torch.Tensor, threshold: torch.Tensor, n_min: int, p_max: int) -> torch.Tensor:
    """``clamp(floor(y / theta + 1/2), n_min, p_max)`` in float32 (SPEC.md §1, §9.3).

    ``threshold`` is one element or per channel (broadcast over the last dim). Returned as
    float32 integers; NaN stays NaN (the callers decide what a NaN input means).
    """
    return torch.clamp(torch.floor(y / threshold + 0.5), n_min, p_max)


def score_gain(theta_q: torch.Tensor, theta_k: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``g = fl32(fl32(theta_q * theta_k) * fl32(head_dim^-1/2))`` (SPEC.md §9.2)."""
    inv_sqrt = torch.tensor(head_dim**-0.5, dtype=torch.float32, device=theta_q.device)
    return (theta_q.to(torch.float32) * theta_k.to(torch.float32)) * inv_sqrt


def score_value(s: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """``z = fl32(g * fl32(S))`` from the exact integer scores ``S``."""
    return gain * s.to(torch.float32)


def context_value(z: torch.Tensor, theta_a: torch.Tensor, theta_v: torch.Tensor) -> torch.Tensor:
    """``fl32(fl32(theta_a * theta_v) * fl32(Z))`` from the exact integer context ``Z``."""
    return (theta_a.to(torch.float32) * theta_v.to(torch.float32)) * z.to(torch.float32)


def residual_read(c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``fl32(fl64(c + D))``: what a LayerNorm reads of the residual stream (SPEC.md §9.2)."""
    return (c + d).to(torch.float32)


def tree_sum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum over ``dim`` (kept, size 1) in a fixed order: pad with zeros to a power of two,
    then add neighbours, ``x[2i] + x[2i + 1]``, until one element is left. Each level is one
    elementwise add, so the result depends on the values and the length only.

    Neighbours first because a kernel holds a row's adjacent elements in one thread (its
    vectorised loads): the first levels are a thread's own adds, and only the last ones
    cross threads, each with one value a thread (the upper-half-plus-lower-half order crossed
    warps first, with every element still live)."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    width = 1 << max(n - 1, 0).bit_length()
    if width != n:
        x = torch.cat((x, x.new_zeros(*x.shape[:-1], width - n)), dim=-1)
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x.movedim(-1, dim)


# exp by Cody-Waite reduction and Cephes' expf polynomial, one rounding per operation.
_LOG2E = 1.44269504088896341
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
             1.6666665459e-1, 5.0000001201e-1)  # fmt: skip
_EXP_MIN = -87.0  # below it exp_rows gives 0 (e^-87 < 2^-125: nothing in a softmax sum)


def exp_rows(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)`` for float32 ``x <= 0`` (softmax's shifted scores), to a few ulp, in
    elementwise operations only: ``k = floor(x log2 e + 1/2)``, ``r = x - k ln2`` (two parts),
    a degree-7 polynomial in ``r``, times ``2^k`` built from its bits (exact). ``x < -87``
    gives 0; NaN stays NaN."""
    x = x.to(torch.float32)
    k = torch.floor(x * _LOG2E + 0.5)
    r = x - k * _LN2_HI
    r = r - k * _LN2_LO
    p = torch.full_like(r, _EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        p = p * r + c
    y = p * (r * r) + r + 1.0
    k = torch.clamp(k, -126, 0).to(torch.int32)
    scale = torch.bitwise_left_shift(k + 127, 23).view(torch.float32)
    return torch.where(x < _EXP_MIN, torch.zeros_like(y), y * scale)


def pool_patch_tokens(c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``fl32`` of the float64 mean over the patch tokens of ``fl64(c + D)`` ``[..., 1+N, C]``
    (the ``global_pool`` feature of ViT-B/L): ``tree_sum`` over the tokens, divided by N."""
    patches = (c + d)[..., 1:, :]
    return divide_by_count(tree_sum(patches, dim=-2).squeeze(-2), patches.shape[-2]).to(
        torch.float32
    )


def sqrt_rn(v: torch.Tensor) -> torch.Tensor:
    """float32 ``sqrt``, correctly rounded on every device (SPEC.md §9.2 asks for one IEEE
    rounding). ``torch.sqrt`` need not be: CPU builds of torch 2.13 (MKL) are an ulp off for
    about one float32 in five. So the float64 root, rounded to float32, is corrected against
    its two neighbouring float32 midpoints, whose squares are exact in float64 (at most 50
    significant bits); a root is never exactly a midpoint."""
    v = v.to(torch.float32)
    s = torch.sqrt(v.to(torch.float64)).to(torch.float32)
    v64 = v.to(torch.float64)
    for direction in (float("inf"), float("-inf")):
        other = torch.nextafter(s, torch.full_like(s, direction))
        mid = (s.to(torch.float64) + other.to(torch.float64)) / 2
        beyond = mid * mid < v64 if direction > 0 else (mid > 0) & (mid * mid > v64)
        s = torch.where(beyond, other, s)
    return s


def divide_by_count(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x / n``, correctly rounded on every device. ``n`` goes in as a tensor on ``x``'s
    device: PyTorch's CUDA kernel divides by a host number as a product with its reciprocal
    (two roundings; for n = 384 a LayerNorm's mean moved by an ulp on an H200, and the exact
    QANN then differed from the SNN's kernels, which divide correctly rounded)."""
    return x / torch.full((), n, dtype=x.dtype, device=x.device)


def layer_norm_rows(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm over the last dim in float32: ``mean = tree_sum(x) / C``,
    ``var = tree_sum((x - mean)^2) / C``, ``y = (x - mean) / sqrt_rn(var + eps) * w + b``,
    one rounding per operation (the row function of exact mode)."""
    x = x.to(torch.float32)
    c = x.shape[-1]
    xc = x - divide_by_count(tree_sum(x), c)
    var = divide_by_count(tree_sum(xc * xc), c)
    y = xc / sqrt_rn(var + eps)
    if weight is not None:
        y = y * weight.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y


def softmax_rows(z: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim in float32: ``e = exp_rows(z - max)``, ``e / tree_sum(e)``
    (the row function of exact mode). A fully ``-inf`` row gives zeros, never NaN."""
    z = z.to(torch.float32)
    peak = z.amax(dim=-1, keepdim=True)  # a max is exact in any order
    peak = torch.where(torch.isinf(peak) & (peak < 0), torch.zeros_like(peak), peak)
    e = exp_rows(z - peak)
    total = tree_sum(e)
    return e / torch.where(total > 0, total, torch.ones_like(total))

"""Fused multi-step target-driven neuron (SPEC.md §9.3): the whole T loop in one launch.

Each program owns BLOCK neurons, keeps their int8 count in registers (as int32) for all T
steps, reads each current value once and writes each spike once (int8). The threshold, one
element or one per channel (the last dim), is read on the device: no host sync.

The neuron step here (``target_step``) is that of every exact-mode kernel. Most of them take
it by ``target_tile``: a division-free estimate of the target, exact outside a small margin
around each rounding step, and the correctly rounded division for a whole tile only when a
lane fell inside it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spikekernels.kernels import cdiv, on_device
from spikekernels.kernels.activity import (
    active_layout,
    block_samples,
    record_active_elements,
)

# BLOCK=1024, 4 warps: 8 neurons per thread, as the ST-BIF kernel (same traffic per step:
# one float value in, one int8 spike out). Untuned on hardware so far: see bench/results/.
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _sign(target, c):
    """``sign(target - c)`` for the float32 ``target`` and the count ``c``, in the count's
    dtype (a count held as float32 takes its sigma without a conversion either way); 0 for a
    NaN target."""
    if c.dtype == tl.float32:
        sigma = tl.where(target > c, 1.0, tl.where(target < c, -1.0, 0.0))
    else:
        cf = c.to(tl.float32)
        sigma = tl.where(target > cf, 1, tl.where(target < cf, -1, 0))
    return sigma


@triton.jit
def target_step(y, theta, c, n_min, p_max):
    """One §9.3 step on float32 values ``y`` and integer (or float32) counts ``c``: returns
    sigma, int32 (float32).

    ``target = clamp(floor(y / theta + 1/2), n_min, p_max)`` with a correctly rounded
    division (div_rn: Triton's ``/`` on fp32 is approximate on NVIDIA GPUs) and round half up,
    as ``levels.quantize``; ``sigma = sign(target - c)``. The GPU floor flushes subnormals,
    which is harmless: a nonzero ``q + 1/2`` is at least 2^-25 in magnitude for any float32
    ``q``. The clamp is written with selects, not min/max: a NaN value keeps target NaN, both
    comparisons fail and sigma is 0 (GPU ``max.f32`` would instead return the bound and fire).
    """
    f = tl.floor(tl.div_rn(y, theta) + 0.5)
    target = tl.where(f > p_max, p_max, tl.where(f < n_min, n_min, f))
    return _sign(target, c)


# The division-free estimate (target_estimate) trusts floor(fl(q) + 1/2), q = fl(y * r) and
# r = fl(1/theta), unless q lies within (|q| + 2) * 2^-19 of a half-integer. Why that is
# exact: q is within 2^-23 |q| (1 + 2^-22) of x = y / theta (two roundings; or both are below
# 2^-125, where both targets are 0). The exact target floor(fl(fl(x) + 1/2)) reaches m where
# x crosses a point within 2^-21.6 (|m| + 0.3) of m - 1/2 (the rounding of fl(x) + 1/2 to m,
# then of x to that float). So when q is farther than 2^-21.1 |q| + 2^-20.9 from every
# half-integer, no step lies between q and x and both targets agree. The test's own roundings
# (of q + 1/2, of the gap, of the margin) are below 2^-24 (|q| + 1); the margin used is at
# least 3.7 times the total.
#
# A target of two nested divisions, floor(fl(fl(y / t) / theta) + 1/2) (the attention neuron
# on the softmax fl(e / total)), takes the same estimate with inv_theta = fl(fl(1/t)
# fl(1/theta)): q is then within 2^-22 |q| of y / (t theta) (four roundings), and each step
# lies within 2^-20.9 (|m| + 0.4) of m - 1/2 (one more rounding to cross), which the margin
# still covers 2.3 times over. (Brute-force searches for the steps of both targets found
# them within 2^-23.4 (|m| + 0.4).)
_UNSURE_SLOPE = tl.constexpr(-(2.0**-19))
_UNSURE_EDGE = tl.constexpr(0.5 - 2.0**-18)  # 1/2 less the margin at q = 0
_MIN_NORMAL = tl.constexpr(2.0**-126)


@triton.jit
def inverse_threshold(theta):
    """``fl(1 / theta)`` for ``target_estimate``, or NaN where that is not a normal float
    (theta zero, huge, subnormal or not finite): every estimate is then unsure, so such a
    threshold always takes the exact division."""
    r = tl.div_rn(tl.full(theta.shape, 1.0, tl.float32), theta)
    return tl.where((tl.abs(r) >= _MIN_NORMAL) & (tl.abs(r) < float("inf")), r, float("nan"))


@triton.jit
def target_estimate(y, inv_theta, c, n_min, p_max):
    """``target_estimate_margin`` with the default margin. (The margin's globals are named in
    the body, not as parameter defaults: torch.compile re-emits a user kernel's helpers with
    the globals their bodies name, and a default's global was left out.)"""
    return target_estimate_margin(y, inv_theta, c, n_min, p_max, _UNSURE_SLOPE, _UNSURE_EDGE)


@triton.jit
def target_estimate_margin(y, inv_theta, c, n_min, p_max, slope, edge):
    """``target_step`` without its division: returns ``(sigma, unsure)``, sigma in the
    count's dtype (int32, or float32 for a float32 count), ``unsure`` bool.

    Where ``unsure`` is clear, sigma equals ``target_step``'s bit for bit (the margin above);
    where it is set (within the margin of a rounding step, or a value or threshold that is not
    finite), sigma is meaningless and must be recomputed by ``target_step``. On values spread
    over the levels that is a few lanes in 10^5. ``inv_theta`` is ``inverse_threshold(theta)``,
    formed once per tile. A sure lane has a finite target, so the clamp may use min/max.
    ``slope`` (a negative power of two) and ``edge``: a wider margin, ``edge + slope |q|``
    below the half gap, for a ``y`` that is itself estimated (``kernels.exact_layernorm``).
    """
    q = tl.fma(y, inv_theta, 0.0)  # one rounding (a plain product), never contracted
    s = q + 0.5
    f = tl.floor(s)
    # |q - round(q)|, 1/2 less q's distance to the nearest rounding step: exact (f is an
    # integer next to q, Sterbenz), and NaN for a non-finite q, so unsure. The margin is one
    # fma whose product |q| 2^-19 is exact, so fused (GPU) or not (interpreter) the same.
    half_gap = tl.abs(q - f)
    sure = half_gap < tl.fma(tl.abs(q), slope, edge)
    target = tl.minimum(tl.maximum(f, n_min * 1.0), p_max * 1.0)  # (an int may be constexpr)
    if c.dtype == tl.float32:  # a difference of integers, exact; fewer instructions
        sigma = tl.minimum(tl.maximum(target - c, -1.0), 1.0)
    else:
        sigma = _sign(target, c)
    return sigma, ~sure


@triton.jit
def target_estimate_tile(y, inv_theta, c, n_min, p_max, mask):
    """``target_estimate_tile_margin`` with the default margin (``target_estimate``)."""
    return target_estimate_tile_margin(
        y, inv_theta, c, n_min, p_max, mask, _UNSURE_SLOPE, _UNSURE_EDGE
    )


@triton.jit
def target_estimate_tile_margin(y, inv_theta, c, n_min, p_max, mask, slope, edge):
    """``target_estimate_margin`` of a tile and one reduction over the ``mask`` lanes: ``(sigma,
    code)``. ``code`` 0 or 1: sigma is exact and ``code`` says whether a lane fired; ``code``
    2 or 3: a lane was unsure, so the tile takes ``target_exact_tile`` instead (about one
    tile of 4096 values in ten: a division is about ten instructions a lane on a GPU, more
    than the rest of the neuron)."""
    sigma, unsure = target_estimate_margin(y, inv_theta, c, n_min, p_max, slope, edge)
    if c.dtype == tl.float32:
        code = tl.max(tl.where(mask, tl.where(unsure, 2.0, tl.abs(sigma)), 0.0)).to(tl.int32)
    else:
        code = tl.max(tl.where(mask, tl.where(unsure, 2, sigma != 0), 0))
    return sigma, code


@triton.jit
def target_exact_tile(y, theta, c, n_min, p_max, mask):
    """``target_step`` of a tile: ``(sigma, fired)``, ``fired`` (int32 0/1) whether a lane in
    ``mask`` has a nonzero sigma."""
    sigma = target_step(y, theta, c, n_min, p_max)
    return sigma, tl.max(tl.where(mask & (sigma != 0), 1, 0))


@triton.jit
def target_tile(y, theta, inv_theta, c, n_min, p_max, mask):
    """The §9.3 step on a tile, ``(sigma, fired)`` as ``target_exact_tile``, by
    ``target_estimate_tile`` and the division only when a lane was unsure. ``y`` stays live
    until then: a kernel short of registers recomputes it instead (``exact_linear``)."""
    sigma, fired = target_estimate_tile(y, inv_theta, c, n_min, p_max, mask)
    if fired > 1:
        sigma, fired = target_exact_tile(y, theta, c, n_min, p_max, mask)
    return sigma, fired


@triton.jit
def load_threshold(theta_ptr, cols, col_mask, PER_CHANNEL: tl.constexpr):
    """An output tile's threshold in float32: ``[1, BLOCK_N]`` per column ``cols`` (one per
    channel), or the one scalar."""
    if PER_CHANNEL:
        theta = tl.load(theta_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)[None, :]
    else:
        theta = tl.load(theta_ptr).to(tl.float32)
    return theta


@triton.jit
def target_spikes_kernel(
    value_ptr,  # [T, numel] float32 / float16 / bfloat16 current values y_t
    theta_ptr,  # [1] or [C] threshold (any float dtype)
    count_in_ptr,  # [numel] int8 count, read when HAS_COUNT
    out_ptr,  # [T, numel] int8 spikes
    count_out_ptr,  # [numel] int8 count
    active_ptr,  # [T, B] int32 per-sample flags, set where a sample fires (HAS_ACTIVE only)
    numel,
    T,
    C,  # channels (last dim); the threshold of element i is theta[i % C] when PER_CHANNEL
    n_min,
    p_max,
    B,  # samples (HAS_ACTIVE only)
    per_sample,  # elements of one sample in one step (HAS_ACTIVE only)
    HAS_COUNT: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    WIDE_SAMPLES: tl.constexpr,  # per_sample >= BLOCK (HAS_ACTIVE only)
    BLOCK: tl.constexpr,
):
    """target = clamp(floor(y_t / theta + 1/2), n_min, p_max); sigma = sign(target - c);
    c += sigma; out_t = sigma (int8); active[t, i // per_sample] = 1 where sigma != 0."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if PER_CHANNEL:
        theta = tl.load(theta_ptr + offs % C, mask=mask, other=1.0).to(tl.float32)
    else:
        theta = tl.load(theta_ptr).to(tl.float32)
    inv_theta = inverse_threshold(theta)
    if HAS_COUNT:
        c = tl.load(count_in_ptr + offs, mask=mask, other=0).to(tl.int32)
    else:
        c = tl.zeros([BLOCK], tl.int32)
    value_ptrs = value_ptr + offs
    out_ptrs = out_ptr + offs
    if HAS_ACTIVE:
        first = pid * BLOCK // per_sample
        active_ptr += first
        # lanes of `first` (clamped first: past 2^31 elements a sample, int32 would wrap)
        split = tl.minimum((first + 1) * per_sample - pid * BLOCK, BLOCK).to(tl.int32)
    for _ in range(T):
        y = tl.load(value_ptrs, mask=mask, other=0.0).to(tl.float32)
        sigma, _ = target_tile(y, theta, inv_theta, c, n_min, p_max, mask)
        c = c + sigma
        tl.store(out_ptrs, sigma.to(tl.int8), mask=mask)
        if HAS_ACTIVE:
            record_active_elements(
                active_ptr, mask & (sigma != 0), split, per_sample, BLOCK, WIDE_SAMPLES
            )
            active_ptr += B
        value_ptrs += numel
        out_ptrs += numel
    tl.store(count_out_ptr + offs, c.to(tl.int8), mask=mask)


@on_device
def target_spikes_triton(
    launch,
    value: torch.Tensor,
    theta: torch.Tensor,
    n_min: int,
    p_max: int,
    count: torch.Tensor | None,
    active: torch.Tensor | None = None,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host side: allocate fresh outputs and launch ``target_spikes_kernel`` over contiguous
    ``value``; ``theta`` has one element or ``value.shape[-1]``; ``active`` ``[T, B]`` int32
    contiguous (checked by the op) or None. Returns ``(spikes [T, *shape] int8, count
    [*shape] int8)``: fresh, or with ``inplace`` the given ``count`` (contiguous, checked by
    the op), written by the program that read it."""
    value = value.contiguous()
    shape = value.shape[1:]
    numel = value[0].numel()
    out = torch.empty(value.shape, dtype=torch.int8, device=value.device)
    if inplace:
        count_out = count
    else:
        count_out = torch.empty(shape, dtype=torch.int8, device=value.device)
    if numel == 0:
        return out, count_out
    per_channel = theta.numel() > 1
    has_count = count is not None
    samples, per_sample = active_layout(active, numel)
    launch(target_spikes_kernel)[(cdiv(numel, BLOCK),)](
        value,
        theta.contiguous(),
        count.contiguous() if has_count else count_out,
        out,
        count_out,
        count_out if active is None else active,
        numel,
        value.shape[0],
        shape[-1] if per_channel else 1,
        n_min,
        p_max,
        samples,
        per_sample,
        HAS_COUNT=has_count,
        PER_CHANNEL=per_channel,
        HAS_ACTIVE=active is not None,
        WIDE_SAMPLES=block_samples(per_sample, BLOCK),
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    return out, count_out

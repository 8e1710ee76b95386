"""Fused multi-step Spike-LayerNorm + ST-BIF neuron (SPEC.md §4 then §2, float mode).

``spike_layernorm_kernel``'s T loop with the neuron it feeds in its epilogue: each step's
LayerNorm increment goes straight into the membrane instead of through a ``[T, rows, C]``
tensor in memory, and only the int8 spikes are written. The two halves are the existing
kernels' own jit code (``layernorm_step``, ``st_bif_step``), launched at the same
``launch_config``, so the bits are those of ``spike_layernorm`` followed by ``st_bif``: the
increment is rounded to ``x``'s dtype first, as ``spike_layernorm`` stores it.

The residual stream's pending branches: float mode's blocks add the attention and MLP
outputs, ``sigma * theta`` of their last neurons, to the stream of float32 increments. Given
up to two branches' int8 spikes, the kernel forms ``h_t = fl32(fl32(x_t + sigma1 * theta1) +
sigma2 * theta2)`` in registers (``sigma * theta`` is exact: 0 or ``+-theta``, formed by a
select), normalises that, and with ``RESIDUAL_OUT`` writes
``h`` for the stream's later readers. The branch outputs never exist as float32 tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spikekernels.kernels import cdiv, on_device
from spikekernels.kernels.activity import active_layout, record_active_rows
from spikekernels.kernels.layernorm import (
    layernorm_launch,
    layernorm_step,
    load_affine,
    load_state,
    row_tile,
)
from spikekernels.kernels.neuron import st_bif_step
from spikekernels.kernels.rounding import bf16_bits_rtne


@triton.jit
def rounded_to_input_dtype(f, x_ptr, X_BF16: tl.constexpr):
    """float32 ``f`` rounded to ``x``'s dtype and back: what ``st_bif`` reads from
    ``spike_layernorm``'s output. bfloat16 by hand (the interpreter truncates on a cast)."""
    if X_BF16:
        f = (bf16_bits_rtne(f).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        f = f.to(x_ptr.dtype.element_ty).to(tl.float32)
    return f


@triton.jit
def branch_value(spikes, theta):
    """``sigma * theta`` of int8 spikes, exactly (+-theta or +0.0), with no multiply that the
    compiler could contract into the add after it."""
    return tl.where(spikes > 0, theta, tl.where(spikes < 0, -theta, 0.0))


@triton.jit
def spike_layernorm_neuron_kernel(
    x_ptr,  # [T, R, C] float32 / float16 / bfloat16 increments h_t
    w_ptr,  # [C] weight (HAS_WEIGHT)
    b_ptr,  # [C] bias (HAS_BIAS)
    x_acc_in_ptr,  # [R, C] float32 running sum X (HAS_X_ACC)
    y_prev_in_ptr,  # [R, C] float32 previous LayerNorm output Y (HAS_Y_PREV)
    out_ptr,  # [T, R, C] int8 spikes
    x_acc_out_ptr,  # [R, C] float32
    y_prev_out_ptr,  # [R, C] float32
    T,
    R,
    C,
    eps,
    theta_ptr,  # [1] threshold (any float dtype)
    v_in_ptr,  # [R, C] float32 membrane (HAS_STATE)
    count_in_ptr,  # [R, C] integer count (HAS_STATE)
    v_out_ptr,  # [R, C] float32
    count_out_ptr,  # [R, C] integer count
    active_ptr,  # [T, B] int32 per-sample flags, set where a sample fires (HAS_ACTIVE only)
    n_min,
    p_max,
    B,  # samples (HAS_ACTIVE only)
    rows_per_sample,  # (HAS_ACTIVE only)
    branch_ptr,  # [T, R, C] int8 spikes of the first pending branch (BRANCHES >= 1)
    branch_theta_ptr,  # [1] its neuron's threshold
    branch2_ptr,  # [T, R, C] int8 spikes of the second (BRANCHES == 2)
    branch2_theta_ptr,  # [1]
    residual_ptr,  # [T, R, C] float32 h_t, the stream with the branches (RESIDUAL_OUT)
    BRANCHES: tl.constexpr,  # 0, 1 or 2 pending branches (x float32 when any)
    RESIDUAL_OUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_X_ACC: tl.constexpr,
    HAS_Y_PREV: tl.constexpr,
    HAS_STATE: tl.constexpr,
    X_BF16: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    LOG2_C: tl.constexpr,  # log2(BLOCK_C)
):
    """h_t = x_t + the branches' sigma * theta, in order; X += h_t; Y = layer_norm(X);
    u = fl(Y - Y_prev) in x's dtype; Y_prev = Y; v += u / theta; fire; count += sigma;
    v -= sigma."""
    rows, col_mask, mask, offs = row_tile(R, C, ROWS, BLOCK_C)
    # int64: R * C in int32 would wrap for a step of 2^31 elements or more.
    step = tl.cast(R, tl.int64) * C
    x_acc = load_state(x_acc_in_ptr, offs, mask, HAS_X_ACC, ROWS, BLOCK_C)
    y_prev = load_state(y_prev_in_ptr, offs, mask, HAS_Y_PREV, ROWS, BLOCK_C)
    theta = tl.load(theta_ptr).to(tl.float32)
    if HAS_STATE:
        v = tl.load(v_in_ptr + offs, mask=mask, other=0.5)
        count = tl.load(count_in_ptr + offs, mask=mask, other=0).to(tl.int32)
    else:
        v = tl.full([ROWS, BLOCK_C], 0.5, tl.float32)
        count = tl.zeros([ROWS, BLOCK_C], tl.int32)
    if HAS_ACTIVE:
        active_ptrs = active_ptr + rows // rows_per_sample
    if BRANCHES >= 1:
        theta1 = tl.load(branch_theta_ptr).to(tl.float32)
        branch_ptrs = branch_ptr + offs
    if BRANCHES == 2:
        theta2 = tl.load(branch2_theta_ptr).to(tl.float32)
        branch2_ptrs = branch2_ptr + offs
    if RESIDUAL_OUT:
        residual_ptrs = residual_ptr + offs

    x_ptrs = x_ptr + offs
    out_ptrs = out_ptr + offs
    x_next = tl.load(x_ptrs, mask=mask, other=0.0)
    for t in range(T):
        h = x_next.to(tl.float32)
        x_ptrs += step
        x_next = tl.load(x_ptrs, mask=mask & (t + 1 < T), other=0.0)
        if BRANCHES >= 1:
            h = h + branch_value(tl.load(branch_ptrs, mask=mask, other=0), theta1)
            branch_ptrs += step
        if BRANCHES == 2:
            h = h + branch_value(tl.load(branch2_ptrs, mask=mask, other=0), theta2)
            branch2_ptrs += step
        if RESIDUAL_OUT:
            tl.store(residual_ptrs, h, mask=mask)
            residual_ptrs += step
        # weight and bias re-read each step (from L1): held across the loop next to the
        # neuron's state, they spilled registers (tests/triton_sm90.py)
        w, b = load_affine(w_ptr, b_ptr, C, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
        x_acc, y = layernorm_step(
            x_acc, h, w, b, col_mask, C, eps, HAS_WEIGHT, HAS_BIAS, ROWS, BLOCK_C, LOG2_C
        )
        u = rounded_to_input_dtype(y - y_prev, x_ptr, X_BF16)
        y_prev = y
        sigma, v, count = st_bif_step(u, theta, v, count, n_min, p_max)
        tl.store(out_ptrs, sigma.to(tl.int8), mask=mask)
        if HAS_ACTIVE:
            record_active_rows(active_ptrs, sigma, rows < R, col_mask, ROWS, BLOCK_C)
            active_ptrs += B
        out_ptrs += step
    # The state goes back to the elements this program loaded it from (same offs and mask,
    # whole rows no other program reads), after its last read: an in-place call passes one
    # tensor as both a state's in and out pointer (spike_layernorm_neuron's inplace).
    tl.store(x_acc_out_ptr + offs, x_acc, mask=mask)
    tl.store(y_prev_out_ptr + offs, y_prev, mask=mask)
    tl.store(v_out_ptr + offs, v, mask=mask)
    tl.store(count_out_ptr + offs, count.to(count_out_ptr.dtype.element_ty), mask=mask)


@on_device
def spike_layernorm_neuron_triton(
    launch,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    x_acc: torch.Tensor | None,
    y_prev: torch.Tensor | None,
    v: torch.Tensor | None,
    count: torch.Tensor | None,
    count_dtype: torch.dtype,
    active: torch.Tensor | None = None,
    branches: tuple[tuple[torch.Tensor, torch.Tensor], ...] = (),
    residual_out: bool = False,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Host side: allocate outputs and launch ``spike_layernorm_neuron_kernel`` over
    contiguous ``x``; ``active`` ``[T, B]`` int32 contiguous (checked by the op) or None;
    ``branches``: up to two ``(spikes like x, threshold)`` pending branches, in order.
    Returns ``(spikes, x_acc, y_prev, v, count, residual)``, ``residual`` the stream with the
    branches (float32 like ``x``) or an empty tensor without ``residual_out``; the state
    fresh, or with ``inplace`` the given ``x_acc``, ``y_prev``, ``v``, ``count`` (all given
    and contiguous, checked by the op), written by the program that read them: a program
    owns whole rows, loads their four states before its T loop and stores the same elements
    (same offsets and mask) after it, so the kernel's in and out pointers may be one tensor."""
    x = x.contiguous()
    shape = x.shape[1:]
    spikes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    if inplace:
        v_out, count_out = v, count
    else:
        v_out = torch.empty(shape, dtype=torch.float32, device=x.device)
        count_out = torch.empty(shape, dtype=count_dtype, device=x.device)
    residual = torch.empty(x.shape if residual_out else 0, dtype=x.dtype, device=x.device)
    x_acc_out, y_prev_out, n_rows, args, meta = layernorm_launch(
        x, weight, bias, eps, x_acc, y_prev, spikes, inplace=inplace
    )
    if n_rows == 0:
        return spikes, x_acc_out, y_prev_out, v_out, count_out, residual
    flat = [(b.contiguous(), theta) for b, theta in branches]
    flat += [(spikes, threshold)] * (2 - len(flat))  # placeholders, never read
    has_state = v is not None
    launch(spike_layernorm_neuron_kernel)[(cdiv(n_rows, meta["ROWS"]),)](
        *args,
        threshold,
        v.contiguous() if has_state else v_out,
        count.contiguous() if has_state else count_out,
        v_out,
        count_out,
        count_out if active is None else active,
        n_min,
        p_max,
        *active_layout(active, n_rows),
        *flat[0],
        *flat[1],
        residual if residual_out else x_acc_out,
        BRANCHES=len(branches),
        RESIDUAL_OUT=residual_out,
        **meta,
        HAS_STATE=has_state,
        X_BF16=x.dtype == torch.bfloat16,
        HAS_ACTIVE=active is not None,
    )
    return spikes, x_acc_out, y_prev_out, v_out, count_out, residual

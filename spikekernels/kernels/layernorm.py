"""Fused multi-step Spike-LayerNorm (SPEC.md §4): the whole T loop in one launch.

Each program owns ``ROWS`` rows of ``C`` channels (padded to the next power of two, masked),
keeps their running sum ``X`` and previous output ``Y`` in registers (float32) for all T steps,
reads each input element once and writes each output element once. The next step's input is
loaded before the current step is reduced (software prefetch), so a row's T loop keeps two
loads in flight instead of waiting on each.

Per step: ``X += x_t``; ``mean = sum(X) / C``; ``var = sum((X - mean)^2) / C``;
``Y = (X - mean) / sqrt(var + eps) * weight + bias``; ``out_t = Y - Y_prev``. Float32 math
(correctly rounded sqrt and division), output in ``x``'s dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spikekernels.kernels import on_device
from spikekernels.kernels.rounding import bf16_bits_rtne

# A program holds ROWS x BLOCK_C = 2048 elements per state tensor: 16 per thread at 4 warps,
# so X, Y_prev, the prefetched input and temporaries stay in registers with room for several
# programs per SM. Untuned on hardware so far: see bench/results/.
ELEMENTS_PER_PROGRAM = 2048


def launch_config(c: int) -> tuple[int, int, int]:
    """``(BLOCK_C, ROWS, num_warps)`` for rows of ``c`` channels."""
    block_c = triton.next_power_of_2(c)
    rows = max(1, ELEMENTS_PER_PROGRAM // block_c)
    num_warps = 4 if block_c <= 2048 else (8 if block_c <= 8192 else 16)
    return block_c, rows, num_warps


@triton.jit
def spike_layernorm_kernel(
    x_ptr,  # [T, R, C] float32 / float16 / bfloat16 increments h_t
    w_ptr,  # [C] weight (HAS_WEIGHT)
    b_ptr,  # [C] bias (HAS_BIAS)
    x_acc_in_ptr,  # [R, C] float32 running sum X (HAS_X_ACC)
    y_prev_in_ptr,  # [R, C] float32 previous output Y (HAS_Y_PREV)
    out_ptr,  # [T, R, C] x's dtype (int16 bits for bfloat16)
    x_acc_out_ptr,  # [R, C] float32
    y_prev_out_ptr,  # [R, C] float32
    T,
    R,
    C,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_X_ACC: tl.constexpr,
    HAS_Y_PREV: tl.constexpr,
    OUT_BF16_BITS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """X += h_t; Y = layer_norm(X) * weight + bias; out_t = Y - Y_prev; Y_prev = Y."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < R)[:, None] & col_mask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    # int64: R * C in int32 would wrap for a step of 2^31 elements or more.
    step = tl.cast(R, tl.int64) * C
    # C as a float (exact below 2^24) for the correctly rounded divisions by it: Triton's `/`
    # on float32 is the approximate div.full.f32 on NVIDIA GPUs (the interpreter rounds).
    c_f = tl.cast(C, tl.float32)

    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_X_ACC:
        x_acc = tl.load(x_acc_in_ptr + offs, mask=mask, other=0.0)
    else:
        x_acc = tl.zeros([ROWS, BLOCK_C], tl.float32)
    if HAS_Y_PREV:
        y_prev = tl.load(y_prev_in_ptr + offs, mask=mask, other=0.0)
    else:
        y_prev = tl.zeros([ROWS, BLOCK_C], tl.float32)

    x_ptrs = x_ptr + offs
    out_ptrs = out_ptr + offs
    x_next = tl.load(x_ptrs, mask=mask, other=0.0)
    for t in range(T):
        h = x_next.to(tl.float32)
        x_ptrs += step
        x_next = tl.load(x_ptrs, mask=mask & (t + 1 < T), other=0.0)
        x_acc = x_acc + h
        mean = tl.div_rn(tl.sum(x_acc, axis=1), c_f)
        diff = tl.where(col_mask[None, :], x_acc - mean[:, None], 0.0)
        var = tl.div_rn(tl.sum(diff * diff, axis=1), c_f)
        rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
        y = diff * rstd[:, None]
        if HAS_WEIGHT:
            y = y * w
        if HAS_BIAS:
            y = y + b
        delta = y - y_prev
        y_prev = y
        if OUT_BF16_BITS:
            delta = bf16_bits_rtne(delta)
        else:
            delta = delta.to(out_ptr.dtype.element_ty)
        tl.store(out_ptrs, delta, mask=mask)
        out_ptrs += step
    tl.store(x_acc_out_ptr + offs, x_acc, mask=mask)
    tl.store(y_prev_out_ptr + offs, y_prev, mask=mask)


@on_device
def spike_layernorm_triton(
    launch,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    x_acc: torch.Tensor | None,
    y_prev: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host side: allocate outputs and launch ``spike_layernorm_kernel`` over contiguous ``x``."""
    x = x.contiguous()
    shape = x.shape[1:]
    c = shape[-1]
    n_rows = x[0].numel() // c
    out = torch.empty_like(x)
    x_acc_out = torch.empty(shape, dtype=torch.float32, device=x.device)
    y_prev_out = torch.empty(shape, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return out, x_acc_out, y_prev_out
    block_c, rows, num_warps = launch_config(c)
    bf16_bits = x.dtype == torch.bfloat16
    launch(spike_layernorm_kernel)[(triton.cdiv(n_rows, rows),)](
        x,
        x if weight is None else weight.contiguous(),
        x if bias is None else bias.contiguous(),
        x_acc_out if x_acc is None else x_acc.contiguous(),
        y_prev_out if y_prev is None else y_prev.contiguous(),
        out.view(torch.int16) if bf16_bits else out,
        x_acc_out,
        y_prev_out,
        x.shape[0],
        n_rows,
        c,
        eps,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_X_ACC=x_acc is not None,
        HAS_Y_PREV=y_prev is not None,
        OUT_BF16_BITS=bf16_bits,
        ROWS=rows,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out, x_acc_out, y_prev_out

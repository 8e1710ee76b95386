"""Fused multi-step Spike-LayerNorm (SPEC.md §4): the whole T loop in one launch.

Each program owns ``ROWS`` rows of ``C`` channels (padded to the next power of two, masked),
keeps their running sum ``X`` and previous output ``Y`` in registers (float32) for all T steps,
reads each input element once and writes each output element once. The next step's input is
loaded before the current step is reduced (software prefetch), so a row's T loop keeps two
loads in flight instead of waiting on each.

Per step: ``X += x_t``; ``mean = sum(X) / C``; ``var = sum((X - mean)^2) / C``;
``Y = (X - mean) / sqrt(var + eps) * weight + bias``; ``out_t = Y - Y_prev``. Float32 math
(correctly rounded sqrt and division, sums as a fixed pairwise tree, no contracted multiply-add:
``layernorm_step``, shared with ``layernorm_neuron``, gives the same bits in any layout), output
in ``x``'s dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spikekernels.kernels import cdiv, on_device
from spikekernels.kernels.exact_rows import tree_sum_rows
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
def row_tile(R, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's ``ROWS`` rows: ``(rows, col_mask, mask, offs)``, ``offs`` the
    ``[ROWS, BLOCK_C]`` element offsets within one step (int64)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < R)[:, None] & col_mask[None, :]
    return rows, col_mask, mask, rows[:, None] * C + cols[None, :]


@triton.jit
def load_affine(
    w_ptr,
    b_ptr,
    C,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``(weight, bias)`` as float32 ``[1, BLOCK_C]``; an absent one is a zero placeholder
    that ``layernorm_step`` never reads."""
    cols = tl.arange(0, BLOCK_C)
    w = tl.zeros([1, BLOCK_C], tl.float32)
    b = tl.zeros([1, BLOCK_C], tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    return w, b


@triton.jit
def load_state(ptr, offs, mask, HAS_STATE: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Incoming float32 state (``HAS_STATE``), else zeros: fresh ``X`` and ``Y_prev``."""
    if HAS_STATE:
        state = tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        state = tl.zeros([ROWS, BLOCK_C], tl.float32)
    return state


@triton.jit
def layernorm_step(
    x_acc,
    h,
    w,
    b,
    col_mask,
    C,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    LOG2_C: tl.constexpr,
):
    """One SPEC.md §4 step on a ``[ROWS, BLOCK_C]`` tile: returns ``(X + h, layer_norm(X + h))``.

    Shared by every kernel that normalises, so that they compute the same bits: the same
    float32 operations in the same order."""
    # C as a float (exact below 2^24) for the correctly rounded divisions by it: Triton's `/`
    # on float32 is the approximate div.full.f32 on NVIDIA GPUs (the interpreter rounds).
    c_f = tl.cast(C, tl.float32)
    x_acc = x_acc + h
    # Sums as a fixed tree and products as fma(a, b, +0.0) (never contracted into an add): a
    # kernel's layout (which Triton picks from its loads and stores) then changes no bit.
    mean = tl.div_rn(tree_sum_rows(x_acc, ROWS, BLOCK_C, LOG2_C), c_f)
    diff = tl.where(col_mask[None, :], x_acc - mean[:, None], 0.0)
    var = tl.div_rn(tree_sum_rows(tl.fma(diff, diff, 0.0), ROWS, BLOCK_C, LOG2_C), c_f)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    y = tl.fma(diff, rstd[:, None], 0.0)
    if HAS_WEIGHT:
        y = tl.fma(y, w, 0.0)
    if HAS_BIAS:
        y = y + b
    return x_acc, y


@triton.jit
def spike_layernorm_kernel(
    x_ptr,  # [T, R, C] float32 / float16 / bfloat16 increments h_t
    w_ptr,  # [C] weight (HAS_WEIGHT)
    b_ptr,  # [C] bias (HAS_BIAS)
    x_acc_in_ptr,  # [R, C] float32 running sum X (HAS_X_ACC)
    y_prev_in_ptr,  # [R, C] float32 previous output Y (HAS_Y_PREV)
    out_ptr,  # [T, R, C] x's dtype (int16 bits for bfloat16)
    x_acc_out_ptr,  # [R, C] float32 (x_acc_in_ptr itself with inplace)
    y_prev_out_ptr,  # [R, C] float32 (y_prev_in_ptr itself with inplace)
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
    LOG2_C: tl.constexpr,  # log2(BLOCK_C)
):
    """X += h_t; Y = layer_norm(X) * weight + bias; out_t = Y - Y_prev; Y_prev = Y.

    In-place safe (``inplace``: the state's in and out pointers the same tensor): a program
    loads its own rows' state (``offs``, ``mask``) before the T loop and stores those same
    elements after it; no other program reads or writes them."""
    _, col_mask, mask, offs = row_tile(R, C, ROWS, BLOCK_C)
    # int64: R * C in int32 would wrap for a step of 2^31 elements or more.
    step = tl.cast(R, tl.int64) * C
    w, b = load_affine(w_ptr, b_ptr, C, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
    x_acc = load_state(x_acc_in_ptr, offs, mask, HAS_X_ACC, ROWS, BLOCK_C)
    y_prev = load_state(y_prev_in_ptr, offs, mask, HAS_Y_PREV, ROWS, BLOCK_C)

    x_ptrs = x_ptr + offs
    out_ptrs = out_ptr + offs
    x_next = tl.load(x_ptrs, mask=mask, other=0.0)
    for t in range(T):
        h = x_next.to(tl.float32)
        x_ptrs += step
        x_next = tl.load(x_ptrs, mask=mask & (t + 1 < T), other=0.0)
        x_acc, y = layernorm_step(
            x_acc, h, w, b, col_mask, C, eps, HAS_WEIGHT, HAS_BIAS, ROWS, BLOCK_C, LOG2_C
        )
        delta = y - y_prev
        y_prev = y
        if OUT_BF16_BITS:
            delta = bf16_bits_rtne(delta)
        else:
            delta = delta.to(out_ptr.dtype.element_ty)
        tl.store(out_ptrs, delta, mask=mask)
        out_ptrs += step
    # the elements load_state read above, and only those (in place: this program's own)
    tl.store(x_acc_out_ptr + offs, x_acc, mask=mask)
    tl.store(y_prev_out_ptr + offs, y_prev, mask=mask)


def layernorm_launch(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    x_acc: torch.Tensor | None,
    y_prev: torch.Tensor | None,
    out: torch.Tensor,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int, tuple, dict]:
    """Host side shared by the kernels whose arguments begin as ``spike_layernorm_kernel``'s
    (``x`` contiguous ``[T, *, C]``, ``out`` the spikes or increments as the kernel stores
    them): ``(x_acc_out, y_prev_out, n_rows, args, meta)``, the fresh outgoing state, the rows
    of a step, those leading arguments, and the LayerNorm's constexprs with ``ROWS``,
    ``BLOCK_C`` and ``num_warps``. With ``inplace`` (``spike_layernorm``'s and
    ``spike_layernorm_neuron``'s) ``x_acc`` and ``y_prev`` are given and contiguous (the op
    checks) and are the outgoing state too: a program loads its rows' state before its T
    loop and stores the same elements after it, and no other program touches them."""
    shape = x.shape[1:]
    c = shape[-1]
    n_rows = x[0].numel() // c
    if inplace:
        x_acc_out, y_prev_out = x_acc, y_prev
    else:
        x_acc_out = torch.empty(shape, dtype=torch.float32, device=x.device)
        y_prev_out = torch.empty(shape, dtype=torch.float32, device=x.device)
    block_c, rows, num_warps = launch_config(c)
    args = (
        x,
        x if weight is None else weight.contiguous(),
        x if bias is None else bias.contiguous(),
        x_acc_out if x_acc is None else x_acc.contiguous(),
        y_prev_out if y_prev is None else y_prev.contiguous(),
        out,
        x_acc_out,
        y_prev_out,
        x.shape[0],
        n_rows,
        c,
        eps,
    )
    meta = dict(
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_X_ACC=x_acc is not None,
        HAS_Y_PREV=y_prev is not None,
        ROWS=rows,
        BLOCK_C=block_c,
        LOG2_C=block_c.bit_length() - 1,
        num_warps=num_warps,
    )
    return x_acc_out, y_prev_out, n_rows, args, meta


@on_device
def spike_layernorm_triton(
    launch,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    x_acc: torch.Tensor | None,
    y_prev: torch.Tensor | None,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host side: allocate outputs and launch ``spike_layernorm_kernel`` over contiguous ``x``;
    with ``inplace`` the new state goes into ``x_acc`` and ``y_prev`` (returned)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    bf16_bits = x.dtype == torch.bfloat16
    out_bits = out.view(torch.int16) if bf16_bits else out
    x_acc_out, y_prev_out, n_rows, args, meta = layernorm_launch(
        x, weight, bias, eps, x_acc, y_prev, out_bits, inplace=inplace
    )
    if n_rows == 0:
        return out, x_acc_out, y_prev_out
    launch(spike_layernorm_kernel)[(cdiv(n_rows, meta["ROWS"]),)](
        *args, **meta, OUT_BF16_BITS=bf16_bits
    )
    return out, x_acc_out, y_prev_out

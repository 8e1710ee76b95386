"""Fused float-mode attention (SPEC.md §5, §3, §2): the two spike products of SESA, each with
what reads it, the T loop inside one launch. ``spike_attention_probs_kernel``: the scores
product, Spike-Softmax and the attention neuron; ``spike_context_kernel``: the context
product and the neuron after it (``u = fl32(scale * fl32(a_t @ V_t + A_{t-1} @ v_t))``, then
``st_bif_step``; the spikes may be written with the heads merged, as in exact mode).

Unfused, float mode writes the scores increments ``[T, B, H, N, N]`` in float32, Spike-Softmax
reads them and writes its float32 differences, and the neuron reads those: about 17 bytes
per score element and step at ViT sizes, the largest term of float-mode attention. Here
only the int8 spikes leave the kernel each step; the state (running scores ``X``, last
softmax ``Y``, membrane ``v``: float32; count ``s``: int8) is read once and written once per
call.

The scores kernel: one program per (batch entry, block of ``BLOCK_M`` query rows), all ``N``
keys in one tile, transposed (``[keys, queries]``) as in ``kernels.exact_attention``, for the
same reason: the keys are the tensor cores' M and each query's softmax runs down a column.
Per step:

- ``delta^T = K_t q_t^T + k_t Q_{t-1}^T``, int8 ``tl.dot`` into int32 (exact), silent spike
  slices skipped (``exact_attention.scores_step``);
- ``X += fl32(scale * fl32(delta))`` (``spike_matmul``'s one scaling, then Spike-Softmax's
  running sum);
- ``Y = softmax_rows(X)``: the library's row function (``exact_math.softmax_rows``, the same
  code as exact mode's: max, ``exp_rows``, ``tree_sum``'s order, a correctly rounded
  division), so every device gives the same bits; within SPEC.md §8's softmax tolerance;
- ``u = Y - Y_prev``, then the ST-BIF step on ``u`` (``kernels.neuron.st_bif_step``);
- a *quiet* tile (no spike slice this step, so ``delta`` is 0, and no lane fired at the
  last step) skips the softmax and the neuron, as exact mode's kernels do: ``X`` is
  unchanged, so ``Y`` is ``Y_prev`` bit for bit and ``u`` is 0, and a neuron that did not
  fire on its ``(v, count)`` does not fire on the same again; sigma is 0 and the state stays
  as it is (the reference adds ``+0.0`` to ``X`` and ``v``, which changes only an incoming
  ``-0.0`` to ``+0.0``). The first step of a call always computes. The branch compiles at
  250-252 registers on sm_90 without a spill (tests/triton_sm90.py). The softmax is about
  60 ALU operations per element and step.

The context kernel: one program per (batch entry, block of rows), all head channels in one
tile, the keys (the contraction) in slices (``exact_attention.context_step``); the membrane
and count stay in registers for the chunk. Its neuron skips quiet tiles the same way.

The running counts (``Q_{t-1}``, ``K_t``; ``A_{t-1}``, ``V_t``) come from
``running_count_kernel`` as in exact mode. A program's rows lie in one batch entry and head,
so in one sample: its activity flag is one store of the tile's reduction.
Products feeding an add are ``fma(a, b, +0.0)`` (no contraction), divisions ``div_rn``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spikekernels.kernels import INTERPRET, on_device
from spikekernels.kernels.activity import active_layout
from spikekernels.kernels.exact_attention import (
    MAX_HEAD_DIM,
    MAX_KEYS,
    _batch,
    _grid,
    _mul,
    _prepare,
    context_step,
    key_codes,
    scores_step,
    softmax_columns,
)
from spikekernels.kernels.exact_rows import permuted_rows
from spikekernels.kernels.neuron import st_bif_step
from spikekernels.kernels.tile_flags import any_nonzero

__all__ = ["MAX_HEAD_DIM", "MAX_KEYS", "spike_attention_probs_triton", "spike_context_triton"]

# (BLOCK_M, BLOCK_D, num_warps) on a GPU, as exact mode's scores kernel: 256 keys x 16 query
# rows at 8 warps. The float state adds three [keys, queries] float32 tiles (X, Y, v), which
# fit (252-254 registers, no spill) with the count held as int8 and no quiet-tile branch;
# 8 query rows lose wgmma, 16 warps spill. tests/triton_sm90.py records it. Untuned.
_GPU = (16, 32, 8)
_INTERPRET = (16, 32, 4)


def probs_config(n: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_D, num_warps)`` for ``n`` keys (padded to a power of two,
    at least 16)."""
    block_m, block_d, num_warps = _INTERPRET if INTERPRET else _GPU
    return block_m, max(16, triton.next_power_of_2(n)), block_d, num_warps


@triton.jit
def _softmax_neuron(x, y, v, count, mask_n, theta, n_min, p_max, KEYS, COLS, LOG2_KEYS, KEY_TREE):
    """Spike-Softmax's difference and the ST-BIF step on it: ``(sigma, Y, v, count)``."""
    y_new = softmax_columns(x, mask_n, KEYS, COLS, LOG2_KEYS, KEY_TREE)
    sigma, v, count = st_bif_step(y_new - y, theta, v, count.to(tl.int32), n_min, p_max)
    return sigma, y_new, v, count.to(tl.int8)


@triton.jit
def spike_attention_probs_kernel(
    q_ptr,  # [T, B, H, M, D] int8 query spikes q_t, any strides (the batch flat: B * H)
    k_ptr,  # [T, B, H, N, D] int8 key spikes k_t, any strides
    q_prev_ptr,  # [T, B, M, D] int8 running query count before step t, Q_{t-1}, contiguous
    k_cur_ptr,  # [T, B, N, D] int8 running key count after step t, K_t, contiguous
    scale_ptr,  # [1] float32 scores scale
    theta_ptr,  # [1] attention neuron's threshold (any float dtype)
    x_in_ptr,  # [B, M, N] float32 running scores X (HAS_STATE only)
    y_in_ptr,  # [B, M, N] float32 last softmax Y (HAS_STATE only)
    v_in_ptr,  # [B, M, N] float32 membrane (HAS_STATE only)
    s_in_ptr,  # [B, M, N] int8 count (HAS_STATE only)
    out_ptr,  # [T, B, M, N] int8 spikes
    x_out_ptr,
    y_out_ptr,
    v_out_ptr,
    s_out_ptr,
    active_ptr,  # [T, samples] int32 flags, set where a sample fires (HAS_ACTIVE only)
    T,
    M,
    N,
    D,
    H,
    stride_qt,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kt,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    n_min,
    p_max,
    samples,  # (HAS_ACTIVE only)
    rows_per_sample,  # rows of the flattened [B * M] (HAS_ACTIVE only)
    HAS_STATE: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LOG2_N: tl.constexpr,
    KEY_PERM: tl.constexpr,  # exact_attention.key_codes: tile row p holds key permuted_rows(p)
    KEY_TREE: tl.constexpr,
):
    """Per step: ``X += fl32(scale * fl32(K_t q_t^T + k_t Q_{t-1}^T))``; ``Y =
    softmax_rows(X)``; ST-BIF on ``Y - Y_prev``; ``active[t, row // rows_per_sample] = 1``
    where a query row fires. Tiles are transposed, ``[BLOCK_N keys, BLOCK_M queries]``."""
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    bid = (pid // num_m).to(tl.int64)
    nb = tl.num_programs(0) // num_m
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = permuted_rows(tl.arange(0, BLOCK_N), LOG2_N, KEY_PERM)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_s = mask_n[:, None] & mask_m[None, :]

    q_ptr += (bid // H) * stride_qb + (bid % H) * stride_qh
    k_ptr += (bid // H) * stride_kb + (bid % H) * stride_kh
    q_prev_ptr += bid * M * D
    k_cur_ptr += bid * N * D
    out_ptr += bid * M * N
    s_offs = offs_m[None, :] * N + offs_n[:, None]  # element (key n, query m) of [M, N]
    # scalar 64-bit bases, int32 tile offsets: no 64-bit offset tile lives across the loop
    state = bid * M * N
    step_q = nb.to(tl.int64) * M * D
    step_k = nb.to(tl.int64) * N * D
    step_s = nb.to(tl.int64) * M * N

    if HAS_STATE:
        x = tl.load((x_in_ptr + state) + s_offs, mask=mask_s, other=0.0)
        y = tl.load((y_in_ptr + state) + s_offs, mask=mask_s, other=0.0)
        v = tl.load((v_in_ptr + state) + s_offs, mask=mask_s, other=0.5)
        count = tl.load((s_in_ptr + state) + s_offs, mask=mask_s, other=0)
    else:
        x = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        y = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        v = tl.full([BLOCK_N, BLOCK_M], 0.5, tl.float32)
        count = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int8)
    scale = tl.load(scale_ptr)
    theta = tl.load(theta_ptr).to(tl.float32)
    if HAS_ACTIVE:
        # A program's query rows belong to one batch entry and head, hence to one sample:
        # its flag is one store of the tile's ``fired``, no per-column reduction.
        active_ptr += bid * M // rows_per_sample

    fired = tl.full((), 1, tl.int32)  # whether the tile fired at the last step (at first: yes)
    for _ in range(T):
        delta, moved = scores_step(
            tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32), q_ptr, k_ptr, q_prev_ptr, k_cur_ptr,
            offs_m, offs_n, offs_d, mask_m, mask_n, D, stride_qm, stride_qd, stride_kn,
            stride_kd, BLOCK_D,
        )  # fmt: skip
        if (moved | fired) != 0:
            x = x + _mul(scale, delta.to(tl.float32))
            sigma, y, v, count = _softmax_neuron(
                x, y, v, count, mask_n, theta, n_min, p_max, BLOCK_N, BLOCK_M, LOG2_N, KEY_TREE
            )
            fired = any_nonzero(tl.where(mask_s, sigma, 0)).to(tl.int32)
        else:  # quiet (module docstring): sigma is 0, the state as it is
            sigma = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
        tl.store(out_ptr + s_offs, sigma.to(tl.int8), mask=mask_s)
        if HAS_ACTIVE:
            if fired:
                tl.store(active_ptr, 1)
            active_ptr += samples
        q_ptr += stride_qt
        k_ptr += stride_kt
        q_prev_ptr += step_q
        k_cur_ptr += step_k
        out_ptr += step_s

    # The state goes back to the elements this program loaded it from before its T loop
    # (same offsets and mask; a program owns its (batch entry, query rows) x all keys):
    # an in-place call passes one tensor as both a state's in and out pointer.
    tl.store((x_out_ptr + state) + s_offs, x, mask=mask_s)
    tl.store((y_out_ptr + state) + s_offs, y, mask=mask_s)
    tl.store((v_out_ptr + state) + s_offs, v, mask=mask_s)
    tl.store((s_out_ptr + state) + s_offs, count, mask=mask_s)


@on_device
def spike_attention_probs_triton(
    launch,
    q: torch.Tensor,
    k_t: torch.Tensor,
    scale: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    q_count: torch.Tensor | None,
    k_count: torch.Tensor | None,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
    active: torch.Tensor | None = None,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Host side: ``q`` ``[T, *batch, M, D]``, ``k_t`` ``[T, *batch, D, N]`` int8 (any
    strides, at least one batch entry, ``1 <= N <= MAX_KEYS``, ``M, D >= 1``), their
    neurons' counts after these steps (any strides, or None), ``state`` ``(X, Y, v, s)``
    ``[*batch, M, N]`` or None, ``active`` ``[T, B]`` int32 contiguous or None. Returns
    ``(spikes [T, *batch, M, N] int8, X, Y, v, s)``, the state fresh tensors, or with
    ``inplace`` views of the given ones (all four given and contiguous, checked by the op),
    written by the program that read them (``spike_attention_probs_kernel``)."""
    s_in = None if state is None else state[3]
    p = _prepare(launch, q, k_t, q_count, k_count, s_in, inplace, transpose_b=True)
    m, d = q.shape[-2:]
    n = k_t.shape[-1]
    nb = _batch(p)
    if inplace:
        floats = [t.reshape(nb, m, n) for t in state[:3]]  # views: contiguous
        x_in, y_in, v_in = floats
    else:
        floats = [torch.empty((nb, m, n), dtype=torch.float32, device=q.device) for _ in range(3)]
        if state is None:
            x_in, y_in, v_in = floats
        else:
            x_in, y_in, v_in = (t.reshape(nb, m, n).contiguous() for t in state[:3])
    block_m, block_n, block_d, num_warps = probs_config(n)
    launch(spike_attention_probs_kernel)[_grid(p, block_m)](
        p.a,
        p.b,
        p.a_prev,
        p.b_cur,
        scale,
        threshold,
        x_in,
        y_in,
        v_in,
        p.count_out if p.count_in is None else p.count_in,
        p.out,
        *floats,
        p.count_out,
        p.count_out if active is None else active,
        q.shape[0],
        m,
        n,
        d,
        p.a.shape[2],
        *p.a.stride(),
        *p.b.stride(),
        n_min,
        p_max,
        *active_layout(active, nb * m),
        HAS_STATE=state is not None,
        HAS_ACTIVE=active is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        LOG2_N=block_n.bit_length() - 1,
        # keys in row order: exact mode's layout order spilled 52 B here (the float state)
        **key_codes(block_n, num_warps, by_layout=False),
        num_warps=num_warps,
    )
    shape = p.count_shape
    return (p.out, *(t.reshape(shape) for t in floats), p.count_out.reshape(shape))


# (BLOCK_M, BLOCK_K, num_warps) of the context kernel: 64 rows x 64 channels (a Hopper wgmma
# per warpgroup), keys in slices of 64, as exact mode's; 8 warps hold the membrane too.
_CONTEXT_GPU = (64, 64, 8)
_CONTEXT_INTERPRET = (16, 32, 4)


def context_config(d: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_K, BLOCK_D, num_warps)`` for head dim ``d`` (padded to a power of
    two, at least 16)."""
    block_m, block_k, num_warps = _CONTEXT_INTERPRET if INTERPRET else _CONTEXT_GPU
    return block_m, block_k, max(16, triton.next_power_of_2(d)), num_warps


@triton.jit
def spike_context_kernel(
    a_ptr,  # [T, B, H, M, N] int8 attention spikes a_t, any strides (the batch flat: B * H)
    v_ptr,  # [T, B, H, N, D] int8 value spikes v_t, any strides
    a_prev_ptr,  # [T, B, M, N] int8 running attention count before step t, A_{t-1}, contiguous
    v_cur_ptr,  # [T, B, N, D] int8 running value count after step t, V_t, contiguous
    scale_ptr,  # [1] float32 product scale (theta_a * theta_v)
    theta_ptr,  # [1] output neuron's threshold (any float dtype)
    mem_in_ptr,  # [B, M, D] float32 membrane (HAS_STATE only)
    s_in_ptr,  # [B, M, D] int8 count (HAS_STATE only)
    out_ptr,  # [T, B, H, M, D] int8 spikes, any strides but a contiguous D
    mem_out_ptr,
    s_out_ptr,
    active_ptr,  # [T, samples] int32 flags, set where a sample fires (HAS_ACTIVE only)
    T,
    M,
    N,
    D,
    H,
    stride_at,
    stride_ab,
    stride_ah,
    stride_am,
    stride_an,
    stride_vt,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ot,
    stride_ob,
    stride_oh,
    stride_om,
    n_min,
    p_max,
    samples,  # (HAS_ACTIVE only)
    rows_per_sample,  # rows of the flattened [B * M] (HAS_ACTIVE only)
    HAS_STATE: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per step: ``u = fl32(scale * fl32(a_t @ V_t + A_{t-1} @ v_t))``; ST-BIF on ``u``;
    ``active[t, sample] = 1`` where the tile fires."""
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    bid = (pid // num_m).to(tl.int64)
    nb = tl.num_programs(0) // num_m
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    mask_z = mask_m[:, None] & mask_d[None, :]

    a_ptr += (bid // H) * stride_ab + (bid % H) * stride_ah
    v_ptr += (bid // H) * stride_vb + (bid % H) * stride_vh
    a_prev_ptr += bid * M * N
    v_cur_ptr += bid * N * D
    out_ptr += (bid // H) * stride_ob + (bid % H) * stride_oh
    out_offs = offs_m[:, None] * stride_om + offs_d[None, :]
    z_offs = offs_m[:, None] * D + offs_d[None, :]
    state = bid * M * D
    step_a = nb.to(tl.int64) * M * N
    step_v = nb.to(tl.int64) * N * D

    if HAS_STATE:
        mem = tl.load((mem_in_ptr + state) + z_offs, mask=mask_z, other=0.5)
        count = tl.load((s_in_ptr + state) + z_offs, mask=mask_z, other=0).to(tl.int32)
    else:
        mem = tl.full([BLOCK_M, BLOCK_D], 0.5, tl.float32)
        count = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.int32)
    scale = tl.load(scale_ptr)
    theta = tl.load(theta_ptr).to(tl.float32)
    if HAS_ACTIVE:  # one (batch entry, head): one sample, as in the scores kernel
        active_ptr += bid * M // rows_per_sample

    fired = tl.full((), 1, tl.int32)  # whether the tile fired at the last step (at first: yes)
    for _ in range(T):
        delta, moved = context_step(
            tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.int32), a_ptr, v_ptr, a_prev_ptr, v_cur_ptr,
            offs_m, offs_k, offs_d, mask_m, mask_d, N, D, stride_am, stride_an, stride_vn,
            stride_vd, BLOCK_K,
        )  # fmt: skip
        if (moved | fired) != 0:
            sigma, mem, count = st_bif_step(
                _mul(scale, delta.to(tl.float32)), theta, mem, count, n_min, p_max
            )
            fired = any_nonzero(tl.where(mask_z, sigma, 0)).to(tl.int32)
        else:  # quiet (module docstring): sigma is 0, the state as it is
            sigma = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.int32)
        tl.store(out_ptr + out_offs, sigma.to(tl.int8), mask=mask_z)
        if HAS_ACTIVE:
            if fired:
                tl.store(active_ptr, 1)
            active_ptr += samples
        a_ptr += stride_at
        v_ptr += stride_vt
        a_prev_ptr += step_a
        v_cur_ptr += step_v
        out_ptr += stride_ot

    # As in the scores kernel: the state goes back where this program loaded it (its rows,
    # all D channels, same offsets and mask), so in and out pointers may be one tensor.
    tl.store((mem_out_ptr + state) + z_offs, mem, mask=mask_z)
    tl.store((s_out_ptr + state) + z_offs, count.to(tl.int8), mask=mask_z)


@on_device
def spike_context_triton(
    launch,
    a: torch.Tensor,
    v: torch.Tensor,
    scale: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    a_count: torch.Tensor | None,
    v_count: torch.Tensor | None,
    state: tuple[torch.Tensor, torch.Tensor] | None,
    active: torch.Tensor | None = None,
    *,
    merge_heads: bool = False,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host side: ``a`` ``[T, *batch, M, N]``, ``v`` ``[T, *batch, N, D]`` int8 (any strides,
    at least one batch entry, ``1 <= D <= MAX_HEAD_DIM``, ``M, N >= 1``), their neurons'
    counts after these steps (any strides, or None), ``state`` ``(membrane, count)``
    ``[*batch, M, D]`` or None, ``active`` ``[T, B]`` int32 contiguous or None. Returns
    ``(spikes, membrane, count)``: spikes ``[T, *batch, M, D]``, or with ``merge_heads``
    ``[T, *batch[:-1], M, H * D]`` (written there directly); the state fresh tensors, or
    with ``inplace`` views of the given ones (both given and contiguous, checked by the op),
    written by the program that read them (``spike_context_kernel``)."""
    s_in = None if state is None else state[1]
    p = _prepare(launch, a, v, a_count, v_count, s_in, inplace, merge_heads=merge_heads)
    m, n = a.shape[-2:]
    d = v.shape[-1]
    nb = _batch(p)
    if inplace:
        mem_in = mem_out = state[0].reshape(nb, m, d)  # a view: contiguous
    else:
        mem_out = torch.empty((nb, m, d), dtype=torch.float32, device=a.device)
        mem_in = mem_out if state is None else state[0].reshape(nb, m, d).contiguous()
    block_m, block_k, block_d, num_warps = context_config(d)
    launch(spike_context_kernel)[_grid(p, block_m)](
        p.a,
        p.b,
        p.a_prev,
        p.b_cur,
        scale,
        threshold,
        mem_in,
        p.count_out if p.count_in is None else p.count_in,
        p.out5,
        mem_out,
        p.count_out,
        p.count_out if active is None else active,
        a.shape[0],
        m,
        n,
        d,
        p.a.shape[2],
        *p.a.stride(),
        *p.b.stride(),
        *p.out5.stride()[:4],
        n_min,
        p_max,
        *active_layout(active, nb * m),
        HAS_STATE=state is not None,
        HAS_ACTIVE=active is not None,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    shape = p.count_shape
    return p.out, mem_out.reshape(shape), p.count_out.reshape(shape)

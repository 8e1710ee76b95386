"""Spike product (SESA, SPEC.md §5): all T steps of ``A_t B_t - A_{t-1} B_{t-1}`` in one launch.

Two paths, chosen by the contraction length K:

* ``K <= MAX_FUSED_K = 64`` (attention scores: the head dim of ViT-S/B/L):
  ``spike_matmul_kernel``. One program per output tile
  (BLOCK_M x BLOCK_N) of one batch entry; K is one tile (padded to a power of two >= 32,
  masked). The program keeps its rows of the running count A and columns of B in registers
  (int8) for all T steps, so each spike tile is read once per step and the counts never
  leave the chip. Per step it computes ``a_t @ B_t + A_{t-1} @ b_t`` with int8 tensor-core
  dots into int32, skipping a term whose spike tile is all zero, and stores
  ``scale * float(int)``.
* ``K > MAX_FUSED_K`` (the context ``P V``, K = 197 or more keys): the counts of a row
  block no longer fit in registers. A first kernel (``running_count_kernel``) writes the
  running counts of every step once (int8, the same size as the spikes: ``A_{t-1}`` for a,
  ``B_t`` for b) and the outgoing counts; then ``spike_matmul_split_kernel`` loops over K
  tiles per step and, per K tile, loads a count tile only when the matching spike tile is not
  silent. Recomputing the counts per program would cost O(T^2) reads; re-reading them costs
  one extra pass over the spikes' size, and the product reads a count tile only where spikes
  are.

The integer part is exact: int8 operands, int32 accumulation (|sum| <= 2 * 128 * K), one
float32 scaling, so the output is bit-identical to ``reference.spike_matmul``.

The outgoing counts go into fresh tensors, or with ``inplace`` into the given ones: written
there by ``running_count_kernel`` on the split path, copied in after the fused kernel (see
``spike_matmul_triton`` for why).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spikekernels.kernels import cdiv, on_device
from spikekernels.kernels.tile_flags import any_nonzero

# One K tile up to 64 (the head dim of ViT-S/B/L: the scores Q K^T); longer K (the context
# P V, K = 197 keys) takes the split path. Compiled for sm_90 with Triton 3.6 (ptxas -v), the
# fused kernel at 64 x 64 x 64 and 8 warps uses 200 registers (b = k^T) to 254 (b with N = 197
# contiguous), no spills; every tile shape tried with a 128 or 256 K tile spilled (64x64x128:
# 236 B, 32x32x256: 680 B a thread), since each int8 element costs a register or more.
MAX_FUSED_K = 64
# K tile of the split path.
SPLIT_BLOCK_K = 64
# Running-count kernel: elements per program.
COUNT_BLOCK = 1024


def fused_config(k: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps)`` of the fused path for ``k <= MAX_FUSED_K``.

    BLOCK_K is K padded to a power of two >= 32 (int8 mma wants a K tile of 32); 64 x 64
    output tiles feed a Hopper wgmma (M = 64 a warpgroup). A program holds four int8 tiles
    across the T loop (counts A, B and spikes a_t, b_t); 8 warps keep them in registers
    (4 warps spilled 520 B a thread at K = 32; tests/triton_sm90.py checks for spills).
    Untuned on hardware so far: bench/bench_sesa.py records ``n_regs`` and ``n_spills`` next
    to the timings.
    """
    block_k = max(32, triton.next_power_of_2(k))
    return 64, 64, block_k, 8


def split_config() -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps)`` of the split-K path (same register rule)."""
    return 64, 64, SPLIT_BLOCK_K, 8


@triton.jit
def _load_k(ptrs, mask_k, EVEN_K: tl.constexpr):
    """Load an int8 tile whose only masked dimension is K (zero in the padding)."""
    if EVEN_K:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=mask_k, other=0)


@triton.jit
def spike_matmul_kernel(
    a_ptr,  # [T, B, H, M, K] int8 spikes a_t, any strides (the batch flat: B * H)
    b_ptr,  # [T, B, H, K, N] int8 spikes b_t, any strides
    scale_ptr,  # [1] float scale (theta_a * theta_b * extra)
    a_in_ptr,  # [B, M, K] int8 incoming count A, contiguous; read when HAS_A_IN
    b_in_ptr,  # [B, K, N] int8 incoming count B, contiguous; read when HAS_B_IN
    out_ptr,  # [T, B, M, N] float32, contiguous
    a_out_ptr,  # [B, M, K] int8 outgoing count A
    b_out_ptr,  # [B, K, N] int8 outgoing count B
    T,
    M,
    N,
    K,
    H,
    stride_at,
    stride_ab,
    stride_ah,
    stride_am,
    stride_ak,
    stride_bt,
    stride_bb,
    stride_bh,
    stride_bk,
    stride_bn,
    stride_ot,  # B * H * M * N
    HAS_A_IN: tl.constexpr,
    HAS_B_IN: tl.constexpr,
    EVEN_M: tl.constexpr,  # M % BLOCK_M == 0
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0
    EVEN_K: tl.constexpr,  # K == BLOCK_K: no padding, no mask
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per step: ``B += b_t; out_t = scale * (a_t @ B + A @ b_t); A += a_t`` (K in one tile)."""
    # One flat grid axis (axis 1 would cap the batch at 65535): the tiles of one batch entry
    # are neighbours, so they share its spike tiles in L2.
    num_n = tl.cdiv(N, BLOCK_N)
    num_tiles = tl.cdiv(M, BLOCK_M) * num_n
    pid = tl.program_id(0)
    bid = (pid // num_tiles).to(tl.int64)
    pid_m = (pid % num_tiles) // num_n
    pid_n = pid % num_n
    # Rows past M and columns past N wrap around instead of being masked: output row i only
    # depends on row i of a (column j on column j of b), and the wrapped ones are never
    # stored. That keeps masks (registers) off the loads in the T loop; only a K padded up to
    # BLOCK_K needs one, so that the padding adds zeros.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # (A wrap hides contiguity from the compiler: skip it where the tiles divide M / N.)
    rows = offs_m if EVEN_M else offs_m % M
    cols = offs_n if EVEN_N else offs_n % N
    mask_k = offs_k < K
    mask_o = (offs_m < M)[:, None] & (offs_n < N)[None, :]

    # Scalar base pointers advance through time and batch; the tile offsets inside one
    # [M, K] / [K, N] / [M, N] slab are loop-invariant int32 (the host guarantees they fit),
    # which keeps per-element pointers out of the loop-carried registers.
    a_ptr += (bid // H) * stride_ab + (bid % H) * stride_ah
    b_ptr += (bid // H) * stride_bb + (bid % H) * stride_bh
    out_ptr += bid * M * N
    a_offs = rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_offs = offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    out_offs = offs_m[:, None] * N + offs_n[None, :]
    a_cnt_offs = bid * M * K + rows[:, None] * K + offs_k[None, :]
    b_cnt_offs = bid * K * N + offs_k[:, None] * N + cols[None, :]
    mask_a = mask_k[None, :]
    mask_b = mask_k[:, None]

    # Padded rows/columns of K hold zero counts and zero spikes, so they add nothing.
    if HAS_A_IN:
        a_cnt = _load_k(a_in_ptr + a_cnt_offs, mask_a, EVEN_K)
    else:
        a_cnt = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int8)
    if HAS_B_IN:
        b_cnt = _load_k(b_in_ptr + b_cnt_offs, mask_b, EVEN_K)
    else:
        b_cnt = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.int8)
    scale = tl.load(scale_ptr).to(tl.float32)

    for _ in range(T):
        a_t = _load_k(a_ptr + a_offs, mask_a, EVEN_K)
        b_t = _load_k(b_ptr + b_offs, mask_b, EVEN_K)
        b_cnt += b_t
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        # A silent spike tile skips its dot (and the count's trip through shared memory); a
        # program whose two tiles are silent only stores the scaled zero tile.
        if any_nonzero(a_t):
            acc = tl.dot(a_t, b_cnt, acc, out_dtype=tl.int32)
        if any_nonzero(b_t):
            acc = tl.dot(a_cnt, b_t, acc, out_dtype=tl.int32)
        a_cnt += a_t
        # scale * float(int) for every element, zeros included: a negative scale gives -0.0
        # exactly as the reference does.
        tl.store(out_ptr + out_offs, scale * acc.to(tl.float32), mask=mask_o)
        a_ptr += stride_at
        b_ptr += stride_bt
        out_ptr += stride_ot

    # Every program of a row block holds the same A, every program of a column block the
    # same B: one of each writes it.
    if pid_n == 0:
        tl.store(a_out_ptr + a_cnt_offs, a_cnt, mask=(offs_m < M)[:, None] & mask_k[None, :])
    if pid_m == 0:
        tl.store(b_out_ptr + b_cnt_offs, b_cnt, mask=mask_k[:, None] & (offs_n < N)[None, :])


@triton.jit
def running_count_kernel(
    x_ptr,  # [T, B, H, R, C] int8 spikes, any strides (the batch flat: B * H entries)
    known_ptr,  # [B, H, R, C] int8 count before (or, FROM_AFTER, after) the T steps; HAS_KNOWN
    counts_ptr,  # [T, B * H, R, C] int8 running counts, contiguous
    final_ptr,  # [B, H, R, C] int8 outgoing count, known's strides (WRITE_FINAL only)
    T,
    R,
    C,
    H,
    stride_xt,
    stride_xb,
    stride_xh,
    stride_xr,
    stride_xc,
    stride_ct,  # B * H * R * C
    stride_sb,  # the strides of known and final
    stride_sh,
    stride_sr,
    stride_sc,
    EXCLUSIVE: tl.constexpr,
    HAS_KNOWN: tl.constexpr,
    FROM_AFTER: tl.constexpr,
    WRITE_FINAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``counts[t] = X_{t-1}`` (EXCLUSIVE) or ``X_t``, with ``X_t = X_{-1} + sum_{tau<=t}
    x_tau``, from a known count: ``X_{-1}`` (0 without one), or with ``FROM_AFTER`` the count
    after the steps, ``X_{T-1}``, walking the steps backwards (``X_{t-1} = X_t - x_t``)."""
    num_blocks = tl.cdiv(R * C, BLOCK)
    pid = tl.program_id(0)
    bid = (pid // num_blocks).to(tl.int64)
    offs = (pid % num_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < R * C
    row, col = (offs // C).to(tl.int64), (offs % C).to(tl.int64)
    b, h = bid // H, bid % H
    x_ptrs = x_ptr + b * stride_xb + h * stride_xh + row * stride_xr + col * stride_xc
    c_ptrs = counts_ptr + bid * R * C + offs
    state_offs = b * stride_sb + h * stride_sh + row * stride_sr + col * stride_sc
    if HAS_KNOWN:
        cnt = tl.load(known_ptr + state_offs, mask=mask, other=0)
    else:
        cnt = tl.zeros([BLOCK], dtype=tl.int8)
    if FROM_AFTER:
        # the offset of the last step may pass 2^31; tl.cast, not .to: T == 1 is specialised
        # into a Python int, which has no .to (a compile error on the GPU only)
        last = tl.cast(T - 1, tl.int64)
        x_ptrs += last * stride_xt
        c_ptrs += last * stride_ct
        for _ in range(T):
            x = tl.load(x_ptrs, mask=mask, other=0)
            if EXCLUSIVE:
                cnt -= x
                tl.store(c_ptrs, cnt, mask=mask)
            else:
                tl.store(c_ptrs, cnt, mask=mask)
                cnt -= x
            x_ptrs -= stride_xt
            c_ptrs -= stride_ct
    else:
        for _ in range(T):
            x = tl.load(x_ptrs, mask=mask, other=0)
            if EXCLUSIVE:
                tl.store(c_ptrs, cnt, mask=mask)
                cnt += x
            else:
                cnt += x
                tl.store(c_ptrs, cnt, mask=mask)
            x_ptrs += stride_xt
            c_ptrs += stride_ct
        if WRITE_FINAL:
            tl.store(final_ptr + state_offs, cnt, mask=mask)


@triton.jit
def spike_matmul_split_kernel(
    a_ptr,  # [T, B, H, M, K] int8 spikes a_t, any strides (the batch flat: B * H)
    b_ptr,  # [T, B, H, K, N] int8 spikes b_t, any strides
    a_prev_ptr,  # [T, B, M, K] int8 A_{t-1}, contiguous
    b_cur_ptr,  # [T, B, K, N] int8 B_t, contiguous
    scale_ptr,  # [1] float scale
    out_ptr,  # [T, B, M, N] float32, contiguous
    T,
    M,
    N,
    K,
    H,
    stride_at,
    stride_ab,
    stride_ah,
    stride_am,
    stride_ak,
    stride_bt,
    stride_bb,
    stride_bh,
    stride_bk,
    stride_bn,
    stride_ot,  # B * M * N
    stride_a_prev_t,  # B * M * K
    stride_b_cur_t,  # B * K * N
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per step and K tile: ``acc += a_t @ B_t`` and ``acc += A_{t-1} @ b_t`` where spiking."""
    # One flat grid axis (axis 1 would cap the batch at 65535): the tiles of one batch entry
    # are neighbours, so they share its spike tiles in L2.
    num_n = tl.cdiv(N, BLOCK_N)
    num_tiles = tl.cdiv(M, BLOCK_M) * num_n
    pid = tl.program_id(0)
    bid = (pid // num_tiles).to(tl.int64)
    pid_m = (pid % num_tiles) // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_o = mask_m[:, None] & mask_n[None, :]

    # Spike strides are arbitrary (views): their offsets in int64.
    a_ptr += (bid // H) * stride_ab + (bid % H) * stride_ah
    b_ptr += (bid // H) * stride_bb + (bid % H) * stride_bh
    a_base = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_base = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn
    a_cnt_base = a_prev_ptr + bid * M * K + offs_m[:, None] * K
    b_cnt_base = b_cur_ptr + bid * K * N + offs_n[None, :]
    out_ptrs = out_ptr + bid * M * N + offs_m[:, None] * N + offs_n[None, :]
    scale = tl.load(scale_ptr).to(tl.float32)

    for _ in range(T):
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            mask_a = mask_m[:, None] & (ks[None, :] < K)
            mask_b = (ks[:, None] < K) & mask_n[None, :]
            a_t = tl.load(a_base + ks.to(tl.int64)[None, :] * stride_ak, mask=mask_a, other=0)
            b_t = tl.load(b_base + ks.to(tl.int64)[:, None] * stride_bk, mask=mask_b, other=0)
            if any_nonzero(a_t):
                b_cnt = tl.load(b_cnt_base + ks[:, None] * N, mask=mask_b, other=0)
                acc = tl.dot(a_t, b_cnt, acc, out_dtype=tl.int32)
            if any_nonzero(b_t):
                a_cnt = tl.load(a_cnt_base + ks[None, :], mask=mask_a, other=0)
                acc = tl.dot(a_cnt, b_t, acc, out_dtype=tl.int32)
        tl.store(out_ptrs, scale * acc.to(tl.float32), mask=mask_o)
        a_base += stride_at
        b_base += stride_bt
        a_cnt_base += stride_a_prev_t
        b_cnt_base += stride_b_cur_t
        out_ptrs += stride_ot


def _split_dims(batch: tuple[int, ...]) -> tuple[int, int]:
    """The kernels' two batch dims ``(-1, H)``: ``H`` the last batch dim (1 without one)."""
    return -1, batch[-1] if batch else 1


def _split_batch(x: torch.Tensor) -> torch.Tensor:
    """``[T, *batch, R, C]`` -> ``[T, B, H, R, C]``, ``H`` the last batch dim (1 without
    one) and ``B`` the others: a view whenever the leading batch dims merge, so the heads of
    a packed ``qkv`` slice (``[T, B, H, N, Dh]`` with the heads inside a token's row) are read
    in place; a copy otherwise, and in the rare layout whose offsets inside one ``[R, C]``
    slab would not fit the kernels' int32 tile offsets. Kernels take the flat batch index
    ``i`` as ``(i // H, i % H)``."""
    x = x.reshape(x.shape[0], *_split_dims(x.shape[1:-2]), x.shape[-2], x.shape[-1])
    span = (x.shape[-2] - 1) * x.stride(-2) + (x.shape[-1] - 1) * x.stride(-1)
    return x if span < 2**31 else x.contiguous()


def _split_state(x: torch.Tensor) -> torch.Tensor:
    """A count ``[*batch, R, C]`` as ``[B, H, R, C]``, split as ``_split_batch`` splits the
    spikes: a view whenever the leading batch dims merge, a copy otherwise."""
    return x.reshape(*_split_dims(x.shape[:-2]), x.shape[-2], x.shape[-1])


def _running_counts(
    launch,
    x: torch.Tensor,
    known: torch.Tensor | None,
    exclusive: bool,
    *,
    after: bool = False,
    final: torch.Tensor | None = None,
) -> torch.Tensor:
    """Running counts of ``x`` ``[T, B, H, R, C]`` for every step, ``[T, B * H, R, C]``
    contiguous, from a known count ``[B, H, R, C]`` (int8, any strides): the count before
    the steps (zero when None), or with ``after`` the count after them. ``final``
    (``[B, H, R, C]``, ``known``'s strides) receives the outgoing count when given (not with
    ``after``: the caller has it); it may be ``known`` itself (a state updated in place):
    each element is read at the start and written at the end of the one program that owns
    it."""
    T, nb, r, c = x.shape[0], x.shape[1] * x.shape[2], x.shape[3], x.shape[4]
    counts = torch.empty((T, nb, r, c), dtype=torch.int8, device=x.device)
    strides = next((t.stride() for t in (known, final) if t is not None), (0, 0, 0, 0))
    grid = (cdiv(r * c, COUNT_BLOCK) * nb,)
    launch(running_count_kernel)[grid](
        x,
        counts if known is None else known,
        counts,
        counts if final is None else final,
        T,
        r,
        c,
        x.shape[2],
        *x.stride(),
        nb * r * c,
        *strides,
        EXCLUSIVE=exclusive,
        HAS_KNOWN=known is not None,
        FROM_AFTER=after,
        WRITE_FINAL=final is not None,
        BLOCK=COUNT_BLOCK,
        num_warps=4,
    )
    return counts


@on_device
def spike_matmul_triton(
    launch,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    a_acc: torch.Tensor | None,
    b_acc: torch.Tensor | None,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host side: split the batch dims (``_split_batch``: no copy for the usual views, the
    head slices of a packed qkv included), allocate, launch. Returns ``(out, a_acc, b_acc)``,
    the counts fresh, or with ``inplace`` the given ones (both given and contiguous, sharing
    no memory with an input: checked by the op), updated.

    Needs ``M, N, K >= 1`` and at least one batch entry; the op handles empty shapes.
    """
    T = a.shape[0]
    batch = a.shape[1:-2]
    m, k = a.shape[-2:]
    n = b.shape[-1]
    a5, b5 = _split_batch(a), _split_batch(b)
    nb = a5.shape[1] * a5.shape[2]
    out = torch.empty((T, *batch, m, n), dtype=torch.float32, device=a.device)
    a_in = None if a_acc is None else a_acc.reshape(nb, m, k).contiguous()
    b_in = None if b_acc is None else b_acc.reshape(nb, k, n).contiguous()

    if k <= MAX_FUSED_K:
        block_m, block_n, block_k, num_warps = fused_config(k)
        a_out = torch.empty((*batch, m, k), dtype=torch.int8, device=a.device)
        b_out = torch.empty((*batch, k, n), dtype=torch.int8, device=a.device)
        grid = (cdiv(m, block_m) * cdiv(n, block_n) * nb,)
        launch(spike_matmul_kernel)[grid](
            a5,
            b5,
            scale,
            a_out if a_in is None else a_in,
            b_out if b_in is None else b_in,
            out,
            a_out,
            b_out,
            T,
            m,
            n,
            k,
            a5.shape[2],
            *a5.stride(),
            *b5.stride(),
            nb * m * n,
            HAS_A_IN=a_in is not None,
            HAS_B_IN=b_in is not None,
            EVEN_M=m % block_m == 0,
            EVEN_N=n % block_n == 0,
            EVEN_K=k == block_k,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            num_warps=num_warps,
        )
        if inplace:
            # Not in place in the kernel: a count tile is loaded before the T loop by every
            # program that needs it (A's rows by every column tile of the row block, and by
            # the last row tile where its rows wrap past M; B's columns by every row tile)
            # and stored after it by one of them, which may run before another has loaded
            # it (programs run in any order). So the kernel writes fresh counts, copied in
            # here after it (stream order): two small copies of the state's size.
            a_acc.copy_(a_out)
            b_acc.copy_(b_out)
            return out, a_acc, b_acc
        return out, a_out, b_out

    # the counts [B, H, R, C], split as the spikes are
    split = a5.shape[1:3]
    a_known = None if a_in is None else a_in.view(*split, m, k)
    b_known = None if b_in is None else b_in.view(*split, k, n)
    if inplace:
        # In place: running_count_kernel loads each count element before its T loop and
        # stores it after, in the one program that owns it (no other program touches it),
        # and the product kernel below reads only the per-step counts a_prev / b_cur, never
        # a_acc / b_acc. (a_in, b_in: views of the given contiguous counts.)
        a_out, b_out = a_known, b_known
    else:
        a_out = torch.empty((*split, m, k), dtype=torch.int8, device=a.device)
        b_out = torch.empty((*split, k, n), dtype=torch.int8, device=a.device)
    a_prev = _running_counts(launch, a5, a_known, exclusive=True, final=a_out)
    b_cur = _running_counts(launch, b5, b_known, exclusive=False, final=b_out)
    block_m, block_n, block_k, num_warps = split_config()
    grid = (cdiv(m, block_m) * cdiv(n, block_n) * nb,)
    launch(spike_matmul_split_kernel)[grid](
        a5,
        b5,
        a_prev,
        b_cur,
        scale,
        out,
        T,
        m,
        n,
        k,
        a5.shape[2],
        *a5.stride(),
        *b5.stride(),
        nb * m * n,
        nb * m * k,
        nb * k * n,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    if inplace:
        return out, a_acc, b_acc
    return out, a_out.reshape(*batch, m, k), b_out.reshape(*batch, k, n)

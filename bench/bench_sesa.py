"""Spike product (SESA, SPEC.md §5): the fused op vs the official code's three dense float
matmuls per step vs one dense QANN product (int8 ``torch._int_mm``, bf16 ``torch.matmul``).

Shapes are ViT-S/B/L attention at batch 64, 197 tokens, head dim 64 (6/12/16 heads): the
scores ``Q K^T`` (``b = k.transpose(-1, -2)``, read in place; the fused kernel) and the
context ``P V`` (K = 197: the split-K kernel). On a CPU, ViT-S at batch 1 through the CPU
runtime path (batched exact float matmuls; bench/conftest.py never uses the interpreter).

Spike trains are genuine: analog q, k, v (signed, level 16) and attention probabilities
(softmax of random scores, unsigned, level 16) are fed to ``spikekernels.st_bif`` at t = 0
and zeros after, so each neuron fires its quantized count in its first steps and then falls
silent; the fraction of output tiles whose two spike tiles are silent is recorded per step.

``test_sesa_step``: one step with a controlled fraction of silent spike tiles (each operand's
tiles silent with that probability) and incoming counts; ``silent_*_tiles`` record what the
kernel sees (its last partial tile wraps round to the first rows, so slightly fewer are silent
than drawn). DESIGN.md: at 90% silent, at least as fast as one dense int8 step
(``speedup_vs_int8_dense_step`` >= 1: against the step's two bare ``torch._int_mm`` products;
``speedup_vs_int8_dense_step_unfused`` adds their sum, cast and scale as separate passes, the
work the fused op does in its epilogue); ``speedup_vs_dense`` is against the official three
fp32 matmuls, and the bf16 dense step is recorded too.

``test_float_attention_probs``: float mode's fused scores + Spike-Softmax + neuron against the
three ops unfused (``speedup_vs_unfused``; ``matches_unfused_spikes``: the fraction of equal
spikes, below 1 only where the two softmax implementations round a tie apart).

``test_exact_attention_counts``: exact mode's scores + softmax + neuron + context + neuron in
one kernel on running counts, as ``ExactAttention`` runs them, against the two ops on running
counts (``speedup_vs_two_ops``) and on spikes (``speedup_vs_spike_form``).

``test_sesa_run``: a whole run of T steps, against one dense int8 QANN product of the same
shape (``ratio_to_int8_dense``; DESIGN.md sets no target for it). The op writes a dense
float32 output every step, so a run moves at least T times the QANN's output bytes: ``gbps``
and ``fraction_of_copy_bandwidth`` say how close the run is to that floor.

torch has no batched int8 matmul: the int8 baseline is one ``torch._int_mm`` of
``[batch * heads * M, K] @ [K, N]`` (padded: rows > 16, K and N multiples of 8), the same
multiply-adds and output bytes as the batched product, A row-major and B column-major (the
layout cuBLASLt's int8 GEMM takes). On the first GPU run cuBLASLt refused that layout for the
scores (N = 197 padded to 200, K = 64: ``CUBLAS_STATUS_NOT_SUPPORTED``) while it ran the
context (N = 64, K = 200 padded): so the baseline tries a short list of layouts (N padded
further, then the transposed product), checks the one that runs against an exact product and
records it as ``int8_layout``. When none runs, ``baseline_error`` says why and the fused op's
figures are still recorded, without the int8 ratios.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    DEVICE,
    ON_GPU,
    copy_bandwidth_gbps,
    record,
    time_op,
    try_median_time,
)

import spikekernels
from spikekernels import reference
from spikekernels.kernels.spike_matmul import MAX_FUSED_K, fused_config, split_config
from spikekernels.ops.spike_matmul import spike_matmul_torch

if ON_GPU:
    BATCH, TOKENS, HEAD_DIM = 64, 197, 64
    MODELS = {"vit_s": 6, "vit_b": 12, "vit_l": 16}
    STEPS = [8, 16, 32, 64]
else:
    BATCH, TOKENS, HEAD_DIM = 1, 197, 64
    MODELS = {"vit_s_b1": 6}
    STEPS = [16]
PRODUCTS = ["scores", "context"]
SILENT = [0.0, 0.9, 1.0] if ON_GPU else [0.9]
LEVEL = 16
ROUNDS = 10 if ON_GPU else 3
# st_bif is fed zeros after t = 0 in chunks of this many steps (bounds the float input).
ST_BIF_CHUNK = 8


def _gen(seed: int) -> torch.Generator:
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(seed)
    return gen


def _shapes(heads: int, product: str) -> tuple[tuple[int, ...], int, int, int]:
    """``(batch, M, K, N)`` of the product."""
    batch = (BATCH, heads)
    if product == "scores":
        return batch, TOKENS, HEAD_DIM, TOKENS
    return batch, TOKENS, TOKENS, HEAD_DIM


def _spike_train(values: torch.Tensor, T: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ST-BIF spikes ``[T, *shape]`` of ``values`` (in units of the threshold) fed at t = 0, and
    the final count (the QANN's integer once the train has settled)."""
    n_min, p_max = reference.level_bounds(LEVEL, signed)
    theta = torch.ones(1, device=DEVICE)
    spikes = torch.empty((T, *values.shape), dtype=torch.int8, device=DEVICE)
    first, v, s = spikekernels.st_bif(values[None], theta, n_min, p_max)
    spikes[0] = first[0]
    zeros = torch.zeros((min(ST_BIF_CHUNK, max(T - 1, 1)), *values.shape), device=DEVICE)
    for t in range(1, T, ST_BIF_CHUNK):
        n = min(ST_BIF_CHUNK, T - t)
        spikes[t : t + n], v, s = spikekernels.st_bif(zeros[:n], theta, n_min, p_max, v, s)
    return spikes, s


_TRAINS: dict = {}


def _trains(heads: int, product: str) -> tuple[torch.Tensor, ...]:
    """``(a, b, a_int, b_int)`` for max(STEPS) steps; ``b`` is a view for the scores.

    Both products of the latest model are kept (the exact attention case reads both for each
    of its cases); another model's trains replace them.
    """
    key = (heads, product)
    if key not in _TRAINS:
        if any(h != heads for h, _ in _TRAINS):
            _TRAINS.clear()
        gen = _gen(0)
        T = max(STEPS)
        qkv = (BATCH, heads, TOKENS, HEAD_DIM)
        if product == "scores":
            # q, k: signed level 16 ([-8, 7]) at ~2.5 thresholds of spread
            q = torch.randn(qkv, device=DEVICE, generator=gen) * 2.5
            k = torch.randn(qkv, device=DEVICE, generator=gen) * 2.5
            a, a_int = _spike_train(q, T, signed=True)
            k_sp, k_int = _spike_train(k, T, signed=True)
            b, b_int = k_sp.transpose(-1, -2), k_int.transpose(-1, -2)
        else:
            # attention probabilities: unsigned level 16 ([0, 15], threshold 1/15)
            scores = torch.randn((BATCH, heads, TOKENS, TOKENS), device=DEVICE, generator=gen)
            probs = torch.softmax(scores * 3.0, dim=-1) * (LEVEL - 1)
            v = torch.randn(qkv, device=DEVICE, generator=gen) * 2.5
            a, a_int = _spike_train(probs, T, signed=False)
            b, b_int = _spike_train(v, T, signed=True)
        _TRAINS[key] = (a, b, a_int, b_int)
    return _TRAINS[key]


def _output_tile(k: int) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` of the kernel that runs contraction length k."""
    return (fused_config(k) if k <= MAX_FUSED_K else split_config())[:2]


def _live_tiles(a: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which spike tiles of the kernel hold a spike: ``[T, B, M / BLOCK_M]`` row blocks of
    ``a`` and ``[T, B, N / BLOCK_N]`` column blocks of ``b`` (all of K), as the kernel reads
    them: the fused kernel's last partial tile wraps round to the first rows (it holds a
    spike when they do), the split-K kernel's is padded with zeros."""
    block_m, block_n = _output_tile(k)
    T, m, n = a.shape[0], a.shape[-2], b.shape[-1]
    rows = (a != 0).any(-1).reshape(T, -1, m)
    cols = (b != 0).any(-2).reshape(T, -1, n)
    return _tiles(rows, block_m, wraps=k <= MAX_FUSED_K), _tiles(cols, block_n, k <= MAX_FUSED_K)


def _tiles(live: torch.Tensor, block: int, wraps: bool) -> torch.Tensor:
    """``live [..., size]`` (bool) per tile of ``block``: rows past ``size`` wrap to the start
    (``wraps``, the fused kernel's rule) or are empty."""
    size = live.shape[-1]
    if wraps:
        index = torch.arange(-(-size // block) * block, device=live.device) % size
        live = live[..., index]
    else:
        live = torch.nn.functional.pad(live, (0, -size % block))
    return live.reshape(*live.shape[:-1], -1, block).any(-1)


def _silent_output_tiles(a: torch.Tensor, b: torch.Tensor, k: int) -> list[float]:
    """Per step, the fraction of output tiles whose two spike tiles are silent."""
    rows, cols = _live_tiles(a, b, k)
    live = rows[:, :, :, None] | cols[:, :, None, :]
    return [round(f, 4) for f in (~live).flatten(1).float().mean(1).tolist()]


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, cols - x.shape[1], 0, rows - x.shape[0]))


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# Operand layouts tried for the int8 baseline, first that cuBLASLt runs and gets right wins:
# (name, N padded to a multiple of, transposed product). Rows and K are padded to multiples of
# 8 (rows > 16), as torch._int_mm requires.
INT8_LAYOUTS = (
    ("a[rows,K] row-major @ b[K,N] column-major, N padded to 8", 8, False),
    ("a[rows,K] row-major @ b[K,N] column-major, N padded to 16", 16, False),
    ("a[rows,K] row-major @ b[K,N] column-major, N padded to 32", 32, False),
    ("a[rows,K] row-major @ b[K,N] column-major, N padded to 64", 64, False),
    ("(b^T[N,K] row-major @ a^T[K,rows] column-major)^T, N padded to 8", 8, True),
)


def _int8_operands(a_int: torch.Tensor, b_int: torch.Tensor, n_multiple: int):
    """``a2 [rows, K8]`` and ``bt [N8, K8]``, both contiguous int8: ``a2`` is A row-major and
    ``bt.t()`` is B (the first batch entry's) column-major. Zero padding."""
    k, n = a_int.shape[-1], b_int.shape[-1]
    a2 = a_int.reshape(-1, k).to(torch.int8)
    rows, k8, n8 = max(_round_up(a2.shape[0], 8), 24), _round_up(k, 8), _round_up(n, n_multiple)
    a2 = _pad_to(a2, rows, k8).contiguous()
    bt = _pad_to(b_int.reshape(-1, k, n)[0].transpose(0, 1).to(torch.int8), n8, k8).contiguous()
    return a2, bt


def _int8_products(*pairs: tuple[torch.Tensor, torch.Tensor]):
    """One dense int8 product ``[B*M, K] @ [K, N]`` per ``(a_int, b_int)`` pair (with the first
    batch entry's ``b``): the same multiply-adds and output bytes as the batched QANN product.

    Returns ``(products, layout)``: callables giving ``[rows, N8]`` int32, all in the first of
    ``INT8_LAYOUTS`` that runs for every pair and matches an exact float64 product on its first
    rows. Raises RuntimeError naming each layout's failure when none does.
    """
    failures = []
    for name, n_multiple, transposed in INT8_LAYOUTS:
        products = []
        try:
            for a_int, b_int in pairs:
                a2, bt = _int8_operands(a_int, b_int, n_multiple)
                if transposed:
                    product = lambda a2=a2, bt=bt: torch._int_mm(bt, a2.t()).t()
                else:
                    product = lambda a2=a2, bt=bt: torch._int_mm(a2, bt.t())
                out = product()
                if ON_GPU:
                    torch.cuda.synchronize()
                rows = min(a2.shape[0], 64)
                exact = (a2[:rows].double() @ bt.double().t()).to(torch.int32)
                if not torch.equal(out[:rows], exact):
                    raise RuntimeError("wrong values")
                products.append(product)
        except Exception as exc:  # cuBLAS refusing the layout (RuntimeError), or wrong values
            failures.append(f"{name}: {(str(exc).splitlines() or [''])[0][:200]}")
            continue
        return products, name
    raise RuntimeError("torch._int_mm ran no int8 layout: " + "; ".join(failures))


def _official_step(heads: int, product: str):
    """The official SAttention step: float spikes (sigma * theta), running sums updated in
    place, then ``a_t @ B_t + A_t @ b_t - a_t @ b_t`` (three fp32 matmuls), scaled."""
    batch, m, k, n = _shapes(heads, product)
    gen = _gen(3)
    a_t = torch.randint(-1, 2, (*batch, m, k), device=DEVICE, generator=gen).float()
    b_t = torch.randint(-1, 2, (*batch, k, n), device=DEVICE, generator=gen).float()
    acc_a, acc_b = torch.zeros_like(a_t), torch.zeros_like(b_t)
    scale = 0.125

    def step():
        acc_a.add_(a_t)
        acc_b.add_(b_t)
        return (a_t @ acc_b + acc_a @ b_t - a_t @ b_t) * scale

    return step


_BASELINES: dict = {}


def _dense_baselines(heads: int, product: str) -> tuple[dict, dict]:
    """``(seconds, notes)``: the T-independent dense baselines, measured once per shape
    (``None`` for one that cannot run), and notes for extra_info (``baseline_error``,
    ``int8_layout``)."""
    key = (heads, product)
    if key not in _BASELINES:
        _, _, a_int, b_int = _trains(heads, product)
        a_bf16, b_bf16 = a_int.to(torch.bfloat16), b_int.to(torch.bfloat16)
        notes: dict = {}
        dense = {
            "official_step": try_median_time(
                "official_step", _official_step(heads, product), notes
            ),
            "bf16_qann": try_median_time("bf16_qann", lambda: torch.matmul(a_bf16, b_bf16), notes),
            "int8_qann": None,
        }
        try:
            (int8_product,), notes["int8_layout"] = _int8_products((a_int, b_int))
        except RuntimeError as exc:
            notes.setdefault("baseline_error", {})["int8_qann"] = str(exc)[:1000]
        else:
            dense["int8_qann"] = try_median_time("int8_qann", int8_product, notes)
        _BASELINES[key] = (dense, notes)
    dense, notes = _BASELINES[key]
    return dense, {k: dict(v) if isinstance(v, dict) else v for k, v in notes.items()}


class _RecordingLauncher:
    """A ``launch`` for the host function that keeps what each launch returns (on a GPU the
    compiled kernel, whose ``n_regs`` / ``n_spills`` show register pressure)."""

    def __init__(self) -> None:
        self.compiled: list = []

    def __call__(self, kernel):
        launcher = self

        class _Indexed:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    launcher.compiled.append(kernel[grid](*args, **kwargs))

                return run

        return _Indexed()


def _kernel_registers(a, b, scale) -> dict[str, int]:
    if not ON_GPU:
        return {}
    from spikekernels.kernels.spike_matmul import spike_matmul_triton

    launch = _RecordingLauncher()
    spike_matmul_triton(launch, a, b, scale, None, None)
    compiled = launch.compiled[-1]
    return {
        "n_regs": getattr(compiled, "n_regs", -1),
        "n_spills": getattr(compiled, "n_spills", -1),
    }


def _bytes(T: int, batch: tuple[int, ...], m: int, k: int, n: int) -> int:
    """Float32 output written and int8 spikes read once per step."""
    nb = math.prod(batch)
    return T * nb * (4 * m * n + m * k + k * n)


RUN_CASES = [(name, product, T) for name in MODELS for product in PRODUCTS for T in STEPS]


PROBS_STEPS = [8, 16] if ON_GPU else [16]
PROBS_CASES = [(name, T) for name in MODELS for T in PROBS_STEPS]


@pytest.mark.parametrize(("model", "T"), PROBS_CASES, ids=[f"{m}-T{t}" for m, t in PROBS_CASES])
def test_exact_attention_counts(benchmark, model, T):
    """Exact mode's attention between qkv and proj as ``ExactAttention`` runs it: one kernel
    on running counts (``ops.exact_attention``: the attention counts stay in registers),
    against the same two layers as two ops on running counts (``exact_attention_probs(
    counts_in=True, counts_out=True)`` then ``exact_context(counts_in=True)``: the attention
    counts written and read back) and as two ops on spikes and the counts after the chunk
    (each op forms the running counts of its operands in a pass of its own).
    ``speedup_vs_two_ops``, ``speedup_vs_spike_form``; ``matches_*``: 1.0 when the context
    spikes agree bit for bit (they must). Then a chunk after the attention settled (q, k and v
    held, both neurons at their targets, every ``qkv_active`` flag 0), as a late chunk of a
    run: without the settled flags (``quiet_over_busy``: every program still forms both
    products and runs both neurons at the first step) and with them, every row settled, as
    ``ExactAttention`` passes them (``settled_rows_over_busy``)."""
    from spikekernels.exact_math import score_gain
    from spikekernels.ops import exact_attention, exact_attention_probs, exact_context

    heads = MODELS[model]
    q_all, k_all, _, _ = _trains(heads, "scores")
    q, k_t = q_all[:T], k_all[:T]
    v = _trains(heads, "context")[1][:T]
    counts = [torch.cumsum(x, 0, dtype=torch.int8) for x in (q, k_t, v)]
    gain = score_gain(torch.tensor(1.0), torch.tensor(1.0), HEAD_DIM).to(DEVICE)
    theta_a = torch.full((1,), 1 / (LEVEL - 1), device=DEVICE)
    theta_v, theta_out = torch.ones(1, device=DEVICE), torch.full((1,), 0.5, device=DEVICE)
    probs_bounds = reference.level_bounds(LEVEL, signed=False)
    context_bounds = reference.level_bounds(LEVEL, signed=True)
    scalars = (theta_a, theta_v, theta_out, *context_bounds)

    def fused():
        return exact_attention(*counts, gain, theta_a, *probs_bounds, *scalars, merge_heads=False)[
            0
        ]

    def count_form():
        a, _ = exact_attention_probs(
            counts[0], counts[1], gain, theta_a, *probs_bounds, counts_in=True, counts_out=True
        )
        return exact_context(a, counts[2], *scalars, counts_in=True)[0]

    def spike_form():
        a, a_count = exact_attention_probs(
            q, k_t, gain, theta_a, *probs_bounds, counts[0][-1], counts[1][-1]
        )
        return exact_context(a, v, *scalars, a_count, counts[2][-1])[0]

    benchmark.group = f"exact attention {model}"
    seconds = time_op(benchmark, fused, warmup=1, reps=ROUNDS)
    out = fused()
    info = dict(
        model=model,
        T=T,
        seconds_per_step=seconds / T,
        spike_density=out.ne(0).float().mean().item(),
        matches_two_ops=out.eq(count_form()).float().mean().item(),
        matches_spike_form=out.eq(spike_form()).float().mean().item(),
    )
    for name, baseline in (("two_ops", count_form), ("spike_form", spike_form)):
        other = try_median_time(name, baseline, info, reps=3)
        if other is not None:
            info[f"speedup_vs_{name}"] = other / seconds
    for name, quiet in _settled_attention_calls(counts, gain, theta_a, probs_bounds, scalars):
        quiet_seconds = try_median_time(name, quiet, info, reps=3)
        if quiet_seconds is not None:
            info[f"{name}_over_busy"] = quiet_seconds / seconds
    record(benchmark, seconds, **info)


def _settled_attention_calls(counts, gain, attn_threshold, probs_bounds, scalars):
    """``(name, call)`` of a settled chunk of the fused attention: the chunk's last counts
    held for its ``T`` steps, both neurons' counts at their targets (the chunk, then enough
    held steps for the attention and then the context neuron to climb to every target),
    every ``qkv_active`` flag 0; without the settled flags (``quiet``) and with them."""
    from spikekernels.ops import exact_attention

    steps = counts[0].shape[0]
    batch, m = counts[0].shape[1:-2], counts[0].shape[-2]

    def run(operands, state=(), **flags):
        return exact_attention(*operands, gain, attn_threshold, *probs_bounds, *scalars, *state,
                               **flags)  # fmt: skip

    def held(n):
        return [c[-1:].expand(n, *c.shape[1:]) for c in counts]

    climb = probs_bounds[1] - probs_bounds[0] + scalars[-1] - scalars[-2] + 2
    state = run(held(climb), run(counts)[1:])[1:]
    still = torch.zeros(steps, *batch, 3, dtype=torch.int32, device=DEVICE)
    # every row settled; the op writes the last step's back into them (settled again)
    settled = {name: torch.ones(*batch, m, dtype=torch.int32, device=DEVICE)
               for name in ("attn_row_settled", "row_settled")}  # fmt: skip
    assert not run(held(steps), state, qkv_active=still)[0].any(), "not settled"
    return [
        ("quiet", lambda: run(held(steps), state, qkv_active=still)),
        ("settled_rows", lambda: run(held(steps), state, qkv_active=still, **settled)),
    ]


@pytest.mark.parametrize(
    ("model", "product", "T"), RUN_CASES, ids=[f"{m}-{p}-T{t}" for m, p, t in RUN_CASES]
)
def test_sesa_run(benchmark, model, product, T):
    heads = MODELS[model]
    batch, m, k, n = _shapes(heads, product)
    a_all, b_all, _, _ = _trains(heads, product)
    a, b = a_all[:T], b_all[:T]
    scale = torch.full((1,), 0.125, device=DEVICE)
    fused = lambda: spikekernels.spike_matmul(a, b, scale)

    benchmark.group = f"sesa run {model} {product}"
    seconds = time_op(benchmark, fused, warmup=1, reps=ROUNDS)
    silent = _silent_output_tiles(a, b, k)
    gbps = _bytes(T, batch, m, k, n) / seconds / 1e9
    info = dict(
        model=model,
        product=product,
        T=T,
        shape=[*batch, m, k, n],
        settled=silent[-1] == 1.0,
        silent_output_tiles_per_step=silent,
        seconds_per_step=seconds / T,
        gbps=gbps,
        fraction_of_copy_bandwidth=gbps / copy_bandwidth_gbps(),
        dense_equiv_tops=2 * 2 * T * math.prod(batch) * m * k * n / seconds / 1e12,
        **_kernel_registers(a, b, scale),
    )
    dense, notes = _dense_baselines(heads, product)
    info.update(notes)
    # on a CPU the op *is* this PyTorch path: a ratio there would time it against itself
    dense_exact = (
        try_median_time("torch_dense_exact", lambda: spike_matmul_torch(a, b, scale), info, reps=3)
        if ON_GPU
        else None
    )
    if dense["official_step"] is not None:
        info["speedup_vs_dense"] = T * dense["official_step"] / seconds
    if dense_exact is not None:
        info["speedup_vs_torch_dense_exact"] = dense_exact / seconds
    if dense["int8_qann"] is not None:
        info["ratio_to_int8_dense"] = seconds / dense["int8_qann"]
    if dense["bf16_qann"] is not None:
        info["ratio_to_bf16_dense"] = seconds / dense["bf16_qann"]
    record(benchmark, seconds, **info)


def _step_inputs(heads: int, product: str, silent: float):
    """One step whose spike tiles (row blocks of a, column blocks of b) are silent with
    probability ``silent``; the rest hold ternary spikes at 30% density. Counts in level 16.
    For the scores ``b`` and its counts are transposed views of ``[N, K]`` tensors, as the
    model's ``k.transpose(-1, -2)`` is."""
    batch, m, k, n = _shapes(heads, product)
    block_m, block_n = _output_tile(k)
    gen = _gen(4)

    def spikes(shape, block, dim):
        x = torch.randint(-1, 2, shape, device=DEVICE, generator=gen, dtype=torch.int8)
        x *= torch.rand(shape, device=DEVICE, generator=gen) < 0.3
        size = shape[dim]
        live = torch.rand((*shape[:-2], -(-size // block)), device=DEVICE, generator=gen)
        live = (live >= silent).repeat_interleave(block, dim=-1)[..., :size]
        return x * (live.unsqueeze(-1) if dim == -2 else live.unsqueeze(-2))

    a = spikes((1, *batch, m, k), block_m, -2)
    a_acc = torch.randint(-8, 8, (*batch, m, k), device=DEVICE, generator=gen, dtype=torch.int8)
    if product == "scores":
        b = spikes((1, *batch, n, k), block_n, -2).transpose(-1, -2)
        b_acc = torch.randint(-8, 8, (*batch, n, k), device=DEVICE, generator=gen, dtype=torch.int8)
        return a, b, a_acc, b_acc.transpose(-1, -2)
    b = spikes((1, *batch, k, n), block_n, -1)
    b_acc = torch.randint(-8, 8, (*batch, k, n), device=DEVICE, generator=gen, dtype=torch.int8)
    return a, b, a_acc, b_acc


STEP_CASES = [(name, product, s) for name in MODELS for product in PRODUCTS for s in SILENT]


@pytest.mark.parametrize(
    ("model", "product", "silent"),
    STEP_CASES,
    ids=[f"{m}-{p}-silent{s}" for m, p, s in STEP_CASES],
)
def test_sesa_step(benchmark, model, product, silent):
    heads = MODELS[model]
    batch, m, k, n = _shapes(heads, product)
    a, b, a_acc, b_acc = _step_inputs(heads, product, silent)
    scale = torch.full((1,), 0.125, device=DEVICE)
    fused = lambda: spikekernels.spike_matmul(a, b, scale, a_acc, b_acc)

    benchmark.group = f"sesa step {model} {product}"
    seconds = time_op(benchmark, fused, warmup=1, reps=ROUNDS)
    rows, cols = _live_tiles(a, b, k)
    gbps = (_bytes(1, batch, m, k, n) + math.prod(batch) * 2 * (m * k + k * n)) / seconds / 1e9
    info = dict(
        model=model,
        product=product,
        shape=[*batch, m, k, n],
        silent_a_tiles=1.0 - rows.float().mean().item(),
        silent_b_tiles=1.0 - cols.float().mean().item(),
        silent_output_tiles=_silent_output_tiles(a, b, k)[0],
        gbps=gbps,
        fraction_of_copy_bandwidth=gbps / copy_bandwidth_gbps(),
    )
    official = try_median_time("official_step", _official_step(heads, product), info)
    if official is not None:
        info["speedup_vs_dense"] = official / seconds
    # the same step densely in the QANN's arithmetic: two int8 products (a_t @ B_t, A @ b_t)
    try:
        (a_int8, b_int8), info["int8_layout"] = _int8_products((a[0], b_acc), (a_acc, b[0]))
    except RuntimeError as exc:
        info.setdefault("baseline_error", {})["int8_dense_step"] = str(exc)[:1000]
    else:
        # the bare products (a lower bound of any dense step), then with the unfused epilogue
        int8_step = try_median_time("int8_dense_step", lambda: (a_int8(), b_int8()), info)
        if int8_step is not None:
            info["speedup_vs_int8_dense_step"] = int8_step / seconds
        unfused = try_median_time(
            "int8_dense_step_unfused", lambda: (a_int8() + b_int8()).float() * scale, info
        )
        if unfused is not None:
            info["speedup_vs_int8_dense_step_unfused"] = unfused / seconds
    a_bf16, b_bf16 = a[0].to(torch.bfloat16), b[0].to(torch.bfloat16)
    acc_a, acc_b = a_acc.to(torch.bfloat16), b_acc.to(torch.bfloat16)
    bf16_step = try_median_time(
        "bf16_dense_step",
        lambda: (a_bf16 @ acc_b + acc_a @ b_bf16).float() * scale,
        info,
    )
    if bf16_step is not None:
        info["speedup_vs_bf16_dense_step"] = bf16_step / seconds
    record(benchmark, seconds, **info)


@pytest.mark.parametrize(("model", "T"), PROBS_CASES, ids=[f"{m}-T{t}" for m, t in PROBS_CASES])
def test_float_attention_probs(benchmark, model, T):
    """Float mode's scores product + Spike-Softmax + attention neuron: the fused op
    (``ops.spike_attention_probs``, one kernel, int8 spikes out) against the same three ops
    unfused (``spike_matmul`` writing float32 scores, ``spike_softmax`` reading them and
    writing float32 differences, ``st_bif`` reading those), on the genuine q/k trains."""
    from spikekernels.ops import spike_attention_probs

    heads = MODELS[model]
    q_all, k_all, _, _ = _trains(heads, "scores")
    q, k_t = q_all[:T], k_all[:T]
    q_count, k_count = q.sum(0, dtype=torch.int8), k_t.sum(0, dtype=torch.int8)
    scale = torch.full((1,), 0.125, device=DEVICE)
    theta = torch.full((1,), 1 / (LEVEL - 1), device=DEVICE)
    bounds = reference.level_bounds(LEVEL, signed=False)

    def fused():
        return spike_attention_probs(q, k_t, scale, theta, *bounds, q_count, k_count)

    def unfused():
        scores, _, _ = spikekernels.spike_matmul(q, k_t, scale)
        probs, _, _ = spikekernels.spike_softmax(scores)
        return spikekernels.st_bif(probs, theta, *bounds)

    benchmark.group = f"float attention probs {model}"
    seconds = time_op(benchmark, fused, warmup=1, reps=ROUNDS)
    spikes, _ = fused()
    batch, m, _, n = _shapes(heads, "scores")
    info = dict(
        model=model,
        T=T,
        shape=[*batch, m, HEAD_DIM, n],
        seconds_per_step=seconds / T,
        spike_density=spikes.ne(0).float().mean().item(),
        matches_unfused_spikes=spikes.eq(unfused()[0]).float().mean().item(),
    )
    split = try_median_time("unfused", unfused, info, reps=3)
    if split is not None:
        info["speedup_vs_unfused"] = split / seconds
    record(benchmark, seconds, **info)


def test_int8_baseline_layouts(monkeypatch):
    """The int8 baseline survives cuBLASLt refusing a layout (as it refused the scores, N 200,
    K 64, on the first GPU run): the next layout that runs and is exact is used, and when none
    runs the error names every layout. Not a benchmark: a check of the harness."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-8, 8, (2, 3, 197, 64), dtype=torch.int8, generator=gen)
    b = torch.randint(-8, 8, (2, 3, 197, 64), dtype=torch.int8, generator=gen).transpose(-1, -2)
    exact = (a.reshape(-1, 64).double() @ b[0, 0].double()).to(torch.int32)
    int_mm = torch._int_mm

    def refuse(mat1, mat2):
        if mat2.shape[1] == 200 or mat1.shape[0] == 200:
            raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED (simulated)")
        return int_mm(mat1, mat2)

    monkeypatch.setattr(torch, "_int_mm", refuse)
    (product,), layout = _int8_products((a, b))
    assert layout == INT8_LAYOUTS[1][0]
    assert torch.equal(product()[: exact.shape[0], :197], exact)

    def wrong(mat1, mat2):
        return int_mm(mat1, mat2) + 1

    monkeypatch.setattr(torch, "_int_mm", wrong)
    with pytest.raises(RuntimeError, match="ran no int8 layout") as info:
        _int8_products((a, b))
    assert all(name in str(info.value) for name, _, _ in INT8_LAYOUTS)

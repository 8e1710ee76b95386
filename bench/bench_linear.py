"""Spike linear (SPEC.md §6): the fused op vs the per-step dense float matmul (what the
official SNN code does) vs one dense QANN product (int8 ``torch._int_mm``, bf16 matmul);
float mode's spike linear fused with its neuron (``spike_linear_neuron``, float32 weights as
their bf16 split on tensor cores) vs the same two ops unfused; and exact mode's int8 linear
with its neuron (``exact_linear``) on a settling chunk and on a settled one (every tile quiet:
``quiet_over_busy``), against one dense int8 step.

Shapes are the ViT-S/B qkv and MLP layers at batch 64 x 197 tokens. Spikes are genuine:
quantized activations run through ``spikekernels.st_bif``, so the silent fractions are those
of a settling layer, recorded next to the times: of rows, and of the (step, ``BLOCK_M``-row
tile)s the kernel skips (``silent_tile_fraction``, at the kernel's own tile).
``dense_equiv_tops`` counts ``2 * T * rows * K * N`` operations, skipped ones included.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, ON_GPU, record, time_op, try_median_time

import spikekernels
from spikekernels import reference
from spikekernels.kernels.exact_linear import tile_config as exact_linear_tiles
from spikekernels.kernels.spike_linear import tile_config as spike_linear_tiles
from spikekernels.kernels.spike_linear_neuron import tile_config as linear_neuron_tiles

ROWS = 64 * 197 if ON_GPU else 64
STEPS = [8, 16] if ON_GPU else [4]
# (K, N): ViT-S qkv, fc1, fc2; ViT-B qkv, fc1, fc2. Tiny stand-ins on CPU.
SHAPES = (
    [(384, 1152), (384, 1536), (1536, 384), (768, 2304), (768, 3072), (3072, 768)]
    if ON_GPU
    else [(64, 192), (192, 64)]
)
LEVEL = 16
THETA = 0.05


def _spikes(T: int, K: int) -> torch.Tensor:
    """ST-BIF spikes of a settling layer: each row's analog input (a per-token scale times
    Gaussian features) arrives spread over the first three steps; level-16 signed neuron."""
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(0)
    token_scale = torch.empty(ROWS, 1, device=DEVICE).log_normal_(-2.5, 1.0, generator=gen)
    analog = torch.randn(ROWS, K, device=DEVICE, generator=gen) * token_scale
    split = torch.zeros(T, ROWS, K, device=DEVICE)
    weights = torch.tensor([0.6, 0.3, 0.1], device=DEVICE)[: min(T, 3)]
    split[: weights.numel()] = weights[:, None, None] * analog
    n_min, p_max = reference.level_bounds(LEVEL, signed=True)
    spikes, _, _ = spikekernels.st_bif(split, torch.tensor(THETA, device=DEVICE), n_min, p_max)
    return spikes


def _silent_fractions(s: torch.Tensor, block_m: int, flat: bool) -> dict[str, float]:
    """Of the input spikes ``s`` ``[T, rows, K]``: the silent rows, and the silent (step,
    ``block_m``-row tile)s, what the kernel skips (``tile_flags.step_tile_flags``; ``flat``:
    tiles of the steps' rows end to end, as ``spike_linear`` reads them)."""
    silent = (s == 0).all(dim=-1)
    if flat:
        silent = silent.reshape(1, -1)
    tiles = F.pad(silent, (0, -silent.shape[1] % block_m), value=True)
    return dict(
        silent_row_fraction=silent.float().mean().item(),
        silent_tile_fraction=tiles.reshape(len(tiles), -1, block_m).all(-1).float().mean().item(),
    )


def _layer_info(
    s: torch.Tensor, N: int, seconds: float, block_m: int, flat: bool = False, **extra
) -> dict:
    """A layer's figures: its shape, the silent fractions of its input spikes ``s``
    ``[T, rows, K]`` at the kernel's ``block_m`` (``flat``: see ``_silent_fractions``), and the
    dense-equivalent TOPS (skipped work counted)."""
    T, rows, K = s.shape
    return dict(
        T=T,
        rows=rows,
        K=K,
        N=N,
        **extra,
        **_silent_fractions(s, block_m, flat),
        dense_equiv_tops=2 * T * rows * K * N / seconds / 1e12,
    )


# Exact mode's layer first: bench/device_check.sh caps each suite's time.
@pytest.mark.parametrize(("K", "N"), SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("T", STEPS)
def test_exact_linear(benchmark, T, K, N):
    """Exact mode's layer as the runner calls it (int8 weights and scale, the input count
    before the chunk, the output count in): a chunk of a settling layer, and a chunk after it
    settled (no input spike, every target reached: each tile quiet after the first step, so
    neither MMA nor epilogue runs), without and with its settled rows (``row_settled``, as
    ``ExactLinearNeuron`` passes them: every tile then exits before its prologue). One dense
    int8 step is the QANN's whole layer."""
    s = _spikes(T, K)
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(1)
    w_float = torch.randn(N, K, device=DEVICE, generator=gen) * K**-0.5
    w_int8, w_scale = spikekernels.exact_math.int_weights(w_float)
    bias = torch.randn(N, device=DEVICE, generator=gen) * 0.1
    theta_in, theta = torch.tensor(THETA, device=DEVICE), torch.tensor(0.1, device=DEVICE)
    n_min, p_max = reference.level_bounds(LEVEL, signed=True)
    layer = (w_int8, w_scale, bias, theta_in, theta, n_min, p_max)
    op = spikekernels.ops.exact_linear
    before = torch.zeros(ROWS, K, dtype=torch.int8, device=DEVICE)
    fresh = torch.zeros(ROWS, N, dtype=torch.int8, device=DEVICE)
    # settle: the chunk, then silent steps until every target is reached
    after = s.sum(0, dtype=torch.int32).to(torch.int8)
    count = op(s, *layer, count=fresh, s_before=before)[1]
    silent = torch.zeros(p_max - n_min, ROWS, K, dtype=torch.int8, device=DEVICE)
    settled = op(silent, *layer, count=count, s_before=after)[1]
    quiet_input = silent[:1].expand(T, ROWS, K).contiguous()
    assert not op(quiet_input, *layer, count=settled, s_before=after)[0].any(), "not settled"

    busy_call = lambda: op(s, *layer, count=fresh, s_before=before)  # noqa: E731
    quiet_call = lambda: op(quiet_input, *layer, count=settled, s_before=after)  # noqa: E731
    benchmark.group = f"exact_linear T={T} K={K} N={N}"
    seconds = time_op(benchmark, busy_call)
    info = _layer_info(s, N, seconds, exact_linear_tiles()[0])
    quiet_seconds = try_median_time("settled", quiet_call, info)
    if quiet_seconds is not None:
        info["quiet_over_busy"] = quiet_seconds / seconds
    every_row = torch.ones(ROWS, dtype=torch.int32, device=DEVICE)
    settled_call = lambda: op(  # noqa: E731
        quiet_input, *layer, count=settled, s_before=after, row_settled=every_row
    )
    settled_seconds = try_median_time("settled_rows", settled_call, info)
    if settled_seconds is not None:
        info["settled_rows_over_busy"] = settled_seconds / seconds
        # the op writes the flags back: a settled chunk leaves every row settled for the next
        assert bool(every_row.all()), "a row of the settled chunk fired"
    a_int8 = torch.randint(-8, 8, (ROWS, K), dtype=torch.int8, device=DEVICE, generator=gen)
    w_int8_t = w_int8.t()
    int8_qann = try_median_time("int8_qann", lambda: torch._int_mm(a_int8, w_int8_t), info)
    if int8_qann is not None:
        info["time_ratio_vs_int8_qann"] = seconds / int8_qann
    record(benchmark, seconds, **info)


@pytest.mark.parametrize("weight_dtype", [torch.int8, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(("K", "N"), SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("T", STEPS)
def test_spike_linear(benchmark, T, K, N, weight_dtype):
    s = _spikes(T, K)
    theta = torch.tensor(THETA, device=DEVICE)
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(1)
    w_float = torch.randn(N, K, device=DEVICE, generator=gen) * K**-0.5
    bias = torch.randn(N, device=DEVICE, generator=gen) * 0.1
    w_scale = w_float.abs().amax(dim=1) / 127
    w_int8 = torch.round(w_float / w_scale[:, None]).to(torch.int8)
    if weight_dtype == torch.int8:
        weight, scale = w_int8, w_scale
    elif weight_dtype == torch.float32:  # as a module passes it: the cached bf16 split
        weight, scale = spikekernels.ops.split_weight_bf16x3(w_float), None
    else:
        weight, scale = w_float.to(weight_dtype), None
    fused = lambda: spikekernels.spike_linear(s, weight, theta, bias, weight_scale=scale)

    benchmark.group = f"spike_linear T={T} K={K} N={N}"
    seconds = time_op(benchmark, fused)
    block_m = spike_linear_tiles(weight_dtype)[0]
    dtype = str(weight_dtype).removeprefix("torch.")
    info = _layer_info(s, N, seconds, block_m, flat=True, weight_dtype=dtype)

    def per_step_dense():
        # the official LLLinear: float spikes (sigma * theta), one fp32 GEMM per step
        return [
            F.linear(s[t].to(torch.float32) * theta, w_float, bias if t == 0 else None)
            for t in range(T)
        ]

    a_int8 = torch.randint(-8, 8, (ROWS, K), dtype=torch.int8, device=DEVICE, generator=gen)
    a_bf16 = a_int8.to(torch.bfloat16)
    w_int8_t, w_bf16 = w_int8.t(), w_float.to(torch.bfloat16)
    per_step = try_median_time("per_step_dense_fp32", per_step_dense, info, reps=3)
    if per_step is not None:
        info["speedup_vs_per_step_dense_fp32"] = per_step / seconds
    int8_qann = try_median_time("int8_qann", lambda: torch._int_mm(a_int8, w_int8_t), info)
    if int8_qann is not None:
        info["time_ratio_vs_int8_qann"] = seconds / int8_qann
    bf16_qann = try_median_time("bf16_qann", lambda: F.linear(a_bf16, w_bf16, None), info)
    if bf16_qann is not None:
        info["time_ratio_vs_bf16_qann"] = seconds / bf16_qann
    record(benchmark, seconds, **info)


@pytest.mark.parametrize(("K", "N"), SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("T", STEPS)
def test_spike_linear_neuron(benchmark, T, K, N):
    """Float mode's layer: float32 weights (split once, as ``nn.SpikeLinearNeuron`` caches it),
    the linear fused with its ST-BIF neuron vs ``spike_linear`` then ``st_bif``."""
    s = _spikes(T, K)
    theta_in = torch.tensor(THETA, device=DEVICE)
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(1)
    w_float = torch.randn(N, K, device=DEVICE, generator=gen) * K**-0.5
    bias = torch.randn(N, device=DEVICE, generator=gen) * 0.1
    parts = spikekernels.ops.split_weight_bf16x3(w_float)
    theta = torch.tensor(0.1, device=DEVICE)
    n_min, p_max = reference.level_bounds(LEVEL, signed=True)
    fused = lambda: spikekernels.ops.spike_linear_neuron(
        s, parts, theta_in, theta, n_min, p_max, bias
    )

    def unfused():
        y = spikekernels.spike_linear(s, parts, theta_in, bias)
        return spikekernels.st_bif(y, theta, n_min, p_max)

    benchmark.group = f"spike_linear_neuron T={T} K={K} N={N}"
    seconds = time_op(benchmark, fused)
    spikes = fused()[0]
    fired = (spikes != 0).float().mean().item()
    info = _layer_info(s, N, seconds, linear_neuron_tiles()[0], output_spike_fraction=fired)
    separate = try_median_time("unfused", unfused, info)
    if separate is not None:
        info["speedup_vs_unfused"] = separate / seconds
    a_bf16 = torch.randint(-8, 8, (ROWS, K), device=DEVICE, generator=gen).to(torch.bfloat16)
    w_bf16 = w_float.to(torch.bfloat16)
    bf16_qann = try_median_time("bf16_qann", lambda: F.linear(a_bf16, w_bf16, None), info)
    if bf16_qann is not None:
        info["time_ratio_vs_bf16_qann"] = seconds / bf16_qann
    record(benchmark, seconds, **info)

"""Spike-LayerNorm (SPEC.md §4): the fused op vs the per-step reference vs one dense
``F.layer_norm`` (what the QANN does once); float mode's Spike-LayerNorm fused with its
ST-BIF neuron (``spike_layernorm_neuron``) vs the two ops one after the other; and exact
mode's residual read + LayerNorm + neuron (``exact_layernorm_neuron``) on a busy chunk and on
a settled one, whose tiles are quiet and skip the row function (``quiet_over_busy``).

Bytes moved: the input read once and the output written once per step, plus the fresh state
(float32 ``x_acc`` and ``y_prev``) written once. On a GPU the figure of merit is the fraction
of the measured copy bandwidth (DESIGN.md target: >= 80%, ``fraction_of_copy_bandwidth``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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

ROWS = 64 * 197 if ON_GPU else 64
CHANNELS = [384, 768, 1024] if ON_GPU else [384]
STEPS = [8, 16, 32] if ON_GPU else [4]
EPS = 1e-6


def _settling_input(T: int, C: int):
    """``(x, weight, bias)``: increments of a settling residual stream (most are zero after
    t = 0) and a LayerNorm's affine parameters."""
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(0)
    x = torch.randn(T, ROWS, C, device=DEVICE, generator=gen)
    x[1:] *= torch.rand(T - 1, ROWS, C, device=DEVICE, generator=gen) < 0.3
    weight = torch.randn(C, device=DEVICE, generator=gen) * 0.1 + 1.0
    bias = torch.randn(C, device=DEVICE, generator=gen) * 0.1
    return x, weight, bias


# Exact mode's layer first: bench/device_check.sh caps each suite's time.
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("T", STEPS)
def test_exact_layernorm_neuron(benchmark, T, C):
    """A block's norm at ViT-S batch 64 (on a GPU): the float64 stream ``d`` read and int8
    spikes written per step (9 bytes an element-step), the count read and written once. Timed
    on a busy chunk (a fresh neuron climbing to its targets on a moving stream) and on a
    settled one (the stream held, the count at its targets: every tile quiet after the first
    step), so the record shows what the quiet skip saves and how close each is to copy
    bandwidth."""
    tokens = 197 if ON_GPU else 16
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(0)
    shape = (ROWS // tokens, tokens, C)
    c = torch.randn(1, tokens, C, device=DEVICE, generator=gen, dtype=torch.float64)
    moving = torch.randn(T, *shape, device=DEVICE, generator=gen, dtype=torch.float64) * 0.1
    held = moving[:1].expand(T, *shape).contiguous()
    weight = torch.randn(C, device=DEVICE, generator=gen) * 0.1 + 1.0
    bias = torch.randn(C, device=DEVICE, generator=gen) * 0.1
    theta = torch.tensor(0.1, device=DEVICE)
    n_min, p_max = reference.level_bounds(16, signed=True)
    norm = (weight, bias, EPS, theta, n_min, p_max)
    op = spikekernels.ops.exact_layernorm_neuron
    fresh = torch.zeros(shape, dtype=torch.int8, device=DEVICE)
    # settle on the held stream: p_max - n_min steps reach every target
    settled = op(held[:1].expand(p_max - n_min, *shape).contiguous(), c, *norm)[1]
    quiet = op(held, c, *norm, settled)
    assert not quiet[0].any(), "the settled chunk must be silent"

    busy_call = lambda: op(moving, c, *norm, fresh)  # noqa: E731 (a state in: the skip's variant)
    quiet_call = lambda: op(held, c, *norm, settled)  # noqa: E731
    moved = moving.numel() * (8 + 1) + 2 * fresh.numel()
    benchmark.group = f"exact_layernorm_neuron C={C}"
    seconds = time_op(benchmark, busy_call)
    info = dict(T=T, rows=ROWS, C=C, gbps=moved / seconds / 1e9)
    quiet_seconds = try_median_time("settled", quiet_call, info)
    if quiet_seconds is not None:
        info["quiet_over_busy"] = quiet_seconds / seconds
        info["settled_gbps"] = moved / quiet_seconds / 1e9
    if ON_GPU:
        info["fraction_of_copy_bandwidth"] = info["gbps"] / copy_bandwidth_gbps()
    step = moving[0].float()  # the baseline times the norm alone, not a float64 cast
    dense = try_median_time(
        "dense_layer_norm", lambda: F.layer_norm(step, (C,), weight, bias, EPS), info
    )
    if dense is not None:
        info["time_ratio_vs_one_dense_layer_norm"] = seconds / dense
    record(benchmark, seconds, **info)


@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("T", STEPS)
def test_spike_layernorm(benchmark, T, C):
    x, weight, bias = _settling_input(T, C)
    fused = lambda: spikekernels.spike_layernorm(x, weight, bias, EPS)
    moved = 2 * x.numel() * x.element_size() + 2 * ROWS * C * 4

    benchmark.group = f"spike_layernorm C={C}"
    seconds = time_op(benchmark, fused)
    info = dict(T=T, rows=ROWS, C=C, gbps=moved / seconds / 1e9)
    if ON_GPU:
        info["fraction_of_copy_bandwidth"] = info["gbps"] / copy_bandwidth_gbps()
    per_step = try_median_time(
        "per_step_reference",
        lambda: reference.spike_layernorm(x, weight, bias, EPS),
        info,
        reps=3,
    )
    if per_step is not None:
        info["speedup_vs_per_step_reference"] = per_step / seconds
    dense = try_median_time(
        "dense_layer_norm",
        lambda: F.layer_norm(x[0], (C,), weight, bias, EPS),
        info,
    )
    if dense is not None:
        info["time_ratio_vs_one_dense_layer_norm"] = seconds / dense
    record(benchmark, seconds, **info)


@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("T", STEPS)
def test_spike_layernorm_neuron(benchmark, T, C):
    x, weight, bias = _settling_input(T, C)
    theta = torch.tensor(0.1, device=DEVICE)
    n_min, p_max = reference.level_bounds(16, signed=True)
    fused = lambda: spikekernels.ops.spike_layernorm_neuron(
        x, weight, bias, EPS, theta, n_min, p_max
    )

    def unfused():
        y, _, _ = spikekernels.spike_layernorm(x, weight, bias, EPS)
        return spikekernels.st_bif(y, theta, n_min, p_max)

    # float32 input read and int8 spikes written per step; the state out: x_acc, y_prev and
    # the membrane (float32) and the count (int8 at level 16)
    moved = x.numel() * (x.element_size() + 1) + (3 * 4 + 1) * ROWS * C
    benchmark.group = f"spike_layernorm_neuron C={C}"
    seconds = time_op(benchmark, fused)
    info = dict(T=T, rows=ROWS, C=C, gbps=moved / seconds / 1e9)
    if ON_GPU:
        info["fraction_of_copy_bandwidth"] = info["gbps"] / copy_bandwidth_gbps()
    separate = try_median_time("unfused", unfused, info)
    if separate is not None:
        info["speedup_vs_unfused"] = separate / seconds
    record(benchmark, seconds, **info)

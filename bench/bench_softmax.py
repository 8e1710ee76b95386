"""Spike-Softmax (SPEC.md §3): the C++/CUDA op vs the per-step reference vs one dense
``torch.softmax`` of the accumulated input (what the QANN does once) vs SpikingJelly's
``TDSoftmax`` (cumsum, softmax of every prefix, diff) where SpikingJelly is installed.

Shapes are attention scores ``[T, B, heads, L, L]``: ViT-S/B/L (L = 197, 6/12/16 heads) and
RoBERTa (L = 50, 128, 12 heads) on a GPU; small ones on a CPU, plus ViT-S at batch 8, T = 16
(DESIGN.md sets no CPU speed target: the CPU figures are for the record).

``speedup_vs_official_loop`` is against what SpikeZIP-TF's own ``spiking_softmax`` does, one
call per step (``X = x_t + X; Y = softmax(X); out = Y - Y_pre``, each step's output its own
tensor, no ``-inf`` row handling): leaner than ``reference.spike_softmax``, which also
guards fully masked rows and stacks the steps into one ``[T, ...]`` tensor.

Bytes moved: the input read once and the output written once per step, plus the fresh state
(float32 ``x_acc`` and ``y_prev``) written once. DESIGN.md's GPU target: >= 80% of the
measured copy bandwidth (``fraction_of_copy_bandwidth``).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DEVICE,
    ON_GPU,
    copy_bandwidth_gbps,
    note_missing_baseline,
    record,
    time_op,
    try_median_time,
)

import spikekernels
from spikekernels import reference

try:
    from spikingjelly.activation_based.ann2snn.operators import TDSoftmax
except ImportError:  # SpikingJelly is optional: its ratio is left out
    TDSoftmax = None

# (name, T, [B, heads, L, L], dtype)
if ON_GPU:
    CASES = [("vit_s_b64", T, (64, 6, 197, 197), torch.float32) for T in (1, 8, 16, 32, 64)] + [
        ("vit_b_b32", 16, (32, 12, 197, 197), torch.float32),
        ("vit_b_b32", 16, (32, 12, 197, 197), torch.bfloat16),
        ("vit_l_b8", 16, (8, 16, 197, 197), torch.float32),
        ("roberta_l50_b64", 16, (64, 12, 50, 50), torch.float32),
        ("roberta_l128_b64", 16, (64, 12, 128, 128), torch.float32),
    ]
else:
    CASES = [("vit_s_b1", T, (1, 6, 197, 197), torch.float32) for T in (1, 8, 16, 32, 64)] + [
        ("vit_s_b8", 16, (8, 6, 197, 197), torch.float32),
        ("roberta_l50_b8", 16, (8, 12, 50, 50), torch.float32),
        ("roberta_l128_b8", 16, (8, 12, 128, 128), torch.bfloat16),
    ]


def _case_id(case) -> str:
    name, T, _, dtype = case
    return f"{name}-T{T}-{str(dtype).removeprefix('torch.')}"


def _official_loop(x: torch.Tensor) -> list[torch.Tensor]:
    """SpikeZIP-TF's ``spiking_softmax`` called once per step (float32 math)."""
    acc, y_prev, outs = 0.0, 0.0, []
    for x_t in x:
        acc = x_t.to(torch.float32) + acc
        y = torch.softmax(acc, dim=-1)
        outs.append(y - y_prev)
        y_prev = y
    return outs


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_spike_softmax(benchmark, case):
    name, T, shape, dtype = case
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(0)
    # attention-score increments: a large first step, smaller corrections after
    x = torch.randn((T, *shape), device=DEVICE, generator=gen)
    x[0] *= 4.0
    x = x.to(dtype)
    step_numel = x[0].numel()
    fused = lambda: spikekernels.spike_softmax(x)
    moved = 2 * x.numel() * x.element_size() + 2 * step_numel * 4

    benchmark.group = f"spike_softmax {name}"
    seconds = time_op(benchmark, fused)
    gbps = moved / seconds / 1e9
    info = dict(
        shape=[T, *shape],
        dtype=str(dtype),
        gbps=gbps,
        fraction_of_copy_bandwidth=gbps / copy_bandwidth_gbps(),
    )
    per_step = try_median_time(
        "per_step_reference",
        lambda: reference.spike_softmax(x),
        info,
        warmup=1,
        reps=3,
    )
    if per_step is not None:
        info["speedup_vs_per_step_reference"] = per_step / seconds
    official = try_median_time("official_loop", lambda: _official_loop(x), info, warmup=1, reps=3)
    if official is not None:
        info["speedup_vs_official_loop"] = official / seconds
    x_total = x.to(torch.float32).sum(0)
    dense = try_median_time("dense_softmax", lambda: torch.softmax(x_total, dim=-1), info)
    if dense is not None:
        info["time_ratio_vs_one_dense_softmax"] = seconds / dense
    if TDSoftmax is not None:
        jelly = TDSoftmax(dim=-1, step_mode="m")

        def spikingjelly_run():
            jelly.reset()
            return jelly(x)

        jelly_seconds = try_median_time("spikingjelly", spikingjelly_run, info, warmup=1, reps=3)
        if jelly_seconds is not None:
            info["speedup_vs_spikingjelly"] = jelly_seconds / seconds
    else:
        note_missing_baseline("spikingjelly", info)
    record(benchmark, seconds, **info)

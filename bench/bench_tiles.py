"""Tile shapes on the GPU at hand: the hot kernels' launch configurations, timed in the model.

Every Triton kernel here takes its tile shape and warp count from a module constant chosen by
register counts on sm_90 (tests/triton_sm90.py), not by timing: no GPU had run them when they
were set. This suite times the alternatives that also compile without a register spill
(``CANDIDATES``; tests/triton_sm90.py compiles each one) inside the converted ViT-S at batch
64, as ``bench_vit.py`` runs it, so that each kernel sees the model's own spikes and silent
tiles. Set ``i`` takes every family's ``i``-th candidate (set 0: the defaults; a family with
fewer candidates keeps its default); the families' kernels are disjoint, so one run per set
times every family's candidate at once.

Per set: one run to silence (which compiles), its logits checked bit for bit against set 0's
(a tile shape must not change a bit, in either mode), the run's median time, and the device
time of each kernel in one profiled chunk of ``CHUNK`` steps. Printed: a table of kernel x set
in milliseconds, and for each family the set whose kernel was fastest; recorded in the
benchmark's ``extra_info``: ``by_set`` and ``best``. On a GPU only: on a CPU the runtime path
is not Triton, and there is nothing to tune. It is bench/device_check.sh's last suite (the
first one the deadline cuts); alone, with the GPU tests before it:

    BENCH=bench/bench_tiles.py bash bench/device_check.sh
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from conftest import DEVICE, ON_GPU, median_time, record, time_op
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import spikekernels
from spikekernels.kernels import (
    exact_attention,
    exact_layernorm,
    exact_linear,
    spike_linear_neuron,
)
from spikekernels.models import calibrate, quant_vit_small

BATCH, LEVEL, MAX_STEPS, CHUNK = 64, 16, 64, 8

# family: (module, constant, the kernel it shapes). The candidates (the default first) live
# beside each default, ``TILE_CANDIDATES``; tests/triton_sm90.py compiles each.
CANDIDATES = {
    "exact": {
        "exact_linear": (exact_linear, "_GPU_TILES", "exact_linear_kernel"),
        "exact_attention": (exact_attention, "_ATTENTION_GPU", "exact_attention_kernel"),
        "exact_layernorm": (
            exact_layernorm,
            "ELEMENTS_PER_PROGRAM",
            "exact_layernorm_neuron_kernel",
        ),
    },
    "float": {
        "spike_linear_neuron": (
            spike_linear_neuron,
            "_GPU_TILES",
            "spike_linear_neuron_kernel",
        ),
    },
}


def config_sets(mode: str) -> list[dict[str, object]]:
    """Set ``i``: each family's ``i``-th candidate, or its default past its list."""
    lists = {f: module.TILE_CANDIDATES for f, (module, *_) in CANDIDATES[mode].items()}
    n = max(len(c) for c in lists.values())
    return [{f: c[i] if i < len(c) else c[0] for f, c in lists.items()} for i in range(n)]


def _kernel_ms(snn, x) -> dict[str, float]:
    """Device milliseconds of each kernel (by name) in one chunk of ``CHUNK`` steps."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        snn(x, max_steps=CHUNK, chunk=CHUNK)
        torch.cuda.synchronize()
    ms: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA and not e.is_user_annotation:
            ms[e.name] += e.self_device_time_total / 1e3
    return dict(ms)


@pytest.mark.skipif(not ON_GPU, reason="tile shapes are GPU launch parameters: needs a GPU")
@pytest.mark.parametrize("mode", ["exact", "float"])
def test_tile_sweep(benchmark, monkeypatch, mode):
    torch.manual_seed(0)
    qann = quant_vit_small(level=LEVEL, weight_bits=8 if mode == "exact" else None)
    qann = qann.to(DEVICE).eval()
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(0)
    shape = (BATCH, qann.in_chans, qann.img_size, qann.img_size)
    x = torch.randn(shape, device=DEVICE, generator=gen)
    calibrate(qann, x)
    snn = spikekernels.convert(qann)
    families = CANDIDATES[mode]
    run = lambda: snn(x, max_steps=MAX_STEPS, chunk=CHUNK)
    benchmark.group = f"tile sweep {mode} level={LEVEL}"

    by_set, first_logits, default_seconds = {}, None, None
    with torch.no_grad():
        for i, chosen in enumerate(config_sets(mode)):
            for family, value in chosen.items():
                module, constant, *_ = families[family]
                monkeypatch.setattr(module, constant, value)
            logits, steps = run()  # compiles this set's kernels
            if first_logits is None:
                first_logits = logits
                default_seconds = time_op(benchmark, run, warmup=0, reps=2)
                seconds = default_seconds
            else:
                seconds = median_time(run, warmup=0, reps=2)
            by_set[f"set {i}"] = dict(
                config={f: str(v) for f, v in chosen.items()},
                seconds=seconds,
                steps=steps,
                bitwise_equal_to_set_0=bool(torch.equal(logits, first_logits)),
                kernel_ms=_kernel_ms(snn, x),
            )
    monkeypatch.undo()

    best = {}
    for family, (_, _, kernel) in families.items():
        times = {s: r["kernel_ms"].get(kernel) for s, r in by_set.items()}
        timed = {s: t for s, t in times.items() if t is not None}
        if timed:
            s = min(timed, key=timed.get)
            best[family] = dict(set=s, config=by_set[s]["config"][family], ms=timed[s],
                                default_ms=timed.get("set 0"))  # fmt: skip
    _print_table(mode, by_set, best)
    record(
        benchmark,
        default_seconds,
        mode=mode,
        batch=BATCH,
        level=LEVEL,
        by_set=by_set,
        best=best,
        fastest_set=min(by_set, key=lambda s: by_set[s]["seconds"]),
    )
    unequal = [s for s, r in by_set.items() if not r["bitwise_equal_to_set_0"]]
    assert not unequal, f"tile shapes changed the logits: {unequal}"


def _print_table(mode: str, by_set: dict, best: dict) -> None:
    sets = list(by_set)
    kernels = sorted(by_set["set 0"]["kernel_ms"], key=by_set["set 0"]["kernel_ms"].get)[::-1]
    print(f"\n{mode} mode, ViT-S batch {BATCH}: device ms in one {CHUNK}-step chunk by set")
    print(f"{'kernel':44s}" + "".join(f"{s:>9s}" for s in sets))
    for k in kernels[:10]:
        row = "".join(f"{by_set[s]['kernel_ms'].get(k, float('nan')):9.2f}" for s in sets)
        print(f"{k[:44]:44s}{row}")
    print(f"{'whole run (ms)':44s}" + "".join(f"{by_set[s]['seconds'] * 1e3:9.1f}" for s in sets))
    for s in sets:
        print(f"  {s}: {by_set[s]['config']}")
    for family, b in best.items():
        print(f"  fastest {family}: {b['config']} ({b['set']}, {b['ms']:.2f} ms,", end=" ")
        print(f"default {b['default_ms']} ms)")

"""Host time per op call: ``call_op``'s direct path against the ``torch.ops`` dispatcher.

The exact runner makes 7 op calls per block per chunk (ViT-S: about 90), so the
Python cost of one call multiplies into milliseconds of host time per chunk, which only
hides behind the GPU while it is smaller than the chunk's kernels. Shapes here are tiny on
purpose: the kernels take microseconds, so a call costs what the host spends on it (checks,
dispatch, allocation, the Triton launcher). Each figure is the wall time of ``CALLS`` calls
in a row, one sync at the end, per call.

- ``test_op_call``: the same op body reached through ``ops._registry.call_op`` (direct in
  plain eager mode) and through ``torch.ops.spikekernels.<name>`` (the ``custom_op`` /
  ``triton_op`` machinery); ``dispatcher_over_direct`` is the saving.
- ``test_runner_chunk``: one 8-step chunk of the tiny ViT at batch 1, each mode, the runner as
  shipped against the same runner with every op sent through the dispatcher, and on a GPU
  against the chunk as one CUDA graph replay (``cuda_graph=True``).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from conftest import DEVICE, device_name, record, set_stats

import spikekernels
from spikekernels.models import calibrate, quant_vit_tiny
from spikekernels.ops import _registry
from spikekernels.ops.weight_split import split_weight_bf16x3

CALLS = 200


def _per_call(fn, calls: int = CALLS, reps: int = 5) -> float:
    """Median over ``reps`` of (wall time of ``calls`` calls, then one sync) / ``calls``."""
    return statistics.median(_per_call_samples(fn, calls, reps))


def _per_call_samples(fn, calls: int = CALLS, reps: int = 5) -> list[float]:
    """``reps`` samples of (wall time of ``calls`` calls, then one sync) / ``calls``."""
    fn()
    samples = []
    for _ in range(reps):
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / calls)
    return samples


def _time_direct(benchmark, fn, calls: int = CALLS) -> float:
    """The figure under test: its samples become the test's stats; returns their median."""
    benchmark.extra_info["device"] = device_name()
    samples = _per_call_samples(fn, calls)
    set_stats(benchmark, samples, timer=f"perf_counter / {calls} calls", warmup=1)
    return statistics.median(samples)


def _op_args(name: str, gen: torch.Generator) -> tuple:
    """Tiny valid arguments for op ``name`` (2 samples, 8 rows each, 32 features, T = 8),
    with ``active`` flags where the op takes them."""
    T, rows, k, n = 8, 16, 32, 32
    theta = torch.tensor([0.25], device=DEVICE)
    active = torch.zeros(T, 2, dtype=torch.int32, device=DEVICE)
    spikes = torch.randint(-1, 2, (T, 2, rows // 2, k), generator=gen, dtype=torch.int8)
    spikes = spikes.to(DEVICE)
    if name == "st_bif":
        x = torch.randn(T, 2, rows // 2, n, generator=gen).to(DEVICE)
        return (x, theta, -8, 7, None, None, False, active)
    if name == "exact_linear":
        w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(DEVICE)
        ws = torch.rand(n, generator=gen).add(0.5).div(127).to(DEVICE)
        return (spikes, w, ws, None, theta, theta, -8, 7, None, None, active)
    if name == "spike_linear_neuron":
        w = torch.randn(n, k, generator=gen).div(8).to(DEVICE)
        if DEVICE.type == "cuda":  # as SpikeLinearNeuron hands it over: split once
            w = split_weight_bf16x3(w)
        return (spikes, w, theta, theta, -8, 7, None, 0, 1, None, None, False, active)
    raise ValueError(name)


@pytest.mark.parametrize("name", ["st_bif", "exact_linear", "spike_linear_neuron"])
def test_op_call(benchmark, rng, name):
    args = _op_args(name, rng)
    op = getattr(torch.ops.spikekernels, name)
    benchmark.group = "host time per op call"
    with torch.no_grad():
        direct = _time_direct(benchmark, lambda: _registry.call_op(name, *args))
        dispatcher = _per_call(lambda: op(*args))
    record(
        benchmark,
        direct,
        op=name,
        dispatcher_us=dispatcher * 1e6,
        dispatcher_over_direct=dispatcher / direct,
    )


@pytest.mark.parametrize("mode", ["exact", "float"])
def test_runner_chunk(benchmark, monkeypatch, mode):
    torch.manual_seed(0)
    weight_bits = 8 if mode == "exact" else None
    qann = quant_vit_tiny(level=16, weight_bits=weight_bits).to(DEVICE).eval()
    images = torch.randn(9, qann.in_chans, qann.img_size, qann.img_size, device=DEVICE)
    calibrate(qann, images[1:])
    snn = spikekernels.convert(qann)
    x = images[:1]
    chunk = lambda: snn(x, max_steps=8, chunk=8)  # noqa: E731
    benchmark.group = "host time per runner chunk"
    direct = _time_direct(benchmark, chunk, calls=5)
    with monkeypatch.context() as patch:
        patch.setattr(_registry, "runs_directly", lambda args: False)
        dispatcher = _per_call(chunk, calls=5)
        routed_logits, _ = chunk()
    logits, _ = chunk()
    assert torch.equal(logits, routed_logits), "both paths run the same bodies"
    graphed = {}
    if DEVICE.type == "cuda":  # the same chunk as one CUDA graph replay
        replay = lambda: snn(x, max_steps=8, chunk=8, cuda_graph=True)  # noqa: E731
        graph_logits, _ = replay()  # captures
        assert torch.equal(graph_logits, logits), "a replay gives the eager bits"
        graph = _per_call(replay, calls=5)
        graphed = dict(cuda_graph_ms=graph * 1e3, direct_over_cuda_graph=direct / graph)
        snn.release_chunk_graphs()
    record(
        benchmark,
        direct,
        model=f"quant_vit_tiny {mode}, batch 1, one 8-step chunk",
        mode=mode,
        dispatcher_ms=dispatcher * 1e3,
        dispatcher_over_direct=dispatcher / direct,
        **graphed,
    )

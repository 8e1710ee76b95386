"""Shared helpers for the pytest-benchmark suites in bench/.

Every benchmark times the fused op with pytest-benchmark and, in the same test, its baselines
with ``median_time``, then records achieved bandwidth/throughput and the ratios in
``benchmark.extra_info`` (saved by ``--benchmark-json``; bench/device_check.sh keeps that file
under bench/results/). GPU timings synchronise inside the timed call.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import pytest
import torch

# Benchmarks time what a user runs: on a machine without a GPU that is the CPU runtime path
# (C++ kernels, vectorised PyTorch), never the Triton interpreter, whose timings mean nothing.
os.environ["TRITON_INTERPRET"] = "0"

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def device_name() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name(DEVICE)
    return f"cpu ({os.cpu_count()} cores)"


def synchronized(fn: Callable[[], object]) -> Callable[[], object]:
    """Wrap ``fn`` so that one call includes waiting for the GPU to finish it."""
    if not ON_GPU:
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


def median_time(fn: Callable[[], object], *, warmup: int = 2, reps: int = 10) -> float:
    """Median seconds per call of ``fn`` (CUDA events on GPU, perf_counter on CPU)."""
    if ON_GPU:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


_RECORDED: list[tuple[str, dict]] = []


def record(benchmark, seconds: float, **info) -> None:
    """Put the device and derived figures into the benchmark's extra_info (and the summary
    table printed at the end of the run)."""
    benchmark.extra_info["device"] = device_name()
    benchmark.extra_info["seconds"] = seconds
    benchmark.extra_info.update(info)
    _RECORDED.append((benchmark.name, dict(benchmark.extra_info)))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def pytest_terminal_summary(terminalreporter) -> None:
    """Last thing printed: one line per benchmark with its throughput and ratios."""
    if not _RECORDED:
        return
    terminalreporter.section(f"spikekernels benchmarks on {device_name()}")
    for name, info in _RECORDED:
        shown = {k: v for k, v in info.items() if k != "device"}
        if "seconds" in shown:
            shown["us"] = shown.pop("seconds") * 1e6
        terminalreporter.write_line(
            f"{name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
        )


@pytest.fixture
def rng() -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0)
    return gen


_COPY_GBPS: float | None = None


def copy_bandwidth_gbps() -> float:
    """The device's measured copy bandwidth (read + write bytes / s, in GB/s): the roofline
    that bandwidth-bound kernels are judged against. Measured once per session."""
    global _COPY_GBPS
    if _COPY_GBPS is None:
        n = (1 << 28) if ON_GPU else (1 << 24)  # 1 GiB of float32 on GPU, 64 MiB on CPU
        src = torch.empty(n, dtype=torch.float32, device=DEVICE).uniform_()
        dst = torch.empty_like(src)
        seconds = median_time(lambda: dst.copy_(src))
        _COPY_GBPS = 2 * src.numel() * src.element_size() / seconds / 1e9
    return _COPY_GBPS

"""Shared helpers for the pytest-benchmark suites in bench/.

Every benchmark times the fused op once, with ``time_op``: its per-call samples become the
test's pytest-benchmark stats (the JSON's ``stats``) and their median the ``seconds`` that
``record`` stores. Baselines are timed in the same test with ``median_time`` (the same
``measure``); a baseline that cannot run is noted with ``baseline_error`` and its ratios left
out, never the op's own figures. ``record`` puts bandwidth/throughput and the ratios in
``benchmark.extra_info`` (saved by ``--benchmark-json``; bench/device_check.sh keeps that file
under bench/results/).

On a GPU a sample is one call's device time between CUDA events, L2 flushed before it (as
``triton.testing.do_bench``), with no host synchronize inside it: the end event is queued
behind the call's work, so a sync there would only add the host's wake-up to every sample
(several microseconds: much of a small kernel's time). On a CPU it is ``time.perf_counter``
around the call.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
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


# GPU: calls cheaper than this budget / reps get more reps, up to MAX_GPU_REPS (event jitter).
GPU_REP_BUDGET_S = 0.1
MAX_GPU_REPS = 100
_L2_FLUSH: torch.Tensor | None = None


def _l2_flush() -> None:
    """Overwrite 256 MiB (more than any GPU's L2) so that the next call starts from a cold L2."""
    global _L2_FLUSH
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 << 20, dtype=torch.int8, device=DEVICE)
    _L2_FLUSH.zero_()


def _event_seconds(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _l2_flush()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def measure(fn: Callable[[], object], *, warmup: int = 2, reps: int = 10) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn``, after ``warmup`` untimed calls.

    GPU: CUDA events around each call, L2 flushed before each; when a call is cheap (from the
    last warmup call) it gets more reps, up to ``GPU_REP_BUDGET_S`` of calls. CPU: perf_counter.
    """
    if ON_GPU:
        torch.cuda.synchronize()
        for _ in range(warmup - 1):
            fn()
        if warmup > 0:
            estimate = _event_seconds(fn)
            reps = max(reps, min(MAX_GPU_REPS, int(GPU_REP_BUDGET_S / max(estimate, 1e-7))))
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(reps)
        ]
        for start, end in events:
            _l2_flush()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_time(fn: Callable[[], object], *, warmup: int = 2, reps: int = 10) -> float:
    """Median seconds per call of ``fn`` (``measure``): for baselines."""
    return statistics.median(measure(fn, warmup=warmup, reps=reps))


def time_op(benchmark, fn: Callable[[], object], *, warmup: int = 2, reps: int = 10) -> float:
    """Time the op under test, once: ``measure``'s samples become this test's pytest-benchmark
    stats (one round per sample, as ``benchmark.pedantic`` would record them, but with the
    device timer on a GPU) and their median is returned, for ``record``.

    Set ``benchmark.group`` before calling: pytest-benchmark copies it here.
    """
    # the device first: an entry whose test fails after this still says where it ran
    benchmark.extra_info["device"] = device_name()
    samples = measure(fn, warmup=warmup, reps=reps)
    timer = "cuda_events_cold_l2" if ON_GPU else "perf_counter"
    set_stats(benchmark, samples, timer=timer, warmup=warmup)
    return statistics.median(samples)


def set_stats(benchmark, samples: list[float], *, timer: str, warmup: int) -> None:
    """Make ``samples`` (seconds) this test's pytest-benchmark stats, one round each, as
    ``benchmark.pedantic`` would record its own: for benchmarks that time with their own
    clock (``time_op``'s device timer, ``bench_host``'s per-call wall time)."""
    if benchmark.disabled:
        return
    # pytest-benchmark (5.x) has no public call that takes measured times: fill the stats
    # that benchmark.pedantic would have filled, and mark the fixture as used.
    benchmark._mode = "conftest.set_stats(...)"
    stats = benchmark._make_stats(1)
    stats.options["timer"] = timer
    stats.options["warmup"] = warmup
    for seconds in samples:
        stats.update(seconds)


def try_median_time(name: str, fn: Callable[[], object], info: dict, **kwargs) -> float | None:
    """``median_time`` of a baseline, or ``None`` when it cannot run here: the error is noted
    in ``info["baseline_error"][name]`` (for ``record``) so that the op's own figures are
    kept and only the ratios to this baseline are left out."""
    try:
        return median_time(fn, **kwargs)
    except Exception as exc:  # any failure of a baseline: cuBLAS refusing a layout, OOM, ...
        message = f"{type(exc).__name__}: {exc}"[:300]
        info.setdefault("baseline_error", {})[name] = message
        warnings.warn(f"baseline {name} could not run: {message}", RuntimeWarning, stacklevel=2)
        return None


def note_missing_baseline(name: str, info: dict) -> None:
    """A baseline whose package is not installed: said in the results, not left out silently."""
    message = "not installed here (`make bench` installs it)"
    info.setdefault("baseline_error", {})[name] = message


_RECORDED: list[tuple[str, dict]] = []


def record(benchmark, seconds: float, **info) -> None:
    """Put the device and derived figures into the benchmark's extra_info (and the summary
    table printed at the end of the run). A test may add more figures to
    ``benchmark.extra_info`` afterwards (the table shows them too): recording the main ones
    first keeps them in the JSON if the deadline cuts the test short."""
    benchmark.extra_info["device"] = device_name()
    benchmark.extra_info["seconds"] = seconds
    benchmark.extra_info.update(info)
    _RECORDED.append((benchmark.name, benchmark.extra_info))


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

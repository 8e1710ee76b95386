"""End to end (DESIGN.md): a converted ViT run until silent, images/s next to its QANN's.

On a GPU: ViT-S (``quant_vit_small``, 224 px, 197 tokens) at batch 64, random weights
calibrated on random images (throughput only; ``python/demo.py`` checks accuracy on real
data), levels 16 and 32, in both modes:

- ``exact``: int8 weights (``weight_bits=8``), the exact SNN (SPEC.md §9): its logits must
  equal the exact QANN's bit for bit (``bitwise_equal``);
- ``float``: float weights, the float SNN (§2-§7).

The SNN runs ``snn(x, max_steps=64, chunk=8)``: chunks of 8 steps through the fused ops, one
host sync per chunk, stop when every image is silent. The baselines are the same QANN's float
forward in float32 and under bf16 autocast, on plain linears holding the weights (exact mode:
the int8 weights dequantized once, as a deployed QANN keeps them; the QuantLinear training
forward would re-derive them on every call and flatter the SNN's ratio);
``snn_over_qann_bf16`` is the headline ratio (SNN time over the bf16 QANN's; the goal is 1.5),
``speedup_vs_per_step_reference`` the fused runner against the same network one step at a time
on ``spikekernels.reference``. It also reports the time per step of the first chunk and of the
rest and of the run's last chunk (``seconds_per_step_last_chunk``, timed inside a whole run),
and prints the ten largest lines of a profile of the first chunk and of the run's last
(``profile_top5``, ``profile_top5_last_chunk``: a late chunk's rows have mostly settled, and
its kernels are what the quiet steps cost), so that the next bottleneck is in the record; on a
GPU ``device_busy_fraction_first_chunk`` is the first chunk's kernel time
over its wall time (well under 1: the GPU waits for the host, and launch overhead is the next
bottleneck, see ``bench_host.py``). On a GPU the run is timed again with
``cuda_graph=True`` (every full chunk one CUDA graph replay): ``cuda_graph_seconds``,
``cuda_graph_snn_over_qann_bf16`` and ``cuda_graph_bitwise_equal`` (the eager run's logits,
bit for bit: in exact mode the QANN's), counted by ``evaluate``'s SOP counter
(``counted_cuda_graph_seconds``, ``counting_overhead_cuda_graph``), and in exact mode at level
16 also with other chunk sizes and schedules (``GRAPH_CHUNKS``):
``cuda_graph_seconds_by_chunk``. These
and SpikingJelly's figures are added after the headline figures are recorded, so a deadline
that cuts a case short keeps those. Each chunk reads and
writes every layer's state once (``state_bytes``: 0.9 GB at ViT-S, batch 64, in exact mode;
several times that in float mode, whose membranes are float32 and whose attention keeps its
softmax's running scores and output) and the steps
past silence in the last chunk are computed for nothing, so longer first chunks and a short
tail may pay; these figures say which. On a CPU:
the tiny preset at batch 16.

SpikingJelly 2.0's own SpikeZIP-TF path is the field's baseline (``spikingjelly_spikezip.py``
says what its recipe needs and how it runs): ``SpikeZIPTFQANNRecipe(model_family="vit")``
converts the same QANN (same weights, same quantizer steps; exact mode's int8 linears as their
dequantized float weights, since SpikingJelly has no exact mode: the same network as the
fp32/bf16 QANN baselines, so it is recorded in both modes), and its SNN runs multi-step on
``[steps, B, C, H, W]`` with the image at t = 0, for the ``steps`` our SNN needed (it has no
early stop). ``speedup_vs_spikingjelly`` is its time over ours. It releases every conv/linear
bias over ``level`` steps, so after our ``steps`` it has usually not settled yet:
``spikingjelly_max_logit_difference`` (against the QANN's float forward) is that gap, and
``spikingjelly_settled_max_logit_difference``, on the first 8 images after ``steps + level``
steps, checks that it is the same network once settled: about 1e-8 on the tiny preset; at
ViT-S size a float-mode SNN (ours or SpikingJelly's) settles within float rounding's cascades
of the QANN's float forward, not on it (on 2 random images at level 16, CPU: ours 0.43,
SpikingJelly's 0.40, at a logit scale of 1.5). Without spikingjelly installed the test still
runs, and ``baseline_error["spikingjelly"]`` says why it is missing.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time

import pytest
import spikingjelly_spikezip as sjz
import torch
from conftest import (
    DEVICE,
    ON_GPU,
    median_time,
    record,
    time_op,
    try_median_time,
)
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import spikekernels
from spikekernels.evaluate.sops import SpikeCounter
from spikekernels.models import calibrate, quant_vit_small, quant_vit_tiny

MODEL, BATCH = (quant_vit_small, 64) if ON_GPU else (quant_vit_tiny, 16)
MAX_STEPS, CHUNK = 64, 8
# chunk sizes and schedules (first chunks, the last size repeating) timed under CUDA graphs:
# short chunks keep a step's spikes in L2 from the layer that writes them to the one that reads
# them (at ViT-S batch 64 one block-step writes about 100 MB of spikes and counts; the H200's
# L2 holds 50 MB), long ones spread each chunk's state read and write over more steps
GRAPH_CHUNKS = (2, 4, 16, 32, (16, 4), (24, 4))
SJ_CHECK_IMAGES = 8  # SpikingJelly's settled-logits check: on the first few images


def _profile_one_chunk(snn, x, chunks: int | None = None) -> tuple[str, float | None]:
    """The ten largest kernels (device time on a GPU, CPU time otherwise) of one chunk, and on
    a GPU the chunk's device busy time in seconds: the sum of its kernels' times (None on a
    CPU). Busy time well under the chunk's wall time means the GPU waits for the host. The
    first chunk of a run, or with ``chunks`` (the number a whole run takes) its last."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
    prof = profile(activities=activities)
    if chunks is None:
        with prof:
            snn(x, max_steps=CHUNK, chunk=CHUNK)
            _synchronize()
    else:
        _run_last_chunk_inside(snn, x, chunks, lambda: prof)
    # (torch >= 2.4 names a kernel's time self_device_time_total; self_cuda_* is gone)
    key = "self_device_time_total" if ON_GPU else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=10)
    which = "first" if chunks is None else f"last (number {chunks})"
    print(f"\nprofile of the {which} {CHUNK}-step chunk ({MODEL.__name__}, batch {BATCH}):")
    print(table)
    busy = None
    if ON_GPU:  # kernels only: record_function annotations on the GPU timeline would count twice
        kernels = [
            e
            for e in prof.events()
            if e.device_type == DeviceType.CUDA and not e.is_user_annotation
        ]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
        # the five largest kernels by name (an op's row has its kernel's device time as its
        # own: from key_averages each would be listed twice)
        by_name: dict[str, float] = {}
        for e in kernels:
            by_name[e.name] = by_name.get(e.name, 0.0) + e.self_device_time_total
        top = sorted(by_name.items(), key=lambda item: item[1], reverse=True)[:5]
    else:
        averages = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
        top = [(e.key, getattr(e, key)) for e in averages[:5]]
    return "; ".join(f"{name} {us / 1e3:.2f} ms" for name, us in top), busy


def _synchronize() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def _run_last_chunk_inside(snn, x, chunks: int, context) -> None:
    """A whole run, ``snn(x, MAX_STEPS, CHUNK)``, whose last chunk (number ``chunks``, as the
    warm-up counted them) runs inside ``context()``, the GPU idle on entry and on exit."""
    calls = []
    step_chunk = snn.step_chunk

    def last_inside(patches, n):
        calls.append(n)
        if len(calls) < chunks:
            return step_chunk(patches, n)
        _synchronize()
        with context():
            out = step_chunk(patches, n)
            _synchronize()
        return out

    snn.step_chunk = last_inside
    try:
        snn(x, max_steps=MAX_STEPS, chunk=CHUNK)
    finally:
        del snn.step_chunk
    assert len(calls) == chunks, f"the run took {len(calls)} chunks, not {chunks}"


def _last_chunk_seconds(snn, x, chunks: list[int], reps: int = 3) -> float:
    """Median wall seconds of a whole run's last chunk (``chunks``: each chunk's steps, as the
    warm-up ran them), timed inside the run: the chunk where most rows have settled."""
    samples = []

    @contextlib.contextmanager
    def timed():
        start = time.perf_counter()
        yield
        samples.append(time.perf_counter() - start)

    for _ in range(reps):
        _run_last_chunk_inside(snn, x, len(chunks), timed)
    return statistics.median(samples)


def _run_counting_steps(snn, x) -> tuple[tuple[torch.Tensor, int], list[int]]:
    """``snn(x, MAX_STEPS, CHUNK)``'s result and the steps of each chunk it ran: whole
    chunks, through the one holding the first silent step, which the runner sees only by
    running it (settled at 16 at chunks of 8, it ran 24 steps)."""
    ran = []
    step_chunk = snn.step_chunk
    snn.step_chunk = lambda patches, n: (ran.append(n), step_chunk(patches, n))[1]
    try:
        result = snn(x, max_steps=MAX_STEPS, chunk=CHUNK)
    finally:
        del snn.step_chunk
    return result, ran


def _cuda_graph(snn, x, eager_logits, qann_bf16: float, info: dict, sweep: bool) -> dict:
    """On a GPU, the whole run again with every full chunk a CUDA graph replay
    (``cuda_graph=True``; the capture is the warm-up call): its time, its ratio to the bf16
    QANN and whether its logits are the eager run's bit for bit; with ``sweep`` also at the
    other chunk sizes and schedules. Empty on a CPU; a failure is noted in
    ``info["baseline_error"]["cuda_graph"]`` and the eager figures are kept."""
    if not ON_GPU:
        return {}
    figures, by_chunk = {}, {}
    for chunk in (CHUNK, *GRAPH_CHUNKS) if sweep else (CHUNK,):
        run = lambda c=chunk: snn(x, max_steps=MAX_STEPS, chunk=c, cuda_graph=True)
        try:
            logits, _ = run()  # captures the graphs
            seconds = median_time(run, warmup=0, reps=3)
        except Exception as exc:  # a blind first capture must not cost the eager figures
            message = f"{type(exc).__name__}: {exc}"[:300]
            info.setdefault("baseline_error", {})[f"cuda_graph chunk={chunk}"] = message
            continue
        finally:
            snn.release_chunk_graphs()
        by_chunk[str(chunk)] = seconds
        if chunk == CHUNK:
            figures = dict(
                cuda_graph_seconds=seconds,
                cuda_graph_images_per_s=x.shape[0] / seconds,
                cuda_graph_snn_over_qann_bf16=seconds / qann_bf16,
                cuda_graph_bitwise_equal=bool(torch.equal(logits, eager_logits)),
            )
        elif not torch.equal(logits, eager_logits):
            info.setdefault("baseline_error", {})[f"cuda_graph chunk={chunk}"] = "not bitwise"
    print(f"\nCUDA graph seconds by chunk (batch {x.shape[0]}): {by_chunk}")
    if figures:
        figures.update(_counted_cuda_graph(snn, x, figures["cuda_graph_seconds"], info))
    return {**figures, "cuda_graph_seconds_by_chunk": by_chunk} if by_chunk else {}


def _counted_cuda_graph(snn, x, uncounted: float, info: dict) -> dict:
    """The graphed run again under ``evaluate``'s SOP counter (``evaluate --cuda-graph``):
    its time, its overhead over the uncounted graphs (its hooks split the fused attention),
    and its total SOPs. A failure is noted in ``info["baseline_error"]``."""
    counter = SpikeCounter(snn, MAX_STEPS)

    def run():
        with counter.counting():
            return snn(x, max_steps=MAX_STEPS, chunk=CHUNK, cuda_graph=True)

    try:
        run()  # captures the graphs with the counter's hooks
        seconds = median_time(run, warmup=0, reps=3)
        counter.spikes.zero_()
        run()
        sops = int((counter.spikes * torch.tensor(counter.fanouts, device=x.device)[:, None]).sum())
    except Exception as exc:
        info.setdefault("baseline_error", {})["counted cuda_graph"] = (
            f"{type(exc).__name__}: {exc}"[:300]
        )
        return {}
    finally:
        counter.close()
        snn.release_chunk_graphs()
    return dict(
        counted_cuda_graph_seconds=seconds,
        counting_overhead_cuda_graph=seconds / uncounted - 1.0,
        counted_cuda_graph_sops=sops,
    )


def _spikingjelly(qann, x, steps: int, level: int, reference_logits, ours: float, info: dict):
    """SpikingJelly's SpikeZIP-TF SNN of ``qann`` run for ``steps`` steps on ``x``: its time
    (against ``ours``, our SNN's seconds) and how far its logits are from ``reference_logits``
    (the QANN's float forward), as ``record`` fields. Empty when it cannot run here; the reason
    goes to ``info["baseline_error"]["spikingjelly"]``."""
    sj_snn = None
    reason = sjz.import_error()
    if reason is None:
        try:
            sj_snn = sjz.convert(qann, time_steps=steps)
        except Exception as exc:  # a recipe that refuses the model must not lose our figures
            reason = f"conversion failed: {type(exc).__name__}: {exc}"[:300]
    else:
        reason = f"spikingjelly does not import here: {reason}"
    if sj_snn is None:
        info.setdefault("baseline_error", {})["spikingjelly"] = reason
        return {}

    out: dict = {}

    def call():
        out["logits"] = sjz.run(sj_snn, x, steps)

    figures: dict = {}
    try:
        # one timed run after the warm-up: at ViT-S a run takes seconds (batch 64, 27-43
        # steps), so more reps would cost the suite its later cases, not buy precision
        seconds = try_median_time("spikingjelly", call, info, warmup=1, reps=1)
        if seconds is None:
            return figures
        logits = out.pop("logits")
        figures.update(
            spikingjelly_images_per_s=x.shape[0] / seconds,
            speedup_vs_spikingjelly=seconds / ours,
            spikingjelly_steps=steps,
            spikingjelly_max_logit_difference=(logits - reference_logits).abs().max().item(),
            spikingjelly_prediction_agreement=(
                (logits.argmax(1) == reference_logits.argmax(1)).float().mean().item()
            ),
        )
        del logits
        # Settled: on a few images, after its bias window (level steps) and our steps.
        n = min(SJ_CHECK_IMAGES, x.shape[0])
        try:
            settled = sjz.run(sj_snn, x[:n], steps + level)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"[:300]
            info.setdefault("baseline_error", {})["spikingjelly_settled_check"] = message
        else:
            figures["spikingjelly_settled_steps"] = steps + level
            figures["spikingjelly_settled_max_logit_difference"] = (
                (settled - reference_logits[:n]).abs().max().item()
            )
        return figures
    finally:  # its states are [steps, B, ...] tensors: give the memory back before our next run
        out.clear()
        sj_snn = None
        gc.collect()  # its modules may hold reference cycles: free them before the cache
        if ON_GPU:
            torch.cuda.empty_cache()


# exact mode's two levels first (the headline): a deadline that cuts the suite short
# (bench/device_check.sh) then costs float mode's figures, not exact mode's
@pytest.mark.parametrize(
    ("mode", "level"), [("exact", 16), ("exact", 32), ("float", 16), ("float", 32)]
)
def test_vit_end_to_end(benchmark, mode, level):
    torch.manual_seed(0)
    weight_bits = 8 if mode == "exact" else None
    qann = MODEL(level=level, weight_bits=weight_bits).to(DEVICE).eval()
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(0)
    shape = (BATCH, qann.in_chans, qann.img_size, qann.img_size)
    x = torch.randn(shape, device=DEVICE, generator=gen)
    calibrate(qann, x)  # with the int8 weights, dequantized, in exact mode
    snn = spikekernels.convert(qann)
    assert snn.exact == (mode == "exact")

    with torch.no_grad():
        run = lambda: snn(x, max_steps=MAX_STEPS, chunk=CHUNK)
        (logits, steps), chunks = _run_counting_steps(snn, x)  # the warm-up: compiles
        executed = sum(chunks)
        benchmark.group = f"vit end to end {mode} level={level}"
        seconds = time_op(benchmark, run, warmup=0, reps=3)
        first_chunk = median_time(lambda: snn(x, max_steps=CHUNK, chunk=CHUNK), warmup=0, reps=3)
        last_chunk = _last_chunk_seconds(snn, x, chunks)
        reference = median_time(
            lambda: snn(x, max_steps=MAX_STEPS, reference=True), warmup=0, reps=1
        )
        qann_logits = qann(x)  # exact mode: the exact integer forward
        # The QANN as deployed: plain linears with the (dequantized) weights, made once. Timing
        # qann's own float forward would re-derive every int8 weight per call (QuantLinear,
        # for training) and flatter the SNN's ratio in exact mode.
        twin = sjz.official_twin(qann)
        float_forward = lambda: twin.head(twin.forward_features(x))  # noqa: E731
        qann_float_logits = float_forward()  # the network SpikingJelly's SNN computes
        qann_fp32 = median_time(float_forward)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            qann_bf16 = median_time(float_forward)
        breakdown, device_busy = _profile_one_chunk(snn, x)
        last_breakdown, last_busy = _profile_one_chunk(snn, x, len(chunks))

    rest = (seconds - first_chunk) / (executed - CHUNK) if executed > CHUNK else None
    # what each chunk reads and writes once besides its steps' traffic
    state = [t for _, _, t in snn.state_tensors() if t is not None]
    state_bytes = sum(t.numel() * t.element_size() for t in state)
    record(
        benchmark,
        seconds,
        mode=mode,
        model=MODEL.__name__,
        batch=BATCH,
        level=level,
        steps=steps,
        steps_run=executed,
        settled=steps < MAX_STEPS,
        snn_images_per_s=BATCH / seconds,
        qann_fp32_images_per_s=BATCH / qann_fp32,
        qann_bf16_images_per_s=BATCH / qann_bf16,
        snn_over_qann_fp32=seconds / qann_fp32,
        snn_over_qann_bf16=seconds / qann_bf16,
        speedup_vs_per_step_reference=reference / seconds,
        seconds_per_step_first_chunk=first_chunk / min(CHUNK, MAX_STEPS),
        seconds_per_step_after=rest,
        seconds_per_step_last_chunk=last_chunk / chunks[-1],
        state_bytes=state_bytes,
        device_busy_fraction_first_chunk=None if device_busy is None else device_busy / first_chunk,
        prediction_agreement=(logits.argmax(1) == qann_logits.argmax(1)).float().mean().item(),
        max_logit_difference=(logits - qann_logits).abs().max().item(),
        bitwise_equal=bool(torch.equal(logits, qann_logits)),
        profile_top5=breakdown,
        profile_top5_last_chunk=last_breakdown,
        device_busy_seconds_last_chunk=last_busy,
    )
    # The baselines and the graph runs after the headline is recorded: a deadline that cuts
    # them short keeps the figures above. The chunk-size sweep runs at one level only.
    info = benchmark.extra_info  # baseline_error, when a baseline cannot run here
    with torch.no_grad():
        info.update(_spikingjelly(qann, x, steps, level, qann_float_logits, seconds, info))
        sweep = mode == "exact" and level == 16
        info.update(_cuda_graph(snn, x, logits, qann_bf16, info, sweep=sweep))
    if mode == "exact":
        assert torch.equal(logits, qann_logits), "exact mode must equal its QANN bit for bit"

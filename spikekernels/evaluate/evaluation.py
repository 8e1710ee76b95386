"""``evaluate(...)``: run a QANN and its SNN over a dataset; accuracy per step, SOPs, energy.

Per batch: the float network (the same weights with every quantizer off, where there is one),
the QANN, and the SNN until silent (``snn(x, max_steps, chunk, return_trace=True)``, spikes
counted on the device by ``sops.SpikeCounter``; with ``cuda_graph=True`` every full chunk is
a CUDA graph replay, the counter's work in it). The QANN's MACs come from one hooked forward
of one image (``sops.profile_qann``), so the timed QANN runs carry no hooks. Running metrics
stay on the device as integer counts; the progress bar reads three of them once per batch.
Under torchrun every rank runs its shard (``distributed``) and the counts are summed across
ranks at the end; rank 0 writes ``results.json`` and the plots into ``out`` (temp files
renamed into place, so an error leaves nothing half-written).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
import time

import torch
from torch import nn

import spikekernels
from spikekernels.evaluate import data as data_mod
from spikekernels.evaluate import distributed
from spikekernels.evaluate import model as model_mod
from spikekernels.evaluate.results import assemble, write_outputs
from spikekernels.evaluate.sops import ENERGY_TABLES, SpikeCounter, profile_qann

__all__ = ["evaluate"]

# Where ``cuda_graph=True`` can run (the tests widen it to replay a CPU stand-in's graphs).
_GRAPH_DEVICE_TYPES = ("cuda",)


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _prepare_out(out: str | os.PathLike) -> str:
    """Create ``out`` if needed and prove it writable now, before any work is done."""
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"--out {out} is not writable: {err.strerror or err}") from None
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantizers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "enabled") and hasattr(m, "s")]


class _FloatNetwork:
    """The float network of the evaluated QANN: its weights with every quantizer off.

    A float-weight QANN is switched in place for each float pass. When ``weight_bits`` is
    about to make the weights integer, a copy taken before (``copy_weights``) keeps the float
    ones (twice the model's memory). An integer-weight QANN loaded as such has none.
    """

    def __init__(self, qann: nn.Module, copy_weights: bool) -> None:
        self.module: nn.Module | None = None
        self.note: str | None = None
        if getattr(qann, "weight_bits", None) is not None:
            self.note = "none: the QANN was loaded with integer weights"
        elif not _quantizers(qann):
            self.note = "none: the model has no quantizer to turn off"
        else:
            self.module = copy.deepcopy(qann) if copy_weights else qann

    @classmethod
    def none(cls, note: str) -> _FloatNetwork:
        net = cls.__new__(cls)
        net.module, net.note = None, note
        return net

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        qs = _quantizers(self.module)
        before = [q.enabled for q in qs]
        for q in qs:
            q.enabled = False
        try:
            return self.module(x)
        finally:
            for q, enabled in zip(qs, before, strict=True):
                q.enabled = enabled


def _dataset(data, qann: nn.Module, *, crop_pct, mean, std, split="test"):
    if data == "digits":
        return data_mod.DigitsDataset(split)
    img_size, in_chans = getattr(qann, "img_size", None), getattr(qann, "in_chans", None)
    if not isinstance(img_size, int) or not isinstance(in_chans, int):
        raise ValueError("an image folder needs a model with int `img_size` and `in_chans`")
    return data_mod.ImageFolderDataset(
        data, img_size=img_size, in_chans=in_chans, crop_pct=crop_pct, mean=mean, std=std
    )


def _check_fits(dataset, qann: nn.Module, *, labels: bool = True) -> None:
    in_chans, img_size = getattr(qann, "in_chans", None), getattr(qann, "img_size", None)
    shape = tuple(dataset.image_shape)
    if in_chans is not None and shape != (in_chans, img_size, img_size):
        raise ValueError(
            f"{dataset.description} has images of shape {list(shape)}, the model expects "
            f"[{in_chans}, {img_size}, {img_size}]"
        )
    num_classes = getattr(qann, "num_classes", None)
    if labels and num_classes is not None and len(dataset.classes) > num_classes:
        raise ValueError(
            f"{dataset.description} has {len(dataset.classes)} classes, the model only "
            f"{num_classes} outputs"
        )


def _calibration_images(data, calib_data, qann, n: int, *, crop_pct, mean, std):
    """``n`` images (a seeded choice) of ``calib_data``, else of the digits training split,
    else of the evaluation folder itself."""
    source = data if calib_data is None else calib_data
    split = "train" if source == "digits" else "test"
    dataset = _dataset(source, qann, crop_pct=crop_pct, mean=mean, std=std, split=split)
    _check_fits(dataset, qann, labels=False)  # calibration reads no label
    images = [dataset[i][0] for i in data_mod.subset_indices(len(dataset), n, seed=1)]
    images = [x for x in images if x is not None]
    if not images:
        raise ValueError(f"no readable image to calibrate on in {dataset.description}")
    return torch.stack(images), f"{len(images)} images of {dataset.description}"


def evaluate(
    qann: nn.Module | str | os.PathLike | None = None,
    data: str | os.PathLike = "digits",
    *,
    checkpoint: str | os.PathLike | None = None,
    model: str | None = None,
    float_checkpoint: str | os.PathLike | None = None,
    level: int = 16,
    weight_bits: int | None = None,
    calibrate: int | None = None,
    calib_data: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    max_steps: int = 64,
    chunk: int = 8,
    batch_size: int = 64,
    limit: int | None = None,
    workers: int = 0,
    crop_pct: float = 0.875,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    energy_table: str = "fp32_45nm",
    float_top1: bool = True,
    parity: bool = False,
    parity_images: int = 8,
    measure_overhead: bool = False,
    cuda_graph: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate a QANN and its SNN on ``data``; returns the results dict (results.json).

    Model, one of: ``qann``, a QANN module (``QuantViT``; used in place: moved to the device,
    and changed by ``weight_bits`` / ``calibrate``) or a checkpoint path; ``checkpoint``,
    a ``save_checkpoint`` file or an official one (then ``model`` names the preset and
    ``level`` the quantization level); ``float_checkpoint``, a timm-style float ViT (with
    ``model`` and ``calibrate``). ``weight_bits=8`` makes the weights integer first (exact
    mode); ``calibrate=N`` sets the quantizer steps from N images of ``calib_data`` (default:
    the digits training split, or the evaluation folder).

    ``data``: ``"digits"`` or an ImageFolder-layout folder (``crop_pct``, ``mean``, ``std``
    for its transform); ``limit`` evaluates a seeded choice of that many images. ``out``: a
    directory for results.json and the plots (None: write nothing). Under torchrun each rank
    evaluates ``rank::world`` of the images and rank 0 writes the merged results.

    The SNN runs each batch until silent or ``max_steps``, ``chunk`` steps per kernel call.
    ``energy_table``: ``fp32_45nm`` or ``int8_45nm`` for the per-layer plot (results.json
    holds both tables' totals). ``parity``: also run ``spikekernels.parity(qann, snn, images)``
    on the first ``parity_images`` images. ``measure_overhead``: time one batch with and
    without the spike counter and report it in ``run.counting_overhead``.

    ``cuda_graph=True`` (on a GPU; exact or float mode) runs the SNN with ``cuda_graph=True``:
    each full chunk one CUDA graph replay, no host work per op, the same bits and the same
    counts (the counter's hooks are ``replayable``). Each batch shape is captured once, the
    first batch's before the timed runs (a smaller last batch's within them).
    """
    max_steps = _check_int("max_steps", max_steps)
    chunk = _check_int("chunk", chunk)
    batch_size = _check_int("batch_size", batch_size)
    workers = _check_int("workers", workers, 0)
    parity_images = _check_int("parity_images", parity_images)
    if limit is not None:
        limit = _check_int("limit", limit)
    if calibrate is not None:
        calibrate = _check_int("calibrate", calibrate, 0)
    for name, flag in (("float_top1", float_top1), ("parity", parity),
                       ("measure_overhead", measure_overhead), ("progress", progress),
                       ("cuda_graph", cuda_graph)):  # fmt: skip
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if weight_bits is not None and (type(weight_bits) is not int or weight_bits != 8):
        raise ValueError(f"weight_bits must be None (float weights) or 8, got {weight_bits!r}")
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"data must be 'digits' or a folder path, got {type(data).__name__}")
    if not isinstance(energy_table, str) or energy_table not in ENERGY_TABLES:
        raise ValueError(
            f"energy_table must be one of {sorted(ENERGY_TABLES)}, got {energy_table!r}"
        )
    if parity and not callable(getattr(spikekernels, "parity", None)):
        raise ValueError(
            "--parity needs spikekernels.parity (the exact-mode diagnostics), which this "
            "installation lacks"
        )
    if isinstance(qann, (str, os.PathLike)):
        if checkpoint is not None:
            raise ValueError("give the checkpoint once (as qann or as checkpoint=)")
        qann, checkpoint = None, qann
    if qann is not None and (checkpoint is not None or float_checkpoint is not None):
        raise ValueError("give a QANN module or a checkpoint, not both")
    if qann is None and checkpoint is None and float_checkpoint is None:
        raise ValueError("nothing to evaluate: give a QANN, --checkpoint or --float-checkpoint")
    if qann is not None and not isinstance(qann, nn.Module):
        raise TypeError(f"qann must be an nn.Module or a path, got {type(qann).__name__}")
    if data != "digits":
        data = os.fspath(data)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    folders = data != "digits" or (calib_data is not None and calib_data != "digits")
    if not folders and (mean is not None or std is not None):
        raise ValueError(
            "mean and std normalise an image folder; the digits are normalised by their own "
            "training statistics (give them with an image folder only)"
        )
    image_opts = dict(crop_pct=crop_pct, mean=mean, std=std)

    ctx = distributed.setup(device)
    spike_counter = None
    try:
        if cuda_graph and ctx.device.type not in _GRAPH_DEVICE_TYPES:
            raise ValueError(f"cuda_graph=True needs a CUDA device, got device {ctx.device}")
        # --- the model, the data, --out: every cheap check before any real work ----------
        if qann is not None:
            model_info = {"source": "module", "config": dict(getattr(qann, "config", {}))}
        else:
            qann, model_info = model_mod.load_qann(
                checkpoint=checkpoint, model=model, float_checkpoint=float_checkpoint, level=level
            )
        dataset = _dataset(data, qann, **image_opts)
        _check_fits(dataset, qann)
        # every rank checks --out (unique probe names), so a bad one stops them all now, not
        # after the whole evaluation; only rank 0 writes there
        outdir = _prepare_out(out) if out is not None else None
        outdir = outdir if ctx.is_main else None

        if float_top1:
            float_net = _FloatNetwork(qann, copy_weights=weight_bits is not None)
        else:
            float_net = _FloatNetwork.none("not asked for")
        calib_images = None
        if calibrate:
            calib_images, model_info["calibration"] = _calibration_images(
                data, calib_data, qann, calibrate, **image_opts
            )
        model_mod.prepare_qann(
            qann,
            weight_bits=weight_bits,
            calib_images=calib_images,
            needs_calibration=float_checkpoint is not None,
        )
        if calib_images is not None:
            ctx.broadcast_module(qann)  # every rank evaluates rank 0's calibration, bit for bit
        model_info["config"] = dict(getattr(qann, "config", model_info.get("config", {})))
        qann = qann.to(ctx.device).eval()
        if float_net.module is not None:
            float_net.module.to(ctx.device).eval()
        snn = spikekernels.convert(qann)
        model_info["mode"] = "exact" if getattr(snn, "exact", False) else "float"

        # --- this rank's shard ---------------------------------------------------------
        indices = data_mod.subset_indices(len(dataset), limit)
        mine = [indices[i] for i in distributed.shard(len(indices), ctx.rank, ctx.world)]
        loader = data_mod.batches(dataset, mine, batch_size, workers)

        # --- the run -----------------------------------------------------------------
        spike_counter = SpikeCounter(snn, max_steps)
        st = _run(
            ctx, qann, float_net, snn, loader, spike_counter,
            max_steps=max_steps, chunk=chunk, cuda_graph=cuda_graph,
            progress=progress and ctx.is_main, measure_overhead=measure_overhead,
        )  # fmt: skip

        # --- merge, report -----------------------------------------------------------
        data_info = {
            "source": str(data),
            "description": dataset.description,
            "classes": len(dataset.classes),
        }
        results = assemble(
            ctx, st, spike_counter, max_steps=max_steps, chunk=chunk,
            energy_table=energy_table, model_info=model_info, data_info=data_info,
        )  # fmt: skip
        if parity and ctx.is_main:
            results["parity"] = _parity(qann, snn, dataset, indices[:parity_images], ctx.device)
        if outdir is not None:
            results["outputs"] = write_outputs(results, outdir)
        ctx.barrier()
        return results
    finally:
        if spike_counter is not None:
            spike_counter.close()
        ctx.close()


class _RunState:
    """One rank's running counts (device tensors), timings and per-image QANN costs."""

    def __init__(self, max_steps: int, device: torch.device) -> None:
        zeros = dict(dtype=torch.int64, device=device)
        self.images = torch.zeros((), **zeros)
        self.float_correct = torch.zeros((), **zeros)
        self.qann_correct = torch.zeros((), **zeros)
        self.snn_correct = torch.zeros((), **zeros)
        self.agree = torch.zeros((), **zeros)
        self.snn_correct_per_step = torch.zeros(max_steps, **zeros)
        self.settle_hist = torch.zeros(max_steps + 1, **zeros)
        self.skipped: list[str] = []
        self.seconds = {"float": 0.0, "qann": 0.0, "snn": 0.0}
        self.float_note: str | None = None
        self.counting_overhead: dict | None = None
        self.qann_macs: dict[str, int] = {}  # per image and layer (profile_qann)
        self.qann_dense: dict[str, int] = {}


def _timed(st: _RunState, phase: str, device: torch.device, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, its seconds (device-synchronised) added to ``phase``."""
    _sync(device)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    _sync(device)
    st.seconds[phase] += time.perf_counter() - start
    return out


def _counted_snn(snn, counter: SpikeCounter, x: torch.Tensor, max_steps: int, chunk: int,
                 cuda_graph: bool):  # fmt: skip
    with counter.counting():
        return snn(x, max_steps=max_steps, chunk=chunk, return_trace=True, cuda_graph=cuda_graph)


@torch.no_grad()
def _run(
    ctx, qann, float_net, snn, loader, spike_counter, *, max_steps, chunk, cuda_graph, progress,
    measure_overhead,
) -> _RunState:  # fmt: skip
    from tqdm import tqdm

    device = ctx.device
    st = _RunState(max_steps, device)
    st.float_note = float_net.note
    st.qann_macs, st.qann_dense = profile_qann(
        qann, torch.zeros(1, *snn.image_shape, device=device)
    )
    bar = tqdm(loader, desc="evaluate", unit="batch", disable=not progress, dynamic_ncols=True)
    first = None
    for x, y, skipped in bar:
        st.skipped.extend(skipped)
        if x is None:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if first is None:  # warm-up (kernel compilation, allocator) outside the timed regions
            first = x
            if float_net.module is not None:
                float_net(x[:1])
            qann(x[:1])
            # a graph is captured for a batch shape (with the counter's hooks, whose work
            # counts at every replay inside counting())
            warm = x if cuda_graph else x[:1]
            snn(warm, max_steps=min(chunk, max_steps), chunk=chunk, cuda_graph=cuda_graph)
        st.images += len(y)

        if float_net.module is not None:
            float_pred = _timed(st, "float", device, float_net, x).argmax(-1)
            st.float_correct += (float_pred == y).sum()
        qann_pred = _timed(st, "qann", device, qann, x).argmax(-1)
        st.qann_correct += (qann_pred == y).sum()
        logits, _, trace = _timed(
            st, "snn", device, _counted_snn, snn, spike_counter, x, max_steps, chunk, cuda_graph
        )
        snn_pred = logits.argmax(-1)
        snn_hit = (snn_pred == y).sum()
        st.snn_correct += snn_hit
        st.agree += (snn_pred == qann_pred).sum()
        per_step = (trace.logits.argmax(-1) == y).sum(dim=1)  # [steps of this batch]
        st.snn_correct_per_step[: len(per_step)] += per_step
        st.snn_correct_per_step[len(per_step) :] += snn_hit  # settled: the final answer
        settle = trace.sample_steps.to(device)
        st.settle_hist.index_add_(0, settle, torch.ones_like(settle))
        if progress:
            seen = max(1, int(st.images))
            bar.set_postfix(
                qann=f"{100 * int(st.qann_correct) / seen:.1f}%",
                snn=f"{100 * int(st.snn_correct) / seen:.1f}%",
                agree=f"{100 * int(st.agree) / seen:.1f}%",
            )
    bar.close()
    if float_net.module is None:
        st.seconds.pop("float")
    if measure_overhead and first is not None:
        spike_counter.close()  # the run's hooks off while timing the baseline
        st.counting_overhead = _counting_overhead(snn, first, max_steps, chunk, device, cuda_graph)
    return st


def _counting_overhead(snn, x, max_steps, chunk, device, cuda_graph, repeats: int = 7) -> dict:
    """SNN seconds for one batch with and without a ``SpikeCounter`` attached (best of
    ``repeats`` each: first without, then with one counter, so that with ``cuda_graph`` each
    captures its graph once, in its first repeat); ``fraction`` = with / without - 1."""
    times = {"with": math.inf, "without": math.inf}
    for mode in ("without", "with"):
        counter = SpikeCounter(snn, max_steps) if mode == "with" else None
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            with counter.counting() if counter else contextlib.nullcontext():
                snn(x, max_steps=max_steps, chunk=chunk, return_trace=True, cuda_graph=cuda_graph)
            _sync(device)
            times[mode] = min(times[mode], time.perf_counter() - start)
        if counter:
            counter.close()
    return {
        "batch": len(x),
        "seconds_with": times["with"],
        "seconds_without": times["without"],
        "fraction": times["with"] / times["without"] - 1.0,
        "repeats": repeats,
    }


def _parity(qann, snn, dataset, indices, device) -> dict:
    images = [dataset[i][0] for i in indices]
    images = [x for x in images if x is not None]
    if not images:
        return {"images": 0, "table": None}
    report = spikekernels.parity(qann, snn, torch.stack(images).to(device))
    return {"images": len(images), "table": str(report), "data": _jsonable(report)}


def _jsonable(obj, depth: int = 0):
    """A JSON-friendly copy of what ``parity`` returns (dataclasses, dicts, lists, tensors)."""
    import dataclasses

    if depth > 6:
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() <= 4096 else f"tensor{list(obj.shape)}"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj)}
    if hasattr(obj, "_asdict"):
        return _jsonable(obj._asdict(), depth + 1)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in obj]
    return str(obj)

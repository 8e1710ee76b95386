"""SpikeZIP-TF end to end on scikit-learn's digits: float ViT -> QANN (QAT) -> SNN.

    python python/demo.py                                   # what `make demo` runs
    python python/demo.py --model quant_vit_small --synthetic   # paper size, throughput only

1. Train a tiny ReLU ViT on the 8x8 digits (1797 images, bundled with scikit-learn) with every
   quantizer off (the float network).
2. Calibrate the quantizers on a training batch and fine-tune with them on (QAT, LSQ steps):
   the QANN with float weights (W32). Then give every linear per-channel int8 weights
   (``quantize_weights``) and fine-tune a few more epochs: the W8 QANN of exact mode.
   ``--float-weights`` stops at W32 (float mode).
3. Convert the QANN to an SNN (``spikekernels.convert``), feed each image at t = 0 and run
   until the network is silent. Exact mode: the SNN's logits then equal the W8 QANN's bit for
   bit; float mode: equal up to float rounding.

Prints QANN and SNN accuracy, how often they predict the same class, the steps to silence and
the time per image of the fused SNN, the per-step reference SNN and the QANN; saves accuracy
against time step to python/out/. Uses the GPU when there is one. Seeds are fixed.
The pieces (``load_digits_tensors``, ``train``, ``qat``, ``evaluate``, ``run_snn``) are
importable; tests/test_demo.py runs them on a few images.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import spikekernels
from spikekernels import models
from spikekernels.models import QuantViT, calibrate, quantize_weights, quantizers

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
SEED = 0
# The tiny preset with 4x4 patches (5 tokens) and width 64 for the digits: on the 360 test
# images it reached 98.9% float / 98.6% QANN at level 16, against 97.2% / 96.1% for the
# preset's 2x2 patches (17 tokens), whose attention suffers more from 16 levels.
DIGITS_OVERRIDES = {"quant_vit_tiny": {"patch_size": 4, "embed_dim": 64}}
PRESETS = ("quant_vit_tiny", "quant_vit_small", "quant_vit_base", "quant_vit_large")
DIGITS_PRESET = "quant_vit_tiny"  # the one preset built for 8x8 single-channel images


def shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies under it, else as given."""
    rel = os.path.relpath(os.path.abspath(path))
    return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_digits_tensors(test_fraction: float = 0.2, seed: int = SEED):
    """Digits as ``[N, 1, 8, 8]`` float32 (standardised) and int64 labels, split stratified.

    Returns ``(x_train, y_train, x_test, y_test)``: 1437 training and 360 test images, the
    split that ``python -m spikekernels.evaluate --data digits`` evaluates.
    """
    from spikekernels.evaluate.data import digits_split

    return digits_split(test_fraction, seed)


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Augmentation: shift the batch by up to one pixel, padding with the background value."""
    padded = F.pad(x, (1, 1, 1, 1), value=float(x.min()))
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


def _fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    desc: str,
    seed: int,
    show_progress: bool,
) -> list[float]:
    """AdamW with a cosine schedule; no weight decay on biases, norms, tokens and steps."""
    device = next(model.parameters()).device
    named = list(model.named_parameters())
    no_decay_names = {n for n, p in named if p.ndim < 2 or n in ("cls_token", "pos_embed")}
    decay = [p for n, p in named if n not in no_decay_names]
    no_decay = [p for n, p in named if n in no_decay_names]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    steps_per_epoch = math.ceil(len(y) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch), pct_start=0.1
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    bar = tqdm(range(epochs), desc=desc, disable=not show_progress, leave=False)
    for _ in bar:
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            xb = _shift(x[idx], gen).to(device)
            loss = F.cross_entropy(model(xb), y[idx].to(device), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        losses.append(total / len(y))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def train(
    model: QuantViT,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 120,
    lr: float = 4e-3,
    batch_size: int = 32,
    seed: int = SEED,
    show_progress: bool = True,
) -> list[float]:
    """Phase 1: the float ReLU ViT (all quantizers off). Returns the loss per epoch."""
    torch.manual_seed(seed)
    model.quantize(False)
    return _fit(
        model, x, y, epochs=epochs, lr=lr, batch_size=batch_size, desc="train (float)",
        seed=seed, show_progress=show_progress,
    )  # fmt: skip


def qat(
    model: QuantViT,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 30,
    lr: float = 5e-4,
    batch_size: int = 32,
    calib_size: int = 512,
    calibrate_steps: bool = True,
    seed: int = SEED,
    show_progress: bool = True,
) -> list[float]:
    """Phase 2: calibrate every step on ``calib_size`` training images (unless
    ``calibrate_steps`` is False: fine-tuning a QANN further), then fine-tune the QANN
    (weights and LSQ steps). Returns the loss per epoch (none when ``epochs == 0``)."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    if calibrate_steps:
        calibrate(model, x[:calib_size].to(device))
    return _fit(
        model, x, y, epochs=epochs, lr=lr, batch_size=batch_size, desc=f"QAT (level {model.level})",
        seed=seed + 1, show_progress=show_progress,
    )  # fmt: skip


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512):
    """``(accuracy, predictions [N] on CPU, seconds per image)`` of a plain forward model."""
    device = next(model.parameters()).device
    model.eval()
    model(x[:1].to(device))  # warm-up (allocator, kernels)
    _sync(device)
    start = time.perf_counter()
    preds = [
        model(x[i : i + batch_size].to(device)).argmax(-1) for i in range(0, len(x), batch_size)
    ]
    _sync(device)
    seconds = (time.perf_counter() - start) / len(x)
    pred = torch.cat(preds).cpu()
    return (pred == y).float().mean().item(), pred, seconds


@dataclass
class SNNResult:
    accuracy: float
    predictions: torch.Tensor  # [N] on CPU
    steps: int  # steps until the slowest sample of a batch fell silent (or max_steps)
    seconds_per_image: float
    curve_steps: list[int] = field(default_factory=list)
    curve_accuracy: list[float] = field(default_factory=list)
    sample_steps: torch.Tensor | None = None  # [N]: the step each image fell silent
    reference_seconds_per_image: float | None = None
    reference_agreement: float | None = None  # fused vs reference predictions
    exact: bool = False  # the SNN runs in exact mode (integer weights)
    bitwise_equal: int | None = None  # exact mode: images whose logits equal the QANN's bits
    graph_seconds_per_image: float | None = None  # on a GPU: with CUDA graphs
    graph_equal: int | None = None  # images whose graph-run logits equal the eager run's bits


@torch.no_grad()
def run_snn(
    qann: QuantViT,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_steps: int = 64,
    chunk: int = 8,
    batch_size: int = 128,
    curve: bool = True,
    reference: bool = True,
    show_progress: bool = True,
    cuda_graph: bool | None = None,
) -> SNNResult:
    """Phase 3: convert, run each batch until silent (``snn(x, max_steps, chunk)``), time it,
    then (``cuda_graph``; None: on a GPU) time it again as CUDA graph replays
    (``cuda_graph=True``, captured per batch shape before the timing) and compare the logits
    bit for bit, (``curve``) rerun with the trace for the accuracy-vs-step curve and
    (``reference``) time the per-step reference SNN (``reference=True``: one step at a time, a
    sync per step)."""
    device = next(qann.parameters()).device
    snn = spikekernels.convert(qann)
    batches = [(x[i : i + batch_size].to(device), i) for i in range(0, len(x), batch_size)]
    snn(batches[0][0][:2], max_steps=min(max_steps, chunk), chunk=chunk)  # warm-up (compile)

    def timed(**kwargs):
        outputs = []
        _sync(device)
        start = time.perf_counter()
        for xb, _ in tqdm(batches, desc=kwargs.pop("desc"), disable=not show_progress, leave=False):
            outputs.append(snn(xb, max_steps=max_steps, chunk=chunk, **kwargs))
        _sync(device)
        return outputs, (time.perf_counter() - start) / len(x)

    outputs, seconds = timed(desc="SNN (fused)")
    pred = torch.cat([logits.argmax(-1).cpu() for logits, _ in outputs])
    steps = max(s for _, s in outputs)
    result = SNNResult((pred == y).float().mean().item(), pred, steps, seconds, exact=snn.exact)
    if snn.exact:
        qann.eval()
        result.bitwise_equal = sum(
            int((logits == qann(xb)).all(dim=-1).sum())
            for (logits, _), (xb, _) in zip(outputs, batches, strict=True)
        )

    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    if cuda_graph:
        for size in {len(xb) for xb, _ in batches}:  # the capture of each batch shape
            xb = next(xb for xb, _ in batches if len(xb) == size)
            snn(xb, max_steps=min(max_steps, chunk), chunk=chunk, cuda_graph=True)
        replayed, result.graph_seconds_per_image = timed(desc="SNN (CUDA graphs)", cuda_graph=True)
        result.graph_equal = sum(
            int((got == want).all(dim=-1).sum()) if s == t else 0
            for (got, s), (want, t) in zip(replayed, outputs, strict=True)
        )

    if curve:
        traces, _ = timed(desc="SNN (trace)", return_trace=True)
        result.sample_steps = torch.cat([trace.sample_steps.cpu() for *_, trace in traces])
        for t in range(1, steps + 1):
            # A batch that settled before step t keeps its last sums.
            last = [trace.logits[min(t, len(trace.logits)) - 1] for *_, trace in traces]
            pred_t = torch.cat([logits.argmax(-1).cpu() for logits in last])
            result.curve_steps.append(t)
            result.curve_accuracy.append((pred_t == y).float().mean().item())

    if reference:
        ref_outputs, result.reference_seconds_per_image = timed(
            desc="SNN (per-step reference)", reference=True
        )
        ref_pred = torch.cat([logits.argmax(-1).cpu() for logits, _ in ref_outputs])
        result.reference_agreement = (ref_pred == pred).float().mean().item()
    return result


def plot_accuracy(result: SNNResult, qann_accuracy: float, path: str) -> str:
    """Save SNN accuracy against time step, with the QANN's as a line, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(result.curve_steps, [100 * a for a in result.curve_accuracy], "o-", label="SNN")
    ax.axhline(100 * qann_accuracy, color="grey", linestyle="--", label="QANN")
    ax.set_xlabel("time step")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("SpikeZIP-TF on digits: SNN accuracy vs time")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _report_snn(
    result: SNNResult,
    qann_pred: torch.Tensor,
    qann_seconds: float,
    max_steps: int,
    labels: bool = True,
) -> None:
    agree = (result.predictions == qann_pred).float().mean().item()
    if labels:
        print(f"SNN accuracy           {100 * result.accuracy:6.2f} %")
    print(f"SNN/QANN agreement     {100 * agree:6.2f} % of predictions")
    if result.bitwise_equal is not None:
        n = len(result.predictions)
        print(f"SNN logits == QANN's   {result.bitwise_equal} of {n} images, bit for bit")
    if result.sample_steps is not None:
        mean_steps = result.sample_steps.float().mean().item()
        print(f"steps to silence       {result.steps} (slowest image), {mean_steps:.1f} on average")
    else:
        print(f"steps to silence       {result.steps}")
    if result.steps >= max_steps:
        print(
            f"  (not silent within {max_steps} steps: the SNN has not settled; raise --max-steps)"
        )
    print(f"time per image: fused SNN     {1e3 * result.seconds_per_image:8.3f} ms")
    if result.graph_seconds_per_image is not None:
        print(
            f"time per image: CUDA graphs   {1e3 * result.graph_seconds_per_image:8.3f} ms"
            f"  (logits equal to the eager run's on {result.graph_equal} of "
            f"{len(result.predictions)} images, bit for bit)"
        )
    if result.reference_seconds_per_image is not None:
        print(
            f"time per image: reference SNN {1e3 * result.reference_seconds_per_image:8.3f} ms"
            f"  (agrees with fused on {100 * result.reference_agreement:.2f} % of predictions)"
        )
    print(f"time per image: QANN          {1e3 * qann_seconds:8.3f} ms")


def digits_demo(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    if device.type == "cpu":
        # The tiny model is overhead-bound: one thread trains fastest and spares shared cores.
        torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_digits_tensors()
    torch.manual_seed(SEED)
    overrides = DIGITS_OVERRIDES.get(args.model, {})
    model = getattr(models, args.model)(level=args.level, **overrides).to(device)
    print(f"digits: {len(y_train)} train / {len(y_test)} test images, device {device}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model}, level {args.level}, {n_params} params")

    start = time.perf_counter()
    train(model, x_train, y_train, epochs=args.epochs)
    float_acc, _, _ = evaluate(model, x_test, y_test)
    qat(model, x_train, y_train, epochs=args.qat_epochs)
    w32_acc, _, _ = evaluate(model, x_test, y_test)
    if not args.float_weights:
        quantize_weights(model)
        qat(model, x_train, y_train, epochs=args.w8_epochs, calibrate_steps=False)
    print(f"training (float + QAT) {time.perf_counter() - start:6.1f} s")
    qann_acc, qann_pred, qann_seconds = evaluate(model, x_test, y_test)
    print(f"float ViT accuracy     {100 * float_acc:6.2f} %")
    print(f"QANN accuracy (W32)    {100 * w32_acc:6.2f} %  (level {args.level}, float weights)")
    if not args.float_weights:
        print(f"QANN accuracy (W8)     {100 * qann_acc:6.2f} %  (int8 weights: exact mode)")

    n = len(y_test) if args.snn_images is None else args.snn_images
    if n < len(y_test):
        qann_acc, qann_pred, _ = evaluate(model, x_test[:n], y_test[:n])
        print(f"SNN on the first {n} test images (QANN accuracy there {100 * qann_acc:.2f} %)")
    result = run_snn(
        model, x_test[:n], y_test[:n], max_steps=args.max_steps, chunk=args.chunk,
        reference=args.reference,
    )  # fmt: skip
    _report_snn(result, qann_pred, qann_seconds, args.max_steps)
    path = plot_accuracy(result, qann_acc, os.path.join(OUT_DIR, "digits_accuracy_vs_step.png"))
    print(f"saved {shown_path(path)}")
    if args.save_checkpoint:
        print(f"saved {models.save_checkpoint(model, args.save_checkpoint)} (the QANN)")


def synthetic_demo(args: argparse.Namespace) -> None:
    """Paper-size model on random (calibrated) weights and images: throughput only."""
    device = pick_device(args.device)
    torch.manual_seed(SEED)
    weight_bits = None if args.float_weights else 8
    model = getattr(models, args.model)(level=args.level, weight_bits=weight_bits).to(device)
    shape = (args.batch, model.in_chans, model.img_size, model.img_size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
    calibrate(model, x.to(device))
    mode = "float mode" if args.float_weights else "exact mode (int8 weights)"
    print(
        f"{args.model} (random weights), level {args.level}, {mode}, batch {args.batch}, "
        f"device {device}"
    )
    unlabeled = torch.zeros(args.batch, dtype=torch.int64)
    _, qann_pred, qann_seconds = evaluate(model, x, unlabeled, batch_size=args.batch)
    print(f"quantizers (-> neurons) {len(list(quantizers(model)))}")
    # No labels: the QANN's predictions stand in, so "accuracy" is the agreement.
    result = run_snn(
        model, x, qann_pred, max_steps=args.max_steps, chunk=args.chunk,
        batch_size=args.batch, curve=False, reference=args.reference,
    )  # fmt: skip
    _report_snn(result, qann_pred, qann_seconds, args.max_steps, labels=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=DIGITS_PRESET, choices=PRESETS,
        help=f"the spikekernels.models preset: {DIGITS_PRESET} on the digits; any with --synthetic",
    )  # fmt: skip
    parser.add_argument("--synthetic", action="store_true", help="random weights, timing only")
    parser.add_argument("--level", type=int, default=16, help="quantization levels (8, 16, 32)")
    parser.add_argument("--epochs", type=int, default=120, help="float training epochs")
    parser.add_argument("--qat-epochs", type=int, default=30, help="QAT epochs (float weights)")
    parser.add_argument("--w8-epochs", type=int, default=10, help="QAT epochs with int8 weights")
    parser.add_argument(
        "--float-weights", action="store_true", help="keep float weights: the float-mode SNN"
    )
    parser.add_argument("--max-steps", type=int, default=64, help="SNN time steps at most")
    parser.add_argument("--chunk", type=int, default=8, help="SNN time steps per kernel call")
    parser.add_argument("--batch", type=int, default=None, help="synthetic batch size")
    parser.add_argument("--snn-images", type=int, default=None, help="test images for the SNN")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--save-checkpoint", metavar="PATH", help="save the QANN (for spikekernels.evaluate)"
    )
    parser.add_argument(
        "--no-reference", dest="reference", action="store_false", help="skip the per-step SNN"
    )
    args = parser.parse_args(argv)
    if args.model != DIGITS_PRESET and not args.synthetic:
        parser.error(
            f"--model {args.model} needs --synthetic: the digits (8x8, one channel) fit only "
            f"{DIGITS_PRESET}"
        )
    torch.manual_seed(SEED)
    if args.synthetic:
        if args.batch is None:
            args.batch = 64 if pick_device(args.device).type == "cuda" else 4
        synthetic_demo(args)
    else:
        digits_demo(args)


if __name__ == "__main__":
    main()

"""``python -m spikekernels.evaluate``: the command line of ``spikekernels.evaluate``.

    python -m spikekernels.evaluate --checkpoint digits.pth --data digits --out eval/
    python -m spikekernels.evaluate --checkpoint qann_vit_small.pth --model quant_vit_small \\
        --level 16 --data /data/imagenet/val --out eval/
    python -m spikekernels.evaluate --float-checkpoint vit_small_relu.pth \\
        --model quant_vit_small --calibrate 256 --weight-bits 8 --data /data/val --out eval/
    torchrun --nproc_per_node 4 -m spikekernels.evaluate ...   # one rank per GPU

Prints a summary; writes results.json and the plots into --out. Bad input (files, keys,
shapes, folders, --out) exits with status 2 and one line saying what is wrong.
"""

from __future__ import annotations

import argparse
import os
import sys

from spikekernels.evaluate.evaluation import evaluate
from spikekernels.evaluate.model import PRESETS
from spikekernels.evaluate.sops import ENERGY_TABLES


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spikekernels.evaluate",
        description="Evaluate a QANN and its SNN: accuracy per step, SOPs, energy, parity.",
    )
    src = p.add_argument_group("model (one of --checkpoint, --float-checkpoint)")
    src.add_argument("--checkpoint", help="save_checkpoint file, or official QANN (+ --model)")
    src.add_argument("--float-checkpoint", help="timm-style float ViT state_dict (+ --model)")
    src.add_argument("--model", choices=PRESETS, help="architecture of a weights-only file")
    src.add_argument("--level", type=int, default=16, help="quantization level (official files)")
    src.add_argument("--weight-bits", type=int, help="integer weights first (8: exact mode)")
    src.add_argument("--calibrate", type=int, help="calibrate the quantizers on N images")
    src.add_argument("--calib-data", help="folder for --calibrate (default: see docs)")
    d = p.add_argument_group("data")
    d.add_argument("--data", default="digits", help="'digits' or an ImageFolder-layout folder")
    d.add_argument("--limit", type=int, help="evaluate a seeded choice of N images")
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    d.add_argument("--crop-pct", type=float, default=0.875, help="resize to img_size/crop_pct")
    d.add_argument("--mean", type=_floats, help="normalisation, e.g. 0.485,0.456,0.406")
    d.add_argument("--std", type=_floats, help="normalisation, e.g. 0.229,0.224,0.225")
    r = p.add_argument_group("run")
    r.add_argument("--max-steps", type=int, default=64, help="SNN time steps at most")
    r.add_argument("--chunk", type=int, default=8, help="SNN time steps per kernel call")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda (torchrun: cuda:LOCAL_RANK)")
    r.add_argument("--energy-table", choices=sorted(ENERGY_TABLES), default="fp32_45nm")
    r.add_argument("--no-float", dest="float_top1", action="store_false", help="skip float top-1")
    r.add_argument("--parity", action="store_true", help="spikekernels.parity on a few images")
    r.add_argument("--parity-images", type=int, default=8)
    r.add_argument(
        "--measure-overhead", action="store_true", help="time the SOP counter on one batch"
    )
    r.add_argument(
        "--cuda-graph",
        action="store_true",
        help="on a GPU: the SNN's full chunks as CUDA graph replays, counted",
    )
    r.add_argument("--out", help="directory for results.json and the plots")
    r.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    return p


def summary(results: dict) -> str:
    pct = lambda v: "n/a" if v is None else f"{100 * v:6.2f} %"  # noqa: E731
    table = results["energy_table"]
    e = results["energy"][table]
    steps = results["steps_to_silence"]
    lines = [
        f"images                 {results['images']}"
        + (
            f" ({results['skipped_images']['count']} unreadable, skipped)"
            if results["skipped_images"]["count"]
            else ""
        ),  # fmt: skip
        f"float top-1            {pct(results['float_top1'])}",
        f"QANN top-1             {pct(results['qann_top1'])}",
        f"SNN top-1              {pct(results['snn_top1'])}  ({results['model'].get('mode')} mode)",
        f"SNN/QANN agreement     {pct(results['agreement'])}",
        f"steps to silence       mean {steps['mean']:.1f}, max {steps['max']}"
        + (f", {steps['not_silent']} not silent" if steps["not_silent"] else ""),
        f"SOPs per image         {results['sops']['per_image']:.4g}",
        f"QANN MACs per image    {results['qann_macs']['per_image']:.4g}",
        f"energy ({table})  SNN {1e6 * e['snn_joules']['total'] / results['images']:.4g} µJ, "
        f"QANN {1e6 * e['qann_joules']['total'] / results['images']:.4g} µJ per image "
        f"(SNN/QANN {e['snn_over_qann']:.3f})",
        "images/s               "
        + ", ".join(f"{k} {v:.1f}" for k, v in results["images_per_s"].items() if v),
    ]
    overhead = results["run"]["counting_overhead"]
    if overhead:
        lines.append(f"SOP counting overhead  {100 * overhead['fraction']:.1f} % of SNN time")
    if results.get("parity"):
        lines.append(str(results["parity"]["table"]))
    for path in results.get("outputs", {}).values():
        lines.append(f"wrote {path}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.checkpoint is None and args.float_checkpoint is None:
        parser().error("give --checkpoint or --float-checkpoint")
    try:
        results = evaluate(
            checkpoint=args.checkpoint, float_checkpoint=args.float_checkpoint,
            model=args.model, level=args.level, weight_bits=args.weight_bits,
            calibrate=args.calibrate, calib_data=args.calib_data, data=args.data,
            limit=args.limit, batch_size=args.batch_size, workers=args.workers,
            crop_pct=args.crop_pct, mean=args.mean, std=args.std, max_steps=args.max_steps,
            chunk=args.chunk, device=args.device, energy_table=args.energy_table,
            float_top1=args.float_top1, parity=args.parity, parity_images=args.parity_images,
            measure_overhead=args.measure_overhead, cuda_graph=args.cuda_graph, out=args.out,
            progress=not args.quiet,
        )  # fmt: skip
    except (ValueError, TypeError, OSError) as err:
        print(f"spikekernels.evaluate: error: {err}", file=sys.stderr)
        return 2
    if not args.quiet and int(os.environ.get("RANK", "0")) == 0:
        print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

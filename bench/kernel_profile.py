"""One block of the converted ViT-S in two chunks, for Nsight Compute (``ncu``) to profile.

``bench/device_check.sh`` runs this under ``ncu --profile-from-start off`` when the GPU
machine has ncu: only the launches between ``cudaProfilerStart`` and ``cudaProfilerStop`` are
profiled, and this script brackets one block's forward (``--block``, default the middle one)
in the first chunk (fresh state, the busiest steps) and in a later one (``--later``, default
the third: incoming state, mostly quiet tiles). So each of exact mode's fused kernels (the
LayerNorm neurons, the four linears, the attention) is profiled twice, busy and settled, and
the report says what bounds it (throughput against the roofline, occupancy, registers, warp
stall reasons), which the kernels' static instruction counts cannot.

The model is ``bench_vit.py``'s: ``quant_vit_small`` at batch 64, random weights calibrated
on random images, int8 weights (exact mode; ``--mode float`` for float mode). A warm-up run
first compiles every kernel outside the profiled range. Without a GPU it runs the tiny
preset on the CPU and says which calls it would have bracketed (a check of the wiring).

    ncu --profile-from-start off --section SpeedOfLight ... python3 bench/kernel_profile.py
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "0")  # a GPU run, or the CPU runtime path

import torch  # noqa: E402

import spikekernels  # noqa: E402
from spikekernels.models import calibrate, quant_vit_small, quant_vit_tiny  # noqa: E402

ON_GPU = torch.cuda.is_available()
CHUNK = 8


def _bracket(block: torch.nn.Module, chunks: set[int]) -> list[int]:
    """Hooks on ``block`` that start the CUDA profiler before its forward in the chunks
    numbered in ``chunks`` (0 = the first call) and stop it after; returns the list of chunk
    numbers bracketed so far (filled as the run goes)."""
    calls, bracketed = [0], []

    def before(module, args):
        if calls[0] in chunks:
            bracketed.append(calls[0])
            if ON_GPU:
                torch.cuda.synchronize()
                torch.cuda.profiler.start()

    def after(module, args, output):
        if calls[0] in chunks and ON_GPU:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        calls[0] += 1

    block.register_forward_pre_hook(before)
    block.register_forward_hook(after)
    return bracketed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("exact", "float"), default="exact")
    parser.add_argument("--level", type=int, default=16)
    parser.add_argument("--block", type=int, default=None, help="block index (default: middle)")
    parser.add_argument("--later", type=int, default=2, help="the later chunk's number")
    args = parser.parse_args()

    model, batch = (quant_vit_small, 64) if ON_GPU else (quant_vit_tiny, 4)
    device = torch.device("cuda" if ON_GPU else "cpu")
    torch.manual_seed(0)
    weight_bits = 8 if args.mode == "exact" else None
    qann = model(level=args.level, weight_bits=weight_bits).to(device).eval()
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    x = torch.randn((batch, qann.in_chans, qann.img_size, qann.img_size), device=device,
                    generator=gen)  # fmt: skip
    calibrate(qann, x)
    snn = spikekernels.convert(qann)
    index = len(snn.blocks) // 2 if args.block is None else args.block
    if not 0 <= index < len(snn.blocks):
        parser.error(f"--block must be in [0, {len(snn.blocks)}), got {index}")
    max_steps = (args.later + 1) * CHUNK
    with torch.no_grad():
        snn(x, max_steps=max_steps, chunk=CHUNK)  # warm-up: compiles every kernel
        bracketed = _bracket(snn.blocks[index], {0, args.later})
        _, steps = snn(x, max_steps=max_steps, chunk=CHUNK)
    where = "profiled" if ON_GPU else "would profile (no GPU: nothing profiled)"
    print(
        f"kernel_profile: {model.__name__} batch {batch}, {args.mode} mode, level {args.level}: "
        f"{where} block {index} in chunks {bracketed} of {CHUNK} steps (the run: {steps} steps)"
    )
    # A run that went silent before the later chunk brackets only the first: say so.
    return 0 if bracketed == [0, args.later] else 1


if __name__ == "__main__":
    raise SystemExit(main())

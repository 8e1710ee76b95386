"""The host's share of an eager chunk, measured without a GPU.

On a GPU an eager chunk costs the larger of its kernels' time and the host's: the Python of
the modules and op faces (checks, allocation, dispatch) and the Triton launcher, for about
a dozen launches a block. By count (2026-12, 2-core CPU machine) the host spent about 1 ms a
ViT block and chunk, as much as a busy block-chunk of ViT-S's kernels on an H200, and far
more than a quiet one. ``bench/bench_host.py`` times the real thing on a GPU; this script
times the same Python on a CPU: the Triton path under ``TRITON_INTERPRET=1`` with every
kernel launch replaced by a no-op (outputs are garbage; nothing reads them but the next
launch), the data checks off as on a GPU without ``validate``. It prints, per 8-step chunk
of one forward call, the host time of a model of ``--depth`` blocks and the per-block share
(``--depth`` less one block), with the Python function calls a block makes (a count that does
not depend on the machine's speed or load), and where a block's host time goes (profiled:
checks, op faces, launch preparation, modules, torch's Python, C functions). The Triton
launcher itself is left out: it is the same per launch whatever our Python does.

    python bench/host_path.py [--mode exact|float] [--depth 12]
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import os
import pkgutil
import pstats
import time

os.environ["TRITON_INTERPRET"] = "1"  # the Triton path on CPU tensors (set before any kernel)

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import spikekernels  # noqa: E402
import spikekernels.ops  # noqa: E402
from spikekernels.models import QuantViT, calibrate  # noqa: E402

STEPS = 8


def _model(depth: int, exact: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    bits = 8 if exact else None
    qann = QuantViT(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=64,
                    depth=depth, num_heads=2, weight_bits=bits, level=16)  # fmt: skip
    calibrate(qann.eval(), torch.randn(4, 3, 32, 32))
    return spikekernels.convert(qann)


# where the host's time goes, by the file of each function's own time (profiled, so the shares
# are of a slower run; the order of the first matching prefix counts)
_GROUPS = (
    (
        "shared check helpers (ops/_checks, _inplace)",
        ("spikekernels/ops/_checks.py", "spikekernels/ops/_inplace.py"),
    ),
    ("op faces, their own checks, dispatch", ("spikekernels/ops/",)),
    ("launch preparation", ("spikekernels/kernels/",)),
    ("modules and runner", ("spikekernels/nn/", "spikekernels/models/")),
    ("torch's Python (nn.Module calls, ...)", ("torch/",)),
    ("C functions (allocation, views, ...)", ("~",)),
)


def _by_group(stats: pstats.Stats) -> dict[str, float]:
    """Own time (seconds) by ``_GROUPS``, the rest as "other"."""
    times = dict.fromkeys([name for name, _ in _GROUPS] + ["other"], 0.0)
    for (filename, _, _), (_, _, own, _, _) in stats.stats.items():
        group = next((name for name, prefixes in _GROUPS
                      if any(p in filename for p in prefixes)), "other")  # fmt: skip
        times[group] += own
    return times


def _host_chunk(
    snn: torch.nn.Module, x: torch.Tensor, reps: int
) -> tuple[float, int, dict[str, float]]:
    """The fastest of ``reps`` host times of one ``STEPS``-step call, its Python calls and
    its profiled own time by group."""
    run = lambda: snn(x, max_steps=STEPS, chunk=STEPS)  # noqa: E731
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    profile = cProfile.Profile()
    profile.enable()
    run()
    profile.disable()
    stats = pstats.Stats(profile)
    return min(times), stats.total_calls, _by_group(stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("exact", "float"), default="exact")
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    x = torch.randn(1, 3, 32, 32)
    models = {d: _model(d, args.mode == "exact") for d in (1, args.depth)}
    for snn in models.values():
        snn(x, max_steps=2, chunk=2)  # the kernels run once for real: every path is warm
    # the data checks off, as on a GPU without validate (each module's own binding)
    for info in pkgutil.iter_modules(spikekernels.ops.__path__):
        module = importlib.import_module(f"spikekernels.ops.{info.name}")
        if hasattr(module, "may_read_data"):
            module.may_read_data = lambda t, validate: False
    InterpretedFunction.__getitem__ = lambda self, grid: lambda *a, **k: None
    (t1, c1, g1), (tn, cn, gn) = (_host_chunk(models[d], x, args.reps) for d in (1, args.depth))
    per_block, calls = (tn - t1) / (args.depth - 1), (cn - c1) // (args.depth - 1)
    print(
        f"{args.mode} mode, {STEPS}-step chunk, host only ({os.cpu_count()}-core CPU): "
        f"{args.depth} blocks {tn * 1e3:.2f} ms, per block {per_block * 1e3:.3f} ms and "
        f"{calls} Python calls"
    )
    block = {name: gn[name] - g1[name] for name in gn}
    total = sum(block.values())
    print("a block's share of the profiled host time, by the file of each function's own time:")
    for name, seconds in sorted(block.items(), key=lambda item: -item[1]):
        print(f"  {100 * seconds / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()

"""The evaluation's PNG plots, drawn from results.json's data (matplotlib, Agg, small files).

- ``accuracy_per_step.png``: SNN top-1 after each time step, QANN (and float) as lines;
- ``steps_to_silence.png``: histogram of the step at which each image fell silent;
- ``energy_per_layer.png``: estimated energy per image by layer group (patch embedding, each
  block, head), SNN (SOPs, dense work) beside the QANN, for the selected energy table.
"""

from __future__ import annotations

__all__ = ["PLOTS", "write_plots"]

PLOTS = ("accuracy_per_step.png", "steps_to_silence.png", "energy_per_layer.png")
_SIZE = (5.0, 3.2)
_DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(results: dict, paths: dict[str, str]) -> None:
    """Draw each plot of ``PLOTS`` to ``paths[name]`` (the caller renames them into place)."""
    plt = _pyplot()
    _accuracy(plt, results, paths["accuracy_per_step.png"])
    _steps(plt, results, paths["steps_to_silence.png"])
    _energy(plt, results, paths["energy_per_layer.png"])


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _accuracy(plt, results: dict, path: str) -> None:
    fig, ax = plt.subplots(figsize=_SIZE, dpi=_DPI)
    curve = results["snn_top1_per_step"]
    ax.plot(range(1, len(curve) + 1), [100 * a for a in curve], ".-", label="SNN")
    ax.axhline(100 * results["qann_top1"], color="grey", linestyle="--", label="QANN")
    if results.get("float_top1") is not None:
        ax.axhline(100 * results["float_top1"], color="tab:green", linestyle=":", label="float")
    ax.set_xlabel("time step")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"SNN accuracy per step ({results['images']} images)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    _save(plt, fig, path)


def _steps(plt, results: dict, path: str) -> None:
    fig, ax = plt.subplots(figsize=_SIZE, dpi=_DPI)
    hist = results["steps_to_silence"]["histogram"]
    steps = [int(s) for s in hist]
    ax.bar(steps, list(hist.values()), width=0.8, color="tab:blue")
    ax.set_xlabel("steps to silence")
    ax.set_ylabel("images")
    steps = results["steps_to_silence"]
    title = f"steps to silence: {results['images']} images, mean {steps['mean']:.1f}"
    if results["steps_to_silence"]["not_silent"]:
        title += f", {results['steps_to_silence']['not_silent']} not silent by max_steps"
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    _save(plt, fig, path)


def _energy(plt, results: dict, path: str) -> None:
    table = results["energy_table"]
    groups = results["energy_per_layer"]
    names = list(groups)
    images = max(1, results["images"])
    to_uj = 1e6 / images
    sop = [groups[g]["snn_sops"] * to_uj for g in names]
    dense = [(groups[g]["snn_dense"] + groups[g]["snn_macs"]) * to_uj for g in names]
    qann = [groups[g]["qann"] * to_uj for g in names]
    x = range(len(names))
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(_SIZE[0], 0.45 * len(names) + 1.5), _SIZE[1]), dpi=_DPI)
    ax.bar([i - width / 2 for i in x], sop, width, label="SNN: SOPs (AC)", color="tab:blue")
    ax.bar(
        [i - width / 2 for i in x], dense, width, bottom=sop, label="SNN: dense", color="tab:cyan"
    )
    ax.bar([i + width / 2 for i in x], qann, width, label="QANN: MACs + dense", color="tab:grey")
    ax.set_xticks(list(x), [n.replace("blocks.", "b") for n in names], rotation=45, ha="right")
    ax.set_ylabel("energy per image (µJ)")
    ratio = results["energy"][table]["snn_over_qann"]
    ratio_text = "" if ratio is None else f", SNN/QANN {ratio:.2f}"
    ax.set_title(f"energy per layer ({table}{ratio_text})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    _save(plt, fig, path)

"""Merge the ranks' counts into results.json's dict, and write it with the plots atomically.

Accuracies are fractions in [0, 1]. ``snn_top1_per_step[t]`` is the SNN's top-1 after
``t + 1`` steps (a sample that fell silent keeps its final answer); the list runs to the
latest step at which any image fell silent (``max_steps`` if one never did). Per-layer
figures are totals over all images, keyed by module path in the SNN (neurons, dense
modules) or the QANN (linears, attention products, norms).
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

from spikekernels.evaluate.plots import PLOTS, write_plots
from spikekernels.evaluate.sops import ENERGY_TABLES, energy, layer_group

__all__ = ["RESULTS_FILE", "assemble", "write_outputs"]

RESULTS_FILE = "results.json"


def assemble(ctx, st, spikes, *, max_steps, chunk, energy_table, model_info, data_info) -> dict:
    """results.json's dict from every rank's ``_RunState`` and counters (collective: every
    rank calls it and gets the same dict)."""
    scalars = torch.stack(
        [st.images, st.float_correct, st.qann_correct, st.snn_correct, st.agree]
    ).cpu()
    images, float_correct, qann_correct, snn_correct, agree = ctx.sum(scalars).tolist()
    skipped = ctx.gather_lists(st.skipped)
    if images == 0:
        raise ValueError(
            f"no readable image in {data_info['description']}"
            + (f" ({len(skipped)} could not be decoded, e.g. {skipped[0]})" if skipped else "")
        )
    per_step = ctx.sum(st.snn_correct_per_step.cpu()).tolist()
    hist = ctx.sum(st.settle_hist.cpu()).tolist()
    spike_counts = ctx.sum(spikes.spikes.cpu())  # [neurons, max_steps]
    snn_macs = dict(zip(spikes.macs, ctx.sum_ints(list(spikes.macs.values())), strict=True))
    dense_elems = dict(
        zip(spikes.dense_elements, ctx.max_ints(list(spikes.dense_elements.values())), strict=True)
    )
    neuron_elems = dict(
        zip(
            spikes.neuron_elements, ctx.max_ints(list(spikes.neuron_elements.values())), strict=True
        )
    )
    # Per image (profile_qann), the same on every rank: times the images.
    qann_macs = {k: v * images for k, v in st.qann_macs.items()}
    qann_dense = {k: v * images for k, v in st.qann_dense.items()}
    seconds = {k: ctx.max_float(v) for k, v in st.seconds.items()}
    float_ran = st.float_note is None

    # Steps: each image runs steps 0 .. s-1 before the silent step s (or max_steps in all).
    last = max(s for s, n in enumerate(hist) if n)
    sample_steps = sum(s * n for s, n in enumerate(hist))
    reported = max(1, last)

    fanouts = torch.tensor(spikes.fanouts, dtype=torch.int64)
    sops_layer_step = spike_counts * fanouts[:, None]
    per_layer_sops = {
        name: {
            "module": spikes.neuron_modules[i],
            "spikes": int(spike_counts[i].sum()),
            "fanout": spikes.fanouts[i],
            "sops": int(sops_layer_step[i].sum()),
        }
        for i, name in enumerate(spikes.neuron_names)
    }
    sops_total = int(sops_layer_step.sum())
    dense_layers = {
        name: {
            "elements_per_step": dense_elems[name],
            "ops_per_element": spikes.dense_ops[name],
            "ops": dense_elems[name] * spikes.dense_ops[name] * sample_steps,
        }
        for name in spikes.dense_ops
    }
    snn_dense_total = sum(v["ops"] for v in dense_layers.values())
    snn_macs_total = sum(snn_macs.values())
    qann_macs_total = sum(qann_macs.values())
    qann_dense_total = sum(qann_dense.values())

    energies = {
        name: energy(
            table,
            sops=sops_total,
            snn_macs=snn_macs_total,
            snn_dense=snn_dense_total,
            qann_macs=qann_macs_total,
            qann_dense=qann_dense_total,
        )  # fmt: skip
        for name, table in ENERGY_TABLES.items()
    }
    table = ENERGY_TABLES[energy_table]
    ac, mac = table.ac_pj * 1e-12, table.mac_pj * 1e-12
    groups: dict[str, dict[str, float]] = {}

    def group(name: str) -> dict[str, float]:
        return groups.setdefault(
            layer_group(name), {"snn_sops": 0.0, "snn_dense": 0.0, "snn_macs": 0.0, "qann": 0.0}
        )

    for name, v in per_layer_sops.items():
        group(name)["snn_sops"] += v["sops"] * ac
    for name, v in dense_layers.items():
        group(name)["snn_dense"] += v["ops"] * mac
    for name, v in snn_macs.items():
        group(name)["snn_macs"] += v * mac
    for name, v in {**qann_macs, **qann_dense}.items():
        group(name)["qann"] += v * mac
    order = ["patch_embed"] + sorted(
        (g for g in groups if g.startswith("blocks.")), key=lambda g: int(g.split(".")[1])
    ) + ["head"]  # fmt: skip
    groups = {g: groups[g] for g in order if g in groups}

    results = {
        "images": images,
        "float_top1": float_correct / images if float_ran else None,
        "qann_top1": qann_correct / images,
        "snn_top1": snn_correct / images,
        "snn_top1_per_step": [c / images for c in per_step[:reported]],
        "agreement": agree / images,
        "steps_to_silence": {
            "histogram": {str(s): n for s, n in enumerate(hist) if n},
            "mean": sample_steps / images,
            "max": last,
            "not_silent": hist[max_steps],
        },
        "sops": {
            "total": sops_total,
            "per_image": sops_total / images,
            "per_step": sops_layer_step.sum(dim=0)[:reported].tolist(),
            "per_layer": per_layer_sops,
        },
        "snn_dense_ops": {"total": snn_dense_total, "per_layer": dense_layers},
        "snn_macs": {"total": snn_macs_total, "per_layer": snn_macs},
        "neuron_updates": sum(neuron_elems.values()) * sample_steps,
        "qann_macs": {
            "total": qann_macs_total,
            "per_image": qann_macs_total / images,
            "per_layer": qann_macs,
        },
        "qann_dense_ops": {"total": qann_dense_total, "per_layer": qann_dense},
        "energy": energies,
        "energy_table": energy_table,
        "energy_per_layer": groups,
        "images_per_s": {
            k: (images / s if s > 0 else None)
            for k, s in seconds.items()
            if k != "float" or float_ran
        },
        "skipped_images": {"count": len(skipped), "paths": skipped[:100]},
        "model": model_info,
        "data": data_info,
        "max_steps": max_steps,
        "chunk": chunk,
        "run": {
            "world_size": ctx.world,
            "device": str(ctx.device),
            "backend": ctx.backend,
            "seconds": seconds,
            "float_network": st.float_note or "every quantizer off, same weights",
            "counting_overhead": st.counting_overhead,
        },
    }
    return results


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_outputs(results: dict, outdir: str) -> dict[str, str]:
    """Write the plots and results.json into ``outdir``: each to a temp file first, renamed
    into place only once all of them are written (results.json last)."""
    temps: dict[str, str] = {}
    try:
        mode = _file_mode()
        for name in (*PLOTS, RESULTS_FILE):
            fd, temps[name] = tempfile.mkstemp(prefix=f".tmp-{name}-", dir=outdir)
            os.close(fd)
            os.chmod(temps[name], mode)  # mkstemp's 0600 -> what open() would have made
        paths = {name: os.path.join(outdir, name) for name in temps}
        results = {**results, "outputs": paths}
        write_plots(results, {name: temps[name] for name in PLOTS})
        with open(temps[RESULTS_FILE], "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
        for name in (*PLOTS, RESULTS_FILE):
            os.replace(temps.pop(name), paths[name])
        return paths
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)

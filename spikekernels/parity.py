"""``parity(qann, snn, images)``: where an SNN departs from its QANN, quantizer by quantizer.

For every quantizer of the QANN (in execution order) it reports:

- **global agreement**: the fraction of the SNN neuron's counts (after the run) equal to the
  QANN's integers;
- **local agreement**: each count against the QANN's formula applied to the SNN's *own*
  upstream counts (the QANN is run again with every quantizer's integer replaced by the SNN's
  counts). It is 100% unless the neuron's own rule departs from its input, so it tells a
  rounding flip that cascaded from upstream (float mode) from a bug;
- **ties**: local mismatches whose value lies within float error of a rounding boundary
  (``|v/theta + 1/2 - k| < 1e-4``): float rounding, not a bug;

plus the first diverging quantizer and the largest logit difference. It works for float and
exact mode alike (exact mode: 100% everywhere and equal logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from spikekernels.models.spiking_vit import SpikingViT

__all__ = ["ParityReport", "ParityRow", "parity"]

TIE = 1e-4


@dataclass
class ParityRow:
    """One quantizer: its name, its number of integers, and the agreement figures."""

    name: str
    numel: int
    agree: int
    local_agree: int
    ties: int

    @property
    def agreement(self) -> float:
        return self.agree / max(self.numel, 1)

    @property
    def local_agreement(self) -> float:
        return self.local_agree / max(self.numel, 1)


@dataclass
class ParityReport:
    """What ``parity`` returns; ``str(report)`` is a table. ``snn_logits``/``qann_logits``
    are both networks' answers (``[B, num_classes]``)."""

    mode: str
    steps: int
    snn_logits: torch.Tensor
    qann_logits: torch.Tensor
    rows: list[ParityRow] = field(default_factory=list)

    @property
    def max_logit_difference(self) -> float:
        return float((self.snn_logits - self.qann_logits).abs().max())

    @property
    def prediction_agreement(self) -> float:
        same = self.snn_logits.argmax(-1) == self.qann_logits.argmax(-1)
        return float(same.float().mean())

    @property
    def agreement(self) -> float:
        """Global agreement over every count of every quantizer."""
        return sum(r.agree for r in self.rows) / max(sum(r.numel for r in self.rows), 1)

    @property
    def local_agreement(self) -> float:
        return sum(r.local_agree for r in self.rows) / max(sum(r.numel for r in self.rows), 1)

    @property
    def first_divergence(self) -> str | None:
        """The first quantizer (execution order) with a count off the QANN's, or None."""
        return next((r.name for r in self.rows if r.agree < r.numel), None)

    @property
    def unexplained(self) -> int:
        """Local mismatches that are not ties: each one is a bug."""
        return sum(r.numel - r.local_agree - r.ties for r in self.rows)

    def __str__(self) -> str:
        lines = [
            f"parity ({self.mode} mode, {self.steps} steps): global {self.agreement:.6%}, "
            f"local {self.local_agreement:.6%}, predictions {self.prediction_agreement:.2%}, "
            f"max |logit difference| {self.max_logit_difference:.3g}, first divergence: "
            f"{self.first_divergence or 'none'}",
            f"{'quantizer':36s} {'count':>10s} {'global':>10s} {'local':>10s} {'ties':>6s}",
        ]
        for r in self.rows:
            lines.append(
                f"{r.name:36s} {r.numel:10d} {r.agreement:10.6f} {r.local_agreement:10.6f} "
                f"{r.ties:6d}"
            )
        return "\n".join(lines)


def _quantizer_modules(qann: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    modules = dict(qann.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"parity: the QANN has no quantizer {missing[0]!r}: not this SNN's QANN")
    return {n: modules[n] for n in names}


def _snn_integers(
    snn: SpikingViT, like: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Each site's neuron count in the QANN's layout (float32), and the sites whose QANN
    quantizer sees every token where the SNN's neuron sees the class token only (the final
    norm of a timm-layout QANN): there the other rows are the QANN's own integers, filled in
    so that the QANN can run on the counts, and only row 0 is compared."""
    out, class_token_only = {}, set()
    for site in snn.sites:
        count = site.neuron.count
        if count is None:
            raise ValueError("parity: the SNN has not run")
        value = site.to_qann(count.to(torch.float32))
        want = like[site.name]
        if want.dim() == value.dim() + 1:  # a QANN that normalises every token: class token
            full = want.clone()
            full[:, 0] = value
            value = full
            class_token_only.add(site.name)
        out[site.name] = value
    return out, class_token_only


def _run_qann(qann, images, exact: bool, override: dict | None):
    """``(logits, {name: (integer, value)})`` of the QANN, with integers overridden downstream."""
    names = {id(m): n for n, m in qann.named_modules()}
    record: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    # A QANN with integer weights computes the exact integer forward (QuantViT.forward under
    # no_grad), whichever mode the SNN runs in (float mode of it: the dequantized weights),
    # and that forward calls no quantizer module that a hook could see.
    if exact or getattr(qann, "weight_bits", None) is not None:
        from spikekernels.models.exact_forward import exact_forward

        logits = exact_forward(qann, images, record=record, override=override)
        return logits, record

    def hook(module, inputs, output):
        name = names[id(module)]
        step = module.s.detach().to(torch.float32)
        value = inputs[0].detach().to(torch.float32)
        integer = torch.clamp(torch.floor(value / step + 0.5), module.n_min, module.p_max)
        record[name] = (integer, value)
        if override is not None and name in override:
            return (step * override[name]).to(output.dtype)
        return None

    quantizers = [m for m in qann.modules() if hasattr(m, "s") and hasattr(m, "n_min")]
    handles = [q.register_forward_hook(hook) for q in quantizers]
    try:
        logits = qann(images)
    finally:
        for h in handles:
            h.remove()
    return logits, record


@torch.no_grad()
def parity(
    qann: nn.Module, snn: SpikingViT, images: torch.Tensor, *, max_steps: int = 64, chunk: int = 8
) -> ParityReport:
    """Run ``snn`` on ``images`` until silent and compare it with ``qann`` (see the module
    docstring). Both must be on ``images``' device; ``qann`` is put in eval mode. Runs the QANN
    twice (its own integers, then on the SNN's counts) and the SNN once."""
    if not isinstance(snn, SpikingViT):
        raise TypeError(
            f"parity: snn must be a SpikingViT (spikekernels.convert), got {type(snn).__name__}"
        )
    qann.eval()
    names = [s.name for s in snn.sites]
    quantizers = _quantizer_modules(qann, names)
    snn_logits, steps = snn(images, max_steps=max_steps, chunk=chunk)
    qann_logits, record = _run_qann(qann, images, snn.exact, None)
    counts, class_token_only = _snn_integers(snn, {n: record[n][0] for n in names})
    _, local = _run_qann(qann, images, snn.exact, counts)
    report = ParityReport("exact" if snn.exact else "float", steps, snn_logits, qann_logits)
    for name in names:
        integer = record[name][0]
        mine = counts[name]
        local_target, value = local[name]
        if name in class_token_only:
            integer, mine, local_target, value = (
                t[:, 0] for t in (integer, mine, local_target, value)
            )
        u = value / quantizers[name].s.detach().to(torch.float32) + 0.5
        tie = (u - torch.round(u)).abs() < TIE
        local_same = local_target == mine
        report.rows.append(
            ParityRow(
                name,
                integer.numel(),
                int((integer == mine).sum()),
                int(local_same.sum()),
                int((~local_same & tie).sum()),
            )
        )
    return report

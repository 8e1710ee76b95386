"""Exact-mode parity of ViT-S on a GPU (``spikekernels.parity``), TF32 on then off: the
first quantizer whose counts differ from the QANN's, and how many layers differ. Its output of
2026-12-04 is bench/results/nvidia-h200-2026-12-04.exact-parity.log.

    python bench/exact_parity.py
"""

import time

import torch

import spikekernels
from spikekernels import parity
from spikekernels.models import calibrate, quant_vit_small


def main() -> None:
    """Both TF32 settings; the patch convolution's outputs compared too (the QANN's and the
    SNN's, the one dense layer they share, where TF32 may pick different algorithms)."""
    t0 = time.time()
    for tf32 in (True, False):
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.manual_seed(0)
        qann = quant_vit_small(level=16, weight_bits=8).cuda().eval()
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(16, 3, 224, 224, device="cuda", generator=gen)
        calibrate(qann, x)
        snn = spikekernels.convert(qann)
        with torch.no_grad():
            pe_q = qann.patch_embed.proj(x)
            pe_s = snn.patch_embed.proj(x) if hasattr(snn.patch_embed, "proj") else None
            print(
                "tf32",
                tf32,
                "patch conv equal:",
                None if pe_s is None else torch.equal(pe_q, pe_s),
                flush=True,
            )
            report = parity(qann, snn, x)
        rows = report.rows
        bad = [r for r in rows if r.agree != r.numel]
        print(
            f"tf32={tf32}: logits equal {torch.equal(report.snn_logits, report.qann_logits)}, "
            f"max diff {(report.snn_logits - report.qann_logits).abs().max().item():.3g}, "
            f"first divergence {report.first_divergence}, {len(bad)} of {len(rows)} layers "
            f"differ, t={time.time() - t0:.0f}s",
            flush=True,
        )
        for r in bad[:8]:
            print(
                f"  {r.name}: agree {r.agree}/{r.numel} local {r.local_agree} ties {r.ties}",
                flush=True,
            )


if __name__ == "__main__":
    main()

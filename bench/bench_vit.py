"""End to end (DESIGN.md): a converted ViT run until silent, images/s next to its QANN's.

On a GPU: ViT-S (``quant_vit_small``, 224 px, 197 tokens) at batch 64, random weights
calibrated on random images (throughput only; ``python/demo.py`` checks accuracy on real
data). The SNN runs ``snn(x, max_steps=64, chunk=8)``: chunks of 8 steps through the fused
ops, one host sync per chunk, stop when every image is silent. The QANN baselines are its own
forward in float32 and under bf16 autocast; ``snn_over_qann_*`` is the headline ratio (time
of the SNN over the QANN's). An int8 QANN (``torch._int_mm`` linears) is not in the library
yet, so there is no int8 baseline here. On a CPU: the tiny preset at batch 16.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, ON_GPU, median_time, record, synchronized

import spikekernels
from spikekernels.models import calibrate, quant_vit_small, quant_vit_tiny

MODEL, BATCH = (quant_vit_small, 64) if ON_GPU else (quant_vit_tiny, 16)
MAX_STEPS, CHUNK = 64, 8


@pytest.mark.parametrize("level", [16, 32])
def test_vit_end_to_end(benchmark, level):
    torch.manual_seed(0)
    qann = MODEL(level=level).to(DEVICE).eval()
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(0)
    shape = (BATCH, qann.in_chans, qann.img_size, qann.img_size)
    x = torch.randn(shape, device=DEVICE, generator=gen)
    calibrate(qann, x)
    snn = spikekernels.convert(qann)

    with torch.no_grad():
        run = synchronized(lambda: snn(x, max_steps=MAX_STEPS, chunk=CHUNK))
        logits, steps = run()
        benchmark.group = f"vit end to end level={level}"
        benchmark.pedantic(run, warmup_rounds=1, rounds=3)
        seconds = median_time(run, warmup=0, reps=3)
        qann_logits = qann(x)
        qann_fp32 = median_time(synchronized(lambda: qann(x)))
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            qann_bf16 = median_time(synchronized(lambda: qann(x)))

    record(
        benchmark,
        seconds,
        model=MODEL.__name__,
        batch=BATCH,
        level=level,
        steps=steps,
        settled=steps < MAX_STEPS,
        snn_images_per_s=BATCH / seconds,
        qann_fp32_images_per_s=BATCH / qann_fp32,
        qann_bf16_images_per_s=BATCH / qann_bf16,
        snn_over_qann_fp32=seconds / qann_fp32,
        snn_over_qann_bf16=seconds / qann_bf16,
        prediction_agreement=(logits.argmax(1) == qann_logits.argmax(1)).float().mean().item(),
        max_logit_difference=(logits - qann_logits).abs().max().item(),
    )

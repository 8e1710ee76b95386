"""convert() and the SNN runner: a tiny QuantViT run until silent equals the QANN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spikekernels.kernels
from spikekernels import convert
from spikekernels.convert import SpikingViT
from spikekernels.models import QuantViT, calibrate, quantizers

TIE = 1e-4  # see tests/test_attention.py
CONFIG = dict(img_size=8, patch_size=4, in_chans=3, num_classes=5, embed_dim=16, depth=2,
              num_heads=2, level=8)  # fmt: skip


def make_qann(gen, **overrides) -> QuantViT:
    """Random weights (unit-gain linears, so that activity reaches every layer), calibrated."""
    qann = QuantViT(**{**CONFIG, **overrides})
    with torch.no_grad():
        for m in qann.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / fan_in**0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
        for p in (qann.cls_token, qann.pos_embed):
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return calibrate(qann, torch.randn(16, 3, 8, 8, generator=gen))


@pytest.fixture
def qann(gen) -> QuantViT:
    return make_qann(gen)


@pytest.fixture
def images(gen) -> torch.Tensor:
    return torch.randn(3, 3, 8, 8, generator=gen)


def neuron_pairs(qann: QuantViT, snn: SpikingViT):
    """``(quantizer name, quantizer, neuron, QANN integer -> neuron layout)`` for every neuron."""
    same = lambda t: t  # noqa: E731
    pairs = [("patch_embed.proj.1", qann.patch_embed.proj[1], snn.patch_embed.neuron,
              lambda t: t.flatten(2).transpose(1, 2))]  # fmt: skip
    for i, (qb, sb) in enumerate(zip(qann.blocks, snn.blocks, strict=True)):
        h = qb.attn.num_heads

        def token_major(t, h=h):
            return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)

        p = f"blocks.{i}"
        pairs += [
            (f"{p}.norm1.1", qb.norm1[1], sb.norm1_if, same),
            (f"{p}.attn.quan_q", qb.attn.quan_q, sb.attn.q_if, token_major),
            (f"{p}.attn.quan_k", qb.attn.quan_k, sb.attn.k_if, token_major),
            (f"{p}.attn.quan_v", qb.attn.quan_v, sb.attn.v_if, token_major),
            (f"{p}.attn.attn_quan", qb.attn.attn_quan, sb.attn.attn_if, same),
            (f"{p}.attn.after_attn_quan", qb.attn.after_attn_quan, sb.attn.after_attn_if, same),
            (f"{p}.attn.quan_proj", qb.attn.quan_proj, sb.attn.proj_if, same),
            (f"{p}.norm2.1", qb.norm2[1], sb.norm2_if, same),
            (f"{p}.mlp.act.0", qb.mlp.act[0], sb.mlp.act_if, same),
            (f"{p}.mlp.fc2.1", qb.mlp.fc2[1], sb.mlp.fc2_if, same),
        ]
    if qann.global_pool:
        pairs.append(("fc_norm.1", qann.fc_norm[1], snn.norm_if, same))
    else:
        pairs.append(("norm.1", qann.norm[1], snn.norm_if, lambda t: t[:, 0]))
    return pairs


def count_agreement(qann: QuantViT, snn: SpikingViT, images: torch.Tensor):
    """Run the QANN and compare every neuron's count with its quantizer's integer.

    Returns ``(qann logits, agreement fraction, report)``; raises if a count differs off a
    rounding tie.
    """
    pairs = neuron_pairs(qann, snn)
    assert len(pairs) == len(list(quantizers(qann))), "every quantizer has a neuron"
    seen = {}
    handles = []
    for name, q, _, _ in pairs:

        def record(module, inputs, output, name=name):
            u = inputs[0].detach() / module.s.detach() + 0.5
            seen[name] = (module.integer(inputs[0]), (u - torch.round(u)).abs() > 0.5 - TIE)

        handles.append(q.register_forward_hook(record))
    with torch.no_grad():
        logits = qann(images)
    for h in handles:
        h.remove()
    agree = total = 0
    report = []
    for name, _, neuron, layout in pairs:
        integer, tie = (layout(t) for t in seen[name])
        same = neuron.count.to(torch.int64) == integer.to(torch.int64)
        agree, total = agree + int(same.sum()), total + same.numel()
        report.append(f"{name} {same.float().mean().item():.4f}/{int(tie.sum())} ties")
        assert bool((same | tie).all()), "count != integer off a tie: " + "; ".join(report)
    return logits, agree / total, f"agreement {agree / total:.6f} of {total}: " + "; ".join(report)


def test_snn_equals_qann(qann, images):
    snn = convert(qann)
    logits, steps = snn(images, max_steps=64, chunk=8)
    assert 1 <= steps < 64, f"did not fall silent in 64 steps (steps={steps})"
    expected, fraction, report = count_agreement(qann, snn, images)
    assert fraction == 1.0, report
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_global_pool_variant(gen, images):
    qann = make_qann(gen, global_pool=True, depth=1)
    snn = convert(qann)
    logits, steps = snn(images)
    assert steps < 64
    expected, fraction, report = count_agreement(qann, snn, images)
    assert fraction == 1.0, report
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("runtime", ["cpu-runtime", "kernels"])
def test_chunk_sizes_identical(qann, images, runtime, monkeypatch):
    """Chunk 1, 3, 8: the same steps and counts, bit for bit; the same logits.

    On the CPU runtime path (the vectorised reference ops) the logits are bit-identical too.
    Under the Triton interpreter the spike linear's float32 tile products (numpy BLAS) round
    a row differently depending on its position in the row tile, i.e. on the chunk size, so
    there the logits are compared to float32 rounding.
    """
    if runtime == "cpu-runtime":
        monkeypatch.setattr(spikekernels.kernels, "INTERPRET", False)
    exact = runtime == "cpu-runtime" or not spikekernels.kernels.INTERPRET
    snn = convert(qann)
    base, base_steps, base_trace = snn(images, chunk=8, return_trace=True)
    base_counts = [n.count.clone() for _, _, n, _ in neuron_pairs(qann, snn)]
    for chunk in (1, 3):
        logits, steps, trace = snn(images, chunk=chunk, return_trace=True)
        assert steps == base_steps, f"chunk {chunk}: {steps} steps, chunk 8: {base_steps}"
        assert torch.equal(trace.sample_steps, base_trace.sample_steps)
        for (name, _, n, _), c in zip(neuron_pairs(qann, snn), base_counts, strict=True):
            assert torch.equal(n.count, c), f"chunk {chunk}: counts of {name} differ"
        tol = 0 if exact else 1e-6
        torch.testing.assert_close(logits, base, rtol=tol, atol=tol)
        torch.testing.assert_close(trace.logits, base_trace.logits, rtol=tol, atol=tol)


def test_reference_mode_equals_fast(qann, images):
    snn = convert(qann)
    fast, fast_steps = snn(images)
    fast_counts = [n.count.clone() for _, _, n, _ in neuron_pairs(qann, snn)]
    ref, ref_steps = snn(images, reference=True)
    assert ref_steps == fast_steps
    torch.testing.assert_close(ref, fast, rtol=1e-6, atol=1e-6)
    for (name, _, n, _), c in zip(neuron_pairs(qann, snn), fast_counts, strict=True):
        assert torch.equal(n.count, c), f"reference counts of {name} differ"


def test_per_sample_silence(qann, images):
    snn = convert(qann)
    # A blank image and a strong one settle at different steps.
    batch = torch.cat((images[:2], torch.zeros(1, 3, 8, 8), 3 * images[2:]))
    logits, steps, trace = snn(batch, return_trace=True)
    assert steps == int(trace.sample_steps.max())
    assert trace.logits.shape == (steps, 4, 5)
    torch.testing.assert_close(trace.logits[-1], logits, rtol=0, atol=0)
    alone = [snn(batch[i : i + 1], return_trace=True) for i in range(4)]
    assert trace.sample_steps.tolist() == [s for _, s, _ in alone]
    for i, (l_i, s_i, _) in enumerate(alone):
        torch.testing.assert_close(logits[i], l_i[0], rtol=1e-6, atol=1e-6)
        # Settled: the cumulative logits do not move after the sample's own settle step.
        torch.testing.assert_close(
            trace.logits[s_i - 1 :, i], logits[i].expand(steps - s_i + 1, -1)
        )
    assert len(set(trace.sample_steps.tolist())) > 1, "the samples should settle at different steps"


def test_max_steps_honoured(qann, images):
    snn = convert(qann)
    _, full_steps, trace = snn(images, return_trace=True)
    for max_steps, chunk in ((3, 8), (5, 2)):
        logits, steps = snn(images, max_steps=max_steps, chunk=chunk)
        assert steps == max_steps < full_steps
        # 1e-6: the interpreted spike linear rounds per chunk size (test_chunk_sizes_identical).
        torch.testing.assert_close(logits, trace.logits[max_steps - 1], rtol=1e-6, atol=1e-6)


def test_weights_shared_not_copied(qann):
    snn = convert(qann)
    assert snn.blocks[0].mlp.fc1.weight.data_ptr() == qann.blocks[0].mlp.fc1.weight.data_ptr()
    assert snn.blocks[1].attn.qkv.bias.data_ptr() == qann.blocks[1].attn.qkv.bias.data_ptr()
    assert snn.norm.weight.data_ptr() == qann.norm[0].weight.data_ptr()
    assert snn.head.weight.data_ptr() == qann.head.weight.data_ptr()
    assert snn.norm.eps == qann.norm[0].eps == 1e-6


def test_bad_inputs(qann, images):
    snn = convert(qann)
    for kwargs, err, match in (
        (dict(max_steps=0), ValueError, "max_steps must be >= 1"),
        (dict(chunk=0), ValueError, "chunk must be >= 1"),
        (dict(chunk=2.0), TypeError, "chunk must be an int"),
        (dict(max_steps=True), TypeError, "max_steps must be an int"),
    ):
        with pytest.raises(err, match=match):
            snn(images, **kwargs)
    with pytest.raises(ValueError, match=r"\[B, 3, 8, 8\]"):
        snn(torch.zeros(2, 3, 8, 7))
    with pytest.raises(ValueError, match=r"\[B, 3, 8, 8\]"):
        snn(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        snn(torch.zeros(2, 3, 8, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="nn.Module"):
        convert("vit")


def test_unknown_model_names_the_module(gen):
    qann = make_qann(gen, depth=1)
    qann.blocks[0].mlp.act[1] = nn.GELU()
    with pytest.raises(TypeError, match=r"`blocks\.0\.mlp\.act\.1` \(GELU\)"):
        convert(qann)

    qann = make_qann(gen, depth=1)
    qann.blocks[0].extra = nn.BatchNorm1d(16)
    with pytest.raises(TypeError, match=r"`blocks\.0\.extra` \(BatchNorm1d\)"):
        convert(qann)

    qann = make_qann(gen, depth=1)
    qann.blocks[0].norm2 = qann.blocks[0].norm2[0]
    with pytest.raises(TypeError, match=r"blocks\.0\.norm2\.1"):
        convert(qann)

    qann = make_qann(gen, depth=1)
    qann.blocks[0].attn.quan_k.enabled = False
    with pytest.raises(ValueError, match=r"`blocks\.0\.attn\.quan_k`: a disabled quantizer"):
        convert(qann)

    with pytest.raises(TypeError, match="no `patch_embed`"):
        convert(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.cuda
def test_snn_equals_qann_cuda(qann, images):
    """The Triton kernels and the CUDA softmax end to end: counts, logits, chunk invariance."""
    qann, images = qann.cuda(), images.cuda()
    snn = convert(qann)
    logits, steps, trace = snn(images, chunk=8, return_trace=True)
    assert steps < 64
    expected, fraction, report = count_agreement(qann, snn, images)
    assert fraction == 1.0, report
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    logits3, steps3, trace3 = snn(images, chunk=3, return_trace=True)
    assert steps3 == steps and torch.equal(trace3.sample_steps, trace.sample_steps)
    torch.testing.assert_close(logits3, logits, rtol=1e-6, atol=1e-6)

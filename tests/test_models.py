"""QuantViT: official SpikeZIP-TF layout and state_dict keys, checks, calibration, loading."""

from __future__ import annotations

import pytest
import torch

from spikekernels.models import (
    QuantViT,
    calibrate,
    load_checkpoint,
    quant_vit_base,
    quant_vit_large,
    quant_vit_small,
    quant_vit_tiny,
    quantizers,
)
from spikekernels.nn import Quantizer

# The keys of one block in the official QANN checkpoints (timm ViT after myquan_replace).
BLOCK_KEYS = [
    "norm1.0.weight",
    "norm1.0.bias",
    "norm1.1.s",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.quan_q.s",
    "attn.quan_k.s",
    "attn.quan_v.s",
    "attn.attn_quan.s",
    "attn.after_attn_quan.s",
    "attn.proj.weight",
    "attn.proj.bias",
    "attn.quan_proj.s",
    "norm2.0.weight",
    "norm2.0.bias",
    "norm2.1.s",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.act.0.s",
    "mlp.fc2.0.weight",
    "mlp.fc2.0.bias",
    "mlp.fc2.1.s",
]
STEM_KEYS = [
    "cls_token",
    "pos_embed",
    "patch_embed.proj.0.weight",
    "patch_embed.proj.0.bias",
    "patch_embed.proj.1.s",
]


def _official_keys(depth, final):
    blocks = [f"blocks.{i}.{k}" for i in range(depth) for k in BLOCK_KEYS]
    tail = [f"{final}.0.weight", f"{final}.0.bias", f"{final}.1.s", "head.weight", "head.bias"]
    return STEM_KEYS + blocks + tail


def _tiny(**kwargs):
    torch.manual_seed(0)
    return quant_vit_tiny(level=16, **kwargs)


def _images(gen, b=3):
    return torch.randn(b, 1, 8, 8, generator=gen)


@pytest.mark.parametrize(
    "build, depth, final",
    [
        (quant_vit_tiny, 2, "norm"),
        (quant_vit_small, 12, "norm"),
        (quant_vit_base, 12, "fc_norm"),
        (quant_vit_large, 24, "fc_norm"),
    ],
)
def test_state_dict_keys_are_the_official_ones(build, depth, final):
    with torch.device("meta"):
        model = build()
    assert list(model.state_dict()) == _official_keys(depth, final)
    for q in quantizers(model):
        assert q.s.shape == ()


@pytest.mark.parametrize(
    "build, width, tokens, heads",
    [
        (quant_vit_small, 384, 197, 6),
        (quant_vit_base, 768, 197, 12),
        (quant_vit_large, 1024, 197, 16),
    ],
)
def test_paper_sizes(build, width, tokens, heads):
    with torch.device("meta"):
        model = build()
    assert model.pos_embed.shape == (1, tokens, width)
    attn = model.blocks[0].attn
    assert (attn.num_heads, attn.head_dim, attn.scale) == (heads, 64, 64**-0.5)
    assert model.blocks[0].mlp.fc1.out_features == 4 * width
    assert model.blocks[0].norm1[0].eps == 1e-6
    assert model.global_pool == (build is not quant_vit_small)


def test_quantizer_signs_follow_the_official_placement():
    model = _tiny()
    block = model.blocks[0]
    unsigned = {id(block.attn.attn_quan), id(block.mlp.act[0])}
    for name, q in model.named_modules():
        if isinstance(q, Quantizer) and name.startswith("blocks.0."):
            assert q.signed == (id(q) not in unsigned), name
    assert all(q.level == 16 for q in quantizers(model))
    assert isinstance(block.mlp.act[1], torch.nn.ReLU)


@pytest.mark.parametrize("global_pool", [False, True])
def test_forward_shapes(gen, global_pool):
    model = _tiny(global_pool=global_pool).eval()
    x = _images(gen)
    assert model.embed(x).shape == (3, 17, 32)
    assert model.forward_features(x).shape == (3, 32)
    assert model(x).shape == (3, 10)


def test_float_switch(gen):
    model = _tiny().eval()
    x = _images(gen)
    calibrate(model, x)
    quantized = model(x)
    model.quantize(False)
    assert all(not q.enabled for q in quantizers(model))
    float_out = model(x)
    assert not torch.equal(float_out, quantized)
    assert torch.equal(model.quantize(True)(x), quantized)


def test_calibrate_sets_every_step(gen):
    model = _tiny()
    steps_before = [q.s.item() for q in quantizers(model)]
    assert steps_before == [1.0] * len(steps_before)
    calibrate(model, _images(gen, 8))
    assert not model.training
    for q in quantizers(model):
        assert q.initialized and not q.calibrating
        assert torch.isfinite(q.s) and q.s.item() > 0
    assert len({q.s.item() for q in quantizers(model)}) > 1


def test_qann_forward_is_deterministic(gen):
    model = _tiny()
    x = _images(gen)
    calibrate(model, x)
    assert torch.equal(model(x), model(x))
    again = _tiny()
    calibrate(again, x)
    assert torch.equal(again(x), model(x))


def test_strict_round_trip(gen):
    source = _tiny()
    x = _images(gen)
    calibrate(source, x)
    target = _tiny(global_pool=False)
    target.load_state_dict(source.state_dict(), strict=True)
    assert all(q.initialized for q in quantizers(target))
    assert torch.equal(target.eval()(x), source(x))
    target = _tiny()
    load_checkpoint(target, {"model": source.state_dict(), "epoch": 3})
    assert torch.equal(target.eval()(x), source(x))


def test_missing_and_extra_keys_are_named():
    model = _tiny()
    state = model.state_dict()
    del state["blocks.1.attn.quan_k.s"]
    state["blocks.0.attn.q_norm.weight"] = torch.ones(8)
    with pytest.raises(RuntimeError) as err:
        model.load_state_dict(state)
    assert "blocks.1.attn.quan_k.s" in str(err.value)
    assert "blocks.0.attn.q_norm.weight" in str(err.value)


def test_wrong_pooling_gets_a_hint():
    with pytest.raises(RuntimeError, match="global_pool"):
        _tiny(global_pool=True).load_state_dict(_tiny().state_dict())


def test_non_strict_load_reports_keys():
    model = _tiny()
    state = model.state_dict()
    del state["head.bias"]
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["head.bias"]


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 1, 16, 16), (2, 1, 8, 7), (1, 8, 8)])
def test_bad_images_are_rejected(shape):
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        _tiny()(torch.zeros(shape))


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="num_heads"):
        quant_vit_tiny(num_heads=3)
    with pytest.raises(ValueError, match="patch_size"):
        QuantViT(10, 4, 1, 10, 32, 1, 4)
    with pytest.raises(ValueError, match="no Quantizer"):
        calibrate(torch.nn.Linear(2, 2), torch.zeros(1, 2))


def test_qat_trains_steps_and_weights(gen):
    model = _tiny()
    x, y = _images(gen, 16), torch.randint(0, 10, (16,), generator=gen)
    calibrate(model, x)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(q.s.grad is not None for q in quantizers(model))
    assert model.patch_embed.proj[0].weight.grad.abs().sum() > 0

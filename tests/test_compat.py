"""compat.spikezip: the official names, step for step equal to ours and to the reference."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_PASS_ONLY, DEVICES, assert_same_bits
from torch import nn

from spikekernels import convert, parity, reference
from spikekernels.compat.spikezip import (
    IFNeuron,
    LLLinear,
    MyQuan,
    QAttention,
    SAttention,
    SNNWrapper,
    Spiking_LayerNorm,
    myquan_replace,
    reset_model,
    spiking_softmax,
)
from spikekernels.models import QuantViT, calibrate
from spikekernels.nn import STBIF, SpikeAttention, SpikeLayerNorm, SpikeSoftmax


@pytest.mark.parametrize("sym", [True, False])
def test_ifneuron_step_for_step(sym, gen):
    theta = torch.tensor(0.3)
    x = 0.4 * torch.randn(12, 2, 7, generator=gen)
    x[6:] = 0  # input stops: the neuron drains its membrane
    neuron, ours = IFNeuron(theta, level=8, sym=sym), STBIF(theta, 8, sym, float_out=True)
    n_min, p_max = (-4, 3) if sym else (0, 7)
    assert (neuron.neg_min, neuron.pos_max) == (n_min, p_max)
    expected, v, s = reference.st_bif(x, theta, n_min, p_max, float_out=True)
    for t in range(x.shape[0]):
        out = neuron(x[t])
        assert torch.equal(out, ours(x[t : t + 1])[0]), f"step {t}: compat != STBIF"
        assert torch.equal(out, expected[t]), f"step {t}: compat != reference"
    assert torch.equal(neuron.acc_q, s) and torch.equal(neuron.q, v)
    assert not bool(neuron.is_work), "silent once the input stopped and the count settled"
    neuron.reset()
    assert neuron.acc_q == 0.0 and neuron.is_work is False


def test_ifneuron_official_bound_reassignment():
    neuron = IFNeuron(q_threshold=torch.tensor(1.0), level=torch.tensor(15.0), sym=True)
    neuron.pos_max, neuron.neg_min = torch.tensor(3.0), torch.tensor(-4.0)
    assert (neuron.pos_max, neuron.neg_min) == (3, -4)
    out = neuron(torch.full((3,), 10.0))
    assert torch.equal(out, torch.ones(3)) and int(neuron.acc_q.max()) == 1


def test_softmax_and_layernorm_step_for_step(gen):
    x = torch.randn(6, 2, 3, 9, generator=gen)
    soft, ours_soft = spiking_softmax(), SpikeSoftmax()
    ref_soft = reference.spike_softmax(x)[0]
    ln = Spiking_LayerNorm(9, eps=1e-6)
    with torch.no_grad():
        ln.layernorm.weight.copy_(torch.randn(9, generator=gen))
        ln.layernorm.bias.copy_(torch.randn(9, generator=gen))
    ours_ln = SpikeLayerNorm.from_layernorm(ln.layernorm)
    ref_ln = reference.spike_layernorm(x, ln.layernorm.weight, ln.layernorm.bias, 1e-6)[0]
    for t in range(x.shape[0]):
        out = soft(x[t])
        torch.testing.assert_close(out, ours_soft(x[t : t + 1])[0], rtol=0, atol=0)
        torch.testing.assert_close(out, ref_soft[t], rtol=1e-6, atol=1e-6)
        out = ln(x[t])
        torch.testing.assert_close(out, ours_ln(x[t : t + 1])[0], rtol=0, atol=0)
        torch.testing.assert_close(out, ref_ln[t], rtol=1e-5, atol=1e-5)
    running = x[0]
    for t in range(1, x.shape[0]):
        running = running + x[t]  # the official X = X + input, in step order
    assert_same_bits(soft.X, running, "X")
    assert Spiking_LayerNorm(9).layernorm.eps == 1e-5, "the official default"


def test_lllinear_bias_at_first_step(gen):
    linear = nn.Linear(6, 4)
    theta = torch.tensor(0.25)
    s = torch.randint(-1, 2, (5, 3, 6), generator=gen, dtype=torch.int8)
    layer = LLLinear(linear, neuron_type="ST-BIF", level=8)
    expected = reference.spike_linear(s, linear.weight.detach(), theta, linear.bias.detach())
    with torch.no_grad():
        for t in range(5):
            out = layer(s[t].float() * theta)
            torch.testing.assert_close(out, expected[t], rtol=1e-6, atol=1e-6)
    assert layer.realize_time == 0 and layer.linear is linear
    assert not bool(layer(torch.zeros(3, 6)).any()) and not bool(layer.is_work)


def test_lllinear_if_mode_as_official(gen):
    """The official IF path: the plain linear on a nonzero step; an all-zero step gives the bias
    once (realize_time), then zeros."""
    linear = nn.Linear(6, 4)
    layer = LLLinear(linear, neuron_type="IF", level=8)
    x = torch.randn(3, 6, generator=gen)
    zero = torch.zeros(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=0)
        assert bool(layer.is_work) and layer.realize_time == 1
        torch.testing.assert_close(layer(zero), linear.bias.expand(3, 4), rtol=0, atol=0)
        assert bool(layer.is_work) and layer.realize_time == 0
        assert torch.equal(layer(zero), torch.zeros(3, 4)) and not bool(layer.is_work)
        torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=0)
    layer.reset()
    assert layer.realize_time == 1


def make_qattention(gen, dim=16, heads=2, level=8, tokens=9, batch=2):
    qattn = QAttention(dim, num_heads=heads, qkv_bias=True, level=level)
    with torch.no_grad():
        for lin in (qattn.qkv, qattn.proj):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) / dim**0.5)
            lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=gen))
    theta = torch.tensor(0.2)
    counts = torch.randint(-4, 4, (batch, tokens, dim), generator=gen)
    calibrate(qattn, theta * counts)
    return qattn, theta, counts


def test_sattention_step_for_step(gen):
    qattn, theta, counts = make_qattention(gen)
    sattn = SAttention.from_qattention(qattn, level=8)
    ours = SpikeAttention.from_quant(qattn, theta, float_out=True)
    steps = 40
    t = torch.arange(steps).view(-1, 1, 1, 1)
    spikes = (torch.sign(counts) * (t < counts.abs())).to(torch.int8)
    total = 0
    with torch.no_grad():
        for step in range(steps):
            out = sattn(spikes[step].float() * theta)
            mine = ours(spikes[step : step + 1])[0]
            torch.testing.assert_close(out, mine, rtol=0, atol=0, msg=f"step {step}")
            total = total + out
        expected = qattn(theta * counts)
    assert sattn.T == steps and not bool(sattn.proj_IF.is_work)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)


def test_state_dict_keys_round_trip(gen):
    """The official key lists (spike_quan_layer.py) and load_state_dict round trips."""
    official = {
        SAttention(16, num_heads=2): ["qkv.weight", "proj.weight"],
        SAttention.from_qattention(QAttention(16, 2, qkv_bias=True), level=8): [
            "qkv.linear.weight", "qkv.linear.bias", "proj.linear.weight", "proj.linear.bias"],
        QAttention(16, 2): ["qkv.weight", "quan_q.s", "quan_k.s", "quan_v.s", "proj.weight",
                            "proj.bias", "quan_proj.s", "attn_quan.s", "after_attn_quan.s"],
        Spiking_LayerNorm(16): ["layernorm.weight", "layernorm.bias"],
        IFNeuron(torch.tensor(1.0), 8): [],
        spiking_softmax(): [],
        MyQuan(8, sym=True): ["s"],
        LLLinear(nn.Linear(3, 2), neuron_type="ST-BIF", level=8): ["linear.weight", "linear.bias"],
    }  # fmt: skip
    for module, keys in official.items():
        state = module.state_dict()
        assert list(state) == keys, type(module).__name__
        fresh = {k: torch.randn(v.shape, generator=gen) for k, v in state.items()}
        module.load_state_dict(fresh)
        assert all(torch.equal(module.state_dict()[k], v) for k, v in fresh.items())


def test_myquan():
    q = MyQuan(16, sym=True)
    assert (q.level, q.sym, q.pos_max, q.neg_min) == (16, True, 7, -8)
    assert MyQuan(16).neg_min == 0 and MyQuan(16).pos_max == 15
    x = torch.randn(5)
    assert torch.equal(MyQuan(512, sym=True)(x), x), "level >= 512: no quantization"


class _TimmLikeBlock(nn.Module):
    """timm's Block layout (norm1, attn(qkv, proj), norm2, mlp(fc1, act, fc2)), float."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.num_heads, self.attn.head_dim = heads, dim // heads
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = (
            nn.Linear(dim, 4 * dim),
            nn.ReLU(),
            nn.Linear(4 * dim, dim),
        )

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(self.mlp.act(self.mlp.fc1(self.norm2(x))))


class _TimmLikeViT(nn.Module):
    def __init__(self, dim=16, depth=1, heads=2):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.blocks = nn.ModuleList(_TimmLikeBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):  # timm's: the head reads token 0 after `norm` of every token
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def test_myquan_replace_gives_official_qann_layout():
    model = myquan_replace(_TimmLikeViT(), level=8)
    qvit = QuantViT(img_size=8, patch_size=4, in_chans=3, num_classes=5, embed_dim=16, depth=1,
                    num_heads=2, level=8)  # fmt: skip
    assert isinstance(model.blocks[0].attn, QAttention)
    assert sorted(model.state_dict()) == sorted(qvit.state_dict()), "the QANN checkpoint keys"
    qvit.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="weight_bit"):
        myquan_replace(_TimmLikeViT(), level=8, weight_bit=8)


def test_parity_compares_the_class_token_of_a_timm_layout_norm(gen):
    """A timm-layout QANN's final norm quantizer sees every token, the SNN's neuron the class
    token only: parity compares that row alone. It counted the patch rows too, filled in with
    the QANN's own integers, as agreeing: a broken final neuron showed 95%."""
    qann = myquan_replace(_TimmLikeViT(), level=8)
    calibrate(qann, torch.randn(16, 3, 8, 8, generator=gen))
    snn = convert(qann)
    with torch.no_grad():
        snn.readout.norm.threshold.mul_(3.0)  # the final neuron, broken
    images = torch.randn(2, 3, 8, 8, generator=gen)
    row = next(r for r in parity(qann, snn, images).rows if r.name == "norm.1")
    assert row.numel == 2 * 16, "the class token's channels only"
    assert row.agreement < 0.5, f"a broken neuron agrees on {row.agreement:.0%}"


def test_snnwrapper_and_reset_model(gen):
    qvit = QuantViT(img_size=8, patch_size=4, in_chans=3, num_classes=5, embed_dim=16, depth=1,
                    num_heads=2, level=8)  # fmt: skip
    calibrate(qvit, torch.randn(8, 3, 8, 8, generator=gen))
    images = torch.randn(2, 3, 8, 8, generator=gen)
    wrapper = SNNWrapper(ann_model=qvit, cfg=None, time_step=64, Encoding_type="analog",
                         level=8, neuron_type="ST-BIF", model_name="vit_small",
                         is_softmax=True)  # fmt: skip
    logits, count, per_step = wrapper(images, verbose=True)
    expected, steps = convert(qvit)(images)
    assert count == steps + 1, "counted like the official loop: the first silent step included"
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert per_step.shape == (count, 2, 5) and torch.equal(per_step[-1], logits)
    assert list(wrapper.state_dict()) == ["model." + k for k in qvit.state_dict()]
    reset_model(wrapper)
    assert wrapper.snn.blocks[0].norm1.count is None
    with pytest.raises(ValueError, match="Encoding_type"):
        SNNWrapper(qvit, None, 64, "rate", level=8, neuron_type="ST-BIF", model_name="vit",
                   is_softmax=True)  # fmt: skip


def test_sattention_level_fits_its_int8_counts():
    """At level 256 the attention neuron's count reaches 255: the spike products' int8
    running counts used to fail mid-run (CPU) or wrap (GPU), naming an internal operand."""
    with pytest.raises(ValueError, match=r"level must be an int in \[2, 128\]"):
        SAttention(dim=8, num_heads=2, level=256)
    assert SAttention(dim=8, num_heads=2, level=128).level == 128


def test_snnwrapper_follows_a_loaded_checkpoint(gen):
    """Loading a state_dict after wrapping (a resumed or evaluated checkpoint) used to leave
    the SNN on the old thresholds: its logits were those of neither model."""

    def qann():
        qvit = QuantViT(img_size=8, patch_size=4, in_chans=3, num_classes=5, embed_dim=16,
                        depth=1, num_heads=2, level=8)  # fmt: skip
        return calibrate(qvit, torch.randn(8, 3, 8, 8, generator=gen))

    a, b = qann(), qann()
    first = {k: v.clone() for k, v in a.state_dict().items()}
    images = torch.randn(2, 3, 8, 8, generator=gen)
    want, _ = convert(b)(images)
    wrapper = SNNWrapper(a, None, 64, "analog")
    before, _ = wrapper(images)
    assert not torch.equal(before, want), "the two checkpoints should differ"
    wrapper.load_state_dict({"model." + k: v for k, v in b.state_dict().items()})
    after, _ = wrapper(images)
    torch.testing.assert_close(after, want, rtol=0, atol=0)
    wrapper.model.load_state_dict(first)  # back, through the QANN itself
    torch.testing.assert_close(wrapper(images)[0], before, rtol=0, atol=0)


@CPU_PASS_ONLY  # the wrapper's pass-through; the replayed kernels are test_chunk_graph's
@pytest.mark.parametrize("device", DEVICES)
def test_snnwrapper_replays_cuda_graphs(gen, monkeypatch, device):
    """``SNNWrapper(..., cuda_graph=True)``: the official interface on graph replays (on a
    CPU ``ReplayGraph``, the stand-in), the eager run's bits and step count, one capture per
    batch shape, and a fresh capture for a loaded checkpoint's SNN."""
    from replay_graph import graphs_replayed_on

    from spikekernels.ops._dispatch import force_backend

    def qann():
        qvit = QuantViT(img_size=8, patch_size=4, in_chans=3, num_classes=5, embed_dim=16,
                        depth=1, num_heads=2, level=8)  # fmt: skip
        return calibrate(qvit, torch.randn(8, 3, 8, 8, generator=gen)).to(device)

    a, b = qann(), qann()
    images = torch.randn(3, 3, 8, 8, generator=gen).to(device)
    captured = graphs_replayed_on(device, monkeypatch)
    with force_backend(None):  # a replay runs the kernels it captured
        eager = SNNWrapper(a, None, 64, "analog", chunk=4)(images, verbose=True)
        wrapper = SNNWrapper(a, None, 64, "analog", chunk=4, cuda_graph=True)
        for _ in range(2):
            got = wrapper(images, verbose=True)
            assert got[1] == eager[1] and got[1] > 4, "the premise: replayed chunks"
            assert torch.equal(got[0], eager[0]) and torch.equal(got[2], eager[2])
        assert len(captured) == 1
        wrapper.load_state_dict({"model." + k: v for k, v in b.state_dict().items()})
        want = SNNWrapper(b, None, 64, "analog", chunk=4)(images)
        assert torch.equal(wrapper(images)[0], want[0]) and len(captured) == 2
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        SNNWrapper(a, None, 64, "analog", cuda_graph=1)


def test_reset_model_resets_every_stateful_module(gen):
    """SpikeLinear, SpikeLayerNorm and SpikeSoftmax used to keep their x_acc and t0 through
    a reset: every module with a ``reset()`` is reset, ours, the compat ones and a user's."""
    from spikekernels.nn import SpikeLayerNorm, SpikeLinear, SpikeSoftmax

    class UserState(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def reset(self):
            self.calls += 1

    linear = SpikeLinear.from_linear(nn.Linear(6, 4), 0.5)
    norm = SpikeLayerNorm.from_layernorm(nn.LayerNorm(4))
    softmax = SpikeSoftmax()
    user = UserState()
    model = nn.Sequential(linear, norm, softmax, user)
    s = torch.randint(-1, 2, (3, 2, 6), generator=gen, dtype=torch.int8)
    model[2](model[1](model[0](s)))
    assert linear.t0 == 3 and norm.x_acc is not None and softmax.x_acc is not None
    reset_model(model)
    assert linear.t0 == 0, "SpikeLinear.t0 survived reset_model"
    assert norm.x_acc is None and norm.y_prev is None, "SpikeLayerNorm state survived"
    assert softmax.x_acc is None and softmax.y_prev is None, "SpikeSoftmax state survived"
    assert user.calls == 1

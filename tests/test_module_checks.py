"""The modules reject bad arguments where they are built or called, with a ``TypeError`` or
``ValueError`` that names the argument (not a later unpacking, view or dispatcher error, and
not a silent run on the wrong shape)."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_PASS_ONLY

from spikekernels.nn import (
    STBIF,
    ExactLayerNorm,
    ExactLayerNormNeuron,
    ExactLinear,
    ExactLinearNeuron,
    ExactSoftmax,
    Quantizer,
    SpikeLayerNorm,
    SpikeLayerNormNeuron,
    SpikeLinear,
    SpikeLinearNeuron,
    SpikeMatmul,
    TargetNeuron,
)

# (case, constructor, error type, words the message must contain)
BAD_CONSTRUCTIONS = [
    ("STBIF float_out str", lambda: STBIF(0.5, 8, True, float_out="no"), TypeError, "float_out"),
    ("STBIF signed int", lambda: STBIF(0.5, 8, 1), TypeError, "signed must be a bool"),
    ("target theta < 0", lambda: TargetNeuron(-1.0, 8, True), ValueError, "threshold must be"),
    ("target theta nan", lambda: TargetNeuron(float("nan"), 8, True), ValueError, "finite"),
    (
        "target theta one bad channel",
        lambda: TargetNeuron(torch.tensor([0.5, 0.0]), 8, True),
        ValueError,
        "threshold must be positive",
    ),
    ("target theta str", lambda: TargetNeuron("0.5", 8, True), TypeError, "threshold must be"),
    ("target signed int", lambda: TargetNeuron(0.5, 8, 1), TypeError, "signed must be a bool"),
    ("linear weight 1-D", lambda: SpikeLinear(torch.ones(4), None, 0.5), ValueError, "weight"),
    (
        "linear theta per channel",
        lambda: SpikeLinear(torch.ones(3, 4), None, torch.ones(2)),
        ValueError,
        "in_threshold must be one value",
    ),
    (
        "linear theta < 0",
        lambda: SpikeLinear(torch.ones(3, 4), None, -1.0),
        ValueError,
        "in_threshold must be posit",
    ),
    (
        "linear bias_steps float",
        lambda: SpikeLinear(torch.ones(3, 4), None, 0.5, bias_steps=1.5),
        TypeError,
        "bias_steps must be an int",
    ),
    (
        "linear bias_steps 0",
        lambda: SpikeLinear(torch.ones(3, 4), None, 0.5, bias_steps=0),
        ValueError,
        "bias_steps must be >= 1",
    ),
    (
        "linear neuron bias_steps float",
        lambda: SpikeLinearNeuron(torch.ones(3, 4), None, 0.5, 0.5, 8, True, bias_steps=2.0),
        TypeError,
        "bias_steps must be an int",
    ),
    (
        "linear neuron weight 1-D",
        lambda: SpikeLinearNeuron(torch.ones(4), None, 0.5, 0.5, 8, True),
        ValueError,
        "weight must have 2 dims",
    ),
    *[
        (
            f"exact linear in_threshold {bad}",
            lambda bad=bad: ExactLinear(
                torch.ones(3, 4, dtype=torch.int8), torch.ones(3), None, bad
            ),
            ValueError,
            "in_threshold must be positive",
        )
        for bad in (-0.5, 0.0, float("nan"))
    ],
    (
        "exact linear bias shape",
        lambda: ExactLinear(torch.ones(3, 4, dtype=torch.int8), torch.ones(3), torch.ones(2), 0.5),
        ValueError,
        r"bias must be float32 \(3,\)",
    ),
    (
        "linear neuron in_threshold per channel",
        lambda: SpikeLinearNeuron(torch.ones(3, 4), None, torch.ones(2), 0.5, 8, True),
        ValueError,
        "in_threshold must be one value",
    ),
    ("quantizer level float", lambda: Quantizer(8.0, True), TypeError, "level must be an int"),
    ("quantizer level bool", lambda: Quantizer(True, True), TypeError, "level must be an int"),
    (
        "exact norm channels",
        lambda: ExactLayerNorm(torch.ones(4), None, 1e-6)(torch.randn(2, 3, 5)),
        ValueError,
        r"x must have 4 channels",
    ),
    ("norm channels 0", lambda: SpikeLayerNorm(0), ValueError, "num_channels must be >= 1"),
    ("norm channels float", lambda: SpikeLayerNorm(4.0), TypeError, "num_channels must be"),
    ("norm eps < 0", lambda: SpikeLayerNorm(4, eps=-1.0), ValueError, "eps must be"),
    ("norm eps nan", lambda: SpikeLayerNorm(4, eps=float("nan")), ValueError, "eps must be"),
    (
        "norm weight shape",
        lambda: SpikeLayerNorm(4, weight=torch.ones(3)),
        ValueError,
        r"weight must have shape \(4,\)",
    ),
    (
        "norm neuron eps < 0",
        lambda: SpikeLayerNormNeuron(4, 0.5, 8, True, eps=-1.0),
        ValueError,
        "eps must be",
    ),
    (  # one step's sum, up to 127 K, would pass float32's exact integers
        "exact linear K past MAX_K",
        lambda: ExactLinear(torch.zeros(2, 131072, dtype=torch.int8), torch.ones(2), None, 0.5),
        ValueError,
        "K=131072 input features; at most 131071",
    ),
]


@pytest.mark.parametrize(
    ("case", "build", "error", "words"), BAD_CONSTRUCTIONS, ids=[b[0] for b in BAD_CONSTRUCTIONS]
)
def test_bad_construction_is_rejected(case, build, error, words):
    with pytest.raises(error, match=words):
        build()


@pytest.mark.parametrize(
    "module",
    [lambda: SpikeLayerNorm(4), lambda: SpikeLayerNormNeuron(4, 0.5, 8, True)],
    ids=["norm", "norm_neuron"],
)
def test_unaffine_norm_checks_its_channels(module):
    """Without an affine weight nothing else ties the module to its width: a row of 7
    channels into a norm of 4 must not run."""
    with pytest.raises(ValueError, match=r"x must have 4 channels .* got shape \(2, 2, 7\)"):
        module()(torch.randn(2, 2, 7))


@pytest.mark.parametrize(
    ("x", "words"),
    [
        (torch.zeros(0, 2, 4), "T == 0"),
        (torch.zeros(()), "at least 2 dims"),
        (1.0, "a torch.Tensor"),
    ],
    ids=["T == 0", "0-d", "float"],
)
def test_exact_norm_checks_its_input(x, words):
    with pytest.raises((TypeError, ValueError), match=rf"x (must|has) .*{words}"):
        ExactLayerNorm(torch.rand(4) + 0.5, torch.randn(4), 1e-6)(x)


def test_exact_linear_buffers_follow_the_weight_device():
    """convert() builds the SNN where the QANN is and moves nothing: a buffer the layer makes
    itself (spike_linear's unit scales) must be on its weight's device (it was on the CPU,
    and the exact head failed its first chunk on a GPU). "meta" stands in for the GPU."""
    layer = ExactLinear(
        torch.zeros(3, 4, dtype=torch.int8, device="meta"), torch.ones(3, device="meta"), None,
        torch.tensor(0.5, device="meta"),
    )  # fmt: skip
    assert {name: t.device.type for name, t in layer.named_buffers()} == dict.fromkeys(
        ("weight", "weight_scale", "in_threshold", "unit_scale", "unit"), "meta"
    )


def test_exact_linear_state_and_loaded_steps(gen):
    """ExactLinear names a batch that differs from its accumulator's, and its value follows a
    loaded in_threshold (it kept a product of the two formed at construction)."""
    weight = torch.randint(-127, 128, (3, 4), generator=gen, dtype=torch.int8)
    layer = ExactLinear(weight, torch.rand(3, generator=gen) + 0.1, None, 0.5)
    s = torch.randint(-1, 2, (2, 5, 4), generator=gen, dtype=torch.int8)
    layer(s)
    with pytest.raises(ValueError, match=r"accumulator holds \[5, 3\].*reset\(\)"):
        layer(s[:, :4])
    other = ExactLinear(weight, layer.weight_scale, None, 0.25)
    other.load_state_dict(layer.state_dict())
    layer.reset()
    assert torch.equal(other(s), layer(s))


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
def test_neuron_steps_survive_module_casts(gen, cast):
    """``module.half()`` (or a parent's cast) keeps a neuron's step float32: a threshold
    rounded to half fired other spikes. Half inputs still run, against the float32 step."""
    theta = torch.tensor([0.1, 0.3, 0.7])
    for neuron in (STBIF(theta[0], 8, True), TargetNeuron(theta, 8, True)):
        getattr(neuron, cast)()
        assert neuron.threshold.dtype == torch.float32
        assert torch.equal(neuron.threshold, theta[0] if isinstance(neuron, STBIF) else theta)
    x = torch.randn(6, 4, 3, generator=gen)
    cast_one, plain = STBIF(0.1, 8, True).half(), STBIF(0.1, 8, True)
    assert torch.equal(cast_one(x.half()), plain(x.half()))


@pytest.mark.parametrize(
    "build",
    [
        lambda: SpikeLinear(torch.randn(3, 4), None, 0.1234567),
        lambda: SpikeLinear(
            torch.ones(3, 4, dtype=torch.int8), None, 0.3, weight_scale=torch.rand(3)
        ),
        lambda: ExactLinear(
            torch.ones(3, 4, dtype=torch.int8), torch.rand(3) + 0.1, torch.randn(3), 0.3
        ),
        lambda: ExactLinearNeuron(
            torch.ones(3, 4, dtype=torch.int8), torch.rand(3) + 0.1, torch.randn(3), 0.3,
            TargetNeuron(0.1234567, 8, True),
        ),
        lambda: ExactLayerNorm(torch.rand(4) + 0.5, torch.randn(4), 1e-6),
        lambda: ExactLayerNormNeuron(
            ExactLayerNorm(torch.rand(4) + 0.5, torch.randn(4), 1e-6),
            TargetNeuron(0.1234567, 8, True),
            torch.randn(1, 2, 4, dtype=torch.float64),
            pool=False,
        ),
        lambda: SpikeMatmul(torch.tensor(0.1234567)),
        lambda: ExactSoftmax(torch.tensor(0.1234567)),
    ],
    ids=["spike_linear", "spike_linear_int8", "exact_linear", "exact_linear_neuron", "exact_norm",
         "exact_norm_neuron", "matmul", "softmax"],
)  # fmt: skip
def test_steps_and_scales_survive_module_casts(build):
    """Every module holding a step, a scale or exact mode's float32 operands keeps their
    dtype (and bits) under ``.half()``; other float buffers (a float weight) still cast."""
    module = build()
    before = {name: t.clone() for name, t in module.named_buffers()}
    module.half()
    kept = [name for name in type(module)._FIXED_DTYPE if name in before]
    assert kept, "the module holds none of the buffers the rule keeps"
    for name in kept:
        after = getattr(module, name)
        assert after.dtype == before[name].dtype and torch.equal(after, before[name]), name
    # exact mode's modules hold no float buffer the cast may take: every one keeps its bits
    if type(module).__name__.startswith("Exact"):
        cast = [n for n, t in module.named_buffers() if t.dtype != before[n].dtype]
        assert not cast, f"{cast} took the cast"
    if isinstance(module, SpikeLinear) and before["weight"].is_floating_point():
        assert module.weight.dtype == torch.float16


def _exact_attention(gen):
    from test_exact import TINY, make_exact

    from spikekernels.convert import convert

    return convert(make_exact(gen, **TINY, level=16)).blocks[0].attn


def test_exact_attention_checks_its_input(gen):
    attn = _exact_attention(gen)
    c = attn.dim
    with pytest.raises(ValueError, match=r"ExactAttention expects s of shape \[T, B, N, C\]"):
        attn(torch.zeros(2, 5, c, dtype=torch.int8))
    with pytest.raises(ValueError, match=f"s has {c + 1} channels, the attention expects {c}"):
        attn(torch.zeros(2, 1, 5, c + 1, dtype=torch.int8))
    with pytest.raises(TypeError, match="s must be a torch.Tensor"):
        attn([[0]])


def test_exact_attention_names_a_changed_batch(gen):
    """A second call whose batch differs from the state's: the qkv neuron names the shape
    (it used to fail in a ``view`` of the context count)."""
    attn = _exact_attention(gen)
    c = attn.dim
    s = torch.zeros(1, 2, 5, c, dtype=torch.int8)
    attn(s)
    with pytest.raises(ValueError, match=r"count must have shape \(3, 5, \d+\)"):
        attn(torch.zeros(1, 3, 5, c, dtype=torch.int8), torch.zeros(3, 5, c, dtype=torch.int8))


@CPU_PASS_ONLY  # the module's checks, whatever the backend
@pytest.mark.parametrize("exact", [False, True])
def test_patch_embedding_checks_before_its_neuron_moves(gen, exact):
    """A bad call (no steps, patches of the wrong width) is refused by name before the patch
    neuron takes any state: the next good call runs as on a fresh model."""
    from test_exact import TINY, images, make_exact

    from spikekernels import convert
    from spikekernels.models import QuantViT, calibrate

    if exact:
        qann = make_exact(gen, **TINY, level=16)
    else:
        qann = calibrate(QuantViT(**TINY, level=16), torch.randn(4, 3, 8, 8, generator=gen))
    snn = convert(qann)
    x = images(gen, qann, 2)
    want = snn.step_chunk(snn.patch_embed.first_step(x), 3)
    snn.reset()
    patches = snn.patch_embed.first_step(x)
    for bad, steps, error, words in (
        (patches, 0, ValueError, "steps must be >= 1"),
        (patches, 2.0, TypeError, "steps must be an int"),
        (patches[..., :-1], 3, ValueError, r"patches must be \[B, "),
        (patches[0], 3, ValueError, r"patches must be \[B, "),
    ):
        with pytest.raises(error, match=words):
            snn.step_chunk(bad, steps)
    assert torch.equal(snn.step_chunk(patches, 3), want)

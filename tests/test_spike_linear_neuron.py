"""spike_linear_neuron (float mode, SPEC.md §6 then §2): bit for bit against the reference
composition whenever the linear's sums are exact (dyadic weights), within the float32
summation bound otherwise; and the exact bf16 split of a float32 weight it runs on."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, assert_same_bits, call_on

from spikekernels import reference
from spikekernels.kernels import use_triton
from spikekernels.nn import STBIF, SpikeLinear, SpikeLinearNeuron
from spikekernels.ops import spike_linear_neuron, split_weight_bf16x3
from spikekernels.ops._dispatch import force_backend
from spikekernels.ops.weight_split import merge_bf16x3

U = 2.0**-24  # float32 unit roundoff
FORMS = ["float32", "split", "bfloat16", "float16"]


def _spikes(gen, T, lead, k, density=0.5):
    """Ternary spikes with silent rows, a silent step (T > 2) and silent row tiles."""
    s = torch.randint(-1, 2, (T, *lead, k), generator=gen, dtype=torch.int8)
    s = s * (torch.rand((T, *lead, k), generator=gen) < density)
    s = s * (torch.rand((T, *lead, 1), generator=gen) < 0.7)
    if T > 2:
        s[1] = 0
    return s


def _dyadic_weight(gen, n, k):
    """``k / 2^8`` with ``|k| <= 20``: exact in bf16 and fp16, and every partial sum of
    ``s @ W^T`` is exact in float32, so the summation order cannot matter."""
    return torch.randint(-20, 21, (n, k), generator=gen).to(torch.float32) / 256


def _as_form(w, form):
    """The float32 weight ``w`` as the op takes it in ``form``."""
    if form == "split":
        return split_weight_bf16x3(w)
    return w.to(getattr(torch, form))


def _thresholds(gen, n, per_channel):
    if per_channel:  # a qkv output: three neurons, each threshold repeated over its block
        return (0.02 + 0.05 * torch.rand(3, generator=gen)).repeat_interleave(-(-n // 3))[:n]
    return torch.tensor([0.02 + 0.05 * torch.rand((), generator=gen).item()])


def _layer(gen, n, k, *, per_channel=False, bias=True):
    return dict(
        weight=_dyadic_weight(gen, n, k),
        in_threshold=torch.tensor(0.3 + 0.5 * torch.rand((), generator=gen).item()),
        threshold=_thresholds(gen, n, per_channel),
        bias=0.1 * torch.randn(n, generator=gen) if bias else None,
    )


def _run(s, layer, n_min, p_max, form="float32", device="cpu", **kwargs):
    def dev(t):
        return None if t is None else t.to(device)

    state = {key: dev(kwargs.pop(key, None)) for key in ("v", "count")}
    return spike_linear_neuron(
        s.to(device),
        _as_form(layer["weight"], form).to(device),
        dev(layer["in_threshold"]),
        dev(layer["threshold"]),
        n_min,
        p_max,
        dev(layer["bias"]),
        **state,
        **kwargs,
    )


def _reference(s, layer, n_min, p_max, *, t0=0, bias_steps=1, v=None, count=None, **kwargs):
    return reference.spike_linear_neuron(
        s,
        layer["weight"],
        layer["in_threshold"],
        layer["threshold"],
        n_min,
        p_max,
        layer["bias"],
        t0,
        bias_steps,
        v,
        count,
        **kwargs,
    )


def _assert_same(got, want):
    for name, g, w in zip(("spikes", "v", "count"), got, want, strict=True):
        g = g.cpu()
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert_same_bits(g, w, name)  # float state too: -0.0 is not +0.0


# (leading dims, K, N): K and N not multiples of the tile, rows not a multiple of BLOCK_M,
# and every dim a multiple of its tile (the K loop without masks)
SHAPES = [((1,), 1, 1), ((3,), 45, 37), ((2, 19), 33, 50), ((40,), 70, 17), ((2, 16), 64, 48)]


class TestWeightSplit:
    def test_parts_sum_exactly(self, gen):
        big = torch.finfo(torch.float32).max
        special = torch.tensor(
            [0.0, -0.0, 2.0**-103, -(2.0**-103), 1.0 - 2.0**-24, big, -big, 3.3e38, 1e30, 1e-30]
        )
        normal = torch.randn(500, generator=gen) * torch.logspace(-20, 20, 500)
        weight = torch.cat([special, normal]).reshape(10, 51)
        parts = split_weight_bf16x3(weight)
        assert parts.dtype == torch.bfloat16 and parts.shape == (3, 10, 51)
        assert torch.isfinite(parts).all()
        assert torch.equal(merge_bf16x3(parts), weight)
        # the float32 sum in any order, and float64, give the weight back
        p = parts.to(torch.float32)
        assert torch.equal(p[0] + (p[1] + p[2]), weight)
        assert torch.equal(parts.to(torch.float64).sum(0), weight.to(torch.float64))
        nearest = weight.abs() < 3.38e38  # the rest would round to inf: truncated instead
        assert torch.equal(parts[0][nearest], weight[nearest].to(torch.bfloat16))
        assert torch.signbit(parts[0].reshape(-1)[1]), "-0 keeps its sign in the first part"

    @pytest.mark.parametrize(
        ("value", "words"),
        [
            (1e-40, "below 2\\^-103"),
            (2.0**-104, "below 2\\^-103"),
            (float("inf"), "weight must be finite"),
            (float("nan"), "weight must be finite"),
        ],
    )
    def test_rejects_what_it_cannot_split(self, value, words):
        weight = torch.ones(3, 4)
        weight[1, 2] = value
        with pytest.raises(ValueError, match=words):
            split_weight_bf16x3(weight)

    def test_meta_weight_gives_the_parts_shape(self):
        parts = split_weight_bf16x3(torch.empty(5, 7, device="meta"))
        assert parts.is_meta and parts.shape == (3, 5, 7) and parts.dtype == torch.bfloat16

    def test_rejects_other_forms(self):
        with pytest.raises(TypeError, match="weight must have dtype"):
            split_weight_bf16x3(torch.ones(3, 4, dtype=torch.float16))
        with pytest.raises(ValueError, match="weight must have 2 dims"):
            split_weight_bf16x3(torch.ones(2, 3, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("lead", "k", "n"), SHAPES)
@pytest.mark.parametrize("T", [1, 5])
def test_bit_exact_with_dyadic_weights(gen, device, form, T, lead, k, n):
    layer = _layer(gen, n, k)
    s = _spikes(gen, T, lead, k)
    got = _run(s, layer, -8, 7, form, device)
    _assert_same(got, _reference(s, layer, -8, 7))
    if k > 1:
        assert got[0].abs().sum() > 0, "a test with no spikes out checks little"


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("form", ["float32", "split"])
def test_every_backend_matches_the_reference(gen, backend, form):
    """Each backend pinned in turn, with incoming state and per-channel thresholds."""
    layer = _layer(gen, 37, 45, per_channel=True)
    s = _spikes(gen, 4, (2, 9), 45)
    v = torch.rand(2, 9, 37, generator=gen) * 1.5 - 0.25
    count = torch.randint(-8, 8, (2, 9, 37), generator=gen, dtype=torch.int16)
    with force_backend(backend):
        got = _run(s, layer, -8, 7, form, t0=1, bias_steps=3, v=v, count=count)
    _assert_same(got, _reference(s, layer, -8, 7, t0=1, bias_steps=3, v=v, count=count))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("n_min", "p_max", "float_out"), [(-16, 15, False), (0, 15, True)])
def test_per_channel_thresholds_and_float_out(gen, device, n_min, p_max, float_out):
    layer = _layer(gen, 48, 40, per_channel=True)
    s = _spikes(gen, 6, (3, 11), 40)
    got = _run(s, layer, n_min, p_max, "split", device, float_out=float_out)
    _assert_same(got, _reference(s, layer, n_min, p_max, float_out=float_out))
    if float_out:
        assert got[0].dtype == torch.float32
        theta = layer["threshold"]
        assert set(got[0].cpu().unique().tolist()) <= {0.0, *theta.tolist(), *(-theta).tolist()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias_steps", [1, 3, 20])
def test_chunked_equals_whole(gen, device, bias_steps):
    layer = _layer(gen, 29, 70, per_channel=True)
    s = _spikes(gen, 12, (2, 21), 70)
    whole = _run(s, layer, -16, 15, "split", device, bias_steps=bias_steps)
    _assert_same(whole, _reference(s, layer, -16, 15, bias_steps=bias_steps))
    spikes, v, count, t0 = [], None, None, 0
    for chunk in s.split([5, 1, 6]):
        out, v, count = _run(
            chunk, layer, -16, 15, "split", device, t0=t0, bias_steps=bias_steps, v=v, count=count
        )
        spikes.append(out)
        t0 += chunk.shape[0]
    _assert_same((torch.cat(spikes), v, count), [w.cpu() for w in whole])


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("count_dtype", [torch.int8, torch.int16])
@pytest.mark.parametrize("poisoned", [False, True])
def test_inplace_equals_fresh(gen, backend, count_dtype, poisoned, request):
    """``inplace=True``: chunks fed back in place (advancing ``t0``), from a nonzero state,
    give the whole run's bits; ``v`` and ``count`` stay the same tensors at the same
    addresses (what a CUDA graph replays), the count in the dtype it came in, and the
    activity flags are still recorded."""
    if poisoned:
        request.getfixturevalue("poisoned_allocations")
    layer = _layer(gen, 37, 45, per_channel=True)
    s = _spikes(gen, 9, (2, 9), 45)
    v0 = torch.rand(2, 9, 37, generator=gen) * 1.5 - 0.25
    count0 = torch.randint(-8, 8, (2, 9, 37), generator=gen).to(count_dtype)
    active = torch.zeros(9, 2, dtype=torch.int32)
    kwargs = dict(form="split", bias_steps=3)
    with force_backend(backend):
        whole = _run(s, layer, -8, 7, **kwargs, v=v0, count=count0)
        v, count = v0.clone(), count0.clone()
        where = v.data_ptr(), count.data_ptr()
        spikes = []
        for t0, n in ((0, 4), (4, 1), (5, 4)):
            chunk, flags = s[t0 : t0 + n], active[t0 : t0 + n]
            out = spike_linear_neuron(
                chunk, split_weight_bf16x3(layer["weight"]), layer["in_threshold"],
                layer["threshold"], -8, 7, layer["bias"], t0=t0, bias_steps=3, v=v,
                count=count, active=flags, inplace=True,
            )  # fmt: skip
            assert out[1] is v and out[2] is count
            spikes.append(out[0])
    assert (v.data_ptr(), count.data_ptr()) == where
    _assert_same((torch.cat(spikes), v, count), whole)
    _assert_same(whole, _reference(s, layer, -8, 7, bias_steps=3, v=v0, count=count0))
    assert count.dtype == count_dtype
    fired = (whole[0] != 0).reshape(9, 2, -1).any(-1).to(torch.int32)
    assert fired.any() and torch.equal(active, fired)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_single_step(gen, device):
    layer = _layer(gen, 21, 30)
    s = _spikes(gen, 1, (3, 5), 30)
    v = torch.full((3, 5, 21), 0.5, device=device)
    count = torch.zeros((3, 5, 21), dtype=torch.int8, device=device)
    got = _run(s, layer, -8, 7, "float32", device, v=v, count=count, inplace=True)
    assert got[1] is v and got[2] is count
    _assert_same((got[0], v, count), _reference(s, layer, -8, 7))


def test_inplace_on_meta_tensors():
    """Shapes only (meta tensors): the in-place state is not taken for an alias of the inputs
    (every meta tensor's address is 0)."""
    meta = dict(device="meta")
    s = torch.empty(3, 2, 5, 12, dtype=torch.int8, **meta)
    weight, theta = torch.empty(7, 12, **meta), torch.tensor(0.3, **meta)
    v, count = torch.empty(2, 5, 7, **meta), torch.empty(2, 5, 7, dtype=torch.int16, **meta)
    spikes, got_v, got_count = spike_linear_neuron(
        s, weight, theta, theta, -8, 7, v=v, count=count, inplace=True
    )
    assert got_v is v and got_count is count
    assert spikes.shape == (3, 2, 5, 7) and spikes.is_meta and spikes.dtype == torch.int8


@pytest.mark.parametrize("device", DEVICES)
def test_silent_tiles_next_to_active_ones(gen, device):
    """Whole silent steps, silent row tiles and single active rows side by side; a membrane
    left above 1 keeps firing through silent steps, and the bias arrives on them."""
    layer = _layer(gen, 21, 50)
    s = _spikes(gen, 6, (2, 40), 50)
    s[0] = 0
    s[3] = 0
    s[:, :, :16] = 0  # the first row tile of each sample, silent at every step
    s[2, 1, 5, 7] = 1  # one active row in an otherwise silent tile
    v = torch.full((2, 40, 21), 4.5)  # several spikes owed, whatever the input
    count = torch.zeros((2, 40, 21), dtype=torch.int8)
    got = _run(s, layer, -8, 7, "float32", device, bias_steps=2, v=v, count=count)
    _assert_same(got, _reference(s, layer, -8, 7, bias_steps=2, v=v, count=count))
    assert (got[0][0].cpu() == 1).all(), "a silent first step still fires the owed spikes"


def _float_tolerance(s, w, theta_in, theta, k):
    """A bound on ``|y_got - y_ref| / theta``: both sums of K exact products carry at most
    ``~K u`` of ``sum |terms|`` (recursive or blocked), plus the theta_in product, the
    bias add and the division: ``(2 (K + 2) u mag + 4 u |y|) / theta``, then a few ulps of v."""
    mag = theta_in.to(torch.float64) * torch.matmul(
        s.abs().to(torch.float64), w.abs().to(torch.float64).t()
    )
    return 2 * (2 * (k + 2) * U * mag) / theta.to(torch.float64) + 16 * U


@pytest.mark.parametrize("form", ["float32", "split"])
@pytest.mark.parametrize("device", DEVICES)
def test_random_float32_weights_within_summation_error(gen, device, form):
    # tensor-core float32 accumulation may truncate instead of round: twice the bound there
    _check_random_weights(gen, device, form, 2.0 if device == "cuda" else 1.0)


def _check_random_weights(gen, device, form, slack, rows=(4, 37), k=200, n=70):
    s = _spikes(gen, 1, rows, k)
    w = 0.05 * torch.randn(n, k, generator=gen)
    layer = dict(
        weight=w,
        in_threshold=torch.tensor(0.4),
        threshold=_thresholds(gen, n, True),
        bias=0.1 * torch.randn(n, generator=gen),
    )
    spikes, v, count = (t.cpu() for t in _run(s, layer, -8, 7, form, device))
    want_spikes, want_v, _ = _reference(s, layer, -8, 7)
    tol = slack * _float_tolerance(s[0], w, layer["in_threshold"], layer["threshold"], k)
    tol = tol + 4 * U * want_v.abs().to(torch.float64)
    # The membrane before firing (v + sigma: one step from v = 0.5) on every element: after
    # firing it differs by 1 where the two sums put it on either side of a threshold.
    before = want_v.to(torch.float64) + want_spikes[0].to(torch.float64)
    err = (v.to(torch.float64) + spikes[0].to(torch.float64) - before).abs()
    assert (err <= tol).all(), f"membrane beyond the bound: max err {err.max():.3g}"
    # spikes agree wherever the membrane before firing is not within tolerance of 0 or 1
    clear = ((before - 1).abs() > tol) & (before.abs() > tol)
    assert clear.float().mean() > 0.9
    assert torch.equal(spikes[0][clear], want_spikes[0][clear])
    assert torch.equal(count, spikes[0].to(count.dtype))


def test_every_output_element_is_written(gen, poisoned_allocations):
    layer = _layer(gen, 35, 50, per_channel=True)
    s = _spikes(gen, 3, (21,), 50, density=0.9)
    for float_out in (False, True):
        got = _run(s, layer, -8, 7, "split", float_out=float_out, bias_steps=2)
        _assert_same(got, _reference(s, layer, -8, 7, bias_steps=2, float_out=float_out))


def _good_args() -> dict:
    return dict(
        s=torch.zeros(2, 3, 4, dtype=torch.int8),
        weight=torch.zeros(5, 4),
        in_threshold=torch.tensor(0.5),
        threshold=torch.tensor(0.25),
        n_min=-8,
        p_max=7,
        bias=torch.zeros(5),
    )


BAD_INPUTS = [  # (case, what replaces the good arguments, error type, words in the message)
    ("int8 weight", dict(weight=torch.zeros(5, 4, dtype=torch.int8)), TypeError, "exact_linear"),
    ("int32 weight", dict(weight=torch.zeros(5, 4, dtype=torch.int32)), TypeError, "weight"),
    ("3-d float32", dict(weight=torch.zeros(3, 5, 4)), ValueError, "weight must have 2 dims"),
    (
        "4-part split",
        dict(weight=torch.zeros(4, 5, 4, dtype=torch.bfloat16)),
        ValueError,
        "split_weight_bf16x3",
    ),
    ("K mismatch", dict(weight=torch.zeros(5, 6)), ValueError, "K=4 .* K=6"),
    ("NaN weight", dict(weight=torch.full((5, 4), float("nan"))), ValueError, "weight must be fin"),
    ("float s", dict(s=torch.zeros(2, 3, 4)), TypeError, "s must have dtype"),
    ("T == 0", dict(s=torch.zeros(0, 3, 4, dtype=torch.int8)), ValueError, "T == 0"),
    ("2 in thresholds", dict(in_threshold=torch.ones(2)), ValueError, "in_threshold must have"),
    ("theta wrong N", dict(threshold=torch.ones(4)), ValueError, r"threshold must have one"),
    ("theta <= 0", dict(threshold=torch.zeros(5)), ValueError, "threshold must be positive"),
    ("in theta nan", dict(in_threshold=torch.tensor(float("nan"))), ValueError, "in_threshold"),
    ("bias wrong N", dict(bias=torch.zeros(4)), ValueError, r"bias must have shape \(5,\)"),
    ("inverted bounds", dict(n_min=1, p_max=0), ValueError, "inverted"),
    ("float bound", dict(p_max=7.0), TypeError, "p_max must be an int"),
    ("v only", dict(v=torch.zeros(3, 5)), ValueError, "both v and count"),
    (
        "v shape",
        dict(v=torch.zeros(3, 4), count=torch.zeros(3, 4, dtype=torch.int8)),
        ValueError,
        "v must have shape",
    ),
    (
        "count float",
        dict(v=torch.zeros(3, 5), count=torch.zeros(3, 5)),
        TypeError,
        "count must have dtype",
    ),
    (
        "count out of bounds",
        dict(v=torch.zeros(3, 5), count=torch.full((3, 5), 9, dtype=torch.int8)),
        ValueError,
        "count must lie in",
    ),
    ("negative t0", dict(t0=-1), ValueError, "t0"),
    ("bias_steps 0", dict(bias_steps=0), ValueError, "bias_steps must be >= 1"),
    ("weight elsewhere", dict(weight=torch.zeros(5, 4, device="meta")), ValueError, "weight is"),
    ("non-ternary", dict(s=torch.full((2, 3, 4), 2, dtype=torch.int8)), ValueError, "ternary"),
    (
        "inplace int",
        dict(v=torch.zeros(3, 5), count=torch.zeros(3, 5, dtype=torch.int8), inplace=1),
        TypeError,
        "inplace must be a bool",
    ),
    ("inplace without state", dict(inplace=True), ValueError, "inplace=True needs v"),
    (
        "inplace strided v",
        dict(v=torch.zeros(5, 3).t(), count=torch.zeros(3, 5, dtype=torch.int8), inplace=True),
        ValueError,
        "v must be contiguous",
    ),
    (
        "inplace strided count",
        dict(v=torch.zeros(3, 5), count=torch.zeros(5, 3, dtype=torch.int8).t(), inplace=True),
        ValueError,
        "count must be contiguous",
    ),
]


@pytest.mark.parametrize("state", ["v", "count"])
@pytest.mark.parametrize("other", ["s", "weight", "bias", "active", "the other state"])
def test_inplace_state_sharing_an_input_is_rejected(state, other):
    """A contiguous state inside the storage of an input the kernel reads (or writes), or of
    the other state: refused, and nothing written."""
    buffer = torch.zeros(64, dtype=torch.float32)
    inside = {
        "s": buffer.view(torch.int8)[:24].view(2, 3, 4),
        "weight": buffer[:20].view(5, 4),
        "bias": buffer[:5],
        "active": buffer.view(torch.int32)[:6].view(2, 3),
        "v": buffer[:15].view(3, 5),
        "count": buffer.view(torch.int8)[:15].view(3, 5),
    }
    args = _good_args()
    args |= dict(v=torch.zeros(3, 5), count=torch.zeros(3, 5, dtype=torch.int8))
    args["active"] = torch.zeros(2, 3, dtype=torch.int32)
    if other == "the other state":
        other = "count" if state == "v" else "v"
    args[other], args[state] = inside[other], inside[state]  # contiguous, but overlapping
    # the targets are checked last first: of two overlapping states, v is the one named
    named = "v" if other in ("v", "count") else state
    with pytest.raises(ValueError, match=f"{named} shares memory"):
        spike_linear_neuron(**args, inplace=True)
    assert not buffer.any(), "a rejected call must not write"
    assert not any(t.any() for t in (args["v"], args["count"], args["active"]))


@pytest.mark.parametrize(
    ("case", "bad", "error", "words"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_is_rejected(case, bad, error, words, device):
    with pytest.raises(error, match=words):
        call_on(device, spike_linear_neuron, **{**_good_args(), **bad})


@pytest.mark.parametrize("inplace", [False, True])
def test_opcheck(gen, inplace):
    layer = _layer(gen, 7, 12, per_channel=True)
    s = _spikes(gen, 3, (2, 5), 12)
    args = (
        s,
        split_weight_bf16x3(layer["weight"]),
        layer["in_threshold"],
        layer["threshold"],
        -8,
        7,
        layer["bias"],
        1,
        3,
        torch.full((2, 5, 7), 0.5),
        torch.zeros((2, 5, 7), dtype=torch.int8),
        True,
        torch.zeros(3, 2, dtype=torch.int32) if inplace else None,
        inplace,
    )
    torch.library.opcheck(torch.ops.spikekernels.spike_linear_neuron.default, args)


class TestSpikeLinearNeuronModule:
    def _qann(self, gen, n=30, k=24):
        linear = torch.nn.Linear(k, n)
        with torch.no_grad():
            linear.weight.copy_(_dyadic_weight(gen, n, k))
        neurons = [STBIF(0.03 + 0.01 * i, 16, True) for i in range(3)]
        return linear, neurons

    def test_is_a_neuron_and_chunks_equal_one_call(self, gen):
        linear, neurons = self._qann(gen)
        s = _spikes(gen, 7, (2, 5), 24)
        whole = SpikeLinearNeuron.from_linear_and_neuron(linear, neurons, 0.4, bias_steps=2)
        chunked = SpikeLinearNeuron.from_linear_and_neuron(linear, neurons, 0.4, bias_steps=2)
        assert isinstance(whole, STBIF)
        assert whole.weight.data_ptr() == linear.weight.data_ptr(), "shares the QANN's weight"
        out = whole(s)
        parts = torch.cat([chunked(c) for c in s.split([1, 4, 2])])
        layer = dict(
            weight=linear.weight.detach(),
            in_threshold=torch.tensor(0.4),
            threshold=torch.tensor([0.03, 0.04, 0.05]).repeat_interleave(10),
            bias=linear.bias.detach(),
        )
        want = _reference(s, layer, -8, 7, bias_steps=2)
        _assert_same((out, whole.v, whole.count), want)
        _assert_same((parts, chunked.v, chunked.count), want)
        assert whole.t0 == chunked.t0 == 7
        assert bool(whole.silent()) == (not bool(out[-1].any()))
        whole.reset()
        assert whole.t0 == 0 and whole.count is None
        _assert_same((whole(s), whole.v, whole.count), want)

    def test_from_spike_linear(self, gen):
        linear, neurons = self._qann(gen)
        spike_linear = SpikeLinear.from_linear(linear, 0.35, bias_steps=3)
        module = SpikeLinearNeuron.from_linear_and_neuron(spike_linear, neurons[0])
        assert module.bias_steps == 3 and module.threshold.shape == ()
        s = _spikes(gen, 4, (3,), 24)
        layer = dict(
            weight=linear.weight.detach(),
            in_threshold=torch.tensor(0.35),
            threshold=neurons[0].threshold,
            bias=linear.bias.detach(),
        )
        _assert_same((module(s), module.v, module.count), _reference(s, layer, -8, 7, bias_steps=3))

    def test_split_follows_the_weight(self, gen):
        """The cached split is the current weight's after an in-place update of the QANN's
        weight and after ``load_state_dict`` into the SNN: never stale."""
        linear, neurons = self._qann(gen)
        module = SpikeLinearNeuron.from_linear_and_neuron(linear, neurons[0], 0.4)
        if not use_triton(module.weight):
            pytest.skip("the split is cached only where the Triton kernels run")
        first = module.kernel_weight()
        assert module.kernel_weight() is first, "cached while the weight is unchanged"
        assert torch.equal(first, split_weight_bf16x3(linear.weight.detach()))
        with torch.no_grad():
            linear.weight.mul_(2)
        assert torch.equal(module.kernel_weight(), split_weight_bf16x3(linear.weight.detach()))
        state = {**module.state_dict(), "weight": _dyadic_weight(gen, 30, 24)}
        module.load_state_dict(state)
        assert torch.equal(module.kernel_weight(), split_weight_bf16x3(state["weight"]))
        s = _spikes(gen, 3, (4,), 24)
        layer = dict(
            weight=state["weight"],
            in_threshold=torch.tensor(0.4),
            threshold=neurons[0].threshold,
            bias=linear.bias.detach(),
        )
        _assert_same((module(s), module.v, module.count), _reference(s, layer, -8, 7))

    def test_bad_construction(self, gen):
        linear, neurons = self._qann(gen)
        with pytest.raises(ValueError, match="in_threshold"):
            SpikeLinearNeuron.from_linear_and_neuron(linear, neurons[0])
        with pytest.raises(ValueError, match="evenly"):
            SpikeLinearNeuron.from_linear_and_neuron(linear, neurons[:2] * 2, 0.4)
        with pytest.raises(ValueError, match="threshold must be positive"):
            SpikeLinearNeuron(linear.weight, None, 0.4, torch.tensor([0.1, 0.0] * 15), 16, True)


@pytest.mark.cuda
@pytest.mark.parametrize("form", FORMS)
def test_cuda_bit_exact_at_vit_size(gen, form):
    """Many row, column and K tiles on the GPU, most rows silent: dyadic weights keep every
    sum exact, so tensor-core accumulation changes nothing."""
    layer = _layer(gen, 1152, 384, per_channel=True)
    s = _spikes(gen, 4, (2, 197), 384, density=0.1)
    got = _run(s, layer, -8, 7, form, "cuda", bias_steps=2)
    _assert_same(got, _reference(s, layer, -8, 7, bias_steps=2))


@pytest.mark.cuda
@pytest.mark.parametrize("form", ["float32", "split"])
def test_cuda_random_weights(gen, form):
    """Tensor-core float32 accumulation may truncate instead of round: twice the bound."""
    _check_random_weights(gen, "cuda", form, 2.0, rows=(2, 197), k=384, n=1152)

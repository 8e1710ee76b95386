"""exact_linear (SPEC.md §9.2-§9.4): the fused integer linear + target-driven neuron against
the step-by-step reference, bit for bit, on every backend (Triton through the interpreter,
vectorised PyTorch, the oracle)."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICES, TRITON_DEVICES, assert_same_bits, call_on

from spikekernels import reference
from spikekernels.kernels import exact_linear as el
from spikekernels.kernels.tile_flags import any_nonzero_by
from spikekernels.nn import ExactLinearNeuron, TargetNeuron
from spikekernels.ops import exact_linear
from spikekernels.ops._dispatch import backend_for, force_backend
from spikekernels.ops.exact_linear import MAX_K


def _layer(gen, n, k, *, per_channel=False, bias=True, device="cpu"):
    """An integer-weight linear (SPEC.md §9.1) and the two thresholds around it, scaled so
    that the output neuron's targets span several levels."""
    weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    ws = 0.002 + 0.01 * torch.rand(n, generator=gen)
    b = 0.5 * torch.randn(n, generator=gen) if bias else None
    theta_in = torch.tensor(0.1 + torch.rand((), generator=gen).item())
    if per_channel:  # a qkv output: three neurons, each threshold repeated over its block
        theta = (0.05 + 0.3 * torch.rand(3, generator=gen)).repeat_interleave(-(-n // 3))[:n]
    else:
        theta = torch.tensor(0.05 + 0.3 * torch.rand((), generator=gen).item())
    tensors = dict(weight=weight, weight_scale=ws, bias=b, in_threshold=theta_in, threshold=theta)
    return {name: None if t is None else t.to(device) for name, t in tensors.items()}


def _spikes(gen, T, lead, k, device="cpu", density=0.5):
    """Ternary spikes with silent rows, a silent step (T > 2), and silent row tiles."""
    s = torch.randint(-1, 2, (T, *lead, k), generator=gen, dtype=torch.int8)
    s = s * (torch.rand((T, *lead, k), generator=gen) < density)
    s = s * (torch.rand((T, *lead, 1), generator=gen) < 0.7)
    if T > 2:
        s[1] = 0
    return s.to(device)


def _random_state(gen, s, n):
    """A mid-run call on spikes ``s`` ``[T, *, K]`` with ``N = n`` outputs: ``(s_count,
    count)``, the input neuron's count after these steps (a count in +-40 before them, so
    the starting accumulator is in the thousands, plus the spikes) and the output count in
    +-8."""
    before = torch.randint(-40, 41, s.shape[1:], generator=gen, dtype=torch.int32)
    s_count = (before.to(s.device) + s.sum(0, dtype=torch.int32)).to(torch.int8)
    count = torch.randint(-8, 8, (*s.shape[1:-1], n), generator=gen, dtype=torch.int8)
    return s_count, count.to(s.device)


def _chunks(s, sizes, before=None):
    """``s`` split into chunks of ``sizes``, each with the input neuron's count after it, from
    ``before`` (fresh 0): what a caller passes as ``s_count``, chunk by chunk."""
    total = torch.zeros(s.shape[1:], dtype=torch.int32, device=s.device)
    if before is not None:
        total += before
    out = []
    for part in s.split(sizes):
        total = total + part.sum(0, dtype=torch.int32)
        out.append((part, total.to(torch.int8)))
    return out


def _assert_same(got, want):
    for name, g, w in zip(("spikes", "count"), got, want, strict=True):
        assert_same_bits(g, w, name)


def _reference(s, layer, n_min, p_max, s_count=None, count=None):
    def cpu(t):
        return None if t is None else t.cpu()

    return reference.exact_linear(
        s.cpu(),
        *(cpu(layer[name]) for name in ("weight", "weight_scale", "bias", "in_threshold")),
        cpu(layer["threshold"]),
        n_min,
        p_max,
        cpu(s_count),
        cpu(count),
    )


def _run(s, layer, n_min, p_max, s_count=None, count=None, **kwargs):
    return exact_linear(
        s,
        layer["weight"],
        layer["weight_scale"],
        layer["bias"],
        layer["in_threshold"],
        layer["threshold"],
        n_min,
        p_max,
        s_count,
        count,
        **kwargs,
    )


# (leading dims, K, N): K and N not multiples of 16, single rows/columns, several tiles, and
# every dim a multiple of its tile (the K loop without masks)
SHAPES = [((1,), 1, 1), ((3,), 45, 37), ((2, 19), 33, 50), ((2, 3, 7), 16, 64), ((40,), 130, 17),
          ((2, 16), 64, 48)]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("lead", "k", "n"), SHAPES)
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize(("n_min", "p_max"), [(-8, 7), (0, 15), (-128, 127)])
def test_bit_exact(gen, device, n_min, p_max, T, lead, k, n):
    layer = _layer(gen, n, k, device=device)
    s = _spikes(gen, T, lead, k, device)
    got = _run(s, layer, n_min, p_max)
    _assert_same(got, _reference(s, layer, n_min, p_max))
    assert set(got[0].unique().tolist()) <= {-1, 0, 1}


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_every_backend_matches_the_reference(gen, backend):
    """Each backend pinned in turn (one that cannot run here falls back to torch)."""
    layer = _layer(gen, 37, 45, per_channel=True)
    s = _spikes(gen, 4, (2, 9), 45)
    s_count, count = _random_state(gen, s, 37)
    with force_backend(backend):
        got = _run(s, layer, -8, 7, s_count, count)
    _assert_same(got, _reference(s, layer, -8, 7, s_count, count))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_per_channel_thresholds(gen, device, bias):
    layer = _layer(gen, 48, 40, per_channel=True, bias=bias, device=device)
    s = _spikes(gen, 6, (3, 11), 40, device)
    _assert_same(_run(s, layer, -16, 15), _reference(s, layer, -16, 15))


@pytest.mark.parametrize("device", DEVICES)
def test_values_on_rounding_steps(gen, device):
    """Thresholds of twice the value scale, ``theta = 2 fl(theta_in ws)``, and biases of
    whole multiples of that scale put every odd accumulator (plus the bias's multiple) within
    an ulp of a rounding tie of the target, where the kernels' division-free estimate must
    give way to the division (kernels.target). Input spikes at the first step only and
    weights in {-1, 0, 1} hold each accumulator small and fixed, so the counts reach their
    targets and the late steps decide ties only; channels of ordinary thresholds share the
    tiles. Bit-exact against the reference."""
    layer = _layer(gen, 50, 24, per_channel=True)
    layer["weight"] = torch.randint(-1, 2, (50, 24), generator=gen, dtype=torch.int8)
    scale = (layer["in_threshold"].float() * layer["weight_scale"].float()).float()
    on_ties = torch.arange(50) % 2 == 0
    layer["threshold"] = torch.where(on_ties, 2 * scale, layer["threshold"])
    shift = torch.randint(-3, 4, (50,), generator=gen)  # a bias of whole value steps
    layer["bias"] = torch.where(on_ties, scale * shift, layer["bias"])
    layer = {name: None if t is None else t.to(device) for name, t in layer.items()}
    s = torch.zeros(16, 3, 11, 24, dtype=torch.int8)
    s[0] = torch.randint(-1, 2, (3, 11, 24), generator=gen, dtype=torch.int8)
    want = _reference(s, layer, -128, 127)
    _assert_same(_run(s.to(device), layer, -128, 127), want)
    acc = torch.matmul(s[0].double(), layer["weight"].double().cpu().T) + shift
    acc = acc[..., on_ties]
    assert (acc % 2 == 1).float().mean() > 0.3, "too few values on a tie"
    # every count settled at one side of its tie (which side is the exact rounding's call)
    assert ((want[1][..., on_ties].double() - acc / 2).abs() <= 0.5).all(), "unsettled"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fresh", [True, False])
def test_chunked_equals_whole(gen, device, fresh):
    """Each chunk forms its accumulator from the input count after it less its spikes: the
    whole run's bits, from a fresh input and from one with earlier steps."""
    layer = _layer(gen, 29, 70, per_channel=True, device=device)
    s = _spikes(gen, 12, (2, 21), 70, device)
    before = None if fresh else torch.randint(-40, 41, s.shape[1:], generator=gen).to(device)
    whole = _run(s, layer, -16, 15, _chunks(s, [12], before)[0][1])
    if fresh:
        _assert_same(whole, _run(s, layer, -16, 15))  # None: no earlier steps
    spikes, count = [], None
    for chunk, s_count in _chunks(s, [5, 1, 6], before):
        out, count = _run(chunk, layer, -16, 15, s_count, count)
        spikes.append(out)
    _assert_same((torch.cat(spikes), count), [w.cpu() for w in whole])


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("poisoned", [False, True])
def test_inplace_equals_fresh(gen, backend, poisoned, request):
    """``inplace=True``: chunks fed back in place give the whole run's bits, and the state
    stays the same tensors at the same addresses (what a CUDA graph replays)."""
    if poisoned:
        request.getfixturevalue("poisoned_allocations")
    layer = _layer(gen, 29, 70, per_channel=True)
    s = _spikes(gen, 9, (2, 21), 70)
    s_count0, count0 = _random_state(gen, s, 29)
    before = s_count0.to(torch.int32) - s.sum(0, dtype=torch.int32)
    with force_backend(backend):
        whole = _run(s, layer, -16, 15, s_count0, count0)
        count = count0.clone()
        where = count.data_ptr()
        spikes = []
        for chunk, s_count in _chunks(s, [4, 1, 4], before):
            out = _run(chunk, layer, -16, 15, s_count, count, inplace=True)
            assert out[1] is count
            spikes.append(out[0])
    assert count.data_ptr() == where
    _assert_same((torch.cat(spikes), count), whole)
    _assert_same(whole, _reference(s, layer, -16, 15, s_count0, count0))


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_single_step(gen, device):
    layer = _layer(gen, 5, 3, device=device)
    s = _spikes(gen, 1, (1,), 3, device)
    count = torch.zeros(1, 5, dtype=torch.int8, device=device)
    got = _run(s, layer, -8, 7, s[0].clone(), count, inplace=True)
    _assert_same([t.cpu() for t in got], _reference(s, layer, -8, 7))


@pytest.mark.parametrize("device", DEVICES)
def test_silent_input_still_moves_the_neuron(gen, device):
    """All spike tiles silent: the accumulator holds what the input count gives, and the
    neuron keeps stepping toward that value's target (the epilogue runs on silent steps)."""
    layer = _layer(gen, 21, 50, device=device)
    s = torch.zeros(6, 2, 17, 50, dtype=torch.int8, device=device)
    s_count = torch.randint(-40, 41, (2, 17, 50), generator=gen, dtype=torch.int8).to(device)
    got = _run(s, layer, -8, 7, s_count)
    _assert_same(got, _reference(s, layer, -8, 7, s_count))
    assert got[0].any(), "the neurons must still fire toward their targets"


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_quiet_tiles_wake_up(gen, backend):
    """A tile whose input is silent and whose neurons stopped firing skips its epilogue (the
    kernel's quiet path): after a long silence with the neurons settled, spikes in one row
    at a late step and in another row tile later still must move the neurons again."""
    layer = _layer(gen, 40, 64)
    s = torch.zeros(30, 70, 64, dtype=torch.int8)
    s[0] = _spikes(gen, 1, (70,), 64, "cpu", density=0.9)[0]
    s[24, 3, ::2] = 1
    s[27, 50, :10] = -1
    with force_backend(backend):
        got = _run(s, layer, -8, 7)
    want = _reference(s, layer, -8, 7)
    _assert_same(got, want)
    late = want[0][20:24].abs().sum().item(), want[0][24:].abs().sum().item()
    assert late[0] == 0 and late[1] > 0, f"settled before step 24, woken after: {late}"


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("resident", [0, 8])
@pytest.mark.parametrize(("lead", "k", "n"), [((3,), 45, 37), ((40,), 130, 17), ((2, 16), 64, 48)])
@pytest.mark.parametrize("T", [1, 6])
def test_resident_and_streamed_weights(gen, device, resident, T, lead, k, n, monkeypatch):
    """The kernel's two weight paths (``kernels.exact_linear.weight_residency``): every K
    tile held for the chunk, the step loop pipelined (``resident`` 8 here: at most 8 K
    tiles), or streamed through the K loop (0). Each bit-exact mid-run, with silent steps and
    row tiles, partial K tiles and per-channel thresholds, and chunked runs equal to whole."""
    tiles = {name: getattr(el, name) for name in ("_INTERPRET_TILES", "_GPU_TILES")}
    for name, config in tiles.items():
        monkeypatch.setattr(el, name, (*config[:5], resident))
    chosen = []
    residency = el.weight_residency
    monkeypatch.setattr(
        el, "weight_residency", lambda *args: chosen.append(residency(*args)) or chosen[-1]
    )
    layer = _layer(gen, n, k, per_channel=True, device=device)
    s = _spikes(gen, T, lead, k, device)
    s.view(T, -1, k)[:, :16] = 0  # a silent row tile under the interpreter's 16-row tiles
    s_count, count = _random_state(gen, s, n)
    whole = _run(s, layer, -16, 15, s_count, count)
    _assert_same(whole, _reference(s, layer, -16, 15, s_count, count))
    assert whole[0].any(), "the case should make the neuron fire"
    k_tiles = 0 if resident == 0 else -(-k // el.tile_config()[2])
    assert chosen and all(c["K_TILES"] == k_tiles for c in chosen), chosen
    if T > 1:
        before = s_count.to(torch.int32) - s.sum(0, dtype=torch.int32)
        spikes, out_count = [], count
        for chunk, chunk_s_count in _chunks(s, [T // 2, T - T // 2], before):
            out, out_count = _run(chunk, layer, -16, 15, chunk_s_count, out_count)
            spikes.append(out)
        _assert_same((torch.cat(spikes), out_count), whole)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_silent_and_active_tiles(gen, device):
    """Active rows only in some row tiles and some steps, next to wholly silent tiles."""
    layer = _layer(gen, 40, 64, device=device)
    s = torch.zeros(5, 70, 64, dtype=torch.int8, device=device)
    s[0, 3] = 1
    s[2, 40:45] = _spikes(gen, 1, (5,), 64, device, density=0.9)[0]
    s[4, 69, ::3] = -1
    _assert_same(_run(s, layer, -8, 7), _reference(s, layer, -8, 7))


@pytest.mark.parametrize("device", DEVICES)
def test_large_k_stays_exact(gen, device):
    """A starting accumulator past 2^24 (123 x 127 x 2999 + 122 x 127, odd, so float32 could
    not hold it) from the input count, plus per-step sums of 127 K: integer arithmetic
    throughout, and fl32(acc) rounded once in the value."""
    k = 3000
    layer = _layer(gen, 18, k, device=device)
    layer["weight"][:6] = 127
    layer["weight_scale"][:6] = 1e-7
    s = torch.ones(4, 3, k, dtype=torch.int8, device=device)
    before = torch.full((3, k), 123, dtype=torch.int8)
    before[:, 0] = 122
    s_count = (before + 4).to(device)  # an int8 count after the four steps
    got = _run(s, layer, -128, 127, s_count)
    _assert_same(got, _reference(s, layer, -128, 127, s_count))
    acc = (123 * (k - 1) + 122 + 4 * k) * 127
    assert acc > 2**24 and acc % 2 == 1


@pytest.mark.parametrize("device", DEVICES)
def test_state_is_fresh_and_inputs_untouched(gen, device):
    layer = _layer(gen, 20, 30, device=device)
    s = _spikes(gen, 3, (4,), 30, device)
    s_count = s.sum(0, dtype=torch.int8) + 1
    count = torch.ones(4, 20, dtype=torch.int8, device=device)
    before = (s.clone(), s_count.clone(), count.clone())
    _, count_out = _run(s, layer, -8, 7, s_count, count)
    assert count_out.data_ptr() != count.data_ptr()
    for t, b in zip((s, s_count, count), before, strict=True):
        assert torch.equal(t, b), "an input was modified"


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_spikes(gen, device):
    layer = _layer(gen, 19, 24, device=device)
    s = _spikes(gen, 4, (5, 3), 24, device).transpose(1, 2)
    _assert_same(_run(s, layer, -8, 7), _reference(s, layer, -8, 7))


@pytest.mark.parametrize("device", DEVICES)
def test_unwritten_outputs_show(gen, device, monkeypatch):
    """Outputs are allocated poisoned: any element the op fails to write shows up."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(77 if not t.is_floating_point() else float("nan"))

    layer = _layer(gen, 37, 45, device=device)
    s = _spikes(gen, 4, (2, 19), 45, device)
    want = _reference(s, layer, -8, 7)
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    got = _run(s, layer, -8, 7)
    monkeypatch.undo()
    _assert_same(got, want)


@pytest.mark.parametrize(("n_min", "p_max"), [(-8, 7), (0, 31)])
def test_settles_to_the_qann_integer(gen, n_min, p_max):
    """SPEC.md §9.4: after the input spikes stop, the value is the QANN's of the input counts
    (``acc = q_in @ W^T`` exactly), and within ``p_max - n_min`` silent steps every count
    equals the QANN quantizer's integer of the linear's value (§9.2), then stays there."""
    layer = _layer(gen, 30, 40)
    s_in = _spikes(gen, 6, (25,), 40)
    T = 6 + p_max - n_min
    s = torch.cat([s_in, torch.zeros(T - 6, 25, 40, dtype=torch.int8)])
    spikes, count = _run(s, layer, n_min, p_max)
    q_in = s.sum(0, dtype=torch.int64)
    acc = q_in @ layer["weight"].to(torch.int64).t()
    m = layer["in_threshold"] * layer["weight_scale"]
    y = m * acc.to(torch.float32) + layer["bias"]
    integer = torch.clamp(torch.floor(y / layer["threshold"] + 0.5), n_min, p_max)
    assert torch.equal(count.to(torch.float32), integer)
    assert torch.equal(spikes.sum(0, dtype=torch.int32), count.to(torch.int32))
    quiet = torch.zeros(3, 25, 40, dtype=torch.int8)
    more, held = _run(quiet, layer, n_min, p_max, q_in.to(torch.int8), count)
    assert not more.any() and torch.equal(held, count)


def _good_args() -> dict:
    return dict(
        s=torch.zeros(2, 3, 8, dtype=torch.int8),
        weight=torch.ones(5, 8, dtype=torch.int8),
        weight_scale=torch.ones(5),
        bias=torch.zeros(5),
        in_threshold=torch.tensor(1.0),
        threshold=torch.tensor(1.0),
        n_min=-4,
        p_max=3,
    )


# (case, what replaces the good arguments, error type, words the message must contain)
BAD_INPUTS = [
    ("T == 0", dict(s=torch.zeros(0, 3, 8, dtype=torch.int8)), ValueError, "T == 0"),
    ("s float", dict(s=torch.zeros(2, 3, 8)), TypeError, "s must have dtype"),
    ("s 1-D", dict(s=torch.zeros(8, dtype=torch.int8)), ValueError, "at least 2 dims"),
    ("s not ternary", dict(s=torch.full((2, 3, 8), 2, dtype=torch.int8)), ValueError, "ternary"),
    ("weight float", dict(weight=torch.ones(5, 8)), TypeError, "weight must have dtype"),
    ("weight 3-D", dict(weight=torch.ones(1, 5, 8, dtype=torch.int8)), ValueError, "weight must"),
    ("K mismatch", dict(weight=torch.ones(5, 9, dtype=torch.int8)), ValueError, "K=8"),
    ("weight -128", dict(weight=torch.full((5, 8), -128, dtype=torch.int8)), ValueError, "-127"),
    ("ws fp16", dict(weight_scale=torch.ones(5, dtype=torch.float16)), TypeError, "weight_scale"),
    ("ws shape", dict(weight_scale=torch.ones(4)), ValueError, r"weight_scale must have shape"),
    ("ws zero", dict(weight_scale=torch.zeros(5)), ValueError, "weight_scale must be finite"),
    ("ws nan", dict(weight_scale=torch.full((5,), float("nan"))), ValueError, "weight_scale"),
    ("bias fp16", dict(bias=torch.zeros(5, dtype=torch.float16)), TypeError, "bias must have"),
    ("bias shape", dict(bias=torch.zeros(6)), ValueError, r"bias must have shape \(5,\)"),
    ("theta_in 2 elements", dict(in_threshold=torch.ones(2)), ValueError, "in_threshold must"),
    ("theta_in <= 0", dict(in_threshold=torch.tensor(-1.0)), ValueError, "in_threshold must"),
    ("theta_in int", dict(in_threshold=torch.tensor(1)), TypeError, "in_threshold must have"),
    ("theta wrong N", dict(threshold=torch.ones(4)), ValueError, r"shape \(5,\)"),
    ("theta inf", dict(threshold=torch.tensor(float("inf"))), ValueError, "finite"),
    ("theta subnormal", dict(threshold=torch.tensor(1e-40)), ValueError, "normal"),
    ("bounds inverted", dict(n_min=3, p_max=-4), ValueError, "n_min=3 > p_max=-4"),
    ("int8 overflow", dict(n_min=0, p_max=255), ValueError, "int8 count would overflow"),
    ("p_max float", dict(p_max=3.0), TypeError, "p_max must be an int"),
    ("s_count int32", dict(s_count=torch.zeros(3, 8, dtype=torch.int32)), TypeError, "s_count"),
    ("s_count shape", dict(s_count=torch.zeros(3, 5, dtype=torch.int8)), ValueError, "s_count"),
    (
        "s_count not after s",
        dict(s=torch.ones(2, 3, 8, dtype=torch.int8), s_count=torch.full((3, 8), -127).char()),
        ValueError,
        "s_count less the spikes of s is not an int8 count",
    ),
    (
        "s_count not after s (high)",
        dict(s=-torch.ones(2, 3, 8, dtype=torch.int8), s_count=torch.full((3, 8), 127).char()),
        ValueError,
        "s_count less the spikes of s is not an int8 count",
    ),
    ("count int32", dict(count=torch.zeros(3, 5, dtype=torch.int32)), TypeError, "count must"),
    ("count shape", dict(count=torch.zeros(5, dtype=torch.int8)), ValueError, "count must"),
    ("count > p_max", dict(count=torch.full((3, 5), 4).char()), ValueError, "count must lie in"),
    (
        "weight elsewhere",
        dict(weight=torch.ones(5, 8, dtype=torch.int8, device="meta")),
        ValueError,
        "weight is on meta",
    ),
    (
        "count elsewhere",
        dict(count=torch.zeros(3, 5, dtype=torch.int8, device="meta")),
        ValueError,
        "count is on meta",
    ),
    (
        "K too large",
        dict(
            s=torch.zeros(1, 1, MAX_K + 1, dtype=torch.int8),
            weight=torch.zeros(5, MAX_K + 1, dtype=torch.int8),
        ),
        ValueError,
        "int32 accumulator",
    ),
]


_COUNT = torch.zeros(3, 5, dtype=torch.int8)
_FLAGS = torch.zeros(6, dtype=torch.int32)  # one buffer for two flag arguments
BAD_INPUTS += [
    (
        "s_count and s_before",
        dict(s_count=torch.zeros(3, 8).char(), s_before=torch.zeros(3, 8).char()),
        ValueError,
        "s_count .* or s_before .*, not both",
    ),
    ("s_before shape", dict(s_before=torch.zeros(3, 5, dtype=torch.int8)), ValueError, "s_before"),
    (
        "s_before not before s",
        dict(s=torch.ones(2, 3, 8, dtype=torch.int8), s_before=torch.full((3, 8), 127).char()),
        ValueError,
        "s_before plus the spikes of s is not an int8 count",
    ),
    (
        "s_before not before s (low)",
        dict(s=-torch.ones(2, 3, 8, dtype=torch.int8), s_before=torch.full((3, 8), -128).char()),
        ValueError,
        "s_before plus the spikes of s is not an int8 count",
    ),
    ("group_active list", dict(group_active=[[[0]]]), TypeError, "group_active must be a torch"),
    (
        "group_active dtype",
        dict(group_active=torch.zeros(2, 3, 5, dtype=torch.int64)),
        TypeError,
        "group_active must have dtype",
    ),
    (
        "group_active without groups",
        dict(group_active=torch.zeros(2, 3, dtype=torch.int32)),
        ValueError,
        r"group_active must have shape \(2, 3, G\)",
    ),
    (
        "group_active batch",
        dict(group_active=torch.zeros(2, 4, 5, dtype=torch.int32)),
        ValueError,
        r"group_active must have shape \(2, 3, G\)",
    ),
    (
        "group_active uneven groups",
        dict(group_active=torch.zeros(2, 3, 2, dtype=torch.int32)),
        ValueError,
        "2 column groups .* split the 5 output channels",
    ),
    (
        "group_active strided",
        dict(group_active=torch.zeros(2, 5, 3, dtype=torch.int32).transpose(1, 2)),
        ValueError,
        "group_active must be contiguous",
    ),
    ("row_active int64", dict(row_active=torch.zeros(2, 3).long()), TypeError, "row_active must"),
    ("row_active shape", dict(row_active=torch.zeros(2, 5).int()), ValueError, r"shape \(2, 3\)"),
    ("row_active strided", dict(row_active=torch.zeros(3, 2).int().t()), ValueError, "contiguous"),
    ("s_row_active list", dict(s_row_active=[[1]]), TypeError, "s_row_active must be a torch"),
    ("s_row_active shape", dict(s_row_active=torch.ones(2, 8).int()), ValueError, "s_row_active"),
    (
        "s_row_active 0 on a spike",
        dict(s=torch.ones(2, 3, 8, dtype=torch.int8), s_row_active=torch.ones(3, 2).int().t() - 1),
        ValueError,
        "s_row_active is 0 where a row of s holds a spike",
    ),
    ("row_settled int64", dict(row_settled=torch.ones(3).long()), TypeError, "row_settled must"),
    ("row_settled shape", dict(row_settled=torch.ones(2, 3).int()), ValueError, r"shape \(3,\)"),
    (
        "row_settled strided",  # the op writes it in place
        dict(row_settled=torch.zeros(6, dtype=torch.int32)[::2]),
        ValueError,
        "row_settled must be contiguous",
    ),
    (
        "count_before shape",
        dict(count_before=torch.zeros(3, 4, dtype=torch.int8)),
        ValueError,
        r"count_before must have shape \(3, 5\)",
    ),
    (
        "count_before int32",
        dict(count_before=torch.zeros(3, 5, dtype=torch.int32)),
        TypeError,
        "count_before must have dtype",
    ),
    (
        "count_before strided",
        dict(count_before=torch.zeros(5, 3, dtype=torch.int8).t()),
        ValueError,
        "count_before must be contiguous",
    ),
    (
        "count_before is count",  # the op writes both
        dict(count=_COUNT, count_before=_COUNT),
        ValueError,
        "count_before shares memory with another argument",
    ),
    (
        "row_settled in row_active",
        dict(row_active=_FLAGS[:6].view(2, 3), row_settled=_FLAGS[3:6]),
        ValueError,
        "row_settled shares memory with another argument; the op writes into it",
    ),
    (
        "row_settled on a moving row",  # fresh, the bias's target 2 is 2 spikes away
        dict(bias=torch.full((5,), 2.0), row_settled=torch.tensor([0, 1, 0]).int()),
        ValueError,
        "row_settled marks a row whose neurons are not at their targets",
    ),
    ("inplace int", dict(count=_COUNT, inplace=1), TypeError, "inplace must be a bool"),
    ("inplace without count", dict(inplace=True), ValueError, "needs count"),
    (
        "inplace strided count",
        dict(count=torch.zeros(5, 3, dtype=torch.int8).t(), inplace=True),
        ValueError,
        "count must be contiguous",
    ),
    (
        "inplace count in s",
        dict(
            s=torch.zeros(2, 3, 8, dtype=torch.int8),
            count=torch.zeros(2, 3, 8, dtype=torch.int8)[0, :, :5],
            inplace=True,
        ),
        ValueError,
        "count must be contiguous",
    ),
]


@pytest.mark.parametrize("other", ["s", "s_count"])
def test_inplace_state_sharing_an_input_is_rejected(other):
    args = _good_args()
    buffer = torch.zeros(2 * 3 * 8, dtype=torch.int8)
    if other == "s":
        args["s"] = buffer.view(2, 3, 8)
    else:
        args["s_count"] = buffer[:24].view(3, 8)
    count = buffer[:15].view(3, 5)  # contiguous, but inside the other
    with pytest.raises(ValueError, match="count shares memory"):
        exact_linear(**args, count=count, inplace=True)


@pytest.mark.parametrize(
    ("case", "bad", "error", "words"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_is_rejected(case, bad, error, words, device):
    args = {**_good_args(), **bad}
    with pytest.raises(error, match=words):
        call_on(device, exact_linear, **args)


@pytest.mark.parametrize(
    "case", ["fresh", "state", "per_channel_no_bias", "inplace", "counts_out_s_before", "flags"]
)
def test_opcheck(gen, case):
    layer = _layer(gen, 20, 24, per_channel=case != "fresh", bias=case != "per_channel_no_bias")
    s = _spikes(gen, 3, (2, 5), 24)
    stateful = case in ("state", "inplace", "counts_out_s_before")
    state = _random_state(gen, s, 20) if stateful else (None, None)
    extra = ()
    if case == "counts_out_s_before":  # the count before the steps instead of after them
        before = (state[0].to(torch.int32) - s.sum(0, dtype=torch.int32)).to(torch.int8)
        state, extra = (None, state[1]), (True, before)
    args = (
        s,
        layer["weight"],
        layer["weight_scale"],
        layer["bias"],
        layer["in_threshold"],
        layer["threshold"],
        -8,
        7,
        *state,
        None,
        case == "inplace",
        *extra,
    )
    if case == "flags":  # the activity flags written (per sample, group, row), the rows read,
        # the settled rows read and written, the count before written
        active, groups, rows = (torch.zeros(3, 2, *extra, dtype=torch.int32) for extra in
                                ((), (4,), (5,)))  # fmt: skip
        # fresh, nothing settled: 0 never lies
        settled = torch.zeros(2, 5, dtype=torch.int32)
        before = torch.zeros(2, 5, 20, dtype=torch.int8)  # written: the count before (fresh: 0)
        flags = (groups, rows, (s != 0).any(dim=-1).to(torch.int32), settled, before)
        args = (*args[:10], active, False, False, None, *flags)
    torch.library.opcheck(torch.ops.spikekernels.exact_linear.default, args)


def test_torch_compile_fullgraph(gen):
    layer = _layer(gen, 20, 24, per_channel=True)
    s = _spikes(gen, 4, (3, 5), 24)

    def block(s):
        spikes, count = _run(s, layer, -8, 7, s.sum(0, dtype=torch.int8))
        return spikes.sum(0, dtype=torch.int32), count

    compiled = torch.compile(block, fullgraph=True)
    got, want = compiled(s), block(s)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_torch_compile_inplace(gen):
    """Compiled, the in-place write still lands in the caller's state (functionalization
    must copy it back), and the bits are eager's."""
    layer = _layer(gen, 20, 24, per_channel=True)
    s = _spikes(gen, 4, (3, 5), 24)
    s_count, count0 = _random_state(gen, s, 20)

    def block(s, s_count, count):
        spikes, _ = _run(s, layer, -8, 7, s_count, count, inplace=True)
        return spikes.sum(0, dtype=torch.int32)

    torch._dynamo.reset()
    count = count0.clone()
    got = torch.compile(block, fullgraph=True)(s, s_count, count)
    want_count = count0.clone()
    want = block(s, s_count, want_count)
    assert torch.equal(got, want)
    assert torch.equal(count, want_count)
    assert not torch.equal(count, count0), "the state must have moved"


@pytest.mark.cuda
def test_cuda_matches_cpu_reference(gen):
    """Kernel on the GPU (int8 tensor cores) vs the reference on the CPU, at ViT-S size."""
    layer = _layer(gen, 1152, 384, per_channel=True)
    s = _spikes(gen, 8, (4, 197), 384, density=0.3)
    got = _run(s.cuda(), {k: None if v is None else v.cuda() for k, v in layer.items()}, -8, 7)
    _assert_same(got, _reference(s, layer, -8, 7))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_silent_tile_flags(gen, device):
    """The flag pass marks exactly the (step, row tile) spike tiles holding a nonzero spike:
    the main kernel skips the matmul of the others. Spikes in the first K tile (the pass
    stops there), only in the last one (it reads on), and none (it reads every K tile)."""
    from spikekernels.kernels.exact_linear import tile_config
    from spikekernels.kernels.tile_flags import step_tile_flags

    block_m = tile_config()[0]
    s = torch.zeros(3, 5 * block_m - 3, 200, dtype=torch.int8)
    s[0, 0, 199] = -1
    s[0, 3 * block_m + 1, 7] = 1
    s[2, -1, 0] = 1
    flags, num_m = step_tile_flags(lambda kernel: kernel, s.to(device), block_m, num_warps=4)
    want = torch.zeros(3, 5, dtype=torch.int32)
    want[0, 0] = want[0, 3] = want[2, 4] = 1
    assert num_m == 5 and torch.equal(flags.cpu(), want)


def test_tile_flag_grid_takes_any_number_of_steps():
    """A chunk of more than 65,535 steps (a GPU grid's axis y and z limit) or of row tiles
    still launches: the flag pass's grid is one axis. (The launch is recorded, not run.)"""
    from spikekernels.kernels.tile_flags import step_tile_flags

    grids = []

    def record(kernel):
        class Launch:
            def __getitem__(self, grid):
                grids.append(grid)
                return lambda *args, **kwargs: None

        return Launch()

    for steps, rows in ((70_000, 64), (2, 70_000 * 64)):
        s = torch.empty(steps, rows, 32, dtype=torch.int8, device="meta")
        step_tile_flags(record, s, 64, num_warps=4)
    assert grids == [(70_000,), (140_000,)]  # steps x row tiles, on axis x


@triton.jit
def _any_nonzero_kernel(x_ptr, out_ptr, OR_REDUCE: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    offs = tl.program_id(0) * R * C + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    found = any_nonzero_by(tl.load(x_ptr + offs), OR_REDUCE)
    tl.store(out_ptr + tl.program_id(0), found.to(tl.int32))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("or_reduce", [True, False])
def test_any_nonzero_both_reductions(gen, device, or_reduce):
    """``tile_flags.any_nonzero`` by either reduction (the GPU's bitwise or, the
    interpreter's maximum): true exactly for the tiles holding a nonzero int8, any value."""
    tiles = torch.zeros(6, 4, 8, dtype=torch.int8)
    tiles[1, 3, 7] = -1
    tiles[2, 0, 0] = 1
    tiles[3, 2, 5] = -128
    tiles[4] = torch.randint(-1, 2, (4, 8), generator=gen, dtype=torch.int8)
    tiles[4, 0, 0] = 1
    got = torch.full((6,), 7, dtype=torch.int32, device=device)
    _any_nonzero_kernel[(6,)](tiles.to(device), got, OR_REDUCE=or_reduce, R=4, C=8)
    assert torch.equal(got.cpu(), tiles.reshape(6, -1).ne(0).any(-1).to(torch.int32))


def test_module_needs_the_input_count_after_its_first_call(gen):
    """``nn.ExactLinearNeuron`` forms its accumulator from the input neuron's count: chunks
    with it equal the whole run; a later call without it is refused, not silently fresh."""
    layer = _layer(gen, 21, 30, per_channel=True)
    neuron = TargetNeuron(layer["threshold"], 16, signed=True)
    module = ExactLinearNeuron(
        layer["weight"], layer["weight_scale"], layer["bias"], layer["in_threshold"], neuron
    )
    s = _spikes(gen, 7, (2, 5), 30)
    whole = module(s)
    count = module.count.clone()
    module.reset()
    parts = [module(chunk, s_count) for chunk, s_count in _chunks(s, [3, 4])]
    assert torch.equal(torch.cat(parts), whole) and torch.equal(module.count, count)
    with pytest.raises(ValueError, match="s_count is None after the first call"):
        module(s[:1])


@pytest.mark.parametrize("own_flags", [False, True])
def test_module_keeps_its_settled_rows(gen, monkeypatch, own_flags):
    """``nn.ExactLinearNeuron`` keeps the rows that did not fire at its last step as
    ``row_settled``: zeros at its first call, which the op then writes in place (with or
    without the caller's ``row_active``: the same rows, at the kernel's granularity), passes
    them to its next call, and forgets them at ``reset()``; chunks still equal the whole
    run."""
    import spikekernels.nn.exact_layers as exact_layers

    given = []

    def spy(*args, **kwargs):
        settled = kwargs["row_settled"]
        given.append(None if settled is None else (settled.data_ptr(), settled.clone()))
        return exact_linear(*args, **kwargs)

    layer = _layer(gen, 21, 30)
    neuron = TargetNeuron(layer["threshold"], 16, signed=True)
    module = ExactLinearNeuron(
        layer["weight"], layer["weight_scale"], layer["bias"], layer["in_threshold"], neuron
    )
    s = _spikes(gen, 24, (3, 16), 30, density=0.2)
    s[4:] = 0  # the outputs settle (within 15 steps at level 16)
    s[20:, 0] = _spikes(gen, 4, (16,), 30)  # sample 0 wakes again
    whole, count = module(s), module.count.clone()
    module.reset()
    assert module.row_settled is None
    monkeypatch.setattr(exact_layers, "exact_linear", spy)
    parts, last = [], []
    for chunk, s_count in _chunks(s, [5, 14, 5]):
        flags = torch.zeros(chunk.shape[:-1], dtype=torch.int32) if own_flags else None
        parts.append(module(chunk, s_count, row_active=flags))
        fired = (parts[-1][-1:] != 0).any(dim=-1).to(torch.int32)  # [1, *lead]
        if backend_for(s, ("triton", "torch")) == "triton":  # every row of a tile that fired
            fired = _row_tiles(parts[-1][-1:], el.tile_config()[0])
        last.append((fired[0] == 0).to(torch.int32))
        assert torch.equal(module.row_settled, last[-1])
        if own_flags:
            assert torch.equal(module.row_settled, (flags[-1] == 0).to(torch.int32))
    assert torch.equal(torch.cat(parts), whole) and torch.equal(module.count, count)
    assert not given[0][1].any(), "fresh: no row promised settled"
    assert {ptr for ptr, _ in given} == {module.row_settled.data_ptr()}  # in place
    # the rows silent at the chunk's last step (the Triton kernel's: its silent row tiles)
    for (_, settled), want in zip(given[1:], last[:-1], strict=True):
        assert torch.equal(settled, want)
    assert given[2][1].any() and not given[1][1].all(), "the case proves little"
    module.reset()
    assert module.row_settled is None and module.state() == {"count": None, "row_settled": None}


def _linear_neuron(layer):
    neuron = TargetNeuron(layer["threshold"], 16, signed=True)
    return ExactLinearNeuron(
        layer["weight"], layer["weight_scale"], layer["bias"], layer["in_threshold"], neuron
    )


@pytest.mark.parametrize("hooked_from", [0, 1])
def test_module_counts_what_a_hook_gave_it(gen, monkeypatch, hooked_from):
    """Told ``s_continues=False`` (a hook may have replaced its input), ``ExactLinearNeuron``
    integrates the spikes it receives (``s_received``), from its producer's ``s_before`` at
    the first such call (the hook there from the start, or from the second call), and then
    ignores a producer count that no longer sums them: the chunks equal one whole call on the
    same spikes, and its settled rows still hold (the CPU check refuses a wrong 1). Back on
    its producer's count the input jumps: no settled rows for that call, and the spikes equal
    a layer given that jump with no settled rows."""
    import spikekernels.nn.exact_layers as exact_layers

    given = []

    def spy(*args, **kwargs):
        given.append(kwargs["row_settled"].clone())
        return exact_linear(*args, **kwargs)

    layer = _layer(gen, 21, 30)
    s = _spikes(gen, 16, (3, 16), 30, density=0.2)
    s[6:] = 0  # the outputs settle, so the settled rows matter
    s[14:, 0] = _spikes(gen, 2, (16,), 30)  # sample 0 wakes again
    oracle = _linear_neuron(layer)
    want = oracle(s)
    module = _linear_neuron(layer)
    monkeypatch.setattr(exact_layers, "exact_linear", spy)
    parts, total, written = [], torch.zeros(s.shape[1:], dtype=torch.int32), []
    for i, (chunk, _) in enumerate(_chunks(s, [4, 7, 5])):
        # the producer's count before: true up to the hook, then off by 3 (not what it sent)
        producer = None if i == 0 else (total + 3 * (i > hooked_from)).clamp(-128, 127).char()
        parts.append(module(chunk, s_before=producer, s_continues=i < hooked_from))
        written.append(module.row_settled.clone())
        total += chunk.sum(0, dtype=torch.int32)
        if i >= hooked_from:
            assert torch.equal(module.s_received, total.char())
    assert torch.equal(torch.cat(parts), want) and torch.equal(module.count, oracle.count)
    # the settled rows hold on the layer's own count: each call reads the last one's
    assert not given[0].any() and all(map(torch.equal, given[1:], written[:-1]))
    assert module.row_settled.any(), "the case proves little"

    # the hook goes: the producer's count (3 above what the layer received) is read again
    jump = _spikes(gen, 3, (3, 16), 30, density=0.2)
    producer = (total + 3).char()
    got = module(jump, s_before=producer)
    assert module.s_received is None and not given[-1].any()
    oracle.row_settled.zero_()  # 0 promises nothing
    assert torch.equal(got, oracle(jump, s_before=producer))
    assert torch.equal(module.count, oracle.count)


def test_module_refuses_counts_a_hook_cannot_give(gen):
    """``s_continues=False`` takes ``s_before`` at its first call: ``s_count`` less spikes
    that are not its neuron's is not what the layer received. And spikes that sum past
    int8 (no neuron's count does) are refused before any state moves."""
    module = _linear_neuron(_layer(gen, 5, 8))
    s = _spikes(gen, 3, (2,), 8)
    with pytest.raises(ValueError, match="give s_before, not s_count, with s_continues=False"):
        module(s, s.sum(0).char(), s_continues=False)
    ones = torch.ones(130, 2, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="spikes of s sum to a count outside int8"):
        module(ones, s_continues=False)
    assert module.count is None and module.s_received is None
    with pytest.raises(ValueError, match=r"s_before must have shape \(2, 8\)"):
        module(s, s_before=torch.zeros(2, 7, dtype=torch.int8), s_continues=False)
    with pytest.raises(TypeError, match="s_before must have dtype"):
        module(s, s_before=torch.zeros(2, 8), s_continues=False)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("T", [1, 5])
def test_s_before_equals_s_count(gen, backend, T):
    """The input count before the steps (``s_before``) gives the same bits as the count after
    them (``s_count``), chunk after chunk, with per-channel thresholds and in place."""
    layer = _layer(gen, 37, 45, per_channel=True)
    s = _spikes(gen, 3 * T, (2, 19), 45)
    before = torch.randint(-40, 41, s.shape[1:], generator=gen, dtype=torch.int32)
    with force_backend(backend):
        whole = _run(s, layer, -8, 7, (before + s.sum(0, dtype=torch.int32)).char())
        outs, count = [], None
        for part, _ in _chunks(s, [T, T, T], before):
            given = before.to(torch.int8)
            out, count = _run(part, layer, -8, 7, None, count, s_before=given,
                              inplace=count is not None)  # fmt: skip
            before = before + part.sum(0, dtype=torch.int32)
            outs.append(out)
    _assert_same((torch.cat(outs), count.cpu()), tuple(t.cpu() for t in whole))


def _settled_layer(gen, lead, k, n):
    """A qkv-like layer (per-channel thresholds) mid-run, its neuron settled on an input that
    fired once: ``(layer, count, before)``, the output count and the input count. Sparse new
    spikes then move only some samples' outputs."""
    layer = _layer(gen, n, k, per_channel=True)
    warm = torch.zeros(12, *lead, k, dtype=torch.int8)
    warm[0] = _spikes(gen, 1, lead, k)[0]
    _, count = _run(warm, layer, -8, 7)
    return layer, count, warm.sum(0, dtype=torch.int32)


def _group_truth(spikes, groups):
    """``group_active``'s truth: ``[T, B, G]``, whether sample ``b``'s spikes (dim 1) in
    column group ``g`` are nonzero at step ``t``."""
    steps, batch, n = spikes.shape[0], spikes.shape[1], spikes.shape[-1]
    tiles = spikes.reshape(steps, batch, -1, groups, n // groups)
    return (tiles != 0).any(dim=4).any(dim=2).to(torch.int32)


def _tile_superset(spikes, groups, block_m, block_n):
    """What the Triton kernel records (``activity.record_tile_groups``): every (sample,
    group) that an output tile of ``[block_m, block_n]`` overlaps is set where the tile
    fired."""
    steps, batch, n = spikes.shape[0], spikes.shape[1], spikes.shape[-1]
    flat = spikes.reshape(steps, -1, n)
    rows = flat.shape[1]
    per_sample, size = rows // batch, n // groups
    want = torch.zeros(steps, batch, groups, dtype=torch.int32)
    for r0 in range(0, rows, block_m):
        for c0 in range(0, n, block_n):
            fired = (flat[:, r0 : r0 + block_m, c0 : c0 + block_n] != 0).flatten(1).any(1)
            b0, b1 = r0 // per_sample, (min(r0 + block_m, rows) - 1) // per_sample
            g0, g1 = c0 // size, (min(c0 + block_n, n) - 1) // size
            want[:, b0 : b1 + 1, g0 : g1 + 1] |= fired.to(torch.int32)[:, None, None]
    return want


# (leading dims, K, N, groups): groups narrower than a tile, wider than one, and tiles that
# straddle samples and groups (the interpreter's 16 x 16 tiles)
GROUP_SHAPES = [((3, 7), 33, 48, 6), ((2, 40), 45, 36, 3), ((2, 5), 16, 16, 16)]


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize(("lead", "k", "n", "groups"), GROUP_SHAPES)
@pytest.mark.parametrize(("T", "counts_out"), [(1, True), (5, False), (5, True)])
def test_group_active(gen, backend, lead, k, n, groups, T, counts_out):
    """``group_active`` per (step, sample, column group): the spikes' truth on the PyTorch
    paths, the fired output tiles' samples and groups on Triton's (a superset); the spikes,
    count and ``active`` as without it; a flag already set stays set."""
    layer, count, before = _settled_layer(gen, lead, k, n)
    s = _spikes(gen, T, lead, k, density=0.02)
    rows = math.prod(lead[1:])  # about two rows of a sample spike at a step
    s = s * (torch.rand(T, *lead, 1, generator=gen) < 2 / rows)
    s_count = (before + s.sum(0, dtype=torch.int32)).to(torch.int8)
    flags = torch.zeros(T, lead[0], groups, dtype=torch.int32)
    active, active_alone = (torch.zeros(T, lead[0], dtype=torch.int32) for _ in range(2))
    with force_backend(backend):
        ran = backend_for(s, ("triton", "torch")) if backend != "reference" else backend
        want = _run(s, layer, -8, 7, s_count, count, counts_out=counts_out, active=active_alone)
        truth = _group_truth(_run(s, layer, -8, 7, s_count, count)[0], groups)
        quiet = truth == 0
        kept = quiet & (torch.rand(quiet.shape, generator=gen) < 0.5)  # set before: stays
        flags[kept] = 1
        got = _run(s, layer, -8, 7, s_count, count, counts_out=counts_out, active=active,
                   group_active=flags)  # fmt: skip
    _assert_same(got, want)
    assert torch.equal(active, active_alone)
    if ran == "triton":
        block_m, block_n = el.tile_config()[:2]
        spikes = _run(s, layer, -8, 7, s_count, count)[0]
        expected = _tile_superset(spikes, groups, block_m, block_n)
    else:
        expected = truth
    assert torch.equal(flags, expected | kept.to(torch.int32))
    if T > 1:  # the case makes quiet and busy groups both
        assert 0 < int(truth.sum()) < truth.numel()


def _row_tiles(spikes, block_m):
    """What the Triton kernel records as ``row_active``: every row of a ``block_m``-row tile
    (rows flattened over the spikes' dims 1 to -2) where any of the tile's spikes fired."""
    flat = (spikes != 0).flatten(1, -2).any(dim=-1)  # [T, rows]
    want = torch.zeros_like(flat)
    for r0 in range(0, flat.shape[1], block_m):
        want[:, r0 : r0 + block_m] = flat[:, r0 : r0 + block_m].any(dim=1, keepdim=True)
    return want.reshape(spikes.shape[:-1]).to(torch.int32)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize(("lead", "k", "n"), [((3, 7), 33, 48), ((2, 40), 45, 20)])
@pytest.mark.parametrize(("T", "counts_out"), [(1, False), (5, True)])
def test_row_active(gen, backend, lead, k, n, T, counts_out):
    """``row_active`` per (step, row): the spikes' truth on the PyTorch paths, every row of a
    row tile that fired on Triton's (a superset); the spikes and count as without it; a flag
    set before stays set."""
    layer, count, before = _settled_layer(gen, lead, k, n)
    s = _spikes(gen, T, lead, k, density=0.02)
    s = s * (torch.rand(T, *lead, 1, generator=gen) < 2 / math.prod(lead[1:]))
    s_count = (before + s.sum(0, dtype=torch.int32)).to(torch.int8)
    with force_backend(backend):
        ran = backend_for(s, ("triton", "torch")) if backend != "reference" else backend
        want = _run(s, layer, -8, 7, s_count, count, counts_out=counts_out)
        spikes = _run(s, layer, -8, 7, s_count, count)[0]
        kept = (torch.rand(spikes.shape[:-1], generator=gen) < 0.2).to(torch.int32)
        flags = kept.clone()
        got = _run(s, layer, -8, 7, s_count, count, counts_out=counts_out, row_active=flags)
    _assert_same(got, want)
    truth = (spikes != 0).any(dim=-1).to(torch.int32)
    block_m = el.tile_config()[0]
    expected = _row_tiles(spikes, block_m) if ran == "triton" else truth
    assert torch.equal(flags, expected | kept)
    if T > 1:  # quiet and busy row tiles both
        tiles = _row_tiles(spikes, block_m)
        assert 0 < int(tiles.sum()) < tiles.numel(), "the case proves little"


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("T", [1, 5])
def test_s_row_active_changes_no_bit(gen, backend, T):
    """The input's row flags (its producer's ``row_active``, plus spurious ones): the same
    spikes, count, ``active`` and row flags as without them, on every path."""
    lead, k, n = (2, 23), 40, 36
    layer, count, before = _settled_layer(gen, lead, k, n)
    s = _spikes(gen, T, lead, k, density=0.1)
    s = s * (torch.rand(T, *lead, 1, generator=gen) < 0.2)
    s_count = (before + s.sum(0, dtype=torch.int32)).to(torch.int8)
    hint = (s != 0).any(dim=-1).to(torch.int32)
    hint |= (torch.rand(hint.shape, generator=gen) < 0.2).to(torch.int32)
    assert (hint == 0).any(), "the case proves little"
    _assert_hint_changes_no_bit(backend, s, layer, s_count, count, "s_row_active", hint)


def _assert_hint_changes_no_bit(backend, s, layer, s_count, count, name, hint, **kwargs):
    """The spikes, count, ``active`` and ``row_active`` of a call with the hint ``name`` and
    without it: the same bits."""
    out = []
    with force_backend(backend):
        for given in (None, hint):
            flags = [torch.zeros(s.shape[:2], dtype=torch.int32, device=s.device),
                     torch.zeros(s.shape[:-1], dtype=torch.int32, device=s.device)]  # fmt: skip
            got = _run(s, layer, -8, 7, s_count, count, active=flags[0], row_active=flags[1],
                       **{name: given}, **kwargs)  # fmt: skip
            out.append((*got, *flags))
    for what, got, want in zip(("spikes", "count", "active", "row_active"), *out, strict=True):
        assert_same_bits(got, want, what)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("mid_run", [False, True])
def test_kernel_skips_rows_flagged_silent(gen, device, mid_run):
    """The Triton kernel reads only the row tiles that ``s_row_active`` marks at a step: with
    flags that hide spikes (the op's data check bypassed) it gives the bits of the spikes
    with those tiles zeroed. (A row tile with one flag set is read whole.) Mid-run, the
    prologue that forms the input count before the chunk skips the same tiles: the count
    after the chunk less only the spikes it reads."""
    T, lead, k, n = 4, (3, 11), 24, 20
    block_m = el.tile_config()[0]
    layer = _layer(gen, n, k, per_channel=True)
    s = _spikes(gen, T, lead, k)
    flags = (torch.rand(T, *lead, generator=gen) < 0.05).to(torch.int32)
    read = _row_tiles(flags[..., None], block_m) != 0
    assert (~read & (s != 0).any(dim=-1)).any() and read.any(), "the case proves little"
    shown = s * read[..., None]
    state = _random_state(gen, shown, n) if mid_run else (None, None)
    want = _run(shown, layer, -8, 7, *state)
    on = {name: None if t is None else t.to(device) for name, t in layer.items()}
    args = (on["weight"], on["weight_scale"], on["bias"], on["in_threshold"], on["threshold"])
    got = torch.ops.spikekernels.exact_linear(
        s.to(device), *args, -8, 7, *(t if t is None else t.to(device) for t in state),
        s_row_active=flags.to(device),
    )  # fmt: skip
    _assert_same(got, want)


def _settled_rows(layer, count, before, n_min=-8, p_max=7):
    """The truth of ``row_settled``: the rows none of whose neurons moves at a silent step
    from this state (the input count ``before``, the output ``count``)."""
    silent = torch.zeros(1, *before.shape, dtype=torch.int8, device=before.device)
    spikes, _ = _run(silent, layer, n_min, p_max, None, count, s_before=before.to(torch.int8))
    return (spikes[0] == 0).all(dim=-1).to(torch.int32)


@pytest.mark.parametrize(
    ("backend", "device"),
    [("triton", d) for d in TRITON_DEVICES] + [("torch", "cpu"), ("reference", "cpu")],
)
@pytest.mark.parametrize(("T", "counts_out", "k"), [(1, False, 40), (5, False, 40),
                                                    (5, True, 40), (5, False, 130)])  # fmt: skip
def test_row_settled_changes_no_bit(gen, backend, device, T, counts_out, k):
    """A layer's settled rows (plus rows marked unsettled that are not): the same spikes,
    count and flags as without them, on every path. On the Triton path, a sample a row tile
    (of the interpreter's): 0 settled and silent for the whole call, 1 settled until its
    input wakes after step 0, 2 and 3 not settled (their counts moved off their targets),
    silent at step 0 and for the whole call; the weight resident (K = 40) or streamed."""
    lead, n = (4, 16), 36
    layer, count, before = _settled_layer(gen, lead, k, n)
    count[2:] = torch.randint(-8, 8, count[2:].shape, generator=gen, dtype=torch.int8)
    hint = _settled_rows(layer, count, before)
    hint[1, : lead[1] // 2] *= (torch.rand(lead[1] // 2, generator=gen) < 0.5).int()
    assert hint[:2].any() and not hint[2:].all(), "the case proves little"
    s = _spikes(gen, T, lead, k, density=0.1)
    s[:, 0] = 0
    s[0, 1:] = 0
    s[:, 3] = 0
    s_count = (before + s.sum(0, dtype=torch.int32)).to(torch.int8)
    on = [t.to(device) for t in (s, s_count, count, hint)]
    layer = {name: None if t is None else t.to(device) for name, t in layer.items()}
    _assert_hint_changes_no_bit(
        backend, on[0], layer, *on[1:3], "row_settled", on[3], counts_out=counts_out
    )


def _settled_after(out, before, counts_out, backend):
    """The settled flags an op call leaves: 1 on the rows of its output ``out`` that did not
    fire at the last step (with ``counts_out``: whose count did not move, ``before`` the count
    before the call), on Triton's path per row tile (``_row_tiles``)."""
    prev = (out[-2:-1] if out.shape[0] > 1 else before[None]) if counts_out else 0
    fired = out[-1:] != prev
    if backend == "triton":
        fired = _row_tiles(fired, el.tile_config()[0])
    return (~fired.any(dim=-1) if backend != "triton" else fired == 0)[0].to(torch.int32)


@pytest.mark.parametrize(
    ("backend", "device"),
    [("triton", d) for d in TRITON_DEVICES] + [("torch", "cpu"), ("reference", "cpu")],
)
@pytest.mark.parametrize(("T", "counts_out"), [(1, False), (1, True), (5, False), (5, True)])
@pytest.mark.parametrize("incoming", ["zeros", "settled"])
def test_row_settled_written(gen, backend, device, T, counts_out, incoming):
    """The op writes the call's last step's settled rows into ``row_settled``, whatever the
    flags promised: the rows that did not fire (on Triton's path every row of a row tile
    none of whose output tiles fired: ``row_active``'s tiles), a subset of the truth."""
    # a sample of whole row tiles (16 rows under the interpreter, 64 or more on a GPU), so
    # that the silent sample 0 is a tile of its own on every device
    lead, k, n = (4, max(16, el.tile_config()[0])), 40, 36
    layer, count, before = _settled_layer(gen, lead, k, n)
    s = _spikes(gen, T, lead, k, density=0.05)
    s[:, 0] = 0  # sample 0 stays settled: its rows are written 1
    s_count = (before + s.sum(0, dtype=torch.int32)).to(torch.int8)
    flags = _settled_rows(layer, count, before) if incoming == "settled" else 0 * count[..., 0]
    flags = flags.to(torch.int32)
    rows = torch.zeros(T, *lead, dtype=torch.int32)
    on = [t.to(device) for t in (s, s_count, count, flags, rows)]
    layer = {name: None if t is None else t.to(device) for name, t in layer.items()}
    with force_backend(backend):
        out, _ = _run(on[0], layer, -8, 7, *on[1:3], counts_out=counts_out, row_settled=on[3],
                      row_active=on[4])  # fmt: skip
    written, out = on[3].cpu(), out.cpu()
    assert torch.equal(written, _settled_after(out, count, counts_out, backend))
    assert torch.equal(written, (on[4][-1].cpu() == 0).to(torch.int32))  # row_active's rows
    truth = _settled_after(out, count, counts_out, "torch")
    assert not (written & ~truth.bool()).any(), "a row that fired is written settled"
    assert written[0].all() and not written.all(), "the case proves little"


@pytest.mark.parametrize(
    ("backend", "device"),
    [("triton", d) for d in TRITON_DEVICES] + [("torch", "cpu"), ("reference", "cpu")],
)
@pytest.mark.parametrize("counts_out", [False, True])
@pytest.mark.parametrize("sizes", [(3, 15, 4), (1, 19, 2)])
def test_settled_chunks_equal_whole(gen, backend, device, counts_out, sizes):
    """Chunks that pass one ``row_settled`` tensor from call to call (zeros at the first,
    then what the op wrote) and the count in place equal one whole call bit for bit: the
    spikes (or counts), the count and ``row_active``; the rows go quiet, then one sample
    wakes."""
    lead, k, n = (3, 16), 40, 36
    layer = _layer(gen, n, k, per_channel=True)
    s = _spikes(gen, sum(sizes), lead, k, density=0.2)
    s[3:] = 0  # the outputs settle (within 15 steps at level 16)
    s[-2:, 1] = _spikes(gen, 2, lead[1:], k)  # sample 1 wakes at the last steps
    layer = {name: None if t is None else t.to(device) for name, t in layer.items()}
    s = s.to(device)
    with force_backend(backend):
        rows = torch.zeros(s.shape[:-1], dtype=torch.int32, device=device)
        whole = _run(s, layer, -8, 7, row_active=rows, counts_out=counts_out)
        settled = torch.zeros(lead, dtype=torch.int32, device=device)
        parts, count, promised = [], None, []
        got_rows = torch.zeros_like(rows)
        for i, (chunk, s_count) in enumerate(_chunks(s, list(sizes))):
            promised.append(settled.clone())
            rows_now = got_rows[sum(sizes[:i]) : sum(sizes[: i + 1])]
            out, count = _run(chunk, layer, -8, 7, s_count if i else None, count,
                              inplace=count is not None, counts_out=counts_out,
                              row_settled=settled, row_active=rows_now)  # fmt: skip
            parts.append(out)
    _assert_same((torch.cat(parts).cpu(), count.cpu()), tuple(t.cpu() for t in whole))
    assert torch.equal(got_rows, rows)
    assert any(p.any() for p in promised[1:]), "the case proves little"


@pytest.mark.parametrize(
    ("backend", "device"),
    [("triton", d) for d in TRITON_DEVICES] + [("torch", "cpu"), ("reference", "cpu")],
)
@pytest.mark.parametrize("case", ["fresh", "mid_run", "inplace", "quiet", "counts_out"])
def test_count_before_is_the_incoming_count(gen, backend, device, case):
    """``count_before`` receives the count as it comes in (zeros when fresh), poison and all
    overwritten, on every path: mid-run, in place (before the op updates it), on a chunk
    whose every tile is settled and silent (the kernel's quiet path, which reads no count
    in place otherwise), and with ``counts_out``; the results as without it."""
    lead, k, n = (3, 16), 40, 36
    layer, count, before = _settled_layer(gen, lead, k, n)
    s = _spikes(gen, 4, lead, k, density=0.1)
    flags = {}
    if case == "quiet":
        s.zero_()
        flags["row_settled"] = _settled_rows(layer, count, before).to(device)
        assert flags["row_settled"].all(), "the case needs every row settled"
    state = None if case == "fresh" else count
    incoming = torch.zeros_like(count) if state is None else count.clone()
    kwargs = dict(inplace=case in ("inplace", "quiet"), counts_out=case == "counts_out")
    s_before = None if case == "fresh" else before.to(torch.int8).to(device)
    layer = {name: None if t is None else t.to(device) for name, t in layer.items()}
    on = [s.to(device), None if state is None else state.to(device)]
    with force_backend(backend):
        want = _run(on[0], layer, -8, 7, None, None if state is None else on[1].clone(),
                    s_before=s_before, **{**kwargs, "inplace": False})  # fmt: skip
        got_before = torch.full((*lead, n), 77, dtype=torch.int8, device=device)
        got = _run(on[0], layer, -8, 7, None, on[1], s_before=s_before, count_before=got_before,
                   **kwargs, **flags)  # fmt: skip
    _assert_same(tuple(t.cpu() for t in got), tuple(t.cpu() for t in want))
    assert torch.equal(got_before.cpu(), incoming)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("counts_out", [False, True])
def test_kernel_trusts_row_settled(gen, device, counts_out):
    """The Triton kernel takes ``row_settled`` at its word (the op's data check bypassed):
    from a state that is not settled, a row tile marked settled and silent for the whole call
    keeps its count and emits nothing, and one whose input wakes at step 1 skips step 0's
    neuron; a tile whose input spikes at step 0 runs as without the hint."""
    T, k, n = 4, 24, 20
    block_m = el.tile_config()[0]
    lead = (3, block_m)  # one row tile a sample: silent, spiking at step 0, waking at step 1
    layer = _layer(gen, n, k)
    s = _spikes(gen, T, lead, k, density=0.5)  # (step 1 silent)
    s[:, 0] = 0
    s[0, 1] = (s[0, 1] == 0).to(torch.int8)  # every row of sample 1 spikes at step 0
    s[0, 2] = 0
    s[1, 2] = torch.randint(-1, 2, (block_m, k), generator=gen, dtype=torch.int8)
    s_count, count = _random_state(gen, s, n)
    truth = _run(s, layer, -8, 7, s_count, count, counts_out=counts_out)
    late = _run(s[1:], layer, -8, 7, s_count, count, counts_out=counts_out)
    want_spikes, want_count = truth[0].clone(), truth[1].clone()
    want_spikes[:, 0] = count[0] if counts_out else 0
    want_count[0] = count[0]
    want_spikes[0, 2] = count[2] if counts_out else 0
    want_spikes[1:, 2], want_count[2] = late[0][:, 2], late[1][2]
    assert not torch.equal(want_spikes, truth[0]), "the case proves little"
    on = {name: None if t is None else t.to(device) for name, t in layer.items()}
    args = (on["weight"], on["weight_scale"], on["bias"], on["in_threshold"], on["threshold"])
    got = torch.ops.spikekernels.exact_linear(
        s.to(device), *args, -8, 7, s_count.to(device), count.to(device),
        counts_out=counts_out, row_settled=torch.ones(lead, dtype=torch.int32, device=device),
    )  # fmt: skip
    _assert_same(got, (want_spikes, want_count))

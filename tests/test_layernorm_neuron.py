"""spike_layernorm_neuron (float mode, SPEC.md §4 then §2): on every backend the same bits as
``spike_layernorm`` followed by ``st_bif``, and the reference composition itself on the
reference backend; chunked time equal to a whole run; every output written; bad input named."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, assert_same_bits, call_on, called_in_place, guarded, st_bif_margin

from spikekernels import reference
from spikekernels.nn import STBIF, SpikeLayerNorm, SpikeLayerNormNeuron
from spikekernels.ops import spike_layernorm, spike_layernorm_neuron, st_bif
from spikekernels.ops._dispatch import force_backend

EPS = 1e-6
BACKENDS = ["triton", "torch", "cpp", "reference"]
# (rows, C): odd widths (a single channel, a row narrower than a warp, ViT-S's 384) and
# row counts that leave a program's last rows empty
SHAPES = [((2, 5), 1), ((3, 7), 5), ((11,), 100), ((3,), 384)]


def _inputs(gen, T, rows, C, dtype=torch.float32):
    """Increments around a nonzero mean, with silent steps and silent channels."""
    x = torch.randn((T, *rows, C), generator=gen) + 0.5
    x *= torch.rand((T, *rows, C), generator=gen) < 0.7
    if T > 2:
        x[1] = 0.0
    return x.to(dtype)


def _norm(gen, C, *, weight=True, bias=True):
    """LayerNorm parameters and a threshold at which a unit-sized increment fires."""
    return dict(
        weight=torch.randn(C, generator=gen) * 0.5 + 1.0 if weight else None,
        bias=torch.randn(C, generator=gen) * 0.1 if bias else None,
        eps=EPS,
        threshold=torch.tensor(0.15),
        n_min=-8,
        p_max=7,
    )


def _state(gen, rows, C):
    shape = (*rows, C)
    return dict(
        x_acc=torch.randn(shape, generator=gen),
        y_prev=torch.randn(shape, generator=gen),
        v=torch.rand(shape, generator=gen) * 1.5 - 0.25,
        count=torch.randint(-8, 8, shape, generator=gen, dtype=torch.int16),
    )


def _composition(x, norm, x_acc=None, y_prev=None, v=None, count=None):
    """The two ops in turn, on whatever backend is in force."""
    u, x_acc, y_prev = spike_layernorm(x, norm["weight"], norm["bias"], norm["eps"], x_acc, y_prev)
    spikes, v, count = st_bif(u, norm["threshold"], norm["n_min"], norm["p_max"], v, count)
    return spikes, x_acc, y_prev, v, count


def _fused(x, norm, device="cpu", **kwargs):
    def dev(t):
        return t.to(device) if isinstance(t, torch.Tensor) else t

    norm = {key: dev(value) for key, value in norm.items()}
    kwargs = {key: dev(value) for key, value in kwargs.items()}
    return spike_layernorm_neuron(dev(x), **norm, **kwargs)


NAMES = ("spikes", "x_acc", "y_prev", "v", "count")


def _assert_same(got, want):
    for name, g, w in zip(NAMES, got, want, strict=True):
        g, w = g.cpu(), w.cpu()
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert_same_bits(g, w, name)  # float state too: -0.0 is not +0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("rows", "C"), SHAPES)
@pytest.mark.parametrize("T", [1, 6])
def test_each_backend_is_layernorm_then_neuron(gen, backend, dtype, rows, C, T):
    x = _inputs(gen, T, rows, C, dtype)
    norm = _norm(gen, C)
    with force_backend(backend):
        got = _fused(x, norm)
        want = _composition(x, norm)
    _assert_same(got, want)
    assert got[0].dtype == torch.int8
    assert got[4].dtype == torch.int8, "fresh count: levels.count_dtype(-8, 7)"
    if C > 1:
        assert got[0].abs().sum() > 0, "a test with no spikes out checks little"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("with_weight", "with_bias"), [(True, True), (False, False), (True, False), (False, True)]
)
def test_incoming_state_and_optional_affine(gen, backend, with_weight, with_bias):
    x = _inputs(gen, 4, (3, 5), 33)
    norm = _norm(gen, 33, weight=with_weight, bias=with_bias)
    state = _state(gen, (3, 5), 33)
    with force_backend(backend):
        got = _fused(x, norm, **state)
        want = _composition(x, norm, **state)
    _assert_same(got, want)
    assert got[4].dtype == torch.int16, "the incoming count's dtype is kept"
    for given, back in zip(state.values(), got[1:], strict=True):
        assert back.data_ptr() != given.data_ptr(), "state is never aliased"


def test_reference_backend_is_the_reference_composition(gen):
    x = _inputs(gen, 5, (4, 3), 40, torch.bfloat16)
    norm = _norm(gen, 40)
    state = _state(gen, (4, 3), 40)
    with force_backend("reference"):
        got = _fused(x, norm, **state)
    want = reference.spike_layernorm_neuron(x, *norm.values(), *state.values())
    _assert_same(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_default_path_against_the_reference(gen, device):
    """The default path's LayerNorm sums in its own order (``spike_layernorm``'s contract:
    within 2x of float32 error), so against the reference: the running sum bit for bit, the
    membrane plus count everywhere (a spike moves 1 from one to the other, so a flip at a
    threshold leaves it), and the spikes, membrane and count of every element whose
    reference membrane before firing was clear of both thresholds at every step."""
    x = _inputs(gen, 6, (9,), 100)
    norm = _norm(gen, 100)
    spikes, x_acc, y_prev, v, count = (t.cpu() for t in _fused(x, norm, device))
    want = reference.spike_layernorm_neuron(x, *norm.values())
    assert torch.equal(x_acc, want[1])
    torch.testing.assert_close(y_prev, want[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v + count, want[3] + want[4], rtol=1e-4, atol=1e-4)
    # the reference membrane before each step's spike, one step at a time
    near, state = torch.zeros(v.shape, dtype=torch.bool), ()
    for x_t in x.split(1):
        sigma, *state = reference.spike_layernorm_neuron(x_t, *norm.values(), *state)
        before = state[2] + sigma[0]
        near |= ((before - 1).abs() <= 1e-3) | (before.abs() <= 1e-3)
    clear = ~near
    assert clear.float().mean() > 0.9
    assert torch.equal(spikes[:, clear], want[0][:, clear])
    torch.testing.assert_close(v[clear], want[3][clear], rtol=1e-4, atol=1e-4)
    assert torch.equal(count[clear], want[4][clear])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunked_equals_whole(gen, device, dtype):
    x = _inputs(gen, 9, (2, 3), 130, dtype)
    norm = _norm(gen, 130)
    whole = _fused(x, norm, device)
    parts, state = [], {}
    for chunk in x.split([4, 1, 4]):
        spikes, *values = _fused(chunk, norm, device, **state)
        state = dict(zip(("x_acc", "y_prev", "v", "count"), values, strict=True))
        parts.append(spikes)
    _assert_same((torch.cat(parts), *state.values()), whole)


def test_fresh_state_is_both_ops_fresh_state(gen):
    """Fresh: ``X = 0``, ``Y_prev = 0`` (the first increment is the whole ``layer_norm(x_0)``),
    ``v = 0.5``, count 0; the same bits as passing that state explicitly."""
    x = _inputs(gen, 3, (4,), 12)
    norm = _norm(gen, 12)
    zeros = torch.zeros(4, 12)
    fresh = dict(
        x_acc=zeros,
        y_prev=zeros,
        v=torch.full((4, 12), 0.5),
        count=torch.zeros(4, 12, dtype=torch.int8),
    )
    _assert_same(_fused(x, norm), _fused(x, norm, **fresh))


def test_every_output_element_is_written(gen, poisoned_allocations):
    """Poison every allocation path (NaN or 77 in fresh tensors): any element the kernel
    skips shows up."""
    x = _inputs(gen, 5, (7,), 33)
    norm = _norm(gen, 33)
    with force_backend("reference"):
        want = _fused(x, norm)
    for backend in ("triton", "torch", "cpp"):
        with force_backend(backend):
            got, plain = _fused(x, norm), _composition(x, norm)
        _assert_same(got, plain)
        assert not any(t.is_floating_point() and t.isnan().any() for t in got)
        assert torch.equal(got[1], want[1]), "the running sum is the same float32 adds"


def _branch(gen, x, theta):
    """A pending branch on the stream ``x``: ternary int8 spikes shaped like it, its step."""
    spikes = torch.randint(-1, 2, x.shape, generator=gen, dtype=torch.int8)
    return spikes * (torch.rand(x.shape, generator=gen) < 0.4), torch.tensor(theta)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("branches", [1, 2])
@pytest.mark.parametrize("residual_out", [False, True])
def test_pending_branches_are_the_residual_adds(gen, backend, branches, residual_out):
    """With pending branches the op is the model's residual adds (``x + sigma * theta`` per
    branch, in order, in float32) and then the op on that stream, bit for bit on each
    backend; ``residual_out`` returns that stream."""
    x = _inputs(gen, 6, (3, 5), 100)
    norm = _norm(gen, 100)
    state = _state(gen, (3, 5), 100)
    pending = [_branch(gen, x, 0.13), _branch(gen, x, 0.071)][:branches]
    h = x
    for spikes, theta in pending:
        h = h + spikes.to(torch.float32) * theta
    kwargs = {}
    for prefix, (spikes, theta) in zip(("branch", "branch2")[:branches], pending, strict=True):
        kwargs |= {f"{prefix}_spikes": spikes, f"{prefix}_threshold": theta}
    with force_backend(backend):
        got = _fused(x, norm, **state, **kwargs, residual_out=residual_out)
        want = _fused(h, norm, **state)
    _assert_same(got[:5], want)
    assert len(got) == 5 + residual_out
    if residual_out:
        assert torch.equal(got[5], h), "the stream with the branches"
    assert not torch.equal(want[0], _fused(x, norm, **state)[0]), "the branches matter here"


@pytest.mark.parametrize("device", DEVICES)
def test_pending_branches_chunked_and_poisoned(gen, device, poisoned_allocations):
    """Chunked time with branches equals a whole run, and every element of the spikes and
    of the written stream is written (fresh allocations poisoned)."""
    x = _inputs(gen, 9, (2, 3), 130)
    norm = _norm(gen, 130)
    (b1, t1), (b2, t2) = _branch(gen, x, 0.2), _branch(gen, x, 0.05)

    def run(x, b1, b2, **state):
        return _fused(
            x, norm, device, **state, branch_spikes=b1, branch_threshold=t1,
            branch2_spikes=b2, branch2_threshold=t2, residual_out=True,
        )  # fmt: skip

    whole = run(x, b1, b2)
    parts, streams, state = [], [], {}
    sizes = [4, 1, 4]
    chunks = zip(x.split(sizes), b1.split(sizes), b2.split(sizes), strict=True)
    for xs, b1s, b2s in chunks:
        spikes, *values, stream = run(xs, b1s, b2s, **state)
        state = dict(zip(("x_acc", "y_prev", "v", "count"), values, strict=True))
        parts.append(spikes)
        streams.append(stream)
    _assert_same((torch.cat(parts), *state.values()), whole[:5])
    assert torch.equal(torch.cat(streams), whole[5])
    assert not whole[5].isnan().any()


# ---------------------------------------------------------------------------------------------
# inplace=True: the new state written into the given tensors (ops._inplace)

STATE_NAMES = ("x_acc", "y_prev", "v", "count")


def _run_inplace(x, norm, state, device="cpu", **kwargs):
    """``spike_layernorm_neuron(inplace=True)`` on the ``guarded`` state, checked in place."""
    call = lambda: _fused(x, norm, device, **state, **kwargs, inplace=True)  # noqa: E731
    return called_in_place(call, STATE_NAMES, state)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poisoned", [False, True])
@pytest.mark.parametrize("branches", [False, True])
def test_inplace_chunks_equal_whole(gen, backend, poisoned, branches, request):
    """Chunks of 4, 1 and 4 steps from a nonzero state, fed back in place, give the whole
    fresh-state run's bits; the activity flags are still recorded, and the residual stream
    (``residual_out``, an output, not state) is fresh."""
    if poisoned:
        request.getfixturevalue("poisoned_allocations")
    x = _inputs(gen, 9, (2, 3), 37)
    norm = _norm(gen, 37)
    state0 = _state(gen, (2, 3), 37)
    pending = {}
    if branches:
        (b1, t1), (b2, t2) = _branch(gen, x, 0.2), _branch(gen, x, 0.05)
        pending = dict(branch_spikes=b1, branch_threshold=t1, branch2_spikes=b2,
                       branch2_threshold=t2, residual_out=True)  # fmt: skip
    sizes = [4, 1, 4]
    active = torch.zeros(9, 2, dtype=torch.int32)
    with force_backend(backend):
        whole = _fused(x, norm, **state0, **pending)
        state = guarded(state0)
        parts, streams = [], []
        for i, xs in enumerate(x.split(sizes)):
            t0 = sum(sizes[:i])
            chunk = {k: v.split(sizes)[i] if k.endswith("spikes") else v
                     for k, v in pending.items()}  # fmt: skip
            out = _run_inplace(xs, norm, state, active=active[t0 : t0 + len(xs)], **chunk)
            parts.append(out[0])
            if branches:
                assert len(out) == 6 and out[5].shape == xs.shape
                assert all(out[5].data_ptr() != t.data_ptr() for t in state.values())
                streams.append(out[5])
    _assert_same((torch.cat(parts), *state.values()), whole[:5])
    if branches:
        assert torch.equal(torch.cat(streams), whole[5])
    assert torch.equal(active, whole[0].reshape(9, 2, -1).ne(0).any(-1).to(torch.int32))
    assert active.any() and whole[0].any()


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_single_step(gen, device):
    x = _inputs(gen, 1, (3, 5), 33)
    norm = _norm(gen, 33)
    state = {k: v.to(device) for k, v in _state(gen, (3, 5), 33).items()}
    want = _fused(x, norm, device, **state)
    got = _run_inplace(x, norm, guarded(state), device)
    _assert_same(got, want)


def test_inplace_on_meta_tensors():
    """Shapes only (meta tensors): the in-place state is not taken for an alias of the inputs
    (every meta tensor's address is 0)."""
    x = torch.empty(3, 5, 4, device="meta")
    state = [torch.empty(5, 4, device="meta") for _ in range(3)]
    state.append(torch.empty(5, 4, dtype=torch.int16, device="meta"))
    theta = torch.tensor(0.3, device="meta")
    out = spike_layernorm_neuron(x, None, None, EPS, theta, -8, 7, *state, inplace=True)
    assert out[0].shape == (3, 5, 4) and out[0].is_meta
    assert all(got is given for got, given in zip(out[1:], state, strict=True))


@pytest.mark.parametrize("other", ["x", "weight", "branch_spikes", "active", "state"])
def test_inplace_state_sharing_an_input_is_rejected(other):
    """A contiguous state inside the storage of an input the kernel reads (or another
    state), refused by name; the rejected call writes nothing (a run would write ``y_prev =
    bias``, nonzero)."""
    args = _good_args() | _full_state()
    args["bias"] = torch.full((4,), 0.5)
    buffer = torch.zeros(24, dtype=torch.float32)
    name = "y_prev"
    if other == "x":
        args["x"] = buffer.view(2, 3, 4)
    elif other == "weight":
        args["weight"] = buffer[:4]
    elif other == "branch_spikes":
        spikes = buffer.view(torch.int8)[:24].view(2, 3, 4)
        args |= dict(branch_spikes=spikes, branch_threshold=torch.tensor(0.1))
    elif other == "active":
        args["active"] = buffer.view(torch.int32)[:6].view(2, 3)
    else:
        args["x_acc"], name = buffer[:12].view(3, 4), "x_acc"
    args["y_prev"] = buffer[:12].view(3, 4)  # contiguous, but inside the other
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=f"{name} shares memory"):
        spike_layernorm_neuron(**args, inplace=True)
    assert not buffer.any(), "a rejected call must not write"
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{k} was written"


def _good_args() -> dict:
    return dict(
        x=torch.zeros(2, 3, 4),
        weight=torch.ones(4),
        bias=torch.zeros(4),
        eps=EPS,
        threshold=torch.tensor(0.25),
        n_min=-8,
        p_max=7,
    )


def _state_of(shape, count_dtype=torch.int8, count_value=0) -> dict:
    return dict(v=torch.zeros(shape), count=torch.full(shape, count_value, dtype=count_dtype))


def _full_state(**bad) -> dict:
    """All four states of ``_good_args``, zeros, with ``bad`` replacing some."""
    good = dict(x_acc=torch.zeros(3, 4), y_prev=torch.zeros(3, 4), **_state_of((3, 4)))
    return good | bad


BAD_INPUTS = [  # (case, what replaces the good arguments, error type, words in the message)
    ("T == 0", dict(x=torch.zeros(0, 3, 4)), ValueError, "T == 0"),
    ("int x", dict(x=torch.zeros(2, 3, 4, dtype=torch.int8)), TypeError, "x must have dtype"),
    ("1-d x", dict(x=torch.zeros(4)), ValueError, r"x must be \[T, \*, C\]"),
    ("C == 0", dict(x=torch.zeros(2, 3, 0), weight=None, bias=None), ValueError, "C == 0"),
    ("weight wrong C", dict(weight=torch.ones(5)), ValueError, r"weight must have shape \(4,\)"),
    ("bias int", dict(bias=torch.zeros(4, dtype=torch.int32)), TypeError, "bias must have"),
    ("negative eps", dict(eps=-1e-6), ValueError, "eps must be"),
    ("bool eps", dict(eps=True), TypeError, "eps must be a float"),
    ("x_acc wrong shape", dict(x_acc=torch.zeros(3, 5)), ValueError, "x_acc must have shape"),
    ("y_prev fp16", dict(y_prev=torch.zeros(3, 4).half()), TypeError, "y_prev must have dtype"),
    ("weight elsewhere", dict(weight=torch.ones(4, device="meta")), ValueError, "weight is on"),
    ("2 thresholds", dict(threshold=torch.ones(2)), ValueError, "threshold must have exactly"),
    ("int threshold", dict(threshold=torch.tensor(1)), TypeError, "threshold must have dtype"),
    ("float threshold", dict(threshold=0.25), TypeError, "threshold must be a torch.Tensor"),
    ("threshold 0", dict(threshold=torch.tensor(0.0)), ValueError, "threshold must be positive"),
    ("inverted bounds", dict(n_min=1, p_max=0), ValueError, "inverted"),
    ("float bound", dict(p_max=7.0), TypeError, "p_max must be an int"),
    ("v only", dict(v=torch.zeros(3, 4)), ValueError, "both v and count"),
    ("v shape", _state_of((3, 5)), ValueError, "v must have shape"),
    ("count float", dict(v=torch.zeros(3, 4), count=torch.zeros(3, 4)), TypeError, "count must"),
    ("count out of bounds", _state_of((3, 4), count_value=9), ValueError, "count must lie in"),
    ("count too narrow", dict(n_min=-200, **_state_of((3, 4))), ValueError, "cannot hold"),
    ("active shape", dict(active=torch.zeros(2, 4, dtype=torch.int32)), ValueError, "active"),
    (
        "branch without threshold",
        dict(branch_spikes=torch.zeros(2, 3, 4, dtype=torch.int8)),
        ValueError,
        "branch_spikes and branch_threshold go together",
    ),
    (
        "branch float",
        dict(branch_spikes=torch.zeros(2, 3, 4), branch_threshold=torch.tensor(0.1)),
        TypeError,
        "branch_spikes must have dtype",
    ),
    (
        "branch shape",
        dict(branch_spikes=torch.zeros(2, 3, 5).char(), branch_threshold=torch.tensor(0.1)),
        ValueError,
        "branch_spikes must have x's shape",
    ),
    (
        "branch not ternary",
        dict(branch_spikes=torch.full((2, 3, 4), 2).char(), branch_threshold=torch.tensor(0.1)),
        ValueError,
        "branch_spikes must hold ternary",
    ),
    (
        "branch threshold 0",
        dict(branch_spikes=torch.zeros(2, 3, 4).char(), branch_threshold=torch.tensor(0.0)),
        ValueError,
        "branch_threshold must be positive",
    ),
    (
        "branch on a bf16 stream",
        dict(
            x=torch.zeros(2, 3, 4).bfloat16(),
            branch_spikes=torch.zeros(2, 3, 4).char(),
            branch_threshold=torch.tensor(0.1),
        ),
        TypeError,
        "x must be float32",
    ),
    (
        "branch2 alone",
        dict(branch2_spikes=torch.zeros(2, 3, 4).char(), branch2_threshold=torch.tensor(0.1)),
        ValueError,
        "branch2_spikes needs branch_spikes",
    ),
    ("residual_out alone", dict(residual_out=True), ValueError, "residual_out needs branch"),
    ("residual_out int", dict(residual_out=1), TypeError, "residual_out must be a bool"),
    ("inplace int", dict(**_full_state(), inplace=1), TypeError, "inplace must be a bool"),
    ("inplace without state", dict(inplace=True), ValueError, "inplace=True needs x_acc"),
    (
        "inplace without count",
        dict(x_acc=torch.zeros(3, 4), y_prev=torch.zeros(3, 4), inplace=True),
        ValueError,
        "inplace=True needs v",
    ),
    (
        "inplace strided y_prev",
        dict(**_full_state(y_prev=torch.zeros(4, 3).t()), inplace=True),
        ValueError,
        "y_prev must be contiguous",
    ),
    (
        "inplace strided count",
        dict(**_full_state(count=torch.zeros(3, 8, dtype=torch.int8)[:, ::2]), inplace=True),
        ValueError,
        "count must be contiguous",
    ),
]


@pytest.mark.parametrize(
    ("case", "bad", "error", "words"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_is_rejected(case, bad, error, words, device):
    with pytest.raises(error, match=words):
        call_on(device, spike_layernorm_neuron, **{**_good_args(), **bad})


@pytest.mark.parametrize("with_state", [False, True])
def test_opcheck(gen, with_state):
    x = _inputs(gen, 3, (2, 5), 12)
    norm = _norm(gen, 12)
    state = _state(gen, (2, 5), 12) if with_state else dict.fromkeys(("a", "b", "c", "d"))
    active = torch.zeros(3, 2, dtype=torch.int32)
    args = (x, *norm.values(), *state.values(), active)
    torch.library.opcheck(torch.ops.spikekernels.spike_layernorm_neuron.default, args)
    (b1, t1), (b2, t2) = _branch(gen, x, 0.2), _branch(gen, x, 0.05)
    args += (b1, t1, b2, t2, with_state)  # residual_out with the state: both schemas' halves
    torch.library.opcheck(torch.ops.spikekernels.spike_layernorm_neuron.default, args)


def test_inplace_opcheck(gen):
    x = _inputs(gen, 3, (2, 5), 12)
    norm = _norm(gen, 12)
    state = _state(gen, (2, 5), 12)
    active = torch.zeros(3, 2, dtype=torch.int32)
    (b1, t1), (b2, t2) = _branch(gen, x, 0.2), _branch(gen, x, 0.05)
    for tail in ((None, None, None, None, False), (b1, t1, b2, t2, True)):
        args = (x, *norm.values(), *state.values(), active, *tail, True)
        torch.library.opcheck(torch.ops.spikekernels.spike_layernorm_neuron.default, args)


def test_torch_compile_fullgraph(gen):
    """Compiled == eager: the float state within the LayerNorm's float error, and the spikes
    and count bit for bit, which holds because no membrane comes within that error of a
    decision boundary (asserted first). On a CPU without the interpreter Inductor compiles
    the LayerNorm's PyTorch body in its own order (see test_layernorm.py), so ``u`` and the
    membrane may differ by a few ulps, and only the margin keeps that from flipping a spike."""
    x = _inputs(gen, 4, (3,), 24)
    norm = _norm(gen, 24)
    theta = float(norm["threshold"])
    # |u| <= |Y| <= 8 within 4 ulps per step, summed over T = 4 steps, in units of theta
    v_error = 4 * 4 * 8 * 2.0**-23 / theta

    def run(x):
        out = spike_layernorm_neuron(x * 2, *norm.values())
        return (*out, out[0].sum(0) + out[4])

    u = reference.spike_layernorm(x * 2, norm["weight"], norm["bias"], EPS)[0]
    margin = st_bif_margin(u, norm["threshold"], -8, 7)
    assert margin > 2 * v_error, f"data too close to a threshold: margin {margin:.3g}"

    torch._dynamo.reset()
    got, want = torch.compile(run, fullgraph=True)(x), run(x)
    for i in (0, 4, 5):
        assert torch.equal(got[i], want[i]), f"output {i}"
    for i in (1, 2):
        torch.testing.assert_close(got[i], want[i], rtol=4 * 2.0**-24, atol=1e-6)
    torch.testing.assert_close(got[3], want[3], rtol=0, atol=v_error)


class TestSpikeLayerNormNeuronModule:
    def _qann(self, gen, C=40, eps=1e-6):
        ln = torch.nn.LayerNorm(C, eps=eps)
        with torch.no_grad():
            ln.weight.copy_(torch.randn(C, generator=gen))
            ln.bias.copy_(torch.randn(C, generator=gen) * 0.1)
        neuron = STBIF(0.12, 16, True)
        neuron.fanout = 3
        return ln, neuron

    @pytest.mark.parametrize("source", ["nn.LayerNorm", "SpikeLayerNorm"])
    def test_is_the_two_modules_in_one(self, gen, source):
        ln, neuron = self._qann(gen)
        norm = SpikeLayerNorm.from_layernorm(ln)
        fused = SpikeLayerNormNeuron.from_layernorm_and_neuron(
            ln if source == "nn.LayerNorm" else norm, neuron
        )
        assert isinstance(fused, STBIF) and fused.fanout == 3
        assert fused.eps == 1e-6 and fused.weight.data_ptr() == ln.weight.data_ptr()
        x = _inputs(gen, 7, (2, 3), 40)
        want = neuron(norm(x))
        chunks = torch.cat([fused(c) for c in x.split([3, 1, 3])])
        _assert_same(
            (chunks, fused.x_acc, fused.y_prev, fused.v, fused.count),
            (want, norm.x_acc, norm.y_prev, neuron.v, neuron.count),
        )
        assert bool(fused.silent()) == (not bool(want[-1].any()))
        fused.reset()
        assert fused.count is None and fused.x_acc is None and fused.y_prev is None
        assert torch.equal(fused(x), want)

    def test_watch_records_which_samples_fired(self, gen):
        ln, neuron = self._qann(gen)
        fused = SpikeLayerNormNeuron.from_layernorm_and_neuron(ln, neuron)
        x = _inputs(gen, 4, (3, 5), 40)
        x[:, 1] = 0  # normalised to the bias alone: fires at step 0 only, if at all
        flags = torch.zeros(4, 3, dtype=torch.int32)
        fused.watch(flags)
        spikes = fused(x)
        fired = spikes.reshape(4, 3, -1).ne(0).any(-1).to(torch.int32)
        assert torch.equal(flags, fired) and flags.any()

    def test_pending_branches_and_the_written_stream(self, gen):
        """Branches are added before the LayerNorm, in order; the stream they make is kept
        for take_residual() (once), only when asked."""
        ln, neuron = self._qann(gen)
        fused = SpikeLayerNormNeuron.from_layernorm_and_neuron(ln, neuron)
        plain = SpikeLayerNormNeuron.from_layernorm_and_neuron(ln, STBIF(0.12, 16, True))
        x = _inputs(gen, 5, (2, 3), 40)
        b1, b2 = _branch(gen, x, 0.2), _branch(gen, x, 0.07)
        h = (x + b1[0].float() * b1[1]) + b2[0].float() * b2[1]
        assert torch.equal(fused(x, b1, b2, residual_out=True), plain(h))
        assert torch.equal(fused.take_residual(), h)
        with pytest.raises(RuntimeError, match="no residual stream"):
            fused.take_residual()
        fused(x, b1)
        with pytest.raises(RuntimeError, match="no residual stream"):
            fused.take_residual()
        with pytest.raises(ValueError, match="at most two pending branches"):
            fused(x, b1, b2, b1)

    def test_bad_construction(self, gen):
        ln, neuron = self._qann(gen)
        with pytest.raises(TypeError, match="ln must be an nn.LayerNorm"):
            SpikeLayerNormNeuron.from_layernorm_and_neuron(torch.nn.Linear(3, 3), neuron)
        with pytest.raises(TypeError, match="neuron must be an STBIF"):
            SpikeLayerNormNeuron.from_layernorm_and_neuron(ln, torch.nn.ReLU())
        with pytest.raises(ValueError, match="float_out"):
            SpikeLayerNormNeuron.from_layernorm_and_neuron(ln, STBIF(0.1, 16, True, float_out=True))
        with pytest.raises(ValueError, match=r"bias must have shape \(40,\)"):
            SpikeLayerNormNeuron(40, 0.1, 16, True, bias=torch.zeros(39))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_is_layernorm_then_neuron_at_vit_size(gen, dtype):
    """The fused kernel against the two kernels it fuses, at ViT-S/B widths: the same launch
    configuration, so the same reduction order."""
    for C in (384, 768):
        x = _inputs(gen, 8, (2, 197), C, dtype).cuda()
        norm = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _norm(gen, C).items()}
        active = torch.zeros(8, 2, dtype=torch.int32, device="cuda")
        got = spike_layernorm_neuron(x, *norm.values(), active=active)
        _assert_same(got, _composition(x, norm))
        assert torch.equal(active, got[0].reshape(8, 2, -1).ne(0).any(-1).to(torch.int32))

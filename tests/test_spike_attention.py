"""spike_attention_probs and spike_context (float mode, SPEC.md §5, §3, §2): the fused scores
spike product + Spike-Softmax + attention neuron and context product + neuron, bit for bit
against the step-by-step reference on every backend (Triton through the interpreter,
vectorised PyTorch, the oracle), and against the unfused ops they replace (spike_matmul,
Spike-Softmax with the same row function, st_bif)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, call_on, called_in_place, guarded
from test_exact_attention_ops import _after, _assert_same, _chunks, _packed_slice, _spikes

from spikekernels import exact_math, reference
from spikekernels.ops import spike_attention_probs, spike_context, spike_matmul, st_bif
from spikekernels.ops._dispatch import force_backend

# Level 16: the attention neuron is unsigned (SPEC.md §1).
BOUNDS = (0, 15)
NAMES = ("spikes", "x_acc", "y_prev", "membrane", "count")
OPERANDS = (("q", "q_count"), ("k_t", "k_count"))


def _case(gen, T, batch, m, d, n, *, state=False, device="cpu"):
    """Query and key spikes (``k_t`` a transposed view, as attention passes it), a scores
    scale that makes the probabilities span the neuron's levels, its threshold, and
    optionally the q/k neurons' counts and an incoming state (running scores, a softmax of
    them, membranes, counts)."""
    q = _spikes(gen, (T, *batch, m, d))
    k = _spikes(gen, (T, *batch, n, d))
    case = dict(
        q=q,
        k_t=k.transpose(-1, -2),
        scale=torch.tensor((0.5 + torch.rand((), generator=gen).item()) * 2 / d**0.5),
        threshold=torch.tensor(1 / 15 * (0.7 + 0.6 * torch.rand((), generator=gen).item())),
    )
    if state:
        q_before = torch.randint(-4, 5, (*batch, m, d), generator=gen, dtype=torch.int8)
        k_before = torch.randint(-4, 5, (*batch, d, n), generator=gen, dtype=torch.int8)
        x = 3 * torch.randn((*batch, m, n), generator=gen)
        case |= dict(
            q_count=_after(case["q"], q_before),
            k_count=_after(case["k_t"], k_before),
            state=(
                x,
                exact_math.softmax_rows(x),
                torch.rand((*batch, m, n), generator=gen),
                torch.randint(0, 16, (*batch, m, n), generator=gen, dtype=torch.int8),
            ),
        )
    return {
        name: tuple(s.to(device) for s in t) if name == "state" else t.to(device)
        for name, t in case.items()
    }


def _run(case, **kwargs):
    c = dict(case)
    spikes, state = spike_attention_probs(
        c.pop("q"), c.pop("k_t"), c.pop("scale"), c.pop("threshold"), *BOUNDS, **c, **kwargs
    )
    return (spikes, *state)


def _reference(case):
    c = {n: tuple(s.cpu() for s in t) if n == "state" else t.cpu() for n, t in case.items()}
    spikes, state = reference.spike_attention_probs(
        c.pop("q"), c.pop("k_t"), c.pop("scale"), c.pop("threshold"), *BOUNDS, **c
    )
    return (spikes, *state)


# (batch, M, D, N): M, D, N not multiples of 16; single rows, keys and channels; a head dim
# over several slices of the contraction; N = 197 (ViT at 224 px: 256 keys a tile, padded)
SHAPES = [
    ((1,), 1, 1, 1),
    ((2,), 5, 7, 3),
    ((2, 3), 17, 33, 20),
    ((), 19, 70, 16),
    ((1,), 21, 64, 197),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("batch", "m", "d", "n"), SHAPES)
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("state", [False, True])
def test_bit_exact(gen, device, T, batch, m, d, n, state):
    case = _case(gen, T, batch, m, d, n, state=state, device=device)
    got = _run(case)
    _assert_same(got, _reference(case), NAMES)
    assert set(got[0].unique().tolist()) <= {-1, 0, 1}
    if n > 1 or not state:  # one key: the incoming softmax is already 1, nothing moves
        assert got[0].any(), "the case should make the attention neuron fire"


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_every_backend_matches_the_reference(gen, backend):
    """Each backend pinned in turn (one that cannot run here falls back to torch)."""
    case = _case(gen, 4, (2,), 18, 40, 37, state=True)
    with force_backend(backend):
        got = _run(case)
    _assert_same(got, _reference(case), NAMES)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_the_unfused_ops(gen, device):
    """spike_matmul's increments, Spike-Softmax's running sum and differences (SPEC.md §3)
    with the library's row function, then st_bif: the same bits as the fused op."""
    case = _case(gen, 6, (2, 3), 17, 40, 29, state=True, device=device)
    x, y, v, s = case["state"]
    q_before, k_before = (
        (case[count].int() - case[name].sum(0, dtype=torch.int32)).char()
        for name, count in OPERANDS
    )
    e, _, _ = spike_matmul(case["q"], case["k_t"], case["scale"], q_before, k_before)
    u = torch.empty_like(e)
    for t in range(e.shape[0]):
        x = x + e[t]
        y_new = exact_math.softmax_rows(x)
        u[t] = y_new - y
        y = y_new
    spikes, v, s = st_bif(u, case["threshold"], *BOUNDS, v, s)
    _assert_same(_run(case), (spikes, x, y, v, s), NAMES)


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_equals_whole(gen, device):
    case = _case(gen, 12, (2,), 19, 36, 45, state=True, device=device)
    whole = _run(case)
    spikes, state = [], case["state"]
    for chunk in _chunks(case, OPERANDS, [5, 1, 6]):
        out, *state = _run(dict(chunk, state=state))
        spikes.append(out)
    _assert_same((torch.cat(spikes), *state), whole, NAMES)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_any_operand_layout(gen, backend):
    """The model's packed qkv slices, a D-strided q, a contiguous k_t and counts given as
    strided views all give the same bits as plain views."""
    case = _case(gen, 4, (2, 3), 18, 40, 37, state=True)
    laid_out = dict(
        case,
        q=_packed_slice(case["q"], 0),
        k_t=case["k_t"].contiguous(),
        q_count=case["q_count"].mT.contiguous().mT,
        k_count=case["k_count"].mT.contiguous().mT,
    )
    strided_q = dict(case, q=case["q"].mT.contiguous().mT)
    with force_backend(backend):
        got = [_run(laid_out), _run(strided_q)]
    want = _reference(case)
    for g in got:
        _assert_same(g, want, NAMES)


@pytest.mark.parametrize("device", DEVICES)
def test_silent_and_active_tiles(gen, device):
    """Spikes in one row block of one step, one key slice of another, silence elsewhere
    (and whole silent steps, where the neuron still moves toward the softmax)."""
    case = _case(gen, 6, (3,), 40, 70, 50, state=True, device=device)
    case["q"].zero_()
    case["k_t"].zero_()
    case["q"][0, 1, 17:20] = 1
    case["k_t"][2, 2, 40:60, 3:9] = -1
    case["q"][4, 0, 39, ::5] = 1
    _assert_same(_run(case), _reference(case), NAMES)


@pytest.mark.parametrize("device", DEVICES)
def test_active_flags(gen, device):
    """Which samples fired at which step: the flags every backend records while it writes
    the spikes, and only those (set, never cleared)."""
    case = _case(gen, 5, (3, 2), 20, 24, 30, state=True, device=device)
    case["q"][:, 1].zero_()  # sample 1 gets no spike, but its neurons may still settle
    case["k_t"][:, 1].zero_()
    want = _reference(case)[0].cpu()
    expect = want.reshape(5, 3, -1).ne(0).any(-1).int()
    for backend in ["triton", "torch", "reference"]:
        active = torch.zeros(5, 3, dtype=torch.int32, device=device)
        with force_backend(backend):
            got = _run(case, active=active)
        _assert_same(got[:1], (want,), NAMES[:1])
        assert torch.equal(active.cpu(), expect), backend


@pytest.mark.parametrize("device", DEVICES)
def test_every_output_element_is_written(gen, device, poisoned_allocations):
    for state in (False, True):
        case = _case(gen, 3, (2,), 21, 33, 35, state=state, device=device)
        _assert_same(_run(case), _reference(case), NAMES)


@pytest.mark.parametrize("device", DEVICES)
def test_state_is_fresh_and_inputs_untouched(gen, device):
    case = _case(gen, 3, (2,), 9, 20, 11, state=True, device=device)
    inputs = {n: t for n, t in case.items() if n != "state"}
    inputs |= {f"state[{i}]": t for i, t in enumerate(case["state"])}
    before = {n: t.clone() for n, t in inputs.items()}
    got = _run(case)
    for name, out, given in zip(NAMES[1:], got[1:], case["state"], strict=True):
        assert out.data_ptr() != given.data_ptr(), f"{name} aliases its input"
    for name, t in inputs.items():
        assert torch.equal(t, before[name]), f"{name} was modified"


def test_softmax_within_the_float_tolerance(gen):
    """SPEC.md §8: the fused op's probabilities (its ``y_prev`` after the run) are within 2x
    the error torch.softmax shows in float32, against float64, on the same running scores.
    The op's bits are the same on every device, torch's error is not (its vectorised exp):
    the floor of 2^-24 (about 2 ulp of these probabilities) keeps the bound from depending
    on this CPU, and still fails a softmax several ulp off (ours is 1.1 ulp here)."""
    case = _case(gen, 6, (2, 3), 17, 64, 197)
    _, x, y, _, _ = _run(case)
    exact = torch.softmax(x.double(), dim=-1)
    ours = (y.double() - exact).abs().max().item()
    torchs = (torch.softmax(x, dim=-1).double() - exact).abs().max().item()
    assert ours <= 2 * max(torchs, 2**-24), (ours, torchs)
    assert torch.allclose(y.sum(-1), torch.ones(()), atol=1e-5)


def _good() -> dict:
    return dict(
        q=torch.zeros(2, 3, 4, 8, dtype=torch.int8),
        k_t=torch.zeros(2, 3, 8, 5, dtype=torch.int8),
        scale=torch.tensor(0.1),
        threshold=torch.tensor(0.07),
        n_min=0,
        p_max=15,
    )


def _state(**bad):
    good = dict(
        x_acc=torch.zeros(3, 4, 5),
        y_prev=torch.zeros(3, 4, 5),
        membrane=torch.zeros(3, 4, 5),
        count=torch.zeros(3, 4, 5, dtype=torch.int8),
    )
    return tuple({**good, **bad}.values())


# (case, what replaces the good arguments, error type, words the message must contain)
BAD = [
    ("T == 0", dict(q=torch.zeros(0, 3, 4, 8, dtype=torch.int8)), ValueError, "T == 0"),
    ("q float", dict(q=torch.zeros(2, 3, 4, 8)), TypeError, "q must have dtype"),
    ("k_t int32", dict(k_t=torch.zeros(2, 3, 8, 5, dtype=torch.int32)), TypeError, "k_t must"),
    ("D differs", dict(k_t=torch.zeros(2, 3, 9, 5, dtype=torch.int8)), ValueError, "K=8"),
    ("q not ternary", dict(q=torch.full((2, 3, 4, 8), 2, dtype=torch.int8)), ValueError, "q must"),
    ("scale float64", dict(scale=torch.tensor(0.1, dtype=torch.float64)), TypeError, "scale must"),
    ("scale 2 elements", dict(scale=torch.ones(2)), ValueError, "scale must have exactly one"),
    ("scale nan", dict(scale=torch.tensor(float("nan"))), ValueError, "scale must be positive"),
    ("threshold <= 0", dict(threshold=torch.tensor(-1.0)), ValueError, "threshold must be"),
    ("bounds inverted", dict(n_min=3, p_max=-4), ValueError, "n_min=3 > p_max=-4"),
    ("int8 overflow", dict(p_max=255), ValueError, "int8 count would overflow"),
    ("q_count shape", dict(q_count=torch.zeros(3, 4, 9).char()), ValueError, "q_count must"),
    ("state a tensor", dict(state=torch.zeros(3, 4, 5)), TypeError, "state must be None or"),
    ("state 3 parts", dict(state=_state()[:3]), TypeError, "state must be None or"),
    ("state partial", dict(state=_state(membrane=None)), ValueError, "give all of x_acc"),
    ("x_acc float64", dict(state=_state(x_acc=torch.zeros(3, 4, 5).double())), TypeError, "x_acc"),
    ("y_prev shape", dict(state=_state(y_prev=torch.zeros(3, 4, 6))), ValueError, "y_prev must"),
    (
        "count int32",
        dict(state=_state(count=torch.zeros(3, 4, 5).int())),
        TypeError,
        "count must have dtype",
    ),
    (
        "count out of bounds",
        dict(state=_state(count=torch.full((3, 4, 5), 16).char())),
        ValueError,
        "count must lie",
    ),
    ("active shape", dict(active=torch.zeros(2, 2, dtype=torch.int32)), ValueError, "active"),
    ("inplace int", dict(state=_state(), inplace=1), TypeError, "inplace must be a bool"),
    ("inplace without state", dict(inplace=True), ValueError, "inplace=True needs x_acc"),
    (
        "inplace strided y_prev",
        dict(state=_state(y_prev=torch.zeros(3, 5, 4).mT), inplace=True),
        ValueError,
        "y_prev must be contiguous",
    ),
    (
        "inplace strided count",
        dict(state=_state(count=torch.zeros(3, 4, 10, dtype=torch.int8)[..., ::2]), inplace=True),
        ValueError,
        "count must be contiguous",
    ),
]


@pytest.mark.parametrize(("case", "bad", "error", "words"), BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_is_rejected(case, bad, error, words, device):
    with pytest.raises(error, match=words):
        call_on(device, spike_attention_probs, **{**_good(), **bad})


@pytest.mark.parametrize("state", [False, True])
def test_opcheck(gen, state):
    case = _case(gen, 3, (2,), 6, 20, 9, state=state)
    c = dict(case)
    args = [c.pop("q"), c.pop("k_t"), c.pop("scale"), c.pop("threshold"), *BOUNDS]
    args += [c.get("q_count"), c.get("k_count"), *c.get("state", (None,) * 4)]
    torch.library.opcheck(torch.ops.spikekernels.spike_attention_probs.default, tuple(args))


def test_torch_compile_fullgraph(gen):
    case = _case(gen, 4, (2,), 7, 20, 9)

    def block(q, k_t):
        spikes, *state = _run(dict(case, q=q, k_t=k_t))
        return spikes.sum(0, dtype=torch.int32), *state

    compiled = torch.compile(block, fullgraph=True)
    got, want = compiled(case["q"], case["k_t"]), block(case["q"], case["k_t"])
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.cuda
@pytest.mark.parametrize("state", [False, True])
def test_cuda_matches_cpu_reference_at_vit_size(gen, state):
    """The kernel on the GPU (int8 tensor cores, GPU float arithmetic) against the reference
    on the CPU, at ViT-S size (197 tokens, head dim 64, 6 heads)."""
    case = _case(gen, 6, (2, 6), 197, 64, 197, state=state, device="cuda")
    _assert_same(_run(case), _reference(case), NAMES)


# ---------------------------------------------------------------------------------------------
# spike_context

CTX_BOUNDS = (-8, 7)  # level 16, signed


def _merged(spikes: torch.Tensor) -> torch.Tensor:
    """``[T, *batch, M, D]`` with the last batch dim (the heads) merged into the channels."""
    t, *batch, m, d = spikes.shape
    return spikes.movedim(-3, -2).reshape(t, *batch[:-1], m, batch[-1] * d)


CTX_NAMES = ("spikes", "membrane", "count")
CTX_OPERANDS = (("a", "a_count"), ("v", "v_count"))


def _ctx_case(gen, T, batch, m, n, d, *, state=False, device="cpu"):
    """Attention and value spikes (``v`` a head-split view, as attention passes it), a scale
    and threshold that make the context span the neuron's levels, optionally the two
    neurons' counts and an incoming state."""
    v = _spikes(gen, (T, *batch, d, n), group_dim=-1).transpose(-1, -2)
    case = dict(
        a=_spikes(gen, (T, *batch, m, n)),
        v=v,
        scale=torch.tensor(0.5 / n**0.5),
        threshold=torch.tensor(0.05 + 0.1 * torch.rand((), generator=gen).item()),
    )
    if state:
        a_before = torch.randint(0, 16, (*batch, m, n), generator=gen, dtype=torch.int8)
        v_before = torch.randint(-8, 8, (*batch, n, d), generator=gen, dtype=torch.int8)
        case |= dict(
            a_count=_after(case["a"], a_before),
            v_count=_after(case["v"], v_before),
            state=(
                torch.rand((*batch, m, d), generator=gen),
                torch.randint(-8, 8, (*batch, m, d), generator=gen, dtype=torch.int8),
            ),
        )
    return {
        name: tuple(s.to(device) for s in t) if name == "state" else t.to(device)
        for name, t in case.items()
    }


def _run_ctx(case, **kwargs):
    c = dict(case)
    spikes, state = spike_context(
        c.pop("a"), c.pop("v"), c.pop("scale"), c.pop("threshold"), *CTX_BOUNDS, **c, **kwargs
    )
    return (spikes, *state)


def _reference_ctx(case):
    c = {n: tuple(s.cpu() for s in t) if n == "state" else t.cpu() for n, t in case.items()}
    spikes, state = reference.spike_context(
        c.pop("a"), c.pop("v"), c.pop("scale"), c.pop("threshold"), *CTX_BOUNDS, **c
    )
    return (spikes, *state)


# (batch, M, N, D): odd sizes, single rows/keys/channels, keys over several slices of the
# contraction, ViT's 197 keys and head dim 64
CTX_SHAPES = [
    ((1,), 1, 1, 1),
    ((2,), 5, 3, 7),
    ((2, 3), 17, 40, 33),
    ((), 19, 70, 16),
    ((1,), 21, 197, 64),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("batch", "m", "n", "d"), CTX_SHAPES)
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("state", [False, True])
def test_context_bit_exact(gen, device, T, batch, m, n, d, state):
    case = _ctx_case(gen, T, batch, m, n, d, state=state, device=device)
    got = _run_ctx(case)
    _assert_same(got, _reference_ctx(case), CTX_NAMES)
    assert set(got[0].unique().tolist()) <= {-1, 0, 1}


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("merge_heads", [False, True])
def test_context_every_backend_matches_the_reference(gen, backend, merge_heads):
    """Each backend pinned in turn; with ``merge_heads`` the spikes come out [T, B, M, H * D],
    the same bits."""
    case = _ctx_case(gen, 4, (2, 3), 18, 37, 40, state=True)
    with force_backend(backend):
        got = _run_ctx(case, merge_heads=merge_heads)
    want = _reference_ctx(case)
    if merge_heads:
        want = (_merged(want[0]), *want[1:])
    _assert_same(got, want, CTX_NAMES)
    assert got[0].any()


@pytest.mark.parametrize("device", DEVICES)
def test_context_matches_the_unfused_ops(gen, device):
    """spike_matmul's increments, then st_bif on them: the same bits as the fused op."""
    case = _ctx_case(gen, 6, (2, 3), 17, 29, 40, state=True, device=device)
    a_before, v_before = (
        (case[count].int() - case[name].sum(0, dtype=torch.int32)).char()
        for name, count in CTX_OPERANDS
    )
    e, _, _ = spike_matmul(case["a"], case["v"], case["scale"], a_before, v_before)
    want = st_bif(e, case["threshold"], *CTX_BOUNDS, *case["state"])
    _assert_same(_run_ctx(case), want, CTX_NAMES)


@pytest.mark.parametrize("device", DEVICES)
def test_context_chunked_equals_whole(gen, device):
    case = _ctx_case(gen, 12, (2,), 19, 45, 36, state=True, device=device)
    whole = _run_ctx(case)
    spikes, state = [], case["state"]
    for chunk in _chunks(case, CTX_OPERANDS, [5, 1, 6]):
        out, *state = _run_ctx(dict(chunk, state=state))
        spikes.append(out)
    _assert_same((torch.cat(spikes), *state), whole, CTX_NAMES)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_context_reads_a_packed_value_slice(gen, backend):
    """v sliced from a packed qkv and counts as strided views, as the model passes them."""
    case = _ctx_case(gen, 4, (2, 3), 18, 37, 40, state=True)
    laid_out = dict(
        case,
        v=_packed_slice(case["v"], 2),
        a_count=case["a_count"].mT.contiguous().mT,
        v_count=case["v_count"].mT.contiguous().mT,
    )
    with force_backend(backend):
        got = _run_ctx(laid_out)
    _assert_same(got, _reference_ctx(case), CTX_NAMES)


@pytest.mark.parametrize("device", DEVICES)
def test_context_silent_and_active_tiles(gen, device):
    """Spikes in one row block of one step, one key slice of another, silence elsewhere."""
    case = _ctx_case(gen, 6, (3,), 40, 70, 50, state=True, device=device)
    case["a"].zero_()
    case["v"].zero_()
    case["a"][0, 1, 17:20] = 1
    case["v"][2, 2, 40:60, 3:9] = -1
    case["a"][4, 0, 39, ::5] = 1
    _assert_same(_run_ctx(case), _reference_ctx(case), CTX_NAMES)


@pytest.mark.parametrize("device", DEVICES)
def test_context_active_flags(gen, device):
    case = _ctx_case(gen, 5, (3, 2), 20, 30, 24, state=True, device=device)
    case["a"][:, 1].zero_()
    case["v"][:, 1].zero_()
    want = _reference_ctx(case)[0].cpu()
    expect = want.reshape(5, 3, -1).ne(0).any(-1).int()
    assert 0 < expect.sum() < expect.numel(), "some samples fire, some not"
    for backend in ["triton", "torch", "reference"]:
        active = torch.zeros(5, 3, dtype=torch.int32, device=device)
        with force_backend(backend):
            got = _run_ctx(case, active=active)
        _assert_same(got[:1], (want,), CTX_NAMES[:1])
        assert torch.equal(active.cpu(), expect), backend


@pytest.mark.parametrize("device", DEVICES)
def test_context_every_output_element_is_written(gen, device, poisoned_allocations):
    for state in (False, True):
        for merge_heads in (False, True):
            case = _ctx_case(gen, 3, (2, 2), 21, 35, 33, state=state, device=device)
            want = _reference_ctx(case)
            if merge_heads:
                want = (_merged(want[0]), *want[1:])
            _assert_same(_run_ctx(case, merge_heads=merge_heads), want, CTX_NAMES)


def _good_ctx() -> dict:
    return dict(
        a=torch.zeros(2, 3, 4, 8, dtype=torch.int8),
        v=torch.zeros(2, 3, 8, 5, dtype=torch.int8),
        scale=torch.tensor(0.1),
        threshold=torch.tensor(0.07),
        n_min=-8,
        p_max=7,
    )


BAD_CTX = [
    ("a float", dict(a=torch.zeros(2, 3, 4, 8)), TypeError, "a must have dtype"),
    ("N differs", dict(v=torch.zeros(2, 3, 9, 5, dtype=torch.int8)), ValueError, "K=8"),
    ("v not ternary", dict(v=torch.full((2, 3, 8, 5), 3, dtype=torch.int8)), ValueError, "v must"),
    ("scale int", dict(scale=torch.tensor(1)), TypeError, "scale must"),
    ("threshold 0", dict(threshold=torch.tensor(0.0)), ValueError, "threshold must be"),
    ("v_count shape", dict(v_count=torch.zeros(3, 8, 6).char()), ValueError, "v_count must"),
    ("state a tensor", dict(state=torch.zeros(3, 4, 5)), TypeError, "state must be None or"),
    ("state half", dict(state=(torch.zeros(3, 4, 5), None)), ValueError, "give all of membrane"),
    (
        "membrane float64",
        dict(state=(torch.zeros(3, 4, 5).double(), torch.zeros(3, 4, 5).char())),
        TypeError,
        "membrane must",
    ),
    (
        "count out of bounds",
        dict(state=(torch.zeros(3, 4, 5), torch.full((3, 4, 5), 9).char())),
        ValueError,
        "count must lie",
    ),
    ("merge_heads int", dict(merge_heads=1), TypeError, "merge_heads must be a bool"),
    (
        "merge_heads without heads",
        dict(a=torch.zeros(2, 4, 8).char(), v=torch.zeros(2, 8, 5).char(), merge_heads=True),
        ValueError,
        "merge_heads=True",
    ),
    (
        "inplace int",
        dict(state=(torch.zeros(3, 4, 5), torch.zeros(3, 4, 5).char()), inplace=1),
        TypeError,
        "inplace must be a bool",
    ),
    ("inplace without state", dict(inplace=True), ValueError, "inplace=True needs membrane"),
    (
        "inplace strided membrane",
        dict(state=(torch.zeros(3, 5, 4).mT, torch.zeros(3, 4, 5).char()), inplace=True),
        ValueError,
        "membrane must be contiguous",
    ),
]


@pytest.mark.parametrize(("case", "bad", "error", "words"), BAD_CTX, ids=[b[0] for b in BAD_CTX])
@pytest.mark.parametrize("device", DEVICES)
def test_context_bad_input_is_rejected(case, bad, error, words, device):
    with pytest.raises(error, match=words):
        call_on(device, spike_context, **{**_good_ctx(), **bad})


@pytest.mark.parametrize(("state", "merge_heads"), [(False, False), (True, True)])
def test_context_opcheck(gen, state, merge_heads):
    case = _ctx_case(gen, 3, (2, 2), 6, 9, 20, state=state)
    c = dict(case)
    args = [c.pop("a"), c.pop("v"), c.pop("scale"), c.pop("threshold"), *CTX_BOUNDS]
    args += [c.get("a_count"), c.get("v_count"), *c.get("state", (None,) * 2)]
    args += [None, merge_heads]  # active
    torch.library.opcheck(torch.ops.spikekernels.spike_context.default, tuple(args))


@pytest.mark.cuda
@pytest.mark.parametrize("state", [False, True])
def test_context_cuda_matches_cpu_reference_at_vit_size(gen, state):
    case = _ctx_case(gen, 6, (2, 6), 197, 197, 64, state=state, device="cuda")
    _assert_same(_run_ctx(case), _reference_ctx(case), CTX_NAMES)


# ---------------------------------------------------------------------------------------------
# inplace=True: the new state written into the given tensors (ops._inplace)

# op -> (case maker, runner, output names, operands with their counts, a case's shape,
# keyword arguments): the context's spikes with the heads merged, as the model runs it
INPLACE_OPS = {
    "probs": (_case, _run, NAMES, OPERANDS, ((2,), 9, 20, 11), {}),
    "context": (_ctx_case, _run_ctx, CTX_NAMES, CTX_OPERANDS, ((2, 2), 9, 11, 20),
                dict(merge_heads=True)),
}  # fmt: skip


def _run_inplace(op, case, state, **kwargs):
    """The op with ``inplace=True`` on the ``guarded`` state, checked in place."""
    _, run, names, *_, extra = INPLACE_OPS[op]
    call = lambda: run(dict(case, state=state), **extra, **kwargs, inplace=True)  # noqa: E731
    return called_in_place(call, names[1:], state)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("poisoned", [False, True])
@pytest.mark.parametrize("op", INPLACE_OPS)
def test_inplace_chunks_equal_whole(gen, op, poisoned, backend, request):
    """Chunks of 4, 1 and 4 steps from a nonzero state (and nonzero counts before the run),
    the state fed back in place, give the whole fresh-state run's bits; the activity flags
    are still recorded."""
    if poisoned:
        request.getfixturevalue("poisoned_allocations")
    make, run, names, operands, shape, extra = INPLACE_OPS[op]
    case = make(gen, 9, *shape, state=True)
    active = torch.zeros(9, shape[0][0], dtype=torch.int32)
    with force_backend(backend):
        whole = run(case, **extra)
        state = guarded(case["state"])
        spikes, t0 = [], 0
        for chunk in _chunks(case, operands, [4, 1, 4]):
            n = chunk[operands[0][0]].shape[0]
            spikes.append(_run_inplace(op, chunk, state, active=active[t0 : t0 + n])[0])
            t0 += n
    _assert_same((torch.cat(spikes), *state), whole, names)
    fired = whole[0].reshape(9, active.shape[1], -1).ne(0).any(-1).to(torch.int32)
    assert torch.equal(active, fired) and active.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", INPLACE_OPS)
def test_inplace_single_step(gen, op, device):
    make, run, names, _, shape, extra = INPLACE_OPS[op]
    case = make(gen, 1, *shape, state=True, device=device)
    want = run(case, **extra)
    _assert_same(_run_inplace(op, case, guarded(case["state"])), want, names)


@pytest.mark.parametrize("op", INPLACE_OPS)
def test_inplace_on_meta_tensors(op):
    """Shapes only (meta tensors): the in-place state is not taken for an alias of the inputs
    (every meta tensor's address is 0)."""
    fn, good = (spike_attention_probs, _good()) if op == "probs" else (spike_context, _good_ctx())
    args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in good.items()}
    floats = 3 if op == "probs" else 1
    state = [torch.empty(3, 4, 5, device="meta") for _ in range(floats)]
    state.append(torch.empty(3, 4, 5, dtype=torch.int8, device="meta"))
    spikes, got = fn(**args, state=tuple(state), inplace=True)
    assert spikes.shape == (2, 3, 4, 5) and spikes.is_meta
    assert all(g is s for g, s in zip(got, state, strict=True))


# (op, the input whose storage holds a state): the count (the name the refusal gives) in an
# int8 buffer of zeros; "state": the count inside the first float state's storage
SHARING = [("probs", name) for name in ("q", "k_t", "q_count", "scale", "active", "state")]
SHARING += [("context", name) for name in ("a", "v", "v_count", "threshold", "active", "state")]


@pytest.mark.parametrize(("op", "other"), SHARING)
def test_inplace_state_sharing_an_input_is_rejected(op, other):
    """A contiguous state inside the storage of an input the kernel reads (or of another
    state), refused by name; the rejected call writes nothing (a run would write the count
    and the membrane: the probabilities move from 0, a context membrane of 2 fires)."""
    fn, args = (spike_attention_probs, _good()) if op == "probs" else (spike_context, _good_ctx())
    buffer = torch.zeros(240, dtype=torch.int8)
    count, name = buffer[:60].view(3, 4, 5), "count"  # contiguous, but inside the other
    floats = [torch.zeros(3, 4, 5) for _ in range(3 if op == "probs" else 1)]
    if other == "state":
        floats[0] = buffer.view(torch.float32).view(3, 4, 5)
        name = "x_acc" if op == "probs" else "membrane"
    else:
        absent = dict(  # the good arguments' defaults
            q_count=torch.zeros(3, 4, 8, dtype=torch.int8),
            v_count=torch.zeros(3, 8, 5, dtype=torch.int8),
            active=torch.zeros(2, 3, dtype=torch.int32),
        )
        given = args.get(other, absent.get(other))
        part = buffer[: given.numel() * given.element_size()]
        args[other] = part.view(given.dtype).view(given.shape)
    if op == "context":
        floats[0].fill_(2.0)
    before = buffer.clone(), [t.clone() for t in floats]
    with pytest.raises(ValueError, match=f"{name} shares memory"):
        fn(**args, state=(*floats, count), inplace=True)
    assert torch.equal(buffer, before[0]), "a rejected call must not write"
    assert all(torch.equal(t, b) for t, b in zip(floats, before[1], strict=True))


@pytest.mark.parametrize("op", INPLACE_OPS)
def test_inplace_opcheck(gen, op):
    make, _, _, _, shape, extra = INPLACE_OPS[op]
    case = make(gen, 3, *shape, state=True)
    c = dict(case)
    a, b = (c.pop(k) for k in list(c)[:2])
    args = [a, b, c.pop("scale"), c.pop("threshold"), *(BOUNDS if op == "probs" else CTX_BOUNDS)]
    args += [*(c[count] for _, count in INPLACE_OPS[op][3]), *c["state"], None]  # active
    args += [*extra.values(), True]  # merge_heads for the context, inplace
    name = "spike_attention_probs" if op == "probs" else "spike_context"
    torch.library.opcheck(getattr(torch.ops.spikekernels, name).default, tuple(args))


def test_count_check_forms_nothing_it_will_not_read(monkeypatch):
    """Where the data checks do not run (a GPU without ``validate``), the counts' check
    returns before it forms the count before the steps: that is a sum over every step, a
    launch and a read of the chunk's spikes, for a check that then reads nothing."""
    import spikekernels.ops._attention as attention_checks

    def formed(*args):
        raise AssertionError("the count before the steps was formed for a check that skips")

    monkeypatch.setattr(attention_checks, "may_read_data", lambda t, validate: False)
    monkeypatch.setattr(attention_checks, "count_before_steps", formed)
    spikes = torch.ones(3, 2, 4, dtype=torch.int8)
    attention_checks.check_counts_consistent(spikes, spikes.sum(0).char(), "q", False)
    monkeypatch.undo()
    # where it runs, it checks: a count after of -128 puts the one before at -131
    with pytest.raises(ValueError, match="running count of q"):
        after = torch.full((2, 4), -128, dtype=torch.int8)
        attention_checks.check_counts_consistent(spikes, after, "q", False)

"""exact_attention_probs and exact_context (SPEC.md §5, §9.2-§9.4): the fused scores product +
softmax + attention neuron and context product + neuron, bit for bit against the step-by-step
reference and against the unfused modules they replace (RunningSpikeMatmul, ExactSoftmax /
context_value, TargetNeuron), on every backend (Triton through the interpreter, vectorised
PyTorch, the oracle)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CPU_PASS_ONLY,
    DEVICES,
    TRITON_DEVICES,
    assert_same_bits,
    call_on,
    called_in_place,
    guarded,
)

from spikekernels import exact_math, reference
from spikekernels.kernels import TRITON_AVAILABLE
from spikekernels.nn.exact_attention import ExactAttentionProbs, ExactContext
from spikekernels.nn.exact_layers import ExactSoftmax
from spikekernels.nn.spike_matmul import RunningSpikeMatmul
from spikekernels.nn.target_neuron import TargetNeuron
from spikekernels.ops import exact_attention, exact_attention_probs, exact_context
from spikekernels.ops._dispatch import force_backend
from spikekernels.ops.exact_attention import MAX_CONTRACTION

# Level 16: the attention neuron is unsigned, the context neuron signed (SPEC.md §1).
ATTN_LEVEL, ATTN_BOUNDS = 16, (0, 15)
CTX_LEVEL, CTX_BOUNDS = 16, (-8, 7)
# Row groups that fall silent together, so that some kernel tiles are silent and others not.
GROUP = 16


def _spikes(gen, shape, density=0.5, silent=0.3, group_dim=-2):
    """Ternary int8 spikes; groups of GROUP rows (or columns) silent together, and a silent
    step when T > 2."""
    x = torch.randint(-1, 2, shape, generator=gen, dtype=torch.int8)
    x = x * (torch.rand(shape, generator=gen) < density)
    n = shape[group_dim]
    keep = torch.rand((*shape[:-2], -(-n // GROUP)), generator=gen) >= silent
    keep = keep.repeat_interleave(GROUP, dim=-1)[..., :n]
    x = x * (keep.unsqueeze(-1) if group_dim == -2 else keep.unsqueeze(-2))
    if shape[0] > 2:
        x[1] = 0
    return x


def _cpu(t):
    return None if t is None else t.cpu()


def _to(t, device):
    return None if t is None else t.to(device)


def _after(x: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """The count after spikes ``x`` ``[T, ...]`` of a neuron whose count before them was
    ``before``: what the ops take as ``*_count``."""
    return (before.to(torch.int32) + x.sum(0, dtype=torch.int32)).to(torch.int8)


def _chunks(case, operands, sizes):
    """``case`` split in time into chunks of ``sizes`` steps: for each operand (``(spikes
    name, count name)``) the chunk's spikes and the count of their neuron after that chunk
    (the count before the run, the case's count after it less all its spikes, or 0, plus the
    spikes so far)."""
    chunks = [dict(case) for _ in sizes]
    for name, count_name in operands:
        x = case[name]
        running = torch.zeros(x.shape[1:], dtype=torch.int32, device=x.device)
        if case.get(count_name) is not None:
            running = case[count_name].to(torch.int32) - x.sum(0, dtype=torch.int32)
        for chunk, part in zip(chunks, x.split(sizes), strict=True):
            running = running + part.sum(0, dtype=torch.int32)
            chunk[name], chunk[count_name] = part, running.to(torch.int8)
    return chunks


def _assert_same(got, want, names):
    for name, g, w in zip(names, got, want, strict=True):
        assert_same_bits(g, w, name)


# ---------------------------------------------------------------------------------------------
# exact_attention_probs

PROBS_NAMES = ("spikes", "count")
PROBS_OPERANDS = (("q", "q_count"), ("k_t", "k_count"))


def _probs_case(gen, T, batch, m, d, n, *, state=False, device="cpu"):
    """Query and key spikes (``k_t`` a transposed view, as attention passes it), a score gain
    from two steps (``exact_math.score_gain``) scaled so that the probabilities span the
    neuron's levels, the neuron's threshold and optionally nonzero counts before the run
    (given as the counts after it, ``q_count``/``k_count``) and an incoming neuron count."""
    q = _spikes(gen, (T, *batch, m, d))
    k = _spikes(gen, (T, *batch, n, d))
    theta_q, theta_k = 0.5 + torch.rand(2, generator=gen)
    case = dict(
        q=q,
        k_t=k.transpose(-1, -2),
        gain=exact_math.score_gain(theta_q, theta_k, d) * 2,
        threshold=torch.tensor(1 / 15 * (0.7 + 0.6 * torch.rand((), generator=gen).item())),
    )
    if state:
        q_before = torch.randint(-4, 5, (*batch, m, d), generator=gen, dtype=torch.int8)
        k_before = torch.randint(-4, 5, (*batch, d, n), generator=gen, dtype=torch.int8)
        case |= dict(
            q_count=_after(case["q"], q_before),
            k_count=_after(case["k_t"], k_before),
            count=torch.randint(0, 16, (*batch, m, n), generator=gen, dtype=torch.int8),
        )
    return {name: t.to(device) for name, t in case.items()}


def _run_probs(case, bounds=ATTN_BOUNDS, **kwargs):
    c = dict(case)
    return exact_attention_probs(
        c.pop("q"), c.pop("k_t"), c.pop("gain"), c.pop("threshold"), *bounds, **c, **kwargs
    )


def _reference_probs(case, bounds=ATTN_BOUNDS):
    c = {name: _cpu(t) for name, t in case.items()}
    return reference.exact_attention_probs(
        c.pop("q"), c.pop("k_t"), c.pop("gain"), c.pop("threshold"), *bounds, **c
    )


def _unfused_probs(case, chunks):
    """What exact mode runs today, module by module, over the given chunks of time."""
    scores = RunningSpikeMatmul().to(case["q"].device)
    softmax = ExactSoftmax(case["gain"])
    neuron = TargetNeuron(case["threshold"], ATTN_LEVEL, signed=False)
    spikes = [
        neuron(softmax(scores(q, k)))
        for q, k in zip(case["q"].split(chunks), case["k_t"].split(chunks), strict=True)
    ]
    return torch.cat(spikes), neuron.count


# (batch, M, D, N): M, D, N not multiples of 16; single rows, keys and channels; a head dim
# over several slices of the contraction; N = 197 (ViT at 224 px: 256 keys a tile, padded)
PROBS_SHAPES = [
    ((1,), 1, 1, 1),
    ((2,), 5, 7, 3),
    ((2, 3), 17, 33, 20),
    ((), 19, 70, 16),
    ((1,), 21, 64, 197),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("batch", "m", "d", "n"), PROBS_SHAPES)
@pytest.mark.parametrize("T", [1, 5])
def test_probs_bit_exact(gen, device, T, batch, m, d, n):
    case = _probs_case(gen, T, batch, m, d, n, device=device)
    got = _run_probs(case)
    _assert_same(got, _reference_probs(case), PROBS_NAMES)
    assert set(got[0].unique().tolist()) <= {-1, 0, 1}
    assert got[0].any(), "the case should make the attention neuron fire"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("batch", "m", "d", "n"), PROBS_SHAPES[1:])
def test_probs_matches_the_unfused_modules(gen, device, batch, m, d, n):
    """Chunk by chunk, the fused op gives the spikes and state that RunningSpikeMatmul ->
    ExactSoftmax -> TargetNeuron give (what ExactAttention runs today)."""
    case = _probs_case(gen, 7, batch, m, d, n, device=device)
    chunks = [3, 1, 3]
    want = _unfused_probs(case, chunks)
    spikes, count = [], None
    for chunk in _chunks(case, PROBS_OPERANDS, chunks):
        out, count = _run_probs(dict(chunk, count=count))
        spikes.append(out)
    _assert_same((torch.cat(spikes), count), want, PROBS_NAMES)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_probs_every_backend_matches_the_reference(gen, backend):
    """Each backend pinned in turn (one that cannot run here falls back to torch)."""
    case = _probs_case(gen, 4, (2,), 18, 40, 37, state=True)
    with force_backend(backend):
        got = _run_probs(case)
    _assert_same(got, _reference_probs(case), PROBS_NAMES)


@pytest.mark.parametrize("device", DEVICES)
def test_probs_chunked_equals_whole(gen, device):
    case = _probs_case(gen, 12, (2,), 19, 36, 45, state=True, device=device)
    whole = _run_probs(case)
    spikes, count = [], case["count"]
    for chunk in _chunks(case, PROBS_OPERANDS, [5, 1, 6]):
        out, count = _run_probs(dict(chunk, count=count))
        spikes.append(out)
    _assert_same((torch.cat(spikes), count), whole, PROBS_NAMES)


def _packed_slice(x: torch.Tensor, part: int) -> torch.Tensor:
    """``x`` ``[T, B, H, R, C]`` as ``ExactAttention`` slices q, k or v (``part``) from the
    qkv linear's packed output ``[T, B, R, 3, H, C]``: batch dims that do not merge."""
    t, b, h, r, c = x.shape
    qkv = torch.zeros(t, b, r, 3, h, c, dtype=x.dtype, device=x.device)
    qkv[:, :, :, part] = x.permute(0, 1, 3, 2, 4)
    return qkv[:, :, :, part].transpose(2, 3)


def _key_layout(k: torch.Tensor, layout: str) -> torch.Tensor:
    """``k`` ``[T, B, H, N, D]`` as ``k_t`` ``[T, B, H, D, N]`` in the given memory layout."""
    if layout == "transposed view":  # D contiguous: read in place
        return k.transpose(-1, -2)
    if layout == "contiguous":  # N contiguous: the host copies it D-contiguous
        return k.transpose(-1, -2).contiguous()
    return _packed_slice(k, 1).transpose(-1, -2)


@pytest.mark.parametrize("layout", ["transposed view", "contiguous", "qkv slice"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_probs_any_operand_layout(gen, backend, layout):
    """The kernel reads keys and queries D-contiguous; other layouts (a contiguous k_t, the
    model's slices of qkv, a strided q, counts given as strided views) give the same bits."""
    case = _probs_case(gen, 4, (2, 3), 18, 40, 37, state=True)
    k = case["k_t"].transpose(-1, -2)
    q = case["q"]
    laid_out = dict(
        case,
        k_t=_key_layout(k, layout),
        q=_packed_slice(q, 0) if layout == "qkv slice" else q.mT.contiguous().mT,  # D strided
        q_count=case["q_count"].mT.contiguous().mT,
        k_count=case["k_count"].mT.contiguous().mT,
    )
    with force_backend(backend):
        got = _run_probs(laid_out)
    _assert_same(got, _reference_probs(case), PROBS_NAMES)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_context_reads_a_packed_value_slice(gen, backend):
    """v sliced from a packed qkv, as the model passes it: the same bits as a plain view."""
    case = _context_case(gen, 4, (2, 3), 18, 37, 40, state=True)
    with force_backend(backend):
        got = _run_context(dict(case, v=_packed_slice(case["v"], 2)))
    _assert_same(got, _reference_context(case), CONTEXT_NAMES)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_probs_three_batch_dims(gen, backend):
    """Batch dims beyond two are merged (a view here) into the kernels' outer batch."""
    case = _probs_case(gen, 3, (2, 2, 3), 9, 20, 11, state=True)
    with force_backend(backend):
        got = _run_probs(case)
    _assert_same(got, _reference_probs(case), PROBS_NAMES)


def test_split_batch_reads_packed_slices_in_place():
    """The model's q/k/v slices of the packed qkv spikes reach the kernels as views (no copy
    per chunk); more batch dims merge into the outer one; a lone [T, R, C] gains two."""
    from spikekernels.kernels.spike_matmul import _split_batch

    x = torch.zeros(3, 2, 4, 5, 6, dtype=torch.int8)
    packed = _packed_slice(x, 1)
    split = _split_batch(packed)
    assert split.shape == (3, 2, 4, 5, 6)
    assert split.data_ptr() == packed.data_ptr()  # a copy would have its own memory
    assert _split_batch(torch.zeros(3, 2, 2, 4, 5, 6)).shape == (3, 4, 4, 5, 6)
    assert _split_batch(torch.zeros(3, 5, 6)).shape == (3, 1, 1, 5, 6)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_probs_quiet_tiles_wake_up(gen, backend):
    """With incoming state a tile whose scores hold and whose neurons stopped firing skips
    its softmax (the kernel's quiet path): long silences with the neurons settled, then a
    spike again at a late step, where the tile must compute again. The reference's bits."""
    case = _probs_case(gen, 30, (2,), 20, 24, 30, state=True)
    q, k = case["q"].clone(), case["k_t"].clone()
    q[1:].zero_()
    k[1:].zero_()
    q[24, :, 3, 5] = 1  # one query spike late in the run: S changes in one row tile
    k[27, 1, 7, :4] = -1  # and key spikes later still, for one batch entry
    case |= dict(q=q, k_t=k)
    with force_backend(backend):
        got = _run_probs(case)
    want = _reference_probs(case)
    _assert_same(got, want, PROBS_NAMES)
    late = want[0][20:24].abs().sum().item(), want[0][24:].abs().sum().item()
    assert late[0] == 0 and late[1] > 0, f"settled before step 24, woken after: {late}"


@pytest.mark.parametrize("device", DEVICES)
def test_probs_silent_input_still_moves_the_neuron(gen, device):
    """Every spike tile silent: the counts (so the scores) hold, but the softmax and the
    neuron run every step, toward the targets of the scores the incoming counts give."""
    case = _probs_case(gen, 6, (2,), 20, 24, 30, state=True, device=device)
    case["q"].zero_()
    case["k_t"].zero_()
    for name in ("q_count", "k_count"):  # wide counts: scores in the thousands
        case[name] = torch.randint(-30, 31, case[name].shape, generator=gen).to(case[name])
    case["count"].zero_()
    got = _run_probs(case)
    _assert_same(got, _reference_probs(case), PROBS_NAMES)
    assert got[0].any(), "the neurons must still fire toward their targets"


@pytest.mark.parametrize("device", DEVICES)
def test_probs_mixed_silent_and_active_tiles(gen, device):
    """Spikes in one row block of one step, one key slice of another, silence elsewhere."""
    case = _probs_case(gen, 5, (3,), 40, 70, 50, device=device)
    case["q"].zero_()
    case["k_t"].zero_()
    case["q"][0, 1, 17:20] = 1
    case["k_t"][2, 2, 40:60, 3:9] = -1
    case["q"][4, 0, 39, ::5] = 1
    _assert_same(_run_probs(case), _reference_probs(case), PROBS_NAMES)


@pytest.mark.parametrize("device", DEVICES)
def test_probs_every_output_element_is_written(gen, device, poisoned_allocations):
    case = _probs_case(gen, 3, (2,), 21, 33, 35, device=device)
    want = _reference_probs(case)
    _assert_same(_run_probs(case), want, PROBS_NAMES)


@pytest.mark.parametrize("device", DEVICES)
def test_probs_state_is_fresh_and_inputs_untouched(gen, device):
    case = _probs_case(gen, 3, (2,), 9, 20, 11, state=True, device=device)
    before = {name: t.clone() for name, t in case.items()}
    got = _run_probs(case)
    for name, t in zip(PROBS_NAMES[1:], got[1:], strict=True):
        assert t.data_ptr() != case[name].data_ptr(), f"{name} aliases its input"
    for name, t in case.items():
        assert torch.equal(t, before[name]), f"{name} was modified"


def test_probs_settle_to_the_qann_integers(gen):
    """SPEC.md §9.4: once the spikes stop, the counts are the QANN's integers, and within
    p_max - n_min silent steps every neuron count is the QANN quantizer's integer of
    softmax_rows(fl32(g * fl32(S))), S the exact Q K^T of the counts, then stays there."""
    case = _probs_case(gen, 5, (2,), 13, 24, 29)
    quiet = torch.zeros(ATTN_BOUNDS[1] + 2, *case["q"].shape[1:], dtype=torch.int8)
    case["q"] = torch.cat([case["q"], quiet])
    case["k_t"] = torch.cat([case["k_t"], quiet.new_zeros(len(quiet), *case["k_t"].shape[1:])])
    spikes, count = _run_probs(case)
    q_int, k_int = case["q"].sum(0, dtype=torch.int32), case["k_t"].sum(0, dtype=torch.int32)
    scores = exact_math.int_matmul(q_int, k_int)
    probs = exact_math.softmax_rows(exact_math.score_value(scores, case["gain"]))
    integer = exact_math.target(probs, case["threshold"], *ATTN_BOUNDS)
    assert torch.equal(count.to(torch.float32), integer)
    assert torch.equal(spikes.sum(0, dtype=torch.int32), count.to(torch.int32))


def _up_down(shape) -> torch.Tensor:
    """Two steps of int8 spikes, all +1 then all -1."""
    return torch.stack([torch.ones(shape[1:]), -torch.ones(shape[1:])]).char()


def _good_probs() -> dict:
    return dict(
        q=torch.zeros(2, 3, 4, 8, dtype=torch.int8),
        k_t=torch.zeros(2, 3, 8, 5, dtype=torch.int8),
        gain=torch.tensor(0.1),
        threshold=torch.tensor(0.07),
        n_min=0,
        p_max=15,
    )


# (case, what replaces the good arguments, error type, words the message must contain)
BAD_PROBS = [
    ("T == 0", dict(q=torch.zeros(0, 3, 4, 8, dtype=torch.int8)), ValueError, "T == 0"),
    ("q float", dict(q=torch.zeros(2, 3, 4, 8)), TypeError, "q must have dtype"),
    ("k_t int32", dict(k_t=torch.zeros(2, 3, 8, 5, dtype=torch.int32)), TypeError, "k_t must"),
    ("q 2-D", dict(q=torch.zeros(2, 8, dtype=torch.int8)), ValueError, "q must have at least"),
    ("T differs", dict(k_t=torch.zeros(3, 3, 8, 5, dtype=torch.int8)), ValueError, "T=3"),
    ("batch differs", dict(k_t=torch.zeros(2, 2, 8, 5, dtype=torch.int8)), ValueError, "batch"),
    ("D differs", dict(k_t=torch.zeros(2, 3, 9, 5, dtype=torch.int8)), ValueError, "K=8"),
    ("q not ternary", dict(q=torch.full((2, 3, 4, 8), 2, dtype=torch.int8)), ValueError, "q must"),
    (
        "k_t not ternary",
        dict(k_t=torch.full((2, 3, 8, 5), -128, dtype=torch.int8)),
        ValueError,
        "k_t must hold ternary",
    ),
    ("gain float64", dict(gain=torch.tensor(0.1, dtype=torch.float64)), TypeError, "gain must"),
    ("gain 2 elements", dict(gain=torch.ones(2)), ValueError, "gain must have exactly one"),
    ("gain zero", dict(gain=torch.tensor(0.0)), ValueError, "gain must be positive"),
    ("gain nan", dict(gain=torch.tensor(float("nan"))), ValueError, "gain must be positive"),
    ("threshold 2", dict(threshold=torch.ones(2)), ValueError, "threshold must have exactly"),
    ("threshold <= 0", dict(threshold=torch.tensor(-1.0)), ValueError, "threshold must be"),
    ("threshold int", dict(threshold=torch.tensor(1)), TypeError, "threshold must have dtype"),
    # running counts (counts_in) skip the spike checks, never the scalars' values
    (
        "threshold <= 0, counts in",
        dict(threshold=torch.tensor(-1.0), counts_in=True),
        ValueError,
        "threshold must be",
    ),
    (
        "gain nan, counts in",
        dict(gain=torch.tensor(float("nan")), counts_in=True),
        ValueError,
        "gain must be positive",
    ),
    ("bounds inverted", dict(n_min=3, p_max=-4), ValueError, "n_min=3 > p_max=-4"),
    ("int8 overflow", dict(p_max=255), ValueError, "int8 count would overflow"),
    ("p_max float", dict(p_max=15.0), TypeError, "p_max must be an int"),
    ("q_count shape", dict(q_count=torch.zeros(3, 4, 9).char()), ValueError, "q_count must"),
    ("k_count int32", dict(k_count=torch.zeros(3, 8, 5).int()), TypeError, "k_count must"),
    ("count int32", dict(count=torch.zeros(3, 4, 5, dtype=torch.int32)), TypeError, "count must"),
    (
        "count elsewhere",
        dict(count=torch.zeros(3, 4, 5, dtype=torch.int8, device="meta")),
        ValueError,
        "count is on meta",
    ),
    (
        "counts leave int8",  # +1 then -1 onto 127: 128 on the way
        dict(q=_up_down((2, 3, 4, 8)), q_count=torch.full((3, 4, 8), 127).char()),
        ValueError,
        r"running count of q reaches \[127, 128\]",
    ),
    (
        "count before leaves int8",  # -127 after two +1: -129 before
        dict(q=torch.ones(2, 3, 4, 8).char(), q_count=torch.full((3, 4, 8), -127).char()),
        ValueError,
        r"reaches \[-129, -127\].*q_count must be the count after them",
    ),
    (
        "D too large",
        dict(
            q=torch.zeros(1, 1, MAX_CONTRACTION + 1, dtype=torch.int8),
            k_t=torch.zeros(1, MAX_CONTRACTION + 1, 1, dtype=torch.int8),
        ),
        ValueError,
        "keep it exact",
    ),
]


@pytest.mark.parametrize(
    ("case", "bad", "error", "words"), BAD_PROBS, ids=[b[0] for b in BAD_PROBS]
)
@pytest.mark.parametrize("device", DEVICES)
def test_probs_bad_input_is_rejected(case, bad, error, words, device):
    with pytest.raises(error, match=words):
        call_on(device, exact_attention_probs, **{**_good_probs(), **bad})


@pytest.mark.parametrize("state", [False, True])
def test_probs_opcheck(gen, state):
    case = _probs_case(gen, 3, (2,), 6, 20, 9, state=state)
    c = dict(case)
    args = [c.pop("q"), c.pop("k_t"), c.pop("gain"), c.pop("threshold"), *ATTN_BOUNDS]
    args += [c.get(name) for name in ("q_count", "k_count", "count")]
    torch.library.opcheck(torch.ops.spikekernels.exact_attention_probs.default, tuple(args))


def test_probs_torch_compile_fullgraph(gen):
    case = _probs_case(gen, 4, (2,), 7, 20, 9)

    def block(q, k_t):
        spikes, *state = _run_probs(dict(case, q=q, k_t=k_t))
        return spikes.sum(0, dtype=torch.int32), *state

    compiled = torch.compile(block, fullgraph=True)
    got, want = compiled(case["q"], case["k_t"]), block(case["q"], case["k_t"])
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


# ---------------------------------------------------------------------------------------------
# exact_context

CONTEXT_NAMES = ("spikes", "count")
CONTEXT_OPERANDS = (("a", "a_count"), ("v", "v_count"))


def _context_case(gen, T, batch, m, n, d, *, state=False, device="cpu"):
    """Attention and value spikes (``v`` a head-split view, as attention passes it), the two
    steps and the output neuron's threshold scaled so that the targets span its levels."""
    a = _spikes(gen, (T, *batch, m, n), silent=0.3, group_dim=-1)
    v = _spikes(gen, (T, *batch, d, n)).transpose(-1, -2)
    case = dict(
        a=a,
        v=v,
        theta_a=torch.tensor(1 / 15),
        theta_v=torch.tensor(0.5 + torch.rand((), generator=gen).item()),
        threshold=torch.tensor(0.02 + 0.02 * torch.rand((), generator=gen).item()),
    )
    if state:
        a_before = torch.randint(0, 6, (*batch, m, n), generator=gen, dtype=torch.int8)
        v_before = torch.randint(-4, 5, (*batch, n, d), generator=gen, dtype=torch.int8)
        case |= dict(
            a_count=_after(a, a_before),
            v_count=_after(v, v_before),
            count=torch.randint(-8, 8, (*batch, m, d), generator=gen, dtype=torch.int8),
        )
    return {name: t.to(device) for name, t in case.items()}


def _run_context(case, bounds=CTX_BOUNDS, **kwargs):
    c = dict(case)
    head = [c.pop(name) for name in ("a", "v", "theta_a", "theta_v", "threshold")]
    return exact_context(*head, *bounds, **c, **kwargs)


def _reference_context(case, bounds=CTX_BOUNDS):
    c = {name: _cpu(t) for name, t in case.items()}
    head = [c.pop(name) for name in ("a", "v", "theta_a", "theta_v", "threshold")]
    return reference.exact_context(*head, *bounds, **c)


def _unfused_context(case, chunks):
    context = RunningSpikeMatmul().to(case["a"].device)
    neuron = TargetNeuron(case["threshold"], CTX_LEVEL, signed=True)
    spikes = [
        neuron(exact_math.context_value(context(a, v), case["theta_a"], case["theta_v"]))
        for a, v in zip(case["a"].split(chunks), case["v"].split(chunks), strict=True)
    ]
    return torch.cat(spikes), neuron.count


# (batch, M, N, D): the contraction N over several key slices, N = 197 and D = 64 (ViT)
CONTEXT_SHAPES = [
    ((1,), 1, 1, 1),
    ((2,), 5, 3, 7),
    ((2, 3), 17, 20, 33),
    ((), 19, 70, 16),
    ((1,), 21, 197, 64),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("batch", "m", "n", "d"), CONTEXT_SHAPES)
@pytest.mark.parametrize("T", [1, 5])
def test_context_bit_exact(gen, device, T, batch, m, n, d):
    case = _context_case(gen, T, batch, m, n, d, device=device)
    got = _run_context(case)
    _assert_same(got, _reference_context(case), CONTEXT_NAMES)
    assert set(got[0].unique().tolist()) <= {-1, 0, 1}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("batch", "m", "n", "d"), CONTEXT_SHAPES[1:])
def test_context_matches_the_unfused_modules(gen, device, batch, m, n, d):
    """Chunk by chunk, the fused op gives the spikes and state that RunningSpikeMatmul ->
    context_value -> TargetNeuron give (what ExactAttention runs today)."""
    case = _context_case(gen, 7, batch, m, n, d, device=device)
    chunks = [3, 1, 3]
    want = _unfused_context(case, chunks)
    spikes, count = [], None
    for chunk in _chunks(case, CONTEXT_OPERANDS, chunks):
        out, count = _run_context(dict(chunk, count=count))
        spikes.append(out)
    _assert_same((torch.cat(spikes), count), want, CONTEXT_NAMES)
    assert want[0].any(), "the case should make the context neuron fire"


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_context_every_backend_matches_the_reference(gen, backend):
    case = _context_case(gen, 4, (2,), 18, 45, 21, state=True)
    with force_backend(backend):
        got = _run_context(case)
    _assert_same(got, _reference_context(case), CONTEXT_NAMES)


@pytest.mark.parametrize("device", DEVICES)
def test_context_chunked_equals_whole(gen, device):
    case = _context_case(gen, 12, (2,), 19, 45, 36, state=True, device=device)
    whole = _run_context(case)
    spikes, count = [], case["count"]
    for chunk in _chunks(case, CONTEXT_OPERANDS, [5, 1, 6]):
        out, count = _run_context(dict(chunk, count=count))
        spikes.append(out)
    _assert_same((torch.cat(spikes), count), whole, CONTEXT_NAMES)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_context_quiet_tiles_wake_up(gen, backend):
    """With incoming state a tile whose context holds and whose neurons stopped firing skips
    its neuron (the kernel's quiet path): long silences with the neurons settled, then late
    attention and value spikes, where the tiles must compute again. The reference's bits."""
    case = _context_case(gen, 30, (2,), 20, 30, 24, state=True)
    before = {x: case[f"{x}_count"] - case[x].sum(0) for x in ("a", "v")}
    a, v = case["a"].clone(), case["v"].clone()
    a[1:].zero_()
    v[1:].zero_()
    a[24, 0, 3, :5] = 1  # attention spikes late in the run: Z changes in one row tile
    v[27, 1, 7, ::2] = -1  # and value spikes later still, for the other batch entry
    case |= dict(a=a, v=v, a_count=_after(a, before["a"]), v_count=_after(v, before["v"]))
    with force_backend(backend):
        got = _run_context(case)
    want = _reference_context(case)
    _assert_same(got, want, CONTEXT_NAMES)
    late = want[0][20:24].abs().sum().item(), want[0][24:].abs().sum().item()
    assert late[0] == 0 and late[1] > 0, f"settled before step 24, woken after: {late}"


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("batch", [(3,), (2, 3)])
def test_context_merge_heads(gen, backend, batch, poisoned_allocations):
    """``merge_heads=True``: the spikes with the last batch dim merged into the channels,
    ``[T, *batch[:-1], M, H * D]``, the same bits as the plain output merged (the kernel
    writes that layout directly; every element, fresh buffers poisoned)."""
    case = _context_case(gen, 5, batch, 18, 37, 20, state=True)
    with force_backend(backend):
        plain = _run_context(case)
        merged = _run_context(case, merge_heads=True)
    t, *_, m, d = plain[0].shape
    want = plain[0].movedim(-3, -2).reshape(t, *batch[:-1], m, batch[-1] * d)
    assert merged[0].is_contiguous()
    _assert_same(merged, (want, plain[1]), CONTEXT_NAMES)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize(("batch", "merge_heads"), [((3,), False), ((2, 3), True)])
def test_context_row_active(gen, backend, batch, merge_heads):
    """``row_active`` receives the rows of the spikes that fire at each step: the truth on the
    PyTorch paths, every row of a block of query rows that fired (the kernel's program) on
    Triton's, with or without incoming state and the heads merged; a flag set before stays
    set, and no bit changes."""
    from spikekernels.kernels.exact_attention import context_config
    from spikekernels.ops._dispatch import backend_for

    case = _context_case(gen, 18, batch, 37, 20, 24, state=True)
    case["a"][3:] = 0  # the neurons settle: rows and whole blocks go quiet
    case["v"][3:] = 0
    case["a_count"] = _after(case["a"], case["a_count"] - case["a"].sum(0))
    case["v_count"] = _after(case["v"], case["v_count"] - case["v"].sum(0))
    with force_backend(backend):
        ran = backend if backend == "reference" else backend_for(case["a"], ("triton", "torch"))
        plain = _run_context(case, merge_heads=merge_heads)
        kept = torch.rand(plain[0].shape[:-1], generator=gen) < 0.1
        rows = kept.to(torch.int32)
        got = _run_context(case, merge_heads=merge_heads, row_active=rows)
    _assert_same(got, plain, CONTEXT_NAMES)
    spikes = plain[0]  # [T, *batch, M, D], or [T, *batch[:-1], M, H * D]
    heads = spikes.unflatten(-1, (batch[-1], -1)) if merge_heads else spikes[..., None, :]
    fired = (heads != 0).any(dim=-1)  # [T, ..., M, heads]
    if ran == "triton":  # per head and block of query rows, then per row
        block_m = context_config(24)[0]
        m = fired.shape[-2]
        blocks = F.pad(fired.transpose(-1, -2), (0, -m % block_m)).unflatten(-1, (-1, block_m))
        fired = blocks.any(dim=-1).repeat_interleave(block_m, dim=-1)[..., :m].transpose(-1, -2)
    want = fired.any(dim=-1) | kept
    assert torch.equal(rows, want.to(torch.int32))
    assert not want[-1].all() and want[0].any(), "the case proves little"


@pytest.mark.parametrize("device", DEVICES)
def test_context_silent_input_still_moves_the_neuron(gen, device):
    case = _context_case(gen, 6, (2,), 20, 30, 24, state=True, device=device)
    case["a"].zero_()
    case["v"].zero_()
    case["count"].zero_()
    got = _run_context(case)
    _assert_same(got, _reference_context(case), CONTEXT_NAMES)
    assert got[0].any(), "the neurons must still fire toward their targets"


@pytest.mark.parametrize("device", DEVICES)
def test_context_mixed_silent_and_active_tiles(gen, device):
    """Spikes in one key slice of one step, one row block of another, silence elsewhere."""
    case = _context_case(gen, 5, (3,), 40, 70, 20, device=device)
    case["a"].zero_()
    case["v"].zero_()
    case["a"][0, 1, 17:20, 33:40] = 1
    case["v"][2, 2, 64:70] = -1
    case["a"][4, 0, 39, ::5] = 1
    _assert_same(_run_context(case), _reference_context(case), CONTEXT_NAMES)


@pytest.mark.parametrize("device", DEVICES)
def test_context_every_output_element_is_written(gen, device, poisoned_allocations):
    case = _context_case(gen, 3, (2,), 21, 35, 33, device=device)
    want = _reference_context(case)
    _assert_same(_run_context(case), want, CONTEXT_NAMES)


@pytest.mark.parametrize("device", DEVICES)
def test_context_state_is_fresh_and_inputs_untouched(gen, device):
    case = _context_case(gen, 3, (2,), 9, 11, 20, state=True, device=device)
    before = {name: t.clone() for name, t in case.items()}
    got = _run_context(case)
    for name, t in zip(CONTEXT_NAMES[1:], got[1:], strict=True):
        assert t.data_ptr() != case[name].data_ptr(), f"{name} aliases its input"
    for name, t in case.items():
        assert torch.equal(t, before[name]), f"{name} was modified"


def _good_context() -> dict:
    return dict(
        a=torch.zeros(2, 3, 4, 5, dtype=torch.int8),
        v=torch.zeros(2, 3, 5, 8, dtype=torch.int8),
        theta_a=torch.tensor(0.07),
        theta_v=torch.tensor(0.5),
        threshold=torch.tensor(0.1),
        n_min=-8,
        p_max=7,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_context_value_rounds_in_the_documented_order(device):
    """``y = fl32(fl32(theta_a * theta_v) * fl32(Z))`` (SPEC.md §9.2), in that order: an
    element where it lands exactly on a rounding boundary of the neuron (y / theta = 2.5,
    target 3) and the other order, ``theta_a * (theta_v * Z)``, one float32 ulp below it
    (target 2). Running counts A = 1, V = 3 at every step: Z = 3, and the neuron, moving one
    level a step from 0, settles at the documented order's target."""
    f32 = torch.float32
    theta_a, theta_v = torch.tensor(1 / 15, dtype=f32), torch.tensor(0.1234, dtype=f32)
    threshold = torch.tensor(0.009872001595795155, dtype=f32)  # a float32, exactly
    z = torch.tensor(3.0)
    documented = torch.floor((theta_a * theta_v) * z / threshold + 0.5)
    other = torch.floor(theta_a * (theta_v * z) / threshold + 0.5)
    assert (documented.item(), other.item()) == (3.0, 2.0)  # the premise
    a = torch.ones(8, 1, 1, 1, dtype=torch.int8, device=device)
    v = torch.full((8, 1, 1, 1), 3, dtype=torch.int8, device=device)
    spikes, count = exact_context(
        a, v, *(t.to(device) for t in (theta_a, theta_v, threshold)), *CTX_BOUNDS,
        counts_in=True,
    )  # fmt: skip
    assert count.flatten().tolist() == [3]
    assert spikes.flatten().tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


BAD_CONTEXT = [
    ("T == 0", dict(a=torch.zeros(0, 3, 4, 5, dtype=torch.int8)), ValueError, "T == 0"),
    ("a float", dict(a=torch.zeros(2, 3, 4, 5)), TypeError, "a must have dtype"),
    ("v int16", dict(v=torch.zeros(2, 3, 5, 8, dtype=torch.int16)), TypeError, "v must have"),
    ("N differs", dict(v=torch.zeros(2, 3, 6, 8, dtype=torch.int8)), ValueError, "K=5"),
    ("batch differs", dict(v=torch.zeros(2, 1, 5, 8, dtype=torch.int8)), ValueError, "batch"),
    ("a not ternary", dict(a=torch.full((2, 3, 4, 5), 3, dtype=torch.int8)), ValueError, "a must"),
    ("theta_a zero", dict(theta_a=torch.tensor(0.0)), ValueError, "theta_a must be positive"),
    ("theta_v 2", dict(theta_v=torch.ones(2)), ValueError, "theta_v must have exactly one"),
    ("theta_v int", dict(theta_v=torch.tensor(1)), TypeError, "theta_v must have dtype"),
    (
        "theta_v negative, counts in",
        dict(theta_v=torch.tensor(-0.5), counts_in=True),
        ValueError,
        "theta_v must be positive",
    ),
    ("threshold inf", dict(threshold=torch.tensor(float("inf"))), ValueError, "threshold"),
    ("threshold subnormal", dict(threshold=torch.tensor(1e-40)), ValueError, "normal"),
    ("bounds inverted", dict(n_min=1, p_max=0), ValueError, "bounds"),
    ("n_min float", dict(n_min=-8.0), TypeError, "n_min must be an int"),
    ("merge_heads 1", dict(merge_heads=1), TypeError, "merge_heads must be a bool"),
    (
        "merge_heads, no heads",
        dict(
            a=torch.zeros(2, 4, 5, dtype=torch.int8),
            v=torch.zeros(2, 5, 8, dtype=torch.int8),
            merge_heads=True,
        ),
        ValueError,
        "a needs one",
    ),
    ("a_count shape", dict(a_count=torch.zeros(3, 5, 4).char()), ValueError, "a_count must"),
    ("v_count int32", dict(v_count=torch.zeros(3, 5, 8).int()), TypeError, "v_count must"),
    ("count shape", dict(count=torch.zeros(3, 4, 5, dtype=torch.int8)), ValueError, "count must"),
    (
        "row_active shape",
        dict(row_active=torch.zeros(2, 3, 4, 8, dtype=torch.int32)),
        ValueError,
        r"row_active must have shape \(2, 3, 4\)",
    ),
    (
        "row_active strided",
        dict(row_active=torch.zeros(2, 4, 3, dtype=torch.int32).transpose(1, 2)),
        ValueError,
        "row_active must be contiguous",
    ),
    (
        "row_active int64",
        dict(row_active=torch.zeros(2, 3, 4, dtype=torch.int64)),
        TypeError,
        "row_active must have dtype",
    ),
    (
        "v elsewhere",
        dict(v=torch.zeros(2, 3, 5, 8, dtype=torch.int8, device="meta")),
        ValueError,
        "v is on meta",
    ),
    (
        "counts leave int8",
        dict(v=_up_down((2, 3, 5, 8)), v_count=torch.full((3, 5, 8), 127).char()),
        ValueError,
        "running count of v",
    ),
]


@pytest.mark.parametrize(
    ("case", "bad", "error", "words"), BAD_CONTEXT, ids=[b[0] for b in BAD_CONTEXT]
)
@pytest.mark.parametrize("device", DEVICES)
def test_context_bad_input_is_rejected(case, bad, error, words, device):
    with pytest.raises(error, match=words):
        call_on(device, exact_context, **{**_good_context(), **bad})


@pytest.mark.parametrize(("state", "merge_heads"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("rows", [False, True])
def test_context_opcheck(gen, state, merge_heads, rows):
    """With ``rows``: ``row_active`` written."""
    case = _context_case(gen, 3, (2,), 6, 9, 20, state=state)
    c = dict(case)
    args = [c.pop(name) for name in ("a", "v", "theta_a", "theta_v", "threshold")]
    args += [*CTX_BOUNDS, *(c.get(name) for name in ("a_count", "v_count", "count"))]
    args += [None, False, merge_heads]  # active, inplace
    if rows:  # counts_in, row_active [T, rows of the spikes]
        args += [False, torch.zeros(3, *((6,) if merge_heads else (2, 6)), dtype=torch.int32)]
    torch.library.opcheck(torch.ops.spikekernels.exact_context.default, tuple(args))


def test_context_torch_compile_fullgraph(gen):
    case = _context_case(gen, 4, (2,), 7, 9, 20)

    def block(a, v):
        spikes, *state = _run_context(dict(case, a=a, v=v))
        return spikes.sum(0, dtype=torch.int32), *state

    compiled = torch.compile(block, fullgraph=True)
    got, want = compiled(case["a"], case["v"]), block(case["a"], case["v"])
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("op", ["probs", "context"])
def test_modules_need_their_operands_counts_after_the_first_call(gen, op):
    """``ExactAttentionProbs`` / ``ExactContext`` take their operands' neuron counts after
    each chunk: chunks with them equal the whole run; a later call without them is refused,
    not silently fresh."""
    if op == "probs":
        case, operands = _probs_case(gen, 7, (2,), 9, 20, 11), PROBS_OPERANDS
        neuron = TargetNeuron(case["threshold"], ATTN_LEVEL, signed=False)
        module = ExactAttentionProbs(neuron, case["gain"])
    else:
        case, operands = _context_case(gen, 7, (2,), 9, 11, 20), CONTEXT_OPERANDS
        neuron = TargetNeuron(case["threshold"], CTX_LEVEL, signed=True)
        module = ExactContext(neuron, case["theta_a"], case["theta_v"])
    names = [name for pair in operands for name in pair]  # a, a_count, b, b_count
    whole = module(case[names[0]], case[names[2]])
    count = module.count.clone()
    module.reset()
    parts = [
        module(*(c[name] for name in names[::2]), *(c[n] for n in names[1::2]))
        for c in _chunks(case, operands, [3, 4])
    ]
    assert torch.equal(torch.cat(parts), whole) and torch.equal(module.count, count)
    with pytest.raises(ValueError, match=f"{names[1]} is None after the first call"):
        module(case[names[0]][:1], case[names[2]][:1])


# ---------------------------------------------------------------------------------------------
# inplace=True: the new neuron count written into the given one (ops._inplace)

# op -> (case maker, runner, output names, the operands with their count arguments)
_OPS = {
    "probs": (_probs_case, _run_probs, PROBS_NAMES, PROBS_OPERANDS),
    "context": (_context_case, _run_context, CONTEXT_NAMES, CONTEXT_OPERANDS),
}
# (batch, M, contraction or keys, ...): single elements, odd sizes, several row blocks
INPLACE_SHAPES = [((1,), 1, 1, 1), ((2,), 5, 7, 3), ((), 19, 33, 20)]


def _run_inplace(run, names, case, states):
    """``run`` with ``inplace=True`` on the ``guarded`` states, checked in place."""
    return called_in_place(lambda: run(dict(case, **states), inplace=True), names[1:], states)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("shape", INPLACE_SHAPES)
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("op", _OPS)
def test_inplace_equals_fresh(gen, op, T, shape, backend):
    make, run, names, _ = _OPS[op]
    case = make(gen, T, *shape, state=True)
    with force_backend(backend):
        want = run(case)
        states = guarded({name: case[name] for name in names[1:]})
        got = _run_inplace(run, names, case, states)
    _assert_same(got, want, names)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("op", _OPS)
def test_inplace_chunks_equal_whole(gen, op, backend, device):
    """Three chunks (one a single step) from nonzero counts before the run, the neuron's
    count fed back in place, give the whole run's spikes and count: each chunk's starting
    product, formed from its operands' counts after it less its spikes, is the one the
    whole run carries."""
    make, run, names, operands = _OPS[op]
    case = make(gen, 10, (2,), 17, 35, 20, state=True, device=device)
    with force_backend(backend):
        whole = run(case)
        states = guarded({name: case[name] for name in names[1:]})
        spikes = [
            _run_inplace(run, names, chunk, states)[0]
            for chunk in _chunks(case, operands, [4, 1, 5])
        ]
    _assert_same((torch.cat(spikes), *states.values()), whole, names)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", _OPS)
def test_inplace_every_output_element_is_written(gen, op, device, poisoned_allocations):
    """Fresh buffers (the spikes, the running counts of every step) poisoned: the in-place
    state still comes out right."""
    make, run, names, _ = _OPS[op]
    case = make(gen, 3, (2,), 21, 35, 33, state=True, device=device)
    want = _reference_probs(case) if op == "probs" else _reference_context(case)
    states = guarded({name: case[name] for name in names[1:]})
    _assert_same(_run_inplace(run, names, case, states), want, names)


def _inplace_good(op) -> dict:
    """The good arguments of ``_good_probs`` / ``_good_context`` with zero counts, inplace."""
    if op == "probs":
        good, shapes = _good_probs(), ((3, 4, 8), (3, 8, 5), (3, 4, 5))
    else:
        good, shapes = _good_context(), ((3, 4, 5), (3, 5, 8), (3, 4, 8))
    names = [count for _, count in _OPS[op][3]] + ["count"]
    for name, shape in zip(names, shapes, strict=True):
        good[name] = torch.zeros(shape, dtype=torch.int8)
    return good | dict(inplace=True)


def _set(**kwargs):
    return lambda c: c | {k: f(c) if callable(f) else f for k, f in kwargs.items()}


# (case, op, what changes the good arguments, error type, words the message must contain)
BAD_INPLACE = [
    ("probs no count", "probs", _set(count=None), ValueError, "inplace=True needs count"),
    ("context no count", "context", _set(count=None), ValueError, "inplace=True needs count"),
    (
        "probs count strided",
        "probs",
        _set(count=lambda c: torch.zeros(3, 5, 4, dtype=torch.int8).transpose(-1, -2)),
        ValueError,
        "count must be contiguous",
    ),
    (
        "context count strided",
        "context",
        _set(count=lambda c: torch.zeros(3, 4, 16, dtype=torch.int8)[..., ::2]),
        ValueError,
        "count must be contiguous",
    ),
    (
        "probs count over q",
        "probs",
        _set(count=lambda c: c["q"].view(-1)[:60].view(3, 4, 5)),
        ValueError,
        "count shares memory",
    ),
    (
        "probs count over k_count",
        "probs",
        _set(count=lambda c: c["k_count"].view(-1)[:60].view(3, 4, 5)),
        ValueError,
        "count shares memory",
    ),
    (
        "context count over v_count",
        "context",
        _set(count=lambda c: c["v_count"].view(-1)[:96].view(3, 4, 8)),
        ValueError,
        "count shares memory",
    ),
    ("probs inplace=1", "probs", _set(inplace=1), TypeError, "inplace must be a bool"),
    ("context inplace=None", "context", _set(inplace=None), TypeError, "inplace must be"),
]


@pytest.mark.parametrize(
    ("case", "op", "bad", "error", "words"), BAD_INPLACE, ids=[b[0] for b in BAD_INPLACE]
)
@pytest.mark.parametrize("device", DEVICES)
def test_inplace_bad_input_is_rejected(case, op, bad, error, words, device):
    fn = exact_attention_probs if op == "probs" else exact_context
    with pytest.raises(error, match=words):
        call_on(device, fn, **bad(_inplace_good(op)))


def _attention_states_in_one_buffer(gen, gap: int):
    """Running counts of q, k, v for ``ops.exact_attention`` (T=3, 2 heads, M=4, D=8, N=5,
    DV=6) and both neurons' incoming counts (inside their bounds) as views of one int8 buffer:
    ``attn_count`` first, ``count`` ``gap`` bytes after its end (negative: overlapping it)."""
    t, h, m, d, n, dv = 3, 2, 4, 8, 5, 6
    args = dict(
        q=torch.randint(-3, 4, (t, h, m, d), generator=gen, dtype=torch.int8),
        k_t=torch.randint(-3, 4, (t, h, d, n), generator=gen, dtype=torch.int8),
        v=torch.randint(-3, 4, (t, h, n, dv), generator=gen, dtype=torch.int8),
        gain=torch.tensor(0.05),
        attn_threshold=torch.tensor(0.07),
        attn_n_min=ATTN_BOUNDS[0],
        attn_p_max=ATTN_BOUNDS[1],
        theta_a=torch.tensor(0.07),
        theta_v=torch.tensor(0.5),
        threshold=torch.tensor(0.05),
        n_min=CTX_BOUNDS[0],
        p_max=CTX_BOUNDS[1],
    )
    na, nc = h * m * n, h * m * dv
    buf = torch.zeros(na + max(gap, 0) + nc, dtype=torch.int8)
    attn_count = buf[:na].view(h, m, n)
    count = buf[na + gap : na + gap + nc].view(h, m, dv)
    if gap >= 0:  # valid incoming counts (overlapping views keep the zeros: also valid)
        attn_count.copy_(torch.randint(*ATTN_BOUNDS, (h, m, n), generator=gen))
        count.copy_(torch.randint(*CTX_BOUNDS, (h, m, dv), generator=gen))
    return args, attn_count, count


@CPU_PASS_ONLY
def test_attention_states_packed_back_to_back_are_taken(gen):
    """``exact_attention(inplace=True)`` with its two states adjacent in one buffer (packed
    back to back, no byte shared) takes them, and writes what separate buffers get."""
    args, attn_count, count = _attention_states_in_one_buffer(gen, 0)
    incoming = torch.cat([attn_count.flatten(), count.flatten()])
    separate = attn_count.clone(), count.clone()
    want = exact_attention(**args, attn_count=separate[0], count=separate[1], inplace=True)
    got = exact_attention(**args, attn_count=attn_count, count=count, inplace=True)
    assert got[1] is attn_count and got[2] is count
    for name, g, w in zip(("spikes", "attn_count", "count"), got, want, strict=True):
        assert_same_bits(g, w, name)
    assert not torch.equal(torch.cat([attn_count.flatten(), count.flatten()]), incoming)


@CPU_PASS_ONLY
def test_attention_states_sharing_memory_are_refused(gen):
    """``exact_attention(inplace=True)`` with ``attn_count`` and ``count`` overlapping in one
    buffer is refused by name: the kernel would write one state over the other."""
    args, attn_count, count = _attention_states_in_one_buffer(gen, -4)
    before = attn_count.clone(), count.clone()
    with pytest.raises(ValueError, match="shares memory"):
        exact_attention(**args, attn_count=attn_count, count=count, inplace=True)
    assert torch.equal(attn_count, before[0]) and torch.equal(count, before[1])


@pytest.mark.parametrize("op", _OPS)
def test_inplace_opcheck(gen, op):
    make, _, _, operands = _OPS[op]
    name = "exact_attention_probs" if op == "probs" else "exact_context"
    c = make(gen, 3, (2,), 6, 9, 20, state=True)
    head = [c.pop(k) for k in list(c)[: len(c) - 3]]
    bounds = ATTN_BOUNDS if op == "probs" else CTX_BOUNDS
    counts = [c[count] for _, count in operands]
    args = (*head, *bounds, *counts, c["count"], None, True)
    torch.library.opcheck(getattr(torch.ops.spikekernels, name).default, args)


# ---------------------------------------------------------------------------------------------
# shapes past the fused kernels' one-tile rows, and empty ones: the PyTorch path on every device


@pytest.mark.parametrize("device", DEVICES)
def test_past_the_fused_tiles(gen, device):
    """More keys than the scores kernel holds in a tile (256), more head channels than the
    context kernel's (64): the op takes its PyTorch path, with the same contract."""
    probs = _probs_case(gen, 3, (1,), 5, 8, 300, state=True, device=device)
    _assert_same(_run_probs(probs), _reference_probs(probs), PROBS_NAMES)
    context = _context_case(gen, 3, (1,), 5, 9, 70, state=True, device=device)
    _assert_same(_run_context(context), _reference_context(context), CONTEXT_NAMES)


@CPU_PASS_ONLY
def test_the_contraction_goes_up_to_its_limit(gen):
    """Both products take a contraction (head dim D, keys N) of ``MAX_CONTRACTION`` (65535,
    the documented limit), with the reference's result, and refuse one more by name. (Tiny
    other dims: the limit is the only large one.)"""
    k = MAX_CONTRACTION
    x = torch.randint(-1, 2, (2, 1, 2, k + 1), generator=gen, dtype=torch.int8)
    y = torch.randint(-1, 2, (2, 1, k + 1, 3), generator=gen, dtype=torch.int8)
    probs = dict(gain=torch.tensor(2e-3), threshold=torch.tensor(0.07))
    context = dict(theta_a=torch.tensor(0.07), theta_v=torch.tensor(0.5 / 256))
    context["threshold"] = torch.tensor(0.02)
    _assert_same(
        _run_probs(dict(probs, q=x[..., :k], k_t=y[..., :k, :])),
        _reference_probs(dict(probs, q=x[..., :k], k_t=y[..., :k, :])),
        PROBS_NAMES,
    )
    _assert_same(
        _run_context(dict(context, a=x[..., :k], v=y[..., :k, :])),
        _reference_context(dict(context, a=x[..., :k], v=y[..., :k, :])),
        CONTEXT_NAMES,
    )
    with pytest.raises(ValueError, match=f"K={k + 1}.*keep it exact"):
        _run_probs(dict(probs, q=x, k_t=y))
    with pytest.raises(ValueError, match=f"K={k + 1}.*keep it exact"):
        _run_context(dict(context, a=x, v=y))


def test_slabs_past_int32_offsets_take_the_pytorch_path():
    """The fused kernels address one (batch, head)'s [M, N] slab with int32 offsets: a slab
    within 2^16 of 2^31 elements or past it (46,341 tokens, or 2^23 - 256 queries against
    256 keys) is the PyTorch path's, one fewer token is the kernels'. (Shapes only: meta
    tensors.)"""
    from spikekernels.ops._attention import fused_context_fits, fused_probs_fits

    def meta(*shape):
        return torch.empty(shape, dtype=torch.int8, device="meta")

    for n, fits in ((46_340, True), (46_341, False)):
        assert fused_context_fits(meta(1, 1, n, n), meta(1, 1, n, 64)) is fits
    for m, fits in ((2**23 - 257, True), (2**23 - 256, False)):
        assert fused_probs_fits(meta(1, 1, m, 64), meta(1, 1, 64, 256)) is fits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("empty", ["batch", "rows", "keys", "head dim"])
def test_empty_shapes(device, empty):
    """A zero-size dim gives empty spikes and count of the right shapes, never an error."""
    batch, m, d, n = (0 if empty == "batch" else 2,), 0 if empty == "rows" else 3, 4, 5
    d = 0 if empty == "head dim" else d
    n = 0 if empty == "keys" else n
    q = torch.zeros(2, *batch, m, d, dtype=torch.int8, device=device)
    k_t = torch.zeros(2, *batch, d, n, dtype=torch.int8, device=device)
    gain, theta = torch.tensor(0.1, device=device), torch.tensor(0.07, device=device)
    counts = dict(q_count=q.sum(0).char(), k_count=k_t.sum(0).char())
    got = exact_attention_probs(q, k_t, gain, theta, *ATTN_BOUNDS, **counts)
    assert [tuple(t.shape) for t in got] == [(2, *batch, m, n), (*batch, m, n)]
    a = torch.zeros(2, *batch, m, n, dtype=torch.int8, device=device)
    v = torch.zeros(2, *batch, n, d, dtype=torch.int8, device=device)
    got = exact_context(a, v, gain, gain, theta, *CTX_BOUNDS)
    assert [tuple(t.shape) for t in got] == [(2, *batch, m, d), (*batch, m, d)]


# ---------------------------------------------------------------------------------------------
# the pieces of the kernels

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from spikekernels.kernels.exact_attention import (
        _attention_neuron,
        _mul,
        _warp_bits,
        exp_rows,
        key_order,
        softmax_columns,
    )
    from spikekernels.kernels.exact_rows import bit_order_codes, permuted_rows
    from spikekernels.kernels.target import inverse_threshold

    @triton.jit
    def _softmax_columns_kernel(
        s_ptr, g_ptr, out_ptr, N, ROWS: tl.constexpr, WIDTH: tl.constexpr,
        KEY_PERM: tl.constexpr, KEY_TREE: tl.constexpr,
    ):  # fmt: skip
        """``softmax_columns`` of the values of int32 scores ``[ROWS, N]`` read transposed,
        ``[WIDTH, ROWS]`` with the keys padded to ``WIDTH`` and tile row ``p`` holding key
        ``permuted_rows(p)``, as the scores kernels hold them."""
        keys = permuted_rows(tl.arange(0, WIDTH), WIDTH.bit_length() - 1, KEY_PERM)
        rows = tl.arange(0, ROWS)
        mask = keys < N
        offs = rows[None, :] * N + keys[:, None]
        s = tl.load(s_ptr + offs, mask=mask[:, None], other=0)
        z = _mul(tl.load(g_ptr), s.to(tl.float32))
        probs = softmax_columns(z, mask, WIDTH, ROWS, WIDTH.bit_length() - 1, KEY_TREE)
        tl.store(out_ptr + offs, probs, mask=mask[:, None])

    @triton.jit
    def _exp_rows_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
        """The kernels' ``exp_rows`` of float32 ``x`` ``[N]``."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < N, other=0.0)
        tl.store(out_ptr + offs, exp_rows(x), mask=offs < N)

    @triton.jit
    def _attention_neuron_kernel(
        s_ptr, count_ptr, g_ptr, theta_ptr, sigma_ptr, fired_ptr, N, M, n_min, p_max,
        KEYS: tl.constexpr, COLS: tl.constexpr, KEY_PERM: tl.constexpr, KEY_TREE: tl.constexpr,
        ESTIMATE: tl.constexpr,
    ):  # fmt: skip
        """``_attention_neuron`` on int32 scores ``[M, N]`` and counts, held as the kernels
        hold them (transposed, ``[KEYS, COLS]``, keys in ``KEY_PERM``'s order, the count as
        float32 with ``ESTIMATE``, else int32); every lane's sigma out, the padded ones too
        (``sigma`` ``[COLS, KEYS]``), and the tile's ``fired``."""
        keys = permuted_rows(tl.arange(0, KEYS), KEYS.bit_length() - 1, KEY_PERM)
        cols = tl.arange(0, COLS)
        mask_n = keys < N
        mask_m = cols < M
        mask = mask_n[:, None] & mask_m[None, :]
        offs = cols[None, :] * N + keys[:, None]
        s = tl.load(s_ptr + offs, mask=mask, other=0)
        count = tl.load(count_ptr + offs, mask=mask, other=0)
        count = count.to(tl.float32) if ESTIMATE else count.to(tl.int32)
        theta = tl.load(theta_ptr)
        sigma, fired = _attention_neuron(
            s, tl.load(g_ptr), mask_n, mask_m, theta, inverse_threshold(theta), count, n_min,
            p_max, KEYS, COLS, KEYS.bit_length() - 1, KEY_TREE, ESTIMATE,
        )  # fmt: skip
        tl.store(sigma_ptr + cols[None, :] * KEYS + keys[:, None], sigma.to(tl.int32))
        tl.store(fired_ptr, fired)


# The lane tests launch the kernels' pieces directly: on the GPU where there is one (where the
# compiler may contract a multiply and an add into an FMA, which exact_math's bits forbid),
# else on the CPU through the interpreter (conftest.TRITON_DEVICES).


def _key_orders(width: int) -> dict[str, tuple[tuple[int, ...], int]]:
    """Orders of the keys in a tile of ``width`` rows, each with how many of its last tree
    levels ``tree_sum_columns`` gathers into a thread (``bit_order_codes``): row order (none),
    the kernels' own at 8 and 4 warps (their warp levels, as ``key_codes`` has them), and a
    random one (fixed seed) with every level gathered."""
    bits = width.bit_length() - 1
    shuffled = torch.randperm(bits, generator=torch.Generator().manual_seed(width)).tolist()
    return {
        "rows": (tuple(range(bits)), 0),
        "8 warps": (key_order(width, 8), len(_warp_bits(width, 8))),
        "4 warps": (key_order(width, 4), len(_warp_bits(width, 4))),
        "random": (tuple(shuffled), bits),
    }


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n", [1, 5, 16, 100, 197, 256])
def test_softmax_columns_is_exact_maths_row_function(gen, device, n):
    """The kernels' softmax of int32 scores, each query's keys padded to any power of two
    >= 16 and held in any order of the tile's rows, gives the bits of
    exact_math.softmax_rows(score_value(S, g)): tree_sum's order, exp_rows' polynomial, the
    padding adding exact zeros. Includes exp's cut-off at -87 and ties."""
    s = torch.randint(-3000, 3000, (16, n), generator=gen, dtype=torch.int32)
    s[0] = 0  # a uniform row
    s[1, : n // 2] = 10_000  # keys far below the peak: exp underflows to 0
    s[2] = s[2, :1]  # ties
    gain = torch.tensor(0.0123)
    want = exact_math.softmax_rows(exact_math.score_value(s, gain))
    for width in sorted({max(16, 1 << (n - 1).bit_length()), 512}):
        for name, (order, gathered) in _key_orders(width).items():
            perm, tree = bit_order_codes(order, gathered)
            out = torch.full((16, n), float("nan"), device=device)
            _softmax_columns_kernel[(1,)](
                s.to(device), gain.to(device), out, n, ROWS=16, WIDTH=width, KEY_PERM=perm,
                KEY_TREE=tree,
            )  # fmt: skip
            got = out.cpu().view(torch.int32)
            assert torch.equal(got, want.view(torch.int32)), f"width {width}, {name}"


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_exp_rows_is_exact_maths(gen, device):
    """The kernels' exp_rows gives exact_math.exp_rows' bits for every x <= 0 a softmax can
    hand it: spread values, integers, every float32 next to the cut-off at -87 (where the
    kernels leave out the clamp of the exponent) and next to each step of k, and values far
    below the cut-off (0)."""
    f32 = torch.float32

    def near(v: float, n: int) -> torch.Tensor:  # the float32 v and its n neighbours each side
        bits = torch.tensor(v, dtype=f32).view(torch.int32) + torch.arange(-n, n + 1)
        return bits.to(torch.int32).view(f32)

    # x log2e + 1/2 crossing an integer: k's steps, in [-125.5, 0]
    steps = (torch.arange(-126, 1, dtype=torch.float64) - 0.5) / 1.4426950408889634
    x = torch.cat(
        [
            -torch.rand(20_000, generator=gen) * 100.0,
            -torch.arange(0, 130, dtype=f32),
            near(-87.0, 64),
            *(near(v, 4) for v in steps.tolist()),
            torch.tensor([-0.0, -1e-30, -1e-6, -1e3, -1e6]),
        ]
    ).clamp(max=0.0)
    want = exact_math.exp_rows(x)
    got = torch.full_like(x, float("nan"), device=device)
    _exp_rows_kernel[(triton.cdiv(x.numel(), 1024),)](x.to(got.device), got, x.numel(), BLOCK=1024)
    assert torch.equal(got.cpu().view(torch.int32), want.view(torch.int32))
    assert (want[x < -87] == 0).all() and (want[x >= -87] > 0).all()


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("estimate", [True, False])
@pytest.mark.parametrize(
    "theta", [0.5, 0.013, 1e-40], ids=["ties", "spread", "subnormal"]
)  # fmt: skip
def test_attention_neuron_lanes(gen, device, estimate, theta):
    """The attention neuron of the scores kernels, lane by lane: sigma as the reference
    neuron on exact_math's softmax, and ``fired`` whether a real lane fired. With the
    estimate, sigma is also 0 on every padded lane (keys past N, queries past M), which the
    count held in registers relies on, whichever path the tile takes: the estimate (its
    padded queries get a zero reciprocal, not a mask) or the divisions (a tile with a lane on
    a rounding step: theta 0.5 on a uniform row of 4 keys, where every probability is 1/4; a
    subnormal theta, whose reciprocal is no normal float). Without it (the spike-form
    kernels, which store only real lanes) padded lanes are left as they come."""
    keys, cols, n_min, p_max = 16, 16, 0, 15
    perm, tree = bit_order_codes(key_order(keys, 4))
    for n, m in [(4, 5), (13, 16), (16, 1)]:
        s = torch.randint(-40, 40, (m, n), generator=gen, dtype=torch.int32)
        s[0] = 0  # a uniform row
        count = torch.randint(n_min, p_max + 1, (m, n), generator=gen, dtype=torch.int8)
        count[0] = 1  # on the tie: its target is 1
        gain = torch.tensor(0.0123)
        th = torch.tensor(theta)
        probs = exact_math.softmax_rows(exact_math.score_value(s, gain))
        want, _ = reference.target_spikes_step(probs, th, n_min, p_max, count)
        sigma = torch.full((cols, keys), 7, dtype=torch.int32, device=device)
        fired = torch.full((1,), -1, dtype=torch.int32, device=device)
        _attention_neuron_kernel[(1,)](
            s.to(device), count.to(device), gain.to(device), th.to(device), sigma, fired, n, m,
            n_min, p_max, KEYS=keys, COLS=cols, KEY_PERM=perm, KEY_TREE=tree, ESTIMATE=estimate,
        )  # fmt: skip
        sigma = sigma.cpu()
        assert torch.equal(sigma[:m, :n], want.to(torch.int32)), (n, m)
        if estimate:
            assert (sigma[m:] == 0).all() and (sigma[:, n:] == 0).all(), (n, m)
        assert fired.item() == int(bool(want.any())), (n, m)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_softmax_columns_needs_the_tree_of_its_key_order(gen, device):
    """The tree must follow the tile's key order: keys held in the kernels' order but summed
    as if in row order give other bits (so the test above can tell the orders apart)."""
    n = width = 256
    s = torch.randint(-3000, 3000, (16, n), generator=gen, dtype=torch.int32)
    gain = torch.tensor(0.0123)
    want = exact_math.softmax_rows(exact_math.score_value(s, gain))
    perm, _ = bit_order_codes(key_order(width, 8))
    _, row_tree = bit_order_codes(tuple(range(8)))
    out = torch.full((16, n), float("nan"), device=device)
    _softmax_columns_kernel[(1,)](
        s.to(device), gain.to(device), out, n, ROWS=16, WIDTH=width, KEY_PERM=perm,
        KEY_TREE=row_tree,
    )  # fmt: skip
    assert not torch.equal(out.cpu().view(torch.int32), want.view(torch.int32))


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs Triton")
def test_bit_order_codes():
    """The codes of an order: four bits a level, the row bit, then its position among the
    bits left; anything but a permutation is refused."""
    from spikekernels.kernels.exact_rows import bit_order_codes

    assert bit_order_codes((0, 1, 2)) == (0x210, 0)
    # (3, 7, 0, 1, 2, 6, 5, 4): positions 3, 6 (bit 3 gone), then 0, 0, 0, 2, 1, 0
    perm, tree = bit_order_codes((3, 7, 0, 1, 2, 6, 5, 4))
    assert perm == 0x45621073
    assert tree == 0x01200063
    # the levels gathered into a thread at the end, above the levels' codes
    assert bit_order_codes((3, 7, 0, 1, 2, 6, 5, 4), 3) == (perm, 3 << 56 | 0x01200063)
    for bad in [(0, 0), (1, 2), (0, 2, 1, 4)]:
        with pytest.raises(ValueError, match="order must be a permutation"):
            bit_order_codes(bad)
    for gathered in (-1, 4):
        with pytest.raises(ValueError, match="gathered must be in 0..3"):
            bit_order_codes((0, 1, 2), gathered)


@pytest.mark.cuda
def test_cuda_matches_cpu_reference(gen):
    """Kernels on the GPU (int8 tensor cores, GPU float arithmetic) vs the reference on the
    CPU, at ViT-S size (197 tokens, head dim 64)."""
    probs = _probs_case(gen, 6, (2, 6), 197, 64, 197, state=True)
    got = _run_probs({name: t.cuda() for name, t in probs.items()})
    _assert_same(got, _reference_probs(probs), PROBS_NAMES)
    context = _context_case(gen, 6, (2, 6), 197, 197, 64, state=True)
    got = _run_context({name: t.cuda() for name, t in context.items()})
    _assert_same(got, _reference_context(context), CONTEXT_NAMES)

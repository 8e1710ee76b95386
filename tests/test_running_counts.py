"""Running counts between exact-mode layers: ``exact_linear`` and ``exact_attention_probs``
with ``counts_out`` write the neuron's count after each step instead of its spikes, and the
two attention products with ``counts_in`` read those counts (``S = Q_t K_t``, ``Z = A_t V_t``)
instead of spikes and the counts after a chunk. Both are the same integers as the spike form,
so every output must equal the spike form's bit for bit, on every backend, and against the
reference's own ``counts_in``/``counts_out`` loop. ``exact_attention`` runs the two attention
layers on counts in one kernel: it must equal the two in a row. ``exact_linear``'s
``s_before`` is tested with the linear (test_exact_linear.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_PASS_ONLY, DEVICES, TRITON_DEVICES, moved_to
from test_activity import _fired
from test_exact_attention_ops import (
    ATTN_BOUNDS,
    CTX_BOUNDS,
    _context_case,
    _probs_case,
    _reference_context,
    _reference_probs,
    _run_context,
    _run_probs,
)
from test_exact_linear import _layer, _random_state, _reference, _run, _spikes

from spikekernels.kernels.exact_attention import attention_config
from spikekernels.ops._dispatch import backend_for, force_backend

BACKENDS = ["triton", "torch", "reference"]
# (T, batch, M, D, N) and (T, batch, M, N, D): T = 1, single elements, odd sizes, several
# tiles and slices of the contraction
PROBS_SHAPES = [(1, (2,), 5, 7, 3), (5, (2, 3), 18, 40, 37)]
CONTEXT_SHAPES = [(1, (1,), 1, 1, 1), (5, (2, 3), 17, 70, 33)]


def _running(x: torch.Tensor, after: torch.Tensor | None) -> torch.Tensor:
    """The count after each step ``[T, ...]`` int8 of the neuron behind spikes ``x``, whose
    count after all of them is ``after`` (None: 0 before them)."""
    running = torch.cumsum(x, 0, dtype=torch.int32)
    if after is not None:
        running += (after.to(torch.int32) - x.sum(0, dtype=torch.int32))[None]
    return running.to(torch.int8)


def _cpu(t):
    return None if t is None else t.cpu()


def _assert_equal(got, want, names):
    for name, g, w in zip(names, got, want, strict=True):
        g, w = g.cpu(), w.cpu()
        assert g.dtype == w.dtype and g.shape == w.shape, f"{name}: {g.dtype}{tuple(g.shape)}"
        diff = (g != w).sum().item()
        assert diff == 0, f"{name}: {diff} of {g.numel()} elements differ"


# ---------------------------------------------------------------------------------------------
# exact_linear(counts_out=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("state", [False, True])
def test_linear_counts_out_are_the_running_spike_counts(gen, backend, T, state):
    """Per-channel thresholds (a qkv layer), odd shapes, several tiles; with ``active``."""
    layer = _layer(gen, 37, 45, per_channel=True)
    s = _spikes(gen, T, (2, 19), 45)
    s_count, count = _random_state(gen, s, 37) if state else (None, None)
    want_spikes, want_count = _reference(s, layer, -8, 7, s_count, count)
    flags = {}
    with force_backend(backend):
        for counts_out in (False, True):
            flags[counts_out] = torch.zeros(T, 2, dtype=torch.int32)
            got = _run(s, layer, -8, 7, s_count, count, counts_out=counts_out,
                       active=flags[counts_out])  # fmt: skip
            want = _running(want_spikes, want_count) if counts_out else want_spikes
            _assert_equal(got, (want, want_count), ("out", "count"))
    assert torch.equal(flags[True], flags[False]), "counts_out records other active flags"
    assert flags[True].any(), "no sample fired: the flags test nothing"


def test_linear_counts_out_reference_loop(gen):
    """The oracle's own counts_out loop against its spikes."""
    layer = _layer(gen, 20, 33)
    s = _spikes(gen, 5, (7,), 33)
    s_count, count = _random_state(gen, s, 20)
    spikes, c = _reference(s, layer, 0, 15, s_count, count)
    from spikekernels import reference

    counts, c2 = reference.exact_linear(
        s, *(layer[k] for k in ("weight", "weight_scale", "bias", "in_threshold", "threshold")),
        0, 15, s_count, count, counts_out=True,
    )  # fmt: skip
    _assert_equal((counts, c2), (_running(spikes, c), c), ("out", "count"))


@pytest.mark.parametrize("device", DEVICES)
def test_linear_counts_out_inplace_and_poisoned(gen, device, poisoned_allocations):
    layer = _layer(gen, 50, 33, device=device)
    s = _spikes(gen, 4, (3, 5), 33, device=device)
    s_count, count = _random_state(gen, s, 50)
    want = _reference(s, layer, -8, 7, s_count, count)
    state = count.clone()
    out, got_count = _run(s, layer, -8, 7, s_count, state, counts_out=True, inplace=True)
    assert got_count is state
    want = [t.cpu() for t in want]  # the oracle's own device: where the reference ran
    _assert_equal((out, state), (_running(want[0], want[1]), want[1]), ("out", "c"))


# ---------------------------------------------------------------------------------------------
# exact_attention_probs(counts_in=True, counts_out=True)


def _probs_counts_case(case):
    """The same run with q and k as their running counts (no counts after the chunk)."""
    c = dict(case)
    c["q"] = _running(c["q"], c.pop("q_count", None))
    c["k_t"] = _running(c["k_t"], c.pop("k_count", None))
    return c


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("T", "batch", "m", "d", "n"), PROBS_SHAPES)
@pytest.mark.parametrize("state", [False, True])
def test_probs_counts_in_equal_the_spike_form(gen, backend, T, batch, m, d, n, state):
    case = _probs_case(gen, T, batch, m, d, n, state=state)
    want_spikes, want_count = _reference_probs(case)
    counts = _probs_counts_case(case)
    with force_backend(backend):
        got = _run_probs(counts, counts_in=True)
        _assert_equal(got, (want_spikes, want_count), ("spikes", "count"))
        got = _run_probs(counts, counts_in=True, counts_out=True)
        _assert_equal(got, (_running(want_spikes, want_count), want_count), ("counts", "count"))
        got = _run_probs(case, counts_out=True)
        _assert_equal(got, (_running(want_spikes, want_count), want_count), ("counts", "count"))


def test_probs_reference_counts_loop(gen):
    """The oracle's counts_in loop (``S = Q_t K_t``) against its spike loop."""
    from spikekernels import reference

    case = _probs_case(gen, 6, (2,), 9, 12, 11, state=True)
    want = _reference_probs(case)
    c = _probs_counts_case(case)
    got = reference.exact_attention_probs(
        c.pop("q"), c.pop("k_t"), c.pop("gain"), c.pop("threshold"), *ATTN_BOUNDS, **c,
        counts_in=True, counts_out=True,
    )  # fmt: skip
    _assert_equal(got, (_running(want[0], want[1]), want[1]), ("counts", "count"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_probs_counts_in_quiet_tiles_wake_up(gen, backend):
    """Counts that hold for many steps (the kernel's quiet tiles: scores equal to the last
    step's, no spike) and then move again, with incoming state and ``active``."""
    case = _probs_case(gen, 30, (2,), 20, 24, 30, state=True)
    q, k = case["q"].clone(), case["k_t"].clone()
    q[1:].zero_()
    k[1:].zero_()
    q[24, :, 3, 5] = 1
    k[27, 1, 7, :4] = -1
    case |= dict(q=q, k_t=k)
    want = _reference_probs(case)
    active = torch.zeros(30, 2, dtype=torch.int32)
    with force_backend(backend):
        got = _run_probs(_probs_counts_case(case), counts_in=True, counts_out=True, active=active)
    _assert_equal(got, (_running(want[0], want[1]), want[1]), ("counts", "count"))
    fired = (want[0] != 0).flatten(2).any(-1).to(torch.int32)
    assert torch.equal(active, fired)
    assert fired[20:24].sum() == 0 and fired[24:].sum() > 0, "the case must settle, then wake"


@pytest.mark.parametrize("device", DEVICES)
def test_probs_counts_chunked_equals_whole(gen, device, poisoned_allocations):
    case = _probs_case(gen, 12, (2,), 19, 36, 45, state=True, device=device)
    counts = _probs_counts_case(case)
    whole = _run_probs(counts, counts_in=True, counts_out=True)
    outs, count = [], counts["count"]
    for q, k in zip(counts["q"].split([5, 1, 6]), counts["k_t"].split([5, 1, 6]), strict=True):
        out, count = _run_probs(dict(counts, q=q, k_t=k, count=count), counts_in=True,
                                counts_out=True)  # fmt: skip
        outs.append(out)
    _assert_equal((torch.cat(outs), count), whole, ("counts", "count"))


# ---------------------------------------------------------------------------------------------
# exact_context(counts_in=True)


def _context_counts_case(case):
    c = dict(case)
    c["a"] = _running(c["a"], c.pop("a_count", None))
    c["v"] = _running(c["v"], c.pop("v_count", None))
    return c


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("T", "batch", "m", "n", "d"), CONTEXT_SHAPES)
@pytest.mark.parametrize("state", [False, True])
def test_context_counts_in_equal_the_spike_form(gen, backend, T, batch, m, n, d, state):
    case = _context_case(gen, T, batch, m, n, d, state=state)
    want = _reference_context(case)
    with force_backend(backend):
        got = _run_context(_context_counts_case(case), counts_in=True)
        merged = _run_context(_context_counts_case(case), counts_in=True, merge_heads=True)
    _assert_equal(got, want, ("spikes", "count"))
    t, *b, mm, dd = want[0].shape
    heads = want[0].movedim(-3, -2).reshape(t, *b[:-1], mm, b[-1] * dd)
    _assert_equal(merged, (heads, want[1]), ("merged spikes", "count"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_context_counts_in_quiet_tiles_wake_up(gen, backend):
    case = _context_case(gen, 24, (2,), 20, 30, 16, state=True)
    a, v = case["a"].clone(), case["v"].clone()
    a[1:].zero_()
    v[1:].zero_()
    a[20, 1, 4, :3] = 1
    case |= dict(a=a, v=v)
    want = _reference_context(case)
    with force_backend(backend):
        got = _run_context(_context_counts_case(case), counts_in=True)
    _assert_equal(got, want, ("spikes", "count"))
    late = want[0][16:20].abs().sum().item(), want[0][20:].abs().sum().item()
    assert late[0] == 0 and late[1] > 0, f"settled before step 20, woken after: {late}"


@pytest.mark.parametrize("device", DEVICES)
def test_probs_counts_in_on_rounding_ties(gen, device):
    """The scores op's neuron on ties, as ``test_attention_probs_on_rounding_ties`` the fused
    kernel's: silent queries make every softmax uniform, ``p = fl(1/N)``, and a threshold of
    ``fl(2p / (2j + 1))`` puts every target within an ulp of the tie ``j + 1/2``, where the
    division-free estimate (the counts-in kernel's) must give way to the division. Over key
    counts where the estimate alone rounds the tie the wrong way (all but the last),
    bit-exact against the reference in both forms, every count settled at the exact
    rounding's side."""
    for n, j in ((5, 1), (7, 2), (11, 6), (67, 3), (197, 3)):
        case = _probs_case(gen, 8, (2,), 9, 16, n)
        case["q"] = torch.zeros_like(case["q"])
        p = torch.tensor(1.0 / n, dtype=torch.float32)
        case["threshold"] = theta = (2 * p / (2 * j + 1)).float()
        want = _reference_probs(case)
        on_device = {name: t.to(device) for name, t in case.items()}
        _assert_equal(_run_probs(on_device), want, ("spikes", "count"))
        counts = _probs_counts_case(on_device)
        _assert_equal(_run_probs(counts, counts_in=True), want, ("spikes", "count"))
        exact = torch.floor(p / theta + 0.5)
        assert torch.equal(want[1].unique(), exact.to(torch.int8).reshape(1)), "unsettled"
        estimate = torch.floor(p * (1 / theta) + 0.5)
        assert (estimate != exact) == (n != 197), f"N = {n}: the case lost its edge"


@pytest.mark.parametrize("device", DEVICES)
def test_context_counts_in_on_rounding_ties(gen, device):
    """A threshold of twice the value scale, ``2 fl(theta_a theta_v)``, puts every odd
    context within an ulp of a rounding tie of the target, where the kernel's division-free
    estimate must give way to the division (kernels.target); spikes at the first step only
    hold the contexts fixed, so the late steps decide ties only. Bit-exact against the
    reference."""
    case = _context_case(gen, 12, (2,), 9, 12, 16)
    a, v = torch.zeros_like(case["a"]), torch.zeros_like(case["v"])
    a[0] = torch.randint(0, 2, a[0].shape, generator=gen, dtype=torch.int8)
    v[0] = torch.randint(-1, 2, v[0].shape, generator=gen, dtype=torch.int8)
    # theta_v = 0.52: the estimate alone rounds some of these ties the wrong way (checked)
    case |= dict(a=a, v=v, theta_a=torch.tensor(1 / 15), theta_v=torch.tensor(0.52))
    scale = (case["theta_a"] * case["theta_v"]).float()
    case["threshold"] = 2 * scale
    want = _reference_context(case)
    counts = {name: t.to(device) for name, t in _context_counts_case(case).items()}
    _assert_equal(_run_context(counts, counts_in=True), want, ("spikes", "count"))
    z = torch.matmul(case["a"][0].double(), case["v"][0].double())
    assert (z % 2 == 1).float().mean() > 0.2, "too few contexts on a tie"
    assert ((want[1].double() - z / 2).abs() <= 0.5).all(), "unsettled"
    y = scale * z.float()
    estimate = torch.floor(y * (1 / case["threshold"]) + 0.5)
    assert (estimate != torch.floor(y / case["threshold"] + 0.5)).any(), "no edge"


def test_context_reference_counts_loop(gen):
    case = _context_case(gen, 6, (2,), 9, 12, 11, state=True)
    want = _reference_context(case)
    from spikekernels import reference

    c = _context_counts_case(case)
    head = [c.pop(name) for name in ("a", "v", "theta_a", "theta_v", "threshold")]
    got = reference.exact_context(*head, *CTX_BOUNDS, **c, counts_in=True)
    _assert_equal(got, want, ("spikes", "count"))


# ---------------------------------------------------------------------------------------------
# bad arguments


def test_counts_in_with_counts_after_is_rejected(gen):
    case = _probs_case(gen, 3, (2,), 5, 7, 3, state=True)
    with pytest.raises(ValueError, match="q_count must be None with counts_in=True"):
        _run_probs(case, counts_in=True)
    ctx = _context_case(gen, 3, (2,), 5, 7, 3, state=True)
    with pytest.raises(ValueError, match="a_count must be None with counts_in=True"):
        _run_context(ctx, counts_in=True)


@pytest.mark.parametrize("flag", ["counts_in", "counts_out"])
def test_flags_must_be_bools(gen, flag):
    case = _probs_case(gen, 2, (2,), 5, 7, 3)
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        _run_probs(case, **{flag: 1})
    if flag == "counts_in":
        with pytest.raises(TypeError, match="counts_in must be a bool"):
            _run_context(_context_case(gen, 2, (2,), 5, 7, 3), counts_in="yes")
    else:
        layer = _layer(gen, 4, 5)
        with pytest.raises(TypeError, match="counts_out must be a bool"):
            _run(_spikes(gen, 2, (3,), 5), layer, -8, 7, counts_out=None)


# ---------------------------------------------------------------------------------------------
# modules: what reads a counts_out neuron's output sees its spikes


def test_spike_counter_counts_spikes_of_a_counts_out_layer(gen):
    """``SpikeCounter`` charges a ``counts_out`` layer the spikes behind its counts, chunk
    after chunk: the same per-step totals as the same layer returning spikes."""
    from torch import nn

    from spikekernels.evaluate.sops import SpikeCounter
    from spikekernels.nn import ExactLinearNeuron, TargetNeuron

    layer = _layer(gen, 30, 40, per_channel=True)
    s = _spikes(gen, 9, (2, 5), 40)
    totals = {}
    for counts_out in (False, True):
        neuron = TargetNeuron(layer["threshold"], 16, signed=True, fanout=3)
        m = ExactLinearNeuron(
            layer["weight"], layer["weight_scale"], layer["bias"], layer["in_threshold"],
            neuron, counts_out=counts_out,
        )  # fmt: skip
        counter = SpikeCounter(nn.Sequential(m), max_steps=12)
        with counter.counting():
            done = torch.zeros(s.shape[1:], dtype=torch.int32)
            for part in s.split([4, 1, 4]):
                done += part.sum(0, dtype=torch.int32)
                m(part, done.to(torch.int8))
        totals[counts_out] = counter.spikes.clone()
        counter.close()
    assert totals[False].sum() > 0, "no spikes: the comparison tests nothing"
    assert torch.equal(totals[True], totals[False])


@pytest.mark.cuda
def test_cuda_counts_form_matches_cpu_reference(gen):
    """The counts_in/counts_out kernels on the GPU (int8 wgmma, GPU float arithmetic) vs the
    reference's spike form on the CPU, at ViT-S size (197 tokens, head dim 64)."""
    probs = _probs_case(gen, 6, (2, 6), 197, 64, 197, state=True)
    want = _reference_probs(probs)
    counts = {name: t.cuda() for name, t in _probs_counts_case(probs).items()}
    got = _run_probs(counts, counts_in=True, counts_out=True)
    _assert_equal(got, (_running(want[0], want[1]), want[1]), ("counts", "count"))
    context = _context_case(gen, 6, (2, 6), 197, 197, 64, state=True)
    want = _reference_context(context)
    counts = {name: t.cuda() for name, t in _context_counts_case(context).items()}
    _assert_equal(_run_context(counts, counts_in=True), want, ("spikes", "count"))


# ---------------------------------------------------------------------------------------------
# exact_attention: the two layers in one kernel, the attention counts never in memory


def _attention_case(gen, T, batch, m, d, n, dv, *, state=False):
    """Running counts of q, k and v (from genuine spike trains) and both neurons' steps and
    incoming counts: the probs case and a context case over the same keys."""
    probs = _probs_counts_case(_probs_case(gen, T, batch, m, d, n, state=state))
    ctx = _context_case(gen, T, batch, m, n, dv, state=state)
    case = dict(
        q=probs["q"],
        k_t=probs["k_t"],
        v=_running(ctx["v"], ctx.get("v_count")),
        gain=probs["gain"],
        attn_threshold=probs["threshold"],
        theta_a=ctx["theta_a"],
        theta_v=ctx["theta_v"],
        threshold=ctx["threshold"],
    )
    if state:
        case |= dict(attn_count=probs["count"], count=ctx["count"])
    return case


def attention_arguments(case: dict, kwargs: dict) -> dict:
    """``exact_attention``'s arguments by name, from a case and extra keywords."""
    bounds = dict(zip(("attn_n_min", "attn_p_max"), ATTN_BOUNDS, strict=True))
    bounds |= dict(zip(("n_min", "p_max"), CTX_BOUNDS, strict=True))
    return {"attn_count": None, "count": None, **case, **bounds, **kwargs}


def _run_attention(case, **kwargs):
    from spikekernels.ops import exact_attention

    return exact_attention(**attention_arguments(case, kwargs))


def _composed(case, merge_heads=False):
    """The oracle: the reference probs on counts, then the reference context on its counts."""
    from spikekernels import reference

    c = {name: _cpu(t) for name, t in case.items()}
    a, attn_count = reference.exact_attention_probs(
        c["q"], c["k_t"], c["gain"], c["attn_threshold"], *ATTN_BOUNDS, None, None,
        c.get("attn_count"), counts_in=True, counts_out=True,
    )  # fmt: skip
    spikes, count = reference.exact_context(
        a, c["v"], c["theta_a"], c["theta_v"], c["threshold"], *CTX_BOUNDS, None, None,
        c.get("count"), counts_in=True,
    )  # fmt: skip
    if merge_heads:
        t, *b, m, dv = spikes.shape
        spikes = spikes.movedim(-3, -2).reshape(t, *b[:-1], m, b[-1] * dv)
    return spikes, attn_count, count, a


ATTENTION_NAMES = ("spikes", "attn_count", "count")
# (T, batch, M, D, N, DV): T = 1, single elements, odd sizes, several query blocks and head
# dim slices, N = 197 keys
ATTENTION_SHAPES = [(1, (1,), 1, 1, 1, 1), (5, (2, 3), 18, 40, 37, 20), (3, (2,), 21, 16, 197, 64)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("T", "batch", "m", "d", "n", "dv"), ATTENTION_SHAPES)
@pytest.mark.parametrize("state", [False, True])
def test_attention_equals_the_two_layers(gen, backend, T, batch, m, d, n, dv, state):
    case = _attention_case(gen, T, batch, m, d, n, dv, state=state)
    spikes, attn_count, count, a = _composed(case)
    flags = torch.zeros(T, batch[0], dtype=torch.int32), torch.zeros(T, batch[0], dtype=torch.int32)
    with force_backend(backend):
        got = _run_attention(case, attn_active=flags[0], active=flags[1])
    _assert_equal(got, (spikes, attn_count, count), ATTENTION_NAMES)
    before = case.get("attn_count")
    from spikekernels.ops._activity import spikes_of_counts

    attn_spikes = spikes_of_counts(a, before)
    for got_flags, s in zip(flags, (attn_spikes, spikes), strict=True):
        assert torch.equal(got_flags, _fired(s))


def _spikes_per_step(spikes: torch.Tensor) -> torch.Tensor:
    return torch.count_nonzero(spikes.reshape(spikes.shape[0], -1), dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("T", "batch", "m", "d", "n", "dv"), ATTENTION_SHAPES)
@pytest.mark.parametrize("state", [False, True])
def test_attention_tallies_count_each_neurons_spikes(gen, backend, T, batch, m, d, n, dv, state):
    """``attn_tally`` and ``tally`` receive, added to what they held, each step's number of
    spikes of the attention neuron (which never leave the kernel) and of the context neuron;
    one tensor for both receives both. The bits are those without."""
    from spikekernels.ops._activity import spikes_of_counts

    case = _attention_case(gen, T, batch, m, d, n, dv, state=state)
    spikes, attn_count, count, a = _composed(case)
    wants = [_spikes_per_step(s) for s in (spikes_of_counts(a, case.get("attn_count")), spikes)]
    if m * n > 1:  # (one query and one key: its context may stay silent)
        assert wants[0].sum() > 0 and wants[1].sum() > 0, "no spikes: the tallies prove little"
    held = [torch.randint(0, 1000, (T,), generator=gen) for _ in range(2)]
    tallies = [h.clone() for h in held]
    shared = held[0].clone()
    with force_backend(backend):
        got = _run_attention(case, attn_tally=tallies[0], tally=tallies[1])
        _assert_equal(got, (spikes, attn_count, count), ATTENTION_NAMES)
        _run_attention(case, attn_tally=shared, tally=shared)
    for tally, before, want in zip(tallies, held, wants, strict=True):
        assert torch.equal(tally - before, want)
    assert torch.equal(shared - held[0], wants[0] + wants[1])


@pytest.mark.parametrize("device", DEVICES)
def test_attention_tallies_on_device(gen, device):
    """On each device (a GPU: the kernel's atomic adds, one per program and step that fired,
    which the interpreter's one-thread programs cannot check), at ViT-S's 197 keys and head
    dim 64: the tallies are the CPU oracle's spikes per step."""
    from spikekernels.ops._activity import spikes_of_counts

    case = _attention_case(gen, 3, (2, 3), 21, 16, 197, 64, state=True)
    spikes, _, _, a = _composed(case)
    wants = [_spikes_per_step(s) for s in (spikes_of_counts(a, case["attn_count"]), spikes)]
    assert wants[0].sum() > 0 and wants[1].sum() > 0, "no spikes: the tallies prove little"
    tallies = [torch.zeros(3, dtype=torch.int64, device=device) for _ in range(2)]
    on = {name: t.to(device) for name, t in case.items()}
    _run_attention(on, attn_tally=tallies[0], tally=tallies[1])
    for got, want in zip(tallies, wants, strict=True):
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_tallies_of_settled_chunks(gen, backend):
    """The tallies of chunks run with the flags that let the kernel skip quiet steps and
    settled blocks (``qkv_active``, the settled flags) are the whole run's spikes per step,
    silent steps counted as 0."""
    from spikekernels.ops._activity import spikes_of_counts

    T, sizes = 32, (11, 5, 1, 15)
    case = _settling_case(gen, T, (2, 3))
    spikes, _, _, a = _composed(case)
    wants = [_spikes_per_step(s) for s in (spikes_of_counts(a, case["attn_count"]), spikes)]
    assert wants[1][17:].sum() > 0 and not wants[1][:17].any(), "the case's premise"
    truth = _qkv_moved(case)
    flags = [torch.zeros(case["q"].shape[1:-1], dtype=torch.int32) for _ in range(2)]
    state, tallies, t0 = (case["attn_count"], case["count"]), [[], []], 0
    with force_backend(backend):
        for size in sizes:
            chunk = {name: x[t0 : t0 + size] if name in ("q", "k_t", "v") else x
                     for name, x in case.items()}  # fmt: skip
            tally = [torch.zeros(size, dtype=torch.int64) for _ in range(2)]
            _, *state = _run_attention(
                chunk | dict(attn_count=state[0], count=state[1]),
                qkv_active=truth[t0 : t0 + size], attn_row_settled=flags[0],
                row_settled=flags[1], attn_tally=tally[0], tally=tally[1],
            )  # fmt: skip
            for got, part in zip(tallies, tally, strict=True):
                got.append(part)
            t0 += size
    for got, want in zip(tallies, wants, strict=True):
        assert torch.equal(torch.cat(got), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [False, True])
def test_attention_flags_leave_a_silent_sample_alone(gen, backend, shared):
    """Flags per sample from tiles that are one head of one sample: a sample with no spikes
    (zero counts: uniform probabilities of 1/37 round to target 0 at theta 1/15, and a zero
    context) is never flagged, by either neuron, while the other fires. ``shared``: both
    neurons record into one array, as the runner has them."""
    T = 4
    case = _attention_case(gen, T, (2, 3), 18, 16, 37, 16)
    for name in ("q", "k_t", "v"):
        case[name] = case[name].clone()
        case[name][:, 1] = 0
    case["attn_threshold"] = torch.tensor(1 / 15)
    spikes, _, _, a = _composed(case)
    from spikekernels.ops._activity import spikes_of_counts

    wants = [_fired(s) for s in (spikes_of_counts(a, None), spikes)]
    for want in wants:
        assert want[:, 0].any() and not want[:, 1].any(), "the case proves little"
    flags = [torch.zeros(T, 2, dtype=torch.int32) for _ in range(2)]
    if shared:
        flags[1] = flags[0]
        wants = [wants[0] | wants[1]] * 2
    with force_backend(backend):
        _run_attention(case, attn_active=flags[0], active=flags[1])
    for got, want in zip(flags, wants, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_merge_heads_inplace_poisoned(gen, backend, poisoned_allocations):
    case = _attention_case(gen, 4, (2, 3), 17, 24, 30, 16, state=True)
    spikes, attn_count, count, _ = _composed(case, merge_heads=True)
    states = case["attn_count"].clone(), case["count"].clone()
    with force_backend(backend):
        got = _run_attention(dict(case, attn_count=states[0], count=states[1]), inplace=True,
                             merge_heads=True)  # fmt: skip
    assert got[1] is states[0] and got[2] is states[1]
    _assert_equal(got, (spikes, attn_count, count), ATTENTION_NAMES)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_chunked_equals_whole(gen, device):
    case = _attention_case(gen, 12, (2,), 19, 36, 45, 24, state=True)
    case = {name: t.to(device) for name, t in case.items()}
    whole = _run_attention(case)
    outs, attn_count, count = [], case["attn_count"], case["count"]
    for q, k, v in zip(*(case[n].split([5, 1, 6]) for n in ("q", "k_t", "v")), strict=True):
        out, attn_count, count = _run_attention(
            dict(case, q=q, k_t=k, v=v, attn_count=attn_count, count=count)
        )
        outs.append(out)
    _assert_equal((torch.cat(outs), attn_count, count), whole, ATTENTION_NAMES)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_probs_on_rounding_ties(gen, device):
    """Silent queries make every softmax uniform, ``p = fl(1/N)``, and an attention
    threshold of ``fl(2p / (2j + 1))`` puts every target within an ulp of the tie
    ``j + 1/2``, where the fused kernel's division-free estimate must give way to the
    division (kernels.target). Over key counts where the estimate alone rounds the tie the
    wrong way (all but the last), bit-exact against the reference, every count settled at
    the exact rounding's side."""
    for n, j in ((5, 1), (7, 2), (11, 6), (67, 3), (197, 3)):
        case = _attention_case(gen, 8, (2,), 9, 16, n, 8)
        case["q"] = torch.zeros_like(case["q"])
        p = torch.tensor(1.0 / n, dtype=torch.float32)
        theta = (2 * p / (2 * j + 1)).float()
        case["attn_threshold"] = theta
        want = _composed(case)
        got = _run_attention({name: t.to(device) for name, t in case.items()})
        _assert_equal(got, want[:3], ATTENTION_NAMES)
        exact = torch.floor(p / theta + 0.5)
        assert torch.equal(want[1].unique(), exact.to(torch.int8).reshape(1))
        estimate = torch.floor(p * (1 / theta) + 0.5)
        assert (estimate != exact) == (n != 197), f"N = {n}: the case lost its edge"


@pytest.mark.parametrize("device", DEVICES)
def test_attention_context_on_rounding_ties(gen, device):
    """The fused kernel's context neuron on ties: silent queries and an attention threshold
    of ``fl(1/N)`` make every attention count 1 from the first step, so the context is the
    sum of the value counts over the keys, held fixed by value spikes at the first step only;
    a threshold of ``2 fl(theta_a theta_v)`` then puts every odd context within an ulp of a
    tie, where the division-free estimate must give way to the division (kernels.target).
    Bit-exact against the reference, every count settled on the exact rounding's side."""
    T, m, n, dv = 10, 9, 13, 16
    case = _attention_case(gen, T, (2,), m, 8, n, dv)
    case["q"] = torch.zeros_like(case["q"])
    spikes = torch.zeros_like(case["v"])
    spikes[0] = torch.randint(-1, 2, spikes[0].shape, generator=gen, dtype=torch.int8)
    case["v"] = _running(spikes, None)
    case["attn_threshold"] = torch.tensor(1.0 / n, dtype=torch.float32)
    # theta_v = 0.52: the estimate alone rounds some of these ties the wrong way (checked)
    case |= dict(theta_a=torch.tensor(1 / 15), theta_v=torch.tensor(0.52))
    scale = (case["theta_a"] * case["theta_v"]).float()
    case["threshold"] = 2 * scale
    want = _composed(case)
    got = _run_attention({name: t.to(device) for name, t in case.items()})
    _assert_equal(got, want[:3], ATTENTION_NAMES)
    assert (want[1] == 1).all(), "the attention counts are not all 1"
    z = case["v"][-1].to(torch.int32).sum(-2, keepdim=True).double()  # [B, 1, DV]
    assert (z % 2 == 1).float().mean() > 0.2, "too few contexts on a tie"
    assert ((want[2].double() - z / 2).abs() <= 0.5).all(), "unsettled"
    y = scale * z.float()
    estimate = torch.floor(y * (1 / case["threshold"]) + 0.5)
    assert (estimate != torch.floor(y / case["threshold"] + 0.5)).any(), "no edge"


def _sum_in_tile_rows(e: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """tree_sum of each row of ``e`` ``[R, N]`` taken in the order of a scores tile's rows
    (``exact_attention.key_order``) instead of the keys': what a kernel that held its keys
    in that order but summed its rows neighbours-first would get."""
    from spikekernels import exact_math

    width = 1 << len(order)
    rows = torch.arange(width)
    keys = sum(((rows >> bit) & 1) << i for i, bit in enumerate(order))
    padded = torch.nn.functional.pad(e, (0, width - e.shape[-1]))
    return exact_math.tree_sum(padded[:, keys])


@pytest.mark.parametrize("device", DEVICES)
def test_attention_sum_order_decides_a_target(gen, device):
    """The fused kernel's softmax sums each query's keys in tree_sum's order although its
    tile holds them in ``key_order``'s: a lane whose probability takes another value when the
    tile's rows are summed in row order, and an attention threshold that puts the two values
    on either side of a rounding step, with the count already at the right target, so that
    only the exact order leaves it silent."""
    from spikekernels import exact_math
    from spikekernels.kernels.exact_attention import key_order, probs_config

    case = _attention_case(gen, 1, (1,), 16, 16, 197, 8, state=True)
    _, block_n, _, num_warps = probs_config(197)
    z = exact_math.score_value(
        exact_math.int_matmul(case["q"][0, 0], case["k_t"][0, 0]), case["gain"]
    )
    e = exact_math.exp_rows(z - z.amax(-1, keepdim=True))
    right = e / exact_math.tree_sum(e)
    wrong = e / _sum_in_tile_rows(e, key_order(block_n, num_warps))
    row, key = ((right != wrong) & (e == e.amax(-1, keepdim=True))).nonzero()[0].tolist()
    p, p_wrong = right[row, key], wrong[row, key]

    def target(prob, theta):
        return torch.floor(prob / theta + 0.5).item()

    for k in range(1, ATTN_BOUNDS[1]):
        theta = ((p.double() + p_wrong.double()) / (2 * k + 1)).float()
        if target(p, theta) != target(p_wrong, theta):
            break
    else:
        raise AssertionError("no threshold separates the two sums")
    case["attn_threshold"] = theta
    case["attn_count"][0, row, key] = int(target(p, theta))
    want = _composed(case)
    assert want[1][0, row, key] == int(target(p, theta))  # silent there: the case's edge
    on_device = {name: t.to(device) for name, t in case.items()}
    _assert_equal(_run_attention(on_device), want[:3], ATTENTION_NAMES)
    # the scores kernel on its own, from the same counts
    from spikekernels.ops import exact_attention_probs

    got = exact_attention_probs(
        *(on_device[name] for name in ("q", "k_t", "gain", "attn_threshold")), *ATTN_BOUNDS,
        None, None, on_device["attn_count"], counts_in=True, counts_out=True,
    )  # fmt: skip
    _assert_equal(got, (want[3], want[1]), ("counts", "attn_count"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_quiet_tiles_wake_up(gen, backend):
    """Counts that hold for many steps (both products equal to the last step's: the kernel's
    quiet paths), then move again late in the run."""
    T = 50
    probs = _probs_case(gen, T, (2,), 20, 24, 30, state=True)
    q, k = probs["q"].clone(), probs["k_t"].clone()
    q[1:].zero_()
    k[1:].zero_()
    q[44, :, 3, 5] = 1
    k[47, 1, 7, :4] = -1
    probs |= dict(q=q, k_t=k)
    case = _attention_case(gen, T, (2,), 20, 24, 30, 16, state=True)
    case |= {name: t for name, t in _probs_counts_case(probs).items() if name in ("q", "k_t")}
    case["v"] = case["v"][:1].expand(T, *case["v"].shape[1:])  # values settled from step 0
    want = _composed(case)
    with force_backend(backend):
        got = _run_attention(case)
    _assert_equal(got, want[:3], ATTENTION_NAMES)
    late = want[0][36:44].abs().sum().item(), want[0][44:].abs().sum().item()
    assert late[0] == 0 and late[1] > 0, f"settled before step 44, woken after: {late}"


def _qkv_moved(case) -> torch.Tensor:
    """``qkv_active``'s truth ``[T, *batch, 3]``: whether q's, k's and v's running counts of a
    batch entry differ from the step before (set at step 0)."""
    flags = []
    for name in ("q", "k_t", "v"):
        x = case[name]
        moved = torch.ones(x.shape[:-2], dtype=torch.bool)
        moved[1:] = (x[1:] != x[:-1]).flatten(-2).any(dim=-1)
        flags.append(moved)
    return torch.stack(flags, dim=-1).to(torch.int32)


def _hold(gen, case, p: float = 0.6) -> dict:
    """``case`` with q's, k's and v's counts of random (step, batch entry) held at the step
    before: operands that did not change, which ``qkv_active`` lets the kernel skip."""
    held = dict(case)
    for name in ("q", "k_t", "v"):
        x = case[name].clone()
        hold = torch.rand(x.shape[:-2], generator=gen) < p
        for t in range(1, x.shape[0]):
            x[t][hold[t]] = x[t - 1][hold[t]]
        held[name] = x
    return held


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("T", "batch", "m", "d", "n", "dv"), ATTENTION_SHAPES)
@pytest.mark.parametrize("state", [False, True])
def test_attention_qkv_active_changes_no_bit(gen, backend, T, batch, m, d, n, dv, state):
    """With the producer's flags (the truth, plus flags set where nothing changed, which the
    contract allows) the bits, the counts and both neurons' activity are those without. The
    rows of the spikes that fire (``row_active``): the truth on the PyTorch paths, every row
    of a block of queries that fired on Triton's; a flag set before stays set."""
    case = _hold(gen, _attention_case(gen, T, batch, m, d, n, dv, state=state))
    truth = _qkv_moved(case)
    flags = truth | (torch.rand(truth.shape, generator=gen) < 0.2).to(torch.int32)
    assert T == 1 or (truth == 0).any(), "the case proves little"
    merge = len(batch) > 1
    spikes, attn_count, count, _ = _composed(case, merge_heads=merge)
    activity = [torch.zeros(T, batch[0], dtype=torch.int32) for _ in range(4)]
    kept = (torch.rand(spikes.shape[:-1], generator=gen) < 0.2).to(torch.int32)
    rows = kept.clone()
    with force_backend(backend):
        ran = backend_for(case["q"], ("triton", "torch")) if backend != "reference" else backend
        for qkv_active, (attn_active, active) in ((None, activity[:2]), (flags, activity[2:])):
            got = _run_attention(case, attn_active=attn_active, active=active, merge_heads=merge,
                                 qkv_active=qkv_active, row_active=rows)  # fmt: skip
            _assert_equal(got, (spikes, attn_count, count), ATTENTION_NAMES)
    assert torch.equal(activity[0], activity[2]) and torch.equal(activity[1], activity[3])
    # per head and block of queries (the kernel's program), then per row of the spikes
    heads = spikes.reshape(*spikes.shape[:-1], -1, dv)  # [T, *rows, heads, DV]
    if ran == "triton":
        block_m = attention_config(n, dv)[0]
        fired = (heads != 0).any(dim=-1).transpose(-1, -2).to(torch.int32)  # [T, .., heads, M]
        blocks = F.pad(fired, (0, -m % block_m)).unflatten(-1, (-1, block_m)).amax(dim=-1)
        want = blocks.repeat_interleave(block_m, dim=-1)[..., :m].amax(dim=-2)
    else:
        want = (heads != 0).flatten(-2).any(dim=-1)
    assert torch.equal(rows, want.to(torch.int32) | kept)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("state", [False, True])
def test_attention_kernel_skips_what_the_flags_call_quiet(gen, device, state):
    """The kernel reads q and k only at steps the flags mark: with every flag 0 after step 0
    (the op's own check bypassed) it gives the bits of q and k frozen at step 0, whatever
    they do later. v is held (its flag true): the attention neuron still climbs to its
    targets for a few steps, and its moves alone must make the context read v again."""
    from spikekernels.kernels.exact_attention import exact_attention_triton
    from spikekernels.ops._registry import launcher

    T = 6
    case = _attention_case(gen, T, (2, 3), 18, 24, 37, 16, state=state)
    case["v"] = case["v"][:1].expand_as(case["v"])
    frozen = {name: case[name][:1].expand_as(case[name]) for name in ("q", "k_t")}
    frozen = dict(case, **frozen)
    spikes, attn_count, count, a = _composed(frozen)
    assert (a[2:] != a[1:-1]).any(), "the attention neuron settles at once: proves little"
    assert (_qkv_moved(case)[1:] != 0).any(), "the operands never move: proves little"
    qkv_active = torch.zeros(T, 2, 3, 3, dtype=torch.int32)
    qkv_active[0] = 1
    on = {name: t.to(device) for name, t in case.items()}
    c = dict(on)
    head = [c.pop(name) for name in ("q", "k_t", "v", "gain", "attn_threshold")]
    scalars = [c.pop(name) for name in ("theta_a", "theta_v", "threshold")]
    got = exact_attention_triton(
        launcher, *head, *ATTN_BOUNDS, *scalars, *CTX_BOUNDS, c.get("attn_count"),
        c.get("count"), qkv_active=qkv_active.to(device),
    )  # fmt: skip
    _assert_equal(got, (spikes, attn_count, count), ATTENTION_NAMES)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(("n", "dv"), [(5, 8), (40, 24), (197, 64)])
def test_values_key_major_layout(gen, device, n, dv, poisoned_allocations):
    """The fused kernel's value operand: ``out[t, b, c, p]`` is ``v[t, b, key(p), c]`` for the
    key tile row ``p`` holds (``key_order`` at the kernel's warps), and 0 past N and DV, every
    element written (poisoned allocations). The values are strided slices of a packed qkv
    tensor, as the model hands them over."""
    from spikekernels.kernels.exact_attention import _values_key_major, key_codes, key_order
    from spikekernels.ops._registry import launcher

    T, b, h = 3, 2, 3
    qkv = torch.randint(-128, 128, (T, b, n, 3, h, dv), generator=gen, dtype=torch.int8)
    v5 = qkv.to(device)[:, :, :, 2].permute(0, 1, 3, 2, 4)  # [T, B, H, N, DV], strided
    _, block_n, _, block_dv, num_warps = attention_config(n, dv)
    perm = key_codes(block_n, num_warps)["KEY_PERM"]
    got = _values_key_major(launcher, v5, block_n, block_dv, perm).cpu()
    order = key_order(block_n, num_warps)
    keys = torch.tensor([sum(((p >> bit) & 1) << i for i, bit in enumerate(order))
                         for p in range(block_n)])  # fmt: skip
    assert sorted(keys.tolist()) == list(range(block_n))
    want = torch.zeros(T, b * h, block_dv, block_n, dtype=torch.int8)
    real = keys < n
    values = qkv[:, :, :, 2].permute(0, 1, 3, 4, 2).reshape(T, b * h, dv, n)
    want[:, :, :dv, real] = values[..., keys[real]]
    assert got.shape == want.shape and got.dtype == torch.int8
    assert torch.equal(got, want), f"{(got != want).sum().item()} elements differ"


def _settling_case(gen, T: int, batch=(2, 3), m=18, d=24, n=37, dv=16) -> dict:
    """A run that starts settled (q, k and v held at their first step, both neurons' counts
    at their fixed point: silent), then moves at step 17: the second batch entry's queries go
    to zero (a scores product of zeros, which must not pass for an unformed one), the first's
    values go to zero (the same of the context product)."""
    case = _attention_case(gen, T, batch, m, d, n, dv, state=True)
    for name in ("q", "k_t", "v"):
        case[name] = case[name][:1].expand_as(case[name]).clone()
    held = {name: x[:1].expand(40, *x.shape[1:]) for name, x in case.items()
            if name in ("q", "k_t", "v")}  # fmt: skip
    _, case["attn_count"], case["count"], _ = _composed(case | held)
    case["q"][17:, 1] = 0
    case["v"][17:, 0] = 0
    return case


def _run_chunks_settled(case, sizes, **kwargs) -> tuple[torch.Tensor, ...]:
    """The op chunk by chunk as ``ExactAttention`` calls it: the counts carried, ``qkv_active``
    the truth (at a chunk's first step: against the last chunk's last step) and the settled
    flags carried too (zeros at first; each call reads them and writes its last step's).
    Returns the spikes, the final counts and the flags after each chunk ``[chunks, 2, *batch,
    M]`` (attention, context)."""
    truth = _qkv_moved(case)
    device = case["q"].device
    flags = [torch.zeros(case["q"].shape[1:-1], dtype=torch.int32, device=device)
             for _ in range(2)]  # fmt: skip
    parts, state, seen, t0 = [], None, [], 0
    for size in sizes:
        chunk = {name: x[t0 : t0 + size] if name in ("q", "k_t", "v") else x
                 for name, x in case.items()}  # fmt: skip
        if state is not None:
            chunk |= dict(attn_count=state[0], count=state[1])
        got = _run_attention(
            chunk, qkv_active=truth[t0 : t0 + size].to(device), attn_row_settled=flags[0],
            row_settled=flags[1], **kwargs,
        )  # fmt: skip
        parts.append(got[0])
        state = got[1:]
        seen.append(torch.stack(flags).cpu())
        t0 += size
    return torch.cat(parts), *state, torch.stack(seen)


def _assert_settled_flags(settled, sizes, want, before, superset):
    """The flags written after each chunk against the oracle's run (``want``: spikes, counts,
    and the attention counts after each step; ``before``: those before the run): 1 exactly
    where the row's neuron did not fire at the chunk's last step, or (``superset``: the
    kernel's blocks) only there."""
    spikes, _, _, a = want
    for flags, end in zip(settled, torch.tensor(sizes).cumsum(0).tolist(), strict=True):
        attn_before = a[end - 2] if end > 1 else before
        quiet = (~(a[end - 1] != attn_before).any(dim=-1), ~(spikes[end - 1] != 0).any(dim=-1))
        for got, truth in zip(flags.bool(), quiet, strict=True):
            assert not (got & ~truth).any(), "a row flagged settled fired"
            assert superset or torch.equal(got, truth)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [(2, 3), (2,), (2, 1, 2)], ids=str)
def test_attention_settled_chunks_equal_whole(gen, backend, batch):
    """Chunks that pass the last chunk's quiet rows as settled give the whole run's bits: at
    a chunk edge where every block has settled and its operands hold (the kernel skips them
    from the first step), where products of zeros follow, and in chunks of one step; with
    one, two and three batch dims (the flags' rows are q's, flattened)."""
    T = 32
    case = _settling_case(gen, T, batch)
    want = _composed(case)
    assert not want[0][:17].any() and want[0][17, 1].any() and want[0][17, 0].any()
    for sizes in ((16, 16), (11, 5, 1, 15)):
        with force_backend(backend):
            ran = backend_for(case["q"], ("triton", "torch")) if backend != "reference" else backend
            *got, settled = _run_chunks_settled(case, sizes)
        _assert_equal(got, want[:3], ATTENTION_NAMES)
        assert settled[:-1].all(), "every row settled before step 17: the edges' premise"
        _assert_settled_flags(settled, sizes, want, case["attn_count"], ran == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_settled_scores_unsettled_context(gen, backend):
    """A head whose attention neuron has settled (and whose q, k and v hold) while its
    context neuron has not: the context product, not formed at the first step for the
    attention, is formed for the context neuron there."""
    case = _settling_case(gen, 3)
    count = case["count"][0, 1]  # one head's, each one off its target
    case["count"][0, 1] = torch.where(count > CTX_BOUNDS[0], count - 1, count + 1)
    want = _composed(case)[:3]
    settled = torch.ones(2, 3, 18, dtype=torch.int32)
    row_settled = settled.clone()
    row_settled[0, 1] = 0
    fresh = ~row_settled.bool()
    assert want[0][0, fresh].any() and not want[0][:, ~fresh].any(), "the case's premise"
    with force_backend(backend):
        got = _run_attention(
            case, qkv_active=torch.zeros(3, 2, 3, 3, dtype=torch.int32),
            attn_row_settled=settled, row_settled=row_settled,
        )  # fmt: skip
    _assert_equal(got, want, ATTENTION_NAMES)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_attention_kernel_skips_settled_blocks(gen, device):
    """The kernel trusts the settled flags: with q, k and v held at their first step and every
    qkv flag 0, a block of queries whose rows are all flagged settled stays silent and keeps
    its counts, whatever its neurons would do there (the op's own check bypassed); the other
    blocks give the true bits, among them one where only some rows are flagged."""
    from spikekernels.kernels.exact_attention import exact_attention_triton
    from spikekernels.ops._registry import launcher

    T, m, n, dv = 3, 18, 37, 16
    case = _attention_case(gen, T, (2, 3), m, 24, n, dv, state=True)
    for name in ("q", "k_t", "v"):
        case[name] = case[name][:1].expand_as(case[name])
    spikes, attn_count, count, _ = _composed(case)
    block_m = attention_config(n, dv)[0]
    settled = torch.zeros(2, 3, m, dtype=torch.int32)
    settled[0, 1, :block_m] = 1  # a whole block
    settled[1, 2, block_m:] = 1  # the last block, its rows past M masked
    settled[1, 0, 1] = 1  # one row of a block: it runs
    skipped = torch.zeros_like(settled, dtype=torch.bool)
    skipped[0, 1, :block_m] = skipped[1, 2, block_m:] = True
    assert (spikes[:, skipped] != 0).any(), "the skipped rows would be silent: proves little"
    assert (spikes[:, 1, 0, :block_m] != 0).any(), "the partly flagged block must fire"
    want_spikes = spikes.clone()
    want_spikes[:, skipped] = 0
    want_attn, want_count = attn_count.clone(), count.clone()
    want_attn[skipped] = case["attn_count"][skipped]
    want_count[skipped] = case["count"][skipped]
    on = {name: t.to(device) for name, t in case.items()}
    c = dict(on)
    head = [c.pop(name) for name in ("q", "k_t", "v", "gain", "attn_threshold")]
    scalars = [c.pop(name) for name in ("theta_a", "theta_v", "threshold")]
    flags = [settled.to(device), settled.to(device)]
    got = exact_attention_triton(
        launcher, *head, *ATTN_BOUNDS, *scalars, *CTX_BOUNDS, c["attn_count"], c["count"],
        qkv_active=torch.zeros(T, 2, 3, 3, dtype=torch.int32, device=device),
        attn_row_settled=flags[0], row_settled=flags[1],
    )  # fmt: skip
    _assert_equal(got, (want_spikes, want_attn, want_count), ATTENTION_NAMES)
    # written back: the skipped blocks still settled, blocks that fired at the last step not
    for written in flags:
        assert written.cpu()[skipped].all() and not written.all()


def _settled_bad(gen, kind: str) -> tuple[dict, dict]:
    """A case and the op's extra arguments with the settled flags wrong in one way."""
    T = 3
    case = _attention_case(gen, T, (2,), 5, 7, 6, 4, state=True)
    ones = torch.ones(2, 5, dtype=torch.int32)
    still = _qkv_moved(case)
    still[0] = 0  # nothing moved since the step before: every settled block may skip
    kwargs = dict(qkv_active=still, attn_row_settled=ones, row_settled=ones.clone())
    if kind == "alone":
        del kwargs["row_settled"]
    elif kind == "int64":
        kwargs["row_settled"] = ones.long()
    elif kind == "heads":
        kwargs["attn_row_settled"] = torch.ones(2, 1, 5, dtype=torch.int32)
    elif kind == "shared":
        kwargs["row_settled"] = ones
    elif kind == "strided":
        kwargs["row_settled"] = torch.ones(5, 2, dtype=torch.int32).t()
    elif kind == "context":
        # the attention neuron at its targets (silent at the first step), the context not
        held = {name: x[:1].expand(16, *x.shape[1:]) for name, x in case.items()
                if name in ("q", "k_t", "v")}  # fmt: skip
        case["attn_count"] = _composed(case | held)[3][-1]
        kwargs["attn_row_settled"] = torch.zeros_like(ones)
    return case, kwargs


@pytest.mark.parametrize(
    ("kind", "error", "words"),
    [
        ("alone", ValueError, "attn_row_settled and row_settled go together"),
        ("int64", TypeError, "row_settled must have dtype"),
        ("heads", ValueError, "attn_row_settled must have shape (2, 5)"),
        ("shared", ValueError, "row_settled shares memory with another argument"),
        ("strided", ValueError, "row_settled must be contiguous"),
        ("attention", ValueError, "attn_row_settled marks a row whose attention neuron fires"),
        ("context", ValueError, "row_settled marks a row whose context neuron fires"),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_attention_bad_settled_flags_are_rejected(gen, kind, error, words, device):
    """Flags of the wrong kind, and settled flags on rows whose neuron fires at the first
    step where the kernel would skip it (checked on CPU, and on a GPU with ``validate``: the
    data check runs one step)."""
    case, kwargs = _settled_bad(gen, kind)
    case, kwargs = moved_to(device, case, kwargs)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        _run_attention(case, **kwargs, validate=device != "cpu")


# (what changes a good call, error type, words the message must contain)
BAD_ATTENTION = [
    (dict(qkv_active="int64"), TypeError, "qkv_active must have dtype"),
    (dict(qkv_active="narrow"), ValueError, "qkv_active must be [T, *batch, 3]"),
    (dict(qkv_active="missed"), ValueError, "qkv_active[..., 1] is 0 at a step where k_t"),
    (dict(count=None), ValueError, "attn_count and count go together"),
    (dict(v="short"), ValueError, "v must be [T, *batch, N, DV]"),
    (dict(attn_active="bad"), ValueError, "attn_active must have shape"),
    (dict(v="float"), TypeError, "v"),
    (dict(attn_count="over"), ValueError, "attn_count must lie in [0, 15]"),
    (dict(count="over"), ValueError, "count must lie in [-8, 7], got values in [100, 100]"),
    (dict(row_active="heads"), ValueError, "row_active must have shape (3, 2, 5)"),
    (dict(row_active="strided"), ValueError, "row_active must be contiguous"),
    (dict(attn_tally="alone"), ValueError, "attn_tally and tally go together"),
    (dict(tally="int32"), TypeError, "tally must have dtype"),
    (dict(attn_tally="long"), ValueError, "attn_tally must have shape (3,)"),
    (dict(tally="gappy"), ValueError, "tally must be contiguous"),
]


def bad_attention_call(gen, change: dict) -> tuple[dict, dict]:
    """A good ``exact_attention`` case (T=3, 2 heads, M=5, D=7, N=6, DV=4) and extra
    keywords, changed as one ``BAD_ATTENTION`` entry says."""
    case = _attention_case(gen, 3, (2,), 5, 7, 6, 4, state=True)
    kwargs = {}
    for name, value in change.items():
        if name.endswith("tally"):  # both given, then the one named changed
            kwargs |= {n: torch.zeros(3, dtype=torch.int64) for n in ("attn_tally", "tally")}
            if value == "alone":
                del kwargs["tally" if name == "attn_tally" else "attn_tally"]
            elif value == "int32":
                kwargs[name] = kwargs[name].int()
            elif value == "long":
                kwargs[name] = torch.zeros(4, dtype=torch.int64)
            elif value == "gappy":
                kwargs[name] = torch.zeros(6, dtype=torch.int64)[::2]
        elif value == "short":
            case["v"] = case["v"][..., :-1, :]
        elif value == "float":
            case["v"] = case["v"].float()
        elif value == "bad":
            kwargs["attn_active"] = torch.zeros(2, 2, dtype=torch.int32)
        elif value == "int64":
            kwargs[name] = torch.ones(3, 2, 3, dtype=torch.int64)
        elif value == "narrow":
            kwargs[name] = torch.ones(3, 2, 2, dtype=torch.int32)
        elif value == "heads":  # a dim too many
            kwargs[name] = torch.zeros(3, 2, 2, 5, dtype=torch.int32)
        elif value == "strided":
            kwargs[name] = torch.zeros(3, 5, 2, dtype=torch.int32).transpose(1, 2)
        elif value == "missed":  # k's flag cleared at a step where k moved
            kwargs[name] = _qkv_moved(case)
            moved = kwargs[name][1:, :, 1].nonzero()[0]
            kwargs[name][1 + moved[0], moved[1], 1] = 0
        elif value == "over":  # outside the neuron's bounds (ATTN_BOUNDS, CTX_BOUNDS)
            case[name] = torch.full_like(case[name], 100)
        else:
            case[name] = value
    return case, kwargs


@pytest.mark.parametrize(("change", "error", "words"), BAD_ATTENTION)
@pytest.mark.parametrize("device", DEVICES)
def test_attention_bad_input_is_rejected(gen, change, error, words, device):
    case, kwargs = bad_attention_call(gen, change)
    with pytest.raises(error, match=words.replace("[", r"\[").replace("*", r"\*").replace(
            "(", r"\(").replace(")", r"\)")):  # fmt: skip
        case, kwargs = moved_to(device, case, kwargs)
        _run_attention(case, **kwargs, validate=device != "cpu")


@pytest.mark.parametrize(
    ("backend", "device"),
    [("triton", d) for d in TRITON_DEVICES] + [("torch", "cpu"), ("reference", "cpu")],
)
@pytest.mark.parametrize("merge_heads", [False, True])
@pytest.mark.parametrize("case", ["fresh", "state", "inplace"])
def test_attention_count_before_is_the_incoming_count(gen, backend, device, merge_heads, case):
    """``exact_attention``'s ``count_before`` receives the context neuron's count as it comes
    in (heads merged as the spikes with ``merge_heads``; zeros when fresh), poison and all
    overwritten, on every path (in place: before the op updates it); the results are as
    without it."""
    full = _attention_case(gen, 3, (2, 3), 21, 16, 37, 20, state=case != "fresh")
    full = {name: t.to(device) for name, t in full.items()}
    count = full.get("count")
    incoming = torch.zeros(2, 3, 21, 20, dtype=torch.int8) if count is None else count.cpu().clone()
    if merge_heads:
        incoming = incoming.transpose(1, 2).reshape(2, 21, 60)
    kwargs = dict(merge_heads=merge_heads)
    with force_backend(backend):
        copy = {name: t.clone() if name.endswith("count") else t for name, t in full.items()}
        want = _run_attention(copy, **kwargs)
        before = torch.full(incoming.shape, 77, dtype=torch.int8, device=device)
        got = _run_attention(full, count_before=before, inplace=case == "inplace", **kwargs)
    _assert_equal(got, want, ATTENTION_NAMES)
    assert torch.equal(before.cpu(), incoming)


@pytest.mark.parametrize("flags", ["none", "qkv_active", "settled", "tallies"])
def test_attention_opcheck(gen, flags):
    """With the flags: qkv_active read and row_active written; then also the settled flags
    read and written; then also the tallies added to."""
    case = _attention_case(gen, 3, (2, 2), 5, 8, 6, 4, state=True)
    extra = ()
    if flags != "none":
        extra = (_qkv_moved(case), torch.zeros(3, 2, 5, dtype=torch.int32))
    if flags in ("settled", "tallies"):
        quiet = torch.zeros(2, 2, 5, dtype=torch.int32)
        extra += (quiet, quiet.clone())
    if flags == "tallies":  # (no count_before)
        extra += (None, torch.zeros(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64))
    c = dict(case)
    args = [c.pop(n) for n in ("q", "k_t", "v", "gain", "attn_threshold")]
    args += [*ATTN_BOUNDS, c.pop("theta_a"), c.pop("theta_v"), c.pop("threshold"), *CTX_BOUNDS]
    args += [c.pop("attn_count"), c.pop("count")]
    torch.library.opcheck(
        torch.ops.spikekernels.exact_attention, (*args, None, None, False, True, *extra)
    )


@pytest.mark.parametrize("inplace", [False, True])
def test_attention_torch_compile_fullgraph(gen, inplace):
    """The fused op under ``torch.compile(fullgraph=True)``: the eager bits, the counts
    updated in place when asked."""
    # small rows (DV = 4): the shape at which Inductor's C++ code for an abs().amax() of int8
    # spikes in record_active failed to compile
    case = _attention_case(gen, 4, (2, 2), 5, 8, 6, 4, state=True)
    states = {name: case[name].clone() for name in ("attn_count", "count")}

    def block(q, k_t, v, attn_count, count, flags):
        # one flags tensor for both neurons, as the runner watches every neuron with one
        spikes, *new = _run_attention(
            dict(case, q=q, k_t=k_t, v=v, attn_count=attn_count, count=count),
            inplace=inplace, merge_heads=True, attn_active=flags, active=flags,
        )  # fmt: skip
        return spikes.sum(0, dtype=torch.int32), *new

    flags = torch.zeros(4, 2, dtype=torch.int32), torch.zeros(4, 2, dtype=torch.int32)
    eager = block(
        case["q"], case["k_t"], case["v"], *(t.clone() for t in states.values()), flags[0]
    )
    compiled = torch.compile(block, fullgraph=True)
    got = compiled(
        case["q"], case["k_t"], case["v"], states["attn_count"], states["count"], flags[1]
    )
    for g, w in zip(got, eager, strict=True):
        assert torch.equal(g, w)
    assert flags[0].any() and torch.equal(flags[1], flags[0])
    if inplace:
        assert torch.equal(states["attn_count"], eager[1])
        assert torch.equal(states["count"], eager[2])


# the module's choice of one op or two: whether the fused kernel equals the two layers' kernels
# is test_attention_equals_the_two_layers, which the interpreter pass runs (this would add 90 s)
@CPU_PASS_ONLY
@pytest.mark.parametrize("chunk", [1, 3])
def test_exact_attention_module_fused_equals_the_two_modules(gen, chunk, monkeypatch):
    """``ExactAttention`` runs ``probs`` and ``context`` as one op unless a hook watches
    either; both ways give the same logits and the same state of every neuron, chunk after
    chunk, and a hook still sees its module's output."""
    from test_exact import TINY, images, make_exact

    import spikekernels.nn.exact_attention as module
    from spikekernels.convert import convert

    fused_calls = []
    real = module.exact_attention

    def counted(*args, **kwargs):
        fused_calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "exact_attention", counted)
    qann = make_exact(gen, **TINY, level=16)
    x = images(gen, qann, 2)
    runs, calls = [], []
    for hooked in (False, True):
        snn = convert(qann)
        seen = []
        if hooked:  # the last block's probs: the first block stays fused
            snn.blocks[1].attn.probs.register_forward_hook(
                lambda m, i, out, seen=seen: seen.append(out)
            )
        fused_calls.clear()
        logits, steps = snn(x, max_steps=40, chunk=chunk)
        calls.append(len(fused_calls))
        runs.append((logits, steps, [site.neuron.count.clone() for site in snn.sites]))
        assert bool(seen) == hooked, "the hook must see the module called (and only then)"
        # the fused call keeps its quiet rows for the next; a module called alone promises
        # nothing (the run ends settled: the last step fired nowhere)
        for block, fused in zip(snn.blocks, (True, not hooked), strict=True):
            for part in (block.attn.probs, block.attn.context):
                assert part.row_settled.shape == (2, TINY["num_heads"], part.count.shape[-2])
                assert bool(part.row_settled.all()) == fused, (type(part).__name__, hooked)
    assert calls[0] == 2 * calls[1] > 0, f"fused calls, unhooked vs hooked: {calls}"
    (l0, s0, c0), (l1, s1, c1) = runs
    assert s0 == s1 and torch.equal(l0.view(torch.int32), l1.view(torch.int32))
    assert all(torch.equal(a, b) for a, b in zip(c0, c1, strict=True))


@pytest.mark.cuda
def test_cuda_settled_chunks_match_cpu_reference(gen):
    """The settled flags on the GPU at ViT-S size (197 tokens, head dim 64): chunks that pass
    them give the CPU oracle's whole run, across a chunk edge where every block starts
    quiet."""
    case = _settling_case(gen, 32, batch=(2, 6), m=197, d=64, n=197, dv=64)
    want = _composed(case)[:3]
    *got, settled = _run_chunks_settled({name: t.cuda() for name, t in case.items()}, (16, 16))
    _assert_equal(got, want, ATTENTION_NAMES)
    assert settled[0].all(), "every row settled before step 17: the edge's premise"


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["attention", "context"])
def test_cuda_validate_refuses_bad_settled_flags(gen, kind):
    """On a GPU the settled flags are trusted unless ``validate=True``, which runs the CPU's
    check (one step of the op): a settled row whose neuron fires where the kernel would skip
    it is refused, as on CPU."""
    case, kwargs = _settled_bad(gen, kind)
    case = {name: t.cuda() for name, t in case.items()}
    kwargs = {name: t.cuda() for name, t in kwargs.items()}
    # trusted: no host sync, no check; on copies, as the op writes the flags it was given
    # (its last step's truth, which validate would then accept)
    clone = {name: t.clone() for name, t in kwargs.items()}
    _run_attention({name: t.clone() for name, t in case.items()}, **clone)
    with pytest.raises(ValueError, match=f"row_settled marks a row whose {kind} neuron fires"):
        _run_attention(case, validate=True, **kwargs)


@pytest.mark.cuda
def test_cuda_fused_attention_matches_cpu_reference(gen):
    """The fused attention kernel on the GPU against the two oracles on the CPU, at ViT-S
    size (197 tokens, head dim 64), heads merged as proj reads them."""
    case = _attention_case(gen, 6, (2, 6), 197, 64, 197, 64, state=True)
    want = _composed(case, merge_heads=True)[:3]
    got = _run_attention({name: t.cuda() for name, t in case.items()}, merge_heads=True)
    _assert_equal(got, want, ATTENTION_NAMES)

"""Per-sample activity (``active``) of every neuron op (float mode's ``st_bif``,
``spike_linear_neuron`` and ``spike_layernorm_neuron``, exact mode's five): each op sets
``active[t, b] = 1`` where sample ``b`` fired at step ``t`` while it writes the spikes, on every
backend, and the runner's silence test reads those flags instead of a pass over every
neuron's spikes.

The flags are checked against the op's own spikes (``spikes.reshape(T, B, -1) != 0`` per
sample), OR-ed into flags that were already set; the spikes and state must be the same bits
with and without ``active``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from conftest import CPU_PASS_ONLY, INTERPRETED, st_bif_margin
from test_exact import TINY, images, make_exact
from test_exact_attention_ops import _context_case, _probs_case
from test_exact_layernorm_neuron import EPS, _norm, _residual
from test_exact_linear import _layer, _spikes

from spikekernels import convert, reference
from spikekernels.nn import TargetNeuron
from spikekernels.ops import (
    exact_attention_probs,
    exact_context,
    exact_layernorm_neuron,
    exact_linear,
    spike_layernorm_neuron,
    spike_linear_neuron,
    st_bif,
    target_spikes,
)
from spikekernels.ops._dispatch import force_backend

B = 3  # samples (dim 1 of every op's spikes)
SILENT = 1  # the sample whose input is zero: it never fires


class Case(NamedTuple):
    """``inputs``: the time-major tensors (sliced for chunked calls); ``call(*inputs, state,
    active)`` runs the public op from ``state`` (None: fresh) and returns ``(outputs, state)``;
    ``op_args(active)`` the registered op's arguments for the whole run from fresh state."""

    inputs: tuple[torch.Tensor, ...]
    call: Callable
    op: object
    op_args: Callable


def _target(gen, T, shape=(5, 7)) -> Case:
    value = (torch.rand(T, B, *shape, generator=gen) * 2 - 1) * 1.5
    value[:, SILENT] = 0
    theta = torch.tensor(0.3)

    def call(value, state, active):
        out = target_spikes(value, theta, -4, 3, *(state or (None,)), active=active)
        return out, out[1:]

    args = lambda active: (value, theta, -4, 3, None, active)  # noqa: E731
    return Case((value,), call, torch.ops.spikekernels.target_spikes.default, args)


def _st_bif(gen, T, shape=(5, 7)) -> Case:
    # fresh v = 0.5 and zero input: the silent sample never fires. (30, 50): a sample spans
    # more than the kernel's block, and blocks straddle samples (its two-sample path)
    x = (torch.rand(T, B, *shape, generator=gen) * 2 - 1) * 0.8
    x[:, SILENT] = 0
    theta = torch.tensor(0.3)

    def call(x, state, active):
        out = st_bif(x, theta, -4, 3, *(state or (None, None)), active=active)
        return out, out[1:]

    args = lambda active: (x, theta, -4, 3, None, None, False, active)  # noqa: E731
    return Case((x,), call, torch.ops.spikekernels.st_bif.default, args)


def _linear_neuron(gen, T) -> Case:
    # no bias: a sample with no input spikes keeps v = 0.5 and never fires
    s = _spikes(gen, T, (B, 5), 45)
    s[:, SILENT] = 0
    # dyadic: every sum exact, so the bits do not depend on the (BLAS, tile) summation order
    weight = torch.randint(-32, 33, (37, 45), generator=gen).float() / 128
    in_theta = torch.tensor(0.4)
    theta = 0.2 + torch.rand(37, generator=gen)

    def call(s, state, active):
        v, count = state or (None, None)
        out = spike_linear_neuron(
            s, weight, in_theta, theta, -4, 3, v=v, count=count, active=active
        )
        return out, out[1:]

    args = lambda active: (s, weight, in_theta, theta, -4, 3, None, 0, 1, None, None, False, active)  # noqa: E731, E501
    return Case((s,), call, torch.ops.spikekernels.spike_linear_neuron.default, args)


def _layernorm_neuron(gen, T) -> Case:
    # no bias: the silent sample's zero rows normalise to 0 and its membranes stay at 0.5.
    # Outputs compared: the spikes and count (bit for bit even where Inductor recompiles the
    # LayerNorm's PyTorch body in its own order, which may move the float state by an ulp)
    x = torch.randn(T, B, 5, 24, generator=gen) + 0.5
    x[:, SILENT] = 0
    head = (torch.randn(24, generator=gen), None, EPS, torch.tensor(0.3), -8, 7)
    # the premise of comparing spikes bit for bit: u within 4 ulps of max|u| a step, summed
    # over the steps, stays clear of every decision
    u = reference.spike_layernorm(x, head[0], None, EPS)[0]
    error = 4 * T * float(u.abs().max()) * 2.0**-23 / 0.3
    assert st_bif_margin(u, head[3], -8, 7) > 2 * error, "data too close to a decision"

    def call(x, state, active):
        out = spike_layernorm_neuron(x, *head, *(state or (None,) * 4), active=active)
        return (out[0], out[4]), out[1:]

    args = lambda active: (x, *head, None, None, None, None, active)  # noqa: E731
    return Case((x,), call, torch.ops.spikekernels.spike_layernorm_neuron.default, args)


def _linear(gen, T) -> Case:
    # no bias: a sample with no input spikes then has value 0 and stays silent
    layer = list(_layer(gen, 37, 45, bias=False).values())
    s = _spikes(gen, T, (B, 5), 45)
    s[:, SILENT] = 0

    def call(s, state, active):
        # state: the input's count before this chunk (the caller's), and the output count
        before, count = state or (0, None)
        s_count = (before + s.sum(0, dtype=torch.int32)).to(torch.int8)
        out = exact_linear(s, *layer, -8, 7, s_count, count, active=active)
        return out, (s_count.to(torch.int32), out[1])

    args = lambda active: (s, *layer, -8, 7, None, None, active)  # noqa: E731
    return Case((s,), call, torch.ops.spikekernels.exact_linear.default, args)


def _layernorm(gen, T, pool=False) -> Case:
    d, c = _residual(gen, T, B, 5, 24)
    c = c.expand(B, -1, -1).clone()
    d[:, SILENT], c[SILENT] = 0, 0  # a zero row normalises to 0: no bias, no spike
    norm = _norm(gen, 24, bias=False)
    head = (c, norm["w"], None, EPS, norm["theta"], -8, 7)

    def call(d, state, active):
        out = exact_layernorm_neuron(d, *head, *(state or (None,)), pool=pool, active=active)
        return out, out[1:]

    args = lambda active: (d, *head, None, pool, active)  # noqa: E731
    return Case((d,), call, torch.ops.spikekernels.exact_layernorm_neuron.default, args)


def _counts_after(operands, state):
    """The operands' counts after these steps, from the ones after the last call (``state``
    ``(*counts, neuron count)``, None when fresh), and the neuron's count."""
    before, count = (None, None) if state is None else (state[:-1], state[-1])
    counts = [
        (x.sum(0, dtype=torch.int32) + (0 if before is None else b.to(torch.int32))).char()
        for x, b in zip(operands, before or (None, None), strict=True)
    ]
    return counts, count


def _probs(gen, T) -> Case:
    # 37 keys and theta 1/15: the uniform probabilities of a silent sample round to 0
    case = _probs_case(gen, T, (B, 2), 5, 9, 37)
    q, k_t = case["q"].clone(), case["k_t"].clone()
    q[:, SILENT], k_t[:, SILENT] = 0, 0
    head = (case["gain"], torch.tensor(1 / 15), 0, 15)

    def call(q, k_t, state, active):
        counts, count = _counts_after((q, k_t), state)
        out = exact_attention_probs(q, k_t, *head, *counts, count, active=active)
        return out, (*counts, out[1])

    args = lambda active: (q, k_t, *head, None, None, None, active)  # noqa: E731
    return Case((q, k_t), call, torch.ops.spikekernels.exact_attention_probs.default, args)


def _context(gen, T) -> Case:
    case = _context_case(gen, T, (B, 2), 5, 11, 9)
    a, v = case["a"].clone(), case["v"]
    a[:, SILENT], v[:, SILENT] = 0, 0
    head = (case["theta_a"], case["theta_v"], case["threshold"], -8, 7)

    def call(a, v, state, active):
        counts, count = _counts_after((a, v), state)
        out = exact_context(a, v, *head, *counts, count, active=active)
        return out, (*counts, out[1])

    args = lambda active: (a, v, *head, None, None, None, active)  # noqa: E731
    return Case((a, v), call, torch.ops.spikekernels.exact_context.default, args)


CASES = {
    "st_bif": _st_bif,
    "st_bif wide": lambda gen, T: _st_bif(gen, T, shape=(30, 50)),
    "spike_linear_neuron": _linear_neuron,
    "spike_layernorm_neuron": _layernorm_neuron,
    "target_spikes": _target,
    "target_spikes wide": lambda gen, T: _target(gen, T, shape=(30, 50)),
    "exact_linear": _linear,
    "exact_layernorm_neuron": _layernorm,
    "exact_layernorm_neuron pool": lambda gen, T: _layernorm(gen, T, pool=True),
    "exact_attention_probs": _probs,
    "exact_context": _context,
}


def _fired(spikes: torch.Tensor) -> torch.Tensor:
    """The contract, from the op's own spikes: ``[T, B]`` int32, 1 where a sample fired."""
    return spikes.reshape(spikes.shape[0], spikes.shape[1], -1).ne(0).any(-1).to(torch.int32)


def _flags(T: int) -> torch.Tensor:
    return torch.zeros(T, B, dtype=torch.int32)


def _assert_equal(got, want):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == w.dtype and torch.equal(g, w), f"output {i} differs"


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("name", CASES)
def test_flags_are_the_samples_that_fired(gen, name, T):
    """Set where a sample fired, kept where already set, the outputs bit for bit unchanged."""
    case = CASES[name](gen, T)
    plain, _ = case.call(*case.inputs, None, None)
    preset = (torch.rand(T, B, generator=gen) < 0.4).to(torch.int32)
    preset[:, SILENT] = 0
    active = preset.clone()
    got, _ = case.call(*case.inputs, None, active)
    _assert_equal(got, plain)
    fired = _fired(got[0])
    assert fired.any(), "no sample fired: the case proves little"
    assert torch.equal(active, preset | fired)
    assert not active[:, SILENT].any(), "a silent sample was flagged"


@pytest.mark.parametrize("name", CASES)
def test_chunked_calls(gen, name):
    """Each chunk's flags are its own steps' (state carried between calls)."""
    case = CASES[name](gen, 7)
    whole, _ = case.call(*case.inputs, None, None)
    state, spikes, flags = None, [], []
    for t0, n in ((0, 3), (3, 1), (4, 3)):
        active = _flags(n)
        out, state = case.call(*(x[t0 : t0 + n] for x in case.inputs), state, active)
        spikes.append(out[0])
        flags.append(active)
    assert torch.equal(torch.cat(spikes), whole[0])
    assert torch.equal(torch.cat(flags), _fired(whole[0]))


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("name", CASES)
def test_every_backend_records(gen, name, backend):
    """Each backend pinned in turn (one that cannot run here falls back to torch)."""
    case = CASES[name](gen, 4)
    active = _flags(4)
    with force_backend(backend):
        out, _ = case.call(*case.inputs, None, active)
    assert torch.equal(active, _fired(out[0]))


@pytest.mark.parametrize("backend", [None, "triton", "cpp", "torch", "reference"])
def test_counts_out_flags_start_from_the_incoming_count(gen, backend):
    """``exact_linear(counts_out=True)`` with an incoming count: the flags are the steps where
    the count moved, from that count on (the first step's spikes are its count less the
    incoming one, not less 0). A silent input and bias 0.5 / threshold 0.25: every neuron's
    target is 2; sample 0 comes in at 2 and never fires, sample 1 comes in at 0 and fires at
    steps 0 and 1 (counts 1, 2), then rests."""
    t, b, k, n = 3, 2, 6, 4
    s = torch.zeros(t, b, k, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    count = torch.zeros(b, n, dtype=torch.int8)
    count[0] = 2
    args = (s, w, torch.full((n,), 0.01), torch.full((n,), 0.5), torch.tensor(0.5))
    active = torch.zeros(t, b, dtype=torch.int32)
    with force_backend(backend):
        counts, _ = exact_linear(
            *args, torch.tensor(0.25), -8, 7, None, count, active=active, counts_out=True
        )
    want_counts = torch.tensor([[2, 1], [2, 2], [2, 2]], dtype=torch.int8)
    assert torch.equal(counts, want_counts[..., None].expand(t, b, n))
    assert torch.equal(active, torch.tensor([[0, 1], [0, 1], [0, 0]], dtype=torch.int32))


@pytest.mark.parametrize("backend", ["triton", "cpp", "torch", "reference"])
@pytest.mark.parametrize(("theta", "scale"), [(1e-8, 1e-6), (0.3, 0.6)])
def test_float_out_flags_come_from_sigma(gen, backend, theta, scale):
    """``st_bif(float_out=True)`` in float16: a spike of a threshold below float16's smallest
    subnormal rounds to 0, and its sample fired all the same. Every backend reads the flags
    off sigma, as the kernel does, and the float spikes are the bits of a call without
    ``active``."""
    x = ((torch.rand(3, B, 5, generator=gen) * 2 - 1) * scale).half()
    x[:, SILENT] = 0
    threshold = torch.tensor(theta)
    active = _flags(3)
    with force_backend(backend):
        sigma = st_bif(x, threshold, -4, 3)[0]
        plain = st_bif(x, threshold, -4, 3, float_out=True)
        got = st_bif(x, threshold, -4, 3, float_out=True, active=active)
    assert torch.equal(active, _fired(sigma)) and active.any()
    _assert_equal(got, plain)
    if theta < 2**-25:  # the premise: every float16 spike is 0
        assert not plain[0].any()


BAD_ACTIVE = [
    ("int64", lambda a: a.to(torch.int64), TypeError, "active must have dtype"),
    ("bool", lambda a: a.bool(), TypeError, "active must have dtype"),
    ("list", lambda a: a.tolist(), TypeError, "active must be a torch.Tensor"),
    ("samples", lambda a: a[:, :-1], ValueError, r"active must have shape \(\d+, 3\)"),
    ("steps", lambda a: a[:-1], ValueError, "active must have shape"),
    ("3-D", lambda a: a[..., None], ValueError, "active must have shape"),
    ("strided", lambda a: torch.zeros(a.shape[::-1], dtype=a.dtype).t(), ValueError, "contig"),
    ("device", lambda a: a.to("meta"), ValueError, "active is on meta"),
]


@pytest.mark.parametrize(
    ("bad", "error", "words"), [b[1:] for b in BAD_ACTIVE], ids=[b[0] for b in BAD_ACTIVE]
)
@pytest.mark.parametrize("name", CASES)
def test_bad_active_is_rejected(gen, name, bad, error, words):
    case = CASES[name](gen, 2)
    with pytest.raises(error, match=words):
        case.call(*case.inputs, None, bad(_flags(2)))


def test_rows_must_split_into_samples(gen):
    """``[T, N]`` spikes have one row a step: it cannot be shared by N > 1 samples."""
    with pytest.raises(ValueError, match="active: the spikes' 1 rows"):
        target_spikes(
            torch.zeros(2, 6), torch.tensor(1.0), -4, 3, active=torch.zeros(2, 6, dtype=torch.int32)
        )
    layer = list(_layer(gen, 5, 8).values())
    with pytest.raises(ValueError, match="do not split into 5 samples"):
        exact_linear(
            _spikes(gen, 2, (), 8), *layer, -8, 7, active=torch.zeros(2, 5, dtype=torch.int32)
        )


@pytest.mark.parametrize("name", CASES)
def test_opcheck(gen, name):
    """The schema declares the write to ``active``; the fake impl leaves it alone."""
    case = CASES[name](gen, 3)
    torch.library.opcheck(case.op, case.op_args(_flags(3)))


@pytest.mark.parametrize("name", CASES)
def test_torch_compile_fullgraph(gen, name):
    case = CASES[name](gen, 3)

    def run(active, *inputs):
        return case.call(*inputs, None, active)[0]

    torch._dynamo.reset()
    want_active, got_active = _flags(3), _flags(3)
    want = run(want_active, *case.inputs)
    got = torch.compile(run, fullgraph=True)(got_active, *case.inputs)
    _assert_equal(got, want)
    assert torch.equal(got_active, want_active) and want_active.any()


def test_neuron_watch_records_until_stopped(gen):
    """``watch`` is module state: kept across ``reset()``, None stops it."""
    neuron = TargetNeuron(0.3, 8, signed=True)
    value = (torch.rand(4, B, 5, generator=gen) * 2 - 1) * 1.5
    value[:, SILENT] = 0
    flags = _flags(4)
    neuron.watch(flags)
    neuron.reset()
    spikes = neuron(value)
    assert torch.equal(flags, _fired(spikes)) and flags.any()
    neuron.watch(None)
    neuron.reset()
    neuron(value)
    assert neuron.activity is None


def test_float_runner_neurons_report_their_own_silence(gen):
    """The runner watches each neuron with flags of its own (a row of one tensor), so after a
    float-mode run, a partial last chunk included, each neuron's ``silent()`` and
    ``active_samples()`` are its own last step's, as a forward hook on it sees that step, and
    no neuron keeps a copy of its spikes for them."""
    from spikekernels.models import QuantViT, calibrate

    qann = QuantViT(**TINY)  # float weights: float mode
    calibrate(qann, torch.randn(4, 3, 8, 8, generator=gen))
    snn = convert(qann.eval())
    assert not snn.exact
    x = torch.cat((torch.randn(2, 3, 8, 8, generator=gen), torch.zeros(1, 3, 8, 8)))
    last = {}
    neurons = snn.neurons()
    handles = [n.register_forward_hook(lambda m, i, out: last.update({m: out[-1]}))
               for n in neurons]  # fmt: skip
    try:
        _, steps = snn(x, max_steps=6, chunk=4)
    finally:
        for h in handles:
            h.remove()
    assert steps == 6, "the run must end in its partial chunk"
    fired_somewhere = False
    for neuron in neurons:
        fired = (last[neuron] != 0).flatten(1).any(dim=1)
        assert neuron.last_spikes is None, f"{type(neuron).__name__} kept a copy"
        assert torch.equal(neuron.active_samples(), fired), type(neuron).__name__
        assert bool(neuron.silent()) == (not bool(fired.any())), type(neuron).__name__
        fired_somewhere |= bool(fired.any())
    assert fired_somewhere, "the case proves little"


def test_runner_settles_as_a_hook_recount(gen):
    """The runner's flags from the kernels give the settle steps that a forward hook on every
    neuron, counting spikes itself, finds: the first step t >= 1 at which no neuron of the
    sample fired."""
    qann = make_exact(gen, **TINY, level=16)
    snn = convert(qann)
    x = torch.cat((images(gen, qann, 2), torch.zeros(1, 3, 8, 8)))
    fired = []
    last_counts = {}  # a counts_out neuron's count after its last step (exact attention)

    def hook(module, inputs, out):
        if getattr(module, "counts_out", False):  # the count after each step: diff it
            first = last_counts.get(module, torch.zeros_like(out[:1]))
            last_counts[module] = out[-1:].clone()
            out = torch.diff(out, dim=0, prepend=first)
        fired.append(_fired(out).bool())

    neurons = snn.neurons()
    assert neurons and all(hasattr(n, "watch") for n in neurons)
    # the interpreter: chunk 3 crosses chunk boundaries (conftest.CPU_PASS_ONLY)
    for chunk in (3,) if INTERPRETED else (1, 3, 8):
        handles = [n.register_forward_hook(hook) for n in neurons]
        try:
            _, steps, trace = snn(x, max_steps=40, chunk=chunk, return_trace=True)
        finally:
            for h in handles:
                h.remove()
        last_counts.clear()
        assert all(n.activity is None for n in neurons), "the runner left a neuron watching"
        per_chunk = [torch.stack(fired[i : i + len(neurons)]).any(0) for i in
                     range(0, len(fired), len(neurons))]  # fmt: skip
        active = torch.cat(per_chunk)
        fired.clear()
        silent = ~active
        silent[0] = False
        want = torch.where(silent.any(0), silent.to(torch.int8).argmax(0), 40)
        assert torch.equal(trace.sample_steps, want), (chunk, trace.sample_steps, want)
        assert steps == int(want.max()) < 40


@CPU_PASS_ONLY  # the guard is Python, and the CPU data check catches a flag passed on
@pytest.mark.parametrize("hooked", [("norm1", "mlp.fc1"), ("attn.proj", "mlp.fc2"), ("",)], ids=str)
@pytest.mark.parametrize("kind", ["add", "zero"])
def test_row_flags_stop_at_a_hook_that_replaces_spikes(gen, monkeypatch, hooked, kind):
    """A forward hook may replace a neuron's spikes; the row flags its op recorded
    (``row_active``) then do not describe what the next linear or LayerNorm reads, so the
    block passes it none (a 0 on a row that now fires would be refused, or on a GPU
    skipped), and the next linear counts the spikes it receives (``s_continues=False``):
    the run equals one that passes no row flags and counts every input itself. Hooked: the
    producers of the linears' inputs, the branches' (the LayerNorms' inputs), or the block,
    whose output (the stream with its pending branches) the hook changes; the hook adds
    spikes at the last step, or silences every step."""
    import spikekernels.models.spiking_vit as vit
    import spikekernels.nn.exact_attention as attention

    qann = make_exact(gen, **TINY, level=16)
    x = images(gen, qann, 2)
    calls = []

    def add_spikes(module, inputs, out):
        calls.append(1)
        if isinstance(out, vit.Residual):  # the block: to its attention branch's spikes
            branch = out.pending[0]
            spikes = add_spikes(module, inputs, branch.spikes)
            return out._replace(pending=(branch._replace(spikes=spikes), *out.pending[1:]))
        if kind == "zero":
            return torch.zeros_like(out)
        out = out.clone()
        out[-1, :, 0] = 1  # the class row fires at the chunk's last step
        return out

    runs = []
    for flags in (True, False):
        if not flags:  # the oracle: no flags passed anywhere, no input said to continue
            for module in (vit, attention):
                monkeypatch.setattr(module, "unless_hooked", lambda flags, *modules: None)
                monkeypatch.setattr(module, "hooked", lambda *modules: True)
        snn = convert(qann)
        block = snn.blocks[1]
        for name in hooked:
            block.get_submodule(name).register_forward_hook(add_spikes)
        runs.append(snn(x, max_steps=30, chunk=3))
    assert calls, "the hooks never ran"
    (l0, s0), (l1, s1) = runs
    assert s0 == s1 and torch.equal(l0.view(torch.int32), l1.view(torch.int32))


# the modules (name suffixes) whose spikes a hook replaces, on every block
ABLATED = [
    ("norm1", "fc1"),
    ("proj", "fc2"),
    ("attn.context",),
    ("attn", "mlp"),
    ("patch_embed.neuron",),
    ("patch_embed", "blocks.0"),  # the modules that return the stream (a Residual)
    ("pre", "norm1", "norm2", "readout.norm"),  # pre-hooks on the branches a norm adds
]


@CPU_PASS_ONLY  # model wiring; the kernels' settled rows are checked on CPU by their data
@pytest.mark.parametrize("hooked", ABLATED, ids=str)
def test_a_hook_that_replaces_spikes_gives_the_same_run_at_every_chunking(gen, hooked):
    """An ablation: a forward hook silences a token row of a layer's spikes at every step
    (or a pre-hook, of the branches a LayerNorm neuron adds). The layers reading them
    integrate what they receive (``ExactLinearNeuron``'s ``s_received``, the branch counts
    the blocks, the patch embedding, the runner and the norms keep), not their producer's
    count, so the run settles on the same bits at every chunking and equals the per-step
    reference. Hooked: the inputs of linears (``qkv``/``fc1``, ``proj`` through the unfused
    ``context``, ``fc2``), the branches the norms add, on every block, or the stream between
    blocks (its pending branches' spikes)."""
    import spikekernels.models.spiking_vit as vit

    pre = hooked[0] == "pre"

    qann = make_exact(gen, **TINY, level=16)
    x = images(gen, qann, 2)
    calls = []

    def silence_row(module, inputs, out):
        calls.append(1)
        if isinstance(out, vit.Residual):
            branches = (
                b._replace(spikes=silence_row(module, inputs, b.spikes)) for b in out.pending
            )
            return out._replace(pending=tuple(branches))
        out = out.clone()
        out[:, :, 1] = 0
        return out

    def silence_branches(module, args):  # d, then each branch's spikes, step, count before
        return tuple(silence_row(module, (), a) if i in (1, 4) else a for i, a in enumerate(args))

    runs = []
    for chunk in (1, 3, (4, 1), 64, "reference", None):
        snn = convert(qann)
        for name, module in snn.named_modules():
            if chunk is not None and name.endswith(hooked[pre:]):  # None: unhooked, contrast
                if pre:
                    module.register_forward_pre_hook(silence_branches)
                else:
                    module.register_forward_hook(silence_row)
        if chunk == "reference":
            runs.append(snn(x, max_steps=64, chunk=1, reference=True))
        else:
            runs.append(snn(x, max_steps=64, chunk=chunk or 3))
    assert calls, "the hooks never ran"
    *hooked_runs, (plain, _) = runs
    logits, steps = hooked_runs[0]
    assert steps < 64, "the run did not settle"
    for got, got_steps in hooked_runs[1:]:
        assert got_steps == steps and torch.equal(got.view(torch.int32), logits.view(torch.int32))
    assert not torch.equal(plain, logits), "the hook changed nothing: the case proves little"

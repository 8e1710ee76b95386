"""exact_layernorm_neuron (SPEC.md §9.2-§9.4): the fused residual read + LayerNorm row function
+ target-driven neuron against the step-by-step reference and against exact mode's unfused
chain, bit for bit, on every backend (Triton through the interpreter, vectorised PyTorch, the
oracle)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICES, TRITON_DEVICES, assert_same_bits, call_on

from spikekernels import exact_math, reference
from spikekernels.kernels.exact_layernorm import (
    _LN_SLOPE,
    layer_norm_estimate,
    layer_norm_estimate_edge,
)
from spikekernels.kernels.target import inverse_threshold, target_estimate_margin
from spikekernels.nn.exact_layers import ExactLayerNorm
from spikekernels.nn.target_neuron import TargetNeuron
from spikekernels.ops import exact_layernorm as exact_layernorm_ops
from spikekernels.ops import exact_layernorm_neuron
from spikekernels.ops._dispatch import backend_for, force_backend

# NaN rows are deliberate here (0/0, NaN and inf inputs): numpy, under the interpreter, warns
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

EPS = 1e-6  # the QANN ViT's; not a float32, so fl32(eps) is what the variance gets


def _residual(gen, T, batch, tokens, channels, device="cpu", scale=3.0):
    """``(d [T, B, N, C], c [1, N, C])`` float64 as exact mode builds them: ``D`` a sum of
    float32 steps times small integers (changing over steps), ``c`` a float32-ish constant."""
    steps = (0.01 + 0.05 * torch.rand(4, generator=gen)).to(torch.float64)
    counts = torch.randint(-20, 21, (T, batch, tokens, channels, 4), generator=gen)
    d = (counts.to(torch.float64) * steps).sum(-1) * (scale / 3)
    c = torch.randn(1, tokens, channels, generator=gen, dtype=torch.float64)
    return d.to(device), c.to(device)


def _norm(gen, channels, *, weight=True, bias=True, per_channel=False, device="cpu"):
    """LayerNorm parameters and the neuron threshold, scaled so that the targets span several
    levels (and reach the bounds) for the signed bounds the tests use."""
    w = 0.5 + torch.rand(channels, generator=gen) if weight else None
    b = 0.3 * torch.randn(channels, generator=gen) if bias else None
    if per_channel:
        theta = 0.1 + 0.3 * torch.rand(channels, generator=gen)
    else:
        theta = torch.tensor(0.1 + 0.3 * torch.rand((), generator=gen).item())
    return {k: None if t is None else t.to(device) for k, t in dict(w=w, b=b, theta=theta).items()}


def _run(d, c, norm, n_min, p_max, count=None, eps=EPS, **kwargs):
    return exact_layernorm_neuron(
        d, c, norm["w"], norm["b"], eps, norm["theta"], n_min, p_max, count, **kwargs
    )


def _reference(d, c, norm, n_min, p_max, count=None, eps=EPS, pool=False):
    def cpu(t):
        return None if t is None else t.cpu()

    return reference.exact_layernorm_neuron(
        d.cpu(),
        c.cpu(),
        cpu(norm["w"]),
        cpu(norm["b"]),
        eps,
        norm["theta"].cpu(),
        n_min,
        p_max,
        cpu(count),
        pool,
    )


def _unfused(d, c, norm, level, eps=EPS, pool=False):
    """Exact mode today: residual_read (or pool_patch_tokens) -> ExactLayerNorm ->
    TargetNeuron (signed), on the CPU."""
    d, c = d.cpu(), c.cpu()
    x = exact_math.pool_patch_tokens(c, d) if pool else exact_math.residual_read(c, d)
    cpu = {k: None if t is None else t.cpu() for k, t in norm.items()}
    neuron = TargetNeuron(cpu["theta"], level, signed=True)
    spikes = neuron(ExactLayerNorm(cpu["w"], cpu["b"], eps)(x))
    return spikes, neuron.count


def _assert_same(got, want):
    for name, g, w in zip(("spikes", "count"), got, want, strict=True):
        assert_same_bits(g, w, name)


@pytest.mark.parametrize("device", DEVICES)
def test_values_next_to_rounding_steps(gen, device):
    """Per-channel thresholds of ``fl(2 y / (2k + 1))`` for a fixed stream's LayerNorm ``y``
    put every target within an ulp of a tie, where the kernel's division-free estimate must
    give way to the division (kernels.target); the stream held over the steps, the counts
    reach their ties. Bit-exact against the reference."""
    d, c = _residual(gen, 1, 2, 3, 96)
    d = d.expand(12, -1, -1, -1).contiguous()
    norm = _norm(gen, 96, per_channel=True)
    y = exact_math.layer_norm_rows(exact_math.residual_read(c, d[0]), norm["w"], norm["b"], EPS)
    k = torch.randint(0, 6, (96,), generator=gen)
    norm["theta"] = (2 * y[0, 0].abs() / (2 * k + 1)).float()  # channel ties of the first row
    norm = {name: t.to(device) for name, t in norm.items()}
    want = _reference(d, c, norm, -8, 7)
    _assert_same(_run(d.to(device), c.to(device), norm, -8, 7), want)
    settled = want[1][0, 0].double() * y[0, 0].sign()
    assert ((settled - (k + 0.5)).abs() <= 0.5).all(), "the first row's counts missed its ties"


# (batch, tokens, C): ViT-S's width, widths that are not powers of two, one channel
SHAPES = [(2, 3, 384), (3, 5, 100), (1, 9, 7), (2, 2, 1), (1, 3, 1024)]


def _branch(gen, shape, device="cpu", fresh=False):
    """A pending branch for a stream of ``shape`` ``[T, *step]``: ternary int8 spikes, the
    branch neuron's float32 step, and its int8 count before them (None when ``fresh``)."""
    spikes = torch.randint(-1, 2, shape, generator=gen, dtype=torch.int8)
    theta = torch.tensor(0.02 + 0.1 * torch.rand((), generator=gen).item())
    count = None if fresh else torch.randint(-30, 31, shape[1:], generator=gen).to(torch.int8)
    return tuple(None if t is None else t.to(device) for t in (spikes, theta, count))


def _run_branch(d, c, norm, branch, count=None, branch2=None, **kwargs):
    spikes, theta, before = branch
    if branch2 is not None:
        names = ("branch2_spikes", "branch2_threshold", "branch2_count")
        kwargs.update(zip(names, branch2, strict=True))
    return _run(
        d, c, norm, -8, 7, count,
        branch_spikes=spikes, branch_threshold=theta, branch_count=before, **kwargs,
    )  # fmt: skip


def _composition(d, c, norm, branch, count=None, pool=False, branch2=None):
    """What the fused branches replace: ``exact_residual_add`` for each (in order), then
    ``exact_layernorm_neuron``, the reference of each, on the CPU. Returns
    ``(spikes, count, D)``."""
    D = None if d is None else d.cpu()
    for pending in (branch, branch2):
        if pending is not None:
            spikes, theta, before = (None if t is None else t.cpu() for t in pending)
            D = reference.exact_residual_add(D, spikes, theta, before)
    return (*_reference(D, c, norm, -8, 7, count, pool=pool), D)


def _assert_same_residual(got, want):
    got = got.cpu()
    assert got.dtype == torch.float64 and got.shape == want.shape, (got.dtype, got.shape)
    diff = (got.view(torch.int64) != want.view(torch.int64)).sum().item()
    assert diff == 0, f"D: {diff} of {got.numel()} values differ in their bits"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("batch", "tokens", "channels"), [(2, 3, 384), (3, 5, 100), (1, 4, 7)])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("with_d", [True, False])
@pytest.mark.parametrize("pool", [False, True])
def test_pending_branch_is_the_composition(gen, device, pool, with_d, T, batch, tokens, channels):
    """The branch's update fused in: the spikes, the count and every bit of ``D`` as
    ``exact_residual_add`` followed by the op on its output (``d`` None: the patch
    embedding's case; ``pool``: the update reaches every token before the mean)."""
    d, c = _residual(gen, T, batch, tokens, channels, device)
    d = d if with_d else None
    norm = _norm(gen, channels, device=device)
    branch = _branch(gen, (T, batch, tokens, channels), device, fresh=not with_d)
    spikes, count, D = _run_branch(d, c, norm, branch, pool=pool, residual_out=True)
    want = _composition(d, c, norm, branch, pool=pool)
    _assert_same((spikes, count), want[:2])
    _assert_same_residual(D, want[2])
    if channels > 1:
        assert spikes.any(), "the neurons must fire (the test would be vacuous)"
    two = _run_branch(d, c, norm, branch, pool=pool)
    assert len(two) == 2, "without residual_out the op returns (spikes, count)"
    _assert_same(two, want[:2])


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("pool", [False, True])
def test_pending_branch_every_backend(gen, backend, pool):
    d, c = _residual(gen, 3, 2, 5, 100)
    norm = _norm(gen, 100, per_channel=True)
    branch = _branch(gen, d.shape)
    count = torch.randint(-8, 8, (2, 100) if pool else (2, 5, 100), generator=gen)
    count = count.to(torch.int8)
    with force_backend(backend):
        *got, D = _run_branch(d, c, norm, branch, count, pool=pool, residual_out=True)
    want = _composition(d, c, norm, branch, count, pool=pool)
    _assert_same(got, want[:2])
    _assert_same_residual(D, want[2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_d", [True, False])
def test_pending_branch_chunked_equals_whole(gen, device, with_d):
    """Feeding both counts back (the norm's, and the branch neuron's advanced by the chunk's
    spikes) gives the whole run's spikes, count and ``D``."""
    d, c = _residual(gen, 10, 2, 6, 48, device)
    d = d if with_d else None
    norm = _norm(gen, 48, device=device)
    spikes_b, theta, before = _branch(gen, (10, 2, 6, 48), device)
    whole = _run_branch(d, c, norm, (spikes_b, theta, before), residual_out=True)
    parts, count = [], None
    for t0, n in ((0, 4), (4, 1), (5, 5)):
        chunk = None if d is None else d[t0 : t0 + n]
        *out, count, D = _run_branch(
            chunk, c, norm, (spikes_b[t0 : t0 + n], theta, before), count, residual_out=True
        )
        parts.append((out[0], D))
        before = (before.to(torch.int32) + spikes_b[t0 : t0 + n].sum(0)).to(torch.int8)
    _assert_same((torch.cat([p[0] for p in parts]), count), [w.cpu() for w in whole[:2]])
    _assert_same_residual(torch.cat([p[1] for p in parts]), whole[2].cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_pending_branch_on_the_class_row(gen, device):
    """The readout: the class-token row of ``d``, the branch spikes and count, all slices."""
    d, c = _residual(gen, 4, 3, 6, 32, device)
    norm = _norm(gen, 32, device=device)
    spikes, theta, before = _branch(gen, d.shape, device)
    branch = (spikes[:, :, 0], theta, before[:, 0])
    got = _run_branch(d[:, :, 0], c[:, 0], norm, branch)
    _assert_same(got, _composition(d[:, :, 0], c[:, 0], norm, branch)[:2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pool", [False, True])
def test_pending_branch_writes_every_output(gen, device, pool, poisoned_allocations):
    d, c = _residual(gen, 3, 5, 3, 100, device)
    norm = _norm(gen, 100, device=device)
    branch = _branch(gen, d.shape, device)
    count = torch.randint(-3, 4, (5, 100) if pool else (5, 3, 100), generator=gen)
    count = count.to(device=device, dtype=torch.int8)
    *got, D = _run_branch(d, c, norm, branch, count, pool=pool, residual_out=True)
    want = _composition(d, c, norm, branch, count, pool=pool)
    _assert_same(got, want[:2])
    _assert_same_residual(D, want[2])


@pytest.mark.parametrize("device", DEVICES)
def test_pending_branch_inputs_untouched(gen, device):
    d, c = _residual(gen, 3, 2, 4, 16, device)
    norm = _norm(gen, 16, device=device)
    branch = _branch(gen, d.shape, device)
    before = [t.clone() for t in (d, *branch)]
    _, _, D = _run_branch(d, c, norm, branch, residual_out=True)
    assert D.data_ptr() != d.data_ptr()
    for t, b in zip((d, *branch), before, strict=True):
        assert torch.equal(t, b), "an input was modified"


# --- two pending branches (a block's norm1: the previous block's attention and MLP) --------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("batch", "tokens", "channels"), [(2, 3, 384), (1, 4, 7)])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("with_d", [True, False])
@pytest.mark.parametrize("pool", [False, True])
def test_two_branches_are_the_composition(gen, device, pool, with_d, T, batch, tokens, channels):
    """Both updates fused in: the spikes, the count and every bit of ``D`` as
    ``exact_residual_add`` of the first branch, then of the second, then the op; and as the
    oracle called with both branches."""
    d, c = _residual(gen, T, batch, tokens, channels, device)
    d = d if with_d else None
    norm = _norm(gen, channels, device=device)
    shape = (T, batch, tokens, channels)
    first = _branch(gen, shape, device, fresh=not with_d)
    second = _branch(gen, shape, device)
    spikes, count, D = _run_branch(d, c, norm, first, branch2=second, pool=pool, residual_out=True)
    want = _composition(d, c, norm, first, pool=pool, branch2=second)
    _assert_same((spikes, count), want[:2])
    _assert_same_residual(D, want[2])
    if channels > 1:
        assert spikes.any(), "the neurons must fire (the test would be vacuous)"
    with force_backend("reference"):
        oracle = _run_branch(d, c, norm, first, branch2=second, pool=pool)
    _assert_same(oracle, want[:2])
    one = _run_branch(d, c, norm, first, pool=pool, residual_out=True)
    assert not torch.equal(one[2].cpu(), want[2]), "the second branch must change D"


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("pool", [False, True])
def test_two_branches_every_backend(gen, backend, pool):
    d, c = _residual(gen, 3, 2, 5, 100)
    norm = _norm(gen, 100, per_channel=True)
    first, second = _branch(gen, d.shape), _branch(gen, d.shape)
    count = torch.randint(-8, 8, (2, 100) if pool else (2, 5, 100), generator=gen)
    count = count.to(torch.int8)
    with force_backend(backend):
        *got, D = _run_branch(
            d, c, norm, first, count, branch2=second, pool=pool, residual_out=True
        )
    want = _composition(d, c, norm, first, count, pool=pool, branch2=second)
    _assert_same(got, want[:2])
    _assert_same_residual(D, want[2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True])
def test_two_branches_chunked_equals_whole(gen, device, inplace):
    """Feeding every count back (the norm's, and each branch neuron's advanced by the
    chunk's spikes), in place or not, gives the whole run's spikes, count and ``D``."""
    d, c = _residual(gen, 10, 2, 6, 48, device)
    norm = _norm(gen, 48, device=device)
    branches = [list(_branch(gen, d.shape, device)) for _ in range(2)]
    whole = _run_branch(d, c, norm, branches[0], branch2=branches[1], residual_out=True)
    parts = []
    count = torch.zeros(2, 6, 48, dtype=torch.int8, device=device)
    for t0, n in ((0, 4), (4, 1), (5, 5)):
        chunk = [(s[t0 : t0 + n], theta, before) for s, theta, before in branches]
        *out, new_count, D = _run_branch(
            d[t0 : t0 + n], c, norm, chunk[0], count, branch2=chunk[1],
            residual_out=True, inplace=inplace,
        )  # fmt: skip
        assert (new_count is count) == inplace
        count = new_count
        parts.append((out[0], D))
        for branch in branches:
            advanced = branch[2].to(torch.int32) + branch[0][t0 : t0 + n].sum(0)
            branch[2] = advanced.to(torch.int8)
    _assert_same((torch.cat([p[0] for p in parts]), count), [w.cpu() for w in whole[:2]])
    _assert_same_residual(torch.cat([p[1] for p in parts]), whole[2].cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_two_branches_on_the_class_row(gen, device):
    """The readout of exact mode: the class-token row of ``d`` and of both branches."""
    d, c = _residual(gen, 4, 3, 6, 32, device)
    norm = _norm(gen, 32, device=device)
    rows = []
    for _ in range(2):
        spikes, theta, before = _branch(gen, d.shape, device)
        rows.append((spikes[:, :, 0], theta, before[:, 0]))
    got = _run_branch(d[:, :, 0], c[:, 0], norm, rows[0], branch2=rows[1])
    want = _composition(d[:, :, 0], c[:, 0], norm, rows[0], branch2=rows[1])
    _assert_same(got, want[:2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pool", [False, True])
def test_two_branches_write_every_output(gen, device, pool, poisoned_allocations):
    d, c = _residual(gen, 3, 5, 3, 100, device)
    norm = _norm(gen, 100, device=device)
    first, second = _branch(gen, d.shape, device), _branch(gen, d.shape, device, fresh=True)
    count = torch.randint(-3, 4, (5, 100) if pool else (5, 3, 100), generator=gen)
    count = count.to(device=device, dtype=torch.int8)
    *got, D = _run_branch(d, c, norm, first, count, branch2=second, pool=pool, residual_out=True)
    want = _composition(d, c, norm, first, count, pool=pool, branch2=second)
    _assert_same(got, want[:2])
    _assert_same_residual(D, want[2])


@pytest.mark.parametrize("device", DEVICES)
def test_two_branches_inputs_untouched(gen, device):
    d, c = _residual(gen, 3, 2, 4, 16, device)
    norm = _norm(gen, 16, device=device)
    first, second = _branch(gen, d.shape, device), _branch(gen, d.shape, device)
    before = [t.clone() for t in (d, *first, *second)]
    _run_branch(d, c, norm, first, branch2=second, residual_out=True)
    for t, b in zip((d, *first, *second), before, strict=True):
        assert torch.equal(t, b), "an input was modified"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("batch", "tokens", "channels"), SHAPES)
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize(("n_min", "p_max"), [(-8, 7), (-16, 15)])
def test_bit_exact(gen, device, n_min, p_max, T, batch, tokens, channels):
    d, c = _residual(gen, T, batch, tokens, channels, device)
    norm = _norm(gen, channels, device=device)
    got = _run(d, c, norm, n_min, p_max)
    _assert_same(got, _reference(d, c, norm, n_min, p_max))
    assert set(got[0].unique().tolist()) <= {-1, 0, 1}
    if channels > 1:
        assert got[0].any(), "the neurons must fire (the test would be vacuous)"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("channels", "level"), [(384, 16), (100, 32), (7, 8)])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_the_unfused_chain(gen, device, channels, level, affine):
    """The op equals what exact mode runs today: residual_read -> ExactLayerNorm ->
    TargetNeuron, with the neuron's bounds from its level."""
    d, c = _residual(gen, 5, 2, 4, channels, device)
    norm = _norm(gen, channels, weight=affine, bias=affine, device=device)
    want = _unfused(d, c, norm, level)
    n_min, p_max = -(level // 2), level // 2 - 1
    _assert_same(_run(d, c, norm, n_min, p_max), want)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_every_backend_matches_the_reference(gen, backend):
    """Each backend pinned in turn (one that cannot run here falls back to torch)."""
    d, c = _residual(gen, 3, 2, 5, 100)
    norm = _norm(gen, 100, per_channel=True)
    count = torch.randint(-8, 8, (2, 5, 100), generator=gen, dtype=torch.int8)
    with force_backend(backend):
        got = _run(d, c, norm, -8, 7, count)
    _assert_same(got, _reference(d, c, norm, -8, 7, count))


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("case", ["fresh", "mid_run", "inplace", "pool", "branches"])
def test_count_before_is_the_incoming_count(gen, backend, case):
    """``count_before`` receives the neuron's count as it comes in (zeros when fresh), poison
    and all overwritten, on every path (in place: before the op updates it; pooled; with the
    two pending branches of a block's norm1), and the results are as without it."""
    d, c = _residual(gen, 3, 2, 5, 48)
    norm = _norm(gen, 48, per_channel=True)
    pool = case == "pool"
    rows = (2,) if pool else (2, 5)
    count = None if case == "fresh" else torch.randint(-8, 8, (*rows, 48), generator=gen,
                                                      dtype=torch.int8)  # fmt: skip
    incoming = torch.zeros(*rows, 48, dtype=torch.int8) if count is None else count.clone()
    kwargs = dict(pool=pool)
    if case == "branches":
        names = ("branch_spikes", "branch_threshold", "branch_count")
        kwargs.update(zip(names, _branch(gen, d.shape), strict=True))
        kwargs.update(zip(["branch2" + n[6:] for n in names], _branch(gen, d.shape), strict=True))
    with force_backend(backend):
        want = _run(d, c, norm, -8, 7, None if count is None else count.clone(), **kwargs)
        before = torch.full((*rows, 48), 77, dtype=torch.int8)
        got = _run(d, c, norm, -8, 7, count, inplace=case == "inplace", count_before=before,
                   **kwargs)  # fmt: skip
    _assert_same(got, want)
    assert torch.equal(before, incoming)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("weight", "bias"), [(True, False), (False, True), (False, False)])
def test_optional_affine_and_per_channel_threshold(gen, device, weight, bias):
    d, c = _residual(gen, 3, 2, 3, 96, device)
    norm = _norm(gen, 96, weight=weight, bias=bias, per_channel=True, device=device)
    _assert_same(_run(d, c, norm, -8, 7), _reference(d, c, norm, -8, 7))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pool", [False, True])
def test_chunked_equals_whole(gen, device, pool):
    d, c = _residual(gen, 10, 2, 6, 48, device)
    norm = _norm(gen, 48, device=device)
    whole = _run(d, c, norm, -16, 15, pool=pool)
    spikes, count = [], None
    for chunk in d.split([4, 1, 5]):
        out, count = _run(chunk, c, norm, -16, 15, count, pool=pool)
        spikes.append(out)
    _assert_same((torch.cat(spikes), count), [w.cpu() for w in whole])


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("poisoned", [False, True])
def test_inplace_equals_fresh(gen, backend, pool, poisoned, request):
    """``inplace=True``: chunks fed back in place give the whole run's bits, and the count
    stays the same tensor at the same address (what a CUDA graph replays)."""
    if poisoned:
        request.getfixturevalue("poisoned_allocations")
    d, c = _residual(gen, 7, 3, 5, 20)
    norm = _norm(gen, 20, per_channel=True)
    count0 = torch.randint(-8, 8, (3, 20) if pool else (3, 5, 20), generator=gen)
    count0 = count0.to(torch.int8)
    with force_backend(backend):
        whole = _run(d, c, norm, -8, 7, count0, pool=pool)
        count = count0.clone()
        where = count.data_ptr()
        spikes = []
        for chunk in d.split([3, 1, 3]):
            out = _run(chunk, c, norm, -8, 7, count, pool=pool, inplace=True)
            assert len(out) == 2 and out[1] is count
            spikes.append(out[0])
    assert count.data_ptr() == where
    _assert_same((torch.cat(spikes), count), whole)
    _assert_same(whole, _reference(d, c, norm, -8, 7, count0, pool=pool))


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize(("with_d", "pool"), [(True, False), (False, False), (True, True)])
def test_inplace_pending_branch(gen, backend, with_d, pool):
    """In place with a pending branch: the count is written, ``branch_count`` and ``d`` are
    inputs (untouched), and ``D`` is still returned fresh."""
    d, c = _residual(gen, 5, 2, 3, 9)
    d = d if with_d else None
    norm = _norm(gen, 9)
    spikes_b, theta, before = _branch(gen, (5, 2, 3, 9))
    count0 = torch.randint(-8, 8, (2, 9) if pool else (2, 3, 9), generator=gen)
    count0 = count0.to(torch.int8)
    inputs = (d, spikes_b, before)
    kept = [None if t is None else t.clone() for t in inputs]
    with force_backend(backend):
        branch = (spikes_b, theta, before)
        whole = _run_branch(d, c, norm, branch, count0, pool=pool, residual_out=True)
        count = count0.clone()
        parts = []
        for t0, n in ((0, 2), (2, 3)):
            chunk = None if d is None else d[t0 : t0 + n]
            branch = (spikes_b[t0 : t0 + n], theta, before)
            out = _run_branch(
                chunk, c, norm, branch, count, pool=pool, residual_out=True, inplace=True
            )
            assert len(out) == 3 and out[1] is count
            parts.append(out)
            before = (before.to(torch.int32) + spikes_b[t0 : t0 + n].sum(0)).to(torch.int8)
    _assert_same((torch.cat([p[0] for p in parts]), count), whole[:2])
    _assert_same_residual(torch.cat([p[2] for p in parts]), whole[2])
    want = _composition(d, c, norm, (spikes_b, theta, kept[2]), count0, pool=pool)
    _assert_same(whole[:2], want[:2])
    for t, k in zip(inputs, kept, strict=True):
        assert t is None or torch.equal(t, k), "an input was modified"


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_single_step(gen, device):
    d, c = _residual(gen, 1, 1, 3, 7, device)
    norm = _norm(gen, 7, device=device)
    count = torch.zeros(1, 3, 7, dtype=torch.int8, device=device)
    spikes, got = _run(d, c, norm, -8, 7, count, inplace=True)
    assert got is count
    _assert_same((spikes, count), _reference(d, c, norm, -8, 7))


def _layer_norm_in_order(x, norm, order):
    """``exact_math.layer_norm_rows`` with its two row sums in another explicit order:
    ``"sequential"`` (left to right) or ``"blocked"`` (blocks of 4, each left to right, added
    left to right). Elementwise float32 only, so the same bits on any machine."""

    def total(v):
        cols = list(v.split(1, dim=-1))
        if order == "sequential":
            parts = cols
        else:
            parts = [
                cols[j] + cols[j + 1] + cols[j + 2] + cols[j + 3] for j in range(0, len(cols), 4)
            ]
        out = parts[0]
        for part in parts[1:]:
            out = out + part
        return out

    c = x.shape[-1]
    xc = x - total(x) / c
    var = total(xc * xc) / c
    return xc / exact_math.sqrt_rn(var + EPS) * norm["w"] + norm["b"]


@pytest.mark.parametrize("device", DEVICES)
def test_summation_order_is_the_tree(gen, device):
    """Rows whose sums cancel (two values of +-2^24) get other LayerNorm values from a
    sequential or a blocked sum. A per-channel threshold puts a rounding step between the
    tree's value and the sequential one's at one lane of each channel where they differ, and
    the stream is held until the counts settle on their targets; then the counts of either
    other order differ from the tree's (checked), so matching the reference needs tree_sum's
    exact order."""
    channels = 12
    d, c = _residual(gen, 1, 2, 4, channels)
    d[..., :4] += torch.tensor([2.0**24, 1.0, -(2.0**24), 1.0], dtype=torch.float64)
    d = d.expand(10, -1, -1, -1).contiguous()  # held: 10 steps reach any target in [-8, 7]
    norm = _norm(gen, channels, per_channel=True)
    x = exact_math.residual_read(c, d[0]).to(torch.float32)
    y = exact_math.layer_norm_rows(x, norm["w"], norm["b"], EPS)
    others = {order: _layer_norm_in_order(x, norm, order) for order in ("sequential", "blocked")}
    theta = norm["theta"].clone()
    for j in range(channels):
        lanes = (y[..., j] != others["sequential"][..., j]).nonzero()
        if len(lanes) == 0:
            continue
        a, o = y[(*lanes[0], j)], others["sequential"][(*lanes[0], j)]
        # a step (k + 1/2) theta between a and o: the first candidate near their middle
        middle = (a.abs() + o.abs()) / 2
        for k, nudge in ((k, n) for k in range(1, 6) for n in range(-4, 5)):
            t = (middle / (k + 0.5)).float()
            toward = torch.tensor(float("inf") if nudge > 0 else 0.0)
            for _ in range(abs(nudge)):
                t = torch.nextafter(t, toward)
            if exact_math.target(a, t, -8, 7) != exact_math.target(o, t, -8, 7):
                theta[j] = t
                break
    norm["theta"] = theta
    settled = exact_math.target(y, theta, -8, 7)
    for order, value in others.items():
        assert (exact_math.target(value, theta, -8, 7) != settled).any(), (
            f"{order} sum: same counts"
        )
    norm = {name: t.to(device) for name, t in norm.items()}
    want = _reference(d, c, norm, -8, 7)
    assert torch.equal(want[1].float(), settled), "the counts did not settle on their targets"
    _assert_same(_run(d.to(device), c.to(device), norm, -8, 7), want)


@pytest.mark.parametrize("device", DEVICES)
def test_constant_rows(gen, device):
    """Rows with one value (variance 0, or nearly: the mean need not equal the value) give
    ``y = b`` up to that rounding; with ``eps == 0`` an exactly constant row is 0/0 = NaN and
    its neurons stay silent. Both as the reference."""
    d, c = _residual(gen, 3, 2, 4, 40, device)
    c[:, 1:3] = 0.0
    d[:, :, 1] = 0.75  # exact: the mean is 0.75, the variance 0
    d[:, :, 2] = 0.1
    norm = _norm(gen, 40, device=device)
    for eps in (EPS, 0.0):
        got = _run(d, c, norm, -8, 7, eps=eps)
        _assert_same(got, _reference(d, c, norm, -8, 7, eps=eps))
    assert not got[0][:, :, 1].any(), "0/0 rows must not fire"


@pytest.mark.parametrize("device", DEVICES)
def test_first_step_is_never_quiet(gen, device):
    """Rows that are exactly zero from the first step (a quiet tile is one whose input bits
    did not change, and a fresh launch starts from zero bits) with an incoming count away
    from the target: the neurons still move at step 0, as the reference's do. -0.0 too."""
    norm = _norm(gen, 8, device=device)
    norm["b"] = torch.full((8,), 1.5, device=device)  # a zero row's y is the bias: target 3+
    count = torch.randint(-3, 2, (2, 3, 8), generator=gen, dtype=torch.int8).to(device)
    for zero in (0.0, -0.0):
        d = torch.full((2, 2, 3, 8), zero, dtype=torch.float64, device=device)
        c = torch.zeros(3, 8, dtype=torch.float64, device=device)
        want = _reference(d, c, norm, -8, 7, count)
        assert want[0][0].all(), "every neuron must move at step 0 (else vacuous)"
        _assert_same(_run(d, c, norm, -8, 7, count), want)


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_rows_do_not_fire(gen, device):
    d, c = _residual(gen, 3, 2, 3, 20, device)
    d[1, 0, 1, 5] = float("nan")
    d[:, 1, 2, 0] = float("inf")
    norm = _norm(gen, 20, device=device)
    count = torch.randint(-3, 4, (2, 3, 20), generator=gen, dtype=torch.int8).to(device)
    got = _run(d, c, norm, -8, 7, count)
    _assert_same(got, _reference(d, c, norm, -8, 7, count))
    assert not got[0][1, 0, 1].any() and not got[0][:, 1, 2].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "c_shape", [(5, 24), (24,), (), (2, 1, 24), (2, 5, 1), (1, 1, 24), (2, 5, 24)]
)
def test_constant_part_broadcasts(gen, device, c_shape):
    """``c`` broadcast along any dims of a step (leading dims ride on row % Rc in the kernel;
    others are expanded)."""
    d, _ = _residual(gen, 3, 2, 5, 24, device)
    c = torch.randn(c_shape, generator=gen, dtype=torch.float64).to(device)
    norm = _norm(gen, 24, device=device)
    _assert_same(_run(d, c, norm, -8, 7), _reference(d, c, norm, -8, 7))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("batch", "tokens", "channels"), [(3, 5, 24), (2, 2, 100), (1, 17, 7)])
@pytest.mark.parametrize("T", [1, 4])
def test_pool_bit_exact(gen, device, T, batch, tokens, channels):
    """``pool=True``: the global_pool readout of ViT-B/L (float64 mean of the patch tokens)."""
    d, c = _residual(gen, T, batch, tokens, channels, device)
    norm = _norm(gen, channels, device=device)
    got = _run(d, c, norm, -8, 7, pool=True)
    _assert_same(got, _reference(d, c, norm, -8, 7, pool=True))
    _assert_same(got, _unfused(d, c, norm, 16, pool=True))
    assert got[0].shape == (T, batch, channels)


@pytest.mark.parametrize("device", DEVICES)
def test_class_token_readout(gen, device):
    """ViT-S's readout: the class-token row of the stream, a non-contiguous slice of ``d``."""
    d, c = _residual(gen, 4, 3, 6, 32, device)
    norm = _norm(gen, 32, device=device)
    got = _run(d[:, :, 0], c[:, 0], norm, -8, 7)
    want = _unfused(d[:, :, 0], c[:, 0], norm, 16)
    _assert_same(got, want)
    x = exact_math.residual_read(c.cpu(), d.cpu())[:, :, 0]
    assert torch.equal(x, exact_math.residual_read(c[:, 0].cpu(), d[:, :, 0].cpu())), (
        "the slice reads the same row"
    )


@pytest.mark.parametrize("device", DEVICES)
def test_settles_to_the_qann_integer(gen, device):
    """With the stream held at ``D``, within ``p_max - n_min`` steps every count equals the
    QANN quantizer's integer of ``layer_norm_rows(fl32(c + D))`` and then stays there."""
    n_min, p_max = -8, 7
    d, c = _residual(gen, 1, 2, 4, 64, device)
    norm = _norm(gen, 64, device=device)
    held = d.expand(p_max - n_min, *d.shape[1:])
    spikes, count = _run(held, c, norm, n_min, p_max)
    x = exact_math.residual_read(c.cpu(), d[0].cpu())
    cpu = {k: None if t is None else t.cpu() for k, t in norm.items()}
    y = exact_math.layer_norm_rows(x, cpu["w"], cpu["b"], EPS)
    assert torch.equal(count.cpu().float(), exact_math.target(y, cpu["theta"], n_min, p_max))
    more, again = _run(held[:3], c, norm, n_min, p_max, count)
    assert not more.any() and torch.equal(again, count)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("via", ["d", "sign", "branch", "branch2", "branch alone"])
@pytest.mark.parametrize("flags", [False, True])
def test_quiet_rows_wake_up(gen, device, via, flags):
    """A held stream settles (its tiles go quiet: the kernel skips them), then one row's
    input moves at a late step, through ``d`` (also in its values' signs alone) or either
    pending branch, or a branch that is the whole stream (no ``d``): that row answers at
    once, as the reference does, whole and in chunks. ``flags``: with the rows' flags of
    ``d`` and of the branches (the truth), by which the kernel calls a tile quiet without
    forming its rows."""
    T, batch, tokens, channels = 24, 2, 9, 96
    d, c = _residual(gen, 1, batch, tokens, channels)
    d = d.expand(T, -1, -1, -1).clone()
    norm = _norm(gen, channels)
    zeros = torch.zeros((T, batch, tokens, channels), dtype=torch.int8)
    branch = (zeros.clone(), torch.tensor(0.05), torch.zeros(zeros.shape[1:], dtype=torch.int8))
    branch2 = (zeros.clone(), torch.tensor(0.07), torch.zeros(zeros.shape[1:], dtype=torch.int8))
    late, row = 19, (1, 7)  # the last row tile of the second sample
    if via == "d":
        d[late:, row[0], row[1], ::3] += 0.5  # not every channel: LayerNorm ignores a shift
    elif via == "sign":  # x = fl32(c + d) changes in its sign bits alone
        d[:, row[0], row[1]] = 0.0
        d[late:, row[0], row[1], ::3] = -2 * c[0, row[1], ::3]
    else:
        spikes = (branch2 if via == "branch2" else branch)[0]
        spikes[late, row[0], row[1], ::3] = 1
    if via == "branch alone":  # block 0's norm1: the patch embedding's branch is the stream
        d, branch2 = None, None
        branch[0][0] = torch.randint(-1, 2, branch[0][0].shape, generator=gen, dtype=torch.int8)
    want = _composition(d, c, norm, branch, branch2=branch2)[:2]
    assert not want[0][late - 3 : late].any(), "the stream must be settled before it moves"
    assert want[0][late, row[0], row[1]].any(), "the moved row must fire (else vacuous)"
    assert want[0][late].count_nonzero() == want[0][late, row[0], row[1]].count_nonzero()
    hints = {}
    if flags:
        pending = (("branch_row_active", branch), ("branch2_row_active", branch2))
        hints = {name: (b[0] != 0).any(dim=-1).to(torch.int32) for name, b in pending if b}
        if d is not None:
            hints["d_moved"] = exact_layernorm_ops.rows_moved(d)
            assert not hints["d_moved"][1:late].any(), "the flags must call the stream held"
    hints = {name: t.to(device) for name, t in hints.items()}
    to = [None if t is None else t.to(device) for t in (d, c)]
    norm = {k: t.to(device) for k, t in norm.items()}
    branch, branch2 = (b and tuple(t.to(device) for t in b) for b in (branch, branch2))
    _assert_same(_run_branch(*to, norm, branch, branch2=branch2, **hints), want)
    # an incoming count of zeros: the fresh state, given
    zero = torch.zeros(zeros.shape[1:], dtype=torch.int8, device=device)
    _assert_same(_run_branch(*to, norm, branch, zero, branch2=branch2, **hints), want)
    # chunks: the branch counts advance by each chunk's spikes, the norm's count carries; the
    # last chunk is quiet for two steps before the row moves
    parts, count, before, before2 = [], None, branch[2], branch2 and branch2[2]
    for t0, n in ((0, 7), (7, 10), (17, 7)):
        window = slice(t0, t0 + n)
        out, count = _run_branch(
            None if d is None else to[0][window], to[1], norm,
            (branch[0][window], branch[1], before), count,
            branch2=branch2 and (branch2[0][window], branch2[1], before2),
            **{name: flags[window] for name, flags in hints.items()},
        )  # fmt: skip
        parts.append(out)
        before = (before.to(torch.int32) + branch[0][window].sum(0)).to(torch.int8)
        if branch2:
            before2 = (before2.to(torch.int32) + branch2[0][window].sum(0)).to(torch.int8)
    _assert_same((torch.cat(parts), count), want)


@pytest.mark.parametrize("device", DEVICES)
def test_state_is_fresh_and_inputs_untouched(gen, device):
    d, c = _residual(gen, 3, 2, 4, 16, device)
    norm = _norm(gen, 16, device=device)
    count = torch.ones(2, 4, 16, dtype=torch.int8, device=device)
    before = (d.clone(), c.clone(), count.clone())
    _, count_out = _run(d, c, norm, -8, 7, count)
    assert count_out.data_ptr() != count.data_ptr()
    for t, b in zip((d, c, count), before, strict=True):
        assert torch.equal(t, b), "an input was modified"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pool", [False, True])
def test_every_output_element_is_written(gen, device, pool, poisoned_allocations):
    d, c = _residual(gen, 3, 5, 3, 100, device)
    norm = _norm(gen, 100, device=device)
    count = torch.randint(-3, 4, (5, 100) if pool else (5, 3, 100), generator=gen)
    count = count.to(device=device, dtype=torch.int8)
    got = _run(d, c, norm, -8, 7, count, pool=pool)
    _assert_same(got, _reference(d, c, norm, -8, 7, count, pool=pool))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    d = torch.zeros(2, 0, 3, 8, dtype=torch.float64, device=device)
    c = torch.zeros(1, 3, 8, dtype=torch.float64, device=device)
    theta = torch.tensor(1.0, device=device)
    spikes, count = exact_layernorm_neuron(d, c, None, None, EPS, theta, -4, 3)
    assert spikes.shape == (2, 0, 3, 8) and count.shape == (0, 3, 8)


def _hard_rows(gen, rows, channels):
    """float32 rows whose sums round differently in every other order: cancelling giants
    beside small values, constant rows, spans of many binades, and random rows."""
    x = torch.randn(rows, channels, generator=gen) * torch.exp2(
        torch.randint(-8, 9, (rows, 1), generator=gen).float()
    )
    giants = torch.randint(-1, 2, (rows, channels), generator=gen) * 2.0**20
    x = torch.where(torch.rand(rows, channels, generator=gen) < 0.2, x + giants, x)
    x[0] = 0.1
    x[1, ::2] = 3.0e4
    x[2] = torch.linspace(-1e3, 1e-3, channels)
    return x


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("channels", [1, 2, 7, 100, 384, 1000])
@pytest.mark.parametrize("affine", [True, False])
def test_row_function_is_bitwise_layer_norm_rows(gen, device, channels, affine):
    """The kernel's LayerNorm row function on its own (``layer_norm_rows_triton``, values
    out) against the reference's on the CPU: every float32 bit, NaN included.
    The spikes alone would hide a 1-ulp difference away from a rounding tie; this does not
    (a pairwise or sequential sum fails it)."""
    from spikekernels.kernels.exact_layernorm import layer_norm_rows_triton
    from spikekernels.ops._registry import launcher

    x = _hard_rows(gen, 11, channels)
    w = 0.5 + torch.rand(channels, generator=gen) if affine else None
    b = torch.randn(channels, generator=gen) if affine else None

    def on(t):
        return None if t is None else t.to(device)

    for eps in (EPS, 1e-5, 0.0):
        want = reference.exact_layer_norm_rows(x, w, b, eps)
        got = layer_norm_rows_triton(launcher, on(x), on(w), on(b), eps).cpu()
        _assert_same_bits(got, want, f"eps={eps}")


@triton.jit
def _estimate_kernel(xc_ptr, sd_ptr, w_ptr, b_ptr, theta_ptr, c_ptr, sigma_ptr, unsure_ptr,
                     n_min, p_max, C: tl.constexpr):  # fmt: skip
    """The LayerNorm neuron's division-free path on one row a program (``xc``, ``sd``, the
    affine and per-channel thresholds given): ``(sigma, unsure)`` lane by lane."""
    offs = tl.program_id(0) * C + tl.arange(0, C)[None, :]
    cols = tl.arange(0, C)[None, :]
    xc = tl.load(xc_ptr + offs)
    sd = tl.load(sd_ptr + tl.program_id(0) + tl.zeros([1], tl.int32))
    w, b = tl.load(w_ptr + cols), tl.load(b_ptr + cols)
    inv = inverse_threshold(tl.load(theta_ptr + cols))
    edge = layer_norm_estimate_edge(w, b, inv, True, True, C)
    y = layer_norm_estimate(xc, sd, w, b, True, True)
    sigma, unsure = target_estimate_margin(y, inv, tl.load(c_ptr + offs).to(tl.int32), n_min,
                                           p_max, _LN_SLOPE, edge)  # fmt: skip
    tl.store(sigma_ptr + offs, sigma)
    tl.store(unsure_ptr + offs, unsure.to(tl.int32))


def _ln_estimate(device, xc, sd, w, b, theta, count, n_min, p_max):
    args = [t.to(device) for t in (xc, sd, w, b, theta, count)]
    sigma = torch.empty(xc.shape, dtype=torch.int32, device=device)
    unsure = torch.empty_like(sigma)
    _estimate_kernel[(xc.shape[0],)](*args, sigma, unsure, n_min, p_max, C=xc.shape[1])
    return sigma.cpu(), unsure.cpu().bool()


def _exact_sigma(xc, sd, w, b, theta, count, n_min, p_max):
    """The row function's own steps from its division on, in float32, then the §9.3 step."""
    y = (xc / sd[:, None]) * w + b  # fl32 at each operation: PyTorch rounds every one
    return reference.target_spikes(y[None], theta, n_min, p_max, count)[0][0].to(torch.int32)


def _rows_at_steps(gen, rows, C, n_min, p_max, bias, theta, ulps):
    """``(xc, sd, w, b, count)``: rows whose value ``fl(fl(xc / sd) w) + b`` sits within
    ``ulps`` ulps of ``xc`` of a rounding step ``(m - 1/2) theta`` of the target, ``n_min <
    m <= p_max``, with the count ``m - 1`` or ``m`` (the step decides whether it fires)."""
    sd = torch.exp(torch.randn(rows, generator=gen) * 2)
    w = (0.2 + torch.rand(C, generator=gen)) * torch.randn(C, generator=gen).sign()
    b = bias * torch.randn(C, generator=gen).sign()
    m = torch.randint(n_min + 1, p_max + 1, (rows, C), generator=gen)
    y = ((m - 0.5) * theta - b) / w  # the value whose y w + b is at the step
    xc = (y * sd[:, None]).float()
    off = (ulps * (2 * torch.rand(rows, C, generator=gen) - 1)).round().to(torch.int32)
    xc = (xc.view(torch.int32) + off).view(torch.float32)
    count = (m - torch.randint(0, 2, (rows, C), generator=gen)).to(torch.int8)
    return xc, sd, w, b, count


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(
    ("bias", "n_min", "p_max"),
    # no bias: the margin's slope and edge; a bias of 30 to 60 steps cancelled by y w down to
    # targets 0 and 1, where the row function's error is largest against q: its bias term
    [(0.0, -8, 7), (3.0, -1, 1)],
)
def test_estimate_on_the_row_function_is_exact_wherever_it_is_sure(gen, device, bias, n_min, p_max):
    """The LayerNorm neuron's division-free path (an estimate of the row function's value,
    then the target's estimate with the wider margin, ``kernels.exact_layernorm``), lane by
    lane (the kernel takes the division for a whole tile when any lane is unsure, which
    would hide a wrong sure lane): values a few to a few hundred ulps off a rounding step.
    Where it is sure it equals the exact step; it is unsure of few lanes of spread values,
    and of every lane of a row with a non-finite or huge weight, bias or threshold."""
    rows, C = 64, 128
    theta = 0.05 + 0.05 * torch.rand(C, generator=gen)
    ulps = torch.where(torch.rand(rows, C, generator=gen) < 0.5, 8, 400)
    xc, sd, w, b, count = _rows_at_steps(gen, rows, C, n_min, p_max, bias, theta, ulps)
    exact = _exact_sigma(xc, sd, w, b, theta, count, n_min, p_max)
    sigma, unsure = _ln_estimate(device, xc, sd, w, b, theta, count, n_min, p_max)
    wrong = (sigma != exact) & ~unsure
    assert not wrong.any(), f"{int(wrong.sum())} sure lanes differ from the exact step"
    # the case's edge: a plain fl(xc * fl(1/sd)) target is wrong on some lanes, and the
    # margin leaves some lanes sure
    plain = reference.target_spikes(
        ((xc * (1 / sd)[:, None]) * w + b)[None], theta, n_min, p_max, count
    )[0][0].to(torch.int32)
    assert (plain != exact).any(), "no lane needed the exact path: the test lost its edge"
    assert not unsure.all(), "every lane unsure: the test shows nothing"

    spread = torch.randn(rows, C, generator=gen) * sd[:, None]
    count = torch.randint(n_min, p_max + 1, (rows, C), generator=gen, dtype=torch.int8)
    _, unsure = _ln_estimate(device, spread, sd, w, b, theta, count, n_min, p_max)
    assert unsure.float().mean() < 1e-3

    for name, bad in (("w", float("nan")), ("w", 1e35), ("b", float("inf")), ("theta", 0.0)):
        args = dict(w=w, b=b, theta=theta)
        args[name] = args[name].clone()
        args[name][5] = bad
        _, unsure = _ln_estimate(
            device, spread, sd, args["w"], args["b"], args["theta"], count, n_min, p_max
        )
        assert unsure.all(), f"{name} = {bad}"


def test_exact_math_row_function_is_correctly_rounded(gen):
    x = _hard_rows(gen, 64, 384)
    want = reference.exact_layer_norm_rows(x, None, None, EPS)
    _assert_same_bits(exact_math.layer_norm_rows(x, None, None, EPS), want, "exact_math")


def _assert_same_bits(got, want, what):
    same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    assert same.all(), f"{what}: {(~same).sum().item()} of {same.numel()} values differ"


def _good_args() -> dict:
    return dict(
        d=torch.zeros(2, 3, 4, 8, dtype=torch.float64),
        c=torch.zeros(1, 4, 8, dtype=torch.float64),
        weight=torch.ones(8),
        bias=torch.zeros(8),
        eps=EPS,
        threshold=torch.tensor(1.0),
        n_min=-4,
        p_max=3,
    )


# (case, what replaces the good arguments, error type, words the message must contain)
_SPIKES = torch.zeros(2, 3, 4, 8, dtype=torch.int8)  # a branch's spikes for _good_args' d
_THETA2 = dict(branch2_threshold=torch.tensor(0.25))

_FLAGS = torch.ones(2, 3, 4, dtype=torch.int32)  # one per row of _good_args' d and step

BAD_INPUTS = [
    ("d_moved int64", dict(d_moved=_FLAGS.long()), TypeError, "d_moved must have dtype"),
    ("d_moved shape", dict(d_moved=_FLAGS[:, :, :3]), ValueError, "d_moved must have d's shape"),
    (
        "d_moved without d",
        dict(d=None, d_moved=_FLAGS, branch_spikes=_SPIKES, branch_threshold=torch.tensor(0.5)),
        ValueError,
        "d_moved needs d",
    ),
    (
        "residual_moved without residual_out",
        dict(residual_moved=_FLAGS.clone()),
        ValueError,
        "residual_moved needs residual_out",
    ),
    (
        "residual_moved strided",
        dict(
            residual_moved=torch.ones(2, 4, 3, dtype=torch.int32).transpose(1, 2),
            branch_spikes=_SPIKES,
            branch_threshold=torch.tensor(0.5),
            residual_out=True,
        ),
        ValueError,
        "residual_moved must be contiguous",
    ),
    ("row_active int64", dict(row_active=_FLAGS.long()), TypeError, "row_active must have"),
    (
        "row_active strided",
        dict(row_active=torch.zeros(2, 4, 3, dtype=torch.int32).transpose(1, 2)),
        ValueError,
        "row_active must be contiguous",
    ),
    (
        "branch_row_active shape",
        dict(branch_row_active=_FLAGS[:, :, :3]),
        ValueError,
        r"branch_row_active must have shape \(2, 3, 4\)",
    ),
    (
        "branch2_row_active without branch2",
        dict(branch2_row_active=_FLAGS),
        ValueError,
        "branch2_row_active needs branch2_spikes",
    ),
    (
        "branch_row_active 0 on a spike",
        dict(branch_spikes=torch.ones(2, 3, 4, 8, dtype=torch.int8), branch_row_active=_FLAGS - 1),
        ValueError,
        "branch_row_active is 0 where a row of branch_spikes holds a spike",
    ),
    ("T == 0", dict(d=torch.zeros(0, 3, 4, 8, dtype=torch.float64)), ValueError, "T == 0"),
    ("d float32", dict(d=torch.zeros(2, 3, 4, 8)), TypeError, "d must have dtype"),
    ("d 1-D", dict(d=torch.zeros(8, dtype=torch.float64)), ValueError, "at least 2 dims"),
    ("d too wide", dict(d=torch.zeros(1, 2, 1025, dtype=torch.float64)), ValueError, "1024"),
    ("c float32", dict(c=torch.zeros(1, 4, 8)), TypeError, "c must have dtype"),
    ("c list", dict(c=[0.0] * 8), TypeError, "c must be a torch.Tensor"),
    ("c shape", dict(c=torch.zeros(5, 8, dtype=torch.float64)), ValueError, "c must broadcast"),
    ("c larger", dict(c=torch.zeros(2, 3, 4, 8, dtype=torch.float64)), ValueError, "broadcast"),
    ("weight fp64", dict(weight=torch.ones(8, dtype=torch.float64)), TypeError, "weight must"),
    ("weight shape", dict(weight=torch.ones(7)), ValueError, r"weight must have shape \(8,\)"),
    ("bias 2-D", dict(bias=torch.zeros(1, 8)), ValueError, "bias must have 1 dims"),
    ("eps str", dict(eps="1e-6"), TypeError, "eps must be a float"),
    ("eps < 0", dict(eps=-1.0), ValueError, "eps must be finite and >= 0"),
    ("eps nan", dict(eps=float("nan")), ValueError, "eps must be finite"),
    ("theta wrong C", dict(threshold=torch.ones(4)), ValueError, r"shape \(8,\)"),
    ("theta int", dict(threshold=torch.tensor(1)), TypeError, "threshold must have dtype"),
    ("theta <= 0", dict(threshold=torch.tensor(0.0)), ValueError, "threshold must be positive"),
    ("theta inf", dict(threshold=torch.tensor(float("inf"))), ValueError, "finite"),
    ("bounds inverted", dict(n_min=3, p_max=-4), ValueError, "n_min=3 > p_max=-4"),
    ("int8 overflow", dict(n_min=0, p_max=255), ValueError, "int8 count would overflow"),
    ("n_min float", dict(n_min=-4.0), TypeError, "n_min must be an int"),
    ("count int32", dict(count=torch.zeros(3, 4, 8, dtype=torch.int32)), TypeError, "count"),
    ("count shape", dict(count=torch.zeros(4, 8, dtype=torch.int8)), ValueError, "count must"),
    (
        "pool count",
        dict(count=torch.zeros(3, 4, 8, dtype=torch.int8), pool=True),
        ValueError,
        r"count must have shape \(3, 8\)",
    ),
    (
        "pool one token",
        dict(
            d=torch.zeros(2, 3, 1, 8, dtype=torch.float64),
            c=torch.zeros(1, 8, dtype=torch.float64),
            pool=True,
        ),
        ValueError,
        "one patch token",
    ),
    (
        "pool 2-D",
        dict(
            d=torch.zeros(2, 8, dtype=torch.float64),
            c=torch.zeros(8, dtype=torch.float64),
            pool=True,
        ),
        ValueError,
        "at least 3 dims",
    ),
    ("pool int", dict(pool=1), TypeError, "pool must be a bool"),
    (
        "c elsewhere",
        dict(c=torch.zeros(1, 4, 8, dtype=torch.float64, device="meta")),
        ValueError,
        "c is on meta",
    ),
    ("bias elsewhere", dict(bias=torch.zeros(8, device="meta")), ValueError, "bias is on meta"),
    ("no stream", dict(d=None), ValueError, "d and branch_spikes are both None"),
    ("branch fp", dict(branch_spikes=torch.zeros(2, 3, 4, 8)), TypeError, "branch_spikes must"),
    (
        "branch shape",
        dict(branch_spikes=torch.zeros(2, 3, 4, 7, dtype=torch.int8)),
        ValueError,
        "branch_spikes must have the shape of d",
    ),
    (
        "branch not ternary",
        dict(branch_spikes=torch.full((2, 3, 4, 8), 2, dtype=torch.int8)),
        ValueError,
        "branch_spikes",
    ),
    (
        "branch no threshold",
        dict(branch_spikes=torch.zeros(2, 3, 4, 8, dtype=torch.int8), branch_threshold=None),
        ValueError,
        "needs branch_threshold",
    ),
    ("branch theta 2", dict(branch_threshold=torch.ones(2)), ValueError, "branch_threshold must"),
    (
        "branch count shape",
        dict(branch_count=torch.zeros(4, 8, dtype=torch.int8)),
        ValueError,
        "branch_count must",
    ),
    (
        "branch count int32",
        dict(branch_count=torch.zeros(3, 4, 8, dtype=torch.int32)),
        TypeError,
        "branch_count",
    ),
    (
        "branch-only spikes 1-D",
        dict(d=None, branch_spikes=torch.zeros(8, dtype=torch.int8)),
        ValueError,
        "branch_spikes must be .* at least 2 dims",
    ),
    (
        "threshold without branch",
        dict(branch_spikes=None),
        ValueError,
        "branch_threshold needs branch_spikes",
    ),
    (
        "count without branch",
        dict(branch_spikes=None, branch_threshold=None, branch_count=torch.zeros(3, 4, 8)),
        ValueError,
        "branch_count needs branch_spikes",
    ),
    (
        "residual_out without branch",
        dict(branch_spikes=None, branch_threshold=None, residual_out=True),
        ValueError,
        "residual_out needs branch_spikes",
    ),
    ("residual_out int", dict(residual_out=1), TypeError, "residual_out must be a bool"),
    (
        "branch2 without branch",
        dict(branch2_spikes=torch.zeros(2, 3, 4, 8, dtype=torch.int8)),
        ValueError,
        "branch2_spikes needs branch_spikes",
    ),
    (
        "branch2 fp",
        dict(branch_spikes=_SPIKES, branch2_spikes=torch.zeros(2, 3, 4, 8), **_THETA2),
        TypeError,
        "branch2_spikes must",
    ),
    (
        "branch2 shape",
        dict(
            branch_spikes=_SPIKES,
            branch2_spikes=torch.zeros(2, 3, 4, 7, dtype=torch.int8),
            **_THETA2,
        ),
        ValueError,
        "branch2_spikes must have the shape of d",
    ),
    (
        "branch2 shape, no d",
        dict(
            d=None,
            branch_spikes=_SPIKES,
            branch2_spikes=torch.zeros(2, 3, 5, 8, dtype=torch.int8),
            **_THETA2,
        ),
        ValueError,
        "branch2_spikes must have the shape of branch_spikes",
    ),
    (
        "branch2 not ternary",
        dict(
            branch_spikes=_SPIKES,
            branch2_spikes=torch.full((2, 3, 4, 8), -2, dtype=torch.int8),
            **_THETA2,
        ),
        ValueError,
        "branch2_spikes",
    ),
    (
        "branch2 no threshold",
        dict(branch_spikes=_SPIKES, branch2_spikes=_SPIKES),
        ValueError,
        "needs branch2_threshold",
    ),
    (
        "branch2 threshold without spikes",
        dict(branch_spikes=_SPIKES, **_THETA2),
        ValueError,
        "branch2_threshold needs branch2_spikes",
    ),
    (
        "branch2 count shape",
        dict(
            branch_spikes=_SPIKES,
            branch2_spikes=_SPIKES,
            branch2_count=torch.zeros(3, 4, 9, dtype=torch.int8),
            **_THETA2,
        ),
        ValueError,
        "branch2_count must",
    ),
    (
        "inplace int",
        dict(count=torch.zeros(3, 4, 8, dtype=torch.int8), inplace=1),
        TypeError,
        "inplace must be a bool",
    ),
    ("inplace without count", dict(inplace=True), ValueError, "inplace=True needs count"),
    (
        "inplace strided count",
        dict(count=torch.zeros(3, 8, 4, dtype=torch.int8).transpose(1, 2), inplace=True),
        ValueError,
        "count must be contiguous",
    ),
]


@pytest.mark.parametrize("other", ["d", "branch_count", "branch2_count", "active"])
def test_inplace_count_sharing_an_input_is_rejected(other):
    """A contiguous count inside the storage of an input the kernel reads (or writes)."""
    args = _good_args()
    buffer = torch.zeros(2 * 3 * 4 * 8, dtype=torch.float64)
    if other == "d":
        args["d"] = buffer.view(2, 3, 4, 8)
    elif other.startswith("branch"):
        args["branch_spikes"] = torch.zeros(2, 3, 4, 8, dtype=torch.int8)
        args["branch_threshold"] = torch.tensor(0.5)
        if other == "branch2_count":
            args["branch2_spikes"] = torch.zeros(2, 3, 4, 8, dtype=torch.int8)
            args["branch2_threshold"] = torch.tensor(0.25)
        args[other] = buffer.view(torch.int8)[:96].view(3, 4, 8)
    else:
        args["active"] = buffer.view(torch.int32)[:6].view(2, 3)
    count = buffer.view(torch.int8)[:96].view(3, 4, 8)  # contiguous, but inside the other
    with pytest.raises(ValueError, match="count shares memory"):
        exact_layernorm_neuron(**args, count=count, inplace=True)
    assert not buffer.any(), "a rejected call must not write"


@pytest.mark.parametrize(
    ("case", "bad", "error", "words"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_is_rejected(case, bad, error, words, device):
    args = {**_good_args(), **bad}
    if "branch_spikes" not in bad and any(k.startswith("branch_") for k in bad):
        args["branch_spikes"] = torch.zeros(2, 3, 4, 8, dtype=torch.int8)
    if "branch_spikes" in args and "branch_threshold" not in bad:
        args["branch_threshold"] = torch.tensor(0.5)
    args = {k: v for k, v in args.items() if v is not None or k == "d"}
    with pytest.raises(error, match=words):
        call_on(device, exact_layernorm_neuron, **args)


@pytest.mark.parametrize(
    "case",
    [
        "fresh",
        "state_per_channel",
        "no_affine",
        "pool",
        "branch",
        "branch_only",
        "pool_branch",
        "inplace",
        "branch_inplace",
        "pool_inplace",
        "two_branches",
        "two_branches_only",
        "pool_two_branches",
        "two_branches_moved",
    ],
)
def test_opcheck(gen, case):
    d, c = _residual(gen, 3, 2, 4, 12)
    norm = _norm(gen, 12, per_channel=case == "state_per_channel", weight=case != "no_affine")
    if case == "no_affine":
        norm["b"] = None
    pool = case in ("pool", "pool_inplace")
    inplace = case.endswith("inplace")
    count = None
    if case == "state_per_channel" or inplace:
        count = torch.randint(-2, 3, (2, 12) if pool else (2, 4, 12), generator=gen)
        count = count.to(torch.int8)
    branch = branch2 = (None, None, None)
    if "branch" in case:
        branch = _branch(gen, d.shape)
    if "two_branches" in case:
        branch2 = _branch(gen, d.shape, fresh=True)
    d = None if case.endswith("_only") else d
    residual_out = "branch" in case and not pool
    args = (d, c, norm["w"], norm["b"], EPS, norm["theta"], -8, 7, count, pool, None)
    args = (*args, *branch, *branch2, residual_out, inplace)
    if case.endswith("_moved"):  # the row flags: the stream's, the output's, the branches'
        d_moved = exact_layernorm_ops.rows_moved(d)
        hints = [(b[0] != 0).any(dim=-1).to(torch.int32) for b in (branch, branch2)]
        args = (*args, d_moved, torch.zeros_like(d_moved), torch.zeros_like(d_moved), *hints)
    torch.library.opcheck(torch.ops.spikekernels.exact_layernorm_neuron.default, args)


def test_torch_compile_fullgraph(gen):
    d, c = _residual(gen, 4, 2, 3, 24)
    norm = _norm(gen, 24)

    def layer(d, c):
        spikes, count = _run(d + 0.0, c, norm, -8, 7)
        return spikes.sum(0, dtype=torch.int32), count

    compiled = torch.compile(layer, fullgraph=True)
    got, want = compiled(d, c), layer(d, c)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.cuda
@pytest.mark.parametrize("pool", [False, True])
def test_cuda_matches_cpu_reference(gen, pool):
    """Kernel on the GPU vs the reference on the CPU, at ViT-S size (batch 4, 197 tokens)."""
    d, c = _residual(gen, 8, 4, 197, 384)
    norm = _norm(gen, 384)
    cuda = {k: None if t is None else t.cuda() for k, t in norm.items()}
    got = _run(d.cuda(), c.cuda(), cuda, -8, 7, pool=pool, validate=True)
    _assert_same(got, _reference(d, c, norm, -8, 7, pool=pool))


def _held(gen, d: torch.Tensor, p: float = 0.6) -> torch.Tensor:
    """``d`` ``[T, *rows, C]`` with random rows held at the step before: rows that did not
    move, which ``d_moved`` lets the kernel skip."""
    d = d.clone()
    hold = torch.rand(d.shape[:-1], generator=gen) < p
    for t in range(1, d.shape[0]):
        d[t][hold[t]] = d[t - 1][hold[t]]
    return d


def _sparse(branch, gen, p: float = 0.7):
    """A pending branch whose spikes are zero in a random share ``p`` of (step, row)."""
    spikes, theta, before = branch
    quiet = torch.rand(spikes.shape[:-1], generator=gen) < p
    return spikes.masked_fill(quiet[..., None], 0), theta, before


def _garbled(gen, d: torch.Tensor, d_moved: torch.Tensor) -> torch.Tensor:
    """``d`` with garbage (NaN, infinities, huge values) in the rows whose flag is 0 after
    step 0: what a reader must not read."""
    garbage = torch.tensor([float("nan"), float("inf"), -1e300, 7.0], dtype=torch.float64)
    pick = torch.randint(0, 4, d.shape, generator=gen)
    quiet = (d_moved == 0).clone()
    quiet[0] = False
    return torch.where(quiet[..., None], garbage[pick], d)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("with_d", [True, False])
@pytest.mark.parametrize("branches", [1, 2])
def test_moved_flags(gen, backend, T, with_d, branches):
    """The stream's row flags. Written (``residual_moved``): 1 at step 0 and wherever a row of
    ``D`` moved (the truth on the PyTorch paths; on Triton's, where ``d``'s flag or a branch
    spike says so), and ``D`` with them is the stream (``filled``). Read (``d_moved``, the
    truth plus spurious flags): a row whose flag is 0 is the step before's, so garbage there
    changes no bit, count or ``D``. The output's row flags (``row_active``) are the spikes'
    truth on every path, and a flag set before stays set. With two branches, each comes with
    its row flags (the truth plus spurious ones), which change no bit either and stand for
    the branch's spikes in ``residual_moved`` on Triton's path."""
    d, c = _residual(gen, T, 2, 5, 100)
    d = _held(gen, d) if with_d else None
    norm = _norm(gen, 100)
    shape = (T, 2, 5, 100)
    branch = _sparse(_branch(gen, shape), gen)
    branch2 = _sparse(_branch(gen, shape), gen) if branches == 2 else None
    count = torch.randint(-8, 8, (2, 5, 100), generator=gen, dtype=torch.int8)
    d_moved, d_in = None, d
    if with_d:
        truth = exact_layernorm_ops.rows_moved(d)
        d_moved = truth | (torch.rand(truth.shape, generator=gen) < 0.2).to(torch.int32)
        assert T == 1 or (truth == 0).any(), "the case proves little"
        d_in = _garbled(gen, d, d_moved)
    hints = {}  # the branches' row flags, with two
    if branches == 2:
        for name, pending in (("branch_row_active", branch), ("branch2_row_active", branch2)):
            fired = (pending[0] != 0).any(dim=-1).to(torch.int32)
            hints[name] = fired | (torch.rand(fired.shape, generator=gen) < 0.2).to(torch.int32)
            assert (hints[name] == 0).any(), "the case proves little"
    with force_backend(backend):
        ran = backend_for(c, ("triton", "torch")) if backend != "reference" else backend
        want = _run_branch(d, c, norm, branch, count, branch2, residual_out=True)
        moved = torch.full((T, 2, 5), -1, dtype=torch.int32)  # poisoned: every flag written
        kept = (torch.rand(T, 2, 5, generator=gen) < 0.3).to(torch.int32)
        fired = kept.clone()
        got = _run_branch(d_in, c, norm, branch, count, branch2, residual_out=True,
                          d_moved=d_moved, residual_moved=moved, row_active=fired,
                          **hints)  # fmt: skip
    _assert_same(got[:2], want[:2])
    assert torch.equal(fired, (want[0] != 0).any(dim=-1).to(torch.int32) | kept)
    _assert_same_residual(exact_layernorm_ops.filled(got[2], moved), want[2])
    truth = exact_layernorm_ops.rows_moved(want[2])
    if ran == "triton":
        expected = d_moved.clone() if with_d else torch.zeros_like(truth)
        for pending in (branch, branch2):
            if pending is not None:
                expected |= (pending[0] != 0).any(dim=-1).to(torch.int32)
        for hint in hints.values():
            expected |= hint
        expected[0] = 1
    else:
        expected = truth
    assert torch.equal(moved, expected)
    assert not ((truth != 0) & (moved == 0)).any()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_kernel_skips_branch_rows_flagged_silent(gen, device):
    """The Triton kernel reads a branch's spikes only in the rows its flags mark: with flags
    that hide spikes (the op's data check bypassed) it gives the bits, count, ``D`` and
    ``residual_moved`` of the branches with those rows zeroed."""
    T, shape = 4, (4, 2, 5, 100)
    d, c = _residual(gen, T, 2, 5, 100)
    norm = _norm(gen, 100)
    branches = [_branch(gen, shape), _branch(gen, shape)]
    flags = [(torch.rand(shape[:-1], generator=gen) < 0.5).to(torch.int32) for _ in range(2)]
    hidden = [
        (b[0] * f[..., None].to(torch.int8), *b[1:]) for b, f in zip(branches, flags, strict=True)
    ]
    assert all(not torch.equal(b[0], h[0]) for b, h in zip(branches, hidden, strict=True))
    count = torch.randint(-8, 8, (2, 5, 100), generator=gen, dtype=torch.int8)
    on = [[None if t is None else t.to(device) for t in b] for b in branches]
    # the oracle runs on the CPU, the kernel on ``device``: each its own residual_moved
    want_moved = torch.zeros(shape[:-1], dtype=torch.int32)
    got_moved = torch.zeros(shape[:-1], dtype=torch.int32, device=device)
    want = _run_branch(d, c, norm, hidden[0], count, hidden[1], residual_out=True,
                       residual_moved=want_moved)  # fmt: skip
    got = torch.ops.spikekernels.exact_layernorm_neuron(
        d.to(device), c.to(device), norm["w"].to(device), norm["b"].to(device), EPS,
        norm["theta"].to(device), -8, 7, count.to(device), False, None, *on[0], *on[1], True,
        False, None, got_moved, None, flags[0].to(device), flags[1].to(device),
    )  # fmt: skip
    _assert_same(got[:2], want[:2])
    _assert_same_residual(got[2], want[2])
    assert torch.equal(got_moved.cpu(), want_moved)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("pool", [False, True])
def test_row_active_marks_the_rows_that_fire(gen, backend, pool):
    """``row_active`` on a settled neuron: set where a row (a pooled row: a sample) fires,
    never cleared, and left 0 on the rows that do not; the spikes and count as without it."""
    d, c = _residual(gen, 5, 2, 5, 100)
    d[:, 1] = d[0, 1]  # sample 1 held: its rows settle and stay quiet
    norm = _norm(gen, 100)
    with force_backend(backend):
        warm = _run(d[:1].expand(16, -1, -1, -1).contiguous(), c, norm, -8, 7, pool=pool)
        assert not warm[0][-1].any(), "not settled"
        want = _run(d, c, norm, -8, 7, warm[1], pool=pool)
        kept = torch.zeros(want[0].shape[:-1], dtype=torch.int32)
        kept[2] = 1  # set before: stays
        fired = kept.clone()
        got = _run(d, c, norm, -8, 7, warm[1], pool=pool, row_active=fired)
    _assert_same(got, want)
    truth = (want[0] != 0).any(dim=-1).to(torch.int32)
    assert truth[:, 0].any() and not truth[:, 1].any(), "the case proves little"
    assert torch.equal(fired, truth | kept)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("pool", [False, True])
def test_rows_flagged_quiet_are_the_step_befores(gen, backend, pool):
    """With every flag 0 after step 0, ``d`` is its step 0 throughout, whatever it holds
    later: the bits of ``d`` frozen at step 0 on every path (pooled too); the pending branch
    still moves ``D``."""
    T = 5
    d, c = _residual(gen, T, 2, 5, 100)
    norm = _norm(gen, 100)
    branch = _sparse(_branch(gen, (T, 2, 5, 100)), gen)
    count = torch.randint(-8, 8, (2, 100) if pool else (2, 5, 100), generator=gen)
    count = count.to(torch.int8)
    flags = torch.zeros(T, 2, 5, dtype=torch.int32)
    flags[0] = 1
    frozen = d[:1].expand_as(d)
    kwargs = dict(pool=pool, residual_out=not pool)
    with force_backend(backend):
        want = _run_branch(frozen, c, norm, branch, count, **kwargs)
        moving = _run_branch(d, c, norm, branch, count, **kwargs)
        got = _run_branch(d, c, norm, branch, count, d_moved=flags, **kwargs)
    assert not torch.equal(moving[0], want[0]), "d's later steps change nothing: proves little"
    _assert_same(got[:2], want[:2])
    if not pool:
        _assert_same_residual(got[2], want[2])


@pytest.mark.parametrize("device", DEVICES)
def test_row_function_divides_correctly_rounded(gen, device):
    """The LayerNorm row function's mean and variance divide by C correctly rounded on every
    device, so the exact QANN's rows are the kernels' on a GPU too. PyTorch's CUDA kernel
    divides by a host number as a product with its reciprocal (two roundings): at C = 384
    that moved one of ViT-S's LayerNorm counts by one on an H200 (2026-12-04), and the exact
    QANN's logits then differed from the SNN's."""
    x = torch.randn(4096, 384, generator=gen).to(device)
    got = exact_math.divide_by_count(x, 384)
    assert torch.equal(got, (x.double() / 384).float()), "float64 then rounded: one rounding"
    rows = exact_math.layer_norm_rows(x, None, None, 1e-6)
    assert torch.equal(rows.cpu(), exact_math.layer_norm_rows(x.cpu(), None, None, 1e-6))

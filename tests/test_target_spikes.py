"""target_spikes (SPEC.md §9.3): the fused kernel against the step-by-step reference, bit for
bit, on every backend (Triton through the interpreter, vectorised PyTorch, the oracle)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICES, call_on

import spikekernels
from spikekernels import reference
from spikekernels.kernels import INTERPRET
from spikekernels.kernels.target import inverse_threshold, target_estimate
from spikekernels.nn import TargetNeuron
from spikekernels.ops._dispatch import force_backend

# (n_min, p_max): levels 8, 16, 32 signed/unsigned as the paper, and the widest int8 bounds
BOUNDS = [(-4, 3), (0, 15), (-16, 15), (-128, 127), (0, 127)]


def _values(gen, T, shape, theta, device="cpu", dtype=torch.float32, span=20.0):
    """Current values over ``[-span, span]`` thresholds: random, held constant over steps (so
    counts settle), and exactly on rounding ties ``(k + 1/2) * theta``."""
    theta = torch.as_tensor(theta, dtype=torch.float32)
    y = (torch.rand((T, *shape), generator=gen) * 2 - 1) * span * theta
    held = torch.rand(shape, generator=gen) < 0.3
    y = torch.where(held, y[:1], y)
    ties = torch.rand((T, *shape), generator=gen) < 0.15
    halves = (torch.randint(-int(span), int(span), (T, *shape), generator=gen) + 0.5) * theta
    y = torch.where(ties, halves, y)
    return y.to(device=device, dtype=dtype)


def _assert_same(got, want):
    for name, g, w in zip(("spikes", "count"), got, want, strict=True):
        g = g.cpu()
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        diff = (g != w).sum().item()
        assert diff == 0, f"{name}: {diff} of {g.numel()} elements differ"


def _reference(value, theta, n_min, p_max, count=None):
    count = None if count is None else count.cpu()
    return reference.target_spikes(value.cpu(), theta.cpu(), n_min, p_max, count)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 43), (2, 5, 129), (4097,)])
@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize(("n_min", "p_max"), BOUNDS)
def test_bit_exact_fp32(gen, device, n_min, p_max, T, shape):
    theta = torch.tensor(0.05 + torch.rand((), generator=gen).item(), device=device)
    value = _values(gen, T, shape, theta.item(), device, span=1.5 * max(p_max, -n_min) + 2)
    got = spikekernels.target_spikes(value, theta, n_min, p_max)
    _assert_same(got, _reference(value, theta, n_min, p_max))
    assert set(got[0].unique().tolist()) <= {-1, 0, 1}


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_every_backend_matches_the_reference(gen, backend):
    """Each backend pinned in turn (one that cannot run here falls back to torch)."""
    theta = torch.tensor(0.29)
    value = _values(gen, 7, (5, 67), 0.29)
    count = torch.randint(-8, 8, (5, 67), generator=gen, dtype=torch.int8)
    with force_backend(backend):
        got = spikekernels.target_spikes(value, theta, -8, 7, count)
    _assert_same(got, _reference(value, theta, -8, 7, count))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_values(gen, device, dtype):
    theta = torch.tensor(0.37, device=device)
    value = _values(gen, 5, (3, 67), 0.37, device, dtype)
    got = spikekernels.target_spikes(value, theta, -16, 15)
    _assert_same(got, _reference(value, theta, -16, 15))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("theta_dtype", [torch.float64, torch.float16])
def test_threshold_is_read_as_float32(gen, device, theta_dtype):
    theta = torch.tensor(0.1234567, dtype=theta_dtype, device=device)
    value = _values(gen, 4, (300,), 0.1234567, device)
    got = spikekernels.target_spikes(value, theta, -16, 15)
    _assert_same(got, _reference(value, theta.to(torch.float32), -16, 15))


@pytest.mark.parametrize("device", DEVICES)
def test_per_channel_thresholds(gen, device):
    """One qkv output feeds three neurons: three thresholds, each repeated over its block.
    Equal to running each block alone with its scalar threshold."""
    block = 13
    thetas = torch.tensor([0.11, 0.47, 0.029])
    theta = thetas.repeat_interleave(block).to(device)
    value = torch.cat(
        [_values(gen, 6, (2, 5, block), t.item(), device) for t in thetas], dim=-1
    ).contiguous()
    got = spikekernels.target_spikes(value, theta, -8, 7)
    _assert_same(got, _reference(value, theta, -8, 7))
    for i, t in enumerate(thetas):
        part = value[..., i * block : (i + 1) * block]
        spikes, count = spikekernels.target_spikes(part, t.to(device), -8, 7)
        assert torch.equal(spikes, got[0][..., i * block : (i + 1) * block])
        assert torch.equal(count, got[1][..., i * block : (i + 1) * block])


@pytest.mark.parametrize("device", DEVICES)
def test_ties_round_half_up(device):
    """Values exactly at ``(k + 1/2) * theta`` (exact in float32 with theta = 3/8) go up, as
    ``levels.quantize`` rounds; the clamp holds at both bounds."""
    theta = torch.tensor(0.375, device=device)
    k = torch.arange(-10, 10, dtype=torch.float32)
    y = ((k + 0.5) * 0.375).to(device)
    value = y.expand(20, -1).contiguous()
    spikes, count = spikekernels.target_spikes(value, theta, -8, 7)
    want = torch.clamp(k + 1, -8, 7).to(torch.int8)
    assert torch.equal(count.cpu(), want)
    assert torch.equal(
        count.cpu(), (reference.quantize(y.cpu(), theta.cpu(), -8, 7) / 0.375).to(torch.int8)
    )
    _assert_same((spikes, count), _reference(value, theta, -8, 7))


def _near_rounding_steps(gen, theta, n_min, p_max, ulps):
    """Values within ``ulps`` float32 steps of each rounding step ``(m - 1/2) * theta`` of
    the target, ``n_min < m <= p_max``, shuffled, with counts ``m - 1`` or ``m`` at random:
    each value decides whether its neuron fires. There the kernels' division-free estimate
    of the target must give way to the correctly rounded division
    (kernels.target.target_estimate)."""
    m = torch.arange(n_min + 1, p_max + 1)
    edge = ((m.to(torch.float64) - 0.5) * float(theta)).to(torch.float32)
    up, down, values = edge, edge, [edge]
    for _ in range(ulps):
        up = torch.nextafter(up, torch.tensor(float("inf")))
        down = torch.nextafter(down, torch.tensor(-float("inf")))
        values += [up, down]
    values, m = torch.cat(values), m.repeat(2 * ulps + 1)
    order = torch.randperm(m.numel(), generator=gen)
    count = m[order] - torch.randint(0, 2, order.shape, generator=gen)
    return values[order], count.to(torch.int8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("theta", [0.1, 0.375, 3.0e-7, 6.1e4, 1.0 / 3.0, 13.7])
@pytest.mark.parametrize(("n_min", "p_max"), [(-128, 127), (0, 15)])
def test_values_next_to_rounding_steps(gen, device, theta, n_min, p_max):
    """Every float32 within 32 steps of each rounding step of the target, with the count
    that the step decides: bit-exact against the reference (the kernels round the target
    from fl(y * fl(1/theta)) except near such a step, where only the division is exact)."""
    theta = torch.tensor(theta, dtype=torch.float32)
    value, count = _near_rounding_steps(gen, theta, n_min, p_max, 32)
    got = spikekernels.target_spikes(value[None].to(device), theta.to(device), n_min, p_max,
                                     count.to(device))  # fmt: skip
    _assert_same(got, _reference(value[None], theta, n_min, p_max, count))


@pytest.mark.parametrize("device", DEVICES)
def test_per_channel_values_next_to_rounding_steps(gen, device):
    """As above with one threshold per channel, each channel's values at its own steps."""
    theta = torch.exp(torch.randn(5, generator=gen) * 4).to(torch.float32)
    pairs = [_near_rounding_steps(gen, t, -16, 15, 16) for t in theta]
    value = torch.stack([v for v, _ in pairs], dim=-1)[None]
    count = torch.stack([c for _, c in pairs], dim=-1)
    got = spikekernels.target_spikes(value.to(device), theta.to(device), -16, 15,
                                     count.to(device))  # fmt: skip
    _assert_same(got, _reference(value, theta, -16, 15, count))


@triton.jit
def _estimate_kernel(y_ptr, theta_ptr, c_ptr, sigma_ptr, unsure_ptr, n, n_min, p_max, t_ptr,
                     NESTED: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    c = tl.load(c_ptr + offs, mask=mask, other=0).to(tl.int32)
    inv = inverse_threshold(tl.load(theta_ptr))
    if NESTED:  # the target of fl(y / t), as the attention neuron's on fl(e / total)
        inv = tl.fma(inverse_threshold(tl.load(t_ptr)), inv, 0.0)
    sigma, unsure = target_estimate(y, inv, c, n_min, p_max)
    tl.store(sigma_ptr + offs, sigma, mask=mask)
    tl.store(unsure_ptr + offs, unsure.to(tl.int32), mask=mask)


def _estimate(value, theta, count, n_min, p_max, t=None):
    """``kernels.target.target_estimate`` lane by lane: ``(sigma, unsure)``; with ``t``, of
    the target of ``fl(value / t)``."""
    sigma = torch.empty(value.shape, dtype=torch.int32, device=value.device)
    unsure = torch.empty_like(sigma)
    n = value.numel()
    _estimate_kernel[(triton.cdiv(n, 1024),)](
        value, theta, count, sigma, unsure, n, n_min, p_max, theta if t is None else t,
        NESTED=t is not None, BLOCK=1024,
    )  # fmt: skip
    return sigma, unsure.bool()


def _needs_triton(device):
    if device == "cpu" and not INTERPRET:
        pytest.skip("a Triton kernel on the CPU needs the interpreter")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("theta", [0.1, 0.375, 3.0e-7, 6.1e4, 1.0 / 3.0, 13.7])
def test_estimate_is_exact_wherever_it_is_sure(gen, device, theta):
    """The division-free estimate, lane by lane (the kernels fall back to the division for a
    whole tile when any lane is unsure, which would hide a wrong sure lane): where it is sure
    it equals the exact step, next to every rounding step; it is unsure of few lanes of
    values spread over the levels, and of every non-finite value or threshold."""
    _needs_triton(device)
    theta = torch.tensor(theta, dtype=torch.float32)
    value, count = _near_rounding_steps(gen, theta, -128, 127, 32)
    exact = reference.target_spikes(value[None], theta, -128, 127, count)[0][0].to(torch.int32)
    sigma, unsure = _estimate(value.to(device), theta.to(device), count.to(device), -128, 127)
    sigma, unsure = sigma.cpu(), unsure.cpu()
    wrong = (sigma != exact) & ~unsure
    assert not wrong.any(), f"{int(wrong.sum())} sure lanes differ from the exact step"
    assert (sigma != exact).any(), "no lane needed the division: the test lost its edge"

    spread = (torch.rand(1 << 16, generator=gen) * 40 - 20) * theta
    count = torch.randint(-20, 21, spread.shape, generator=gen, dtype=torch.int8)
    _, unsure = _estimate(spread.to(device), theta.to(device), count.to(device), -128, 127)
    assert unsure.float().mean() < 1e-3

    special = torch.tensor([float("nan"), float("inf"), -float("inf")], device=device)
    none = torch.zeros(3, dtype=torch.int8, device=device)
    _, unsure = _estimate(special, theta.to(device), none, -4, 3)
    assert unsure.all()
    for bad in (0.0, float("inf"), float("nan"), 1e-40):
        bad = torch.tensor(bad, device=device)
        _, unsure = _estimate(spread[:64].to(device), bad, count[:64].to(device), -4, 3)
        assert unsure.all(), f"threshold {bad.item()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("total", [1.0, 7.0, 36.61, 196.999])
def test_estimate_of_two_divisions_is_exact_wherever_it_is_sure(gen, device, total):
    """The estimate of the attention neuron's target on a softmax, ``floor(fl(fl(e / t) /
    theta) + 1/2)``, from ``e`` and ``fl(fl(1/t) fl(1/theta))``, lane by lane next to every
    rounding step: exact wherever it is sure."""
    _needs_triton(device)
    t = torch.tensor(total, dtype=torch.float32)
    for theta in (0.01, 0.0371, 0.13):
        theta = torch.tensor(theta, dtype=torch.float32)
        e, count = _near_rounding_steps(gen, (t * theta).float(), 0, 15, 32)
        probs = (e / t).float()
        exact = reference.target_spikes(probs[None], theta, 0, 15, count)[0][0]
        sigma, unsure = _estimate(*(x.to(device) for x in (e, theta, count)), 0, 15, t.to(device))
        differ = sigma.cpu() != exact.to(torch.int32)
        assert not (differ & ~unsure.cpu()).any(), f"theta {theta.item()}: sure lanes differ"
        assert differ.any(), "no lane needed the divisions: the test lost its edge"


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_values(gen, device):
    """NaN gives sigma = 0 (the count holds); +-inf drives the count to a bound."""
    value = _values(gen, 6, (4, 33), 0.3, device)
    special = torch.tensor([float("nan"), float("inf"), -float("inf")], device=device)
    pick = torch.randint(0, 3, value.shape, generator=gen).to(device)
    where = (torch.rand(value.shape, generator=gen) < 0.3).to(device)
    value = torch.where(where, special[pick], value)
    theta = torch.tensor(0.3, device=device)
    count = torch.randint(-4, 4, (4, 33), generator=gen, dtype=torch.int8).to(device)
    got = spikekernels.target_spikes(value, theta, -4, 3, count)
    _assert_same(got, _reference(value, theta, -4, 3, count))
    nan = value.isnan()
    assert not got[0][nan].any(), "a NaN value must not fire"
    all_nan = torch.full((3, 4, 33), float("nan"), device=device)
    spikes, held = spikekernels.target_spikes(all_nan, theta, -4, 3, count)
    assert not spikes.any() and torch.equal(held, count)


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_equals_whole(gen, device):
    theta = torch.tensor(0.2, device=device)
    value = _values(gen, 12, (5, 41), 0.2, device)
    whole = spikekernels.target_spikes(value, theta, -16, 15)
    spikes, count = [], None
    for chunk in value.split([5, 1, 6]):
        out, count = spikekernels.target_spikes(chunk, theta, -16, 15, count)
        spikes.append(out)
    _assert_same((torch.cat(spikes), count), [w.cpu() for w in whole])


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("shape", [(), (7,), (3, 43)])
@pytest.mark.parametrize("poisoned", [False, True])
def test_inplace_equals_fresh(gen, backend, shape, poisoned, request):
    """``inplace=True``: chunks fed back in place give the whole run's bits, and the count
    stays the same tensor at the same address (what a CUDA graph replays)."""
    if poisoned:
        request.getfixturevalue("poisoned_allocations")
    theta = 0.1 + 0.3 * torch.rand(shape[-1:], generator=gen) if shape else torch.tensor(0.29)
    value = _values(gen, 9, shape, 0.2)
    count0 = torch.randint(-8, 8, shape, generator=gen, dtype=torch.int8)
    # the activity flags still recorded in place (they need a batch dim)
    active = torch.zeros(9, shape[0], dtype=torch.int32) if len(shape) == 2 else None
    with force_backend(backend):
        whole = spikekernels.target_spikes(value, theta, -8, 7, count0)
        count = count0.clone()
        where = count.data_ptr()
        spikes = []
        for t0, n in ((0, 4), (4, 1), (5, 4)):
            part = None if active is None else active[t0 : t0 + n]
            out = spikekernels.target_spikes(
                value[t0 : t0 + n], theta, -8, 7, count, active=part, inplace=True
            )
            assert out[1] is count
            spikes.append(out[0])
    assert count.data_ptr() == where
    _assert_same((torch.cat(spikes), count), whole)
    _assert_same(whole, _reference(value, theta, -8, 7, count0))
    if active is not None:
        want = (whole[0] != 0).reshape(9, active.shape[1], -1).any(-1).to(torch.int32)
        assert torch.equal(active, want)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_single_step(gen, device):
    theta = torch.tensor(0.3, device=device)
    value = _values(gen, 1, (5, 3), 0.3, device)
    count = torch.zeros(5, 3, dtype=torch.int8, device=device)
    spikes, got = spikekernels.target_spikes(value, theta, -8, 7, count, inplace=True)
    assert got is count
    _assert_same((spikes, count), _reference(value, theta, -8, 7))


def test_inplace_on_meta_tensors():
    """Shapes only (meta tensors): the in-place state is not taken for an alias of the inputs
    (every meta tensor's address is 0)."""
    value = torch.empty(3, 5, 4, device="meta")
    count = torch.empty(5, 4, dtype=torch.int8, device="meta")
    theta = torch.tensor(0.3, device="meta")
    spikes, got = spikekernels.target_spikes(value, theta, -8, 7, count, inplace=True)
    assert got is count and spikes.shape == (3, 5, 4) and spikes.is_meta


@pytest.mark.parametrize("device", DEVICES)
def test_count_is_fresh_and_input_untouched(gen, device):
    theta = torch.tensor(0.5, device=device)
    value = _values(gen, 3, (10,), 0.5, device)
    count = torch.ones(10, dtype=torch.int8, device=device)
    before = count.clone()
    _, out = spikekernels.target_spikes(value, theta, -8, 7, count)
    assert out.data_ptr() != count.data_ptr()
    assert torch.equal(count, before), "the incoming count was modified"


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_value(gen, device):
    theta = torch.tensor(0.3, device=device)
    value = _values(gen, 4, (9, 6), 0.3, device).transpose(1, 2)
    _assert_same(spikekernels.target_spikes(value, theta, -8, 7), _reference(value, theta, -8, 7))


@pytest.mark.parametrize("device", DEVICES)
def test_unwritten_outputs_show(gen, device, monkeypatch):
    """Outputs are allocated poisoned: any element the op fails to write shows up."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(77 if not t.is_floating_point() else float("nan"))

    theta = torch.tensor(0.3, device=device)
    value = _values(gen, 4, (1000,), 0.3, device)
    want = _reference(value, theta, -16, 15)
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    got = spikekernels.target_spikes(value, theta, -16, 15)
    monkeypatch.undo()
    _assert_same(got, want)


@pytest.mark.parametrize(("n_min", "p_max"), BOUNDS)
def test_constant_value_settles_to_the_quantizer(gen, n_min, p_max):
    """SPEC.md §9.3: with the value held at y, from any count in bounds, within
    ``p_max - n_min`` steps the count is the quantizer's integer
    ``clamp(floor(y / theta + 1/2), n_min, p_max)``, moving one step a time toward it, and
    then the neuron is silent. Exact: no tie tolerance."""
    theta = torch.tensor(0.05 + torch.rand((), generator=gen).item())
    numel = 3000
    y = (torch.rand(numel, generator=gen) * 2 - 1) * 1.3 * max(p_max, -n_min) * theta
    y[:200] = (torch.randint(-40, 40, (200,), generator=gen) + 0.5) * theta  # near ties
    count = torch.randint(n_min, p_max + 1, (numel,), generator=gen, dtype=torch.int8)
    T = p_max - n_min + 3
    spikes, out = spikekernels.target_spikes(
        y.expand(T, -1).contiguous(), theta, n_min, p_max, count
    )
    integer = torch.clamp(torch.floor(y / theta + 0.5), n_min, p_max)
    assert torch.equal(out.to(torch.float32), integer)
    assert torch.equal(theta * out.to(torch.float32), reference.quantize(y, theta, n_min, p_max))
    distance = (integer - count.to(torch.float32)).abs()
    step = torch.arange(T).unsqueeze(1)
    moving = step < distance
    direction = torch.sign(integer - count.to(torch.float32)).to(torch.int8)
    assert torch.equal(spikes, torch.where(moving, direction, torch.zeros_like(direction)))
    more, held = spikekernels.target_spikes(y.expand(3, -1).contiguous(), theta, n_min, p_max, out)
    assert not more.any() and torch.equal(held, out), "a settled neuron must stay silent"


def _good_args() -> dict:
    return dict(value=torch.zeros(2, 3, 4), threshold=torch.tensor(1.0), n_min=-4, p_max=3)


# (case, what replaces the good arguments, error type, words the message must contain)
BAD_INPUTS = [
    ("T == 0", dict(value=torch.zeros(0, 4)), ValueError, "T == 0"),
    ("int value", dict(value=torch.zeros(2, 4, dtype=torch.int32)), TypeError, "value must"),
    ("0-d value", dict(value=torch.tensor(1.0)), ValueError, "value must be time-major"),
    ("value list", dict(value=[[1.0]]), TypeError, "value must be a torch.Tensor"),
    ("theta float", dict(threshold=1.0), TypeError, "threshold must be a torch.Tensor"),
    ("theta int", dict(threshold=torch.tensor(1)), TypeError, "threshold must have dtype"),
    ("theta <= 0", dict(threshold=torch.tensor(-1.0)), ValueError, "threshold must be positive"),
    ("theta 0", dict(threshold=torch.tensor(0.0)), ValueError, "threshold must be positive"),
    ("theta nan", dict(threshold=torch.tensor(float("nan"))), ValueError, "finite"),
    ("theta inf", dict(threshold=torch.tensor(float("inf"))), ValueError, "finite"),
    ("theta subnormal", dict(threshold=torch.tensor(1e-40)), ValueError, "normal float32"),
    (
        "theta f64 underflow",
        dict(threshold=torch.tensor(1e-50, dtype=torch.float64)),
        ValueError,
        "normal",
    ),
    (
        "per-channel one bad",
        dict(threshold=torch.tensor([1.0, 2.0, -1.0, 1.0])),
        ValueError,
        "positive",
    ),
    ("theta wrong C", dict(threshold=torch.ones(3)), ValueError, r"shape \(4,\)"),
    ("theta 2-D", dict(threshold=torch.ones(1, 4)), ValueError, "one element or shape"),
    (
        "per-channel on [T]",
        dict(value=torch.zeros(5), threshold=torch.ones(5)),
        ValueError,
        "threshold must have exactly one element",
    ),
    ("bounds inverted", dict(n_min=3, p_max=-4), ValueError, "n_min=3 > p_max=-4"),
    ("bounds exclude 0", dict(n_min=1, p_max=4), ValueError, "must contain 0"),
    ("unsigned 256", dict(n_min=0, p_max=255), ValueError, "int8 count would overflow"),
    ("signed 512", dict(n_min=-256, p_max=255), ValueError, "int8 count would overflow"),
    ("n_min float", dict(n_min=-4.0), TypeError, "n_min must be an int"),
    ("p_max bool", dict(p_max=True), TypeError, "p_max must be an int"),
    ("count float", dict(count=torch.zeros(3, 4)), TypeError, "count must have dtype"),
    ("count int16", dict(count=torch.zeros(3, 4, dtype=torch.int16)), TypeError, "count must"),
    (
        "count shape",
        dict(count=torch.zeros(4, dtype=torch.int8)),
        ValueError,
        "count must have shape",
    ),
    (
        "count above p_max",
        dict(count=torch.full((3, 4), 50, dtype=torch.int8)),
        ValueError,
        r"count must lie in \[-4, 3\], got values in \[50, 50\]",
    ),
    ("count below n_min", dict(count=torch.full((3, 4), -5).char()), ValueError, "count must lie"),
    (
        "count elsewhere",
        dict(count=torch.zeros(3, 4, dtype=torch.int8, device="meta")),
        ValueError,
        "count is on meta",
    ),
    (
        "theta elsewhere",
        dict(threshold=torch.tensor(1.0, device="meta")),
        ValueError,
        "threshold is on",
    ),
    (
        "inplace int",
        dict(count=torch.zeros(3, 4, dtype=torch.int8), inplace=1),
        TypeError,
        "inplace must be a bool",
    ),
    ("inplace without count", dict(inplace=True), ValueError, "inplace=True needs count"),
    (
        "inplace strided count",
        dict(count=torch.zeros(4, 3, dtype=torch.int8).t(), inplace=True),
        ValueError,
        "count must be contiguous",
    ),
]


@pytest.mark.parametrize("other", ["value", "active"])
def test_inplace_count_sharing_an_input_is_rejected(other):
    """A contiguous count inside the storage of an input the kernel reads (or writes)."""
    args = _good_args()
    buffer = torch.zeros(24, dtype=torch.float32)
    if other == "value":
        args["value"] = buffer.view(2, 3, 4)
    else:
        args["active"] = buffer.view(torch.int32)[:6].view(2, 3)
    count = buffer.view(torch.int8)[:12].view(3, 4)  # contiguous, but inside the other
    with pytest.raises(ValueError, match="count shares memory"):
        spikekernels.target_spikes(**args, count=count, inplace=True)
    assert not buffer.any(), "a rejected call must not write"


@pytest.mark.parametrize(
    ("case", "bad", "error", "words"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_is_rejected(case, bad, error, words, device):
    with pytest.raises(error, match=words):
        call_on(device, spikekernels.target_spikes, **{**_good_args(), **bad})


def test_validate_checks_threshold_values_on_request():
    with pytest.raises(ValueError, match="threshold must be positive"):
        spikekernels.target_spikes(torch.zeros(2, 4), torch.tensor(0.0), -4, 3, validate=True)


@pytest.mark.parametrize("case", ["fresh", "count", "per_channel", "inplace"])
def test_opcheck(gen, case):
    value = _values(gen, 3, (2, 9), 0.4)
    theta = torch.tensor(0.4) if case != "per_channel" else 0.1 + torch.rand(9, generator=gen)
    count = None
    if case in ("count", "inplace"):
        count = torch.randint(-2, 3, (2, 9), generator=gen, dtype=torch.int8)
    torch.library.opcheck(
        torch.ops.spikekernels.target_spikes.default,
        (value, theta, -8, 7, count, None, case == "inplace"),
    )


def test_torch_compile_fullgraph(gen):
    value = _values(gen, 4, (3, 17), 0.4)
    theta = torch.tensor(0.4)
    count = torch.randint(-2, 3, (3, 17), generator=gen, dtype=torch.int8)

    def layer(value, count):
        spikes, count = spikekernels.target_spikes(value * 2, theta, -8, 7, count)
        return spikes.sum(0, dtype=torch.int32), count

    compiled = torch.compile(layer, fullgraph=True)
    got, want = compiled(value, count), layer(value, count)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_compiled_state_continues_in_place(gen):
    """A neuron's count made by a compiled call feeds its next calls in place, compiled or
    not, whatever layout the compiled code gave it: on the CPU path Inductor laid a fresh
    count out as its transposed input, which the in-place call then refused."""
    value = _values(gen, 6, (5, 3), 0.4).transpose(1, 2)  # [T, 3, 5], not contiguous
    want = TargetNeuron(0.4, 16, signed=True)
    want = [want(value[:2]), want(value[2:4]), want(value[4:]), want.count]
    neuron = TargetNeuron(0.4, 16, signed=True)
    torch._dynamo.reset()
    compiled = torch.compile(neuron)
    got = [compiled(value[:2]), neuron(value[2:4]), compiled(value[4:]), neuron.count]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.cuda
def test_cuda_matches_cpu_reference(gen):
    """Kernel on the GPU vs the reference on the CPU, at a size with many programs."""
    theta = torch.tensor([0.3, 0.07, 1.1]).repeat_interleave(128)
    value = _values(gen, 16, (1024, 384), 0.3)
    got = spikekernels.target_spikes(value.cuda(), theta.cuda(), -8, 7, validate=True)
    _assert_same(got, _reference(value, theta, -8, 7))

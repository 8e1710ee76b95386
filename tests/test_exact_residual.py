"""exact_residual_add (SPEC.md §9.2, §9.4): a branch's spikes added to exact mode's residual
stream, ``d[t] + fl64(theta) * fl64(count_t)``, against the step-by-step reference and the
PyTorch formula exact mode used before, bit for bit, on every backend (Triton through the
interpreter, vectorised PyTorch, the oracle)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, call_on

from spikekernels import reference
from spikekernels.ops import exact_residual_add
from spikekernels.ops._dispatch import force_backend

BACKENDS = [None, "triton", "torch", "reference"]
N_MIN, P_MAX = -8, 7  # level 16, signed: the counts of ViT-S's proj and fc2 neurons


def _theta(gen) -> torch.Tensor:
    """A quantizer step from the range calibration gives (2^-12 to 4), float32 [1]."""
    return torch.exp2(torch.empty(1).uniform_(-12, 2, generator=gen))


def _inputs(gen, T, shape, device="cpu"):
    """``(d, spikes, count)``: ``d`` the stream as exact mode builds it (a sum of float32
    steps times small integers, exactly representable), with some arbitrary float64 values
    (whose sums round), signed zeros and non-finite values among them; ternary spikes; a
    count within level 16's bounds."""
    steps = torch.exp2(torch.empty(4).uniform_(-12, 2, generator=gen)).to(torch.float64)
    counts = torch.randint(-20, 21, (T, *shape, 4), generator=gen)
    d = (counts.to(torch.float64) * steps).sum(-1)
    arbitrary = torch.rand(d.shape, generator=gen) < 0.2
    d = torch.where(arbitrary, torch.randn(d.shape, generator=gen, dtype=torch.float64), d)
    specials = torch.tensor([-0.0, 0.0, float("inf"), float("nan")], dtype=torch.float64)
    n = min(d.numel(), len(specials))
    d.view(-1)[:n] = specials[:n]
    spikes = torch.randint(-1, 2, (T, *shape), generator=gen, dtype=torch.int8)
    count = torch.randint(N_MIN, P_MAX + 1, shape, generator=gen, dtype=torch.int8)
    return d.to(device), spikes.to(device), count.to(device)


def _formula(d, spikes, threshold, count):
    """Exact mode's residual update before this op (ExactBlock, on the CPU)."""
    counts = torch.cumsum(spikes.cpu(), dim=0, dtype=torch.int32)
    if count is not None:
        counts = counts + count.cpu().to(torch.int32)
    update = threshold.cpu().to(torch.float64).reshape(()) * counts.to(torch.float64)
    return update if d is None else d.cpu() + update


def _assert_same_bits(got, want):
    """Every float64 bit (signed zeros included; NaN as NaN)."""
    assert got.dtype == torch.float64 and got.shape == want.shape
    got = got.cpu()
    same = (got.view(torch.int64) == want.view(torch.int64)) | (got.isnan() & want.isnan())
    assert same.all(), f"{(~same).sum().item()} of {same.numel()} values differ"


SHAPES = [(1,), (3, 7, 33), (2, 5, 197), (1, 1025), (2, 17, 384)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize(("has_d", "has_count"), [(True, True), (True, False), (False, True)])
def test_bit_exact(gen, device, backend, shape, T, has_d, has_count):
    d, spikes, count = _inputs(gen, T, shape, device)
    d, count = (d if has_d else None), (count if has_count else None)
    theta = _theta(gen).to(device)
    with force_backend(backend):
        got = exact_residual_add(d, spikes, theta, count)
    _assert_same_bits(got, _formula(d, spikes, theta, count))
    cpu = (None if t is None else t.cpu() for t in (d, spikes, theta, count))
    _assert_same_bits(got, reference.exact_residual_add(*cpu))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_equals_whole(gen, device, backend):
    """Chunks of 1, 3 and 4 steps, each fed the count after the previous: the whole run."""
    d, spikes, count = _inputs(gen, 8, (3, 6, 40), device)
    theta = _theta(gen).to(device)
    with force_backend(backend):
        whole = exact_residual_add(d, spikes, theta, count)
        parts, t0 = [], 0
        for n in (1, 3, 4):
            parts.append(exact_residual_add(d[t0 : t0 + n], spikes[t0 : t0 + n], theta, count))
            count = count + spikes[t0 : t0 + n].sum(0, dtype=torch.int8)
            t0 += n
    _assert_same_bits(torch.cat(parts), whole.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_without_d_is_the_product(gen, device):
    """``d=None``: ``fl64(theta) * count`` itself, +0.0 where the count is 0 (the patch
    embedding's class-token row rides on it)."""
    _, spikes, count = _inputs(gen, 4, (2, 9, 24), device)
    spikes[:, :, 0] = 0
    count[:, 0] = 0
    theta = _theta(gen).to(device)
    got = exact_residual_add(None, spikes, theta, count).cpu()
    counts = count.cpu().to(torch.int64) + spikes.cpu().cumsum(0)
    assert torch.equal(got, theta.cpu().double() * counts.double())
    zero_row = got[:, :, 0]
    assert not zero_row.any() and not torch.signbit(zero_row).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("theta_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_threshold_dtypes(gen, device, theta_dtype):
    """The threshold is converted to float64 exactly, whatever its float dtype."""
    d, spikes, count = _inputs(gen, 3, (4, 10), device)
    theta = _theta(gen).to(device=device, dtype=theta_dtype)
    got = exact_residual_add(d, spikes, theta.reshape(()), count)
    _assert_same_bits(got, _formula(d, spikes, theta, count))


@pytest.mark.parametrize("device", DEVICES)
def test_output_is_fresh_and_inputs_untouched(gen, device):
    d, spikes, count = _inputs(gen, 3, (2, 4, 16), device)
    before = (d.clone(), spikes.clone(), count.clone())
    out = exact_residual_add(d, spikes, torch.tensor([0.25], device=device), count)
    assert out.data_ptr() not in (d.data_ptr(), spikes.data_ptr(), count.data_ptr())
    assert torch.equal(d.view(torch.int64), before[0].view(torch.int64)), "d was modified"
    assert torch.equal(spikes, before[1]) and torch.equal(count, before[2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("has_d", [True, False])
def test_every_output_element_is_written(gen, device, backend, has_d, poisoned_allocations):
    d, spikes, count = _inputs(gen, 3, (5, 3, 100), device)
    d = d if has_d else None
    theta = _theta(gen).to(device)
    with force_backend(backend):
        got = exact_residual_add(d, spikes, theta, count)
    _assert_same_bits(got, _formula(d, spikes, theta, count))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_step(device):
    spikes = torch.zeros(2, 0, 8, dtype=torch.int8, device=device)
    d = torch.zeros(2, 0, 8, dtype=torch.float64, device=device)
    assert exact_residual_add(d, spikes, torch.tensor(1.0, device=device)).shape == (2, 0, 8)


def _good_args() -> dict:
    return dict(
        d=torch.zeros(2, 3, 8, dtype=torch.float64),
        branch_spikes=torch.zeros(2, 3, 8, dtype=torch.int8),
        branch_threshold=torch.tensor([0.5]),
        branch_count=torch.zeros(3, 8, dtype=torch.int8),
    )


# (case, what replaces the good arguments, error type, words the message must contain)
BAD_INPUTS = [
    ("spikes list", dict(branch_spikes=[0, 1]), TypeError, "branch_spikes must be a torch.Tensor"),
    (
        "spikes int16",
        dict(branch_spikes=torch.zeros(2, 3, 8, dtype=torch.int16)),
        TypeError,
        "branch_spikes",
    ),
    ("spikes 0-d", dict(branch_spikes=torch.tensor(0, dtype=torch.int8)), ValueError, "0-d"),
    (
        "T == 0",
        dict(d=None, branch_spikes=torch.zeros(0, 3, 8, dtype=torch.int8)),
        ValueError,
        "T == 0",
    ),
    (
        "spikes not ternary",
        dict(branch_spikes=torch.full((2, 3, 8), 2, dtype=torch.int8)),
        ValueError,
        "branch_spikes must hold ternary",
    ),
    ("d float32", dict(d=torch.zeros(2, 3, 8)), TypeError, "d must have dtype"),
    ("d shape", dict(d=torch.zeros(3, 3, 8, dtype=torch.float64)), ValueError, "d must have"),
    (
        "d elsewhere",
        dict(d=torch.zeros(2, 3, 8, dtype=torch.float64, device="meta")),
        ValueError,
        "d is on meta",
    ),
    (
        "theta two",
        dict(branch_threshold=torch.ones(2)),
        ValueError,
        "branch_threshold must have exactly one",
    ),
    (
        "theta int",
        dict(branch_threshold=torch.tensor(1)),
        TypeError,
        "branch_threshold must have dtype",
    ),
    (
        "theta float",
        dict(branch_threshold=0.5),
        TypeError,
        "branch_threshold must be a torch.Tensor",
    ),
    (
        "theta elsewhere",
        dict(branch_threshold=torch.ones(1, device="meta")),
        ValueError,
        "branch_threshold",
    ),
    (
        "theta nan",
        dict(branch_threshold=torch.tensor(float("nan"))),
        ValueError,
        "branch_threshold must be posi",
    ),
    (
        "theta < 0",
        dict(branch_threshold=torch.tensor(-2.0)),
        ValueError,
        "branch_threshold must be positive",
    ),
    ("theta subnormal", dict(branch_threshold=torch.tensor(1e-40)), ValueError, "normal float32"),
    (
        "count int32",
        dict(branch_count=torch.zeros(3, 8, dtype=torch.int32)),
        TypeError,
        "branch_count",
    ),
    (
        "count shape",
        dict(branch_count=torch.zeros(2, 3, 8, dtype=torch.int8)),
        ValueError,
        "branch_count must",
    ),
]


@pytest.mark.parametrize(
    ("case", "bad", "error", "words"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_is_rejected(case, bad, error, words, device):
    args = {**_good_args(), **bad}
    with pytest.raises(error, match=words):
        call_on(device, exact_residual_add, **args)


@pytest.mark.parametrize("case", ["fresh", "count", "no_d"])
def test_opcheck(gen, case):
    d, spikes, count = _inputs(gen, 3, (2, 4, 12))
    args = (
        None if case == "no_d" else d.nan_to_num(),
        spikes,
        _theta(gen),
        None if case == "fresh" else count,
    )
    torch.library.opcheck(torch.ops.spikekernels.exact_residual_add.default, args)


def test_torch_compile_fullgraph(gen):
    d, spikes, count = _inputs(gen, 4, (2, 3, 24))
    theta = _theta(gen)

    def branch(d, spikes, count):
        return exact_residual_add(d, -spikes, theta, count)

    got = torch.compile(branch, fullgraph=True)(d, spikes, count)
    _assert_same_bits(got, branch(d, spikes, count))


@pytest.mark.cuda
@pytest.mark.parametrize("has_d", [True, False])
def test_cuda_matches_cpu_reference(gen, has_d):
    """Kernel on the GPU vs the reference on the CPU, at ViT-S size (batch 4, 197 tokens)."""
    d, spikes, count = _inputs(gen, 8, (4, 197, 384))
    d = d if has_d else None
    theta = _theta(gen)
    got = exact_residual_add(
        None if d is None else d.cuda(), spikes.cuda(), theta.cuda(), count.cuda(), validate=True
    )
    _assert_same_bits(got, reference.exact_residual_add(d, spikes, theta, count))

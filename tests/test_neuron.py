"""st_bif (SPEC.md §2): the fused kernel against the step-by-step reference, bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, assert_same_bits, call_on

import spikekernels
from spikekernels import reference
from spikekernels._extension import HAS_EXTENSION
from spikekernels.nn import STBIF
from spikekernels.ops._dispatch import force_backend

LEVELS = [8, 16, 32]


def _inputs(gen, T, shape, theta, device="cpu", dtype=torch.float32):
    """Increments of a few thresholds, with silent entries and exact half-threshold ties."""
    x = torch.randn((T, *shape), generator=gen) * 2.5 * theta
    silent = torch.rand((T, *shape), generator=gen) < 0.2
    x = x.masked_fill(silent, 0.0)
    ties = torch.rand((T, *shape), generator=gen) < 0.1
    halves = torch.randint(-6, 7, (T, *shape), generator=gen) * (theta / 2)
    x = torch.where(ties, halves, x)
    return x.to(device=device, dtype=dtype)


def _assert_same(got, want):
    for name, g, w in zip(("spikes", "v", "count"), got, want, strict=True):
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert_same_bits(g, w, name)  # float state too: -0.0 is not +0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("numel", [1, 7, 129, 4097])
@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("level", LEVELS)
def test_bit_exact_fp32(gen, device, level, signed, T, numel):
    n_min, p_max = reference.level_bounds(level, signed)
    theta = torch.tensor(0.1 + torch.rand((), generator=gen).item(), device=device)
    x = _inputs(gen, T, (numel,), theta.item(), device)
    got = spikekernels.st_bif(x, theta, n_min, p_max)
    want = reference.st_bif(x.cpu(), theta.cpu(), n_min, p_max)
    _assert_same([t.cpu() for t in got], want)
    assert set(got[0].unique().tolist()) <= {-1, 0, 1}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("float_out", [False, True])
def test_low_precision_inputs_and_float_out(gen, device, dtype, float_out):
    n_min, p_max = reference.level_bounds(16, True)
    theta = torch.tensor(0.37, device=device)
    x = _inputs(gen, 5, (3, 67), 0.37, device, dtype)
    got = spikekernels.st_bif(x, theta, n_min, p_max, float_out=float_out)
    want = reference.st_bif(x.cpu(), theta.cpu(), n_min, p_max, float_out=float_out)
    _assert_same([t.cpu() for t in got], want)
    assert got[0].dtype == (dtype if float_out else torch.int8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float_out_rounds_ties_to_even(device, dtype):
    """``float_out`` rounds ``sigma * theta`` (float32) once to the input's dtype, ties to
    even: thresholds halfway between two neighbours whose lower one is even (1 + half an
    ulp: down) and odd (1 + 3 half ulps: up), spikes of both signs."""
    half_ulp = torch.finfo(dtype).eps / 2  # at 1.0
    for ties, want in ((1, 1.0), (3, 1 + 4 * half_ulp)):
        theta = torch.tensor(1 + ties * half_ulp, dtype=torch.float32, device=device)
        assert theta.to(dtype).item() == want  # the premise: a tie, rounded to even
        x = torch.tensor([[2.0, -2.0, 0.0]], dtype=dtype, device=device)
        got = spikekernels.st_bif(x, theta, -8, 7, float_out=True)[0]
        assert got.dtype == dtype and got.cpu().float().tolist() == [[want, -want, 0.0]]


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_equals_whole(gen, device):
    n_min, p_max = reference.level_bounds(32, True)
    theta = torch.tensor(0.2, device=device)
    x = _inputs(gen, 12, (5, 41), 0.2, device)
    whole = spikekernels.st_bif(x, theta, n_min, p_max)
    spikes, v, s = [], None, None
    for chunk in x.split([5, 1, 6]):
        out, v, s = spikekernels.st_bif(chunk, theta, n_min, p_max, v, s)
        spikes.append(out)
    _assert_same((torch.cat(spikes), v, s), whole)


@pytest.mark.parametrize("device", DEVICES)
def test_state_is_not_aliased(gen, device):
    theta = torch.tensor(0.5, device=device)
    x = _inputs(gen, 3, (10,), 0.5, device)
    v0 = torch.full((10,), 0.25, device=device)
    s0 = torch.ones(10, dtype=torch.int16, device=device)
    v_copy, s_copy = v0.clone(), s0.clone()
    _, v1, s1 = spikekernels.st_bif(x, theta, -8, 7, v0, s0)
    assert v1.data_ptr() != v0.data_ptr() and s1.data_ptr() != s0.data_ptr()
    assert torch.equal(v0, v_copy) and torch.equal(s0, s_copy), "incoming state was modified"
    assert s1.dtype == torch.int16, "the count keeps the dtype it came in with"


@pytest.mark.parametrize("backend", ["triton", "cpp", "torch", "reference"])
@pytest.mark.parametrize("count_dtype", [torch.int8, torch.int32])
@pytest.mark.parametrize("float_out", [False, True])
@pytest.mark.parametrize("poisoned", [False, True])
def test_inplace_equals_fresh(gen, backend, count_dtype, float_out, poisoned, request):
    """``inplace=True``: chunks fed back in place, from a nonzero state, give the whole run's
    bits; ``v`` and ``count`` stay the same tensors at the same addresses (what a CUDA graph
    replays), the count in the dtype it came in, and the activity flags are still recorded
    (``float_out`` with flags: the spikes scaled after the flags are read, off the kernel)."""
    if poisoned:
        request.getfixturevalue("poisoned_allocations")
    n_min, p_max = reference.level_bounds(16, True)
    theta = torch.tensor(0.3)
    x = _inputs(gen, 9, (3, 67), 0.3)
    v0 = torch.rand(3, 67, generator=gen) * 1.5 - 0.25
    count0 = torch.randint(n_min, p_max + 1, (3, 67), generator=gen).to(count_dtype)
    active = torch.zeros(9, 3, dtype=torch.int32)
    with force_backend(backend):
        whole = spikekernels.st_bif(x, theta, n_min, p_max, v0, count0, float_out=float_out)
        v, count = v0.clone(), count0.clone()
        where = v.data_ptr(), count.data_ptr()
        spikes = []
        for t0, n in ((0, 4), (4, 1), (5, 4)):
            out = spikekernels.st_bif(
                x[t0 : t0 + n], theta, n_min, p_max, v, count,
                float_out=float_out, active=active[t0 : t0 + n], inplace=True,
            )  # fmt: skip
            assert out[1] is v and out[2] is count
            spikes.append(out[0])
    assert (v.data_ptr(), count.data_ptr()) == where
    _assert_same((torch.cat(spikes), v, count), whole)
    _assert_same(whole, reference.st_bif(x, theta, n_min, p_max, v0, count0, float_out))
    assert count.dtype == count_dtype
    fired = (whole[0] != 0).any(-1).to(torch.int32)
    assert fired.any() and torch.equal(active, fired)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_single_step(gen, device):
    theta = torch.tensor(0.3, device=device)
    x = _inputs(gen, 1, (5, 3), 0.3, device)
    v = torch.full((5, 3), 0.5, device=device)
    count = torch.zeros(5, 3, dtype=torch.int8, device=device)
    spikes, got_v, got_count = spikekernels.st_bif(x, theta, -8, 7, v, count, inplace=True)
    assert got_v is v and got_count is count
    _assert_same(
        [t.cpu() for t in (spikes, v, count)], reference.st_bif(x.cpu(), theta.cpu(), -8, 7)
    )


def test_inplace_on_meta_tensors():
    """Shapes only (meta tensors): the in-place state is not taken for an alias of the inputs
    (every meta tensor's address is 0)."""
    x = torch.empty(3, 5, 4, device="meta")
    v = torch.empty(5, 4, device="meta")
    count = torch.empty(5, 4, dtype=torch.int16, device="meta")
    theta = torch.tensor(0.3, device="meta")
    spikes, got_v, got_count = spikekernels.st_bif(x, theta, -8, 7, v, count, inplace=True)
    assert got_v is v and got_count is count
    assert spikes.shape == (3, 5, 4) and spikes.is_meta and spikes.dtype == torch.int8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("float_out", [False, True])
def test_unwritten_outputs_show(gen, device, float_out, poisoned_allocations):
    """Outputs are allocated poisoned on every path (the C++ kernel's at::empty included):
    any element the kernel fails to write shows up."""
    theta = torch.tensor(0.3, device=device)
    x = _inputs(gen, 4, (1000,), 0.3, device)
    got = spikekernels.st_bif(x, theta, -16, 15, float_out=float_out)
    want = reference.st_bif(x.cpu(), theta.cpu(), -16, 15, float_out=float_out)
    _assert_same([t.cpu() for t in got], want)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("level", LEVELS)
def test_settles_to_the_quantizer(gen, level, signed):
    """SPEC.md §2: once the running input stops at U, within p_max - n_min more steps
    theta * s == quantize(U). theta is a power of two so U / theta is exact."""
    n_min, p_max = reference.level_bounds(level, signed)
    theta = torch.tensor(0.25)
    steps_in, numel = 4, 3000
    x = torch.zeros(steps_in + p_max - n_min, numel)
    x[:steps_in] = torch.randint(-24, 25, (steps_in, numel), generator=gen) * (theta / 8)
    spikes, v, s = spikekernels.st_bif(x, theta, n_min, p_max)
    U = x.sum(0)
    assert torch.equal(theta * s.float(), reference.quantize(U, theta, n_min, p_max))
    assert torch.equal(spikes.sum(0, dtype=torch.int32), s.to(torch.int32))
    more, _, s_more = spikekernels.st_bif(torch.zeros(3, numel), theta, n_min, p_max, v, s)
    assert not more.any(), "a settled neuron with zero input must stay silent"
    assert torch.equal(s_more, s)


def test_settles_with_random_threshold(gen):
    """A random threshold settles too, except within float error of a rounding tie."""
    n_min, p_max = reference.level_bounds(16, True)
    theta = torch.tensor(0.1 + torch.rand((), generator=gen).item())
    U = torch.randn(5000, generator=gen) * 4 * theta
    x = torch.zeros(1 + p_max - n_min, 5000)
    x[0] = U
    _, _, s = spikekernels.st_bif(x, theta, n_min, p_max)
    expected = torch.clamp(torch.floor(U / theta + 0.5), n_min, p_max)
    near_tie = ((U / theta + 0.5) - torch.round(U / theta + 0.5)).abs() < 1e-5
    mismatch = (s.float() != expected) & ~near_tie
    assert not mismatch.any(), f"{mismatch.sum().item()} counts did not settle"


def test_fresh_count_dtype_fits_the_bounds():
    x = torch.ones(1, 4)
    theta = torch.tensor(1.0)
    assert spikekernels.st_bif(x, theta, -16, 15)[2].dtype == torch.int8
    assert spikekernels.st_bif(x, theta, 0, 255)[2].dtype == torch.int16
    assert spikekernels.st_bif(x, theta, -70000, 70000)[2].dtype == torch.int32


def _good_args() -> dict:
    return dict(x=torch.zeros(2, 4), threshold=torch.tensor(1.0), n_min=-4, p_max=3)


def _state(v=None, count=None) -> dict:
    return dict(
        v=torch.zeros(4) if v is None else v,
        count=torch.zeros(4, dtype=torch.int8) if count is None else count,
    )


# (case, what replaces the good arguments, error type, words the message must contain)
BAD_INPUTS = [
    ("T == 0", dict(x=torch.zeros(0, 4)), ValueError, "T == 0"),
    ("int x", dict(x=torch.zeros(2, 4, dtype=torch.int32)), TypeError, "x must have dtype"),
    ("0-d x", dict(x=torch.tensor(1.0)), ValueError, "x must be time-major"),
    ("theta <= 0", dict(threshold=torch.tensor(-1.0)), ValueError, "threshold must be positive"),
    ("theta 2 elements", dict(threshold=torch.ones(2)), ValueError, "threshold must have exactly"),
    ("theta float", dict(threshold=1.0), TypeError, "threshold must be a torch.Tensor"),
    ("theta int", dict(threshold=torch.tensor(1)), TypeError, "threshold must have dtype"),
    ("bounds inverted", dict(n_min=3, p_max=-4), ValueError, "n_min=3 > p_max=-4"),
    ("bounds exclude 0", dict(n_min=1, p_max=4), ValueError, "must contain 0"),
    ("v wrong shape", _state(v=torch.zeros(5)), ValueError, "v must have shape"),
    ("v fp16", _state(v=torch.zeros(4, dtype=torch.float16)), TypeError, "v must have dtype"),
    ("count float", _state(count=torch.zeros(4)), TypeError, "count must have dtype"),
    ("count too narrow", dict(p_max=255, n_min=0, **_state()), ValueError, "cannot hold"),
    ("bounds past int32", dict(n_min=0, p_max=2**31), ValueError, "int32 count would overflow"),
    ("v without count", dict(v=torch.zeros(4)), ValueError, "both v and count"),
    ("inplace int", dict(**_state(), inplace=1), TypeError, "inplace must be a bool"),
    ("inplace without state", dict(inplace=True), ValueError, "inplace=True needs v"),
    (
        "inplace strided v",
        dict(**_state(v=torch.zeros(8)[::2]), inplace=True),
        ValueError,
        "v must be contiguous",
    ),
    (
        "inplace strided count",
        dict(**_state(count=torch.zeros(8, dtype=torch.int8)[::2]), inplace=True),
        ValueError,
        "count must be contiguous",
    ),
    ("v elsewhere", _state(v=torch.zeros(4, device="meta")), ValueError, "v is on meta"),
    ("validate a str", dict(validate="no"), TypeError, "validate must be a bool"),
    ("validate a tensor", dict(validate=torch.ones(2, dtype=torch.bool)), TypeError, "validate"),
    (
        "theta elsewhere",
        dict(threshold=torch.tensor(1.0, device="meta")),
        ValueError,
        "threshold is on",
    ),
]


@pytest.mark.parametrize(
    ("case", "bad", "error", "words"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_is_rejected(case, bad, error, words, device):
    with pytest.raises(error, match=words):
        call_on(device, spikekernels.st_bif, **{**_good_args(), **bad})


@pytest.mark.parametrize(
    ("state", "other"),
    [("v", "x"), ("count", "x"), ("v", "active"), ("count", "active"), ("v", "count")],
)
def test_inplace_state_sharing_an_input_is_rejected(state, other):
    """A contiguous state inside the storage of an input the kernel reads (or writes), or of
    the other state: refused, and nothing written."""
    buffer = torch.zeros(24, dtype=torch.float32)
    args = dict(x=torch.zeros(2, 3, 4), threshold=torch.tensor(0.5), n_min=-4, p_max=3)
    args |= dict(v=torch.zeros(3, 4), count=torch.zeros(3, 4, dtype=torch.int8))
    args["active"] = torch.zeros(2, 3, dtype=torch.int32)
    inside = {
        "x": buffer.view(2, 3, 4),
        "active": buffer.view(torch.int32)[:6].view(2, 3),
        "v": buffer[:12].view(3, 4),
        "count": buffer.view(torch.int8)[:12].view(3, 4),
    }
    args[other], args[state] = inside[other], inside[state]  # contiguous, but overlapping
    with pytest.raises(ValueError, match=f"{state} shares memory"):
        spikekernels.st_bif(**args, inplace=True)
    assert not buffer.any(), "a rejected call must not write"
    assert not any(t.any() for t in (args["v"], args["count"], args["active"]))


def test_validate_checks_threshold_sign_on_request():
    with pytest.raises(ValueError, match="threshold must be positive"):
        spikekernels.st_bif(torch.zeros(2, 4), torch.tensor(0.0), -4, 3, validate=True)


@pytest.mark.parametrize("case", ["fresh", "state", "inplace"])
def test_opcheck(gen, case):
    x = _inputs(gen, 3, (2, 9), 0.4)
    theta = torch.tensor(0.4)
    state = (torch.rand(2, 9, generator=gen), torch.randint(-2, 3, (2, 9), dtype=torch.int8))
    args = (x, theta, -8, 7, *(state if case != "fresh" else (None, None)), False)
    if case == "inplace":  # with float_out and flags: the spikes scaled after the flags
        args = (*args[:-1], True, torch.zeros(3, 2, dtype=torch.int32), True)
    torch.library.opcheck(torch.ops.spikekernels.st_bif.default, args)


def test_torch_compile_fullgraph(gen):
    """The neuron is bit-exact on every path, compiled included: its outputs are compared
    bit for bit; the float code around it as values (Inductor may reorder it)."""
    x = _inputs(gen, 4, (3, 17), 0.4)
    theta = torch.tensor(0.4)

    def step(x):
        spikes, v, s = spikekernels.st_bif(x * 2, theta, -8, 7)
        return spikes, v, s, spikes.float().sum(0) + v

    got, want = torch.compile(step, fullgraph=True)(x), step(x)
    for name, g, w in zip(("spikes", "v", "count"), got[:3], want[:3], strict=True):
        assert_same_bits(g, w, name)
    torch.testing.assert_close(got[3], want[3])


class TestSTBIFModule:
    def test_chunked_calls_equal_one_call(self, gen):
        x = _inputs(gen, 9, (2, 5, 7), 0.3)
        whole = STBIF(0.3, level=16, signed=True)
        chunked = STBIF(0.3, level=16, signed=True)
        out = whole(x)
        parts = torch.cat([chunked(c) for c in x.split([4, 5])])
        assert torch.equal(out, parts)
        assert torch.equal(whole.count, chunked.count) and torch.equal(whole.v, chunked.v)

    def test_float_out_module(self, gen):
        x = _inputs(gen, 3, (2, 4), 0.3)
        neuron = STBIF(torch.tensor(0.3), level=8, signed=False, float_out=True)
        want, _, _ = reference.st_bif(x, torch.tensor(0.3), 0, 7, float_out=True)
        assert torch.equal(neuron(x), want)

    def test_silence_flags_and_reset(self, gen):
        neuron = STBIF(0.5, level=8, signed=True)
        assert bool(neuron.silent()) and neuron.active_samples() is None
        x = torch.zeros(2, 3, 4)
        x[0, 1] = 1.0  # only sample 1 gets input: it fires at t = 0 and t = 1
        neuron(x)
        assert not bool(neuron.silent())
        assert neuron.active_samples().tolist() == [False, True, False]
        neuron(torch.zeros(1, 3, 4))
        assert bool(neuron.silent()), "sample 1 has settled at count 2 and gets no input"
        assert neuron.count[1].tolist() == [2, 2, 2, 2]
        neuron.reset()
        assert neuron.count is None and bool(neuron.silent())

    @pytest.mark.parametrize("watched", [False, True])
    def test_silence_from_the_watched_flags(self, gen, watched):
        """Watched (the runner's neurons), ``silent()`` and ``active_samples()`` read the last
        step of the flags the op recorded and no copy of the spikes is kept; unwatched, the
        copy. The same answers either way, call after call, whatever the chunking."""
        x = torch.zeros(6, 3, 4)
        x[:2, 1] = 1.0  # sample 1 fires for a few steps, then settles
        x[4, 2] = 0.6  # sample 2 gets input at step 4 only; sample 0 never
        neuron = STBIF(0.5, level=8, signed=True)
        answers = []
        for chunk in x.split([2, 3, 1]):
            flags = torch.zeros(chunk.shape[:2], dtype=torch.int32)
            neuron.watch(flags if watched else None)
            spikes = neuron(chunk)
            assert (neuron.last_spikes is None) == watched  # no copy while watched
            fired = (spikes[-1] != 0).flatten(1).any(dim=1)
            assert torch.equal(neuron.active_samples(), fired)
            assert bool(neuron.silent()) == (not bool(fired.any()))
            answers.append(fired.tolist())
        assert any(map(any, answers)) and not all(map(any, answers)), "the case proves little"
        neuron.reset()
        assert bool(neuron.silent()) and neuron.active_samples() is None

    def test_threshold_moves_with_the_module(self, gen):
        """The threshold is a buffer (in the state_dict, moved with the module), but a module
        cast such as ``.to(float64)`` keeps it float32 (``nn.neuron.FixedDtypeBuffers``): the
        neuron runs on it with the reference's bits for a float32 input."""
        neuron = STBIF(0.5, level=8, signed=True).to(torch.float64)
        assert "threshold" in dict(neuron.named_buffers())
        assert neuron.threshold.dtype == torch.float32 and neuron.threshold.item() == 0.5
        assert neuron.n_min == -4 and neuron.p_max == 3
        x = _inputs(gen, 5, (2, 7), 0.5)
        spikes = neuron(x)
        want = reference.st_bif(x, torch.tensor(0.5), -4, 3)
        _assert_same((spikes, neuron.v, neuron.count), want)


@pytest.mark.cuda
def test_cuda_matches_cpu_reference(gen):
    """Kernel on the GPU vs the reference on the CPU, at a size with many programs."""
    n_min, p_max = reference.level_bounds(16, True)
    theta = torch.tensor(0.3)
    x = _inputs(gen, 16, (1 << 20,), 0.3)
    got = spikekernels.st_bif(x.cuda(), theta.cuda(), n_min, p_max)
    _assert_same([t.cpu() for t in got], reference.st_bif(x, theta, n_min, p_max))


@pytest.mark.skipif(not HAS_EXTENSION, reason="spikekernels._C is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("float_out", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_cpp_cpu_kernel_bit_exact(gen, dtype, float_out, with_state):
    """The C++ kernel is the CPU path when the interpreter is off: test it directly, since
    this suite runs the Triton kernel instead on a machine without a GPU."""
    n_min, p_max = reference.level_bounds(32, True)
    theta = torch.tensor(0.23)
    x = _inputs(gen, 7, (3, 1500), 0.23, dtype=dtype)
    v = torch.rand(3, 1500, generator=gen) if with_state else None
    s = torch.randint(-5, 6, (3, 1500), generator=gen, dtype=torch.int16) if with_state else None
    got = torch.ops.spikekernels.st_bif_cpu(x, theta, n_min, p_max, v, s, float_out)
    _assert_same(got, reference.st_bif(x, theta, n_min, p_max, v, s, float_out))


@pytest.mark.parametrize(
    ("n_min", "p_max", "error", "words"),
    [
        (-8.0, 7, TypeError, "n_min must be an int, got float"),
        (-8, 7.5, TypeError, "p_max must be an int, got float"),
        (False, 7, TypeError, "n_min must be an int, got bool"),
        (-8, 2**70, ValueError, "p_max must be in"),
    ],
)
def test_bound_types_named_before_dispatch(n_min, p_max, error, words):
    """Used to reach the dispatcher: "Expected a value of type 'int' for argument 'p_max'
    but instead found type 'int'"."""
    with pytest.raises(error, match=words):
        spikekernels.st_bif(torch.zeros(2, 4), torch.tensor(0.5), n_min, p_max)


@pytest.mark.parametrize("validate", [False, True])
@pytest.mark.parametrize("count", [100, -9])
def test_state_outside_the_bounds_is_rejected(validate, count):
    """``count = 100`` with ``p_max = 7`` used to be accepted and returned out of bounds."""
    v = torch.full((4,), 0.5)
    s = torch.zeros(4, dtype=torch.int8)
    s[2] = count
    with pytest.raises(ValueError, match=r"count must lie in \[-8, 7\]"):
        spikekernels.st_bif(torch.zeros(2, 4), torch.tensor(0.5), -8, 7, v, s, validate=validate)


@pytest.mark.parametrize("validate", [False, True])
@pytest.mark.parametrize("theta", [1e-45, 0.0, float("nan"), float("inf")])
def test_degenerate_threshold_is_rejected(validate, theta):
    """A denormal threshold (1e-45) gave NaN membranes; NaN, inf and 0 are no thresholds."""
    with pytest.raises(ValueError, match="threshold must be positive, finite"):
        spikekernels.st_bif(torch.ones(2, 4), torch.tensor(theta), -8, 7, validate=validate)


@pytest.mark.parametrize(
    ("args", "error", "words"),
    [
        ((0.5, 16.5, True), TypeError, "level must be an int"),
        ((0.5, 16, 1), TypeError, "signed must be a bool"),
        ((torch.tensor([0.5, 0.5]), 16, True), ValueError, r"threshold must be one value.*\(2,\)"),
        (("0.5", 16, True), TypeError, "threshold must be a float"),
        ((-0.5, 16, True), ValueError, "threshold must be positive"),
    ],
)
def test_module_rejects_bad_construction(args, error, words):
    with pytest.raises(error, match=words):
        STBIF(*args)

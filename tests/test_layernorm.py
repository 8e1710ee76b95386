"""spike_layernorm (SPEC.md §4): error against a float64 evaluation within 2x of the float32
per-step reference's, the running sum bit-exact, chunked time equal to a whole run."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DEVICES,
    assert_each_same_bits,
    assert_same_bits,
    call_on,
    called_in_place,
    guarded,
)

import spikekernels
from spikekernels import reference
from spikekernels.nn import SpikeLayerNorm
from spikekernels.ops._dispatch import force_backend

U = 2.0**-24  # float32 unit roundoff
EPS = 1e-6


def _inputs(gen, T, rows, C, dtype=torch.float32, device="cpu"):
    """Increments around a nonzero mean, with silent steps and silent channels."""
    x = torch.randn((T, *rows, C), generator=gen) + 0.5
    x *= torch.rand((T, *rows, C), generator=gen) < 0.7
    if T > 2:
        x[1] = 0.0
    return x.to(device=device, dtype=dtype)


def _affine(gen, C, device="cpu"):
    w = torch.randn(C, generator=gen) * 0.5 + 1.0
    b = torch.randn(C, generator=gen) * 0.1
    return w.to(device), b.to(device)


def _as64(t):
    return None if t is None else t.cpu().to(torch.float64)


def _assert_within_2x(got, x, weight, bias, x_acc=None, y_prev=None, eps=EPS):
    """flash-attention style: ``|got - f64| <= 2 |ref32 - f64| + a few float32 ulps``, for the
    output and the outgoing ``y_prev``; ``x_acc`` bit-exact. Every element is compared."""
    out, x_acc_out, y_prev_out = (t.cpu() for t in got)
    x, weight, bias = x.cpu(), _as64(weight), _as64(bias)
    w32 = None if weight is None else weight.to(torch.float32)
    b32 = None if bias is None else bias.to(torch.float32)
    x_acc = None if x_acc is None else x_acc.cpu()
    y_prev = None if y_prev is None else y_prev.cpu()
    ref32 = reference.spike_layernorm(x, w32, b32, eps, x_acc, y_prev)
    ref64 = reference.spike_layernorm(
        x.to(torch.float64), weight, bias, eps, _as64(x_acc), _as64(y_prev), dtype=torch.float64
    )
    assert out.dtype == x.dtype and out.shape == x.shape
    assert x_acc_out.dtype == y_prev_out.dtype == torch.float32
    assert torch.equal(x_acc_out, ref32[1]), "the running sum is the same float32 adds"
    pairs = (("out", out, ref32[0], ref64[0]), ("y_prev", y_prev_out, ref32[2], ref64[2]))
    for name, g, r32, r64 in pairs:
        assert torch.isfinite(g).all(), f"{name} has non-finite elements"
        err = (g.to(torch.float64) - r64).abs().max().item()
        err32 = (r32.to(torch.float64) - r64).abs().max().item()
        atol = 4 * U * r64.abs().max().item()
        assert err <= 2 * err32 + atol, f"{name}: error {err:.3g} vs float32 reference {err32:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1, 16])
@pytest.mark.parametrize(("rows", "C"), [((2, 5), 1), ((3, 4), 7), ((5,), 384), ((3,), 1000)])
def test_within_2x_of_float32_reference(gen, device, dtype, T, rows, C):
    x = _inputs(gen, T, rows, C, dtype, device)
    w, b = _affine(gen, C, device)
    _assert_within_2x(spikekernels.spike_layernorm(x, w, b, EPS), x, w, b)


@pytest.mark.parametrize(
    ("with_weight", "with_bias"), [(False, False), (True, False), (False, True)]
)
def test_weight_and_bias_optional(gen, with_weight, with_bias):
    x = _inputs(gen, 5, (4,), 100)
    w, b = _affine(gen, 100)
    w, b = (w if with_weight else None), (b if with_bias else None)
    _assert_within_2x(spikekernels.spike_layernorm(x, w, b, EPS), x, w, b)


def test_incoming_state_each_independently(gen):
    x = _inputs(gen, 4, (3,), 50)
    w, b = _affine(gen, 50)
    x_acc = torch.randn(3, 50, generator=gen)
    y_prev = torch.randn(3, 50, generator=gen)
    for state in ((x_acc, None), (None, y_prev), (x_acc, y_prev)):
        got = spikekernels.spike_layernorm(x, w, b, EPS, *state)
        _assert_within_2x(got, x, w, b, *state)
        for given, back in zip(state, got[1:], strict=True):
            assert given is None or back.data_ptr() != given.data_ptr(), "state is never aliased"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunked_equals_whole_bit_for_bit(gen, dtype):
    x = _inputs(gen, 9, (2, 3), 130, dtype)
    w, b = _affine(gen, 130)
    out, x_acc, y_prev = spikekernels.spike_layernorm(x, w, b, EPS)
    parts, state = [], (None, None)
    for chunk in x.split([4, 1, 4]):
        part, *state = spikekernels.spike_layernorm(chunk, w, b, EPS, *state)
        parts.append(part)
    assert torch.equal(torch.cat(parts), out)
    assert torch.equal(state[0], x_acc) and torch.equal(state[1], y_prev)


def test_outputs_sum_to_layer_norm_of_the_sum(gen):
    x = _inputs(gen, 8, (6,), 64)
    w, b = _affine(gen, 64)
    out, x_acc, _ = spikekernels.spike_layernorm(x, w, b, EPS)
    want = torch.nn.functional.layer_norm(x.sum(0), (64,), w, b, EPS)
    torch.testing.assert_close(out.sum(0), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_acc, x.sum(0), atol=1e-5, rtol=1e-6)


def test_every_output_element_is_written(gen, poisoned_allocations):
    """Poison every allocation path (NaN in fresh tensors): any element the kernel skips
    shows up."""
    x = _inputs(gen, 5, (7,), 33)
    w, b = _affine(gen, 33)
    got = spikekernels.spike_layernorm(x, w, b, EPS)
    _assert_within_2x(got, x, w, b)


def test_reference_backend_is_the_oracle(gen):
    """``force_backend("reference")`` runs the oracle itself; the default CPU path is its own
    vectorised code, which meets the contract (the other tests) without being the oracle."""
    from spikekernels.ops._dispatch import force_backend

    x = _inputs(gen, 4, (3,), 20)
    w, b = _affine(gen, 20)
    with force_backend("reference"):
        got = spikekernels.spike_layernorm(x, w, b, EPS)
    want = reference.spike_layernorm(x, w, b, EPS)
    for name, g, r in zip(("out", "x_acc", "y_prev"), got, want, strict=True):
        assert_same_bits(g, r, name)


@pytest.mark.parametrize(
    ("eps", "error"),
    [
        (True, TypeError),
        ("1e-6", TypeError),
        (torch.tensor(1e-6), TypeError),
        (float("nan"), ValueError),
        (-1.0, ValueError),
    ],
)
def test_bad_eps_named_before_dispatch(eps, error):
    with pytest.raises(error, match="eps must be"):
        spikekernels.spike_layernorm(torch.zeros(2, 3, 4), None, None, eps)


def test_from_layernorm_rejects_other_modules():
    with pytest.raises(TypeError, match="ln must be an nn.LayerNorm, got Linear"):
        SpikeLayerNorm.from_layernorm(torch.nn.Linear(3, 3))


# ---------------------------------------------------------------------------------------------
# inplace=True: the new state written into the given tensors (ops._inplace)

# "triton" runs the kernel under the interpreter (and on a GPU); without either it falls back
# to "torch", as force_backend does for any op
BACKENDS = ["triton", "torch", "reference"]
STATE_NAMES = ("x_acc", "y_prev")


def _state(gen, rows, C, device="cpu"):
    shape = (*rows, C)
    return tuple(torch.randn(shape, generator=gen).to(device) for _ in STATE_NAMES)


def _run_inplace(x, w, b, state):
    """``spike_layernorm(inplace=True)`` on the ``guarded`` state, checked in place."""
    call = lambda: spikekernels.spike_layernorm(x, w, b, EPS, *state, inplace=True)  # noqa: E731
    out = called_in_place(call, STATE_NAMES, state)
    assert len(out) == 3 and out[0].shape == x.shape
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poisoned", [False, True])
def test_inplace_chunks_equal_whole(gen, backend, poisoned, request):
    """Chunks of 4, 1 and 4 steps from a nonzero state, fed back in place, give the whole
    run's bits (poisoned: every fresh allocation NaN, so a state element left unwritten
    shows)."""
    if poisoned:
        request.getfixturevalue("poisoned_allocations")
    x = _inputs(gen, 9, (2, 3), 37)
    w, b = _affine(gen, 37)
    state0 = _state(gen, (2, 3), 37)
    sizes = [4, 1, 4]
    with force_backend(backend):
        whole = spikekernels.spike_layernorm(x, w, b, EPS, *state0)
        state = guarded(state0)
        parts = [_run_inplace(xs, w, b, state)[0] for xs in x.split(sizes)]
    assert_each_same_bits((torch.cat(parts), *state), whole, ("out", *STATE_NAMES))
    assert not whole[0].isnan().any() and not whole[2].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_single_step(gen, device):
    x = _inputs(gen, 1, (3, 5), 33, device=device)
    w, b = _affine(gen, 33, device)
    state = _state(gen, (3, 5), 33, device)
    want = spikekernels.spike_layernorm(x, w, b, EPS, *state)
    assert_each_same_bits(_run_inplace(x, w, b, guarded(state)), want, ("out", *STATE_NAMES))


def test_inplace_on_meta_tensors():
    """Shapes only (meta tensors): the in-place state is not taken for an alias of the inputs
    (every meta tensor's address is 0)."""
    x = torch.empty(3, 5, 4, device="meta")
    state = [torch.empty(5, 4, device="meta") for _ in STATE_NAMES]
    out = spikekernels.spike_layernorm(x, None, None, EPS, *state, inplace=True)
    assert out[0].shape == (3, 5, 4) and out[0].is_meta
    assert all(got is given for got, given in zip(out[1:], state, strict=True))


@pytest.mark.parametrize("other", ["x", "weight", "bias", "state"])
def test_inplace_state_sharing_an_input_is_rejected(other):
    """A contiguous state inside the storage of an input the kernel reads (or of the other
    state), refused by name; the rejected call writes nothing (a run would write the layer
    norm of the buffer's varied values, which differ from them)."""
    buffer = torch.linspace(-1.0, 1.0, 24)
    saved = buffer.clone()
    args = dict(
        x=torch.linspace(-2.0, 3.0, 24).view(2, 3, 4),
        weight=torch.full((4,), 1.5),
        bias=torch.full((4,), 0.5),
        eps=EPS,
        x_acc=torch.zeros(3, 4),
    )
    name = "y_prev"
    if other == "x":
        args["x"] = buffer.view(2, 3, 4)
    elif other in ("weight", "bias"):
        args[other] = buffer[:4]
    else:
        args["x_acc"], name = buffer[:12].view(3, 4), "x_acc"
    args["y_prev"] = buffer[:12].view(3, 4)  # contiguous, but inside the other
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=f"{name} shares memory"):
        spikekernels.spike_layernorm(**args, inplace=True)
    assert torch.equal(buffer, saved), "a rejected call must not write"
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{k} was written"


def _good_args() -> dict:
    return dict(x=torch.zeros(2, 3, 4), weight=torch.ones(4), bias=torch.zeros(4), eps=EPS)


def _both_states(**bad) -> dict:
    """Both states of ``_good_args``, zeros, with ``bad`` replacing some."""
    return dict(x_acc=torch.zeros(3, 4), y_prev=torch.zeros(3, 4)) | bad


# (case, what replaces the good arguments, error type, words the message must contain)
BAD_INPUTS = [
    ("T == 0", dict(x=torch.zeros(0, 3, 4)), ValueError, "T == 0"),
    ("int x", dict(x=torch.zeros(2, 3, 4, dtype=torch.int8)), TypeError, "x must have dtype"),
    ("1-d x", dict(x=torch.zeros(4)), ValueError, r"x must be \[T, \*, C\]"),
    ("C == 0", dict(x=torch.zeros(2, 3, 0), weight=None, bias=None), ValueError, "C == 0"),
    # a row is one tile: Triton's largest is 2^20 lanes
    ("C > 2^20", dict(x=torch.zeros(1, 1, 2**20 + 1), weight=None, bias=None), ValueError, "C = "),
    ("weight wrong C", dict(weight=torch.ones(5)), ValueError, r"weight must have shape \(4,\)"),
    ("bias int", dict(bias=torch.zeros(4, dtype=torch.int32)), TypeError, "bias must have"),
    ("negative eps", dict(eps=-1e-6), ValueError, "eps must be"),
    ("x_acc wrong shape", dict(x_acc=torch.zeros(3, 5)), ValueError, "x_acc must have shape"),
    ("x_acc fp16", dict(x_acc=torch.zeros(3, 4).half()), TypeError, "x_acc must have dtype"),
    ("y_prev wrong shape", dict(y_prev=torch.zeros(4)), ValueError, "y_prev must have shape"),
    ("y_prev elsewhere", dict(y_prev=torch.zeros(3, 4, device="meta")), ValueError, "y_prev is"),
    ("weight elsewhere", dict(weight=torch.ones(4, device="meta")), ValueError, "weight is on"),
    ("inplace int", dict(**_both_states(), inplace=1), TypeError, "inplace must be a bool"),
    ("inplace without state", dict(inplace=True), ValueError, "inplace=True needs x_acc"),
    (
        "inplace without y_prev",
        dict(x_acc=torch.zeros(3, 4), inplace=True),
        ValueError,
        "inplace=True needs y_prev",
    ),
    (
        "inplace strided x_acc",
        dict(**_both_states(x_acc=torch.zeros(4, 3).t()), inplace=True),
        ValueError,
        "x_acc must be contiguous",
    ),
    (
        "inplace strided y_prev",
        dict(**_both_states(y_prev=torch.zeros(3, 8)[:, ::2]), inplace=True),
        ValueError,
        "y_prev must be contiguous",
    ),
]


@pytest.mark.parametrize(
    ("case", "bad", "error", "words"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_is_rejected(case, bad, error, words, device):
    with pytest.raises(error, match=words):
        call_on(device, spikekernels.spike_layernorm, **{**_good_args(), **bad})


@pytest.mark.parametrize("with_state", [False, True])
def test_opcheck(gen, with_state):
    x = _inputs(gen, 3, (2, 5), 12)
    w, b = _affine(gen, 12)
    state = (torch.randn(2, 5, 12, generator=gen), torch.randn(2, 5, 12, generator=gen))
    args = (x, w, b, EPS, *(state if with_state else (None, None)))
    torch.library.opcheck(torch.ops.spikekernels.spike_layernorm.default, args)


def test_inplace_opcheck(gen):
    """The registered op with ``inplace``: the state declared mutated, placeholders returned
    (an output may not alias an input), the fake impl's shapes those of the real one."""
    x = _inputs(gen, 3, (2, 5), 12)
    w, b = _affine(gen, 12)
    args = (x, w, b, EPS, *_state(gen, (2, 5), 12), True)
    torch.library.opcheck(torch.ops.spikekernels.spike_layernorm.default, args)


def test_torch_compile_fullgraph(gen):
    """Compiled outputs meet the op's contract (within 2x PyTorch's float32 error against
    float64), as eager ones do. Not bit equality with eager: Inductor compiles the float code
    around the op (and, on a CPU without the interpreter, the op's PyTorch body) in its own
    order, which moved results by 1 ulp on another machine."""
    x = _inputs(gen, 4, (3,), 24)
    w, b = _affine(gen, 24)

    def norm(x):
        out, x_acc, y_prev = spikekernels.spike_layernorm(x * 2, w, b, EPS)
        return out, x_acc, y_prev, out.sum(0) + y_prev

    got, want = torch.compile(norm, fullgraph=True)(x), norm(x)
    _assert_within_2x(got[:3], x * 2, w, b)
    _assert_within_2x(want[:3], x * 2, w, b)
    # Around the op: the same values up to float32 rounding of a 4-term sum.
    torch.testing.assert_close(got[3], want[3], rtol=8 * U, atol=8 * U)


def test_torch_compile_fullgraph_inplace(gen):
    """``inplace=True`` under torch.compile (the mutation functionalized, then written back):
    the given tensors hold the new state, and the outputs meet the op's contract from the
    incoming state, as eager ones do."""
    x = _inputs(gen, 4, (3,), 24)
    w, b = _affine(gen, 24)
    state0 = (torch.randn(3, 24, generator=gen), torch.randn(3, 24, generator=gen))
    state = tuple(t.clone() for t in state0)

    def norm(x, x_acc, y_prev):
        return spikekernels.spike_layernorm(x * 2, w, b, EPS, x_acc, y_prev, inplace=True)[0]

    out = torch.compile(norm, fullgraph=True)(x, *state)
    _assert_within_2x((out, *state), x * 2, w, b, *state0)


class TestSpikeLayerNormModule:
    @pytest.mark.parametrize("eps", [1e-6, 1e-3])
    def test_from_layernorm_copies_eps_and_chunks_equal_whole(self, gen, eps):
        """eps is the QANN LayerNorm's (the ViT's 1e-6, or any other), not a constant: the
        outputs are checked against the reference at that eps (1e-3 moves them far more than
        the tolerance)."""
        ln = torch.nn.LayerNorm(40, eps=eps)
        with torch.no_grad():
            ln.weight.copy_(torch.randn(40, generator=gen))
            ln.bias.copy_(torch.randn(40, generator=gen))
        x = _inputs(gen, 7, (2, 3), 40)
        whole, chunked = SpikeLayerNorm.from_layernorm(ln), SpikeLayerNorm.from_layernorm(ln)
        assert whole.eps == eps, "eps is the QANN's, not the official SNN code's 1e-5"
        out = whole(x)
        assert torch.equal(torch.cat([chunked(c) for c in x.split([3, 4])]), out)
        w, b = ln.weight.detach(), ln.bias.detach()
        _assert_within_2x((out, whole.x_acc, whole.y_prev), x, w, b, eps=eps)

    def test_reset_and_no_affine(self, gen):
        norm = SpikeLayerNorm.from_layernorm(torch.nn.LayerNorm(16, elementwise_affine=False))
        assert norm.weight is None and norm.bias is None
        x = _inputs(gen, 3, (4,), 16)
        first = norm(x)
        assert not torch.equal(norm(x), first)
        norm.reset()
        assert torch.equal(norm(x), first)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_at_vit_size(gen, dtype):
    x = _inputs(gen, 16, (2 * 197,), 768, dtype)
    w, b = _affine(gen, 768)
    got = spikekernels.spike_layernorm(x.cuda(), w.cuda(), b.cuda(), EPS)
    _assert_within_2x(got, x, w, b)

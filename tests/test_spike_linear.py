"""spike_linear (SPEC.md §6): int8 weights bit-exact against an integer oracle; float weights
within a derived float32 summation bound of the reference; the bias schedule exact."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, call_on

import spikekernels
from spikekernels import ops, reference
from spikekernels.kernels import use_triton
from spikekernels.nn import SpikeLinear
from spikekernels.ops import split_weight_bf16x3
from spikekernels.ops._dispatch import force_backend
from spikekernels.ops.spike_linear import spike_linear_torch

U = 2.0**-24  # float32 unit roundoff
WEIGHT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]


def _spikes(gen, T, rows, K, density=0.3):
    """Ternary spikes with whole silent rows and one silent step (when T > 1)."""
    s = torch.randint(-1, 2, (T, *rows, K), generator=gen, dtype=torch.int8)
    s *= (torch.rand((T, *rows, K), generator=gen) < density).to(torch.int8)
    silent_rows = torch.rand((T, *rows, 1), generator=gen) < 0.4
    s.masked_fill_(silent_rows, 0)
    if T > 1:
        s[T // 2] = 0
    return s


def _weight(gen, N, K, dtype):
    """``(weight, weight_scale)``: int8 codes with a per-channel scale, or float weights."""
    if dtype == torch.int8:
        w = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)
        return w, torch.rand(N, generator=gen) * 0.01 + 1e-3
    return (torch.randn(N, K, generator=gen) * 0.2).to(dtype), None


def _due(t0, T, bias_steps):
    return max(0, min(T, bias_steps - t0))


def _int_oracle(s, w, w_scale, theta, bias, t0, bias_steps):
    """Integer arithmetic for ``S @ W^T``, then ``(theta * w_scale) * acc + share``."""
    acc = torch.matmul(s.to(torch.int64), w.to(torch.int64).t()).to(torch.float32)
    out = (theta.to(torch.float32).reshape(()) * w_scale.to(torch.float32)) * acc
    due = _due(t0, s.shape[0], bias_steps)
    if bias is not None and due:
        share = bias.to(torch.float32)
        out[:due] += share if bias_steps == 1 else share / bias_steps
    return out


def _assert_linear(got, s, w, w_scale, theta, bias, t0, bias_steps, slack=None):
    """Every element: exact for int8 weights, else within the float32 summation bound (twice
    it on a GPU, whose tensor-core float32 accumulation may truncate instead of round)."""
    slack = (2.0 if got.is_cuda else 1.0) if slack is None else slack
    got = got.cpu()
    s, w, theta = s.cpu(), w.cpu(), theta.cpu()
    bias = None if bias is None else bias.cpu()
    assert got.dtype == torch.float32
    assert got.shape == (*s.shape[:-1], w.shape[0])
    if w.dtype == torch.int8:
        want = _int_oracle(s, w, w_scale.cpu(), theta, bias, t0, bias_steps)
        diff = (got != want).sum().item()
        assert diff == 0, f"{diff} of {got.numel()} elements differ from the integer oracle"
        return
    want = reference.spike_linear(s, w, theta, bias, t0=t0, bias_steps=bias_steps)
    # Both sums of K exact products carry at most ~K u of sum |terms| (recursive or blocked
    # summation), plus one rounding each for the theta multiply and the bias add.
    mag = theta.to(torch.float64) * torch.matmul(
        s.abs().to(torch.float64), w.abs().to(torch.float64).t()
    )
    k = w.shape[1]
    bound = slack * (2 * (k + 2) * U * mag + 4 * U * want.abs().to(torch.float64)) + 1e-30
    err = (got.to(torch.float64) - want.to(torch.float64)).abs()
    assert torch.isfinite(got).all()
    bad = (err > bound).sum().item()
    assert bad == 0, f"{bad} of {got.numel()} elements beyond the bound (max err {err.max()})"


CASES = [  # (T, rows, K, N)
    (1, (1,), 1, 1),
    (3, (5,), 5, 33),
    (1, (50,), 33, 5),
    (4, (2, 7), 100, 37),
    (2, (19,), 64, 100),
    (2, (16,), 64, 32),  # every dim a multiple of its tile: the K loop without masks
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=str)
@pytest.mark.parametrize(("T", "rows", "K", "N"), CASES)
def test_matches_oracle(gen, device, dtype, T, rows, K, N):
    s = _spikes(gen, T, rows, K).to(device)
    w, ws = _weight(gen, N, K, dtype)
    theta = torch.tensor([0.1 + torch.rand((), generator=gen).item()])
    bias = torch.randn(N, generator=gen)
    w, theta, bias = w.to(device), theta.to(device), bias.to(device)
    ws = None if ws is None else ws.to(device)
    got = spikekernels.spike_linear(s, w, theta, bias, weight_scale=ws)
    _assert_linear(got, s, w, ws, theta, bias, 0, 1)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=str)
def test_cpu_runtime_path(gen, dtype):
    """The vectorised-torch CPU path (what runs without the interpreter), called directly."""
    s = _spikes(gen, 5, (3, 11), 70)
    w, ws = _weight(gen, 21, 70, dtype)
    theta, bias = torch.tensor(0.3), torch.randn(21, generator=gen)
    for t0, bias_steps in [(0, 1), (1, 3), (4, 2)]:
        got = spike_linear_torch(s, w, theta, bias, t0, bias_steps, ws)
        _assert_linear(got, s, w, ws, theta, bias, t0, bias_steps)


def test_int8_weights_exact_past_float32s_integers(gen):
    """int8 weights over K = 2^22 inputs: sums near 2^29, past float32's exact integers
    (2^24). The CPU path still gives the integer oracle's bits (one rounding of the exact
    integer, as the Triton kernel's int32 sum); a float32 matmul rounds its partial sums.
    The CPU path only: through the interpreter this K takes minutes."""
    K = 1 << 22
    s = torch.ones(1, 2, K, dtype=torch.int8)
    s[0, 1] = torch.randint(-1, 2, (K,), generator=gen, dtype=torch.int8)
    w = torch.randint(100, 128, (3, K), generator=gen, dtype=torch.int8)
    w[2] = torch.randint(-128, 128, (K,), generator=gen, dtype=torch.int8)
    ws, theta = torch.tensor([1e-3, 2e-3, 3e-3]), torch.tensor(0.7)
    got = spike_linear_torch(s, w, theta, None, 0, 1, ws)
    _assert_linear(got, s, w, ws, theta, None, 0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8], ids=str)
@pytest.mark.parametrize("bias_steps", [1, 3, 20])
# (7, 3, 37, 10): a step of 111 spikes, so steps sit at every alignment in the chunk
@pytest.mark.parametrize(("T", "rows", "K", "N"), [(7, 6, 40, 19), (7, 3, 96, 10), (7, 3, 37, 10)])
def test_chunked_equals_whole(gen, dtype, bias_steps, T, rows, K, N):
    """Bit for bit with float weights too: the CPU path multiplies a step per call (a BLAS may
    order a row's sum by the call's shape: K = 96 over 3 rows did, on this project's CPU),
    the kernels a step's rows alike whatever the chunk."""
    s = _spikes(gen, T, (rows,), K)
    w, ws = _weight(gen, N, K, dtype)
    theta, bias = torch.tensor(0.45), torch.randn(N, generator=gen)
    whole = spikekernels.spike_linear(s, w, theta, bias, bias_steps=bias_steps, weight_scale=ws)
    _assert_linear(whole, s, w, ws, theta, bias, 0, bias_steps)
    parts, t0 = [], 0
    for chunk in s.split([2, 1, 4]):
        parts.append(
            spikekernels.spike_linear(
                chunk, w, theta, bias, t0=t0, bias_steps=bias_steps, weight_scale=ws
            )
        )
        _assert_linear(parts[-1], chunk, w, ws, theta, bias, t0, bias_steps)
        t0 += chunk.shape[0]
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=str)
def test_silent_rows_and_steps_give_exactly_the_bias(gen, dtype):
    T, K, N = 4, 45, 30
    s = torch.zeros(T, 40, K, dtype=torch.int8)
    s[1, 3, 7] = 1  # one active row in one row tile, at a step with no bias
    w, ws = _weight(gen, N, K, dtype)
    theta, bias = torch.tensor(0.7), torch.randn(N, generator=gen)
    got = spikekernels.spike_linear(s, w, theta, bias, bias_steps=2, weight_scale=ws)
    share = bias / 2
    assert torch.equal(got[0], share.expand(40, N))
    assert torch.equal(got[2:], torch.zeros(2, 40, N))
    quiet = torch.ones(40, dtype=torch.bool)
    quiet[3] = False
    assert torch.equal(got[1][quiet], share.expand(39, N))
    _assert_linear(got, s, w, ws, theta, bias, 0, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=str)
def test_bias_share_is_correctly_rounded(gen, device, dtype):
    """Silent spikes give exactly ``bias / bias_steps`` on the due steps, on every device:
    PyTorch's CUDA kernel divides by a host number as a product with its reciprocal (two
    roundings); on an H200 (2026-12-04) that moved v of the fused neuron by an ulp at
    bias_steps 3 and 20."""
    N, bias_steps = 300, 3
    w, ws = _weight(gen, N, 16, dtype)
    bias = torch.randn(N, generator=gen)
    s = torch.zeros(4, 2, 16, dtype=torch.int8)
    got = spikekernels.spike_linear(
        s.to(device),
        w.to(device),
        torch.tensor(0.7, device=device),
        bias.to(device),
        bias_steps=bias_steps,
        weight_scale=None if ws is None else ws.to(device),
    ).cpu()
    share = (bias.double() / bias_steps).float()  # one rounding
    two_roundings = bias * (1 / bias_steps)  # what a CUDA division by a host number gives
    assert not torch.equal(share, two_roundings), "no case of two roundings: proves little"
    assert torch.equal(got[:bias_steps], share.expand(bias_steps, 2, N))
    assert torch.equal(got[bias_steps:], torch.zeros(4 - bias_steps, 2, N))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_bias_of_any_layout(gen, device, layout):
    """A strided or expanded (stride 0) bias gives the contiguous bias's bits on every path,
    the module's and the neuron op's too (the kernels read the bias by column)."""
    s = _spikes(gen, 3, (2, 7), 20).to(device)
    w, _ = _weight(gen, 12, 20, torch.float32)
    w, theta = w.to(device), torch.tensor(0.3, device=device)
    if layout == "strided":
        bias = torch.randn(24, generator=gen).to(device)[::2]
    else:
        bias = torch.randn((), generator=gen).to(device).expand(12)
    assert not bias.is_contiguous()
    plain = bias.contiguous()
    for bias_steps in (1, 3):
        got = spikekernels.spike_linear(s, w, theta, bias, bias_steps=bias_steps)
        want = spikekernels.spike_linear(s, w, theta, plain, bias_steps=bias_steps)
        assert torch.equal(got, want), f"bias_steps={bias_steps}"
    out_theta = torch.tensor(0.2, device=device)
    got = ops.spike_linear_neuron(s, w, theta, out_theta, -8, 7, bias)
    want = ops.spike_linear_neuron(s, w, theta, out_theta, -8, 7, plain)
    for g, x in zip(got, want, strict=True):
        assert torch.equal(g, x)
    assert torch.equal(SpikeLinear(w, bias, theta)(s), SpikeLinear(w, plain, theta)(s))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_split_weight_form(gen, device, backend):
    """The ``[3, N, K]`` bf16 split of a float32 weight: the float32 weight's bits wherever
    the sums are exact (dyadic weights), its summation bound otherwise."""
    s = _spikes(gen, 4, (2, 19), 45).to(device)
    dyadic = torch.randint(-20, 21, (37, 45), generator=gen).to(torch.float32) / 256
    theta, bias = torch.tensor(0.3).to(device), torch.randn(37, generator=gen).to(device)
    with force_backend(backend):
        got = spikekernels.spike_linear(s, split_weight_bf16x3(dyadic).to(device), theta, bias)
    want = reference.spike_linear(s.cpu(), dyadic, theta.cpu(), bias.cpu())
    assert torch.equal(got.cpu(), want)
    w, _ = _weight(gen, 37, 45, torch.float32)
    with force_backend(backend):
        got = spikekernels.spike_linear(s, split_weight_bf16x3(w).to(device), theta, bias)
    _assert_linear(got, s, w, None, theta, bias, 0, 1)


def test_module_splits_float32_weight_once_and_follows_it(gen):
    """``SpikeLinear`` hands the kernels its float32 weight's bf16 split, made once and remade
    after an in-place update (``load_state_dict``): never stale; same output as the plain
    weight's (dyadic weights: exact sums in any order)."""
    weight = torch.randint(-64, 64, (12, 20), generator=gen).float() / 256
    layer = SpikeLinear(weight, None, 0.5)
    if not use_triton(weight):
        pytest.skip("the split is made only where the Triton kernels run")
    first = layer.kernel_weight()
    assert layer.kernel_weight() is first
    assert torch.equal(first, split_weight_bf16x3(weight))
    new = torch.randint(-64, 64, (12, 20), generator=gen).float() / 256
    layer.load_state_dict({"weight": new, "in_threshold": layer.in_threshold})
    assert torch.equal(layer.kernel_weight(), split_weight_bf16x3(new))
    s = torch.randint(-1, 2, (3, 4, 20), generator=gen, dtype=torch.int8)
    want = reference.spike_linear(s, new, torch.tensor(0.5))
    assert torch.equal(layer(s), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8], ids=str)
def test_bias_none_and_late_chunk(gen, dtype):
    s = _spikes(gen, 3, (9,), 20)
    w, ws = _weight(gen, 11, 20, dtype)
    theta, bias = torch.tensor(0.2), torch.randn(11, generator=gen)
    no_bias = spikekernels.spike_linear(s, w, theta, weight_scale=ws)
    late = spikekernels.spike_linear(s, w, theta, bias, t0=5, bias_steps=4, weight_scale=ws)
    _assert_linear(no_bias, s, w, ws, theta, None, 0, 1)
    assert torch.equal(no_bias, late), "no bias is due after step bias_steps - 1"


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=str)
def test_every_output_element_is_written(gen, monkeypatch, dtype):
    """Poison the allocator: NaN in fresh float tensors, zeros (= "silent") in fresh integer
    ones, the tile flags. Any output element or flag the kernels fail to write shows up (a
    flag poisoned "active", as ``poisoned_allocations``' 77, would hide: the tile would just
    be computed). Every weight dtype (its own kernel variant); rows over several row tiles,
    the last one partial."""
    s = _spikes(gen, 3, (45,), 50, density=0.9)
    w, ws = _weight(gen, 35, 50, dtype)
    theta, bias = torch.tensor(0.3), torch.randn(35, generator=gen)
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan") if t.is_floating_point() else 0)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    got = spikekernels.spike_linear(s, w, theta, bias, weight_scale=ws)
    monkeypatch.undo()
    _assert_linear(got, s, w, ws, theta, bias, 0, 1)


def test_non_contiguous_spikes_and_threshold_dtypes(gen):
    s = _spikes(gen, 3, (8,), 24).transpose(0, 1).contiguous().transpose(0, 1)
    assert not s.is_contiguous()
    w, _ = _weight(gen, 13, 24, torch.float32)
    for theta in (torch.tensor(0.3, dtype=torch.float64), torch.tensor([[0.3]]).half()):
        _assert_linear(spikekernels.spike_linear(s, w, theta), s, w, None, theta, None, 0, 1)


def _good_args() -> dict:
    return dict(
        s=torch.zeros(2, 3, 4, dtype=torch.int8),
        weight=torch.zeros(5, 4),
        in_threshold=torch.tensor(0.5),
        bias=torch.zeros(5),
    )


_I8 = dict(weight=torch.zeros(5, 4, dtype=torch.int8))

# (case, what replaces the good arguments, error type, words the message must contain)
BAD_INPUTS = [
    ("T == 0", dict(s=torch.zeros(0, 3, 4, dtype=torch.int8)), ValueError, "T == 0"),
    ("float s", dict(s=torch.zeros(2, 3, 4)), TypeError, "s must have dtype"),
    ("1-d s", dict(s=torch.zeros(4, dtype=torch.int8)), ValueError, r"s must be \[T, \*, K\]"),
    ("int32 weight", dict(weight=torch.zeros(5, 4, dtype=torch.int32)), TypeError, "weight"),
    ("3-d weight", dict(weight=torch.zeros(1, 5, 4)), ValueError, "weight must have 2 dims"),
    (
        "2-part split",
        dict(weight=torch.zeros(2, 5, 4, dtype=torch.bfloat16)),
        ValueError,
        r"\[3, N, K\] bfloat16",
    ),
    ("K mismatch", dict(weight=torch.zeros(5, 6)), ValueError, "K=4 .* K=6"),
    # a silent row skips its product on a GPU: 0 * inf would make the answer the backend's
    ("inf weight", dict(weight=torch.full((5, 4), float("inf"))), ValueError, "weight must be fin"),
    (
        "NaN in a split",
        dict(weight=torch.full((3, 5, 4), float("nan"), dtype=torch.bfloat16)),
        ValueError,
        "weight must be finite",
    ),
    ("theta <= 0", dict(in_threshold=torch.tensor(0.0)), ValueError, "in_threshold must be pos"),
    ("theta 2 elements", dict(in_threshold=torch.ones(2)), ValueError, "in_threshold must have"),
    ("theta float", dict(in_threshold=0.5), TypeError, "in_threshold must be a torch.Tensor"),
    ("bias wrong N", dict(bias=torch.zeros(4)), ValueError, r"bias must have shape \(5,\)"),
    ("bias int", dict(bias=torch.zeros(5, dtype=torch.int32)), TypeError, "bias must have"),
    ("scale missing", _I8, ValueError, "weight_scale"),
    ("scale for float", dict(weight_scale=torch.ones(5)), ValueError, "weight_scale is only"),
    ("scale wrong N", dict(**_I8, weight_scale=torch.ones(3)), ValueError, "weight_scale must"),
    ("negative t0", dict(t0=-1), ValueError, "t0"),
    ("bias_steps 0", dict(bias_steps=0), ValueError, "bias_steps must be >= 1"),
    ("weight elsewhere", dict(weight=torch.zeros(5, 4, device="meta")), ValueError, "weight is"),
    ("bias elsewhere", dict(bias=torch.zeros(5, device="meta")), ValueError, "bias is on meta"),
    (
        "non-ternary",
        dict(s=torch.full((2, 3, 4), 2, dtype=torch.int8), validate=True),
        ValueError,
        "ternary",
    ),
]


@pytest.mark.parametrize(
    ("case", "bad", "error", "words"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_is_rejected(case, bad, error, words, device):
    with pytest.raises(error, match=words):
        call_on(device, spikekernels.spike_linear, **{**_good_args(), **bad})


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8], ids=str)
def test_opcheck(gen, dtype):
    s = _spikes(gen, 3, (2, 5), 12)
    w, ws = _weight(gen, 7, 12, dtype)
    args = (s, w, torch.tensor(0.4), torch.randn(7, generator=gen), 1, 3, ws)
    torch.library.opcheck(torch.ops.spikekernels.spike_linear.default, args)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.int8])
def test_torch_compile_fullgraph(gen, wdtype):
    """Compiled outputs meet the op's contract: the integer oracle bit for bit for int8
    weights, the float32 summation bound for float weights. The surrounding float code is
    compared as values: Inductor may reorder it (the sum over steps moved 1 ulp on another
    machine when this test demanded bit equality)."""
    s = _spikes(gen, 3, (4,), 16)
    w, w_scale = _weight(gen, 9, 16, wdtype)
    theta, bias = torch.tensor(0.4), torch.randn(9, generator=gen)

    def layer(s):
        out = spikekernels.spike_linear(s, w, theta, bias, weight_scale=w_scale)
        return out, out.sum(0) * 2

    got, want = torch.compile(layer, fullgraph=True)(s), layer(s)
    _assert_linear(got[0], s, w, w_scale, theta, bias, 0, 1)
    _assert_linear(want[0], s, w, w_scale, theta, bias, 0, 1)
    torch.testing.assert_close(got[1], want[1], rtol=16 * U, atol=16 * U)


class TestSpikeLinearModule:
    @pytest.mark.parametrize("bias_steps", [1, 4])
    def test_chunked_calls_equal_one_call(self, gen, bias_steps):
        linear = torch.nn.Linear(24, 10)
        s = _spikes(gen, 6, (2, 5), 24)
        whole = SpikeLinear.from_linear(linear, 0.35, bias_steps=bias_steps)
        chunked = SpikeLinear.from_linear(linear, torch.tensor(0.35), bias_steps=bias_steps)
        out = whole(s)
        parts = torch.cat([chunked(c) for c in s.split([1, 3, 2])])
        w = linear.weight.detach()
        _assert_linear(out, s, w, None, torch.tensor(0.35), linear.bias.detach(), 0, bias_steps)
        _assert_linear(parts, s, w, None, torch.tensor(0.35), linear.bias.detach(), 0, bias_steps)
        assert whole.t0 == chunked.t0 == 6

    def test_reset_makes_the_bias_due_again(self, gen):
        s = _spikes(gen, 2, (3,), 8)
        w, ws = _weight(gen, 4, 8, torch.int8)
        layer = SpikeLinear(w, torch.randn(4, generator=gen), 0.5, weight_scale=ws)
        first = layer(s)
        assert not torch.equal(layer(s), first)
        layer.reset()
        assert torch.equal(layer(s), first)
        assert set(dict(layer.named_buffers())) == {
            "weight",
            "bias",
            "weight_scale",
            "in_threshold",
        }


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=str)
def test_cuda_at_vit_size(gen, dtype):
    """Many row, column and K tiles (64 x 128 x 128 on the GPU), most rows silent."""
    s = _spikes(gen, 4, (300,), 384, density=0.1)
    w, ws = _weight(gen, 1152, 384, dtype)
    theta, bias = torch.tensor(0.3), torch.randn(1152, generator=gen)
    got = spikekernels.spike_linear(
        s.cuda(),
        w.cuda(),
        theta.cuda(),
        bias.cuda(),
        weight_scale=None if ws is None else ws.cuda(),
    )
    _assert_linear(got, s, w, ws, theta, bias, 0, 1)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        (dict(bias_steps=2.0), TypeError, "bias_steps must be an int, got float"),
        (dict(bias_steps=True), TypeError, "bias_steps must be an int, got bool"),
        (dict(t0=1.0), TypeError, "t0 must be an int, got float"),
        (dict(t0=2**70), ValueError, "t0 must be in"),
    ],
)
def test_python_types_named_before_dispatch(gen, kwargs, error, words):
    s = _spikes(gen, 2, (3,), 8)
    with pytest.raises(error, match=words):
        spikekernels.spike_linear(s, torch.randn(4, 8), torch.tensor(0.5), **kwargs)


@pytest.mark.parametrize("validate", [False, True])
@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf")])
def test_bad_scales_rejected_on_cpu(gen, validate, value):
    """Thresholds and int8 weight scales of 0, NaN or inf: rejected on CPU tensors always
    (no sync), on a GPU with ``validate=True``."""
    s = _spikes(gen, 2, (3,), 8)
    w, w_scale = _weight(gen, 4, 8, torch.int8)
    with pytest.raises(ValueError, match="in_threshold must be positive, finite"):
        spikekernels.spike_linear(
            s, w, torch.tensor(value), weight_scale=w_scale, validate=validate
        )
    w_scale = w_scale.clone()
    w_scale[1] = value
    with pytest.raises(ValueError, match="weight_scale must be finite and nonzero"):
        spikekernels.spike_linear(s, w, torch.tensor(0.5), weight_scale=w_scale, validate=validate)


@pytest.mark.parametrize("validate", [False, True])
@pytest.mark.parametrize("value", [-128, -2, 2])  # both sides of the range; abs(-128) < 0
def test_non_ternary_spikes_rejected_on_cpu(gen, validate, value):
    s = _spikes(gen, 2, (3,), 8)
    s[1, 2, 3] = value
    with pytest.raises(ValueError, match="s must hold ternary spikes"):
        spikekernels.spike_linear(s, torch.randn(4, 8), torch.tensor(0.5), validate=validate)


def test_from_linear_takes_a_quant_linears_integer_weight(gen):
    """``SpikeLinear.from_linear`` of a ``QuantLinear`` computes with the int8 weight and its
    scale, as that QANN does (it used to take the float parameter it was trained from)."""
    from spikekernels.nn import QuantLinear

    qlin = QuantLinear.from_linear(torch.nn.Linear(20, 6))
    w_int, ws = qlin.int_weights()
    layer = SpikeLinear.from_linear(qlin, 0.25)
    assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight, w_int)
    s = _spikes(gen, 4, (3,), 20)
    out = layer(s)
    assert torch.equal(out, _int_oracle(s, w_int, ws, torch.tensor(0.25), qlin.bias, 0, 1))
    with torch.no_grad():  # over the steps: the QANN layer on the input's value
        total = qlin(0.25 * s.sum(0).float())
    torch.testing.assert_close(out.sum(0), total, rtol=1e-5, atol=1e-5)

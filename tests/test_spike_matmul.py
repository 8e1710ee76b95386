"""spike_matmul (SPEC.md §5): the fused kernel against the step-by-step reference, bit for bit."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import DEVICES, assert_same_bits, call_on, called_in_place, guarded

import spikekernels
from spikekernels import reference
from spikekernels.nn import SpikeMatmul
from spikekernels.nn.spike_matmul import RunningSpikeMatmul
from spikekernels.ops._dispatch import force_backend
from spikekernels.ops.spike_matmul import spike_matmul_torch

# The module, which the function of the same name shadows as an attribute of spikekernels.ops.
ops_spike_matmul = importlib.import_module("spikekernels.ops.spike_matmul")

# Row (a) and column (b) groups that fall silent together, so that some kernel tiles are
# entirely silent and others are not.
GROUP = 16


def _spikes(gen, T, batch, rows, cols, *, group_dim, density=0.4, silent=0.35):
    """Ternary int8 ``[T, *batch, rows, cols]``; groups of GROUP rows (``group_dim=-2``) or
    columns (``group_dim=-1``) are silent together with probability ``silent``."""
    shape = (T, *batch, rows, cols)
    x = torch.randint(-1, 2, shape, generator=gen, dtype=torch.int8)
    x = x * (torch.rand(shape, generator=gen) < density)
    n = rows if group_dim == -2 else cols
    groups = (n + GROUP - 1) // GROUP
    keep = torch.rand((T, *batch, groups), generator=gen) >= silent
    keep = keep.repeat_interleave(GROUP, dim=-1)[..., :n]
    keep = keep.unsqueeze(-1) if group_dim == -2 else keep.unsqueeze(-2)
    return x * keep


def _counts(gen, shape, bound=20):
    return torch.randint(-bound, bound + 1, shape, generator=gen, dtype=torch.int8)


def _scale(gen, device="cpu", dtype=torch.float32):
    return (0.01 + torch.rand(1, generator=gen)).to(device=device, dtype=dtype)


def _assert_same(got, want):
    """Same dtype, shape and bits (so -0.0 != 0.0 and NaN == NaN)."""
    for name, g, w in zip(("out", "a_acc", "b_acc"), got, want, strict=True):
        assert_same_bits(g, w, name)


def _check(a, b, scale, a_acc=None, b_acc=None):
    got = spikekernels.spike_matmul(a, b, scale, a_acc, b_acc)
    cpu = [None if t is None else t.cpu() for t in (a, b, scale, a_acc, b_acc)]
    _assert_same(got, reference.spike_matmul(*cpu))
    return got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("batch", "m", "k", "n"),
    [
        ((), 1, 1, 1),
        ((), 5, 33, 7),
        ((2,), 33, 5, 1),
        ((2,), 17, 64, 33),
        ((2,), 64, 32, 64),
        ((2, 3), 5, 16, 5),
        ((1, 2), 70, 80, 9),
    ],
)
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_reference(gen, device, batch, m, k, n, with_state):
    T = 4
    a = _spikes(gen, T, batch, m, k, group_dim=-2).to(device)
    b = _spikes(gen, T, batch, k, n, group_dim=-1).to(device)
    a_acc = _counts(gen, (*batch, m, k)).to(device) if with_state else None
    b_acc = _counts(gen, (*batch, k, n)).to(device) if with_state else None
    _check(a, b, _scale(gen, device), a_acc, b_acc)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [64, 300])
def test_transposed_view(gen, device, k):
    """Q @ K^T: ``b`` is ``k.transpose(-1, -2)`` of a contiguous ``[T, B, H, N, d]``."""
    T, batch, n_tok = 3, (2, 2), 9
    q = _spikes(gen, T, batch, n_tok, k, group_dim=-2).to(device)
    keys = _spikes(gen, T, batch, n_tok, k, group_dim=-2).to(device)
    b = keys.transpose(-1, -2)
    assert not b.is_contiguous()
    b_acc = _counts(gen, b.shape[1:]).to(device)
    _check(q, b, _scale(gen, device), None, b_acc)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [64, 300])
def test_packed_qkv_slices(gen, device, k):
    """q, k^T and v as ``SpikeAttention`` slices them from the packed qkv spikes ``[T, B, N,
    3, H, d]`` (batch dims that do not merge, read in place): the scores (the fused path at
    d = 64, the split path at d = 300) and a context-like product of the value slice."""
    T, b, h, n_tok = 3, 2, 3, 9
    qkv = _spikes(gen, T, (b, n_tok, 3, h), 1, k, group_dim=-2)[..., 0, :].to(device)
    q = qkv[:, :, :, 0].transpose(2, 3)  # [T, B, H, N, d]
    keys_t = qkv[:, :, :, 1].permute(0, 1, 3, 4, 2)  # [T, B, H, d, N]
    assert not q.is_contiguous() and not keys_t.is_contiguous()
    _check(q, keys_t, _scale(gen, device), None, _counts(gen, keys_t.shape[1:]).to(device))
    values = qkv[:, :, :, 2].transpose(2, 3)  # [T, B, H, N, d]: N = 9 is the contraction
    attn = _spikes(gen, T, (b, h), 5, n_tok, group_dim=-1).to(device)
    _check(attn, values, _scale(gen, device), _counts(gen, attn.shape[1:]).to(device), None)


@pytest.mark.parametrize("device", DEVICES)
def test_197_tokens(gen, device):
    """ViT's 197 tokens: four 64-row tiles, the last one 5 rows, some of them silent."""
    a = _spikes(gen, 2, (1,), 197, 33, group_dim=-2, silent=0.5).to(device)
    b = _spikes(gen, 2, (1,), 33, 5, group_dim=-1).to(device)
    _check(a, b, _scale(gen, device), _counts(gen, (1, 197, 33)).to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [24, 260])
def test_silent_dense_and_mixed_steps(gen, device, k):
    """Step 0 and 3 silent, step 1 dense (every spike +-1), step 2 only a spiking, 4 only b."""
    T, batch, m, n = 6, (2,), 9, 11
    a = _spikes(gen, T, batch, m, k, group_dim=-2)
    b = _spikes(gen, T, batch, k, n, group_dim=-1)
    for x in (a, b):
        x[0] = 0
        x[3] = 0
        x[1] = torch.where(torch.rand(x[1].shape, generator=gen) < 0.5, 1, -1)
    a[4] = 0
    b[2] = 0
    a_acc, b_acc = _counts(gen, (*batch, m, k)), _counts(gen, (*batch, k, n))
    out, _, _ = _check(*(t.to(device) for t in (a, b, _scale(gen), a_acc, b_acc)))
    assert not out[0].any() and not out[3].any()


@pytest.mark.parametrize("device", DEVICES)
def test_counts_at_int8_limits(gen, device):
    """Counts up to +-127 and -128: products of magnitude 128 stay exact."""
    T, m, k, n = 3, 6, 40, 6
    a = _spikes(gen, T, (), m, k, group_dim=-2, silent=0.0)
    b = _spikes(gen, T, (), k, n, group_dim=-1, silent=0.0)
    a_acc = torch.where(torch.rand((m, k), generator=gen) < 0.5, 124, -124).to(torch.int8)
    b_acc = torch.full((k, n), -125, dtype=torch.int8)
    b_acc[0, 0] = -128
    b[:, 0, 0] = 0
    _check(*(t.to(device) for t in (a, b, _scale(gen), a_acc, b_acc)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [33, 290])
def test_chunked_equals_whole(gen, device, k):
    T, batch, m, n = 7, (2,), 13, 6
    a = _spikes(gen, T, batch, m, k, group_dim=-2).to(device)
    b = _spikes(gen, T, batch, n, k, group_dim=-2).to(device).transpose(-1, -2)
    scale = _scale(gen, device)
    whole = spikekernels.spike_matmul(a, b, scale)
    outs, a_acc, b_acc = [], None, None
    for a_c, b_c in zip(a.split([3, 1, 3]), b.split([3, 1, 3]), strict=True):
        out, a_acc, b_acc = spikekernels.spike_matmul(a_c, b_c, scale, a_acc, b_acc)
        outs.append(out)
    _assert_same((torch.cat(outs), a_acc, b_acc), [t.cpu() for t in whole])


@pytest.mark.parametrize("device", DEVICES)
def test_module_owns_its_running_counts(gen, device):
    """``nn.SpikeMatmul`` keeps the running counts between calls: chunks equal the op on the
    whole train (bit for bit) and the reference, and ``reset()`` starts a new input."""
    T, batch, m, k, n = 6, (2,), 9, 40, 5
    a = _spikes(gen, T, batch, m, k, group_dim=-2).to(device)
    b = _spikes(gen, T, batch, k, n, group_dim=-1).to(device)
    scale = _scale(gen, device)
    module = SpikeMatmul(scale)
    first = torch.cat([module(a_c, b_c) for a_c, b_c in zip(a.split(4), b.split(4), strict=True)])
    want = reference.spike_matmul(a.cpu(), b.cpu(), scale.cpu())
    _assert_same((first, module.a_acc, module.b_acc), want)
    module.reset()
    assert module.a_acc is None and module.b_acc is None
    assert_same_bits(module(a, b), want[0], "out after reset")


@pytest.mark.parametrize("device", DEVICES)
def test_running_module_product_and_reset(gen, device):
    """``RunningSpikeMatmul`` emits ``A_t @ B_t`` of the running counts (checked against an
    int64 matmul of the cumulative sums), chunk by chunk, and ``reset()`` clears all of its
    state, the running product included: the next input starts from zero, as in a fresh
    module."""
    T, batch, m, k, n = 6, (2,), 5, 24, 3
    a = _spikes(gen, T, batch, m, k, group_dim=-2).to(device)
    b = _spikes(gen, T, batch, k, n, group_dim=-1).to(device)
    want = torch.cumsum(a.cpu().long(), 0) @ torch.cumsum(b.cpu().long(), 0)
    module = RunningSpikeMatmul().to(device)
    first = torch.cat([module(a_c, b_c) for a_c, b_c in zip(a.split(4), b.split(4), strict=True)])
    assert first.dtype == torch.int32 and torch.equal(first.cpu().long(), want)
    module.reset()
    assert module.a_acc is None and module.b_acc is None and module.product is None
    a2 = _spikes(gen, T, batch, m, k, group_dim=-2).to(device)
    b2 = _spikes(gen, T, batch, k, n, group_dim=-1).to(device)
    want2 = torch.cumsum(a2.cpu().long(), 0) @ torch.cumsum(b2.cpu().long(), 0)
    assert torch.equal(module(a2, b2).cpu().long(), want2)
    assert_same_bits(module.product, RunningSpikeMatmul().to(device)(a2, b2)[-1], "product")


@pytest.mark.parametrize("device", DEVICES)
def test_settled_run_gives_quantized_product(gen, device):
    """ST-BIF trains fed once (SPEC.md §2) settle on the quantizer's integers; with scale 1
    the outputs (exact integers) sum to the product of those integers (SPEC.md §5)."""
    n_min, p_max = reference.level_bounds(16, True)
    T, theta = p_max - n_min + 2, torch.ones(1, device=device)
    trains = []
    for shape in [(2, 9, 16), (2, 11, 16)]:
        x = torch.zeros((T, *shape), device=device)
        x[0] = torch.randn(shape, generator=gen).to(device) * 4
        trains.append(spikekernels.st_bif(x, theta, n_min, p_max))
    (q, _, q_int), (k, _, k_int) = trains
    out, q_acc, k_acc = spikekernels.spike_matmul(q, k.transpose(-1, -2), theta)
    want = (q_int.float() @ k_int.float().transpose(-1, -2)).cpu()
    assert torch.equal(out.sum(0).cpu(), want)
    assert torch.equal(q_acc, q_int) and torch.equal(k_acc, k_int.transpose(-1, -2))
    assert not out[-1].any()


@pytest.mark.parametrize("device", DEVICES)
def test_single_step_and_state_not_aliased(gen, device):
    a = _spikes(gen, 1, (3,), 8, 32, group_dim=-2).to(device)
    b = _spikes(gen, 1, (3,), 32, 4, group_dim=-1).to(device)
    a_acc, b_acc = _counts(gen, (3, 8, 32)).to(device), _counts(gen, (3, 32, 4)).to(device)
    a_keep, b_keep = a_acc.clone(), b_acc.clone()
    _, a_out, b_out = _check(a, b, _scale(gen, device), a_acc, b_acc)
    assert torch.equal(a_acc, a_keep) and torch.equal(b_acc, b_keep)
    assert a_out.data_ptr() != a_acc.data_ptr() and b_out.data_ptr() != b_acc.data_ptr()
    assert a_out.is_contiguous() and b_out.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [16, 270], ids=["fused", "split-k"])
@pytest.mark.parametrize("incoming", [False, True], ids=["fresh", "with-counts"])
def test_every_element_written(gen, device, k, incoming, poisoned_allocations):
    """Every fresh output is allocated poisoned (NaN floats, 77 in the int8 counts): an
    element of ``out``, ``a_acc`` or ``b_acc`` the op leaves unwritten differs from the
    reference. Several row and column tiles, neither a multiple of the tile (the outgoing
    counts are written by one program per row or column block); small K (the fused kernel)
    and large K (split-K); fresh and incoming counts. A negative scale makes a silent step
    -0.0 everywhere, which the bitwise comparison also checks."""
    T, batch, m, n = 2, (2,), 70, 67
    a = _spikes(gen, T, batch, m, k, group_dim=-2).to(device)
    b = _spikes(gen, T, batch, k, n, group_dim=-1).to(device)
    a[1] = 0
    b[1] = 0
    scale = -_scale(gen, device)
    counts = [_counts(gen, (*batch, m, k)), _counts(gen, (*batch, k, n))] if incoming else []
    out, _, _ = _check(a, b, scale, *(c.to(device) for c in counts))
    assert torch.signbit(out[1]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_scale_dtypes(gen, device, dtype):
    a = _spikes(gen, 2, (), 5, 8, group_dim=-2).to(device)
    b = _spikes(gen, 2, (), 8, 3, group_dim=-1).to(device)
    _check(a, b, torch.tensor([0.123456789], dtype=dtype, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("batch", "m", "k", "n"), [((2,), 0, 4, 3), ((2,), 3, 4, 0), ((2,), 3, 0, 5), ((0,), 3, 4, 5)]
)
def test_empty_dims(gen, device, batch, m, k, n):
    """An empty output still carries the other operand's counts forward."""
    a = _spikes(gen, 2, batch, m, k, group_dim=-2).to(device)
    b = _spikes(gen, 2, batch, k, n, group_dim=-1).to(device)
    _check(a, b, _scale(gen, device), _counts(gen, (*batch, m, k)).to(device))


def test_dense_path_matches_reference(gen, monkeypatch):
    """The CPU runtime path (batched float matmuls) in its float32, float64 and chunked forms,
    whichever path the op itself dispatches to here."""
    T, batch, m, k, n = 9, (2,), 12, 20, 7
    a = _spikes(gen, T, batch, m, k, group_dim=-2)
    b = _spikes(gen, T, batch, n, k, group_dim=-2).transpose(-1, -2)
    args = (a, b, _scale(gen), _counts(gen, (*batch, m, k)), _counts(gen, (*batch, k, n)))
    want = reference.spike_matmul(*args)
    _assert_same(spike_matmul_torch(*args), want)
    monkeypatch.setattr(ops_spike_matmul, "_FLOAT32_EXACT_MAX_K", 8)
    monkeypatch.setattr(ops_spike_matmul, "_DENSE_CHUNK_ELEMENTS", 4000)
    _assert_same(spike_matmul_torch(*args), want)


def _zero_counts(*shape):
    return torch.zeros(shape, dtype=torch.int8)


def _good(gen):
    a = _spikes(gen, 2, (3,), 4, 5, group_dim=-2)
    b = _spikes(gen, 2, (3,), 5, 6, group_dim=-1)
    return {"a": a, "b": b, "scale": _scale(gen), "a_acc": None, "b_acc": None}


BAD_INPUTS = [
    ("a float", lambda d: d.update(a=d["a"].float()), TypeError, "a must have dtype"),
    ("b int32", lambda d: d.update(b=d["b"].int()), TypeError, "b must have dtype"),
    ("a not a tensor", lambda d: d.update(a=[1, 0]), TypeError, "a must be a torch.Tensor"),
    ("a rank 2", lambda d: d.update(a=d["a"][:, 0, 0]), ValueError, "a must have at least 3"),
    ("b rank 2", lambda d: d.update(b=d["b"][0, 0]), ValueError, "b must have at least 3"),
    ("T == 0", lambda d: d.update(a=d["a"][:0], b=d["b"][:0]), ValueError, "T == 0"),
    ("T differs", lambda d: d.update(b=d["b"][:1]), ValueError, "time steps"),
    ("batch differs", lambda d: d.update(b=d["b"][:, :2]), ValueError, "batch dims"),
    ("batch rank differs", lambda d: d.update(b=d["b"][:, 0]), ValueError, "batch dims"),
    ("K differs", lambda d: d.update(b=d["b"][:, :, :4]), ValueError, "inner dims"),
    ("scale 2 elements", lambda d: d.update(scale=torch.ones(2)), ValueError, "scale must"),
    ("scale int", lambda d: d.update(scale=torch.ones(1, dtype=torch.int32)), TypeError, "scale"),
    ("scale float", lambda d: d.update(scale=0.5), TypeError, "scale must be a torch.Tensor"),
    (
        "a_acc shape",
        lambda d: d.update(a_acc=torch.zeros(3, 5, 4, dtype=torch.int8)),
        ValueError,
        "a_acc must have shape",
    ),
    (
        "b_acc dtype",
        lambda d: d.update(b_acc=torch.zeros(3, 5, 6, dtype=torch.int32)),
        TypeError,
        "b_acc must have dtype",
    ),
    (
        "a_acc device",
        lambda d: d.update(a_acc=torch.zeros(3, 4, 5, dtype=torch.int8, device="meta")),
        ValueError,
        "a_acc is on meta",
    ),
    ("b device", lambda d: d.update(b=d["b"].to("meta")), ValueError, "b is on meta"),
    (
        "inplace int",
        lambda d: d.update(a_acc=_zero_counts(3, 4, 5), b_acc=_zero_counts(3, 5, 6), inplace=1),
        TypeError,
        "inplace must be a bool",
    ),
    ("inplace without state", lambda d: d.update(inplace=True), ValueError, "needs a_acc"),
    (
        "inplace without b_acc",
        lambda d: d.update(a_acc=_zero_counts(3, 4, 5), inplace=True),
        ValueError,
        "inplace=True needs b_acc",
    ),
    (
        "inplace strided a_acc",
        lambda d: d.update(
            a_acc=_zero_counts(3, 5, 4).mT, b_acc=_zero_counts(3, 5, 6), inplace=True
        ),
        ValueError,
        "a_acc must be contiguous",
    ),
    (
        "inplace strided b_acc",
        lambda d: d.update(
            a_acc=_zero_counts(3, 4, 5), b_acc=_zero_counts(3, 5, 12)[..., ::2], inplace=True
        ),
        ValueError,
        "b_acc must be contiguous",
    ),
]


@pytest.mark.parametrize(
    ("change", "exc", "match"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(gen, change, exc, match, device):
    kwargs = _good(gen)
    change(kwargs)
    with pytest.raises(exc, match=match):
        call_on(device, spikekernels.spike_matmul, **kwargs)


def test_validate_catches_bad_data(gen):
    kwargs = _good(gen)
    spikekernels.spike_matmul(**kwargs, validate=True)
    bad = dict(kwargs, a=kwargs["a"].clone())
    bad["a"][1, 0, 0, 0] = 2
    with pytest.raises(ValueError, match="a must hold ternary spikes"):
        spikekernels.spike_matmul(**bad, validate=True)
    bad = dict(kwargs, b=kwargs["b"].clone())
    bad["b"][0, 2, 1, 1] = -3
    with pytest.raises(ValueError, match="b must hold ternary spikes"):
        spikekernels.spike_matmul(**bad, validate=True)
    # 127 + 1 leaves int8 (the GPU kernel would wrap).
    b = kwargs["b"].clone()
    b[:, 1, 2, 3] = 1
    b_acc = torch.zeros(3, 5, 6, dtype=torch.int8)
    b_acc[1, 2, 3] = 126
    with pytest.raises(ValueError, match="running count of b"):
        spikekernels.spike_matmul(kwargs["a"], b, kwargs["scale"], None, b_acc, validate=True)
    a = kwargs["a"].clone()
    a[:, 0, 0, 0] = -1
    a_acc = torch.full((3, 4, 5), -127, dtype=torch.int8)
    with pytest.raises(ValueError, match="running count of a"):
        spikekernels.spike_matmul(a, kwargs["b"], kwargs["scale"], a_acc, validate=True)


@pytest.mark.parametrize("validate", [False, True])
@pytest.mark.parametrize("value", [-128, -2, 2, 127])
def test_non_ternary_spike_rejected_on_cpu(gen, validate, value):
    """int8 ``abs(-128)`` is -128: a check by ``abs() <= 1`` let it through. On CPU tensors
    the check runs whether or not ``validate`` is asked for (it costs no sync there)."""
    kwargs = _good(gen)
    for name in ("a", "b"):
        bad = dict(kwargs, **{name: kwargs[name].clone()})
        bad[name].view(-1)[7] = value
        with pytest.raises(ValueError, match=f"{name} must hold ternary spikes.*{value}"):
            spikekernels.spike_matmul(**bad, validate=validate)


def test_count_overflow_is_an_error_on_cpu(gen):
    """200 steps of +1 take the running count past int8: an error on the CPU path (it used
    to return a float answer no kernel gives, with the count wrapped to -56)."""
    T = 200
    a = torch.ones(T, 1, 2, 3, dtype=torch.int8)
    b = torch.ones(T, 1, 3, 2, dtype=torch.int8)
    scale = torch.tensor([1.0])
    with pytest.raises(ValueError, match=r"running count of a reaches \[1, 200\]"):
        spikekernels.spike_matmul(a, b, scale)
    # Up to 127 is fine, and exact.
    got = spikekernels.spike_matmul(a[:127], b[:127], scale)
    _assert_same(got, reference.spike_matmul(a[:127], b[:127], scale))
    assert int(got[1].max()) == 127


@pytest.mark.parametrize("validate", [False, True])
@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf"), -float("inf")])
def test_bad_scale_rejected_on_cpu(gen, validate, value):
    kwargs = _good(gen)
    kwargs["scale"] = torch.tensor([value])
    with pytest.raises(ValueError, match="scale must be finite and nonzero"):
        spikekernels.spike_matmul(**kwargs, validate=validate)


def test_reference_uses_no_integer_matmul(gen, monkeypatch):
    """CUDA has no integer matmul (``baddbmm_cuda not implemented for 'Int'``): the oracle
    must multiply the counts in float64 (exact), so it runs on every device."""
    real_matmul = torch.matmul

    def float_only_matmul(x, y, *args, **kwargs):
        assert x.is_floating_point() and y.is_floating_point(), (
            f"integer matmul ({x.dtype} @ {y.dtype}) does not exist on CUDA"
        )
        return real_matmul(x, y, *args, **kwargs)

    kwargs = _good(gen)
    kwargs["a_acc"] = _counts(gen, kwargs["a"].shape[1:], bound=120)
    want = spike_matmul_torch(**kwargs)
    monkeypatch.setattr(torch, "matmul", float_only_matmul)
    got = reference.spike_matmul(**kwargs)
    monkeypatch.undo()
    _assert_same(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(gen, device):
    a = _spikes(gen, 3, (2,), 5, 8, group_dim=-2).to(device)
    keys = _spikes(gen, 3, (2,), 6, 8, group_dim=-2).to(device)
    scale = _scale(gen, device)
    b_acc = _counts(gen, (2, 8, 6)).to(device)
    for args in [
        (a, keys.transpose(-1, -2), scale),
        (a, keys.transpose(-1, -2), scale, None, b_acc),
    ]:
        torch.library.opcheck(torch.ops.spikekernels.spike_matmul.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(gen, device):
    """Compiled == eager for the op's outputs, bit for bit (the op is exact). What Inductor
    computes around the op is compared as values (``assert_close``): Inductor's Triton code
    lowers ``-x`` to ``0 - x``, which turns -0.0 into +0.0 where eager gives -0.0. That, not
    the op, made 134 of 180 elements (exactly the zeros of the product) differ in sign on the
    first GPU run, when this test compared the bits of ``-out``."""
    a = _spikes(gen, 3, (2,), 5, 8, group_dim=-2).to(device)
    keys = _spikes(gen, 3, (2,), 6, 8, group_dim=-2).to(device)
    scale = _scale(gen, device)

    def scores(q, k, scale):
        out, q_acc, k_acc = spikekernels.spike_matmul(q, k.transpose(-1, -2), scale * 0.5)
        return out, -out, q_acc, k_acc

    got = torch.compile(scores, fullgraph=True)(a, keys, scale)
    want = scores(a, keys, scale)
    _assert_same((got[0], got[2], got[3]), [want[i].cpu() for i in (0, 2, 3)])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# inplace=True: the new counts written into the given tensors (ops._inplace)

# (batch, M, K, N, b a transposed view): the fused kernel with two row tiles (B's columns
# are read by both: a write-back before the other's read would show) and one column tile, the
# scores' layout; the split-K path (running_count_kernel writes the counts in place).
INPLACE_CASES = {
    "fused": ((2,), 70, 20, 9, True),
    "split-k": ((1, 2), 9, 70, 5, False),
}


def _inplace_case(gen, T, path, device="cpu"):
    """Spikes ``a``, ``b``, a scale and nonzero incoming counts ``(a_acc, b_acc)``."""
    batch, m, k, n, transposed = INPLACE_CASES[path]
    a = _spikes(gen, T, batch, m, k, group_dim=-2)
    if transposed:
        b = _spikes(gen, T, batch, n, k, group_dim=-2).transpose(-1, -2)
    else:
        b = _spikes(gen, T, batch, k, n, group_dim=-1)
    state = (_counts(gen, (*batch, m, k)), _counts(gen, (*batch, k, n)))
    return a.to(device), b.to(device), _scale(gen, device), tuple(c.to(device) for c in state)


def _run_inplace(a, b, scale, state):
    """The op with ``inplace=True`` on the ``guarded`` counts, checked in place."""
    call = lambda: spikekernels.spike_matmul(a, b, scale, *state, inplace=True)  # noqa: E731
    return called_in_place(call, ("a_acc", "b_acc"), state)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("poisoned", [False, True])
@pytest.mark.parametrize("path", INPLACE_CASES)
def test_inplace_chunks_equal_whole(gen, path, poisoned, backend, request):
    """Chunks of 4, 1 and 4 steps from nonzero counts, the counts fed back in place, give
    the whole run's bits (the whole run on fresh outputs, inplace=False)."""
    if poisoned:
        request.getfixturevalue("poisoned_allocations")
    a, b, scale, state = _inplace_case(gen, 9, path)
    with force_backend(backend):
        whole = spikekernels.spike_matmul(a, b, scale, *state)
        given = guarded(state)
        outs, t0 = [], 0
        for n in (4, 1, 4):
            outs.append(_run_inplace(a[t0 : t0 + n], b[t0 : t0 + n], scale, given)[0])
            t0 += n
    _assert_same((torch.cat(outs), *given), whole)
    assert not torch.equal(given[0], state[0]) and not torch.equal(given[1], state[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", INPLACE_CASES)
def test_inplace_single_step(gen, path, device):
    a, b, scale, state = _inplace_case(gen, 1, path, device)
    want = spikekernels.spike_matmul(a, b, scale, *state)
    _assert_same(_run_inplace(a, b, scale, guarded(state)), want)


def test_inplace_on_meta_tensors(gen):
    """Shapes only (meta tensors): the in-place counts are not taken for an alias of the
    inputs (every meta tensor's address is 0)."""
    args = {k: v.to("meta") for k, v in _good(gen).items() if v is not None}
    state = [
        torch.empty(shape, dtype=torch.int8, device="meta") for shape in [(3, 4, 5), (3, 5, 6)]
    ]
    out, a_acc, b_acc = spikekernels.spike_matmul(
        **args, a_acc=state[0], b_acc=state[1], inplace=True
    )
    assert out.shape == (2, 3, 4, 6) and out.is_meta and out.dtype == torch.float32
    assert a_acc is state[0] and b_acc is state[1]


@pytest.mark.parametrize("other", ["a", "b", "scale", "b_acc"])
def test_inplace_state_sharing_an_input_is_rejected(gen, other):
    """``a_acc`` inside the storage of an input the kernels read (or of ``b_acc``), refused
    by name; the rejected call writes nothing (a run would: the spikes that stay random move
    at least one of the counts)."""
    args = _good(gen)
    buffer = torch.zeros(240, dtype=torch.int8)
    a_acc = buffer[:60].view(3, 4, 5)  # contiguous, but inside the other
    b_acc = _counts(gen, (3, 5, 6))
    if other == "b_acc":
        b_acc = buffer[60:150].view(3, 5, 6).copy_(b_acc)
        a_acc = buffer[100:160].view(3, 4, 5)  # overlaps b_acc
    else:
        given = args[other]
        part = buffer[: given.numel() * given.element_size()]
        args[other] = part.view(given.dtype).view(given.shape)
    before = buffer.clone(), b_acc.clone()
    with pytest.raises(ValueError, match="a_acc shares memory"):
        spikekernels.spike_matmul(**dict(args, a_acc=a_acc, b_acc=b_acc), inplace=True)
    assert torch.equal(buffer, before[0]), "a rejected call must not write"
    assert torch.equal(b_acc, before[1]), "a rejected call must not write"


@pytest.mark.parametrize("path", INPLACE_CASES)
def test_inplace_opcheck(gen, path):
    a, b, scale, state = _inplace_case(gen, 3, path)
    torch.library.opcheck(torch.ops.spikekernels.spike_matmul.default, (a, b, scale, *state, True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", INPLACE_CASES)
def test_torch_compile_fullgraph_inplace(gen, path, device):
    """``inplace=True`` under torch.compile (the mutation functionalized, then written back),
    on both Triton paths: the op's output and the counts left in the given tensors equal the
    eager call's, bit for bit."""
    a, b, scale, state0 = _inplace_case(gen, 3, path, device)
    want = spikekernels.spike_matmul(a, b, scale, *state0)
    state = tuple(t.clone() for t in state0)

    def product(a, b, scale, a_acc, b_acc):
        return spikekernels.spike_matmul(a, b, scale, a_acc, b_acc, inplace=True)[0]

    out = torch.compile(product, fullgraph=True)(a, b, scale, *state)
    _assert_same((out, *state), want)


@pytest.mark.cuda
@pytest.mark.parametrize("k", [64, 197], ids=["scores-fused", "context-split"])
def test_cuda_attention_size(gen, k):
    """ViT-S attention (2 images x 6 heads x 197 tokens, head dim 64) with incoming counts:
    scores ``Q K^T`` (K = 64: the fused kernel, b a transposed view, rows and columns not
    multiples of the tile) and context ``P V`` (K = 197 keys: running counts + split-K),
    bit for bit against the reference."""
    T, batch, n_tok, d = 4, (2, 6), 197, 64
    a = _spikes(gen, T, batch, n_tok, k, group_dim=-2)
    if k == d:
        b = _spikes(gen, T, batch, n_tok, d, group_dim=-2).transpose(-1, -2)
    else:
        b = _spikes(gen, T, batch, k, d, group_dim=-1)
    scale = _scale(gen)
    a_acc, b_acc = _counts(gen, a.shape[1:]), _counts(gen, b.shape[1:])
    got = spikekernels.spike_matmul(a.cuda(), b.cuda(), scale.cuda(), a_acc.cuda(), b_acc.cuda())
    _assert_same(got, reference.spike_matmul(a, b, scale, a_acc, b_acc))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_cuda_second_device(gen):
    """Triton launches on the current device: tensors on cuda:1 while cuda:0 is current."""
    a = _spikes(gen, 3, (2,), 70, 130, group_dim=-2)
    b = _spikes(gen, 3, (2,), 130, 9, group_dim=-1)
    scale = _scale(gen)
    with torch.cuda.device(0):
        got = spikekernels.spike_matmul(a.to("cuda:1"), b.to("cuda:1"), scale.to("cuda:1"))
    assert got[0].device == torch.device("cuda:1")
    _assert_same(got, reference.spike_matmul(a, b, scale))

"""spike_softmax (SPEC.md §3): the C++/CUDA op against a float64 per-step reference.

Tolerance, flash-attention style: on every element the op's error against the float64
reference must be within 2x of the error the float32 per-step PyTorch loop makes on the same
input (its worst element), plus 1e-6 absolute.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    CPU_PASS_ONLY,
    assert_each_same_bits,
    assert_same_bits,
    called_in_place,
    guarded,
)

import spikekernels
from spikekernels import reference
from spikekernels.nn import SpikeSoftmax
from spikekernels.ops._dispatch import force_backend
from spikekernels.ops.softmax import spike_softmax_torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
NEG_INF = float("-inf")


def _inputs(gen, T, rows, n, dtype=torch.float32, device="cpu"):
    """Attention-score-like increments: a large first step, smaller corrections after."""
    x = torch.randn((T, *rows, n), generator=gen)
    x[0] *= 4.0
    return x.to(device=device, dtype=dtype)


def _state(gen, rows, n, device="cpu"):
    """A plausible incoming state: some running sum and its softmax."""
    x_acc = torch.randn((*rows, n), generator=gen) * 3.0
    return x_acc.to(device), torch.softmax(x_acc, dim=-1).to(device)


def _abs_err(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| in float64, 0 where both are the same infinity; NaN fails loudly."""
    got = got.double().cpu()
    err = torch.where(got == want, 0.0, (got - want).abs())
    assert not err.isnan().any(), f"{int(err.isnan().sum())} NaN elements"
    return err


def _assert_matches_reference(got, x, x_acc=None, y_prev=None):
    x, x_acc, y_prev = (None if t is None else t.cpu() for t in (x, x_acc, y_prev))
    want64 = reference.spike_softmax(
        x.double(),
        None if x_acc is None else x_acc.double(),
        None if y_prev is None else y_prev.double(),
        dtype=torch.float64,
    )
    want32 = reference.spike_softmax(x, x_acc, y_prev)
    # x_acc is float32 running sums in step order (SPEC.md §3): the same bits on every path
    assert_same_bits(got[1], want32[1], "x_acc")
    for name, g, w32, w64 in zip(("out", "x_acc", "y_prev"), got, want32, want64, strict=True):
        assert g.dtype == w32.dtype, f"{name}: dtype {g.dtype} != {w32.dtype}"
        assert g.shape == w32.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w32.shape)}"
        # SPEC.md §8: 2x the float32 rule's own error, plus 4 float32 ulp of the values' size
        # (an absolute 1e-6 floor allowed 10-30x at T = 1)
        tol = 2.0 * _abs_err(w32, w64).max().item() + 4 * 2.0**-24 * w64.abs().max().item()
        err = _abs_err(g, w64)
        bad = int((err > tol).sum())
        assert bad == 0, f"{name}: {bad} elements off by more than {tol:.3g} (max {err.max():.3g})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 3, 197, 1000, 1024, 1025, 4097])
@pytest.mark.parametrize("T", [1, 16])
def test_matches_reference(gen, device, T, n):
    rows = (2, 3) if n <= 197 else (2,)
    x = _inputs(gen, T, rows, n, device=device)
    _assert_matches_reference(spikekernels.spike_softmax(x), x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [50, 128, 197])
def test_incoming_state(gen, device, n):
    x = _inputs(gen, 6, (3, 2), n, device=device)
    x_acc, y_prev = _state(gen, (3, 2), n, device)
    for acc_in, prev_in in [(x_acc, y_prev), (x_acc, None), (None, y_prev)]:
        got = spikekernels.spike_softmax(x, acc_in, prev_in)
        _assert_matches_reference(got, x, acc_in, prev_in)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [3, 128, 197, 1500])
def test_half_precision_inputs(gen, device, dtype, n):
    x = _inputs(gen, 8, (4,), n, dtype=dtype, device=device)
    got = spikekernels.spike_softmax(x)
    assert got[0].dtype == dtype
    _assert_matches_reference(got, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [7, 197, 1500])
def test_masks(gen, device, n):
    """-inf entries from the start, entries masked later, rows fully masked from the start and
    rows that become fully masked mid-run: zeros where masked, never NaN."""
    T, rows = 10, 6
    x = _inputs(gen, T, (rows,), n)
    x[:, 0].masked_fill_(torch.rand(n, generator=gen) < 0.3, NEG_INF)
    x[4:, 1].masked_fill_(torch.rand(n, generator=gen) < 0.5, NEG_INF)
    x[:, 2] = NEG_INF
    x[0, 3, : n // 2] = NEG_INF
    x[3, 3, n // 2 :] = NEG_INF
    x[5:, 4] = NEG_INF
    x = x.to(device)
    got = spikekernels.spike_softmax(x)
    _assert_matches_reference(got, x)
    out, _, y_prev = (t.cpu() for t in got)
    assert (out[:, 2] == 0).all() and (y_prev[2] == 0).all()
    assert (y_prev[3:5] == 0).all()
    torch.testing.assert_close(out[:, 4].sum(0), torch.zeros(n), rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [5, 197, 4097])
def test_chunked_equals_whole(gen, device, n):
    x = _inputs(gen, 12, (3,), n, device=device)
    whole = spikekernels.spike_softmax(x)
    outs, x_acc, y_prev = [], None, None
    for chunk in x.split([5, 1, 6]):
        out, x_acc, y_prev = spikekernels.spike_softmax(chunk, x_acc, y_prev)
        outs.append(out)
    got = (torch.cat(outs), x_acc, y_prev)
    for name, g, w in zip(("out", "x_acc", "y_prev"), got, whole, strict=True):
        assert_same_bits(g, w, name)


@pytest.mark.parametrize("device", DEVICES)
def test_state_is_fresh_and_inputs_untouched(gen, device):
    x = _inputs(gen, 4, (3,), 33, device=device)
    x_acc, y_prev = _state(gen, (3,), 33, device)
    saved = [t.clone() for t in (x, x_acc, y_prev)]
    out, acc_out, prev_out = spikekernels.spike_softmax(x, x_acc, y_prev)
    inputs = {t.data_ptr() for t in (x, x_acc, y_prev)}
    assert not inputs & {t.data_ptr() for t in (out, acc_out, prev_out)}
    for t, s in zip((x, x_acc, y_prev), saved, strict=True):
        assert torch.equal(t, s)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_empty(gen, device):
    base = _inputs(gen, 3, (40,), 5, device=device)
    x = base.transpose(1, 2)  # [3, 5, 40], rows of 40 strided
    _assert_matches_reference(spikekernels.spike_softmax(x), x.contiguous())
    empty = torch.zeros((3, 0, 7), device=device)
    out, x_acc, y_prev = spikekernels.spike_softmax(empty)
    assert out.shape == (3, 0, 7) and x_acc.shape == y_prev.shape == (0, 7)


def test_module_chunked(gen):
    x = _inputs(gen, 9, (2, 3), 50)
    module = SpikeSoftmax()
    chunks = [module(chunk) for chunk in x.split([4, 5])]
    whole = spikekernels.spike_softmax(x)
    assert torch.equal(torch.cat(chunks), whole[0])
    assert torch.equal(module.x_acc, whole[1]) and torch.equal(module.y_prev, whole[2])
    module.reset()
    assert module.x_acc is None and module.y_prev is None
    assert torch.equal(module(x), whole[0])


# ---------------------------------------------------------------------------------------------
# inplace=True: the new state copied into the given tensors (the public face's; ops._inplace)

# "cpp" is the C++ kernel (the CPU default), "torch" and "reference" the forced paths
BACKENDS = ["cpp", "torch", "reference"]
STATE_NAMES = ("x_acc", "y_prev")


def _run_inplace(x, state):
    """``spike_softmax(inplace=True)`` on the ``guarded`` state, checked in place."""
    out = called_in_place(
        lambda: spikekernels.spike_softmax(x, *state, inplace=True), STATE_NAMES, state
    )
    assert len(out) == 3 and out[0].shape == x.shape
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poisoned", [False, True])
def test_inplace_chunks_equal_whole(gen, backend, poisoned, request):
    """Chunks of 4, 1 and 4 steps from a nonzero state, fed back in place, give the whole
    run's bits (poisoned: every fresh allocation NaN, the C++ kernel's too)."""
    if poisoned:
        request.getfixturevalue("poisoned_allocations")
    x = _inputs(gen, 9, (2, 3), 37)
    x[:, 0, 1, :5] = NEG_INF  # masked entries too
    state0 = _state(gen, (2, 3), 37)
    with force_backend(backend):
        whole = spikekernels.spike_softmax(x, *state0)
        state = guarded(state0)
        parts = [_run_inplace(xs, state)[0] for xs in x.split([4, 1, 4])]
    assert_each_same_bits((torch.cat(parts), *state), whole, ("out", *STATE_NAMES))
    assert not whole[0].isnan().any() and not whole[2].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_single_step(gen, device):
    x = _inputs(gen, 1, (3, 5), 33, device=device)
    state = _state(gen, (3, 5), 33, device)
    want = spikekernels.spike_softmax(x, *state)
    assert_each_same_bits(_run_inplace(x, guarded(state)), want, ("out", *STATE_NAMES))


def test_inplace_on_meta_tensors():
    """Shapes only (meta tensors): the in-place state is not taken for an alias of ``x``
    (every meta tensor's address is 0)."""
    x = torch.empty(3, 5, 4, device="meta")
    state = [torch.empty(5, 4, device="meta") for _ in STATE_NAMES]
    out = spikekernels.spike_softmax(x, *state, inplace=True)
    assert out[0].shape == (3, 5, 4) and out[0].is_meta
    assert all(got is given for got, given in zip(out[1:], state, strict=True))


@pytest.mark.parametrize("other", ["x", "state"])
def test_inplace_state_sharing_an_input_is_rejected(other):
    """A contiguous state inside ``x``'s storage (or the other state's), refused by name;
    the rejected call writes nothing (a run would write softmaxes and sums of the buffer's
    varied values, which differ from them)."""
    buffer = torch.linspace(-1.0, 1.0, 24)
    saved = buffer.clone()
    args = dict(x=torch.linspace(-2.0, 3.0, 24).view(2, 3, 4), x_acc=torch.zeros(3, 4))
    name = "y_prev"
    if other == "x":
        args["x"] = buffer.view(2, 3, 4)
    else:
        args["x_acc"], name = buffer[:12].view(3, 4), "x_acc"
    args["y_prev"] = buffer[:12].view(3, 4)  # contiguous, but inside the other
    before = {k: v.clone() for k, v in args.items()}
    with pytest.raises(ValueError, match=f"{name} shares memory"):
        spikekernels.spike_softmax(**args, inplace=True)
    assert torch.equal(buffer, saved), "a rejected call must not write"
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{k} was written"


# (case, the call's arguments from a good x and a good state s, error type, words in the
# message): a trailing dict is keywords (inplace, the public face's alone)
BAD_INPUTS = [
    ("rank 1", lambda x, s: (x[0, 0],), ValueError, "x must"),
    ("int dtype", lambda x, s: (x.to(torch.int32),), TypeError, "x must have dtype"),
    ("float64", lambda x, s: (x.double(),), TypeError, "x must have dtype"),
    ("T == 0", lambda x, s: (x[:0],), ValueError, "T == 0"),
    ("x_acc shape", lambda x, s: (x, s[:, :-1]), ValueError, "x_acc must have shape"),
    ("x_acc dtype", lambda x, s: (x, s.half()), TypeError, "x_acc must have dtype"),
    ("y_prev shape", lambda x, s: (x, None, s[None]), ValueError, "y_prev must have shape"),
    ("y_prev dtype", lambda x, s: (x, s, s.double()), TypeError, "y_prev must have dtype"),
    ("y_prev device", lambda x, s: (x, s, s.to("meta")), ValueError, "y_prev is on meta"),
    (
        "inplace int",
        lambda x, s: (x, s, s.clone(), {"inplace": 1}),
        TypeError,
        "inplace must be a bool",
    ),
    ("inplace without state", lambda x, s: (x, {"inplace": True}), ValueError, "needs x_acc"),
    ("inplace without y_prev", lambda x, s: (x, s, {"inplace": True}), ValueError, "needs y_prev"),
    (
        "inplace strided x_acc",
        lambda x, s: (x, s.new_zeros(4, 3).t(), s.clone(), {"inplace": True}),
        ValueError,
        "x_acc must be contiguous",
    ),
    (
        "inplace strided y_prev",
        lambda x, s: (x, s, s.new_zeros(3, 8)[:, ::2], {"inplace": True}),
        ValueError,
        "y_prev must be contiguous",
    ),
]


def _bad_calls():
    """Each case on the public face and on ``spike_softmax_torch`` (which has the op's
    schema: no keywords)."""
    for case, make, error, words in BAD_INPUTS:
        for op, name in ((spikekernels.spike_softmax, "op"), (spike_softmax_torch, "torch")):
            if name == "op" or not case.startswith("inplace"):
                yield pytest.param(op, make, error, words, id=f"{case}-{name}")


@pytest.mark.parametrize("op, make, error, words", list(_bad_calls()))
def test_bad_inputs(op, make, error, words):
    x = torch.randn(2, 3, 4)
    args = make(x, torch.zeros(3, 4))
    *args, kwargs = args if isinstance(args[-1], dict) else (*args, {})
    with pytest.raises(error, match=words):
        op(*args, **kwargs)


def test_cpu_result_independent_of_alignment(gen):
    """The CPU kernel sums in fixed lanes: where a row sits in memory changes nothing."""
    x = _inputs(gen, 4, (5,), 67)
    shifted = torch.empty(x.numel() + 3)[3:].view(x.shape).copy_(x)
    for a, b in zip(
        spikekernels.spike_softmax(x), spikekernels.spike_softmax(shifted), strict=True
    ):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_unaligned_rows(gen, dtype):
    """Rows of 128 take 16-byte packs when aligned; a tensor starting one element off takes
    the scalar path (a different summation order, so not bit-identical) and is as accurate."""
    x = _inputs(gen, 5, (6,), 128, dtype=dtype, device="cuda")
    storage = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
    shifted = storage[1:].view(x.shape).copy_(x)
    x_acc, y_prev = _state(gen, (6,), 128, "cuda")
    aligned = spikekernels.spike_softmax(x, x_acc, y_prev)
    unaligned = spikekernels.spike_softmax(shifted, x_acc, y_prev)
    _assert_matches_reference(aligned, x, x_acc, y_prev)
    _assert_matches_reference(unaligned, x, x_acc, y_prev)


@pytest.mark.cuda
def test_cuda_state_on_another_device():
    x = torch.randn(2, 3, 4, device="cuda")
    with pytest.raises(ValueError, match="x_acc is on cpu"):
        spikekernels.spike_softmax(x, torch.zeros(3, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(gen, device):
    op = torch.ops.spikekernels.spike_softmax.default
    x = _inputs(gen, 3, (2,), 19, device=device)
    x_acc, y_prev = _state(gen, (2,), 19, device)
    torch.library.opcheck(op, (x,))
    torch.library.opcheck(op, (x.half(), x_acc, y_prev))
    torch.library.opcheck(op, (x, None, y_prev))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_fails_loudly(gen, device):
    """Inference only: the compiled kernels' outputs of an input that requires grad have a
    backward that raises, rather than the dispatcher's warning and a ``grad`` left None."""
    x = _inputs(gen, 3, (2,), 19, device=device).requires_grad_()
    out = torch.ops.spikekernels.spike_softmax(x)[0]
    with pytest.raises(RuntimeError, match="spike_softmax has no backward"):
        out.sum().backward()
    with torch.no_grad():
        assert not torch.ops.spikekernels.spike_softmax(x)[0].requires_grad


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(gen, backend):
    """Compiled outputs meet the op's contract (within 2x the float32 error against float64);
    the float code around the op is compared as values, since Inductor may reorder it."""
    x = _inputs(gen, 4, (3,), 23)

    def softmax_then_scale(x):
        out, x_acc, y_prev = spikekernels.spike_softmax(x)
        return out, x_acc, y_prev, out * 2.0

    got = torch.compile(softmax_then_scale, fullgraph=True, backend=backend)(x)
    want = softmax_then_scale(x)
    _assert_matches_reference(got[:3], x)
    torch.testing.assert_close(got[3], want[3], rtol=2**-22, atol=1e-7)


def test_torch_compile_fullgraph_inplace(gen):
    """``inplace=True`` under torch.compile (the face's copy into the given state traced):
    the given tensors hold the new state, within the op's contract from the incoming state."""
    x = _inputs(gen, 4, (3,), 23)
    state0 = _state(gen, (3,), 23)
    state = tuple(t.clone() for t in state0)

    def softmax(x, x_acc, y_prev):
        return spikekernels.spike_softmax(x, x_acc, y_prev, inplace=True)[0]

    out = torch.compile(softmax, fullgraph=True)(x, *state)
    _assert_matches_reference((out, *state), x, *state0)


@pytest.mark.parametrize("n", [1, 5, 197])
@pytest.mark.parametrize("with_state", [False, True])
def test_torch_path_matches_oracle(gen, n, with_state):
    """The PyTorch path (forced here; the path where no compiled kernel exists) is its own
    code, distinct from the oracle: within 2x of the float32 error, masked rows included, and
    chunked time equals whole bit for bit."""
    from spikekernels.ops._dispatch import force_backend

    x = _inputs(gen, 5, (2, 3), n)
    x[:, 0, 1] = NEG_INF
    state = _state(gen, (2, 3), n) if with_state else (None, None)
    with force_backend("torch"):
        got = spikekernels.spike_softmax(x, *state)
        first = spikekernels.spike_softmax(x[:2], *state)
        second = spikekernels.spike_softmax(x[2:], first[1], first[2])
    _assert_matches_reference(got, x, *state)
    assert not got[0].isnan().any(), "a fully masked row must give zeros, not NaN"
    assert_same_bits(torch.cat([first[0], second[0]]), got[0], "out")
    assert_same_bits(second[1], got[1], "x_acc")
    assert_same_bits(second[2], got[2], "y_prev")


@CPU_PASS_ONLY
def test_cpu_default_runs_the_cpp_kernel(gen, monkeypatch):
    """On a CPU tensor, by default, the op runs the C++ kernel (as documented), never the
    slower PyTorch path: the PyTorch path made to fail is not called, and the result is the
    C++ op's, bit for bit."""
    from spikekernels._extension import HAS_EXTENSION
    from spikekernels.ops import softmax

    if not HAS_EXTENSION:
        pytest.skip("the C++ extension is not built: the PyTorch path is the CPU default")

    def fail(*args, **kwargs):
        raise AssertionError("spike_softmax_torch ran on CPU with the extension present")

    monkeypatch.setattr(softmax, "spike_softmax_torch", fail)
    x = _inputs(gen, 3, (4,), 33)
    x_acc, y_prev = _state(gen, (4,), 33)
    got = spikekernels.spike_softmax(x, x_acc, y_prev)
    want = torch.ops.spikekernels.spike_softmax(x, x_acc, y_prev)
    for name, g, w in zip(("out", "x_acc", "y_prev"), got, want, strict=True):
        assert_same_bits(g, w, name)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_forced_backend_runs(gen, monkeypatch, backend):
    """force_backend reaches the softmax as every other op: "torch" runs the PyTorch path and
    "reference" the oracle, never the compiled kernel (the reference runner's baseline)."""
    from spikekernels import reference as oracle
    from spikekernels.ops import softmax
    from spikekernels.ops._dispatch import force_backend

    calls = []
    target = (softmax, "spike_softmax_torch") if backend == "torch" else (oracle, "spike_softmax")
    real = getattr(*target)
    monkeypatch.setattr(*target, lambda *a, **k: calls.append(1) or real(*a, **k))
    x = _inputs(gen, 3, (2,), 9)
    with force_backend(backend):
        got = spikekernels.spike_softmax(x)
    assert calls, f"force_backend({backend!r}) did not run its implementation"
    _assert_matches_reference(got, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 67, 1025])
def test_every_output_element_is_written(gen, device, n, poisoned_allocations):
    """Poisoned allocations on every path: the C++/CUDA kernels allocate with at::empty,
    which ``SPIKEKERNELS_POISON=1`` fills with NaN; an element they skip fails the check."""
    x = _inputs(gen, 3, (4,), n, device=device)
    x_acc, y_prev = _state(gen, (4,), n, device)
    _assert_matches_reference(spikekernels.spike_softmax(x, x_acc, y_prev), x, x_acc, y_prev)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("n", [5, 67, 1025])
def test_nan_rows_stay_nan(gen, device, backend, n):
    """A row with a NaN entry gives NaN, as the reference does, also when its other entries
    are -inf: a NaN must not pass for a fully masked row (zeros), which the row max (it skips
    NaN) used to make it. Masked and finite rows beside it are unaffected."""
    from spikekernels.ops._dispatch import force_backend

    x = _inputs(gen, 2, (5,), n).to(device)
    x[0, 0] = float("nan")  # all NaN
    x[0, 1] = NEG_INF
    x[0, 1, n // 2] = float("nan")  # NaN among -inf
    x[0, 2, 0] = float("nan")  # NaN among finite values
    x[:, 3] = NEG_INF  # masked at every step
    with force_backend(backend):
        out, x_acc, y_prev = spikekernels.spike_softmax(x)
    assert reference.spike_softmax(x.cpu())[0][:, :3].isnan().all(), "the oracle's NaN rows"
    for t in range(2):
        assert out[t, :3].isnan().all(), f"step {t}: a NaN row gave numbers"
        assert torch.equal(out[t, 3].cpu(), torch.zeros(n)), f"step {t}: the masked row"
    assert y_prev[:3].isnan().all() and torch.equal(y_prev[3].cpu(), torch.zeros(n))
    _assert_matches_reference((out[:, 4:], x_acc[4:], y_prev[4:]), x[:, 4:])

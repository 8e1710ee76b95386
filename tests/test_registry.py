"""ops._registry.call_op: plain eager calls run the op's body directly, everything else goes
through ``torch.ops.spikekernels.*``, and both give the same bits and the same in-place writes."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from conftest import DEVICES
from torch._subclasses.fake_tensor import FakeTensorMode

from spikekernels import ops
from spikekernels.ops import _registry


@pytest.fixture
def counted_st_bif(monkeypatch):
    """How many times ``call_op`` ran st_bif's body directly (the dispatcher's copy of the
    body is registered separately, so it does not count)."""
    body, mutated = _registry._BODIES["st_bif"]
    calls = []

    def counting(*args):
        calls.append(1)
        return body(*args)

    monkeypatch.setitem(_registry._BODIES, "st_bif", (counting, mutated))
    return calls


def _st_bif_args(gen, device="cpu", T=3, n=37):
    x = (torch.randn(T, 2, n, generator=gen) * 1.5).to(device)
    theta = torch.tensor([0.5], device=device)
    active = torch.zeros(T, 2, dtype=torch.int32, device=device)
    return x, theta, -8, 7, None, None, False, active


def test_every_registered_op_has_a_body():
    names = {"st_bif", "target_spikes", "spike_linear", "spike_linear_neuron", "spike_matmul"}
    names |= {"spike_layernorm", "spike_layernorm_neuron", "exact_linear", "exact_context"}
    names |= {"exact_layernorm_neuron", "exact_residual_add", "exact_attention_probs"}
    names |= {"exact_attention"}
    assert names <= set(_registry._BODIES)
    for name in _registry._BODIES:
        assert hasattr(torch.ops.spikekernels, name), name


def test_plain_eager_runs_the_body_directly(gen, counted_st_bif):
    ops.st_bif(*_st_bif_args(gen)[:4])
    assert counted_st_bif == [1]


@pytest.mark.parametrize("device", DEVICES)
def test_direct_equals_dispatcher(gen, device, counted_st_bif):
    args = _st_bif_args(gen, device)
    x, theta, n_min, p_max, _, _, _, active = args
    active_op = active.clone()
    want = torch.ops.spikekernels.st_bif(x, theta, n_min, p_max, None, None, False, active_op)
    assert counted_st_bif == []
    version = active._version
    got = ops.st_bif(x, theta, n_min, p_max, active=active)
    assert counted_st_bif == [1]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)
    assert torch.equal(active, active_op) and bool(active.any())
    assert active._version > version, "an in-place write must bump the version counter"


def test_dispatcher_bumps_what_it_writes_and_leaves_an_unset_write_alone(gen):
    """Through ``torch.ops``, with autograd recording (the ADInplaceOrView kernel runs): a
    mutated argument given by position or keyword bumps its version, and one left unset, which
    the dispatcher drops, is skipped (torch 2.11's own kernel raised an IndexError there)."""
    x, theta, n_min, p_max, *_, active = _st_bif_args(gen)
    op = torch.ops.spikekernels.st_bif
    spikes, _, count = op(x.requires_grad_(), theta, n_min, p_max)
    assert torch.equal(count, spikes.sum(0, dtype=torch.int8))
    version = active._version
    op(x, theta, n_min, p_max, active=active)
    assert active._version > version
    version = active._version
    op(x, theta, n_min, p_max, None, None, False, active)
    assert active._version > version and bool(active.any())


def test_inference_mode(gen, counted_st_bif):
    """Inference tensors have no version counter: the direct path must not try to bump one."""
    with torch.inference_mode():
        args = _st_bif_args(gen)
        spikes, _, count = ops.st_bif(*args[:4], active=args[-1])
    assert counted_st_bif == [1]
    assert torch.equal(count, spikes.sum(0, dtype=torch.int8))


def test_autograd_inputs_use_the_dispatcher(gen, counted_st_bif):
    x, theta, n_min, p_max = _st_bif_args(gen)[:4]
    ops.st_bif(x.requires_grad_(), theta, n_min, p_max)
    assert counted_st_bif == []
    with torch.no_grad():  # no autograd needed: direct again
        ops.st_bif(x, theta, n_min, p_max)
    assert counted_st_bif == [1]


def test_fake_tensors_use_the_dispatcher(gen, counted_st_bif):
    args = _st_bif_args(gen)[:4]
    with FakeTensorMode() as mode:
        x = mode.from_tensor(args[0])
        theta = mode.from_tensor(args[1])
        spikes, v, count = ops.st_bif(x, theta, args[2], args[3])
    assert counted_st_bif == []
    assert spikes.shape == args[0].shape and spikes.dtype == torch.int8
    assert v.shape == count.shape == args[0].shape[1:]


def test_compile_uses_the_dispatcher(gen, counted_st_bif):
    args = _st_bif_args(gen)[:4]
    compiled = torch.compile(lambda x: ops.st_bif(x, *args[1:]), backend="eager", fullgraph=True)
    got = compiled(args[0])
    assert counted_st_bif == []
    want = ops.st_bif(*args)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_launcher_skips_wrap_triton_only_inside_a_direct_call():
    triton = pytest.importorskip("triton")

    @triton.jit
    def noop_kernel(x_ptr):
        pass

    seen = []

    def body(*args):
        seen.append(_registry.launcher(noop_kernel))
        raise RuntimeError("stop")

    _registry._BODIES["_test_launcher"] = (body, ())
    try:
        with pytest.raises(RuntimeError, match="stop"):
            _registry.call_op("_test_launcher", torch.zeros(1))
    finally:
        del _registry._BODIES["_test_launcher"]
    assert seen == [noop_kernel]  # direct: the kernel itself
    outside = _registry.launcher(noop_kernel)  # restored after the exception
    if _registry.TRACEABLE_TRITON:
        assert isinstance(outside, type(torch.library.wrap_triton(noop_kernel)))
        assert outside is not noop_kernel
    else:  # interpreter: a custom_op, never wrapped
        assert outside is noop_kernel


def _table_calls(module: str, table: str = "BAD_INPUTS", good: str = "_good_args") -> list:
    """The bad calls of a test module's table around one good call, as (case, arguments);
    not those that change a Python scalar (the schema casts or refuses it before any check)."""
    cases = importlib.import_module(module)
    good_args = getattr(cases, good)
    return [(case, {**good_args(), **bad}) for case, bad, *_ in getattr(cases, table)
            if all(isinstance(v, torch.Tensor) for v in bad.values())]  # fmt: skip


def _attention_calls() -> list:
    from test_running_counts import BAD_ATTENTION, attention_arguments, bad_attention_call

    gen = torch.Generator().manual_seed(0)
    return [(str(change), attention_arguments(*bad_attention_call(gen, change)))
            for change, *_ in BAD_ATTENTION]  # fmt: skip


def _matmul_calls() -> list:
    """``test_spike_matmul``'s table: each case changes one good call in place."""
    from test_spike_matmul import BAD_INPUTS, _good

    calls = []
    for case, change, *_ in BAD_INPUTS:
        call = _good(torch.Generator().manual_seed(0))
        change(call)
        if all(v is None or isinstance(v, torch.Tensor) for v in call.values()):
            calls.append((case, call))
    return calls


def _bad_calls() -> dict:
    """Each op with a table of bad inputs: the function that makes its bad calls."""
    tables = {
        "exact_linear": ("test_exact_linear",),
        "exact_layernorm_neuron": ("test_exact_layernorm_neuron",),
        "exact_residual_add": ("test_exact_residual",),
        "exact_attention_probs": ("test_exact_attention_ops", "BAD_PROBS", "_good_probs"),
        "exact_context": ("test_exact_attention_ops", "BAD_CONTEXT", "_good_context"),
        "spike_attention_probs": ("test_spike_attention", "BAD", "_good"),
        "spike_context": ("test_spike_attention", "BAD_CTX", "_good_ctx"),
        "spike_layernorm": ("test_layernorm",),
        "spike_layernorm_neuron": ("test_layernorm_neuron",),
        "st_bif": ("test_neuron",),
        "spike_linear": ("test_spike_linear",),
        "spike_linear_neuron": ("test_spike_linear_neuron",),
        "target_spikes": ("test_target_spikes",),
    }
    calls = {name: lambda table=table: _table_calls(*table) for name, table in tables.items()}
    return calls | {"exact_attention": _attention_calls, "spike_matmul": _matmul_calls}


BAD_CALLS = _bad_calls()


def test_every_registered_op_has_bad_calls():
    assert set(BAD_CALLS) == set(_registry._BODIES)


@pytest.mark.parametrize("name", BAD_CALLS)
def test_the_registered_op_runs_the_checks_its_direct_path_leaves_to_the_face(name):
    """``kernel_op``'s ``check`` runs in ``torch.ops.spikekernels.<name>`` (the faces run it
    before ``call_op``, whose direct path does not run it again): each bad input the metadata
    checks refuse, the registered op refuses with the same error."""
    body, _ = _registry._BODIES[name]
    check, op = _registry._CHECKS[name], getattr(torch.ops.spikekernels, name)
    params = inspect.signature(body).parameters
    refused = eligible = 0
    for case, call in BAD_CALLS[name]():
        args = {k: v for k, v in call.items() if k in params}
        if any(isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in args.values()):
            continue  # the dispatcher itself refuses mixed devices
        bound = inspect.signature(body).bind(**args)
        bound.apply_defaults()
        eligible += 1
        try:
            check(**{arg: bound.arguments[arg] for arg in inspect.signature(check).parameters})
        except (TypeError, ValueError) as error:
            try:
                op(**args)
            except type(error) as got:
                assert str(got) == str(error), case
                refused += 1
            else:
                pytest.fail(f"torch.ops.spikekernels.{name} took {case}")
    # most of a table's bad tensors are metadata errors (the rest are data errors)
    assert 2 * refused > eligible, f"only {refused} of {name}'s {eligible} bad inputs"


def test_a_face_checks_once_on_the_direct_path(monkeypatch):
    """The face checks, then ``call_op`` runs the body unchecked (the checks were a fourth of
    an exact op's host time, run twice)."""
    import test_exact_linear

    module = importlib.import_module("spikekernels.ops.exact_linear")
    calls = []
    real = module._check_exact_linear
    monkeypatch.setattr(module, "_check_exact_linear", lambda *a: calls.append(1) or real(*a))
    ops.exact_linear(**test_exact_linear._good_args())
    assert calls == [1]

"""ops._dispatch: ``force_backend`` pins the backend of the ops called inside its ``with``
block, nested blocks restore the outer choice, and the choice belongs to the thread that
made it."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import CPU_PASS_ONLY

from spikekernels.ops._dispatch import backend_for, force_backend

AVAILABLE = ("triton", "cpp", "torch")


def _backend() -> str:
    return backend_for(torch.zeros(1), AVAILABLE)


def test_nested_blocks_restore_the_outer_choice():
    default = _backend()
    with force_backend("reference"):
        assert _backend() == "reference"
        with force_backend("torch"):
            assert _backend() == "torch"
        with force_backend(None):
            assert _backend() == default
        assert _backend() == "reference"
    assert _backend() == default


def test_bad_name_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"), force_backend("cuda"):
        pass


def test_another_threads_block_is_its_own():
    """Two threads' blocks overlap and exit out of order: each thread sees only its own
    choice, during and after (a process-wide setting leaked into the other thread and
    ended pinned to the last restored value)."""
    default = _backend()
    entered, main_exited = threading.Event(), threading.Event()
    seen = {}

    def other():
        with force_backend("reference"):
            seen["other inside"] = _backend()
            entered.set()
            main_exited.wait(10)
        seen["other after"] = _backend()

    thread = threading.Thread(target=other)
    with force_backend("torch"):
        thread.start()
        assert entered.wait(10)
        seen["main inside"] = _backend()
    main_exited.set()
    thread.join(10)
    seen["main after"] = _backend()
    assert seen == {
        "other inside": "reference",
        "main inside": "torch",
        "other after": default,
        "main after": default,
    }


def test_compiled_code_refuses_a_forced_backend(monkeypatch):
    """The backend is chosen in the op's body, which torch.compile traces once into the
    graph: under ``force_backend`` a full graph is refused by name (compiled before or
    inside the block), and a graph with breaks runs the op eagerly, on the forced backend."""
    from spikekernels import reference
    from spikekernels.ops import st_bif

    calls = []
    oracle = reference.st_bif
    monkeypatch.setattr(reference, "st_bif", lambda *a, **k: calls.append(1) or oracle(*a, **k))
    x, theta = torch.randn(3, 2, 5), torch.tensor(0.5)
    compiled = torch.compile(lambda x: st_bif(x, theta, -4, 3)[0], fullgraph=True, backend="eager")
    want = compiled(x)  # compiled outside the block: the default backend
    for _ in range(2):  # the graph compiled outside, then one traced inside
        with force_backend("reference"), pytest.raises(Exception, match="force_backend"):
            compiled(x)
    assert torch.equal(compiled(x), want) and not calls
    partial = torch.compile(lambda x: st_bif(x, theta, -4, 3)[0], backend="eager")
    with force_backend("reference"):
        assert torch.equal(partial(x), want)
    assert calls, "the forced backend must run"


@CPU_PASS_ONLY
def test_a_forced_backend_that_cannot_run_falls_back_to_torch():
    """A forced backend the op lacks, or one that cannot run on the tensor (Triton on a CPU
    tensor without the interpreter, the extension's kernel where the op has none for the
    device), gives ``"torch"``: never another kernel family, never a failing launch."""
    x = torch.zeros(1)
    with force_backend("triton"):
        assert backend_for(x, AVAILABLE) == "torch"
        assert backend_for(x, ("triton", "torch")) == "torch"
    with force_backend("cpp"):
        assert backend_for(x, ("cpp", "torch"), cpp_devices=()) == "torch"
        assert backend_for(x, ("triton", "torch")) == "torch"  # the op has no "cpp"
    with force_backend("torch"):
        assert backend_for(x, ("triton", "cpp")) == "torch"


@CPU_PASS_ONLY
def test_an_op_under_a_forced_backend_it_cannot_run_gives_the_default_result(gen):
    """Through an op: ``force_backend("triton")`` / ``("cpp")`` on a CPU tensor without the
    interpreter runs the op (on PyTorch) and gives the default result, bit for bit."""
    from spikekernels import ops

    x, theta = torch.randn(3, 2, 8, generator=gen), torch.tensor(0.5)
    want = ops.target_spikes(x, theta, -4, 3)
    for name in ("triton", "cpp"):
        with force_backend(name):
            got = ops.target_spikes(x, theta, -4, 3)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w), name

"""``SpikingViT(..., cuda_graph=True)`` (models/chunk_graph.py): one captured chunk replayed.

On a CPU the protocol runs with ``replay_graph.ReplayGraph``, a stand-in for
``torch.cuda.CUDAGraph`` that replays as one does: the ops its capture dispatched, on the
tensors they were given, with no Python of the modules (a stand-in that ran the chunk's
function again would hide a module that replaces its state or keeps a Python counter), and
with no host read in the capture. These tests also check that the state stays the same
tensors at the same addresses, and that nothing else carries from chunk to chunk. The `cuda`
test runs a real CUDA graph.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import CPU_PASS_ONLY
from replay_graph import ReplayGraph
from test_exact import TINY, images, make_exact

from spikekernels import convert
from spikekernels.evaluate.sops import SpikeCounter
from spikekernels.nn import observer


@pytest.mark.parametrize("inference", [False, True])
def test_the_stand_in_replays_ops_not_python(inference):
    """``ReplayGraph`` as a CUDA graph: a replay runs the captured ops on the captured tensors
    (in place where they were in place, into the captured outputs otherwise; a ``to`` that
    copies is an output, also under ``inference_mode``, where it is not decomposed), no
    Python; a host read or a tensor made from host data cannot be captured."""
    mode = torch.inference_mode() if inference else contextlib.nullcontext()
    with mode:
        graph, state, calls = ReplayGraph(torch.device("cpu")), torch.zeros(3), []

        def chunk():
            calls.append(len(calls))
            state.add_(1)
            return (state.to(torch.float64) * 2)[1:]

        out = graph.capture(chunk)
        for _ in range(2):
            graph.replay()
        assert calls == [0] and state.tolist() == [3.0] * 3 and out.tolist() == [6.0] * 2
        for host in (lambda: bool(state.sum() > 0), lambda: state + torch.tensor(1.0)):
            with pytest.raises(RuntimeError, match="syncs with the host"):
                graph.capture(host)


MODES = ["exact", "float"]
# float mode's in-place kernels replay through the interpreter in the first test; elsewhere
# its graphs differ from exact mode's in the runner's Python only
MODES_CPU_FLOAT = ["exact", pytest.param("float", marks=CPU_PASS_ONLY)]


def _converted(gen, mode, batch, **config):
    """A tiny W8 QANN's SNN in ``mode`` (float mode: its dequantized weights) and ``batch``
    of its images."""
    qann = make_exact(gen, **{**TINY, "level": 16, **config})
    return convert(qann, exact=mode == "exact"), images(gen, qann, batch)


def _graph_keys(mode, chunk):
    """The graphs a schedule gets: one per size from the steady step on (in float mode the
    sizes after the first chunk's), and in float mode one for the first chunk."""
    sizes = (chunk,) if isinstance(chunk, int) else tuple(chunk)
    if mode == "exact":
        return [(False, n) for n in sorted(set(sizes))]
    return [(True, sizes[0]), *((False, n) for n in sorted(set(sizes[1:] or sizes)))]


def _addresses(graph):
    return [(name, tensor.data_ptr()) for _, name, tensor in graph.state]


def _assert_state_in_place(graph, where):
    for module, name, tensor in graph.state:
        assert getattr(module, name) is tensor, f"{type(module).__name__}.{name} was replaced"
    assert _addresses(graph) == where, "a state tensor moved"


def _check_state_at_finish(graph, where):
    """At the end of each call, before the modules get their copies: the modules still hold
    the captured state tensors, at their addresses (a replay reads those)."""
    finish = graph.finish

    def checked():
        _assert_state_in_place(graph, where)
        finish()

    graph.finish = checked


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("max_steps", "chunk"),
    [
        pytest.param(64, 4, marks=CPU_PASS_ONLY),
        (10, 3),
        # schedules: the same kernels as int chunks, so the CPU pass suffices (a minute each
        # through the interpreter)
        pytest.param(11, (5, 2), marks=CPU_PASS_ONLY),
        pytest.param(9, [2, 4, 3], marks=CPU_PASS_ONLY),
    ],
)
def test_replayed_chunks_equal_the_eager_runner(gen, mode, max_steps, chunk):
    """Bit for bit, call after call, with a partial last chunk (10 = 3 + 3 + 3 + 1), with
    schedules (11 = 5 + 2 + 2 + 2: two graphs on one state; 9 = 2 + 4 + 3), and an eager call
    in between (it resets the modules' state; the graph puts its own back). In float mode the
    first chunk (the image and the biases enter) has its own graph."""
    snn, x = _converted(gen, mode, 3)
    graph = snn.capture_chunk_graph(x, chunk, graph_type=ReplayGraph)
    where = _addresses(graph)
    assert len(where) > 10
    _check_state_at_finish(graph, where)
    for batch in (x, torch.randn(x.shape, generator=gen), x):
        want = snn(batch, max_steps, chunk, return_trace=True)
        got = snn(batch, max_steps, chunk, return_trace=True, cuda_graph=True)
        assert got[1] == want[1]
        assert torch.equal(got[0], want[0])
        assert torch.equal(got[2].logits, want[2].logits)
        assert torch.equal(got[2].sample_steps, want[2].sample_steps)
    assert list(graph.graphs) == _graph_keys(mode, chunk)
    assert snn.capture_chunk_graph(x, chunk) is graph  # kept for the shape
    other = snn.capture_chunk_graph(x.double(), chunk, graph_type=ReplayGraph)
    assert other is not graph  # another dtype is another capture
    snn.release_chunk_graphs()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        snn(x, max_steps, chunk, cuda_graph=True)


@CPU_PASS_ONLY  # the runner's step bookkeeping; the kernels are the (10, 3) case's
def test_float_chunks_before_the_steady_step_run_eagerly(gen):
    """Biases spread over the first 5 steps (``bias_steps``): a chunk's work depends on its
    step until step 5, so the chunks that start at steps 2 and 4 run eagerly (their modules
    told their step first), the one at 0 replays the first chunk's graph, and those from
    step 6 on the steady graph; the same bits as the eager runner. After the call every
    module's step counter says where the run ended, as after an eager call."""
    snn, x = _converted(gen, "float", 2)
    for module in snn.step_counters():
        if hasattr(module, "bias_steps"):
            module.bias_steps = 5
    assert snn.steady_step() == 5
    graph = snn.capture_chunk_graph(x, 2, graph_type=ReplayGraph)
    replayed = []
    for key, (captured, _) in graph.graphs.items():
        replay = captured.replay
        captured.replay = lambda key=key, replay=replay: (replayed.append(key), replay())
    want = snn(x, 11, 2, return_trace=True)
    got = snn(x, 11, 2, return_trace=True, cuda_graph=True)
    assert got[1] == want[1] == 11, "the premise: busy to the end"
    assert torch.equal(got[2].logits, want[2].logits)
    # chunks at 0, 2, 4 (eager), 6, 8 (steady), 10 (1 step: eager)
    assert replayed == [(True, 2), (False, 2), (False, 2)]
    assert {module.t0 for module in snn.step_counters()} == {11}


@pytest.mark.parametrize(
    ("max_steps", "chunk"),
    [(64, 4), (10, 3), (11, (5, 2))],
)
@pytest.mark.parametrize("mode", MODES)
# the counter's hooks and the runner's placement of its chunks: aten ops and Python, the same
# on every backend (the replayed kernels, in place, are the first test's in the interpreter)
@CPU_PASS_ONLY
def test_counted_replays_count_what_eager_chunks_count(gen, mode, max_steps, chunk):
    """``evaluate``'s SOP counter on replayed chunks: its hooks are ``replayable`` (each
    chunk's counts written at fixed addresses, placed at the chunk's steps by the runner's
    ``observe_chunks``), so a graph captured outside ``counting()`` counts every replay inside
    it, the partial last chunk and the running counts' differences included, bit for bit as
    the eager chunks do. The hooks are part of the graph's key: a graph captured with a
    counter that has since been closed is not replayed for the next one."""
    snn, x = _converted(gen, mode, 3)
    for _ in range(2):  # a second counter: its own capture, counting for itself
        counter = SpikeCounter(snn, max_steps)
        graph = snn.capture_chunk_graph(x, chunk, graph_type=ReplayGraph)
        assert len(snn._chunk_graphs) == 1, "the previous counter's graph was dropped"
        for batch in (x, torch.randn(x.shape, generator=gen)):
            counts = {}
            for cuda_graph in (False, True):
                counter.spikes.zero_()
                with counter.counting():
                    steps = snn(batch, max_steps, chunk, cuda_graph=cuda_graph)[1]
                counts[cuda_graph] = counter.spikes.clone()
            assert counts[False][:, steps - 1].sum() > 0, "the premise: counts up to the end"
            assert torch.equal(counts[True], counts[False])
        counter.close()
    assert snn.capture_chunk_graph(x, chunk, graph_type=ReplayGraph) is not graph


@CPU_PASS_ONLY  # the runner's Python, whatever the backend
def test_observe_chunks_says_where_each_chunk_falls(gen):
    """``observe_chunks``: ``call_started`` then ``chunk_done(t0, steps)`` per chunk, in
    order, the same for eager and replayed chunks (the schedule 5, 2, 2, ... with a partial
    last chunk at ``max_steps`` 10), until ``handle.remove()``."""
    qann = make_exact(gen, **TINY, level=16)
    snn = convert(qann)
    x = images(gen, qann, 2)
    calls = []

    class Observer:
        def call_started(self):
            calls.append("start")

        def chunk_done(self, t0, steps):
            calls.append((t0, steps))

    handle = snn.observe_chunks(Observer())
    snn.capture_chunk_graph(x, (5, 2), graph_type=ReplayGraph)
    seen = {}
    for cuda_graph in (False, True):
        calls.clear()
        steps = snn(x, 10, (5, 2), cuda_graph=cuda_graph)[1]
        seen[cuda_graph] = list(calls)
        ran = []  # the runner stops after the chunk in which the last sample settled
        for t0, n in [(0, 5), (5, 2), (7, 2), (9, 1)]:
            ran.append((t0, n))
            if t0 <= steps < t0 + n:
                break
        assert calls == ["start", *ran], (steps, calls)
    assert seen[True] == seen[False]
    handle.remove()
    calls.clear()
    snn(x, 10, (5, 2))
    assert calls == []


@CPU_PASS_ONLY  # other readouts and levels: the same kernels as the (10, 3) case
@pytest.mark.parametrize(
    "config", [dict(global_pool=True), dict(level=32), dict(depth=3, num_heads=4)], ids=str
)
@pytest.mark.parametrize("mode", MODES)
def test_replayed_chunks_equal_the_eager_runner_across_models(gen, mode, config):
    """Every stateful module of these models replays from its state tensors alone: the
    global-pool readout, level 32's wider counts, three blocks of four heads."""
    snn, x = _converted(gen, mode, 2, **config)
    snn.capture_chunk_graph(x, 4, graph_type=ReplayGraph)
    for batch in (x, torch.randn(x.shape, generator=gen)):
        want = snn(batch, 64, 4, return_trace=True)
        got = snn(batch, 64, 4, return_trace=True, cuda_graph=True)
        assert got[1] == want[1] > 4, "the premise: several chunks replayed"
        assert torch.equal(got[2].logits, want[2].logits)


@CPU_PASS_ONLY  # the runner's flags; the kernels' in-place state is the (10, 3) case's
def test_a_sample_settling_in_the_partial_last_chunk(gen):
    """The last chunk shorter than the graph's runs eagerly on the graph's flags: they are
    zeroed first, so a sample that settles there is seen to (stale flags of the replay before
    kept it busy)."""
    qann = make_exact(gen, **TINY, level=16)
    snn = convert(qann)
    x = images(gen, qann, 3)
    settle = int(snn(x, 64, 8, return_trace=True)[2].sample_steps.min())
    assert 1 < settle < 64
    max_steps, chunk = settle + 1, settle  # a full chunk [0, S), then [S, S + 1) eagerly
    want = snn(x, max_steps, chunk, return_trace=True)
    snn.capture_chunk_graph(x, chunk, graph_type=ReplayGraph)
    got = snn(x, max_steps, chunk, return_trace=True, cuda_graph=True)
    assert int(want[2].sample_steps.min()) == settle, "the premise: it settles in the last step"
    assert torch.equal(got[2].sample_steps, want[2].sample_steps) and got[1] == want[1]


@pytest.mark.parametrize("mode", MODES_CPU_FLOAT)
def test_outputs_do_not_alias_the_graph(gen, mode):
    """What a call returns, and the state its modules hold after it (every neuron's count),
    survive the next call's replays, as after an eager call."""
    snn, x = _converted(gen, mode, 2)
    y = torch.randn(x.shape, generator=gen)
    graph = snn.capture_chunk_graph(x, 8, graph_type=ReplayGraph)
    first, _ = snn(x, cuda_graph=True)
    held = [getattr(module, name) for module, name, _ in graph.state]
    for t, (module, name, captured) in zip(held, graph.state, strict=True):
        assert t is not captured, f"{type(module).__name__}.{name} is the graph's own tensor"
        assert torch.equal(t, captured)
    kept = [t.clone() for t in (first, *held)]
    snn(y, cuda_graph=True)
    for now, then in zip((first, *held), kept, strict=True):
        assert torch.equal(now, then)
    now = [getattr(module, name) for module, name, _ in graph.state]
    assert not all(map(torch.equal, now, held)), "the premise: the second images' state differs"


@CPU_PASS_ONLY  # the graph cache and the neurons' flags, whatever the backend
def test_capture_leaves_the_modules_free(gen):
    """Captured inside ``inference_mode`` (its state tensors are inference tensors), the
    graph is not the one a call outside it replays; and after a capture no neuron watches the
    graph's flags, so a module call with another step count runs."""
    qann = make_exact(gen, **TINY, level=16)
    snn = convert(qann)
    x = images(gen, qann, 3)
    want = snn(x, 12, 4)
    with torch.inference_mode():
        snn.capture_chunk_graph(x, 4, graph_type=ReplayGraph)
        got = snn(x, 12, 4, cuda_graph=True)
    assert got[1] == want[1] and torch.equal(got[0], want[0])
    snn.capture_chunk_graph(x, 4, graph_type=ReplayGraph)
    assert all(neuron.activity is None for neuron in snn.neurons())
    snn.reset()
    snn.step_chunk(snn.patch_embed.first_step(x), 3)  # 3 steps: not the graph's flags' 4
    got = snn(x, 12, 4, cuda_graph=True)
    assert got[1] == want[1] and torch.equal(got[0], want[0])


def test_bad_calls_are_rejected(gen):
    qann = make_exact(gen, **TINY, level=16)
    snn = convert(qann)
    x = images(gen, qann, 2)
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        snn(x, cuda_graph=1)
    with pytest.raises(ValueError, match="reference"):
        snn(x, cuda_graph=True, reference=True)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        snn(x, cuda_graph=True)
    # a forward hook would see the capture only: refused, naming the module, unless marked
    # replayable (an observer that only watches is not enough)
    for hook in (lambda *args: None, observer(lambda *args: None)):
        handle = snn.blocks[0].mlp.register_forward_hook(hook)
        with pytest.raises(ValueError, match=r"run at capture only: `blocks\.0\.mlp` has one"):
            snn.capture_chunk_graph(x, 8, graph_type=ReplayGraph)
        handle.remove()


def test_a_move_releases_the_graphs(gen):
    """A graph reads the addresses it captured: after ``.to(device)`` (there and back, to the
    same cache key) they are freed memory, so the move drops the graphs."""
    qann = make_exact(gen, **TINY, level=16)
    snn = convert(qann)
    x = images(gen, qann, 2)
    graph = snn.capture_chunk_graph(x, 4, graph_type=ReplayGraph)
    assert snn.capture_chunk_graph(x, 4) is graph
    snn.to("cpu")
    assert snn.capture_chunk_graph(x, 4, graph_type=ReplayGraph) is not graph


def test_refused_under_a_forced_backend(gen):
    """A replay runs the captured kernels whatever ``force_backend`` says, and a capture under
    it would keep its backend for later calls: refused, naming it."""
    from spikekernels.ops import force_backend

    qann = make_exact(gen, **TINY, level=16)
    snn = convert(qann)
    x = images(gen, qann, 2)
    with (
        force_backend("reference"),
        pytest.raises(ValueError, match=r"force_backend\('reference'\)"),
    ):
        snn.capture_chunk_graph(x, 4, graph_type=ReplayGraph)
    assert not snn._chunk_graphs


def test_cuda_graph_runs_on_the_models_device(monkeypatch):
    """``torch.cuda.graph``'s default capture stream is made on whichever device was current
    at the process's first capture: a model on another GPU is captured on a stream of its own
    device, with that device current, and replayed with it current. (Recorded with stand-ins
    for torch.cuda's classes: the GPU machine has one device.)"""
    from spikekernels.models.chunk_graph import CudaGraph

    calls = []

    class Stream:
        def __init__(self, device):
            self.device = device

    class Graph:
        def replay(self):
            calls.append("replay")

    @contextlib.contextmanager
    def device(d):
        calls.append(("device", d))
        yield
        calls.append("device exit")

    @contextlib.contextmanager
    def graph(cuda_graph, stream=None):
        assert isinstance(cuda_graph, Graph)
        calls.append(("capture on", None if stream is None else stream.device))
        yield

    for name, stand_in in (("CUDAGraph", Graph), ("Stream", Stream), ("device", device),
                           ("graph", graph)):  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, stand_in)
    gpu1 = torch.device("cuda", 1)
    g = CudaGraph(gpu1)
    assert g.capture(lambda: "out") == "out"
    g.replay()
    assert calls == [("device", gpu1), ("capture on", gpu1), "device exit",
                     ("device", gpu1), "replay", "device exit"]  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_graph_equals_eager_on_the_gpu(gen, mode, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    qann = make_exact(gen, **TINY, level=16).cuda()
    snn = convert(qann, exact=mode == "exact")
    for batch in (images(gen, qann, 3), images(gen, qann, 3)):
        x = batch.cuda()
        want = snn(x, 64, 4)
        got = snn(x, 64, 4, cuda_graph=True)
        assert got[1] == want[1] and torch.equal(got[0], want[0])

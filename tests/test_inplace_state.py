"""``nn.inplace_state``: every stateful module of a spiking ViT, in both modes, and every
stateful building block of ``spikekernels.nn`` keeps its state tensors from its second call
on, and ``fresh_state()`` on them is ``reset()``'s start."""

from __future__ import annotations

import copy

import pytest
import torch
from replay_graph import ReplayGraph
from test_exact import TINY, images, make_exact

from spikekernels import convert
from spikekernels.nn import RunningSpikeMatmul, SpikeLayerNorm, SpikeMatmul, SpikeSoftmax
from spikekernels.nn.inplace_state import InPlaceState


@pytest.mark.parametrize("mode", ["exact", "float"])
def test_state_keeps_its_addresses_and_fresh_state_is_a_reset(gen, mode):
    qann = make_exact(gen, **TINY, level=16)
    snn = convert(qann, exact=mode == "exact")
    patches = snn.patch_embed.first_step(images(gen, qann, 2))
    with torch.no_grad():
        snn.reset()
        assert all(t is None for _, _, t in snn.state_tensors())
        first = snn.step_chunk(patches, 3)
        state = snn.state_tensors()
        kinds = {type(module).__name__ for module, _, _ in state}
        assert len(kinds) >= 5, kinds  # the neurons and every fused layer of the mode
        where = [(t, t.data_ptr()) for _, _, t in state]
        later = snn.step_chunk(patches, 3)
        now = snn.state_tensors()
        for (module, name, t), (then, address) in zip(now, where, strict=True):
            assert t is then and t.data_ptr() == address, f"{type(module).__name__}.{name}"
        assert not torch.equal(later, first), "the premise: the second chunk moved on"
        for module in {id(m): m for m, _, _ in now}.values():
            assert isinstance(module, InPlaceState)
            module.fresh_state()
        snn.seek(0)  # float mode's step counters: the image and the biases are due again
        again = snn.step_chunk(patches, 3)
    assert torch.equal(again, first)
    assert all(t is then for (_, _, t), (then, _) in zip(snn.state_tensors(), where, strict=True))


def _ternary(gen, *shape):
    return torch.randint(-1, 2, shape, generator=gen, dtype=torch.int8)


def _standalone(gen):
    """Each stateful building block of ``spikekernels.nn`` that the converted ViT does not
    use (it runs the fused ops), with a 9-step input: ``(module, inputs [T, ...] each)``."""
    c = 12
    ln = SpikeLayerNorm(c, weight=torch.randn(c, generator=gen), bias=torch.randn(c, generator=gen))
    return {
        "SpikeLayerNorm": (ln, (torch.randn(9, 2, 3, c, generator=gen),)),
        "SpikeSoftmax": (SpikeSoftmax(), (torch.randn(9, 2, 5, 7, generator=gen),)),
        "SpikeMatmul": (
            SpikeMatmul(torch.tensor(0.25)),
            (_ternary(gen, 9, 2, 5, 6), _ternary(gen, 9, 2, 6, 7)),
        ),
        "RunningSpikeMatmul": (
            RunningSpikeMatmul(),
            (_ternary(gen, 9, 2, 5, 6), _ternary(gen, 9, 2, 6, 7)),
        ),
    }


STANDALONE = ["SpikeLayerNorm", "SpikeSoftmax", "SpikeMatmul", "RunningSpikeMatmul"]


@pytest.mark.parametrize("name", STANDALONE)
def test_standalone_modules_keep_their_state_in_place(gen, name):
    """Chunks of 4, 1 and 4 steps give the whole call's bits; from the second call on every
    state tensor is the one the first call made, at its address; ``fresh_state()`` then
    gives the first chunk's bits again on those addresses."""
    module, inputs = _standalone(gen)[name]
    with torch.no_grad():
        whole = module(*inputs)
        module.reset()
        chunks = [[x[i:j] for x in inputs] for i, j in ((0, 4), (4, 5), (5, 9))]
        parts = [module(*chunks[0])]
        state = module.state()
        where = {k: (t, t.data_ptr()) for k, t in state.items()}
        assert all(t is not None for t in state.values())
        parts += [module(*chunk) for chunk in chunks[1:]]
        for k, t in module.state().items():
            assert t is where[k][0] and t.data_ptr() == where[k][1], f"{name}.{k} moved"
        assert torch.equal(torch.cat(parts), whole)
        module.fresh_state()
        again = module(*chunks[0])
    assert torch.equal(again, parts[0])
    assert all(t is where[k][0] for k, t in module.state().items())


@pytest.mark.parametrize("name", STANDALONE)
def test_standalone_modules_replay_as_a_graph(gen, name):
    """A user's own CUDA graph over a module (``ReplayGraph``, the CPU stand-in that replays
    the captured ops on the captured tensors, no Python): captured after a first call made
    the state, each replay continues it, as eager calls do. (A module that rebound its state
    to fresh tensors would have its replays read the capture's stale input state.)"""
    module, inputs = _standalone(gen)[name]
    twin = copy.deepcopy(module)
    chunks = [[x[i : i + 3] for x in inputs] for i in (0, 3, 6)]
    with torch.no_grad():
        want = [twin(*chunk) for chunk in chunks]
        assert torch.equal(module(*chunks[0]), want[0])
        static = [x.clone() for x in chunks[1]]
        graph = ReplayGraph(torch.device("cpu"))
        out = graph.capture(lambda: module(*static))  # the stand-in runs the capture
        assert torch.equal(out, want[1])
        for x, y in zip(static, chunks[2], strict=True):
            x.copy_(y)
        graph.replay()
    assert torch.equal(out, want[2])

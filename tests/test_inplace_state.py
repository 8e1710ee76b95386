"""``nn.inplace_state``: every stateful module of a spiking ViT, in both modes, keeps its
state tensors from its second call on, and ``fresh_state()`` on them is ``reset()``'s start."""

from __future__ import annotations

import pytest
import torch
from test_exact import TINY, images, make_exact

from spikekernels import convert
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

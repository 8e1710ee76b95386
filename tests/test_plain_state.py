"""``nn.plain_state.PlainState``: the fast path stores only what nn.Module would store as a
plain attribute; parameters, buffers, modules and first assignments keep nn.Module's rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spikekernels.nn import STBIF, TargetNeuron


def test_state_is_a_plain_attribute_and_stays_out_of_the_state_dict():
    neuron = TargetNeuron(0.5, level=8, signed=True)
    count = torch.zeros(3, dtype=torch.int8)
    neuron.count = count
    neuron.count = count  # the fast path: the name is in __dict__ now
    assert neuron.count is count and neuron.__dict__["count"] is count
    assert set(neuron.state_dict()) == {"threshold"}


def test_a_buffer_a_parameter_and_a_module_keep_their_registration():
    neuron = STBIF(0.5, level=8, signed=True)
    neuron.threshold = torch.full((), 0.25)  # a buffer: nn.Module's path updates it
    assert "threshold" not in neuron.__dict__
    assert neuron.state_dict()["threshold"].item() == 0.25
    neuron.v = torch.zeros(2)  # a plain attribute first ...
    neuron.v = nn.Parameter(torch.ones(2))  # ... then a parameter: registered, not shadowed
    assert "v" not in neuron.__dict__ and "v" in dict(neuron.named_parameters())
    neuron.count = None
    neuron.count = nn.Linear(2, 2)  # a module: registered as a child
    assert "count" not in neuron.__dict__ and "count" in dict(neuron.named_children())
    neuron.last_spikes = None
    with pytest.raises(KeyError, match="already exists"):  # nn.Module's answer, not a store
        neuron.last_spikes = nn.Buffer(torch.ones(1))


def test_the_neuron_runs_the_same_after_many_fast_assignments():
    torch.manual_seed(0)
    x = torch.randn(4, 2, 5)
    neuron = TargetNeuron(0.3, level=8, signed=True)
    whole = neuron(x)
    neuron.reset()
    parts = torch.cat([neuron(x[:2]), neuron(x[2:])])
    assert torch.equal(whole, parts)

"""Forward hooks on spiking modules (``spikekernels.nn.hooks``): a hook that may replace spikes
turns off the producer's flags and counts for its reader; an ``observer`` changes nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_PASS_ONLY
from test_exact import TINY, images, make_exact
from torch import nn

import spikekernels.nn.exact_attention as exact_attention
import spikekernels.nn.exact_layers as exact_layers
from spikekernels import convert
from spikekernels.evaluate.sops import SpikeCounter
from spikekernels.nn import observer
from spikekernels.nn.hooks import SpikeTally, has_forward_hooks, hooked, tally_hooks, unless_hooked


@pytest.mark.parametrize("kind", ["forward", "pre", "global"])
def test_an_observer_is_seen_but_replaces_nothing(kind):
    """Any hook makes a module ``has_forward_hooks`` (it must be called to be seen); only one
    that is not an ``observer`` makes it ``hooked`` (flags withheld). An observer's return
    value is dropped, so it cannot replace the output."""
    module, other = nn.Linear(3, 2), nn.Linear(3, 2)
    flags = torch.ones(2, dtype=torch.int32)
    register = {
        "forward": module.register_forward_hook,
        "pre": module.register_forward_pre_hook,
        "global": nn.modules.module.register_module_forward_hook,
    }[kind]
    assert not has_forward_hooks(module) and not hooked(module, other)
    replace = (lambda m, i, o: torch.zeros_like(o)) if kind != "pre" else (lambda m, i: (i[0] * 0,))
    seen = []
    with register(observer(lambda *args: seen.append(1) or replace(*args))):
        assert has_forward_hooks(module) and not hooked(module, other)
        assert unless_hooked(flags, module, other) is flags
        x = torch.ones(1, 3)
        assert torch.equal(module(x), nn.functional.linear(x, module.weight, module.bias))
        assert seen, "the observer never ran"
    with register(replace):
        assert hooked(other, module) and unless_hooked(flags, other, module) is None
        assert hooked(other) == (kind == "global")  # a global hook sees every module
    assert not has_forward_hooks(module)


@CPU_PASS_ONLY  # model wiring; the flags' truth is checked on CPU by the ops
def test_the_spike_counter_keeps_the_fast_paths(gen, monkeypatch):
    """The SOP counter's hooks are observers: a counted exact SNN still passes the row flags
    and settled rows between its layers (as an uncounted one does), with the same bits; a
    plain hook that returns nothing still turns them off on its way."""
    qann = make_exact(gen, **TINY, level=16)
    x = images(gen, qann, 2)
    calls = []
    original = exact_layers.exact_linear

    def spy(*args, **kwargs):
        # (whether the input's row flags are passed, whether the settled rows promise any)
        settled = kwargs["row_settled"]
        calls.append((kwargs["s_row_active"] is not None, bool(settled.any())))
        return original(*args, **kwargs)

    monkeypatch.setattr(exact_layers, "exact_linear", spy)
    runs = {}
    for how in ("plain", "counted", "hooked"):
        snn = convert(qann)
        calls.clear()
        if how == "hooked":
            snn.blocks[0].norm1.register_forward_hook(lambda *args: None)
        counter = SpikeCounter(snn, 24) if how == "counted" else None
        with counter.counting() if counter else torch.no_grad():
            logits, steps = snn(x, max_steps=24, chunk=4)
        runs[how] = (logits, steps, list(calls))
        if counter:
            assert int(counter.spikes.sum()) > 0, "the counter counted nothing"
            counter.close()
    (plain, plain_steps, plain_calls) = runs["plain"]
    for how in ("counted", "hooked"):
        logits, steps, _ = runs[how]
        assert steps == plain_steps and torch.equal(
            logits.view(torch.int32), plain.view(torch.int32)
        )
    # the counter watches the attention's probs and context through the fused op's tallies:
    # every flag and settled row as without the counter
    assert runs["counted"][2] == plain_calls and any(settled for _, settled in plain_calls)
    # block 0's qkv: its input's flags withheld past the plain hook on norm1
    first_qkv = runs["hooked"][2][0]
    assert first_qkv == (False, False) and plain_calls[0] == (True, False)


def test_tally_hooks_only_where_every_hook_takes_a_tally():
    """A module's hooks may be called with a ``SpikeTally`` in place of its call only where
    each one is an ``observer(..., tallies=True)`` forward hook: a plain hook, a pre-hook or a
    global hook of another kind needs the call."""
    module = nn.Identity()
    assert tally_hooks(module) == []
    tally = observer(lambda *args: None, tallies=True)
    with module.register_forward_hook(tally):
        assert tally_hooks(module) == [tally]
        for register, hook in (
            (module.register_forward_hook, observer(lambda *args: None)),
            (module.register_forward_pre_hook, observer(lambda *args: None, tallies=True)),
            (nn.modules.module.register_module_forward_hook, lambda *args: None),
        ):
            with register(hook):
                assert tally_hooks(module) is None
        with module.register_forward_hook(tally, with_kwargs=True):
            assert tally_hooks(module) is None
        assert tally_hooks(module) == [tally]


@CPU_PASS_ONLY  # model wiring; the kernel's tallies are test_running_counts' (interpreter)
def test_the_counter_keeps_the_fused_attention(gen, monkeypatch):
    """A ``SpikeCounter`` counts the fused attention's two neurons from the kernel's tallies
    (the op runs fused, its hooks get ``SpikeTally``s): the same spikes, per neuron and step,
    and the same shapes as when a plain observer on ``probs`` splits the attention into its
    two modules, from the first chunk or from the second on (the attention neuron's count
    carried from the tally's call to the split one's differences)."""
    qann = make_exact(gen, **TINY, level=16)
    x = images(gen, qann, 2)
    fused = []
    original = exact_attention.exact_attention
    monkeypatch.setattr(
        exact_attention, "exact_attention", lambda *a, **k: fused.append(1) or original(*a, **k)
    )
    runs, seen = {}, []
    for how in ("fused", "split", "split later"):
        snn = convert(qann)
        counter = SpikeCounter(snn, 24)
        fused.clear()
        probs = [block.attn.probs for block in snn.blocks]
        split = observer(lambda module, inputs, output: seen.append(type(output)))
        if how == "split":
            for m in probs:
                m.register_forward_hook(split)
        elif how == "split later":  # from the last block's first call on

            def later(module, inputs, output, probs=probs, split=split):
                if not any(has_forward_hooks(m) and tally_hooks(m) is None for m in probs):
                    for m in probs:
                        m.register_forward_hook(split)

            snn.blocks[-1].register_forward_hook(observer(later))
        with counter.counting():
            logits, steps = snn(x, max_steps=24, chunk=4)
        runs[how] = (counter.spikes.clone(), counter.neuron_elements, counter.dense_elements)
        assert steps > 8, "three chunks at least: the split run needs a second and a third"
        if how == "fused":  # every chunk's attention (the runner may run one past silence)
            assert len(fused) >= 3 * len(probs) and len(fused) % len(probs) == 0
        else:  # none, or the first chunk's
            assert len(fused) == {"split": 0, "split later": len(probs)}[how], how
        counter.close()
    assert seen and all(kind is not SpikeTally for kind in seen)
    spikes = runs["fused"][0]
    rows = [i for i, name in enumerate(counter.neuron_names) if "attn" in name]
    assert spikes[rows].sum() > 0, "the attention neurons never fired: proves little"
    for how in ("split", "split later"):
        assert torch.equal(runs[how][0], spikes), how
        assert runs[how][1:] == runs["fused"][1:], how

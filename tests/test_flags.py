"""Activity flags cut from one slab of zeros (``spikekernels.nn.flags``): the views are
disjoint and aligned, a bad slab is refused by name, and an exact block, its attention and
its MLP give the same bits whether their caller hands them a slab (the runner one per block,
cut from one for the chunk) or they make their own."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICES
from torch.utils._pytree import tree_leaves

from spikekernels.nn import observer
from spikekernels.nn.flags import carve, slab_numel
from spikekernels.ops.exact_layernorm import filled

SHAPES = [(3, 2, 5), (1,), (2, 7), (4, 1, 1, 3)]


def test_views_are_disjoint_aligned_and_shaped():
    slab = torch.zeros(slab_numel(SHAPES) + 5, dtype=torch.int32)
    views = carve(slab, SHAPES, slab.device)
    assert [tuple(v.shape) for v in views] == SHAPES
    for i, v in enumerate(views):
        assert v.is_contiguous() and v.untyped_storage().data_ptr() == slab.data_ptr()
        assert (v.data_ptr() - slab.data_ptr()) % 128 == 0, f"view {i} is not 128-byte aligned"
        v.fill_(i + 1)  # each view owns its elements: no other view's fill shows in it
    for i, v in enumerate(views):
        assert bool((v == i + 1).all()), f"view {i} overlaps another"
    made = carve(None, SHAPES, torch.device("cpu"))
    assert [tuple(v.shape) for v in made] == SHAPES
    assert all(v.dtype == torch.int32 and not bool(v.any()) for v in made)


@pytest.mark.parametrize(
    "slab",
    [
        torch.zeros(10_000, dtype=torch.int64),
        torch.zeros(100, 100, dtype=torch.int32),
        torch.zeros(20_000, dtype=torch.int32)[::2],
        torch.zeros(slab_numel(SHAPES) - 1, dtype=torch.int32),
    ],
    ids=["int64", "2-D", "strided", "short"],
)
def test_a_bad_slab_is_refused_by_name(slab):
    with pytest.raises(ValueError, match=f"flags must be a contiguous 1-D int32 tensor of at "
                       f"least {slab_numel(SHAPES)} elements"):  # fmt: skip
        carve(slab, SHAPES, slab.device)


def _calls(gen, device, chunk=2, steps=6):
    """A tiny exact SNN's first block, its attention and MLP, and each of their calls in a
    run (the module's state before the call, the call's input and keywords, all copied)."""
    from test_exact import TINY, images, make_exact

    from spikekernels import convert

    qann = make_exact(gen, **TINY, level=16)
    snn = convert(qann).to(device)
    calls = []
    for name in ("block", "attn", "mlp"):
        module = snn.blocks[0] if name == "block" else getattr(snn.blocks[0], name)

        def record(m, args, kwargs, name=name):
            state = copy.deepcopy(m)
            for part in state.modules():
                part._forward_pre_hooks.clear()  # a replay records nothing
            calls.append((name, state, copy.deepcopy(args[0]), copy.deepcopy(kwargs)))

        module.register_forward_pre_hook(observer(record), with_kwargs=True)
    snn(images(gen, qann, 2).to(device), max_steps=steps, chunk=chunk)
    assert {c[0] for c in calls} == {"block", "attn", "mlp"}
    assert len(calls) == 3 * (steps // chunk)
    # the runner hands each block a slab: a view of the chunk's one
    assert all(c[3].get("flags") is not None for c in calls if c[0] == "block")
    return calls


def _replay(module, x, kwargs, slab):
    """One recorded call replayed on a copy of the module's state, with ``slab`` as its
    flags (None: the module makes its own): what it returns and writes, and its counts."""
    m, kw, s = copy.deepcopy(module), dict(kwargs), copy.deepcopy(x)
    if "row_active" in kw:
        kw["row_active"] = torch.zeros_like(kw["row_active"])
    if kw.get("count_before") is not None:
        kw["count_before"] = torch.full_like(kw["count_before"], 99)
    kw["flags"] = slab
    out = m(s, **kw)
    counts = [c.clone() for c in _counts(m)]
    return [t for t in tree_leaves((_stream(out), kw.get("count_before"), counts))
            if isinstance(t, torch.Tensor)], kw.get("row_active")  # fmt: skip


def _slab(module, x, device, fill: int) -> tuple[torch.Tensor, int]:
    """A slab of ``fill`` for the module's flags, with a poisoned tail past them."""
    numel = slab_numel(module.flag_shapes(*_rows(x)))
    slab = torch.full((numel + 64,), fill, dtype=torch.int32, device=device)
    slab[numel:] = -7
    return slab, numel


@pytest.mark.parametrize("device", DEVICES)
def test_a_given_slab_changes_no_bit(gen, device):
    """Each call replayed on the module's state as it was, once with a slab (a poisoned tail
    past its flags, which nothing may touch) and once without: the same spikes, counts and
    row flags; and the flags land in the slab given."""
    used = set()
    for name, module, x, kwargs in _calls(gen, device):
        slab, numel = _slab(module, x, device, 0)
        given, given_rows = _replay(module, x, kwargs, slab[:numel])
        assert bool((slab[numel:] == -7).all()), f"{name} wrote past its flags"
        if bool(slab[:numel].any()):
            used.add(name)
        made, made_rows = _replay(module, x, kwargs, None)
        assert len(given) == len(made) > 0 and all(map(torch.equal, given, made)), name
        assert given_rows is None or torch.equal(given_rows, made_rows), name
    assert used == {"block", "attn", "mlp"}, f"only {used} set flags in the slab they were given"


@pytest.mark.parametrize("device", DEVICES)
def test_flags_left_set_cost_work_not_bits(gen, device):
    """A slab that was not zeroed (every flag set: every row read as if it fired) changes
    no spike or count: a reader skips only rows whose flag is clear. The row flags a call
    writes out may then mark more rows, never fewer."""
    for name, module, x, kwargs in _calls(gen, device):
        slab, numel = _slab(module, x, device, 1)
        set_, set_rows = _replay(module, x, kwargs, slab[:numel])
        assert bool((slab[numel:] == -7).all()), f"{name} wrote past its flags"
        made, made_rows = _replay(module, x, kwargs, None)
        assert len(set_) == len(made) > 0 and all(map(torch.equal, set_, made)), name
        if made_rows is not None:
            assert bool((set_rows.bool() | ~made_rows.bool()).all()), f"{name} lost a row flag"


def _rows(x) -> torch.Size:
    """``[t, b, n]`` of a call's input: spikes, or a block's stream (its first branch's)."""
    return (x.pending[0].spikes if hasattr(x, "pending") else x).shape[:-1]


def _stream(out):
    """A call's output as compared: a block's stream with ``d`` as its row flags describe
    it (a row that did not move is not written), anything else as it is."""
    if not hasattr(out, "pending"):
        return out
    return out._replace(d=filled(out.d, out.d_moved))


def _counts(module) -> list[torch.Tensor | None]:
    return [getattr(n, "count", None) for n in module.modules() if hasattr(n, "count")]


def test_a_bad_slab_is_refused_by_the_modules(gen):
    """Refused by name before any neuron moves (a later call, with state)."""
    for name, module, s, kwargs in _calls(gen, "cpu")[3:6]:
        before = [c.clone() for c in _counts(module)]
        kwargs = {**kwargs, "flags": torch.zeros(4, dtype=torch.int32)}
        with pytest.raises(ValueError, match="flags must be a contiguous 1-D int32 tensor"):
            module(s, **kwargs)
        assert all(map(torch.equal, before, _counts(module))), f"{name} moved"

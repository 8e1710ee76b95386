"""tests/triton_interpreter.py: the interpreter's language remapping, once per launch, undone."""

from __future__ import annotations

import pytest
import torch
from conftest import INTERPRETER_PATCHED

import spikekernels

pytestmark = pytest.mark.skipif(
    not INTERPRETER_PATCHED, reason="the Triton interpreter's patch is not in place here"
)


def _language():
    import triton.language as tl

    return {
        (module.__name__, name): getattr(module, name)
        for module in (tl, tl.core, tl.math)
        for name in dir(module)
        if not name.startswith("__")
    } | {
        ("tensor", name): getattr(tl.tensor, name)
        for name in dir(tl.tensor)
        if not name.startswith("__") or name in vars(tl.tensor)  # operators, not fresh objects
    }


def test_a_launch_leaves_the_language_as_it_found_it(gen):
    """st_bif's kernel calls jit helpers (its step, ``tl.zeros``, ``tl.full``) inside its time
    loop: every remapping made during the launch is undone at its end."""
    before = _language()
    x = torch.randn(3, 2, 37, generator=gen)
    spikes, _, count = spikekernels.st_bif(x, torch.tensor(0.3), -8, 7)
    assert spikes.abs().sum() > 0 and count.abs().sum() > 0
    after = _language()
    changed = [key for key in before if after.get(key) is not before[key]]
    assert not changed, f"left remapped after the launch: {changed[:5]}"

"""What a block launches per chunk besides its fused kernels: a count, not a timing.

Under CUDA graphs each small kernel still costs a launch and a tail (by count 1.5-3 us), and
eagerly each is an op dispatch on the host too. A ViT-S chunk once had 19 of them a block:
the linears' settled flags derived from ``row_active`` (an eq and a copy each), a clone of
every count that a later layer takes as ``s_before``, and five memsets of flags. The ops now
write their settled flags and copy the counts as their kernels read them, and the flags the
kernels set (``ExactBlock``'s, the attention's ``qkv_active`` and context rows, the MLP's
hidden rows) are views of one slab of zeros (``nn.flags``), one for all the blocks of a
chunk, so a block adds nothing: the chunk's one memset does not grow with depth. A float
block had 12: each neuron's copy of its last step for ``silent()`` (now read from its own
watched flags) and a sum over the chunk's spikes per spike-product operand for a check that
then skipped; it has none.
This test pins that inventory on the GPU's host path: the aten kernels a block adds to a
later chunk (a two-block model less a one-block one), with the data checks off as they are
on a GPU without ``validate``.

It runs where the Triton path runs (the interpreter pass, or a GPU): the CPU pass's PyTorch
paths are other code.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections import Counter

import pytest
import torch
from conftest import TRITON_DEVICES
from torch.utils._python_dispatch import TorchDispatchMode

import spikekernels.ops
from spikekernels import convert
from spikekernels.models import QuantViT, calibrate

# aten ops that launch nothing on a GPU: views, allocations, metadata
_FREE = {
    "view", "_unsafe_view", "as_strided", "slice", "select", "expand", "t", "transpose",
    "permute", "unsqueeze", "squeeze", "alias", "detach", "empty", "empty_strided",
    "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "split", "unbind",
    "_local_scalar_dense", "set_", "unfold", "diagonal", "narrow", "view_as", "is_nonzero",
}  # fmt: skip


class _Kernels(TorchDispatchMode):
    """Counts the aten ops that are kernels on a GPU (the library's own ops are counted by
    their name too, but they are the fused kernels, left out of the inventory)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _FREE and func.namespace == "aten":
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _later_chunk(depth: int, device: str, exact: bool) -> Counter[str]:
    """The aten kernels of the second of two 2-step chunks of a model of ``depth`` blocks
    (the first creates the state), in exact mode (int8 weights) or float mode."""
    gen = torch.Generator().manual_seed(0)
    qann = QuantViT(img_size=8, patch_size=4, in_chans=3, num_classes=5, embed_dim=32,
                    depth=depth, num_heads=2, weight_bits=8 if exact else None)  # fmt: skip
    with torch.no_grad():
        for m in qann.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.weight.copy_(
                    torch.randn(m.weight.shape, generator=gen) / m.weight[0].numel() ** 0.5
                )
    calibrate(qann, torch.randn(4, 3, 8, 8, generator=gen))
    snn = convert(qann.to(device).eval())
    x = torch.randn(2, 3, 8, 8, generator=gen).to(device)
    counts = []
    for steps in (2, 4):
        snn.reset()
        with _Kernels() as mode:
            snn(x, max_steps=steps, chunk=2)
        counts.append(mode.ops)
    return counts[1] - counts[0]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("mode", ["exact", "float"])
def test_a_block_adds_no_small_kernel(device, mode, monkeypatch):
    # the data checks off, as on a GPU without validate (each module's own binding)
    for info in pkgutil.iter_modules(spikekernels.ops.__path__):
        module = importlib.import_module(f"spikekernels.ops.{info.name}")
        if hasattr(module, "may_read_data"):
            monkeypatch.setattr(module, "may_read_data", lambda t, validate: False)
    exact = mode == "exact"
    per_block = _later_chunk(2, device, exact) - _later_chunk(1, device, exact)
    assert not per_block, (
        f"a {mode} block's later chunk launches {dict(per_block)} besides its fused kernels, "
        "where it was none (module docstring): a new small kernel per block is a launch per "
        "block and chunk on the GPU"
    )

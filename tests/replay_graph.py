"""``ReplayGraph``: a CPU stand-in for a CUDA graph that replays the way one does.

A CUDA graph records the kernels that its capture launched, each with the addresses it was
given, and a replay launches them again: no Python runs, a module's Python state (a step
counter, a dict, a flag) stays as the capture left it, and a tensor put in a module's
attribute after the capture is never read. A stand-in that calls the captured function again
would hide every such mistake.

``ReplayGraph`` records instead: ``capture(fn)`` runs ``fn`` under a dispatch mode that keeps
each op it dispatches (a ``spikekernels::`` op whole, an aten op) with the very tensors it
was given, and ``replay()`` runs those ops again on those tensors, in order, copying each
op's new outputs into the captured ones (a replay writes the memory the capture wrote).
In-place ops write their operands again; views alias what they viewed already. What a
capture may not do on a GPU is refused here too: reading a tensor's value on the host
(``.item()``, ``bool(t)``, a data-dependent shape) or making one from Python data. On a
CPU the ops check their data (it costs no sync there); the capture turns that off, as on a
GPU without ``validate``, so that a read left is one a GPU capture would meet too.
Tensor-subclass and autograd state are out of scope: the runner's chunks run plain tensors
under ``no_grad``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["ReplayGraph", "graphs_replayed_on"]

# What a CUDA graph capture cannot contain: each reads a value back on the host (a sync) or
# copies one there.
_HOST_SYNCS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.item.default,
    # a tensor made from Python data (``torch.tensor(x)``): on a GPU a copy from pageable
    # host memory, which a capture cannot contain either
    torch.ops.aten.lift_fresh.default,
}


@contextlib.contextmanager
def _checks_as_on_a_gpu() -> Iterator[None]:
    """The ops' data checks off where they would be on a GPU (``validate=False``): every
    loaded module's ``may_read_data`` answers ``validate`` alone, not "yes on a CPU"."""
    from spikekernels.ops import _checks

    original = _checks.may_read_data

    def gpu_rule(t: torch.Tensor, validate: bool) -> bool:
        return original(t, validate) and validate

    modules = [
        module
        for name, module in list(sys.modules.items())
        if name.startswith("spikekernels") and getattr(module, "may_read_data", None) is original
    ]
    for module in modules:
        module.may_read_data = gpu_rule
    try:
        yield
    finally:
        for module in modules:
            module.may_read_data = original


def _storages(tree) -> set[int]:
    return {
        t.untyped_storage().data_ptr() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)
    }


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_SYNCS:
            raise RuntimeError(f"{func} syncs with the host: a CUDA graph cannot capture it")
        out = func(*args, **kwargs)
        # the outputs to copy into at a replay: not those in an input's memory (a view, an
        # in-place op's result; by storage, not by schema: ``to`` may or may not copy)
        inputs = _storages((args, kwargs))
        fresh = {
            i: t
            for i, t in enumerate(tree_flatten(out)[0])
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
        }
        self.ops.append((func, args, kwargs, fresh))
        return out


def graphs_replayed_on(device: str, monkeypatch) -> list:
    """Every ``SpikingViT.capture_chunk_graph`` from here on captures with ``ReplayGraph``
    where ``device`` is a CPU (a GPU keeps its CUDA graphs); the ``ChunkGraph`` of each new
    capture is appended, in order, to the list returned (a shape and hooks already captured
    add nothing)."""
    from spikekernels.models.spiking_vit import SpikingViT

    captured, capture = [], SpikingViT.capture_chunk_graph

    def recorded(self, x, chunk=8, *, graph_type=None, patches=None):
        stand_in = ReplayGraph if device == "cpu" else graph_type
        graph = capture(self, x, chunk, graph_type=stand_in, patches=patches)
        if graph not in captured:
            captured.append(graph)
        return graph

    monkeypatch.setattr(SpikingViT, "capture_chunk_graph", recorded)
    return captured


class ReplayGraph:
    """``capture(fn) -> fn's outputs`` and ``replay()``, like ``models.chunk_graph.CudaGraph``
    (module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ops: list[tuple] = []

    def capture(self, fn: Callable[[], object]) -> object:
        recorder = _Recorder()
        with _checks_as_on_a_gpu(), recorder:
            out = fn()
        self.ops = recorder.ops
        return out

    def replay(self) -> None:
        for func, args, kwargs, fresh in self.ops:
            out = tree_flatten(func(*args, **kwargs))[0]
            for i, captured in fresh.items():
                captured.copy_(out[i])

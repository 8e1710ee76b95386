"""CUDA graphs over a chunk of exact mode: ``SpikingViT(..., cuda_graph=True)``.

Why. A chunk of the exact ViT-S is about 180 op calls (15 per block), each a few Python
checks, a dispatch and one or two Triton launches: milliseconds of host time per chunk,
while the fused kernels of an 8-step chunk may take about as long on an H200 (the int8 work
of a step is tens of microseconds at the roofline). A captured chunk is one replay.

How. Exact mode has no per-step constant that depends on ``t0`` (the patch neuron sees the
same conv value at every step), and its fresh state is all zeros, so one graph serves every
full chunk of every call at one batch shape:

- the modules keep their state at fixed addresses: after their first call every exact op
  runs with ``inplace=True`` (``TargetNeuron.state``);
- the static inputs are the conv patches and the ``[chunk, B]`` fired flags, the output the
  chunk's logits; a second, tiny graph zeroes the state (a fresh start for the next images);
- warm-up (two eager chunks: the first creates the state, the second compiles the in-place
  kernels) runs before the capture, on a side stream, as ``torch.cuda.graph`` asks.

A partial last chunk (``max_steps`` not a multiple of ``chunk``) runs eagerly on the same
state. Each captured shape keeps its state and its graph's memory until
``SpikingViT.release_chunk_graphs()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from spikekernels.nn.exact_layers import ExactLinear
from spikekernels.nn.target_neuron import TargetNeuron


class CudaGraph:
    """``torch.cuda.CUDAGraph`` as ``capture(fn) -> fn's outputs`` and ``replay()``.

    (``ChunkGraph`` takes any class with these two methods: the tests run the whole protocol
    on a CPU with one that calls ``fn`` again and copies into the captured outputs.)"""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], object]) -> object:
        with torch.cuda.graph(self.graph):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


def _side_stream(device: torch.device):
    """Warm-up runs on a side stream on a GPU (``torch.cuda.graph``'s rule); a no-op on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))

    @contextlib.contextmanager
    def on_side():
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream(device).wait_stream(stream)

    return on_side()


class ChunkGraph:
    """One chunk of ``snn`` (exact mode) captured for images shaped like ``x`` and ``chunk``
    steps. ``start(x)`` begins a call (zero state, these images); ``step(n, t0)`` runs the
    next ``n`` steps and returns ``(logits [n, B, classes], fired flags [n, B])``, fresh
    tensors: a replay when ``n == chunk``, the eager modules otherwise."""

    def __init__(self, snn: nn.Module, x: torch.Tensor, chunk: int, graph_type=CudaGraph):
        self.snn, self.chunk = snn, chunk
        self.neurons = snn.neurons()
        self.patches = snn.patch_embed.first_step(x)  # static input: copied into per call
        self.flags = torch.zeros(chunk, x.shape[0], dtype=torch.int32, device=x.device)
        with _side_stream(x.device):
            snn.reset()
            self._watch(self.flags)
            for t0 in (0, chunk):  # the state is created, then updated in place
                snn.step_chunk(self.patches, chunk, t0)
        self.state = [
            (module, name, tensor)
            for module in snn.modules()
            if isinstance(module, (TargetNeuron, ExactLinear))
            for name, tensor in module.state().items()
        ]
        if any(tensor is None for _, _, tensor in self.state):
            raise RuntimeError("a module has no state after two chunks: cannot capture")
        self.zero_graph = graph_type()
        self.zero_graph.capture(self._zero_state)
        self.graph = graph_type()
        self.logits = self.graph.capture(self._chunk)

    def _watch(self, flags: torch.Tensor | None) -> None:
        for neuron in self.neurons:
            neuron.watch(flags)

    def _zero_state(self) -> None:
        for _, _, tensor in self.state:
            tensor.zero_()

    def _chunk(self) -> torch.Tensor:
        self.flags.zero_()
        return self.snn.step_chunk(self.patches, self.chunk, self.chunk)

    def start(self, x: torch.Tensor) -> None:
        """A fresh start on images ``x`` (the captured shape): the captured state tensors back
        in their modules (an eager call in between may have reset them), zeroed."""
        for module, name, tensor in self.state:
            setattr(module, name, tensor)
        self.zero_graph.replay()
        self.patches.copy_(self.snn.patch_embed.first_step(x))
        self._watch(self.flags)

    def step(self, n: int, t0: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n == self.chunk:
            self.graph.replay()
            return self.logits.clone(), self.flags.clone()
        flags = self.flags[:n]
        flags.zero_()
        self._watch(flags)
        try:
            return self.snn.step_chunk(self.patches, n, t0), flags.clone()
        finally:
            self._watch(self.flags)

"""CUDA graphs over a chunk of exact mode: ``SpikingViT(..., cuda_graph=True)``.

Why. A chunk of the exact ViT-S is about 90 op calls (7 per block), each a few Python
checks, a dispatch and one or two Triton launches: milliseconds of host time per chunk,
while the fused kernels of an 8-step chunk may take about as long on an H200 (the int8 work
of a step is tens of microseconds at the roofline). A captured chunk is one replay.

How. Exact mode has no per-step constant that depends on the global step (the patch neuron
sees the same conv value at every step), and its fresh state is all zeros, so one graph per
chunk size serves every full chunk of that size of every call at one batch shape:

- the modules keep their state at fixed addresses: after their first call every exact op
  runs with ``inplace=True`` (``TargetNeuron.state``);
- the static inputs are the conv patches and the ``[chunk, B]`` fired flags, the output the
  chunk's logits; a tiny graph zeroes the state (a fresh start for the next images);
- a schedule of chunk sizes (``chunk=(24, 4)``) gets one graph per size, all on the same
  state tensors, so the runner can switch sizes between chunks;
- warm-up runs before the capture, on a side stream, as ``torch.cuda.graph`` asks: one eager
  chunk creates the state, then one chunk per size updates it in place (the in-place kernels
  may compile again for a size: Triton specialises an integer argument equal to 1 or
  divisible by 16, the step count among them; no kernel compiles inside a capture).

A partial last chunk (``max_steps`` reached mid-chunk) runs eagerly on the same state. Each
captured shape keeps its state and its graphs' memory until
``SpikingViT.release_chunk_graphs()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn


class CudaGraph:
    """``torch.cuda.CUDAGraph`` on ``device`` as ``capture(fn) -> fn's outputs`` and
    ``replay()``.

    (``ChunkGraph`` takes any class with these two methods, made with the images' device:
    the tests run the whole protocol on a CPU with one that records the ops ``fn``
    dispatches and replays them on the same tensors, ``tests/replay_graph.py``.)"""

    def __init__(self, device: torch.device) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.device = device

    def capture(self, fn: Callable[[], object]) -> object:
        # On a stream of the model's device: torch.cuda.graph's default capture stream is made
        # once per process, on the device current at its first capture, and the work on
        # another device's tensors would run on that device's own stream, outside the capture.
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.device(self.device), torch.cuda.graph(self.graph, stream=stream):
            return fn()

    def replay(self) -> None:
        with torch.cuda.device(self.device):  # on the model's device's current stream
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
    """The chunks of ``snn`` (exact mode) captured for images whose patches
    (``patch_embed.first_step``, the static input) are shaped like ``patches``, one graph for
    each chunk size in ``sizes``. ``start(patches)`` begins a call (zero state, the patches
    of its images); ``step(n)`` runs the next ``n`` steps and returns ``(logits [n, B,
    classes], fired flags [n, B])``, fresh tensors: a replay when ``n`` is a captured size,
    the eager modules otherwise; ``finish()`` ends the call."""

    def __init__(
        self, snn: nn.Module, patches: torch.Tensor, sizes: Sequence[int], graph_type=CudaGraph
    ) -> None:
        self.snn = snn
        self.sizes = sorted(set(sizes))
        self.neurons = snn.neurons()
        self.patches = patches.clone()  # static input: copied into per call
        device = patches.device
        self.flags = torch.zeros(self.sizes[-1], patches.shape[0], dtype=torch.int32, device=device)
        with _side_stream(device):
            snn.reset()
            # the state is created, then updated in place at every size
            for n in (self.sizes[0], *self.sizes):
                self._watch(self.flags[:n])
                snn.step_chunk(self.patches, n)
            self._watch(self.flags)
        self.state = snn.state_tensors()
        if any(tensor is None for _, _, tensor in self.state):
            raise RuntimeError("a module has no state after the warm-up chunks: cannot capture")
        self.zero_graph = graph_type(device)
        self.zero_graph.capture(self._zero_state)
        self.graphs = {}  # size -> (graph, its logits)
        for n in self.sizes:
            graph = graph_type(device)
            self.graphs[n] = (graph, graph.capture(lambda n=n: self._chunk(n)))
        self._watch(None)  # start() watches the flags for a call; a module call between gets none

    def _watch(self, flags: torch.Tensor | None) -> None:
        for neuron in self.neurons:
            neuron.watch(flags)

    def _zero_state(self) -> None:
        for _, _, tensor in self.state:
            tensor.zero_()

    def _chunk(self, n: int) -> torch.Tensor:
        flags = self.flags[:n]  # a view at the flags' own address, whatever the size
        flags.zero_()
        self._watch(flags)
        return self.snn.step_chunk(self.patches, n)

    def start(self, patches: torch.Tensor) -> None:
        """A fresh start on images whose patches (``patch_embed.first_step``, the captured
        shape) are ``patches``: the captured state tensors back in their modules (an eager
        call in between may have reset them), zeroed."""
        for module, name, tensor in self.state:
            setattr(module, name, tensor)
        self.zero_graph.replay()
        self.patches.copy_(patches)
        self._watch(self.flags)

    def finish(self) -> None:
        """The end of a call: the modules get copies of the state. What a caller keeps of it
        (a neuron's ``count``) is then not rewritten by the next call's replays, as after an
        eager call; ``start`` puts the captured tensors back."""
        for module, name, tensor in self.state:
            setattr(module, name, tensor.clone())

    def step(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n in self.graphs:
            graph, logits = self.graphs[n]
            graph.replay()
            return logits.clone(), self.flags[:n].clone()
        flags = self.flags[:n]
        flags.zero_()
        self._watch(flags)
        try:
            return self.snn.step_chunk(self.patches, n), flags.clone()
        finally:
            self._watch(self.flags)

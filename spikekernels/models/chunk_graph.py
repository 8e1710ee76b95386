"""CUDA graphs over the chunks of a run: ``SpikingViT(..., cuda_graph=True)``.

Why. A chunk of ViT-S is about 90 op calls (7 per block), each a few Python checks, a
dispatch and one or two Triton launches: milliseconds of host time per chunk, while the
fused kernels of an 8-step chunk may take about as long on an H200 (the int8 work of a step
is tens of microseconds at the roofline). A captured chunk is one replay.

How. Every stateful module keeps its state at fixed addresses: after its first call every op
updates it in place (``nn.inplace_state``), and its fresh state is a constant written in place
(``fresh_state``). What a chunk computes then depends on the step only where something enters
at a known step: in float mode the image and the cls/position rows at step 0 and each
linear's bias on its first ``bias_steps`` steps (``SpikingViT.steady_step``); in exact mode
nothing (the patch neuron sees the same conv value at every step). So one graph per chunk
size serves every full chunk of that size from the steady step on, of every call at one batch
shape, and in float mode one more graph serves the first chunk:

- the static inputs are the conv patches and the ``[chunk, B]`` fired flags, the output the
  chunk's logits; a tiny graph writes the fresh state (a fresh start for the next images);
- a schedule of chunk sizes (``chunk=(24, 4)``) gets one graph per size, all on the same
  state tensors, so the runner can switch sizes between chunks;
- a chunk no graph serves (a partial last one, where ``max_steps`` ends mid-chunk; in float
  mode one that starts between step 0 and the steady step) runs eagerly on the same state,
  its modules' step counters first set to its step (a replay runs no Python, so they lag);
- warm-up runs before the capture, on a side stream, as ``torch.cuda.graph`` asks: one eager
  chunk creates the state, then one chunk per graph updates it in place at that graph's step
  (the in-place kernels may compile again for a size or a step: Triton specialises an
  integer argument equal to 1 or divisible by 16, the step count and due bias steps among
  them; no kernel compiles inside a capture).

Each captured shape keeps its state and its graphs' memory until
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
    """The chunks of ``snn`` captured for images whose patches (``patch_embed.first_step``,
    the static input) are shaped like ``patches``: one graph for each chunk size in the
    schedule ``sizes`` (``forward``'s ``chunk``, in order), from the steady step on, and in
    float mode one for the first chunk. ``start(patches)`` begins a call (fresh state, the
    patches of its images, step 0); ``step(n)`` runs the next ``n`` steps and returns
    ``(logits [n, B, classes], fired flags [n, B])``, fresh tensors: a replay where a graph
    serves the chunk, the eager modules otherwise; ``finish()`` ends the call."""

    def __init__(
        self, snn: nn.Module, patches: torch.Tensor, sizes: Sequence[int], graph_type=CudaGraph
    ) -> None:
        self.snn = snn
        self.neurons = snn.neurons()
        self.steady = snn.steady_step()
        # (first, n): the graph of the chunk of n steps from step 0 (first) or from the
        # steady step on; in exact mode (steady step 0) every chunk is a steady one
        later = sizes[1:] if self.steady and len(sizes) > 1 else sizes
        self.keys = [(False, n) for n in sorted(set(later))]
        if self.steady:
            self.keys.insert(0, (True, sizes[0]))
        self.patches = patches.clone()  # static input: copied into per call
        device = patches.device
        most = max(n for _, n in self.keys)
        self.flags = torch.zeros(most, patches.shape[0], dtype=torch.int32, device=device)
        with _side_stream(device):
            snn.reset()
            # the state is created, then updated in place for every graph
            for first, n in ((True, sizes[0]), *self.keys):
                self._eager(0 if first else self.steady, n)
            self._watch(self.flags)
        self.state = snn.state_tensors()
        if any(tensor is None for _, _, tensor in self.state):
            raise RuntimeError("a module has no state after the warm-up chunks: cannot capture")
        self.fresh_graph = graph_type(device)
        self.fresh_graph.capture(self._fresh_state)
        self.graphs = {}  # (first, n) -> (graph, its logits)
        for first, n in self.keys:
            graph, t0 = graph_type(device), 0 if first else self.steady
            self.graphs[first, n] = (graph, graph.capture(lambda t0=t0, n=n: self._eager(t0, n)))
        self._watch(None)  # start() watches the flags for a call; a module call between gets none
        self.t0 = 0

    def _watch(self, flags: torch.Tensor | None) -> None:
        for neuron in self.neurons:
            neuron.watch(flags)

    def _fresh_state(self) -> None:
        # captured while the modules hold the state tensors: each writes its own fresh values
        for module in dict.fromkeys(module for module, _, _ in self.state):
            module.fresh_state()

    def _eager(self, t0: int, n: int) -> torch.Tensor:
        """``n`` steps from step ``t0`` through the modules (what a graph captures), on the
        flags' first ``n`` rows."""
        self.snn.seek(t0)
        flags = self.flags[:n]  # a view at the flags' own address, whatever the size
        flags.zero_()
        self._watch(flags)
        return self.snn.step_chunk(self.patches, n)

    def start(self, patches: torch.Tensor) -> None:
        """A fresh start on images whose patches (``patch_embed.first_step``, the captured
        shape) are ``patches``: the captured state tensors back in their modules (an eager
        call in between may have reset them), fresh."""
        for module, name, tensor in self.state:
            setattr(module, name, tensor)
        self.fresh_graph.replay()
        self.patches.copy_(patches)
        self._watch(self.flags)
        self.t0 = 0

    def finish(self) -> None:
        """The end of a call: the modules get copies of the state and their step counters
        the call's last step. What a caller keeps of the state (a neuron's ``count``) is then
        not rewritten by the next call's replays, as after an eager call; ``start`` puts the
        captured tensors back."""
        for module, name, tensor in self.state:
            setattr(module, name, tensor.clone())
        self.snn.seek(self.t0)

    def step(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        t0, self.t0 = self.t0, self.t0 + n
        first = t0 < self.steady
        served = (first, n) in self.graphs and (not first or t0 == 0)
        if served:
            graph, logits = self.graphs[first, n]
            graph.replay()
            return logits.clone(), self.flags[:n].clone()
        try:
            return self._eager(t0, n), self.flags[:n].clone()
        finally:
            self._watch(self.flags)

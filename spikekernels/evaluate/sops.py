"""Synaptic operations (SOPs), dense work and energy, counted during the run.

**SNN** (``SpikeCounter``), with forward hooks, no host sync:

- every neuron module (``spikekernels.nn.STBIF``, ``TargetNeuron``) adds, per call, the
  number of its outputs that are nonzero (a +1 *or* a -1 spike; float-output neurons emit
  ``sigma * theta``) per time step into a ``[neurons, max_steps]`` int64 tensor on the
  device: per neuron call (a call covers a chunk of steps) one pass over its output
  (``kernels.spike_count``, where Triton runs; else ``count_nonzero``) and one in-place add.
  The tensor is read once, at the end. A neuron that returns its running count
  (``counts_out``, exact mode's qkv and attention neurons) is counted by the steps'
  differences, in the same pass. The fused attention's two neurons (exact mode) are not
  called and their spikes never leave the kernel, which adds each one's spikes per step up
  as it runs: the hooks take those totals (``nn.hooks.SpikeTally``), so a counted run keeps
  the fused kernel. In a ``SpikingViT`` the hooks write each chunk's counts into a
  chunk-relative ``[neurons, max_steps]`` tensor instead, which the runner's
  ``observe_chunks`` call places at the chunk's global steps: the hooks are ``replayable``,
  so ``snn(..., cuda_graph=True)`` captures their work with the chunk and counts every
  replay;
- a spike's **fan-out** is the neuron's ``fanout`` attribute, set by ``convert``: the
  synaptic operations (accumulates) one spike causes downstream. The consuming linear's
  ``out_features``; in the SESA spike products the other operand's dimension (a q spike meets
  N keys, a k spike N queries, an attention-probability spike Dh values, a v spike N
  queries); 0 where it feeds only the residual stream (whose adds are the LayerNorm's input).
  SOPs = spikes x fan-out, per neuron and per step;
- dense, non-spike work per step: Spike-Softmax / Spike-LayerNorm (float mode; the softmax
  inside ``SpikeAttentionProbs``) and ExactSoftmax / ExactLayerNorm (exact mode) are charged
  ``ops per element`` (the table ``SNN_DENSE_OPS``) times their input's elements per sample
  and step, for every step a sample runs (its steps to silence). Shapes only: no device work;
- dense MACs the SNN still does: ``nn.Conv2d`` / ``nn.Linear`` modules it calls (the patch
  embedding, which sees the analog image once at t = 0).

**QANN** (``profile_qann``), shapes only, from one hooked forward of one image: MACs of every
``nn.Linear`` / ``nn.Conv2d`` and of the two attention matmuls (``B * H * N * N * Dh`` each,
from the attention input's shape), plus its LayerNorm and softmax work (``QANN_DENSE_OPS`` per
element); totals are these per-image figures times the number of images.

**Energy**: ``E_SNN = E_AC * SOPs + E_MAC * (SNN MACs + SNN dense ops)``,
``E_QANN = E_MAC * (MACs + dense ops)``, with Horowitz's 45 nm figures (ISSCC 2014):
fp32 MAC 4.6 pJ, AC 0.9 pJ (the SNN papers' convention), or int8 MAC 0.23 pJ, AC 0.03 pJ.
Dense softmax/LayerNorm ops are charged as MACs of the same table (an upper bound for the
adds among them). Neuron membrane updates and the QANN's quantizers are not charged, as in
the SNN literature; ``neuron_updates`` reports how many there were.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from spikekernels.nn.hooks import SpikeTally, observer
from spikekernels.ops._activity import spikes_of_counts
from spikekernels.ops._dispatch import backend_for

__all__ = [
    "ENERGY_TABLES",
    "QANN_DENSE_OPS",
    "SNN_DENSE_OPS",
    "EnergyTable",
    "QannCounter",
    "SpikeCounter",
    "energy",
    "profile_qann",
    "layer_group",
]


@dataclass(frozen=True)
class EnergyTable:
    """Energy per operation in picojoules: a multiply-accumulate and an accumulate."""

    name: str
    mac_pj: float
    ac_pj: float
    description: str


ENERGY_TABLES = {
    "fp32_45nm": EnergyTable(
        "fp32_45nm", 4.6, 0.9, "Horowitz 2014, 45 nm, fp32: MAC = mult 3.7 + add 0.9 pJ"
    ),
    "int8_45nm": EnergyTable(
        "int8_45nm", 0.23, 0.03, "Horowitz 2014, 45 nm, int8: MAC = mult 0.2 + add 0.03 pJ"
    ),
}

# Ops per element and step. SNN: the QANN's row function (softmax: max, subtract, exp, sum,
# divide = 5; LayerNorm: mean, subtract, square-sum, normalise, affine = 5) plus 2 for the
# spiking form (float: add the increment to X, subtract Y_prev; exact: form the value from
# the integer state, scale it).
SNN_DENSE_OPS = {
    "SpikeSoftmax": 7,
    "SpikeLayerNorm": 7,
    "SpikeLayerNormNeuron": 7,  # float mode's fused norm + neuron: an STBIF, not a SpikeLayerNorm
    "ExactSoftmax": 7,
    "ExactLayerNorm": 7,
    "ExactLayerNormNeuron": 7,
    "ExactAttentionProbs": 7,
    "SpikeAttentionProbs": 7,
}
QANN_DENSE_OPS = {"softmax": 5, "layernorm": 5}
NEURON_CLASSES = ("STBIF", "TargetNeuron")


def _kind(module: nn.Module, names) -> str | None:
    """The first class name of ``module``'s MRO among ``names`` (matched by name, so the
    counter needs no import of every module family)."""
    for cls in type(module).__mro__:
        if cls.__name__ in names:
            return cls.__name__
    return None


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


# A float-output neuron emits sigma * theta with theta > 0: no spike is +0.0, whose bits are
# all zero, so counting the nonzero words of the same-width integer view counts the spikes
# (on CPU that is ~14x faster than counting nonzero floats: 0.33 vs 4.8 ms for [8, 151296]).
_SAME_WIDTH_INT = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}
# CPU strategies, from timings on this project's CPU (1 thread, T = 8): a whole-row
# count_nonzero is vectorised and one along a dim is not ([8, 151296] int8: 8 row counts
# 0.28 ms, along dim 1 1.1 ms); for int8 rows up to 64K elements ``abs().sum(int32)`` is
# faster still ([8, 20480]: 27 us against 53 us), beyond that its temporary costs more
# ([8, 4M]: 189 ms against 20 ms); below 4K elements one call along the dim wins.
_ROW_SUM_MAX = 1 << 16
_PER_ROW_MIN = 4096


def _launch(kernel):
    """A Triton kernel launched directly (the hooks run outside any traced op)."""
    return kernel


def _counted_by_kernel(flat: torch.Tensor) -> bool:
    """Whether ``kernels.spike_count`` counts ``flat`` ``[T, M]``: where Triton runs (a GPU,
    or the CPU interpreter), ``M`` within its int32 offsets."""
    from spikekernels.kernels.spike_count import MAX_ELEMENTS

    return backend_for(flat, ("triton", "torch")) == "triton" and flat.shape[1] <= MAX_ELEMENTS


def _count_per_step(flat: torch.Tensor) -> torch.Tensor:
    """``[T, M]`` spikes (int8, or float ``sigma * theta``) -> ``[T]`` nonzero counts."""
    if flat.is_floating_point():
        flat = flat.view(_SAME_WIDTH_INT[flat.dtype])
    if _counted_by_kernel(flat):
        from spikekernels.kernels.spike_count import nonzero_per_step_triton

        return nonzero_per_step_triton(_launch, flat.contiguous())
    if flat.dtype == torch.int8 and not flat.is_cuda and flat.shape[1] <= _ROW_SUM_MAX:
        return flat.abs().sum(dim=1, dtype=torch.int32)  # ternary: |s| = 1 per spike
    if flat.is_cuda or flat.shape[1] < _PER_ROW_MIN:
        return torch.count_nonzero(flat, dim=1)
    return torch.stack([torch.count_nonzero(row) for row in flat])


def _per_sample_step(output: torch.Tensor | SpikeTally) -> int:
    """The elements of one sample and step of a neuron's output ``[T, B, ...]`` (or of the
    output a ``SpikeTally`` stands for)."""
    return math.prod(output.shape[2:])


def _site_label(names: list[str] | None, path: str) -> str:
    """A neuron's name in the results: the QANN quantizer(s) it stands for (``snn.sites``;
    one name, or ``blocks.0.attn.quan_q+quan_k+quan_v`` for a neuron that serves three), else
    its module path in the SNN."""
    if not names:
        return path
    if len(names) == 1:
        return names[0]
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    prefix = ".".join(parts[0][:common])
    return (prefix + "." if prefix else "") + "+".join(".".join(p[common:]) for p in parts)


def layer_group(name: str) -> str:
    """The per-layer plot's group of a module path: ``blocks.<i>``, ``patch_embed`` or
    ``head`` (the final norm, its neuron and the head)."""
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 1:
        return f"blocks.{parts[1]}"
    if parts[0] == "patch_embed":
        return "patch_embed"
    return "head"


def _linear_macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    return output.numel() * module.in_features


class SpikeCounter:
    """Counts an SNN's spikes, SOPs, dense work and MACs during ``snn(x, ...)`` calls.

    ``counter = SpikeCounter(snn, max_steps)``; per batch ``with counter.counting(): snn(x)``
    (the context resets the step offsets; outside it nothing is counted, so the QANN, which
    shares the patch convolution with the SNN, is not counted here). ``close()`` removes the
    hooks, each an ``nn.observer`` (it only counts), so the counted SNN keeps its fast paths
    (the activity flags between layers, the fused attention: ``tallies=True``). Device
    tensors: ``spikes [neurons, max_steps]`` int64 (summed over the batch).

    A ``SpikingViT`` also runs counted as CUDA graphs (``snn(x, cuda_graph=True)``): its
    neuron hooks write each chunk's counts at fixed addresses and the runner says where each
    chunk falls (``observe_chunks``). They then do their device work at every call while
    attached, counted or not (a graph captured outside ``counting()`` must still count when
    replayed inside it); only what falls inside ``counting()`` is added.
    Python ints (shape-derived): ``dense_elements[name]`` (per sample and step),
    ``neuron_elements[name]`` (per sample and step), ``macs[name]`` (summed over calls).
    """

    def __init__(self, snn: nn.Module, max_steps: int) -> None:
        self.max_steps = int(max_steps)
        self.neuron_names: list[str] = []
        self.fanouts: list[int] = []
        self.dense_ops: dict[str, int] = {}
        self.dense_elements: dict[str, int] = {}
        self.neuron_elements: dict[str, int] = {}
        self.macs: dict[str, int] = {}
        self._handles = []
        self._offsets: list[int] = []
        # a counts_out neuron's count after the last step it returned, per output shape (a
        # graph reads the address it captured): its next output's first difference, zeroed
        # at each fresh run
        self._last_counts: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        self.enabled = False
        sites: dict[int, list[str]] = {}
        for site in getattr(snn, "sites", None) or []:
            sites.setdefault(id(site.neuron), []).append(site.name)
        self.neuron_modules: list[str] = []
        for path, m in snn.named_modules():
            name = path
            if _kind(m, NEURON_CLASSES):
                name = _site_label(sites.get(id(m)), path)
                self.neuron_modules.append(path)
                fanout = getattr(m, "fanout", None)
                if isinstance(fanout, bool) or not isinstance(fanout, int) or fanout < 0:
                    raise ValueError(
                        f"neuron `{path}` ({type(m).__name__}) has no valid `fanout` (the "
                        f"synaptic operations one spike causes; got {fanout!r}): convert the "
                        "QANN with a spikekernels.convert that sets it"
                    )
                index = len(self.neuron_names)
                self.neuron_names.append(name)
                self.fanouts.append(fanout)
                self.neuron_elements[name] = 0
                self._offsets.append(0)
                self._handles.append(m.register_forward_hook(self._neuron_hook(index, name)))
            if kind := _kind(m, SNN_DENSE_OPS):  # a fused norm + neuron is both
                self.dense_ops[name] = SNN_DENSE_OPS[kind]
                self.dense_elements[name] = 0
                self._handles.append(m.register_forward_hook(self._dense_hook(name)))
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                self.macs[name] = 0
                self._handles.append(m.register_forward_hook(self._mac_hook(name)))
        if not self.neuron_names:
            raise ValueError(
                f"{type(snn).__name__} has no spiking neuron ({'/'.join(NEURON_CLASSES)}): "
                "not an SNN built by spikekernels.convert"
            )
        self.spikes = torch.zeros(
            len(self.neuron_names), self.max_steps, dtype=torch.int64, device=_device_of(snn)
        )
        # a SpikingViT's runner places each chunk (observe_chunks): the hooks write here
        self._chunk: torch.Tensor | None = None
        if callable(getattr(snn, "observe_chunks", None)):
            self._chunk = torch.zeros_like(self.spikes)
            self._handles.append(snn.observe_chunks(self))

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Count inside this block: one SNN call (one batch), from global step 0."""
        self.call_started()
        self.enabled = True
        try:
            yield
        finally:
            self.enabled = False

    def call_started(self) -> None:
        """A fresh run (``counting()``, and the runner at each call): step 0, counts 0."""
        self._offsets = [0] * len(self._offsets)
        for before in self._last_counts.values():
            before.zero_()
        if self._chunk is not None:  # what a capture wrote there, where it ran the chunk
            self._chunk.zero_()

    def chunk_done(self, t0: int, steps: int) -> None:
        """The runner's chunk of ``steps`` from global step ``t0`` is done: inside
        ``counting()``, add what the hooks wrote for it at its steps."""
        if self.enabled:
            self._check_within(t0 + steps)
            self.spikes[:, t0 : t0 + steps] += self._chunk[:, :steps]
        self._chunk.zero_()  # a neuron the next chunk does not call adds nothing

    def _neuron_hook(self, index: int, name: str):
        def hook(module, inputs, output):
            if self._chunk is None and not self.enabled:
                return
            steps = output.shape[0]
            if not self.neuron_elements[name]:  # per sample and step: a shape, not a count
                self.neuron_elements[name] = _per_sample_step(output)
            if isinstance(output, SpikeTally):  # a fused op's: the spikes per step
                counts = output.per_step
                if getattr(module, "counts_out", False):  # its count, for an unfused call
                    self._carry_count(index, output.shape, module.count)
            elif getattr(module, "counts_out", False):
                # the output is the count after each step: its spikes are the differences
                counts = self._changes_per_step(index, output)
            else:
                counts = _count_per_step(output.reshape(steps, -1))
            if self._chunk is not None:  # the runner places the chunk
                self._check_within(steps)
                self._chunk[index, :steps].copy_(counts)
                return
            start = self._offsets[index]
            self._check_within(start + steps)
            self.spikes[index, start : start + steps] += counts
            self._offsets[index] = start + steps

        return observer(hook, replayable=True, tallies=True)

    def _carry_count(self, index: int, shape: torch.Size, count: torch.Tensor) -> None:
        """A ``counts_out`` neuron called through a tally: its count after the call becomes
        the last count that ``_changes_per_step`` takes the next call's differences from (a
        later call may not be fused)."""
        key = (index, tuple(shape[1:]))
        before = self._last_counts.get(key)
        if before is None:
            before = self._last_counts[key] = torch.empty_like(count)
        before.copy_(count)

    def _check_within(self, end: int) -> None:
        if end > self.max_steps:
            raise ValueError(
                f"the SNN ran to step {end}, past the counter's max_steps {self.max_steps}: "
                "make the counter with the run's max_steps"
            )

    def _changes_per_step(self, index: int, counts: torch.Tensor) -> torch.Tensor:
        """``[T]``: the elements of a ``counts_out`` neuron's count ``[T, ...]`` that moved
        at each step (its spikes), from its count after the last call, which then becomes
        this call's last (in place: a graph reads the address it captured)."""
        key = (index, tuple(counts.shape[1:]))
        before = self._last_counts.get(key)
        if before is None:  # a fresh run's count, 0 (the first call of this shape)
            before = self._last_counts[key] = counts.new_zeros(counts.shape[1:])
        flat = counts.reshape(counts.shape[0], -1)
        if _counted_by_kernel(flat) and before.dtype == flat.dtype:
            from spikekernels.kernels.spike_count import nonzero_per_step_triton

            return nonzero_per_step_triton(_launch, flat.contiguous(), before.view(-1))
        spikes = spikes_of_counts(counts, before)
        if counts.shape[0]:
            before.copy_(counts[-1])
        return _count_per_step(spikes.reshape(spikes.shape[0], -1))

    def _dense_hook(self, name: str):
        def hook(module, inputs, output):
            if not self.dense_elements[name]:  # a shape, counted or not
                # [T, B, ...]: one sample, one step. The output has the rows the work is done
                # on (a fused scores + softmax + neuron reads q and k but normalises N x N).
                self.dense_elements[name] = _per_sample_step(output)

        return observer(hook, replayable=True, tallies=True)  # no tensor work

    def _mac_hook(self, name: str):
        def hook(module, inputs, output):
            if self.enabled:
                self.macs[name] += _linear_macs(module, output)

        return observer(hook)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class QannCounter:
    """MACs and dense ops of a QANN's forward passes (shapes only, Python ints, per layer).

    Hooks every ``nn.Linear`` / ``nn.Conv2d`` (``<name>``), every attention module with
    ``num_heads`` and ``qkv`` (``<name>.scores`` and ``<name>.context`` MACs, ``<name>.softmax``
    dense ops) and every ``nn.LayerNorm`` (dense ops). Counts only inside ``counting()``.
    ``profile(qann, image)`` is the way to use it.
    """

    def __init__(self, qann: nn.Module) -> None:
        self.macs: dict[str, int] = {}
        self.dense_ops: dict[str, int] = {}
        self.enabled = False
        self._handles = []
        for name, m in qann.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                self.macs[name] = 0
                self._handles.append(m.register_forward_hook(self._mac_hook(name)))
            elif isinstance(m, nn.LayerNorm):
                self.dense_ops[name] = 0
                self._handles.append(m.register_forward_hook(self._norm_hook(name)))
            elif hasattr(m, "num_heads") and hasattr(m, "qkv"):
                self.macs[f"{name}.scores"] = 0
                self.macs[f"{name}.context"] = 0
                self.dense_ops[f"{name}.softmax"] = 0
                self._handles.append(m.register_forward_hook(self._attention_hook(name)))

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        self.enabled = True
        try:
            yield
        finally:
            self.enabled = False

    def _mac_hook(self, name: str):
        def hook(module, inputs, output):
            if self.enabled:
                self.macs[name] += _linear_macs(module, output)

        return observer(hook)

    def _norm_hook(self, name: str):
        def hook(module, inputs, output):
            if self.enabled:
                self.dense_ops[name] += output.numel() * QANN_DENSE_OPS["layernorm"]

        return observer(hook)

    def _attention_hook(self, name: str):
        def hook(module, inputs, output):
            if not self.enabled:
                return
            b, n, d = inputs[0].shape  # heads x head_dim = d
            products = b * n * n * d
            self.macs[f"{name}.scores"] += products
            self.macs[f"{name}.context"] += products
            self.dense_ops[f"{name}.softmax"] += (
                b * module.num_heads * n * n * QANN_DENSE_OPS["softmax"]
            )

        return observer(hook)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def profile_qann(qann: nn.Module, image: torch.Tensor) -> tuple[dict[str, int], dict[str, int]]:
    """Per-image MACs and dense ops of ``qann``, per layer, from one forward of ``image``
    ``[1, C, H, W]`` (a ViT's work is linear in the batch, so totals are these times the
    number of images; the timed QANN runs carry no hooks at all).

    It runs with autograd on: an integer-weight QuantViT's inference forward (``exact_forward``)
    computes its layers without calling the modules, so hooks would see nothing; its training
    forward calls every module and has the same shapes.
    """
    counter = QannCounter(qann)
    try:
        with torch.enable_grad(), counter.counting():
            qann(image[:1])
    finally:
        counter.close()
    return counter.macs, counter.dense_ops


def energy(
    table: EnergyTable, *, sops: int, snn_macs: int, snn_dense: int, qann_macs: int, qann_dense: int
) -> dict:
    """Joules of the SNN and the QANN under ``table`` (module docstring), with the parts."""
    ac, mac = table.ac_pj * 1e-12, table.mac_pj * 1e-12
    snn = {"sops": sops * ac, "macs": snn_macs * mac, "dense": snn_dense * mac}
    snn["total"] = snn["sops"] + snn["macs"] + snn["dense"]
    qann = {"macs": qann_macs * mac, "dense": qann_dense * mac}
    qann["total"] = qann["macs"] + qann["dense"]
    return {
        "mac_pj": table.mac_pj,
        "ac_pj": table.ac_pj,
        "description": table.description,
        "snn_joules": snn,
        "qann_joules": qann,
        "snn_over_qann": snn["total"] / qann["total"] if qann["total"] else None,
    }

"""The spiking twin of a quantized ViT and its runner (SPEC.md §7, §9); built by
``spikekernels.convert``.

Two modes share the runner:

- **float mode** (§2-§7): ST-BIF neurons, int8 spikes between layers, the residual stream as
  float32 increments with the branches pending as int8 spikes (``Stream``); the logits are
  summed over steps. Equal to the QANN up to float rounding.
- **exact mode** (§9): target-driven neurons, exact state (each neuron's int8 count; the
  residual stream ``D`` as a float64 sum of ``theta * count``; the head's int32 accumulator),
  every value computed by the QANN's own formulas; the logits are the head's current value.
  Equal to the QANN bit for bit.

``snn(x, max_steps=64, chunk=8)`` feeds the image at t = 0 and runs ``chunk`` steps per module
call (multi-step kernels), state carried between chunks, so memory is bounded by the chunk.

Silence. After step 0 nothing new enters the network, and a step at which no neuron of a
sample fires is a fixed point for that sample: every later step computes the same values from
the same state. So the first step ``t >= 1`` with no spike settles the sample: its logits are
final and ``steps`` counts the steps before it. Samples never interact, so this holds per
sample; the batch stops with its slowest sample. Each chunk has ``[T, B]`` int32 fired flags on
the device, which every neuron is told to ``watch``: its fused kernel sets them while it writes
the spikes, with no pass over the spikes. The runner reads one integer per chunk (the one host
sync), none per layer.

Non-finite images: a neuron fed NaN never fires, so such a sample would settle with plausible
logits. The runner gives it NaN logits instead (as the QANN does), decided on the device.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from spikekernels.models.chunk_graph import ChunkGraph, CudaGraph
from spikekernels.nn.exact_attention import ExactAttention
from spikekernels.nn.exact_layers import (
    ExactLayerNormNeuron,
    ExactLinear,
    ExactLinearNeuron,
    count_received,
)
from spikekernels.nn.flags import carve, slab_numel
from spikekernels.nn.hooks import hook_ids, hooked, replay_unsafe, unless_hooked
from spikekernels.nn.inplace_state import InPlaceState
from spikekernels.nn.linear import SpikeLinear
from spikekernels.nn.linear_neuron import SpikeLinearNeuron
from spikekernels.nn.neuron import STBIF
from spikekernels.nn.target_neuron import TargetNeuron
from spikekernels.ops._dispatch import force_backend, forced_backend
from spikekernels.ops.layernorm_neuron import with_branches

__all__ = [
    "Branch",
    "ExactBlock",
    "ExactMlp",
    "ExactPatchEmbed",
    "ExactReadout",
    "NeuronSite",
    "Residual",
    "SpikeBlock",
    "SpikeMlp",
    "SpikePatchEmbed",
    "SpikeReadout",
    "SpikeTrace",
    "Stream",
    "SpikingViT",
]

NEURON_TYPES = (STBIF, TargetNeuron)


class SpikeTrace(NamedTuple):
    """What ``SpikingViT(..., return_trace=True)`` returns third.

    ``logits``: ``[steps, B, num_classes]``, the logits as of each step (``logits[-1]`` is the
    final answer; the curve for an accuracy-vs-time plot). ``sample_steps``: ``[B]`` int64,
    the step at which each sample fell silent (``max_steps`` if it did not).
    """

    logits: torch.Tensor
    sample_steps: torch.Tensor


class NeuronSite(NamedTuple):
    """A QANN quantizer and the neuron that replaces it. ``to_qann(count)`` lays the neuron's
    count ``[B, ...]`` out as the quantizer's integer in the QANN (see ``spikekernels.parity``).
    """

    name: str
    neuron: nn.Module
    to_qann: Callable[[torch.Tensor], torch.Tensor]


class _Composite(nn.Module):
    """A spiking module whose state lives in its children: ``reset()`` resets them all."""

    def reset(self) -> None:
        for m in self.children():
            m.reset()


def _patches(conv: nn.Conv2d, img: torch.Tensor) -> torch.Tensor:
    """The patch conv's output as tokens ``[B, N_patches, D]`` (float, once per input)."""
    return conv(img.to(conv.weight.dtype)).flatten(2).transpose(1, 2)


# --- float mode (SPEC.md §2-§7) ----------------------------------------------------------


class Stream(NamedTuple):
    """Float mode's residual stream between modules: the float32 increments ``d``
    ``[T, B, N, C]`` plus up to two pending branches ``(int8 spikes, threshold)``, the last
    neurons of the attention and the MLP, whose ``sigma * theta`` are added in order, one
    float32 rounding per add, by the next LayerNorm neuron in registers (the same bits as
    adding the branches' float outputs). So no branch output exists as a float32 tensor and
    a block writes the stream once: per element-step ``norm1`` reads ``d`` (4 bytes) and two
    branches (2) and writes the new ``d`` (4), ``norm2`` reads ``d`` and one branch (5), 15
    bytes where float outputs and separate adds moved 40."""

    d: torch.Tensor
    pending: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()

    def rows(self, index) -> Stream:
        """The stream on the token rows ``index`` (dim 2) only."""
        return Stream(self.d[:, :, index], tuple((s[:, :, index], t) for s, t in self.pending))

    def materialize(self) -> torch.Tensor:
        """``d`` with the pending branches added (``ops.layernorm_neuron.with_branches``)."""
        return with_branches(self.d, self.pending)


def _check_count(value: object, name: str) -> None:
    """A number of steps: an int (not a bool) >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_patches(
    patches: object, steps: object, tokens: tuple[int | None, int], *, with_class_row: bool
) -> None:
    """A patch embedding's call, checked before its neuron's state moves: ``steps >= 1`` and
    ``patches`` ``[B, N, D]`` for the model's ``tokens`` ``(N (+ 1 with_class_row), D)``
    (None: any ``N``)."""
    _check_count(steps, "steps")
    if not isinstance(patches, torch.Tensor):
        raise TypeError(f"patches must be a torch.Tensor, got {type(patches).__name__}")
    n, d = tokens
    n = None if n is None else n - with_class_row
    if patches.dim() != 3 or patches.shape[-1] != d or n not in (None, patches.shape[1]):
        want = f"[B, {'N' if n is None else n}, {d}]"
        raise ValueError(
            f"patches must be {want} (patch_embed.first_step(images)), got {list(patches.shape)}"
        )


class SpikePatchEmbed(nn.Module):
    """Patch embedding: the QANN's conv (a copy, with its bias) once, fed at global step 0
    (zeros after) through a signed neuron; class token and position embedding join at step 0.
    Returns the residual stream's increments ``[T, B, 1 + N_patches, D]`` float32 (a
    ``Stream`` with nothing pending). Like ``SpikeLinear``, it counts the steps it has seen
    (``t0``), so chunks equal one whole call; ``reset()`` starts a new input."""

    def __init__(
        self, conv: nn.Conv2d, neuron: STBIF, cls_token: torch.Tensor, pos_embed: torch.Tensor
    ) -> None:
        super().__init__()
        self.proj = conv
        self.neuron = neuron
        # buffers over the QANN's tensors (detached views, as the linears' weights): a shared
        # Parameter would move with either model
        self.register_buffer("cls_token", cls_token.detach())
        self.register_buffer("pos_embed", pos_embed.detach())
        self.t0 = 0

    def first_step(self, img: torch.Tensor) -> torch.Tensor:
        return _patches(self.proj, img)

    def reset(self) -> None:
        self.neuron.reset()
        self.t0 = 0

    def forward(self, patches: torch.Tensor, steps: int) -> Stream:
        _check_patches(patches, steps, tuple(self.pos_embed.shape[1:]), with_class_row=True)
        batch, n, d = patches.shape
        first = self.t0 == 0
        u = patches.new_zeros(steps, batch, n, d)
        if first:
            u[0] = patches
        p = self.neuron(u)
        x = torch.cat((p.new_zeros(steps, batch, 1, d), p), dim=2)
        if first:
            x[0, :, :1] += self.cls_token[0].to(x.dtype)
            x[0] += self.pos_embed[0].to(x.dtype)
        self.t0 += steps
        return Stream(x)


class SpikeMlp(_Composite):
    """``fc1`` fused with its unsigned neuron, then ``fc2`` fused with its signed neuron: two
    linear + neuron layers, int8 spikes between them (float mode: ``SpikeLinearNeuron``,
    exact mode: ``ExactLinearNeuron``). The QANN's ReLU after the unsigned quantizer is the
    identity on its output and is dropped."""

    def __init__(self, fc1: nn.Module, fc2: nn.Module) -> None:
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(s))


class ExactMlp(SpikeMlp):
    """``SpikeMlp`` of exact mode: each ``ExactLinearNeuron`` also takes the count of the
    neuron that fed it (``fc2``'s is ``fc1``'s before ``fc1``'s call, which that call writes
    out as it reads it), from which it forms its accumulator, and that neuron's row flags:
    ``fc1`` records which of its rows fired (``row_active``; on a GPU per output tile), so
    that ``fc2`` finds its silent row tiles from them."""

    def flag_shapes(self, *rows: int) -> tuple[tuple[int, ...], ...]:
        """The flags a call on spikes ``[*rows, K]`` sets: which rows of ``fc1``'s spikes
        fire (``forward``'s ``flags``)."""
        return (rows,)

    def forward(
        self,
        s: torch.Tensor,
        s_count: torch.Tensor | None = None,
        *,
        s_before: torch.Tensor | None = None,
        s_row_active: torch.Tensor | None = None,
        row_active: torch.Tensor | None = None,
        s_continues: bool = True,
        count_before: torch.Tensor | None = None,
        flags: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``s_count`` (after these steps) or ``s_before`` (before them): the count of the
        neuron behind ``s``, and ``s_row_active`` its row flags, as ``ExactLinearNeuron``
        takes them (and ``s_continues``); ``row_active``: int32 zeros that receive ``fc2``'s
        row flags; ``count_before``: receives ``fc2``'s count before these steps, or None;
        ``flags``: int32 zeros, flat, that the flags of ``flag_shapes`` are cut from
        (``nn.flags``), or None: made here."""
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"s must be a torch.Tensor, got {type(s).__name__}")
        fc1_before = _before_buffer(self.fc1)
        (fired,) = carve(flags, self.flag_shapes(*s.shape[:-1]), s.device)
        s_row_active = unless_hooked(s_row_active, self.fc1)  # a hook may replace the input
        continues = s_continues and not hooked(self.fc1)
        hidden = self.fc1(s, s_count, s_before=s_before, s_row_active=s_row_active,
                          row_active=fired, s_continues=continues,
                          count_before=fc1_before)  # fmt: skip
        continues = not hooked(self.fc1, self.fc2)
        hint = fired if continues else None
        return self.fc2(hidden, s_before=fc1_before, s_row_active=hint, row_active=row_active,
                        s_continues=continues, count_before=count_before)  # fmt: skip


class SpikeBlock(_Composite):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` on the residual stream's increments
    (``Stream``); ``norm1``/``norm2`` are Spike-LayerNorm fused with the neuron after it
    (``SpikeLayerNormNeuron``: float increments in, int8 spikes out). The attention and MLP
    end in int8 spikes (their last neurons' ``sigma``), added as pending branches:

    - ``norm1`` adds the incoming branches (the previous block's) and writes that stream;
    - ``norm2`` adds the attention branch to it and writes nothing;
    - the block leaves the stream with the attention and MLP branches pending."""

    def __init__(self, norm1: nn.Module, attn: nn.Module, norm2: nn.Module, mlp: SpikeMlp):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp

    def forward(self, x: Stream) -> Stream:
        # len(), not bool(): torch 2.11's torch.compile breaks the graph at bool() of a tuple
        s = self.norm1(x.d, *x.pending, residual_out=len(x.pending) > 0)
        d = self.norm1.take_residual() if x.pending else x.d
        attn = (self.attn(s), self.attn.proj.threshold)
        s = self.norm2(d, attn)
        return Stream(d, (attn, (self.mlp(s), self.mlp.fc2.threshold)))


class SpikeReadout(_Composite):
    """Final Spike-LayerNorm fused with its signed neuron on the class token (or the mean of
    the patch tokens with ``global_pool``), then the head: the logits' increments
    ``[T, B, classes]``."""

    def __init__(self, norm: nn.Module, head: nn.Module, global_pool: bool):
        super().__init__()
        self.norm, self.head = norm, head
        self.global_pool = global_pool

    def forward(self, x: Stream) -> torch.Tensor:
        if self.global_pool:
            feature = x.materialize()[:, :, 1:].mean(dim=2)
        else:
            feature = x.rows(0).materialize().contiguous()
        return self.head(self.norm(feature))


# --- exact mode (SPEC.md §9) -------------------------------------------------------------


def _count_before(neuron: TargetNeuron) -> torch.Tensor | None:
    """A copy of ``neuron``'s count before its next call (which updates it in place), or
    None while it is fresh."""
    return None if neuron.count is None else neuron.count.clone()


def _before_buffer(neuron: TargetNeuron) -> torch.Tensor | None:
    """An empty tensor like ``neuron``'s count, for its next call to fill with the count
    before that call (an exact linear's ``count_before``: the copy made as its kernel reads
    the count, where ``_count_before`` is a launch and a read of its own), or None while the
    neuron is fresh."""
    return None if neuron.count is None else torch.empty_like(neuron.count)


def _with_class_row(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a zero class-token row in front of its tokens (dim -2)."""
    return F.pad(t, (0, 0, 1, 0))


class Branch(NamedTuple):
    """A *pending* branch of exact mode's residual stream: the term ``fl64(threshold) *
    count`` of its last neuron, not yet added to any ``D`` in memory. ``spikes``: that
    neuron's int8 spikes ``[T, B, N, C]``; ``threshold``: its step (one element);
    ``count_before``: its int8 count before these steps, ``[B, N, C]``, or None (fresh). The
    first three fields are ``ExactLayerNormNeuron``'s positional arguments per branch.
    ``row_active``: int32 ``[T, B, N]``, where a row of the spikes fired (the neuron's
    ``row_active``), or None: the norm that adds the branch skips reading the others."""

    spikes: torch.Tensor
    threshold: torch.Tensor
    count_before: torch.Tensor | None
    row_active: torch.Tensor | None = None

    def class_row(self) -> Branch:
        """The branch on the class-token row only (dim 2 of the spikes)."""
        before, rows = self.count_before, self.row_active
        return Branch(
            self.spikes[:, :, 0],
            self.threshold,
            None if before is None else before[:, 0],
            None if rows is None else rows[:, :, 0],
        )


class Residual(NamedTuple):
    """Exact mode's residual stream between modules: ``D = d`` plus one or two pending
    branches (in order), whose updates the next LayerNorm neuron makes in registers, writing
    ``D`` out only where a later reader needs it. So ``D`` is not written by one launch and
    read back by the next, and a block writes it once: its ``norm2`` adds the attention
    branch and writes nothing, the next ``norm1`` adds both branches to the same ``d`` and
    writes ``D``.

    ``d``: ``[T, B, N, C]`` float64 before the branches, or None (the patch embedding: ``D``
    is the branch term alone). ``pending``: the ``Branch``es, earliest first. ``d_moved``:
    int32 ``[T, B, N]``, set where a row of ``d`` moved from the step before (its writer's
    ``residual_moved``), or None: the readers skip the rows that did not.
    """

    d: torch.Tensor | None
    pending: tuple[Branch, ...]
    d_moved: torch.Tensor | None = None

    def norm_args(self) -> tuple[torch.Tensor | None, ...]:
        """``ExactLayerNormNeuron``'s positional arguments: ``d``, then each branch's spikes,
        threshold and count before."""
        return (self.d, *(field for branch in self.pending for field in branch[:3]))

    def branch_flags(self, *readers: nn.Module) -> dict[str, torch.Tensor | None]:
        """The branches' row flags as the reader (an ``ExactLayerNormNeuron``, the first of
        ``readers``; the rest: the modules it sits in) takes them: ``branch_row_active`` and
        ``branch2_row_active``, None past a forward hook on any of ``readers``, which may
        replace the stream on its way (``unless_hooked``)."""
        names = ("branch_row_active", "branch2_row_active")
        return {
            name: unless_hooked(branch.row_active, *readers)
            for name, branch in zip(names, self.pending, strict=False)
        }


class ExactPatchEmbed(nn.Module):
    """Patch embedding of exact mode: the conv output (computed once) is the patch neuron's
    value at every step; returns the residual stream ``D = fl64(theta) * count``
    ``[T, B, 1 + N, D]`` as a pending branch (``Residual`` with no ``d``; zero spikes and
    count on the class-token row). The constant part (class token, positions) is added where
    the stream is read. Past a hook on the neuron, the branch's count is that of the spikes
    the hook gave (kept as ``received``, as ``ExactBlock`` does)."""

    def __init__(self, conv: nn.Conv2d, neuron: TargetNeuron) -> None:
        super().__init__()
        self.proj = conv
        self.neuron = neuron
        self.received: dict[str, torch.Tensor] = {}

    def first_step(self, img: torch.Tensor) -> torch.Tensor:
        return _patches(self.proj, img)

    def reset(self) -> None:
        """Back to the fresh state: the neuron, and the count kept past a hook on it."""
        self.neuron.reset()
        self.received = {}

    def forward(self, patches: torch.Tensor, steps: int) -> Residual:
        _check_patches(patches, steps, (None, self.proj.out_channels), with_class_row=False)
        batch, n, d = patches.shape
        before = _count_before(self.neuron)
        spikes = self.neuron(patches.expand(steps, batch, n, d))
        replaced = hooked(self.neuron)
        before = count_received(self.received, "patch", before, spikes, replaced)
        # The class-token row joins the int8 spikes and count (zero: theta * 0 = +0.0, as a
        # zero row), never a float64 tensor.
        branch = Branch(
            _with_class_row(spikes),
            self.neuron.threshold,
            None if before is None else _with_class_row(before),
        )
        return Residual(None, (branch,))


class ExactBlock(_Composite):
    """A Transformer block of exact mode on the residual stream (``Residual``: ``D`` as
    ``d`` plus pending branches): ``norm1``/``norm2`` read ``fl32(c + D)`` and fire (fused
    LayerNorm + neuron). Each branch's ``fl64(theta) * count`` (its last neuron's, exact in
    float64) is added in registers by the norms after it:

    - ``norm1`` adds the incoming branches (the previous block's attention and MLP, or the
      patch embedding) to ``d`` and writes that ``D``: the block's new ``d``;
    - ``norm2`` adds the attention branch to it and writes nothing;
    - the block leaves ``d`` with the attention and MLP branches pending.

    Per element-step a block moves 27 bytes of the stream: ``norm1`` reads ``d`` (8) and two
    branches' spikes (2) and writes ``D`` (8), ``norm2`` reads ``d`` and one branch (9);
    writing ``D`` at both norms took 34. ``D`` travels with its row flags (``norm1``'s
    ``residual_moved``, the next readers' ``d_moved``): a row that did not move at a step is
    neither written nor read there, so a quiet row costs 3 of those bytes (its branches'
    spikes), and none where the branches come with their row flags.

    Each norm, the attention, ``fc1``, ``proj`` and ``fc2`` also record which rows of their
    spikes fire (``row_active``): the linear after each (``qkv``, ``proj``, ``fc1``, ``fc2``)
    finds its silent row tiles from those flags instead of scanning the spikes
    (``s_row_active``), and the norms that add the ``proj`` and ``fc2`` branches skip reading
    their silent rows (``Branch.row_active``), unless a forward hook on the way could
    replace the spikes (``unless_hooked``). Past such a hook the readers count what they
    receive instead of reading the producer's count: the linears by ``s_continues=False``,
    the norms from the branch counts the block keeps (``received``), so that a hooked run
    does not depend on its chunking."""

    def __init__(
        self,
        norm1: ExactLayerNormNeuron,
        attn: ExactAttention,
        norm2: ExactLayerNormNeuron,
        mlp: ExactMlp,
    ) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp
        self.received: dict[str, torch.Tensor] = {}

    def _branch(
        self,
        branch: nn.Module,
        neuron: ExactLinearNeuron,
        s: torch.Tensor,
        s_before: torch.Tensor,
        s_row_active: torch.Tensor | None,
        row_active: torch.Tensor,
        flags: torch.Tensor,
    ) -> Branch:
        """The branch run on a norm's spikes ``s`` (and that norm's count before them, and its
        row flags: None past a hook, where ``s`` may not be the norm's, as the branch is told
        by ``s_continues``), pending: its last neuron's spikes, step, count before and row
        flags (recorded into the zeros ``row_active``; None past a forward hook on the
        branch, its neuron or this block, whose output the hook may replace). ``flags``: the
        zeros the branch cuts its own flags from."""
        before = _before_buffer(neuron)  # the branch's call writes it
        spikes = branch(s, s_before=s_before, s_row_active=s_row_active, row_active=row_active,
                        s_continues=s_row_active is not None, count_before=before,
                        flags=flags)  # fmt: skip
        flags = unless_hooked(row_active, branch, neuron, self)
        name = "attn" if branch is self.attn else "mlp"
        before = count_received(self.received, name, before, spikes, hooked(branch, neuron))
        return Branch(spikes, neuron.threshold, before, flags)

    def reset(self) -> None:
        """Back to the fresh state: the parts, and the branch counts kept past a hook."""
        super().reset()
        self.received = {}

    def flag_shapes(self, t: int, b: int, n: int) -> list[tuple[int, ...]]:
        """The flags a call on a stream of ``[t, b, n, C]`` sets (``forward``'s ``flags``):
        which rows of each norm's spikes fire at each step, the linear after it finding its
        silent row tiles from them instead of scanning the spikes (norm1's, norm2's, the
        attention branch's, the MLP branch's); and the attention's and the MLP's own, each
        as a flat slab."""
        parts = (self.attn.flag_shapes(t, b, n), self.mlp.flag_shapes(t, b, n))
        return [(4, t, b, n), *((slab_numel(p),) for p in parts)]

    def forward(self, x: Residual, flags: torch.Tensor | None = None) -> Residual:
        """``flags``: int32 zeros, flat, that the flags of ``flag_shapes`` are cut from
        (``nn.flags``: the runner zeros all blocks' at once), or None: made here."""
        # each norm's count before its call: what the linear after it starts from (a copy per
        # chunk, which the norm's kernel writes as it reads the count, instead of reading the
        # chunk's spikes back in the linear)
        before = _before_buffer(self.norm1)
        # which rows of D move at each step: the later norms skip reading the others
        stream = x.pending[0].spikes
        moved = torch.empty(stream.shape[:-1], dtype=torch.int32, device=stream.device)
        fired, attn_flags, mlp_flags = carve(flags, self.flag_shapes(*moved.shape), stream.device)
        s = self.norm1(*x.norm_args(), **x.branch_flags(self.norm1, self), residual_out=True,
                       d_moved=x.d_moved, residual_moved=moved, row_active=fired[0],
                       count_before=before)  # fmt: skip
        d = self.norm1.take_residual()
        hint = unless_hooked(fired[0], self.norm1, self.attn, self.attn.qkv)
        attn = self._branch(self.attn, self.attn.proj, s, before, hint, fired[2], attn_flags)
        before = _before_buffer(self.norm2)
        x = Residual(d, (attn,))
        s = self.norm2(*x.norm_args(), **x.branch_flags(self.norm2), d_moved=moved,
                       row_active=fired[1], count_before=before)  # fmt: skip
        hint = unless_hooked(fired[1], self.norm2, self.mlp, self.mlp.fc1)
        mlp = self._branch(self.mlp, self.mlp.fc2, s, before, hint, fired[3], mlp_flags)
        return Residual(d, (attn, mlp), moved)


class ExactReadout(_Composite):
    """The final LayerNorm + signed neuron (fused) on the class token, or on the float64 mean
    of the patch tokens with ``global_pool``, then the head's current value:
    ``[T, B, classes]``. The last block's attention and MLP branches are still pending: the
    norm adds them (on the class row only without ``global_pool``) and writes no ``D``."""

    def __init__(self, norm: ExactLayerNormNeuron, head: ExactLinear, global_pool: bool) -> None:
        super().__init__()
        self.norm, self.head = norm, head
        self.global_pool = global_pool

    def forward(self, x: Residual) -> torch.Tensor:
        if not self.global_pool:
            x = Residual(
                None if x.d is None else x.d[:, :, 0],
                tuple(branch.class_row() for branch in x.pending),
                None if x.d_moved is None else x.d_moved[:, :, 0],
            )
        # D comes with its row flags (rows that did not move are not written): the pooled
        # path reads the stream they describe (ops.exact_layernorm.filled)
        flags = x.branch_flags(self.norm, self) if not self.global_pool else {}
        return self.head(self.norm(*x.norm_args(), **flags, d_moved=x.d_moved))


# --- the network and its runner ------------------------------------------------------------

# float mode's modules that count the global step (``t0``)
_STEP_COUNTERS = (SpikePatchEmbed, SpikeLinear, SpikeLinearNeuron)


class SpikingViT(nn.Module):
    """The SNN of a quantized ViT; build it with ``spikekernels.convert(qann)``.

    Call ``snn(x, max_steps=64, chunk=8)`` with images ``[B, C, H, W]``: returns
    ``(logits [B, num_classes] float32, steps)``: the logits as of the last step (float mode:
    summed over steps; exact mode: the head's current value) and the number of steps the batch
    needed (its slowest sample's settle step, see the module docstring), or ``max_steps`` if it
    did not fall silent by then. With ``return_trace=True`` a third element, a ``SpikeTrace``.

    ``chunk`` is the number of steps per module call (the fused kernels loop over them; the
    memory held is that of one chunk), or a schedule: a sequence of sizes for the first chunks
    in order, its last size repeating. ``chunk=(24, 4)`` runs 24 steps, then 4 at a time: a
    long chunk while every sample is busy (each chunk reads and writes every layer's state
    once), short ones near silence (steps past the settle step are computed for nothing).
    The bits do not depend on the chunking.

    ``reference=True`` runs the same network one step at a time on the per-step reference ops
    (``force_backend("reference")``): the slow baseline, and the tests' oracle.
    ``cuda_graph=True`` (on a GPU) replays a captured chunk for every full chunk, one graph
    per size in the schedule and in float mode one for the first chunk
    (``capture_chunk_graph``, ``models.chunk_graph``): the same bits, no host work per op.

    ``exact`` says which mode; ``sites`` lists every QANN quantizer with its neuron. State is
    reset at the start of each call; after a call every neuron's ``count`` holds its spike
    count (after silence: the QANN quantizer's integer). Inference only.
    """

    def __init__(
        self,
        patch_embed: nn.Module,
        blocks: list[nn.Module],
        readout: nn.Module,
        *,
        exact: bool,
        image_shape: tuple[int, int, int],
        num_classes: int,
        sites: list[NeuronSite],
    ) -> None:
        super().__init__()
        self.patch_embed = patch_embed
        self.blocks = nn.ModuleList(blocks)
        self.readout = readout
        self.exact = bool(exact)
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.sites = list(sites)
        self._chunk_graphs: dict = {}  # (image shape, dtype, chunk, device) -> ChunkGraph
        # an OrderedDict, as nn.Module's hooks: RemovableHandle keeps a weak reference to it
        self._chunk_observers: OrderedDict[int, ChunkObserver] = OrderedDict()
        self.received: dict[str, torch.Tensor] = {}

    def observe_chunks(self, observer: ChunkObserver) -> RemovableHandle:
        """Tell ``observer`` where each call's chunks fall: ``call_started()`` once the call's
        state is fresh, then ``chunk_done(t0, steps)`` after each chunk (eager or replayed),
        with its first global step and its size. What a ``replayable`` forward hook wrote
        during the chunk is there to read, on the device: a hook that needs the global step
        (a replay cannot tell it) writes chunk-relative and lets its observer place it, as
        ``evaluate``'s SOP counter does. ``handle.remove()`` stops it."""
        handle = RemovableHandle(self._chunk_observers)
        self._chunk_observers[handle.id] = observer
        return handle

    def _apply(self, fn, recurse=True):
        # Device moves only: the network runs in the dtypes conversion gave it (exact mode's
        # float64 stream and float32 steps, float mode's weights), so a cast is refused
        # before it changes the SNN (a parent module's earlier children may have taken it).
        # Cast the images instead.
        for dtype in (torch.float32, torch.float64):
            if fn(torch.zeros((), dtype=dtype)).dtype != dtype:
                raise TypeError(
                    "SpikingViT keeps the dtypes its conversion gave it (.half(), .double(), "
                    ".float() and .to(dtype) would change its bits): move it with .to(device) "
                    "and cast the images instead"
                )
        # a captured graph reads the addresses it captured: after a move (even there and
        # back, to the same key) they are freed memory
        self._chunk_graphs.clear()
        return super()._apply(fn, recurse)

    def reset(self) -> None:
        """Back to the fresh state: every neuron, norm and residual stream."""
        self.patch_embed.reset()
        for block in self.blocks:
            block.reset()
        self.readout.reset()
        self.received = {}

    def neurons(self) -> list[nn.Module]:
        """Every neuron module, in execution order."""
        return [m for m in self.modules() if isinstance(m, NEURON_TYPES)]

    def state_tensors(self) -> list[tuple[nn.Module, str, torch.Tensor | None]]:
        """The network's state as ``(module, name, tensor)`` for every entry of every
        module's ``state()`` (None before the first call). After their first call the modules
        update these in place (``nn.inplace_state``); each chunk reads and writes all of it
        once."""
        return [
            (module, name, tensor)
            for module in self.modules()
            if isinstance(module, InPlaceState)
            for name, tensor in module.state().items()
        ]

    def step_counters(self) -> list[nn.Module]:
        """Float mode's modules that count the global step (``t0``: the image enters at step
        0, a linear's bias on its first ``bias_steps``); none in exact mode, whose chunks do
        not depend on their step."""
        return [m for m in self.modules() if isinstance(m, _STEP_COUNTERS)]

    def steady_step(self) -> int:
        """The first global step from which a chunk's work does not depend on its step: in
        float mode past the image (step 0) and every bias (``bias_steps``), 0 in exact
        mode. A captured chunk from there on serves every later chunk of its size."""
        counters = self.step_counters()
        if not counters:
            return 0
        return max(1, *(getattr(m, "bias_steps", 1) for m in counters))

    def seek(self, t0: int) -> None:
        """Set every step counter to global step ``t0`` (the state stays as it is): a chunk
        graph's eager chunks start where its replays, which run no Python, left the step."""
        for module in self.step_counters():
            module.t0 = t0

    def step_chunk(self, patches: torch.Tensor, steps: int) -> torch.Tensor:
        """Run the next ``steps`` time steps (the modules count the steps they have seen since
        ``reset()``); ``patches`` is the conv output ``patch_embed.first_step(img)``. Returns
        the logits of each step ``[steps, B, classes]`` (increments in float mode, current
        values in exact mode)."""
        x = self._as_received("patch_embed", self.patch_embed, patches, steps)
        for i, (block, kwargs) in enumerate(zip(self.blocks, self._block_flags(x), strict=True)):
            x = self._as_received(f"blocks.{i}", block, x, **kwargs)
        return self.readout(x)

    def _block_flags(self, x: object) -> list[dict[str, torch.Tensor]]:
        """Each block's ``flags`` keyword for a chunk on the stream ``x``: in exact mode the
        zeros every block's kernels set, one memset for all of them (``nn.flags``); none in
        float mode."""
        if not isinstance(x, Residual):
            return [{} for _ in self.blocks]
        shape = x.pending[0].spikes.shape[:-1]
        numel = [(slab_numel(block.flag_shapes(*shape)),) for block in self.blocks]
        return [{"flags": flags} for flags in carve(None, numel, x.pending[0].spikes.device)]

    def _as_received(self, name: str, module: nn.Module, *args: object, **kwargs) -> object:
        """Exact mode's stream out of ``module`` (called on ``args``; ``name``: its key) as
        the next module reads it: past a hook there (which may replace the ``Residual``),
        each pending branch's count before its spikes is that of the spikes the stream
        received, kept in ``received`` from the first such chunk (as ``ExactBlock`` keeps its
        branches' past a hook inside it), so that the run does not depend on its chunking.
        Float mode's stream has no counts."""
        x = module(*args, **kwargs)
        if not isinstance(x, Residual):
            return x
        replaced = hooked(module)
        pending = tuple(
            branch._replace(
                count_before=count_received(
                    self.received, f"{name}.{i}", branch.count_before, branch.spikes, replaced
                )
            )
            for i, branch in enumerate(x.pending)
        )
        return x._replace(pending=pending)

    def _check_call(self, x: object, max_steps: object) -> None:
        _check_count(max_steps, "max_steps")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of images, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point image batch, got dtype {x.dtype}")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape or x.shape[0] == 0:
            expected = ", ".join(map(str, self.image_shape))
            raise ValueError(
                f"x must be images of shape [B, {expected}] with B >= 1, got {list(x.shape)}"
            )
        device = self.patch_embed.proj.weight.device
        if x.device != device:
            raise ValueError(f"x is on {x.device} but the model is on {device}")

    def capture_chunk_graph(
        self,
        x: torch.Tensor,
        chunk: int | Sequence[int] = 8,
        *,
        graph_type=None,
        patches: torch.Tensor | None = None,
    ) -> ChunkGraph:
        """The CUDA graphs of the chunks of ``chunk`` (a size or a schedule, as ``forward``
        takes it: one graph per size) for images shaped like ``x``, captured on first use and
        kept (``models.chunk_graph.ChunkGraph``). ``forward(...,
        cuda_graph=True)`` calls this, with ``patches``, the ``patch_embed.first_step(x)`` it
        has made for the call (else the capture makes its own: a patch convolution more,
        which a hook on it would see). ``graph_type``: the graph class (default
        ``chunk_graph.CudaGraph``; the tests pass a CPU stand-in)."""
        sizes = _chunk_sizes(chunk)
        # inference mode too: a capture inside it makes inference tensors, which a call
        # outside it may not update in place
        shape = (tuple(x.shape), x.dtype, sizes, x.device, torch.is_inference_mode_enabled())
        key = (*shape, self._replayed_hooks())
        if forced_backend() not in (None, "triton"):
            # a replay runs the captured kernels whatever the block says, and a capture under
            # it would keep its backend for every later call
            raise ValueError(
                f"cuda_graph=True replays the captured Triton kernels: it cannot run under "
                f"force_backend({forced_backend()!r}); call without cuda_graph"
            )
        graph = self._chunk_graphs.get(key)
        if graph is None:
            if graph_type is None:
                if x.device.type != "cuda":
                    raise ValueError(
                        f"cuda_graph=True needs a CUDA device, got images on {x.device}"
                    )
                graph_type = CudaGraph
            # a graph of this shape captured under hooks since removed is of no more use
            for stale in [k for k in self._chunk_graphs if k[:-1] == shape]:
                del self._chunk_graphs[stale]
            if patches is None:
                patches = self.patch_embed.first_step(x)
            graph = self._chunk_graphs[key] = ChunkGraph(self, patches, sizes, graph_type)
        return graph

    def _replayed_hooks(self) -> tuple:
        """The forward hooks a chunk graph would capture, as ``(module name, hook ids)``: part
        of its key, since a replay runs the work of the hooks it was captured with. Raises a
        ValueError for one not marked ``replayable`` (``nn.hooks.observer``): a replay runs no
        Python, so it would see the capture only, and its tensor work would be replayed with
        the capture's operands. The patch convolution runs before the chunks (``first_step``,
        at each call's start), so its hooks run at every call, graph or not."""
        outside = {id(m) for m in self.patch_embed.proj.modules()}
        hooks = []
        for name, module in self.named_modules():
            if id(module) in outside or not (ids := hook_ids(module)):
                continue
            if replay_unsafe(module):
                raise ValueError(
                    f"cuda_graph=True replays captured kernels, so forward hooks would run at "
                    f"capture only: `{name or type(self).__name__}` has one that is not marked "
                    "replayable (nn.hooks.observer); run without cuda_graph (or remove the "
                    "hooks)"
                )
            hooks.append((name, ids))
        return tuple(hooks)

    def release_chunk_graphs(self) -> None:
        """Free every captured chunk graph with its state buffers and memory pool. Call it
        after replacing a weight tensor: a graph reads the addresses it captured (weights
        changed in place, e.g. by ``load_state_dict``, are seen; moving the model with
        ``.to(device)`` releases the graphs itself)."""
        self._chunk_graphs.clear()

    @torch.no_grad()
    def forward(
        self,
        x: torch.Tensor,
        max_steps: int = 64,
        chunk: int | Sequence[int] = 8,
        *,
        return_trace: bool = False,
        reference: bool = False,
        cuda_graph: bool = False,
    ):
        self._check_call(x, max_steps)
        sizes = (1,) if reference else _chunk_sizes(chunk)
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
        if cuda_graph and reference:
            raise ValueError("cuda_graph=True replays the fused ops; it cannot run reference=True")
        if cuda_graph:
            self._replayed_hooks()  # refuses a hook a replay cannot run, before any work
        backend = force_backend("reference") if reference else contextlib.nullcontext()
        batch, device = x.shape[0], x.device
        finite = torch.isfinite(x.reshape(batch, -1)).all(dim=1)
        try:
            # float32 whatever autocast the caller runs under (the official evaluation loop
            # wraps the model in one): the spikes and exact mode's bits are float32's
            no_autocast = (
                torch.autocast(device.type, enabled=False)
                if torch.amp.is_autocast_available(device.type)
                else contextlib.nullcontext()
            )
            with backend, no_autocast:
                # the patch convolution once a call (its hooks see it once), graph or not
                patches = self.patch_embed.first_step(x)
                if cuda_graph:
                    chunks = self.capture_chunk_graph(x, sizes, patches=patches)
                else:
                    chunks = _EagerChunks(self)
                chunks.start(patches)
                observers = list(self._chunk_observers.values())
                for observer in observers:
                    observer.call_started()
                sample_steps = torch.full((batch,), max_steps, dtype=torch.int64, device=device)
                total = torch.zeros(batch, self.num_classes, device=device)
                trace = []
                t0, steps, index = 0, max_steps, 0
                while t0 < max_steps:
                    n = min(sizes[min(index, len(sizes) - 1)], max_steps - t0)
                    index += 1
                    logits, fired = chunks.step(n)
                    for observer in observers:
                        observer.chunk_done(t0, n)
                    # Step by step, so that the rounding does not depend on the chunk size.
                    for t in range(n):
                        total = logits[t] if self.exact else total + logits[t]
                        if return_trace:
                            trace.append(total)
                    sample_steps = _settle(sample_steps, fired != 0, t0, max_steps)
                    t0 += n
                    steps = int(sample_steps.max())  # the one host sync per chunk
                    if steps < max_steps:
                        break
                chunks.finish()
        finally:
            for neuron in self.neurons():
                neuron.watch(None)
        nan = torch.tensor(float("nan"), device=device)
        total = torch.where(finite[:, None], total, nan)
        if not return_trace:
            return total, steps
        curve = torch.where(finite[None, :, None], torch.stack(trace[:steps]), nan)
        return total, steps, SpikeTrace(curve, sample_steps)


class ChunkObserver(Protocol):
    """What ``SpikingViT.observe_chunks`` calls."""

    def call_started(self) -> None: ...

    def chunk_done(self, t0: int, steps: int) -> None: ...


def _chunk_sizes(chunk: object) -> tuple[int, ...]:
    """``chunk`` as a schedule: ``(chunk,)`` for one size, else the sizes of the first chunks
    in order (the last repeating). Raises ``TypeError``/``ValueError`` naming ``chunk``."""
    if isinstance(chunk, int) and not isinstance(chunk, bool):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        return (chunk,)
    if isinstance(chunk, (str, bytes)) or not isinstance(chunk, Sequence):
        raise TypeError(f"chunk must be an int or a sequence of ints, got {type(chunk).__name__}")
    if len(chunk) == 0:
        raise ValueError("chunk must not be an empty sequence")
    for size in chunk:
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"chunk sizes must be ints, got {type(size).__name__}")
        if size < 1:
            raise ValueError(f"chunk sizes must be >= 1, got {size}")
    return tuple(chunk)


class _EagerChunks:
    """The runner's default way through a chunk (``ChunkGraph``'s interface): a fresh state
    per call, every chunk through the modules, fresh fired flags that every neuron is told
    to watch: a ``[n, B]`` row of one ``[neurons, n, B]`` tensor each (its own, so that a
    float neuron's ``silent()`` reads them instead of a copy of its spikes), reduced over the
    neurons for the runner."""

    def __init__(self, snn: SpikingViT) -> None:
        self.snn = snn
        self.neurons = snn.neurons()

    def start(self, patches: torch.Tensor) -> None:
        """A fresh call on images whose ``patch_embed.first_step`` is ``patches``."""
        self.snn.reset()
        self.patches = patches

    def step(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (len(self.neurons), n, self.patches.shape[0])
        flags = torch.zeros(shape, dtype=torch.int32, device=self.patches.device)
        for neuron, own in zip(self.neurons, flags, strict=True):
            neuron.watch(own)
        return self.snn.step_chunk(self.patches, n), flags.amax(dim=0)

    def finish(self) -> None:
        """Nothing to hand over: the modules' state is this call's own."""


def _settle(
    sample_steps: torch.Tensor, active: torch.Tensor, t0: int, max_steps: int
) -> torch.Tensor:
    """Update each sample's settle step (``max_steps`` = not yet) from a chunk's ``[T, B]``
    fired flags: the first global step ``t >= 1`` at which none of its neurons fired."""
    silent = ~active
    if t0 == 0:
        silent[0] = False  # the image and the biases enter at step 0
    first = t0 + silent.to(torch.int8).argmax(dim=0)
    newly = (sample_steps == max_steps) & silent.any(dim=0)
    return torch.where(newly, first, sample_steps)

"""QANN -> SNN conversion (SpikeZIP-TF) and the runner: time in chunks, stop when silent.

``convert(qann)`` turns a quantized ViT (``spikekernels.models.QuantViT``, or the official
timm/MAE ViT after ``myquan_replace``) into a ``SpikingViT`` built from our modules, sharing
the QANN's weights (no copies): every quantizer becomes an ST-BIF neuron with the same step and
bounds, every linear a spike linear with its bias at step 0, every LayerNorm a Spike-LayerNorm
(the QANN's eps), the attention a ``SpikeAttention`` (SPEC.md §7).

``snn(x, max_steps=64, chunk=8)`` runs it: the image enters at t = 0 (patch conv with its bias,
class token, position embedding), zeros after; each call of a module processes ``chunk`` steps
at once (multi-step kernels), state carried between chunks, so memory is bounded by the chunk.

Silence (SPEC.md §7). After step 0 (the image and every bias enter there) nothing enters the
network from outside, so a step where no neuron fires is followed only by zero increments: a
spike linear of zero spikes is 0, a spike product of two zero increments is 0, Spike-Softmax and
Spike-LayerNorm recompute the same ``Y`` from an unchanged ``X`` (0 out), and a neuron that did
not fire with its membrane unchanged does not fire on the next step either. So the first step
``t >= 1`` at which no neuron of a sample fires settles that sample: its logits are final, and
``steps`` counts the steps before it. Samples of a batch never interact, so this holds per
sample; the batch stops with its slowest sample.

Sync points: per chunk, each neuron's spikes are reduced on the device to ``[T, B]`` "fired"
flags (OR-ed over all neurons), the per-sample settle step is updated on the device, and the
runner reads one integer (the batch's latest settle step) to decide whether to stop: one host
sync per chunk, none inside it, none per layer. The price of an exact, chunk-independent settle
step is one extra read of each neuron's int8 spikes (an ``any`` over ``[T, B, -1]``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from spikekernels import reference
from spikekernels.nn.attention import (
    SpikeAttention,
    StepOps,
    neuron_from_quantizer,
)
from spikekernels.nn.layernorm import SpikeLayerNorm
from spikekernels.nn.linear import SpikeLinear
from spikekernels.nn.neuron import STBIF

__all__ = ["SpikeBlock", "SpikeMlp", "SpikePatchEmbed", "SpikeTrace", "SpikingViT", "convert"]


class SpikeTrace(NamedTuple):
    """What ``SpikingViT(..., return_trace=True)`` returns third.

    ``logits``: ``[steps, B, num_classes]``, the logits summed up to and including each step
    (``logits[-1]`` is the final answer; the curve for an accuracy-vs-time plot).
    ``sample_steps``: ``[B]`` int64, the step at which each sample fell silent (``max_steps``
    if it did not).
    """

    logits: torch.Tensor
    sample_steps: torch.Tensor


class _ActivityOps(StepOps):
    """The fused ops, plus a ``[T, B]`` record of which samples had a neuron fire per step."""

    def start(self, steps: int, batch: int, device: torch.device) -> None:
        self.active = torch.zeros(steps, batch, dtype=torch.bool, device=device)

    def _record(self, out: torch.Tensor) -> torch.Tensor:
        self.active |= out.reshape(out.shape[0], out.shape[1], -1).any(dim=-1)
        return out

    def neuron(self, m: STBIF, x: torch.Tensor) -> torch.Tensor:
        return self._record(super().neuron(m, x))


class _ReferenceOps(_ActivityOps):
    """The per-step reference ops of ``spikekernels.reference``, state kept here.

    Neuron state is also written back into the ``STBIF`` modules (``v``, ``s``, ``last_spikes``) so
    that counts can be read after a reference run the same way as after a fast one.
    """

    def __init__(self) -> None:
        self.state: dict[int, object] = {}

    def neuron(self, m: STBIF, x: torch.Tensor) -> torch.Tensor:
        out, m.v, m.s = reference.st_bif(
            x, m.threshold, m.n_min, m.p_max, m.v, m.s, float_out=m.float_out
        )
        m.last_spikes = out[-1]
        return self._record(out)

    def linear(self, m: nn.Module, s: torch.Tensor) -> torch.Tensor:
        t0 = self.state.get(id(m), 0)
        self.state[id(m)] = t0 + s.shape[0]
        return reference.spike_linear(
            s, m.weight, m.threshold, m.bias, t0=t0, bias_steps=m.bias_steps
        )

    def layernorm(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x_acc, y_prev = self.state.get(id(m), (None, None))
        out, x_acc, y_prev = reference.spike_layernorm(x, m.weight, m.bias, m.eps, x_acc, y_prev)
        self.state[id(m)] = (x_acc, y_prev)
        return out

    def softmax(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x_acc, y_prev = self.state.get(id(m), (None, None))
        out, x_acc, y_prev = reference.spike_softmax(x, x_acc, y_prev)
        self.state[id(m)] = (x_acc, y_prev)
        return out

    def matmul(self, owner, name, a, b, scale):
        a_acc, b_acc = self.state.get((id(owner), name), (None, None))
        out, a_acc, b_acc = reference.spike_matmul(a, b, scale, a_acc, b_acc)
        self.state[(id(owner), name)] = (a_acc, b_acc)
        return out


class SpikePatchEmbed(nn.Module):
    """Patch embedding at t = 0: the QANN's conv (shared, with its bias), then a signed neuron.

    ``first_step(img)`` is the conv output ``[B, N_patches, D]`` (float, computed once);
    ``forward`` feeds it at global step 0 (zeros after) through the neuron and prepends the
    class token; class token and position embedding join at step 0. Returns the residual
    stream's increments ``[T, B, 1 + N_patches, D]`` float32.
    """

    def __init__(
        self, conv: nn.Conv2d, neuron: STBIF, cls_token: nn.Parameter, pos_embed: nn.Parameter
    ) -> None:
        super().__init__()
        self.proj = conv
        self.neuron = neuron
        self.cls_token = cls_token
        self.pos_embed = pos_embed

    def first_step(self, img: torch.Tensor) -> torch.Tensor:
        return self.proj(img).flatten(2).transpose(1, 2)

    def reset(self) -> None:
        self.neuron.reset()

    def forward(
        self, patches0: torch.Tensor | None, steps: int, batch: int, ops: StepOps
    ) -> torch.Tensor:
        n, d = self.pos_embed.shape[1] - 1, self.pos_embed.shape[2]
        device = self.pos_embed.device
        u = torch.zeros(steps, batch, n, d, device=device)
        if patches0 is not None:
            u[0] = patches0
        p = ops.neuron(self.neuron, u)
        x = torch.cat((torch.zeros(steps, batch, 1, d, device=device), p), dim=2)
        if patches0 is not None:
            x[0, :, :1] += self.cls_token[0].to(x.dtype)
            x[0] += self.pos_embed[0].to(x.dtype)
        return x


class SpikeMlp(nn.Module):
    """``fc1`` spike linear -> unsigned neuron -> ``fc2`` spike linear -> signed neuron.

    The QANN's ReLU after the unsigned quantizer is the identity on its output and is dropped.
    In: int8 spikes ``[T, B, N, D]``; out: the fc2 neuron's output (float increments when built
    with ``float_out=True``).
    """

    def __init__(self, fc1: nn.Module, act_if: STBIF, fc2: nn.Module, fc2_if: STBIF) -> None:
        super().__init__()
        self.fc1, self.act_if, self.fc2, self.fc2_if = fc1, act_if, fc2, fc2_if

    def reset(self) -> None:
        for m in (self.fc1, self.act_if, self.fc2, self.fc2_if):
            m.reset()

    def forward(self, s: torch.Tensor, ops: StepOps) -> torch.Tensor:
        h = ops.neuron(self.act_if, ops.linear(self.fc1, s))
        return ops.neuron(self.fc2_if, ops.linear(self.fc2, h))


class SpikeBlock(nn.Module):
    """``x + attn(norm1_if(norm1(x)))`` then ``x + mlp(norm2_if(norm2(x)))`` on increments."""

    def __init__(
        self,
        norm1: nn.Module,
        norm1_if: STBIF,
        attn: SpikeAttention,
        norm2: nn.Module,
        norm2_if: STBIF,
        mlp: SpikeMlp,
    ) -> None:
        super().__init__()
        self.norm1, self.norm1_if, self.attn = norm1, norm1_if, attn
        self.norm2, self.norm2_if, self.mlp = norm2, norm2_if, mlp

    def reset(self) -> None:
        for m in (self.norm1, self.norm1_if, self.attn, self.norm2, self.norm2_if, self.mlp):
            m.reset()

    def forward(self, x: torch.Tensor, ops: StepOps) -> torch.Tensor:
        x = x + self.attn(ops.neuron(self.norm1_if, ops.layernorm(self.norm1, x)), ops)
        return x + self.mlp(ops.neuron(self.norm2_if, ops.layernorm(self.norm2, x)), ops)


class SpikingViT(nn.Module):
    """The SNN of a quantized ViT (SPEC.md §7); build it with ``convert(qann)``.

    Call ``snn(x, max_steps=64, chunk=8)`` with images ``[B, C, H, W]``: returns
    ``(logits [B, num_classes] float32, steps)``, the logits summed over time and the number
    of steps the batch needed (its slowest sample's settle step, see the module docstring),
    or ``max_steps`` if it did not fall silent by then. With ``return_trace=True`` a third
    element, a ``SpikeTrace``. ``reference=True`` runs the same network one step at a time
    with the per-step ops of ``spikekernels.reference`` (a host sync per step, as the official
    ``SNNWrapper`` does): the baseline to time against, and the tests' oracle.

    State is reset at the start of each call; after a call every neuron's ``count`` holds its
    spike count (after silence: the QANN quantizer's integer). Inference only.
    """

    def __init__(
        self,
        patch_embed: SpikePatchEmbed,
        blocks: list[SpikeBlock],
        norm: nn.Module,
        norm_if: STBIF,
        head: nn.Module,
        *,
        global_pool: bool,
        image_shape: tuple[int, int, int],
        num_classes: int,
    ) -> None:
        super().__init__()
        self.patch_embed = patch_embed
        self.blocks = nn.ModuleList(blocks)
        self.norm, self.norm_if, self.head = norm, norm_if, head
        self.global_pool = global_pool
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes

    def reset(self) -> None:
        """Back to the fresh state (every neuron, norm, softmax, linear step, product)."""
        self.patch_embed.reset()
        for block in self.blocks:
            block.reset()
        for m in (self.norm, self.norm_if, self.head):
            m.reset()

    def step_chunk(
        self, patches0: torch.Tensor | None, steps: int, batch: int, ops: StepOps
    ) -> torch.Tensor:
        """Run ``steps`` time steps of the whole network; ``patches0`` is the t = 0 input
        (``patch_embed.first_step(img)``) or None for a later chunk. Returns the head's
        per-step logits increments ``[steps, B, num_classes]``."""
        x = self.patch_embed(patches0, steps, batch, ops)
        for block in self.blocks:
            x = block(x, ops)
        feature = x[:, :, 1:].mean(dim=2) if self.global_pool else x[:, :, 0].contiguous()
        s = ops.neuron(self.norm_if, ops.layernorm(self.norm, feature))
        return ops.linear(self.head, s)

    def _check_call(self, x: object, max_steps: object, chunk: object) -> None:
        for name, value in (("max_steps", max_steps), ("chunk", chunk)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of images, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point image batch, got dtype {x.dtype}")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape or x.shape[0] == 0:
            expected = ", ".join(map(str, self.image_shape))
            raise ValueError(
                f"x must be images of shape [B, {expected}] with B >= 1, got {list(x.shape)}"
            )
        device = self.patch_embed.pos_embed.device
        if x.device != device:
            raise ValueError(f"x is on {x.device} but the model is on {device}")

    @torch.no_grad()
    def forward(
        self,
        x: torch.Tensor,
        max_steps: int = 64,
        chunk: int = 8,
        *,
        return_trace: bool = False,
        reference: bool = False,
    ):
        self._check_call(x, max_steps, chunk)
        self.reset()
        if reference:
            ops: _ActivityOps = _ReferenceOps()
            chunk = 1
        else:
            ops = _ActivityOps()
        batch, device = x.shape[0], x.device
        patches0 = self.patch_embed.first_step(x.to(self.patch_embed.pos_embed.dtype))
        sample_steps = torch.full((batch,), max_steps, dtype=torch.int64, device=device)
        total = torch.zeros(batch, self.num_classes, device=device)
        cumulative = []
        t0, steps = 0, max_steps
        while t0 < max_steps:
            n = min(chunk, max_steps - t0)
            ops.start(n, batch, device)
            logits = self.step_chunk(patches0 if t0 == 0 else None, n, batch, ops)
            # Step by step, so that the sum's rounding does not depend on the chunk size.
            for t in range(n):
                total = total + logits[t]
                if return_trace:
                    cumulative.append(total)
            sample_steps = _settle(sample_steps, ops.active, t0, max_steps)
            t0 += n
            steps = int(sample_steps.max())  # the one host sync per chunk
            if steps < max_steps:
                break
        if not return_trace:
            return total, steps
        trace = SpikeTrace(torch.stack(cumulative[:steps]), sample_steps)
        return total, steps, trace


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


# --- conversion --------------------------------------------------------------------------


class _Converter:
    """Walks the QANN by name; every error names the module it cannot convert."""

    def __init__(self, qann: nn.Module) -> None:
        self.qann = qann
        self.used: set[int] = set()

    def get(self, path: str, types: type | tuple[type, ...] | None = None) -> nn.Module:
        obj: object = self.qann
        for part in path.split("."):
            if isinstance(obj, (nn.Sequential, nn.ModuleList)) and part.isdigit():
                obj = obj[int(part)] if int(part) < len(obj) else None
            else:
                obj = getattr(obj, part, None)
            if obj is None:
                raise TypeError(
                    f"convert: cannot convert {type(self.qann).__name__}: it has no `{path}` "
                    "(expected the QuantViT / official SpikeZIP-TF QANN layout)"
                )
        if types is not None and not isinstance(obj, types):
            names = (
                types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
            )
            raise TypeError(
                f"convert: cannot convert module `{path}` ({type(obj).__name__}): expected {names}"
            )
        if isinstance(obj, nn.Module):
            self.used.add(id(obj))
        return obj

    def neuron(self, path: str, *, signed: bool | None = None, float_out: bool = False) -> STBIF:
        q = self.get(path)
        if not hasattr(q, "s") or not hasattr(q, "level"):
            raise TypeError(
                f"convert: cannot convert module `{path}` ({type(q).__name__}): expected a "
                "quantizer (Quantizer / MyQuan) there"
            )
        try:
            neuron = neuron_from_quantizer(q, float_out=float_out)
        except ValueError as err:
            raise ValueError(f"convert: cannot convert module `{path}`: {err}") from None
        if signed is not None and neuron.signed != signed:
            kind = "signed" if signed else "unsigned"
            raise ValueError(f"convert: quantizer `{path}` must be {kind} (SPEC.md §7)")
        return neuron

    def container(self, path: str) -> None:
        self.used.add(id(self.get(path)))

    def check_all_used(self) -> None:
        ignorable = (nn.Dropout, nn.Identity)
        for name, m in self.qann.named_modules():
            if id(m) in self.used or isinstance(m, ignorable) or name == "":
                continue
            if any(True for _ in m.children()):
                continue  # containers are judged by their leaves
            raise TypeError(
                f"convert: cannot convert module `{name}` ({type(m).__name__}): it has no "
                "place in the SpikeZIP-TF ViT (SPEC.md §7)"
            )


def _check_relu_identity(c: _Converter, path: str) -> None:
    """The MLP's ``act`` is ``(unsigned quantizer, ReLU)``: the ReLU is then the identity."""
    act = c.get(path, nn.Sequential)
    for i, m in enumerate(act):
        if i == 0:
            continue
        if not isinstance(m, (nn.ReLU, nn.Identity, nn.Dropout)):
            raise TypeError(
                f"convert: cannot convert module `{path}.{i}` ({type(m).__name__}): after the "
                "unsigned quantizer only a ReLU (the identity there) can follow"
            )
        c.used.add(id(m))


def convert(qann: nn.Module) -> SpikingViT:
    """The SNN of a quantized ViT: ``SpikingViT`` sharing ``qann``'s weights (no copies).

    ``qann``: ``spikekernels.models.QuantViT`` or a model with the same layout (the official
    timm/MAE ViT after ``myquan_replace``; Identity/Dropout modules are skipped). Thresholds
    are the quantizers' steps at conversion time (copied: later changes to ``s`` do not
    reach the SNN). Raises TypeError naming the first module it cannot convert (a missing
    quantizer, a GELU, an unknown layer) and ValueError for a disabled quantizer.
    """
    if not isinstance(qann, nn.Module):
        raise TypeError(f"convert expects an nn.Module (a QANN ViT), got {type(qann).__name__}")
    c = _Converter(qann)
    c.container("patch_embed")
    c.container("patch_embed.proj")
    conv = c.get("patch_embed.proj.0", nn.Conv2d)
    patch_if = c.neuron("patch_embed.proj.1", signed=True, float_out=True)
    cls_token = c.get("cls_token", nn.Parameter)
    pos_embed = c.get("pos_embed", nn.Parameter)
    patch_embed = SpikePatchEmbed(conv, patch_if, cls_token, pos_embed)

    blocks = []
    for i in range(len(c.get("blocks", (nn.ModuleList, nn.Sequential)))):
        p = f"blocks.{i}"
        c.container(p)
        norm1_if = c.neuron(f"{p}.norm1.1", signed=True)
        qattn = c.get(f"{p}.attn")
        for name in ("quan_q", "quan_k", "quan_v", "attn_quan", "after_attn_quan", "quan_proj"):
            c.neuron(f"{p}.attn.{name}")  # checks each and marks it converted
        for name in ("qkv", "proj"):
            c.get(f"{p}.attn.{name}", nn.Linear)
        attn = SpikeAttention.from_quant(qattn, norm1_if.threshold, float_out=True)
        norm2_if = c.neuron(f"{p}.norm2.1", signed=True)
        act_if = c.neuron(f"{p}.mlp.act.0", signed=False)
        _check_relu_identity(c, f"{p}.mlp.act")
        fc2 = c.get(f"{p}.mlp.fc2.0", nn.Linear)
        mlp = SpikeMlp(
            SpikeLinear.from_linear(c.get(f"{p}.mlp.fc1", nn.Linear), norm2_if.threshold),
            act_if,
            SpikeLinear.from_linear(fc2, act_if.threshold),
            c.neuron(f"{p}.mlp.fc2.1", signed=True, float_out=True),
        )
        blocks.append(
            SpikeBlock(
                SpikeLayerNorm.from_layernorm(c.get(f"{p}.norm1.0", nn.LayerNorm)),
                norm1_if,
                attn,
                SpikeLayerNorm.from_layernorm(c.get(f"{p}.norm2.0", nn.LayerNorm)),
                norm2_if,
                mlp,
            )
        )

    pool = getattr(qann, "global_pool", False)
    global_pool = pool is True or pool == "avg"
    final = "fc_norm" if global_pool else "norm"
    norm_if = c.neuron(f"{final}.1", signed=True)
    norm = SpikeLayerNorm.from_layernorm(c.get(f"{final}.0", nn.LayerNorm))
    head_linear = c.get("head", nn.Linear)
    head = SpikeLinear.from_linear(head_linear, norm_if.threshold)
    c.check_all_used()

    in_chans = conv.in_channels
    side = int(round((pos_embed.shape[1] - 1) ** 0.5)) * conv.stride[0]
    image_shape = getattr(qann, "img_size", side)
    if isinstance(image_shape, int):
        image_shape = (in_chans, image_shape, image_shape)
    else:
        image_shape = (in_chans, *tuple(image_shape))
    return SpikingViT(
        patch_embed,
        blocks,
        norm,
        norm_if,
        head,
        global_pool=global_pool,
        image_shape=image_shape,
        num_classes=head_linear.out_features,
    )

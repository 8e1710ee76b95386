"""QANN -> SNN conversion (SpikeZIP-TF): ``convert(qann)`` builds the ``SpikingViT``.

The QANN is ``spikekernels.models.QuantViT`` or a model with the same layout (the official
timm/MAE ViT after ``compat.spikezip.myquan_replace``). Its modules are walked by name; every
error names the module it cannot convert. The SNN shares the QANN's weights (no copies) where
the two use the same tensors, and is built in one of two modes (``spikekernels.models.
spiking_vit`` describes both):

- **exact** (SPEC.md §9) when every linear has integer weights (``QuantLinear``, see
  ``spikekernels.models.quantize_weights``): target-driven neurons and exact state; at silence
  its counts and logits equal the QANN's bit for bit.
- **float** (SPEC.md §2-§7) when every linear is float: ST-BIF neurons, float increments.

Each neuron's ``fanout`` is set to the synaptic operations one of its spikes causes downstream
(the consuming linear's width; for the spike products the other operand's dimension), for
SOP counting.
"""

from __future__ import annotations

import copy
import itertools
from functools import partial

import torch
from torch import nn

from spikekernels import exact_math
from spikekernels.levels import level_bounds
from spikekernels.models.exact_forward import check_exact_attention, residual_constant
from spikekernels.models.spiking_vit import (
    ExactBlock,
    ExactMlp,
    ExactPatchEmbed,
    ExactReadout,
    NeuronSite,
    SpikeBlock,
    SpikeMlp,
    SpikePatchEmbed,
    SpikeReadout,
    SpikeTrace,
    SpikingViT,
)
from spikekernels.nn.attention import SpikeAttention
from spikekernels.nn.conversion import neuron_from_quantizer, target_neuron_from_quantizers
from spikekernels.nn.exact_attention import ExactAttention, ExactAttentionProbs, ExactContext
from spikekernels.nn.exact_layers import (
    ExactLayerNorm,
    ExactLayerNormNeuron,
    ExactLinear,
    ExactLinearNeuron,
)
from spikekernels.nn.layernorm import SpikeLayerNormNeuron
from spikekernels.nn.linear import SpikeLinear
from spikekernels.nn.linear_neuron import SpikeLinearNeuron
from spikekernels.nn.quant_linear import QuantLinear, all_integer
from spikekernels.nn.target_neuron import TargetNeuron
from spikekernels.ops._checks import check_threshold_values

__all__ = ["SpikeTrace", "SpikingViT", "convert"]

# Exact mode's residual sum is exact in float64 while the steps feeding it span at most
# 2^16 (SPEC.md §9.2), and while the terms, the depth and the counts together fit 53 bits
# (`_check_residual_sum`).
_RESIDUAL_STEP_SPAN = 2.0**16


class _Walker:
    """Walks the QANN by name; every error names the module it cannot convert."""

    def __init__(self, qann: nn.Module) -> None:
        self.qann = qann
        self.used: set[int] = set()
        self.exact = False  # the mode being built: exact mode's counts are int8

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

    def quantizer(
        self, path: str, *, signed: bool | None = None, int8_counts: bool = False
    ) -> nn.Module:
        """The quantizer at ``path``, checked. Its counts must fit int8 in exact mode, and
        with ``int8_counts`` (float mode's spike-product operands)."""
        q = self.get(path)
        if not hasattr(q, "s") or not hasattr(q, "level"):
            raise TypeError(
                f"convert: cannot convert module `{path}` ({type(q).__name__}): expected a "
                "quantizer (Quantizer / MyQuan) there"
            )
        if not getattr(q, "enabled", True):
            raise ValueError(
                f"convert: cannot convert module `{path}`: a disabled quantizer (float "
                "network) has no spiking equivalent"
            )
        is_signed = bool(getattr(q, "signed", getattr(q, "sym", False)))
        if signed is not None and is_signed != signed:
            kind = "signed" if signed else "unsigned"
            raise ValueError(f"convert: quantizer `{path}` must be {kind} (SPEC.md §7)")
        if getattr(q.s, "numel", lambda: 1)() != 1:
            raise ValueError(
                f"convert: quantizer `{path}` has a step s of shape {tuple(q.s.shape)}; a "
                "neuron takes one step per quantizer"
            )
        # the ops' one threshold rule, named by the quantizer (a damaged checkpoint, say)
        check_threshold_values(torch.as_tensor(q.s).detach(), f"convert: quantizer `{path}` step s")
        n_min, p_max = level_bounds(int(q.level), is_signed)
        if (self.exact or int8_counts) and (n_min < -128 or p_max > 127):
            whose = "exact mode's" if self.exact else "the spike products'"
            raise ValueError(
                f"convert: quantizer `{path}` has level {int(q.level)} "
                f"({'signed' if is_signed else 'unsigned'}): its counts [{n_min}, {p_max}] "
                f"overflow {whose} int8 counts (levels up to 256 signed / 128 unsigned)"
            )
        return q

    def neuron(self, path: str, *, signed: bool | None = None, float_out: bool = False):
        return neuron_from_quantizer(self.quantizer(path, signed=signed), float_out=float_out)

    def target_neuron(self, path: str, *, signed: bool | None = None):
        return target_neuron_from_quantizers([self.quantizer(path, signed=signed)])

    def container(self, path: str) -> None:
        self.used.add(id(self.get(path)))

    def linears(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.qann.named_modules() if isinstance(m, nn.Linear)]

    def check_relu_identity(self, path: str) -> None:
        """The MLP's ``act`` is ``(unsigned quantizer, ReLU)``: the ReLU is then the identity."""
        act = self.get(path, nn.Sequential)
        for i, m in enumerate(act):
            if i == 0:
                continue
            if not isinstance(m, (nn.ReLU, nn.Identity, nn.Dropout)):
                raise TypeError(
                    f"convert: cannot convert module `{path}.{i}` ({type(m).__name__}): after "
                    "the unsigned quantizer only a ReLU (the identity there) can follow"
                )
            self.used.add(id(m))

    def check_all_used(self) -> None:
        ignorable = (nn.Dropout, nn.Identity)
        for name, m in self.qann.named_modules():
            if id(m) in self.used or isinstance(m, ignorable) or name == "":
                continue
            if type(m).__name__ == "DropPath":  # timm's stochastic depth: the identity in eval
                continue
            if any(True for _ in m.children()):
                continue  # containers are judged by their leaves
            raise TypeError(
                f"convert: cannot convert module `{name}` ({type(m).__name__}): it has no "
                "place in the SpikeZIP-TF ViT (SPEC.md §7)"
            )
        # A container's own tensors (a layer scale `gamma_1` on a block, an extra token) would
        # be dropped without a word: only the class token and the position embedding belong.
        for name, m in self.qann.named_modules():
            if not any(True for _ in m.children()):
                continue  # a leaf's tensors are what its conversion reads
            own = itertools.chain(m.named_parameters(recurse=False), m.named_buffers(recurse=False))
            for tensor_name, _ in own:
                if name == "" and tensor_name in ("cls_token", "pos_embed"):
                    continue
                full = f"{name}.{tensor_name}" if name else tensor_name
                raise TypeError(
                    f"convert: cannot convert `{full}` (a tensor of {type(m).__name__} itself): "
                    "it has no place in the SpikeZIP-TF ViT (SPEC.md §7) and would be ignored"
                )


def _image_shape(qann: nn.Module, conv: nn.Conv2d, pos_embed: torch.Tensor):
    side = int(round((pos_embed.shape[1] - 1) ** 0.5)) * conv.stride[0]
    size = getattr(qann, "img_size", side)
    if isinstance(size, int):
        return (conv.in_channels, size, size)
    return (conv.in_channels, *tuple(size))


def _heads_to_qann(t: torch.Tensor, h: int) -> torch.Tensor:
    """A token-major count ``[B, N, C]`` as the QANN's head-major ``[B, H, N, C / H]``."""
    b, n, c = t.shape
    return t.reshape(b, n, h, c // h).transpose(1, 2)


def _qkv_part_to_qann(t: torch.Tensor, j: int, dim: int, h: int) -> torch.Tensor:
    """Part ``j`` (q, k, v) of the fused qkv neuron's count ``[B, N, 3 dim]``, head-major."""
    return _heads_to_qann(t[..., j * dim : (j + 1) * dim], h)


def _patches_to_qann(t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The patch neuron's ``[B, N, D]`` as the conv output's ``[B, D, H', W']``."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def convert(qann: nn.Module, exact: bool | None = None) -> SpikingViT:
    """The SNN of a quantized ViT, sharing ``qann``'s weights where it can (no copies).

    Sharing: the SNN's weight tensors are detached views of the QANN's (one copy in memory);
    its thresholds are copies of the quantizers' steps and its modules are its own, so moving
    or casting either model leaves the other where it was (a move ends the sharing). Change
    the QANN's weights after conversion (training, ``load_state_dict``) only to convert again;
    ``snn.load_state_dict`` writes the shared weights, the QANN's too (``copy.deepcopy`` one
    of them first for two independent models).

    ``exact=None`` (default) picks the mode from the weights: exact when every linear has
    integer weights, float when none has. ``exact=True`` on a float QANN raises a ValueError
    that says to call ``spikekernels.models.quantize_weights`` first; ``exact=False`` on an
    integer QANN builds the float SNN with the dequantized int8 weights. A QANN that mixes
    both kinds of linear raises a ValueError. Thresholds are the quantizers' steps at
    conversion time (copied). Raises TypeError naming the first module it cannot convert (a
    missing quantizer, a GELU, an unknown layer, a tensor held by a container such as a layer
    scale) and ValueError naming the quantizer or tensor for a disabled quantizer, a step that
    is not a positive normal float32, a level whose counts overflow exact mode's int8, or a
    QANN that is not float32.
    """
    if not isinstance(qann, nn.Module):
        raise TypeError(f"convert expects an nn.Module (a QANN ViT), got {type(qann).__name__}")
    if exact is not None and not isinstance(exact, bool):
        raise TypeError(f"exact must be True, False or None, got {type(exact).__name__}")
    c = _Walker(qann)
    integer = all_integer(c.linears())  # exact mode's weights; ValueError for a mix
    if exact and not integer:
        raise ValueError(
            "convert(exact=True) needs integer weights: call "
            "spikekernels.models.quantize_weights(qann) first (per-channel int8, SPEC.md §9.1)"
        )
    for name, t in itertools.chain(qann.named_parameters(), qann.named_buffers()):
        if t.is_floating_point() and t.dtype != torch.float32:
            raise ValueError(
                f"convert: `{name}` is {t.dtype}: conversion takes a float32 QANN (the SNN's "
                "stream and state are float32; call qann.float() first)"
            )
    c.exact = integer if exact is None else exact
    return (_convert_exact if c.exact else _convert_float)(qann, c)


def _stem(c: _Walker):
    c.container("patch_embed")
    c.container("patch_embed.proj")
    conv = c.get("patch_embed.proj.0", nn.Conv2d)
    return _own_conv(conv), c.get("cls_token", nn.Parameter), c.get("pos_embed", nn.Parameter)


def _own_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """The SNN's own copy of the patch conv (small), without the QANN's hooks: a shared
    module moved its weights with either model (``snn.to(device)`` left the QANN split
    across devices)."""
    own = copy.deepcopy(conv)
    for hooks in (own._forward_hooks, own._forward_pre_hooks, own._backward_hooks):
        hooks.clear()
    return own


def _float_norm(c: _Walker, path: str) -> SpikeLayerNormNeuron:
    """The QANN's ``path`` = ``Sequential(LayerNorm, quantizer)`` as one fused Spike-LayerNorm
    + signed neuron."""
    neuron = c.neuron(f"{path}.1", signed=True)
    return SpikeLayerNormNeuron.from_layernorm_and_neuron(c.get(f"{path}.0", nn.LayerNorm), neuron)


def _final_norm_path(qann: nn.Module) -> tuple[str, bool]:
    pool = getattr(qann, "global_pool", False)
    global_pool = pool is True or pool == "avg"
    return ("fc_norm" if global_pool else "norm"), global_pool


def _block_sites(p: str, h: int, dim: int, neurons: dict[str, nn.Module]) -> list[NeuronSite]:
    """A block's quantizers and their neurons (both modes): ``neurons`` maps ``norm1``,
    ``qkv`` (the fused q, k, v neuron: three channel blocks of ``dim``), ``attn``, ``after``,
    ``proj``, ``norm2``, ``act`` and ``fc2`` to the modules that hold the counts. (Layouts are
    partials of module-level functions, never lambdas: the SNN pickles, ``torch.save``.)"""
    n = neurons
    return [
        NeuronSite(f"{p}.norm1.1", n["norm1"], _same),
        NeuronSite(f"{p}.attn.quan_q", n["qkv"], partial(_qkv_part_to_qann, j=0, dim=dim, h=h)),
        NeuronSite(f"{p}.attn.quan_k", n["qkv"], partial(_qkv_part_to_qann, j=1, dim=dim, h=h)),
        NeuronSite(f"{p}.attn.quan_v", n["qkv"], partial(_qkv_part_to_qann, j=2, dim=dim, h=h)),
        NeuronSite(f"{p}.attn.attn_quan", n["attn"], _same),
        NeuronSite(f"{p}.attn.after_attn_quan", n["after"], _same),
        NeuronSite(f"{p}.attn.quan_proj", n["proj"], _same),
        NeuronSite(f"{p}.norm2.1", n["norm2"], _same),
        NeuronSite(f"{p}.mlp.act.0", n["act"], _same),
        NeuronSite(f"{p}.mlp.fc2.1", n["fc2"], _same),
    ]


def _set_block_fanouts(tokens: int, dim: int, dh: int, hidden: int, n: dict[str, nn.Module]):
    """Synaptic operations one spike of each neuron causes downstream (SOP counts)."""
    n["norm1"].fanout = 3 * dim
    # q spikes meet N keys, k spikes N queries, v spikes N queries (SPEC.md §5).
    n["qkv"].fanout = tokens
    n["attn"].fanout = dh
    n["after"].fanout = dim
    n["norm2"].fanout = hidden
    n["act"].fanout = dim


def _convert_float(qann: nn.Module, c: _Walker) -> SpikingViT:
    conv, cls_token, pos_embed = _stem(c)
    patch_if = c.neuron("patch_embed.proj.1", signed=True, float_out=True)
    grid = (conv_grid := int(round((pos_embed.shape[1] - 1) ** 0.5)), conv_grid)
    sites = [NeuronSite("patch_embed.proj.1", patch_if, partial(_patches_to_qann, grid=grid))]
    blocks = []
    for i in range(len(c.get("blocks", (nn.ModuleList, nn.Sequential)))):
        p = f"blocks.{i}"
        c.container(p)
        norm1_if = _float_norm(c, f"{p}.norm1")
        qattn = c.get(f"{p}.attn")
        for name in ("quan_q", "quan_k", "quan_v", "attn_quan", "after_attn_quan", "quan_proj"):
            # checks each and marks it converted; the spike products' operands (q, k, v, the
            # attention probabilities) and the context neuron fused with its product keep
            # int8 counts
            product = name != "quan_proj"
            c.quantizer(f"{p}.attn.{name}", int8_counts=product)
        c.get(f"{p}.attn.qkv", nn.Linear), c.get(f"{p}.attn.proj", nn.Linear)
        try:
            attn = SpikeAttention.from_quant(qattn, norm1_if.threshold)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"convert: cannot convert module `{p}.attn`: {exc}") from exc
        norm2_if = _float_norm(c, f"{p}.norm2")
        act_if = c.neuron(f"{p}.mlp.act.0", signed=False)
        c.check_relu_identity(f"{p}.mlp.act")
        fc1 = SpikeLinearNeuron.from_linear_and_neuron(
            c.get(f"{p}.mlp.fc1", nn.Linear), act_if, norm2_if.threshold
        )
        fc2 = SpikeLinearNeuron.from_linear_and_neuron(
            c.get(f"{p}.mlp.fc2.0", nn.Linear),
            c.neuron(f"{p}.mlp.fc2.1", signed=True),
            act_if.threshold,
        )
        blocks.append(SpikeBlock(norm1_if, attn, norm2_if, SpikeMlp(fc1, fc2)))
        neurons = dict(norm1=norm1_if, qkv=attn.qkv, attn=attn.attn_if, after=attn.after_attn_if,
                       proj=attn.proj, norm2=norm2_if, act=fc1, fc2=fc2)  # fmt: skip
        _set_block_fanouts(pos_embed.shape[1], attn.dim, attn.head_dim, fc1.out_features, neurons)
        sites += _block_sites(p, attn.num_heads, attn.dim, neurons)

    final, global_pool = _final_norm_path(qann)
    norm_if = _float_norm(c, final)
    head_linear = c.get("head", nn.Linear)
    norm_if.fanout = head_linear.out_features
    sites.append(NeuronSite(f"{final}.1", norm_if, _same))
    head = SpikeLinear.from_linear(head_linear, norm_if.threshold)
    readout = SpikeReadout(norm_if, head, global_pool)
    c.check_all_used()
    return SpikingViT(
        SpikePatchEmbed(conv, patch_if, cls_token, pos_embed),
        blocks,
        readout,
        exact=False,
        image_shape=_image_shape(qann, conv, pos_embed),
        num_classes=head_linear.out_features,
        sites=sites,
    )


def _exact_linear(linear: QuantLinear, source: TargetNeuron, neuron: TargetNeuron | None = None):
    """The exact linear fed by ``source``'s spikes, fused with ``neuron`` when given."""
    w_int, ws = linear.int_weights()
    if neuron is None:
        return ExactLinear(w_int, ws, linear.bias, source.threshold)
    return ExactLinearNeuron(w_int, ws, linear.bias, source.threshold, neuron)


def _exact_norm(
    ln: nn.LayerNorm, neuron: TargetNeuron, constant: torch.Tensor, *, pool: bool = False
) -> ExactLayerNormNeuron:
    """The QANN's LayerNorm fused with the neuron of the quantizer after it."""
    return ExactLayerNormNeuron(ExactLayerNorm.from_layernorm(ln), neuron, constant, pool=pool)


def _convert_exact(qann: nn.Module, c: _Walker) -> SpikingViT:
    conv, cls_token, pos_embed = _stem(c)
    constant = residual_constant(cls_token, pos_embed)
    patch_q = c.quantizer("patch_embed.proj.1", signed=True)
    patch_if = target_neuron_from_quantizers([patch_q])
    grid = (conv_grid := int(round((pos_embed.shape[1] - 1) ** 0.5)), conv_grid)
    sites = [NeuronSite("patch_embed.proj.1", patch_if, partial(_patches_to_qann, grid=grid))]
    residual_feeds = [patch_if]  # the neurons whose fl64(theta) * count the stream sums
    blocks = []
    for i in range(len(c.get("blocks", (nn.ModuleList, nn.Sequential)))):
        p = f"blocks.{i}"
        c.container(p)
        qattn = c.get(f"{p}.attn")
        c.container(f"{p}.attn")
        if not hasattr(qattn, "num_heads"):
            raise TypeError(f"convert: `{p}.attn` has no `num_heads`; expected a QuantAttention")
        qkv, proj = c.get(f"{p}.attn.qkv", QuantLinear), c.get(f"{p}.attn.proj", QuantLinear)
        h, dim = int(qattn.num_heads), proj.out_features
        dh = dim // h
        check_exact_attention(qattn, f"{p}.attn", dh)
        norm1_q = c.quantizer(f"{p}.norm1.1", signed=True)
        qkv_q = [c.quantizer(f"{p}.attn.{n}", signed=True) for n in ("quan_q", "quan_k", "quan_v")]
        attn_q = c.quantizer(f"{p}.attn.attn_quan", signed=False)
        after_q = c.quantizer(f"{p}.attn.after_attn_quan", signed=True)
        proj_q = c.quantizer(f"{p}.attn.quan_proj", signed=True)
        norm1_if = _exact_norm(
            c.get(f"{p}.norm1.0", nn.LayerNorm), target_neuron_from_quantizers([norm1_q]), constant
        )
        if len({int(q.level) for q in qkv_q}) != 1:  # all signed (c.quantizer checks)
            raise ValueError(
                f"convert: `{p}.attn.quan_q`, `quan_k` and `quan_v` must share one level: they "
                "feed one qkv neuron"
            )
        qkv_if = _exact_linear(qkv, norm1_if, target_neuron_from_quantizers(qkv_q, (dim,) * 3))
        gain = exact_math.score_gain(qkv_q[0].s.detach(), qkv_q[1].s.detach(), dh)
        attn_if = ExactAttentionProbs(target_neuron_from_quantizers([attn_q]), gain)
        after_if = ExactContext(
            target_neuron_from_quantizers([after_q]), attn_if.threshold, qkv_q[2].s.detach()
        )
        proj_if = _exact_linear(proj, after_if, target_neuron_from_quantizers([proj_q]))
        attn = ExactAttention(qkv_if, attn_if, after_if, proj_if, num_heads=h)
        norm2_if = _exact_norm(
            c.get(f"{p}.norm2.0", nn.LayerNorm),
            c.target_neuron(f"{p}.norm2.1", signed=True),
            constant,
        )
        c.check_relu_identity(f"{p}.mlp.act")
        fc1 = c.get(f"{p}.mlp.fc1", QuantLinear)
        fc2 = c.get(f"{p}.mlp.fc2.0", QuantLinear)
        act_if = _exact_linear(fc1, norm2_if, c.target_neuron(f"{p}.mlp.act.0", signed=False))
        fc2_if = _exact_linear(fc2, act_if, c.target_neuron(f"{p}.mlp.fc2.1", signed=True))
        mlp = ExactMlp(act_if, fc2_if)
        blocks.append(ExactBlock(norm1_if, attn, norm2_if, mlp))
        residual_feeds += [proj_if, fc2_if]
        neurons = dict(norm1=norm1_if, qkv=qkv_if, attn=attn_if, after=after_if, proj=proj_if,
                       norm2=norm2_if, act=act_if, fc2=fc2_if)  # fmt: skip
        _set_block_fanouts(pos_embed.shape[1], dim, dh, fc1.out_features, neurons)
        sites += _block_sites(p, h, dim, neurons)

    final, global_pool = _final_norm_path(qann)
    head = c.get("head", QuantLinear)
    norm_if = _exact_norm(
        c.get(f"{final}.0", nn.LayerNorm),
        c.target_neuron(f"{final}.1", signed=True),
        constant if global_pool else constant[:, 0],
        pool=global_pool,
    )
    norm_if.fanout = head.out_features
    sites.append(NeuronSite(f"{final}.1", norm_if, _same))
    readout = ExactReadout(norm_if, _exact_linear(head, norm_if), global_pool)
    c.check_all_used()
    _check_residual_sum(residual_feeds)
    return SpikingViT(
        ExactPatchEmbed(conv, patch_if),
        blocks,
        readout,
        exact=True,
        image_shape=_image_shape(qann, conv, pos_embed),
        num_classes=head.out_features,
        sites=sites,
    )


def _check_residual_sum(feeds: list[TargetNeuron]) -> None:
    """SPEC.md §9.2: the residual sum is exact only while its steps span at most 2^16; and
    while its terms fit float64's 53 bits: each ``fl64(theta) * count`` is an integer multiple
    of the smallest step's float32 ulp, ``u``, below ``span * 2^24 * C`` of them (``C`` the
    largest count), so ``n`` terms stay exact while ``n * C * span <= 2^29`` (2^16 span and
    level-256 counts: 63 terms, depth 31)."""
    steps = torch.stack([neuron.threshold.reshape(()) for neuron in feeds])
    span = float(steps.max() / steps.min())
    if not span <= _RESIDUAL_STEP_SPAN:
        raise ValueError(
            f"convert: the quantizer steps feeding the residual stream span {span:.3g}x "
            f"(more than 2^16), so exact mode's float64 residual sum would round: recalibrate "
            "or convert with exact=False"
        )
    largest = max(max(-neuron.n_min, neuron.p_max) for neuron in feeds)
    if len(feeds) * largest * span > 2.0**29:
        raise ValueError(
            f"convert: {len(feeds)} quantizers feed the residual stream, with counts up to "
            f"{largest} and steps spanning {span:.3g}x: past 2^29 together, exact mode's "
            "float64 residual sum could round (fewer blocks, a lower level or steps closer "
            "together; or convert with exact=False)"
        )

"""The quantized ViT (QANN) that SpikeZIP-TF converts, laid out like the official code.

The official QANN is timm/MAE's ``VisionTransformer`` after ``myquan_replace``: each timm
module that feeds a spike train is wrapped as ``nn.Sequential(module, MyQuan)`` (or
``nn.Sequential(MyQuan, ReLU)`` for the MLP activation) and the attention becomes
``QAttention``. This file builds the same tree directly, so the state_dict keys are the
official ones (``blocks.0.norm1.0.weight``, ``blocks.0.norm1.1.s``, ``blocks.0.attn.quan_q.s``,
...) and ``spikekernels.convert`` can walk it by name. Quantizer placement is SPEC.md §7.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from spikekernels.nn.quant_linear import QuantLinear, all_integer
from spikekernels.nn.quantizer import Quantizer

__all__ = [
    "QuantAttention",
    "QuantBlock",
    "QuantMlp",
    "QuantViT",
    "calibrate",
    "linear_weight_bits",
    "quantize_weights",
    "quantizers",
    "quant_vit_tiny",
    "quant_vit_small",
    "quant_vit_base",
    "quant_vit_large",
]

LN_EPS = 1e-6


def _norm(dim: int, level: int) -> nn.Sequential:
    """LayerNorm then a signed quantizer: ``[0]`` is the norm, ``[1]`` the quantizer."""
    return nn.Sequential(nn.LayerNorm(dim, eps=LN_EPS), Quantizer(level, signed=True))


class QuantAttention(nn.Module):
    """Multi-head self-attention with the official ``QAttention`` quantizers.

    ``[B, N, D] -> [B, N, D]``: qkv -> ``quan_q/k/v`` (signed) -> ``(q @ k^T) * scale`` ->
    softmax -> ``attn_quan`` (unsigned) -> ``@ v`` -> ``after_attn_quan`` (signed) -> merge
    heads -> ``proj`` -> ``quan_proj`` (signed). No dropout (inference and short fine-tunes).
    """

    def __init__(self, dim: int, num_heads: int, level: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.quan_q = Quantizer(level, signed=True)
        self.quan_k = Quantizer(level, signed=True)
        self.quan_v = Quantizer(level, signed=True)
        self.attn_quan = Quantizer(level, signed=False)
        self.after_attn_quan = Quantizer(level, signed=True)
        self.proj = nn.Linear(dim, dim)
        self.quan_proj = Quantizer(level, signed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, N, Dh]
        q, k, v = self.quan_q(q), self.quan_k(k), self.quan_v(v)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.attn_quan(attn.softmax(dim=-1))
        x = self.after_attn_quan(attn @ v)
        x = x.transpose(1, 2).reshape(b, n, d)
        return self.quan_proj(self.proj(x))


class QuantMlp(nn.Module):
    """``fc1 -> act = (unsigned quantizer, ReLU) -> fc2 = (Linear, signed quantizer)``.

    The quantizer sits before the ReLU, as in the official ``myquan_replace``; unsigned, it
    already clips at zero, so the ReLU changes nothing once quantization is on, and is the
    activation of the float network when it is off.
    """

    def __init__(self, dim: int, hidden: int, level: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.Sequential(Quantizer(level, signed=False), nn.ReLU())
        self.fc2 = nn.Sequential(nn.Linear(hidden, dim), Quantizer(level, signed=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class QuantBlock(nn.Module):
    """Pre-norm Transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, level: int) -> None:
        super().__init__()
        self.norm1 = _norm(dim, level)
        self.attn = QuantAttention(dim, num_heads, level)
        self.norm2 = _norm(dim, level)
        self.mlp = QuantMlp(dim, int(dim * mlp_ratio), level)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class QuantViT(nn.Module):
    """Quantized Vision Transformer (QANN), official SpikeZIP-TF layout and state_dict keys.

    Input ``[B, in_chans, img_size, img_size]`` float; output logits ``[B, num_classes]``.
    ``N = (img_size // patch_size) ** 2`` patches plus the class token. Every activation that
    becomes a spike train in the SNN passes a ``Quantizer`` with ``level`` levels (SPEC.md §1,
    §7). ``global_pool=False``: ``norm`` (LayerNorm + quantizer) on all tokens, head on the
    class token (ViT-S). ``global_pool=True``: ``fc_norm`` on the mean of the patch tokens and
    no ``norm`` (MAE's ViT-B/L).

    ``quantize(False)`` turns every quantizer into the identity (the float ReLU ViT, for
    training from scratch); ``spikekernels.models.calibrate`` sets the steps from one batch.

    ``weight_bits=8`` (or ``quantize_weights(model)`` later) gives every linear per-channel
    int8 weights (SPEC.md §9.1): evaluated without autograd, the model then computes the exact
    integer forward of SPEC.md §9.2 (``spikekernels.models.exact_forward``), which its exact
    SNN reproduces bit for bit.
    """

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int,
        num_classes: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        level: int = 32,
        global_pool: bool = False,
        weight_bits: int | None = None,
    ) -> None:
        super().__init__()
        # The constructor arguments: what save_checkpoint stores to rebuild the model.
        self.config = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans,
            num_classes=num_classes, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, level=level, global_pool=global_pool, weight_bits=None,
        )  # fmt: skip
        if img_size % patch_size:
            raise ValueError(
                f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.level = level
        self.global_pool = global_pool
        self.num_patches = (img_size // patch_size) ** 2

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size),
            Quantizer(level, signed=True),
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        self.blocks = nn.ModuleList(
            QuantBlock(embed_dim, num_heads, mlp_ratio, level) for _ in range(depth)
        )
        if global_pool:
            self.fc_norm = _norm(embed_dim, level)
        else:
            self.norm = _norm(embed_dim, level)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_weights()
        if weight_bits is not None:
            quantize_weights(self, weight_bits)

    @torch.no_grad()
    def _init_weights(self) -> None:
        # timm's ViT init: truncated normal (std 0.02) for tokens and linear weights, zero biases.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"QuantViT expects images of shape [B, {', '.join(map(str, expected))}] "
                f"(in_chans, img_size, img_size), got {list(x.shape)}"
            )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, 1 + N, D]``: quantized patch embedding, class token, positions."""
        self._check_input(x)
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1) + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, D]``: the normalized, quantized feature the head reads."""
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        if self.global_pool:
            return self.fc_norm(x[:, 1:].mean(dim=1))
        return self.norm(x[:, 0])  # per-token LayerNorm: only the class token is read

    @property
    def weight_bits(self) -> int | None:
        """8 when every linear has integer weights (exact mode), None when all are float."""
        return linear_weight_bits(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``. With integer weights, outside training and autograd,
        the exact integer forward of SPEC.md §9.2 (``exact_forward``); otherwise the float
        (fake-quantized) forward that training uses."""
        if self.weight_bits is not None and not self.training and not torch.is_grad_enabled():
            from spikekernels.models.exact_forward import exact_forward

            return exact_forward(self, x)
        return self.head(self.forward_features(x))

    def quantize(self, enabled: bool = True) -> QuantViT:
        """Turn every quantizer on (the QANN) or off (the float ReLU ViT). Returns self."""
        for q in quantizers(self):
            q.enabled = enabled
        return self

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ):
        """``nn.Module.load_state_dict``; with ``strict``, a key mismatch raises a RuntimeError
        that lists the missing and the unexpected keys first (and hints at the usual causes)."""
        if strict:
            expected = set(self.state_dict().keys())
            given = set(state_dict.keys())
            missing, unexpected = sorted(expected - given), sorted(given - expected)
            if missing or unexpected:
                hint = ""
                if "model" in given:
                    hint = " (an official checkpoint file holds the weights under 'model')"
                elif any(k.startswith(("norm.", "fc_norm.")) for k in unexpected):
                    hint = " (check global_pool: ViT-S uses norm, ViT-B/L use fc_norm)"
                raise RuntimeError(
                    f"state_dict does not match {type(self).__name__}{hint}: "
                    f"missing keys {missing}; unexpected keys {unexpected}"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


_LINEAR_PATHS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2.0")


def _linear_sites(model: QuantViT) -> list[tuple[str, nn.Module, str]]:
    """``(path, parent, key)`` of every linear of a QuantViT, in execution order:
    ``parent[key]`` (a Sequential index) or ``getattr(parent, key)`` is the linear."""
    sites = []
    for i, block in enumerate(model.blocks):
        for path in _LINEAR_PATHS:
            *parents, key = path.split(".")
            parent = block
            for part in parents:
                parent = getattr(parent, part)
            sites.append((f"blocks.{i}.{path}", parent, key))
    sites.append(("head", model, "head"))
    return sites


def _get(parent: nn.Module, key: str) -> nn.Module:
    return parent[int(key)] if key.isdigit() else getattr(parent, key)


def linear_weight_bits(model: QuantViT) -> int | None:
    """8 if every linear of ``model`` has int8 weights (``QuantLinear``), None if none has;
    ValueError for a mix (``nn.quant_linear.all_integer``)."""
    linears = ((path, _get(parent, key)) for path, parent, key in _linear_sites(model))
    return QuantLinear.weight_bits if all_integer(linears) else None


def quantize_weights(model: QuantViT, bits: int = 8) -> QuantViT:
    """Give every linear of ``model`` per-channel int8 weights (SPEC.md §9.1), in place.

    Each ``nn.Linear`` (qkv, proj, fc1, fc2 and the head) becomes a ``QuantLinear`` sharing its
    parameters: the state_dict keys and values do not change, QAT keeps training the float
    weights through a straight-through rounding, and an evaluating model computes the exact
    integer forward. ``spikekernels.convert`` then builds the exact SNN. The patch-embedding
    conv sees the image, not spikes, and stays float. Returns ``model``.
    """
    if not isinstance(model, QuantViT):
        raise TypeError(f"quantize_weights expects a QuantViT, got {type(model).__name__}")
    if isinstance(bits, bool) or bits != 8:
        raise ValueError(f"bits must be 8 (per-channel int8 weights), got {bits!r}")
    for _, parent, key in _linear_sites(model):
        linear = _get(parent, key)
        if isinstance(linear, QuantLinear):
            continue
        if key.isdigit():
            parent[int(key)] = QuantLinear.from_linear(linear)
        else:
            setattr(parent, key, QuantLinear.from_linear(linear))
    model.config["weight_bits"] = bits
    return model


def quantizers(model: nn.Module) -> Iterator[Quantizer]:
    """Every ``Quantizer`` in ``model``, in registration (= execution) order."""
    return (m for m in model.modules() if isinstance(m, Quantizer))


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set every quantizer's step from one batch ``x``; returns ``model`` (in eval mode).

    One forward pass with all quantizers on and in calibration mode: each quantizer, in
    execution order, picks the step with the least squared quantization error on its input
    (``Quantizer.calibrate_step``) and quantizes with it, so later quantizers see what the
    QANN will actually feed them. Why least squares: calibrating two float digits ViTs (2x2 and
    4x4 patches) at levels 8, 16 and 32 with no fine-tuning, it gave the best test accuracy in
    4 of the 6 cases and was at most 2.2 points behind otherwise; LSQ's
    ``2 mean|x| / sqrt(p_max)`` was up to 3.1 points behind, and the max rule (no clipping)
    lost 33 to 53 points at level 8.
    """
    qs = list(quantizers(model))
    if not qs:
        raise ValueError("calibrate: the model has no Quantizer")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("calibrate: x must be a floating-point batch of inputs")
    if x.numel() == 0:
        raise ValueError("calibrate: x is empty")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("calibrate: x has non-finite values (NaN or inf)")
    model.eval()
    for q in qs:
        q.enabled, q.calibrating = True, True
    try:
        if isinstance(model, QuantViT):
            # The float (fake-quantized) forward: an integer-weight QANN's exact forward
            # computes integers directly and never calls its quantizers.
            model.head(model.forward_features(x))
        else:
            model(x)
    finally:
        for q in qs:
            q.calibrating = False
    return model


def quant_vit_tiny(**kwargs: Any) -> QuantViT:
    """For tests and demos: 8x8 grey images (scikit-learn's digits), patch 2 -> 17 tokens."""
    config = dict(
        img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=4
    )
    return QuantViT(**{**config, **kwargs})


def quant_vit_small(**kwargs: Any) -> QuantViT:
    """ViT-S/16 at 224 px: D 384, depth 12, 6 heads, 197 tokens, class-token head."""
    config = dict(
        img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=384, depth=12,
        num_heads=6,
    )  # fmt: skip
    return QuantViT(**{**config, **kwargs})


def quant_vit_base(**kwargs: Any) -> QuantViT:
    """ViT-B/16 at 224 px (MAE fine-tune): D 768, depth 12, 12 heads, global pool + fc_norm."""
    config = dict(
        img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
        num_heads=12, global_pool=True,
    )  # fmt: skip
    return QuantViT(**{**config, **kwargs})


def quant_vit_large(**kwargs: Any) -> QuantViT:
    """ViT-L/16 at 224 px (MAE fine-tune): D 1024, depth 24, 16 heads, global pool + fc_norm."""
    config = dict(
        img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=1024, depth=24,
        num_heads=16, global_pool=True,
    )  # fmt: skip
    return QuantViT(**{**config, **kwargs})

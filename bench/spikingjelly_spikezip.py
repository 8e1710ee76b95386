"""SpikingJelly 2.0's own SpikeZIP-TF path, on the same QANN we benchmark: the baseline of
``bench_vit.py`` (issue 10: "≥ 10x SpikingJelly 2.0's own SpikeZIP path").

What ``SpikeZIPTFQANNRecipe(model_family="vit")`` (spikingjelly 2.0.0,
``activation_based/ann2snn/recipes/spikezip_qann.py``, run by ``ann2snn.ModuleConverter``)
accepts: a module tree, walked by duck typing, no FX trace and no timm class check.

- An *attention* is any module with ``qkv``, ``proj``, ``quan_q``, ``quan_k``, ``quan_v``,
  ``attn_quan``, ``after_attn_quan``, ``quan_proj``, ``num_heads``, ``head_dim``, ``scale``,
  ``attn_drop`` and ``proj_drop`` (the official ``QAttention``'s names). It becomes a
  ``SpikeZIPViTSelfAttention``: qkv/proj as TD linears with the bias at the first step, six
  ``STBIFNode`` neurons, a TD softmax, and the two products as running-sum deltas.
- A *quantizer* is any module with ``s``, ``sym``, ``pos_max`` and ``neg_min`` (``level`` read
  when present): it becomes an ``STBIFNode`` with threshold ``s`` and those bounds.
- ``nn.Conv2d`` / ``nn.Linear`` become TD convs/linears whose bias is released over ``level``
  steps (``bias / level`` on each of the first ``level`` steps); ``nn.LayerNorm`` a TD
  LayerNorm; ``nn.ReLU`` the identity. Everything else is recursed into and kept.
- The top level (``patch_embed``, ``cls_token``, ``pos_embed``, ``head``, ``norm``, ``blocks``)
  gets a patched ``forward``: on ``[T, B, C, H, W]`` it adds the class token and positions at
  t = 0 only, runs ``norm(blocks(x))`` (``blocks`` must be callable: timm's ``nn.Sequential``)
  and the head on token 0, and returns per-step logit increments ``[T, B, classes]``.

Our ``QuantViT`` already has the official layout and quantizer attributes (``s``, ``sym``,
``pos_max``, ``neg_min``, ``level``), so the recipe takes it after a thin adapter
(``official_twin``), with the same weights and steps: no timm needed. The adapter, on a copy:

1. ``blocks``: ``nn.ModuleList`` -> ``nn.Sequential`` of the same blocks (timm's container);
2. every ``QuantAttention`` gets ``attn_drop = proj_drop = nn.Identity()`` (timm's dropout
   attributes; identity at inference), so the recipe recognises it;
3. in exact mode every ``QuantLinear`` (int8 weights) becomes the ``nn.Linear`` with its
   dequantized weight ``ws * W_int``: the recipe copies ``linear.weight``, and this is the
   weight our QANN's float forward (the fp32/bf16 baselines) uses. SpikingJelly has no exact
   mode, so in both modes its SNN is the same QANN's float SNN.

``global_pool=True`` ViTs (MAE's B/L: ``fc_norm`` on the mean of the patch tokens) are refused:
the recipe's forward always reads token 0 after ``norm``.

Running: ``functional.set_step_mode(snn, "m")``, ``functional.reset_net(snn)``, then one call
on ``[T, B, C, H, W]`` with the image at t = 0 and zeros after; the logits are the sum of the
``T`` increments. It has no early stop, and it cannot run in chunks: its attention's running
products are cumulative sums inside one call (no state carried to the next call) and its
forward adds the class token at index 0 of every call, so the whole ``T`` goes in one call.
Its memory grows with ``T * B``: ViT-S at T = 27 took about 0.5 GB per image (CPU, peak RSS),
so batch 64 needs about 35 GB at T = 27 and 80 GB at T = 64 on the GPU.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from spikekernels.models.vit import QuantAttention, QuantViT
from spikekernels.nn.quant_linear import QuantLinear

__all__ = ["convert", "import_error", "official_twin", "run"]


def import_error() -> str | None:
    """``None`` when SpikingJelly's SpikeZIP-TF recipe imports here, else why not."""
    try:
        from spikingjelly.activation_based import functional  # noqa: F401
        from spikingjelly.activation_based.ann2snn import (  # noqa: F401
            ModuleConverter,
            SpikeZIPTFQANNRecipe,
        )
    except Exception as exc:  # ImportError, or anything its import chain raises
        return f"{type(exc).__name__}: {exc}"[:300]
    return None


def _dequantized(linear: QuantLinear) -> nn.Linear:
    out = nn.Linear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    with torch.no_grad():
        w_int, ws = linear.int_weights()
        out.weight.copy_((w_int.to(torch.float32) * ws[:, None]).to(linear.weight.dtype))
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
    return out


def _replace_quant_linears(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, QuantLinear):
            setattr(module, name, _dequantized(child))
        else:
            _replace_quant_linears(child)


@torch.no_grad()
def official_twin(qann: QuantViT) -> QuantViT:
    """A copy of ``qann`` in the layout SpikingJelly's recipe recognises (module docstring):
    same weights (dequantized in exact mode), same quantizer steps and bounds."""
    if not isinstance(qann, QuantViT):
        raise TypeError(f"official_twin expects a QuantViT, got {type(qann).__name__}")
    if qann.global_pool:
        raise ValueError(
            "SpikingJelly's SpikeZIP ViT forward reads token 0 after `norm`: global_pool=True "
            "(fc_norm on the mean of the patch tokens) is not supported"
        )
    twin = copy.deepcopy(qann).eval()
    twin.blocks = nn.Sequential(*twin.blocks)
    for m in twin.modules():
        if isinstance(m, QuantAttention):
            m.attn_drop, m.proj_drop = nn.Identity(), nn.Identity()
    _replace_quant_linears(twin)
    return twin


def convert(qann: QuantViT, time_steps: int) -> nn.Module:
    """SpikingJelly's SNN of ``qann`` (``SpikeZIPTFQANNRecipe(model_family="vit")`` through
    ``ModuleConverter``), in multi-step mode, on ``qann``'s device."""
    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based.ann2snn import ModuleConverter, SpikeZIPTFQANNRecipe

    device = next(qann.parameters()).device
    recipe = SpikeZIPTFQANNRecipe(time_steps=int(time_steps), model_family="vit")
    snn = ModuleConverter(recipe, device=device).convert(official_twin(qann))
    _check_converted(snn)
    functional.set_step_mode(snn, "m")
    return snn.eval()


def _check_converted(snn: nn.Module) -> None:
    """Every attention became SpikingJelly's and no quantizer or plain linear is left: a
    recipe that silently skipped a module would give a wrong (and faster) baseline."""
    from spikingjelly.activation_based.ann2snn.recipes.spikezip_qann import (
        SpikeZIPViTSelfAttention,
    )

    from spikekernels.nn.quantizer import Quantizer

    left = [
        name
        for name, m in snn.named_modules()
        if isinstance(m, (QuantAttention, Quantizer, nn.Linear, nn.Conv2d, nn.LayerNorm))
        and not type(m).__module__.startswith("spikingjelly")
    ]
    if left:
        raise RuntimeError(f"SpikingJelly's recipe left QANN modules unconverted: {left[:5]}")
    if not any(isinstance(m, SpikeZIPViTSelfAttention) for m in snn.modules()):
        raise RuntimeError("SpikingJelly's recipe converted no attention")


@torch.no_grad()
def run(snn: nn.Module, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Logits ``[B, classes]`` after ``steps`` steps: ``[steps, B, C, H, W]`` with ``x`` at
    t = 0 and zeros after, one multi-step call from a fresh state, increments summed."""
    from spikingjelly.activation_based import functional

    functional.reset_net(snn)
    x_seq = torch.zeros((steps, *x.shape), device=x.device, dtype=x.dtype)
    x_seq[0] = x
    return snn(x_seq).sum(0)

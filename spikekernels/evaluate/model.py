"""Which QANN to evaluate: a ``save_checkpoint`` file, an official checkpoint, or a float ViT.

- ``checkpoint`` written by ``spikekernels.models.save_checkpoint``: its stored config
  rebuilds the model (``model`` and ``level`` are not needed and not used).
- ``checkpoint`` in the official SpikeZIP-TF layout (weights bare or under ``"model"``):
  ``model`` names the preset (``quant_vit_tiny|small|base|large``) and ``level`` the
  quantization level (official files do not record it); ``num_classes`` is read off the head.
- ``float_checkpoint``: a timm-style float ViT state_dict, renamed onto the preset's keys
  (``spikekernels.models.float_to_quant_state_dict``), then calibrated on ``calibrate``
  images (required).

Then ``weight_bits`` (exact mode) quantizes every linear's weights
(``spikekernels.models.quantize_weights``) before calibration, and ``calibrate`` (when given)
sets every quantizer's step from that many images.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from spikekernels import models
from spikekernels.models.checkpoint import (
    FORMAT,
    check_state_dict,
    float_to_quant_state_dict,
    read_checkpoint,
    restore_quantizers,
    unwrap_state_dict,
)

__all__ = ["PRESETS", "load_qann", "prepare_qann"]

PRESETS = ("quant_vit_tiny", "quant_vit_small", "quant_vit_base", "quant_vit_large")


def _preset(name: str | None, state: dict, path: str, level: int) -> nn.Module:
    if name is None:
        raise ValueError(
            f"{path} holds weights only (no model config): name the architecture with "
            f"--model ({'|'.join(PRESETS)}) and --level"
        )
    if name not in PRESETS:
        raise ValueError(f"--model must be one of {', '.join(PRESETS)}, got {name!r}")
    kwargs = {"level": level}
    head = state.get("head.weight")
    if isinstance(head, torch.Tensor) and head.dim() == 2:
        kwargs["num_classes"] = head.shape[0]
    return getattr(models, name)(**kwargs)


def load_qann(
    *,
    checkpoint: str | os.PathLike | None = None,
    model: str | None = None,
    float_checkpoint: str | os.PathLike | None = None,
    level: int = 16,
) -> tuple[nn.Module, dict]:
    """``(qann on the CPU, description for results.json)``; see the module docstring."""
    if (checkpoint is None) == (float_checkpoint is None):
        raise ValueError("give exactly one of checkpoint and float_checkpoint")
    if checkpoint is not None:
        path = os.fspath(checkpoint)
        obj = read_checkpoint(path)
        state = unwrap_state_dict(obj, path)
        if obj.get("format") == FORMAT and isinstance(obj.get("config"), dict):
            try:
                qann = models.QuantViT(**obj["config"])
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"checkpoint {path}: its config does not build a QuantViT: {err}"
                ) from None
            source = "save_checkpoint"
        else:
            qann = _preset(model, state, path, level)
            source = "official"
        check_state_dict(qann, state, path)
        qann.load_state_dict(state)
        restore_quantizers(qann, obj, path)
    else:
        path = os.fspath(float_checkpoint)
        state = unwrap_state_dict(read_checkpoint(path), path)
        qann = _preset(model, state, path, level)
        mapped = float_to_quant_state_dict(state, qann, path)
        nn.Module.load_state_dict(qann, mapped, strict=False)  # checked above; steps missing
        source = "float"
    config = dict(getattr(qann, "config", {}))
    return qann.eval(), {"source": source, "path": path, "config": config}


def prepare_qann(
    qann: nn.Module,
    *,
    weight_bits: int | None,
    calib_images: torch.Tensor | None,
    needs_calibration: bool,
) -> nn.Module:
    """Quantize the weights (``weight_bits``), then calibrate on ``calib_images``."""
    if weight_bits is not None:
        from spikekernels.models import vit

        quantize_weights = getattr(models, "quantize_weights", None) or getattr(
            vit, "quantize_weights", None
        )
        if quantize_weights is None:
            raise ValueError(
                "--weight-bits needs spikekernels.models.quantize_weights (exact mode), which "
                "this installation lacks"
            )
        quantize_weights(qann, bits=weight_bits)
    if calib_images is not None:
        models.calibrate(qann, calib_images)
    elif needs_calibration:
        raise ValueError(
            "a float checkpoint has no quantizer steps: calibrate it (--calibrate N, N > 0)"
        )
    return qann.eval()

"""QANN checkpoints: our own files (config + weights), official ones, and float timm ViTs.

- ``save_checkpoint(qann, path)`` writes ``{"format", "version", "config", "model",
  "quantizers"}``: the constructor arguments (``QuantViT.config``) beside the state_dict, and
  each quantizer's level, sign and on/off (not in a state_dict), so ``load_model(path)``
  rebuilds the model with no other argument. The weights sit under ``"model"`` as in the
  official SpikeZIP-TF files, so ``load_checkpoint(qann, path)`` reads ours too.
- ``load_model(path)``: the QuantViT of such a file, every key and shape checked.
- ``float_to_quant_state_dict(float_sd, qann)``: a timm-style float ViT state_dict
  (``patch_embed.proj.weight``, ``blocks.0.norm1.weight``, ``blocks.0.mlp.fc2.weight``, ...)
  renamed onto QuantViT's keys (``patch_embed.proj.0.weight``, ``blocks.0.norm1.0.weight``,
  ``blocks.0.mlp.fc2.0.weight``, ...). The quantizer steps are not in a float file: calibrate.

Every failure is a ``FileNotFoundError`` (no file) or ``ValueError`` that names the file and,
for a state_dict that does not fit, every missing key, unexpected key and wrong shape.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from spikekernels.levels import level_bounds
from spikekernels.models.vit import QuantViT
from spikekernels.nn.quantizer import Quantizer

__all__ = [
    "FORMAT",
    "check_state_dict",
    "float_to_quant_state_dict",
    "load_checkpoint",
    "load_model",
    "read_checkpoint",
    "restore_quantizers",
    "save_checkpoint",
    "unwrap_state_dict",
]

FORMAT = "spikekernels.qann"
VERSION = 1

# timm ViT key -> QuantViT key: the modules that QuantViT wraps as (module, quantizer) gain ".0".
_FLOAT_TO_QUANT = [
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"patch_embed.proj.0.\1"),
    (re.compile(r"^blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)$"), r"blocks.\1.\2.0.\3"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$"), r"blocks.\1.mlp.fc2.0.\2"),
    (re.compile(r"^(norm|fc_norm)\.(weight|bias)$"), r"\1.0.\2"),
]
# Prefixes that wrappers put on keys (DistributedDataParallel, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def save_checkpoint(qann: nn.Module, path: str | os.PathLike) -> str:
    """Write ``qann``'s config and weights to ``path`` (atomically: a temp file, then rename).

    ``qann`` must carry ``config`` (the constructor arguments, as ``QuantViT`` does). Tensors
    are saved on the CPU. Returns the path. ``load_model(path)`` reads it back.
    """
    config = getattr(qann, "config", None)
    if not isinstance(config, Mapping):
        raise TypeError(
            f"save_checkpoint: {type(qann).__name__} has no `config` dict (the constructor "
            "arguments); build the model with spikekernels.models.QuantViT or a preset"
        )
    state = {k: v.detach().cpu() for k, v in qann.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "class": type(qann).__name__,
        "config": dict(config),
        "model": state,
        # not in the state_dict (which holds only each step s, as the official files): a
        # quantizer whose level differs from the config's (set after construction) keeps it
        "quantizers": {
            _unwrapped(name): {"level": q.level, "signed": q.signed, "enabled": q.enabled}
            for name, q in qann.named_modules()
            if isinstance(q, Quantizer)
        },
    }
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what open() would have made
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def read_checkpoint(path: str | os.PathLike) -> Mapping[str, Any]:
    """``torch.load`` of a checkpoint file (weights only, on the CPU), with clear errors."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is a directory, expected a file")
    try:
        # Training scripts (the official SpikeZIP-TF, MAE, DeiT, timm) store their
        # argparse.Namespace under "args": plain data, allowed beside the tensors.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged or foreign file
        raise ValueError(f"checkpoint {path} cannot be read: {_load_failure(err)}") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def _load_failure(err: Exception) -> str:
    """Why ``torch.load`` refused a file, in one line. Never its advice to retry with
    ``weights_only=False``: that would run arbitrary code from a foreign file."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    unsupported = next((line for line in lines if "Unsupported global" in line), None)
    if unsupported is not None:  # a readable file that pickles an object beyond the weights
        return (
            f"it holds an object that is not plain data ({unsupported.split(' was not')[0]}); "
            "save the state_dict alone"
        )
    reason = (lines or [""])[0].split(". ")[0]
    return f"corrupt, truncated, or not a PyTorch file ({type(err).__name__}: {reason})"


def unwrap_state_dict(obj: Mapping[str, Any], path: str = "checkpoint") -> dict[str, Any]:
    """The state_dict inside a checkpoint dict: under ``model``, ``state_dict``, ``model_ema``
    or bare; ``module.``/``_orig_mod.`` prefixes removed. Every value must be a tensor."""
    for key in ("model", "state_dict", "model_ema"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor: not a "
                "state_dict (expected the weights, bare or under 'model' / 'state_dict')"
            )
        state[_unwrapped(key)] = value
    if not state:
        raise ValueError(f"{path}: the state_dict is empty")
    return state


def _unwrapped(name: str) -> str:
    """A key or module name without the prefixes wrappers put on it."""
    # in any order and nesting: DDP of a compiled model is `module._orig_mod.`, the compiled
    # DDP model `_orig_mod.module.`
    while name.startswith(_WRAPPER_PREFIXES):
        name = name[len(next(p for p in _WRAPPER_PREFIXES if name.startswith(p))) :]
    return name


def load_checkpoint(
    model: nn.Module, checkpoint: Mapping[str, Any] | str | os.PathLike, strict: bool = True
):
    """Load a QANN checkpoint (a file path, or its dict) into ``model``: an official
    SpikeZIP-TF file (the state_dict under ``"model"``), one of ours, or a bare state_dict
    (``unwrap_state_dict``: also under ``state_dict``/``model_ema``, wrapper prefixes
    removed; one of ours also restores its quantizers' levels, ``restore_quantizers``).
    Returns ``model.load_state_dict``'s result."""
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        checkpoint = read_checkpoint(path)
    else:
        path = "checkpoint"
    state = unwrap_state_dict(checkpoint, path)
    if strict:  # a ValueError naming the file and every key, not load_state_dict's RuntimeError
        check_state_dict(model, state, path)
    result = model.load_state_dict(state, strict=strict)
    restore_quantizers(model, checkpoint, path)
    return result


def check_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: str = "checkpoint",
    *,
    optional: set[str] | None = None,
) -> None:
    """Raise a ValueError naming every missing key, unexpected key and wrong shape.

    ``optional``: keys of ``model`` that ``state`` may lack (the quantizer steps of a float
    checkpoint, set later by calibration).
    """
    expected = model.state_dict()
    optional = optional or set()
    missing = sorted(k for k in expected if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in expected)
    shapes = sorted(
        f"{k}: checkpoint {list(state[k].shape)}, model {list(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listing(unexpected)}")
        if shapes:
            parts.append(f"wrong shapes {_listing(shapes)}")
        raise ValueError(
            f"{path} does not fit {type(model).__name__} "
            f"({getattr(model, 'config', {})}): " + "; ".join(parts)
        )


def _listing(items: list[str], limit: int = 20) -> str:
    shown = items[:limit]
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return "[" + ", ".join(shown) + "]" + more


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> QuantViT:
    """The QuantViT saved by ``save_checkpoint(qann, path)``: rebuilt from the stored config,
    weights loaded strictly (in eval mode, on ``map_location``)."""
    path = os.fspath(path)
    obj = read_checkpoint(path)
    config = obj.get("config")
    if obj.get("format") != FORMAT or not isinstance(config, Mapping):
        raise ValueError(
            f"checkpoint {path} has no model config (not written by "
            "spikekernels.models.save_checkpoint): an official SpikeZIP-TF checkpoint needs "
            "the architecture, e.g. --model quant_vit_small --level 16"
        )
    try:
        model = QuantViT(**config)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"checkpoint {path}: its config does not build a QuantViT: {err}"
        ) from None
    state = unwrap_state_dict(obj, path)
    check_state_dict(model, state, path)
    model.load_state_dict(state)
    restore_quantizers(model, obj, path)
    return model.to(map_location).eval()


def restore_quantizers(model: nn.Module, obj: Mapping[str, Any], path: str = "checkpoint") -> None:
    """Each quantizer's level, sign and on/off as ``save_checkpoint`` wrote them (its
    ``quantizers`` entry; not in a state_dict). A file without the entry (official ones, ours
    from before it) leaves the model's own."""
    saved = obj.get("quantizers") if obj.get("format") == FORMAT else None
    if saved is None:
        return
    if not isinstance(saved, Mapping):
        raise ValueError(f"checkpoint {path}: `quantizers` must be a dict, got {type(saved)}")
    found = {_unwrapped(name): q for name, q in model.named_modules() if isinstance(q, Quantizer)}
    unknown = sorted(set(saved) - set(found))
    if unknown:
        raise ValueError(f"checkpoint {path}: quantizers the model lacks: {_listing(unknown)}")
    for name, entry in saved.items():
        valid = (
            isinstance(entry, Mapping)
            and type(entry.get("level")) is int  # not a bool, not a float
            and entry["level"] >= 2
            and isinstance(entry.get("signed"), bool)
            and isinstance(entry.get("enabled"), bool)
        )
        if not valid:
            raise ValueError(
                f"checkpoint {path}: quantizer `{name}`: expected {{'level': int >= 2, "
                f"'signed': bool, 'enabled': bool}}, got {entry!r}"
            )
        q = found[name]
        q.level, q.signed, q.enabled = entry["level"], entry["signed"], entry["enabled"]
        q.n_min, q.p_max = level_bounds(q.level, q.signed)


def float_to_quant_state_dict(
    float_state: Mapping[str, torch.Tensor], qann: nn.Module, path: str = "float checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename a timm-style float ViT state_dict onto ``qann``'s (QuantViT) keys.

    Keys already in QuantViT form pass through. Raises a ValueError naming what does not fit
    (missing / unexpected keys, wrong shapes); the quantizer steps (``....s``) may be missing:
    calibrate the model after loading. The activation must have been ReLU (SpikeZIP-TF's
    fine-tuned ViTs are); a GELU ViT maps but then computes a different function.
    """
    renamed = {}
    for key, value in float_state.items():
        new = key
        for pattern, replacement in _FLOAT_TO_QUANT:
            if pattern.match(key):
                new = pattern.sub(replacement, key)
                break
        renamed[new] = value
    steps = {k for k in qann.state_dict() if k.endswith(".s")}
    check_state_dict(qann, renamed, path, optional=steps)
    return renamed

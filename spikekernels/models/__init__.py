"""Card-1-style QANN models whose state_dict keys match the official SpikeZIP-TF checkpoints."""

from spikekernels.models.vit import (
    QuantAttention,
    QuantBlock,
    QuantMlp,
    QuantViT,
    calibrate,
    load_checkpoint,
    quant_vit_base,
    quant_vit_large,
    quant_vit_small,
    quant_vit_tiny,
    quantizers,
)

__all__ = [
    "QuantAttention",
    "QuantBlock",
    "QuantMlp",
    "QuantViT",
    "calibrate",
    "load_checkpoint",
    "quant_vit_base",
    "quant_vit_large",
    "quant_vit_small",
    "quant_vit_tiny",
    "quantizers",
]

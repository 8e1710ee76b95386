"""Card-1-style QANN models whose state_dict keys match the official SpikeZIP-TF checkpoints."""

from spikekernels.models.vit import (
    QuantAttention,
    QuantBlock,
    QuantMlp,
    QuantViT,
    calibrate,
    linear_weight_bits,
    quant_vit_base,
    quant_vit_large,
    quant_vit_small,
    quant_vit_tiny,
    quantize_weights,
    quantizers,
)

__all__ = [
    "QuantAttention",
    "QuantBlock",
    "QuantMlp",
    "QuantViT",
    "calibrate",
    "linear_weight_bits",
    "quantize_weights",
    "load_checkpoint",
    "quant_vit_base",
    "quant_vit_large",
    "quant_vit_small",
    "quant_vit_tiny",
    "quantizers",
]

from spikekernels.models.checkpoint import (  # noqa: E402
    float_to_quant_state_dict,
    load_checkpoint,
    load_model,
    save_checkpoint,
)

__all__ += ["float_to_quant_state_dict", "load_model", "save_checkpoint"]

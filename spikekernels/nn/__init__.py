"""Multi-step spiking modules (``[T, B, ...]`` in and out, state carried between calls)."""

from spikekernels.nn.attention import SpikeAttention
from spikekernels.nn.layernorm import SpikeLayerNorm
from spikekernels.nn.linear import SpikeLinear
from spikekernels.nn.neuron import STBIF
from spikekernels.nn.quantizer import Quantizer
from spikekernels.nn.softmax import SpikeSoftmax

__all__ = [
    "STBIF",
    "Quantizer",
    "SpikeAttention",
    "SpikeLayerNorm",
    "SpikeLinear",
    "SpikeSoftmax",
]

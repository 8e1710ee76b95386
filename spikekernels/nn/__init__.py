"""Multi-step spiking modules (``[T, B, ...]`` in and out, state carried between calls)."""

from spikekernels.nn.attention import SpikeAttention, SpikeAttentionProbs, SpikeContext
from spikekernels.nn.exact_attention import ExactAttention, ExactAttentionProbs, ExactContext
from spikekernels.nn.exact_layers import (
    ExactLayerNorm,
    ExactLayerNormNeuron,
    ExactLinear,
    ExactLinearNeuron,
    ExactSoftmax,
)
from spikekernels.nn.hooks import observer
from spikekernels.nn.layernorm import SpikeLayerNorm, SpikeLayerNormNeuron
from spikekernels.nn.linear import SpikeLinear
from spikekernels.nn.linear_neuron import SpikeLinearNeuron
from spikekernels.nn.neuron import STBIF
from spikekernels.nn.quant_linear import QuantLinear
from spikekernels.nn.quantizer import Quantizer
from spikekernels.nn.softmax import SpikeSoftmax
from spikekernels.nn.spike_matmul import RunningSpikeMatmul, SpikeMatmul
from spikekernels.nn.target_neuron import TargetNeuron

__all__ = [
    "STBIF",
    "ExactAttention",
    "ExactAttentionProbs",
    "ExactContext",
    "ExactLayerNorm",
    "ExactLayerNormNeuron",
    "ExactLinear",
    "ExactLinearNeuron",
    "ExactSoftmax",
    "QuantLinear",
    "Quantizer",
    "RunningSpikeMatmul",
    "SpikeAttention",
    "SpikeAttentionProbs",
    "SpikeContext",
    "SpikeLayerNorm",
    "SpikeLayerNormNeuron",
    "SpikeLinear",
    "SpikeLinearNeuron",
    "SpikeMatmul",
    "SpikeSoftmax",
    "TargetNeuron",
    "observer",
]

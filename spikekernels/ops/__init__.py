"""Public functional ops: validation, dispatch, and fake impls for torch.compile.

Each op is registered as ``torch.ops.spikekernels.<name>``; the functions here are its
friendly Python face (keyword arguments, optional validation of data).
"""

from spikekernels.ops._dispatch import force_backend
from spikekernels.ops.exact_attention import (
    exact_attention,
    exact_attention_probs,
    exact_context,
)
from spikekernels.ops.exact_layernorm import exact_layernorm_neuron
from spikekernels.ops.exact_linear import exact_linear
from spikekernels.ops.exact_residual import exact_residual_add
from spikekernels.ops.layernorm import spike_layernorm
from spikekernels.ops.layernorm_neuron import spike_layernorm_neuron
from spikekernels.ops.neuron import st_bif
from spikekernels.ops.softmax import spike_softmax
from spikekernels.ops.spike_attention import spike_attention_probs, spike_context
from spikekernels.ops.spike_linear import spike_linear
from spikekernels.ops.spike_linear_neuron import spike_linear_neuron
from spikekernels.ops.spike_matmul import spike_matmul
from spikekernels.ops.target import target_spikes
from spikekernels.ops.weight_split import split_weight_bf16x3

__all__ = [
    "force_backend",
    "spike_matmul",
    "st_bif",
    "spike_layernorm",
    "spike_layernorm_neuron",
    "spike_linear",
    "spike_linear_neuron",
    "split_weight_bf16x3",
    "spike_softmax",
    "spike_attention_probs",
    "spike_context",
    "target_spikes",
    "exact_linear",
    "exact_layernorm_neuron",
    "exact_residual_add",
    "exact_attention",
    "exact_attention_probs",
    "exact_context",
]

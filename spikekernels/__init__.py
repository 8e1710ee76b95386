"""spikekernels: fast multi-step spiking inference for Transformers converted from QANNs.

Ops (``torch.ops.spikekernels.*``) and their Python faces live in ``spikekernels.ops``;
modules in ``spikekernels.nn``; the plain-PyTorch oracle in ``spikekernels.reference``.
Nothing is computed or compiled at import.
"""

from spikekernels import _extension  # noqa: F401  (loads the C++/CUDA ops when built)
from spikekernels.convert import convert
from spikekernels.ops import (
    spike_layernorm,
    spike_linear,
    spike_matmul,
    spike_softmax,
    st_bif,
    target_spikes,
)
from spikekernels.parity import parity

__version__ = "0.1.0"

__all__ = [
    "convert",
    "parity",
    "spike_matmul",
    "st_bif",
    "spike_layernorm",
    "spike_linear",
    "spike_softmax",
    "target_spikes",
]


def __getattr__(name: str):
    # ``spikekernels.evaluate`` (the evaluation tool) is imported on first use: it brings
    # data loading, tqdm and matplotlib, which ``import spikekernels`` must not pay for.
    if name == "evaluate":
        import importlib

        return importlib.import_module("spikekernels.evaluate")
    raise AttributeError(f"module 'spikekernels' has no attribute {name!r}")

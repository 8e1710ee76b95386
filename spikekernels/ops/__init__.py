"""Public functional ops: validation, dispatch, and fake impls for torch.compile.

Each op is registered as ``torch.ops.spikekernels.<name>``; the functions here are its
friendly Python face (keyword arguments, optional validation of data).
"""

from spikekernels.ops.neuron import st_bif

__all__ = ["st_bif"]

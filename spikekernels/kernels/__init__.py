"""Triton kernels, one file per op family. Import-light: triton is optional.

``TRITON_AVAILABLE``: triton imports. ``INTERPRET``: ``TRITON_INTERPRET=1`` was set before
this package was imported, so kernels run on CPU tensors through the numpy interpreter.
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
except ImportError:
    TRITON_AVAILABLE = False


def use_triton(t: torch.Tensor) -> bool:
    """Whether ``t``'s device runs the Triton kernels: CUDA, or CPU under the interpreter."""
    if not TRITON_AVAILABLE:
        return False
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")

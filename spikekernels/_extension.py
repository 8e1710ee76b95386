"""Loads the compiled extension (spikekernels._C), which registers the C++/CUDA ops.

A missing or mismatched build is not fatal: it warns once, and every op keeps working on its
Triton or PyTorch path. ``EXTENSION_ERROR`` says why the build could not be loaded.
"""

from __future__ import annotations

import warnings

import torch  # noqa: F401  (loads libc10 and libtorch, which _C links against)

EXTENSION_ERROR: str | None = None

try:
    from spikekernels import _C  # noqa: F401  (import registers the TORCH_LIBRARY ops)
except ImportError as exc:  # not built, or built against another torch
    EXTENSION_ERROR = str(exc)
    warnings.warn(
        "spikekernels._C could not be loaded; Spike-Softmax and st_bif on CPU fall back to "
        "their PyTorch paths (slower). Rebuild with `pip install --no-build-isolation -e .` "
        f"({exc})",
        RuntimeWarning,
        stacklevel=2,
    )

HAS_EXTENSION = EXTENSION_ERROR is None

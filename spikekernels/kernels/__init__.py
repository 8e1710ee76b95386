"""Triton kernels, one file per op family. Import-light: triton is optional.

``TRITON_AVAILABLE``: triton imports. ``INTERPRET``: ``TRITON_INTERPRET=1`` was set before
this package was imported, so kernels run on CPU tensors through the numpy interpreter.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
except ImportError:
    TRITON_AVAILABLE = False


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the host's grids and tile counts. Not ``triton.cdiv``: a constexpr
    function since triton 3.5, it costs several Python calls on each host call (the exact
    runner makes hundreds a chunk)."""
    return -(-a // b)


def use_triton(t: torch.Tensor) -> bool:
    """Whether ``t``'s device runs the Triton kernels: CUDA, or CPU under the interpreter."""
    if not TRITON_AVAILABLE:
        return False
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def on_device(host_fn: Callable) -> Callable:
    """Decorator for a kernel's host function ``f(launch, x, ...)``: the launches run with
    ``x``'s GPU as the current device.

    Triton launches on ``torch.cuda.current_device()`` (and its current stream), not on the
    device of the arguments: tensors on ``cuda:1`` while ``cuda:0`` is current would hand
    device-1 pointers to a kernel running on device 0. A no-op on CPU, when the device is
    already current (the usual case), and while torch.compile traces (the code it generates
    holds its own device guard).
    """

    @functools.wraps(host_fn)
    def wrapper(launch, x, *args, **kwargs):
        if (
            x.is_cuda
            and not torch.compiler.is_compiling()
            and x.device.index != torch.cuda.current_device()
        ):
            with torch.cuda.device(x.device):
                return host_fn(launch, x, *args, **kwargs)
        return host_fn(launch, x, *args, **kwargs)

    return wrapper

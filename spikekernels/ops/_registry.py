"""How a Python-defined op becomes ``torch.ops.spikekernels.<name>``.

On a normal run an op that launches Triton kernels is a ``torch.library.triton_op`` and
launches through ``wrap_triton``, so ``torch.compile`` sees (and can fuse around) the kernel.
Under ``TRITON_INTERPRET=1`` (or without triton) it is a plain ``custom_op``: opcheck and
torch.compile cannot trace an interpreted ``triton_op``, while a ``custom_op`` with a fake impl
passes both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from spikekernels.kernels import INTERPRET, TRITON_AVAILABLE

NAMESPACE = "spikekernels"
TRACEABLE_TRITON = TRITON_AVAILABLE and not INTERPRET


def kernel_op(name: str, *, mutates_args: Sequence[str] = ()) -> Callable:
    """Decorator: register ``fn`` (type-annotated) as ``spikekernels::<name>``.

    ``mutates_args`` names the arguments the op writes in place (none by default), so that
    functionalization and torch.compile keep the write and order it."""
    qualname = f"{NAMESPACE}::{name}"
    mutates = tuple(mutates_args)

    def register(fn: Callable):
        if TRACEABLE_TRITON:
            return torch.library.triton_op(qualname, fn, mutates_args=mutates)
        return torch.library.custom_op(qualname, fn, mutates_args=mutates)

    return register


def launcher(kernel):
    """The callable to index with a grid: ``wrap_triton(kernel)`` inside a triton_op."""
    if TRACEABLE_TRITON:
        return torch.library.wrap_triton(kernel)
    return kernel

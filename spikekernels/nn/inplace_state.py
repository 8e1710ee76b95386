"""``InPlaceState``: a spiking module whose state tensors keep their addresses.

A stateful module creates its state at its first call after ``reset()`` (its op returns
fresh tensors) and updates those tensors in place at every later call (the op's
``inplace=True``). So no state is allocated per call, and a CUDA graph can replay the module:
it reads and writes the addresses it captured (``SpikingViT(..., cuda_graph=True)``).
``fresh_state()`` writes the fresh state into those same tensors: the bits a call after
``reset()`` starts from (the kernels' fresh state is these constants), without a new address.
"""

from __future__ import annotations

from typing import ClassVar

import torch


class InPlaceState:
    """Mixed in before ``nn.Module``. ``STATE``: each state attribute's name and its fresh
    value (an ST-BIF membrane starts at 0.5, everything else at 0); the attributes are None
    until the first call after ``reset()``."""

    STATE: ClassVar[dict[str, float]] = {}

    def state(self) -> dict[str, torch.Tensor | None]:
        """The state tensors by name, None before the first call. Every call after the first
        updates them in place, so they keep their addresses until ``reset()``."""
        return {name: getattr(self, name) for name in self.STATE}

    def stateful_call(self) -> bool:
        """Whether this call updates the state in place (it exists) or creates it. State that
        is not contiguous is copied so first, as the in-place ops need: a compiled graph that
        computed it (the CPU paths, fused by Inductor) may lay it out as its input was."""
        # loops, not state(): a stateful layer asks this at every call
        for name in self.STATE:
            if getattr(self, name) is None:
                return False
        for name in self.STATE:
            t = getattr(self, name)
            if not t.is_contiguous():
                setattr(self, name, t.contiguous())
        return True

    def fresh_state(self) -> None:
        """Write the fresh state into the state tensors (which must exist): the next call
        computes what it would after ``reset()``, on the same addresses."""
        for name, value in self.STATE.items():
            getattr(self, name).fill_(value)

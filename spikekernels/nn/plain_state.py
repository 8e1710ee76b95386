"""``PlainState``: a spiking module's per-call state set without ``nn.Module.__setattr__``'s
look-ups.

A module keeps its state (a neuron's ``count``, ``row_settled``, its watched ``activity``) as
plain attributes, rebound at every call: an exact ViT sets about 60 a block and chunk. Each
``nn.Module.__setattr__`` checks the value against parameters, modules and buffers (about a
microsecond, several ``isinstance`` calls): some 7% of an eager chunk's host time. Where the
name is already a plain attribute (in the instance ``__dict__``, so neither a parameter nor a
buffer nor a child module, which nn.Module keeps elsewhere) and the value is of a plain type
(a tensor, None, a number, a dict), nn.Module would store it in ``__dict__`` as well: that
store is made directly. Any other assignment (a first one, a parameter, a buffer, a module,
a tensor subclass) takes nn.Module's path."""

from __future__ import annotations

import torch

# exact types: a Parameter or another tensor subclass is not one of them (an nn.Buffer is a
# plain tensor marked ``_is_buffer``, checked apart)
_STATE_TYPES = frozenset({torch.Tensor, type(None), int, float, bool, dict})


class PlainState:
    """Mixed in before ``nn.Module``: the fast path of the module docstring."""

    def __setattr__(self, name: str, value: object) -> None:
        if torch.compiler.is_compiling():  # Dynamo knows nn.Module's rules, not these
            super().__setattr__(name, value)
            return
        plain = type(value) in _STATE_TYPES and not getattr(value, "_is_buffer", False)
        if plain and name in self.__dict__:
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

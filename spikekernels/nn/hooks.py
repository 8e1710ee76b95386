"""Forward hooks on spiking modules: which may replace spikes, and which only watch.

A forward hook may return other spikes than a module made (an ablation). The exact-mode
modules then stop passing the producer's activity flags to the reader (``unless_hooked``),
and the reader counts the spikes it receives instead of reading the producer's count
(``ExactLinearNeuron``'s ``s_continues``). A hook marked ``observer`` (the SOP counter's,
a probe's) promises to change nothing, so the fast paths stay on; it still sees its module
called (the fused attention splits for any hook, ``has_forward_hooks``), unless it is also
marked ``tallies``: it then takes a ``SpikeTally`` (each step's number of spikes) in place of
a neuron's spikes that a fused op kept to itself (``tally_hooks``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules import module as torch_module

__all__ = [
    "SpikeTally",
    "has_forward_hooks",
    "hook_ids",
    "hooked",
    "observer",
    "replay_unsafe",
    "tally_hooks",
    "unless_hooked",
]


class SpikeTally(NamedTuple):
    """What a ``tallies`` observer receives as a neuron module's output when a fused op kept
    the neuron's spikes to itself (the fused attention's ``probs`` and ``context``):
    ``per_step``, int64 ``[T]``, the number of nonzero spikes at each step over the batch,
    and ``shape``, the shape of the output it stands for (``[T, B, ...]``)."""

    per_step: torch.Tensor
    shape: torch.Size


def observer(hook: Callable, *, replayable: bool = False, tallies: bool = False) -> Callable:
    """``hook`` (a forward hook or pre-hook) marked as one that only watches: it returns
    None (the wrapper drops what it returns) and changes no tensor in place. Its module's
    reader then keeps the producer's activity flags and counts (``hooked`` ignores it).

    ``replayable=True`` also promises that a CUDA graph may capture its tensor work and
    replay it without running the hook (``SpikingViT(cuda_graph=True)``): that work writes
    only tensors that keep their addresses from call to call, and depends on nothing the
    hook's Python decides per call (a global step, a count of calls); where it needs the
    step, it writes chunk-relative and leaves the rest to ``SpikingViT.observe_chunks``.

    ``tallies=True`` (a forward hook) also promises that it needs no more of a neuron's output
    than its spikes per step: it takes a ``SpikeTally`` in place of the output, with no
    inputs, from a fused op that never forms the spikes (``tally_hooks``)."""

    @functools.wraps(hook)
    def watching(*args, **kwargs) -> None:
        hook(*args, **kwargs)

    watching.observes_only = True
    watching.replayable = replayable
    watching.tallies = tallies
    return watching


def _hook_dicts(module: nn.Module) -> tuple[dict, ...]:
    """The dicts (handle id -> hook) of the forward hooks and pre-hooks that would see
    ``module`` called: its own and the global ones; none in the usual case, asked a few times
    per layer and chunk."""
    dicts = (
        module._forward_hooks,
        module._forward_pre_hooks,
        torch_module._global_forward_hooks,
        torch_module._global_forward_pre_hooks,
    )
    return dicts if any(dicts) else ()


def _all_hooks(module: nn.Module) -> list[Callable]:
    """The forward hooks and pre-hooks that would see ``module`` called (its own, global)."""
    return [hook for hooks in _hook_dicts(module) for hook in hooks.values()]


def hook_ids(module: nn.Module) -> tuple[int, ...]:
    """The handle ids of the forward hooks and pre-hooks that would see ``module`` called:
    what a CUDA graph of it captured (a removed hook's id is never given again)."""
    return tuple(i for hooks in _hook_dicts(module) for i in hooks)


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether a forward hook or pre-hook would see ``module`` called (its own or global)."""
    return bool(_all_hooks(module))


def replay_unsafe(module: nn.Module) -> bool:
    """Whether a forward hook or pre-hook not marked ``replayable`` would see ``module``
    called: a CUDA graph of it would run that hook's work with the capture's operands."""
    return any(not getattr(hook, "replayable", False) for hook in _all_hooks(module))


def tally_hooks(module: nn.Module) -> list[Callable] | None:
    """The forward hooks that would see ``module`` called, when every one of them takes a
    ``SpikeTally`` (``observer(..., tallies=True)``) and no pre-hook would: a fused op may then
    skip calling ``module`` and call these with the tally (``[]``: no hook at all). None where
    some hook needs the call itself."""
    dicts = _hook_dicts(module)
    if not dicts:
        return []
    own, pre, global_hooks, global_pre = dicts
    with_kwargs = (
        module._forward_hooks_with_kwargs or torch_module._global_forward_hooks_with_kwargs
    )
    if pre or global_pre or with_kwargs:
        return None
    hooks = [*own.values(), *global_hooks.values()]
    return hooks if all(getattr(hook, "tallies", False) for hook in hooks) else None


def hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook or pre-hook that is not an ``observer`` would see one of
    ``modules`` (a producer, its reader) called: it may replace the spikes between them."""
    return any(not getattr(hook, "observes_only", False) for m in modules for hook in _all_hooks(m))


def unless_hooked(flags: torch.Tensor | None, *modules: nn.Module) -> torch.Tensor | None:
    """A producer's activity flags for its reader, or None where a hook may replace the
    spikes between them (``hooked``): the flags would then not describe what the reader
    gets."""
    return None if hooked(*modules) else flags

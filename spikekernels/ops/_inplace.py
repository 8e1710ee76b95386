"""In-place state for the stateful exact-mode ops (``inplace=True``).

By default an op returns its new state as fresh tensors. With ``inplace=True`` it writes the
new state into the state tensors it was given (all of them must be given) and returns those
same tensor objects. A kernel reads each state tile once, at the start of its program, and
writes it at the end of the same program, so the write-back needs no second buffer. What it
is for: a state that stays at one address from chunk to chunk is what a CUDA graph replays
(``SpikingViT(..., cuda_graph=True)``), and no allocation is made per call.

The registered op (``torch.ops.spikekernels.<name>``) declares the state arguments mutated and
returns a zero-size placeholder in each state position when ``inplace`` (an op's output may not
alias its input); the public face returns the given tensors there instead (``own_state``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spikekernels.ops._checks import PLAIN_TENSOR_TYPES, check_state


def check_inplace(
    inplace: object,
    states: Sequence[tuple[str, torch.Tensor | None]],
    inputs: Sequence[torch.Tensor | None],
    written: Sequence[tuple[str, torch.Tensor | None]] = (),
) -> None:
    """``inplace`` is a bool; when True every state in ``states`` (``(name, tensor)``) is
    given and contiguous. The tensors the op writes (the states when ``inplace``; ``written``,
    the ones it writes whatever ``inplace``, None skipped) share no memory with an input or
    with each other (the kernels read inputs while they write). Shapes and dtypes are
    ``check_state``'s job."""
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if not inplace and not written:
        return  # nothing written that an input could alias (a call a layer makes per chunk)
    targets = [(name, t, "the op writes into it") for name, t in written if t is not None]
    if inplace:
        for name, t in states:
            if t is None:
                raise ValueError(f"inplace=True needs {name}: the op writes the new state into it")
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous with inplace=True")
        targets += [(name, t, "inplace=True writes into it") for name, t in states]
    else:
        inputs = (*inputs, *(t for _, t in states))  # read, not written
    if targets:
        _refuse_shared(targets, inputs)


def _refuse_shared(targets, inputs) -> None:
    """Each ``(name, tensor, why)`` in ``targets`` shares no memory with an input or another
    target (storage addresses first: ``_overlap`` only where one storage holds both)."""
    if torch.compiler.is_compiling():
        return  # fake tensors: no memory to compare
    seen = [(x, where) for x in inputs if x is not None and (where := _storage(x)) is not None]
    for name, t, why in reversed(targets):  # each against the inputs and the targets after it
        where = _storage(t)
        if where is None:
            continue
        for other, other_where in seen:
            if where == other_where and _overlap(t, other):
                raise ValueError(f"{name} shares memory with another argument; {why}")
        seen.append((t, where))


def _storage(t: torch.Tensor) -> int | None:
    """``t``'s storage address, or None for an empty tensor or one without real memory
    (a meta tensor's address is 0, whatever it is)."""
    if type(t) not in PLAIN_TENSOR_TYPES or t.is_meta or t.numel() == 0:
        return None
    return t.untyped_storage().data_ptr()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte extents of ``a`` and ``b`` (one storage) overlap: conservative."""
    if a.device != b.device:
        return False

    def extent(t: torch.Tensor) -> tuple[int, int]:
        start = t.data_ptr()
        span = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True))
        return start, start + (span + 1) * t.element_size()

    (a0, a1), (b0, b1) = extent(a), extent(b)
    return a0 < b1 and b0 < a1


def state_result(inplace: bool, fresh: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """What a registered op returns in one state position: ``fresh``, or with ``inplace``
    ``fresh`` copied into ``target`` and a zero-size placeholder (for the paths that compute
    a fresh state first; the Triton paths write into ``target`` directly)."""
    if not inplace:
        return fresh
    target.copy_(fresh)
    return placeholder(target)


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """The zero-size tensor a registered op returns in a state position written in place."""
    return like.new_empty(0)


def own_state(
    out: tuple[torch.Tensor, ...], positions: Sequence[int], states: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """The public face's result with ``inplace``: the registered op's ``out`` with the given
    state tensors in ``positions`` (where the op returned placeholders)."""
    out = list(out)
    for i, t in zip(positions, states, strict=True):
        out[i] = t
    return tuple(out)


def check_count_before(
    count_before: torch.Tensor | None, shape: Sequence[int], like: torch.Tensor, like_name: str
) -> None:
    """An exact op's ``count_before`` (None, or int8 ``shape`` on ``like``'s device,
    contiguous: the op writes its neuron's count before the steps into it). Sharing memory is
    ``check_inplace``'s job."""
    check_state(count_before, "count_before", shape, (torch.int8,), like, like_name)
    if count_before is not None and not count_before.is_contiguous():
        raise ValueError("count_before must be contiguous: the op writes it")


def fill_count_before(count_before: torch.Tensor | None, count: torch.Tensor | None) -> None:
    """``count_before`` = the incoming ``count`` (zeros when fresh), on the paths without a
    kernel, which copy it as they read it; before the path updates ``count`` in place."""
    if count_before is not None and count is None:
        count_before.zero_()
    elif count_before is not None:
        count_before.copy_(count)

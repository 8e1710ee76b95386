"""``torch.ops.spikekernels.spike_attention_probs`` and ``spike_context``: float mode's two
spike products of SESA attention, each fused with what reads it (SPEC.md §5, §3, §2): the
scores with Spike-Softmax and the attention neuron, the context with its neuron."""

from __future__ import annotations

import torch

from spikekernels.exact_math import softmax_rows
from spikekernels.ops._activity import record_active
from spikekernels.ops._attention import (
    check_data,
    check_product,
    count_before_steps,
    fused_context_fits,
    fused_probs_fits,
    heads_merged,
)
from spikekernels.ops._checks import (
    check_active,
    check_bounds,
    check_in_bounds,
    check_scalar_tensor,
    check_state,
    check_threshold,
)
from spikekernels.ops._dispatch import backend_for
from spikekernels.ops._inplace import check_inplace, own_state, placeholder, state_result
from spikekernels.ops._registry import call_op, kernel_op, launcher
from spikekernels.ops.neuron import st_bif_torch
from spikekernels.ops.spike_matmul import spike_matmul_torch

_STATE = (("x_acc", torch.float32), ("y_prev", torch.float32), ("membrane", torch.float32),
          ("count", torch.int8))  # fmt: skip


def _check_fused(a, b, names, scale, threshold, n_min, p_max, a_count, b_count, state, spec,
                 active, inplace) -> None:  # fmt: skip
    """Both ops' metadata checks (no data read): the spike trains ``a``, ``b`` (``names``)
    and their counts, the scale and threshold, the bounds, the state (all of it or none;
    ``spec``: its names and dtypes; with ``inplace`` all of it, contiguous, sharing no
    memory with an input or itself) and the activity flags."""
    a_name, b_name = names
    check_product(a, b, a_name, b_name, a_count, b_count)
    check_scalar_tensor(scale, "scale", a, a_name, (torch.float32,))
    check_threshold(threshold, "threshold", None, a, a_name)
    check_bounds(n_min, p_max)
    shape = (*a.shape[1:-1], b.shape[-1])
    given = [t is not None for t in state]
    if any(given) and not all(given):
        raise ValueError(
            f"state: give all of {', '.join(name for name, _ in spec)} (the state a previous "
            "call returned) or none (a fresh input)"
        )
    for t, (name, dtype) in zip(state, spec, strict=True):
        check_state(t, name, shape, (dtype,), a, a_name)
    check_active(active, (a.shape[0], *shape), a, a_name)
    states = tuple((name, t) for (name, _), t in zip(spec, state, strict=True))
    check_inplace(inplace, states, (a, b, scale, threshold, a_count, b_count, active))


def _check_probs(
    q, k_t, scale, threshold, n_min, p_max, q_count, k_count, x_acc, y_prev, membrane, count,
    active, inplace,
) -> None:  # fmt: skip
    """Metadata checks (no data read); the state tensors all given or all None."""
    _check_fused(q, k_t, ("q", "k_t"), scale, threshold, n_min, p_max, q_count, k_count,
                 (x_acc, y_prev, membrane, count), _STATE, active, inplace)  # fmt: skip


def _state_results(out, state, inplace) -> tuple[torch.Tensor, ...]:
    """A fresh result ``(spikes, *new state)`` of a path without a kernel as the registered
    op returns it: with ``inplace`` each new state copied into the given one (``state``)
    and a placeholder in its place."""
    fresh = zip(out[1:], state or (None,) * (len(out) - 1), strict=True)
    return out[0], *(state_result(inplace, new, given) for new, given in fresh)


def _kernel_results(out, state, inplace) -> tuple[torch.Tensor, ...]:
    """A Triton path's result as the registered op returns it: with ``inplace`` the kernel
    wrote the new state into the given tensors, and placeholders are returned."""
    return (out[0], *(placeholder(t) for t in state)) if inplace else out


def spike_attention_probs_torch(
    q, k_t, scale, threshold, n_min, p_max, q_count, k_count, state, active=None
) -> tuple[torch.Tensor, ...]:
    """Vectorised PyTorch (any device, any shape): ``spike_matmul``'s dense path for the
    increments, Spike-Softmax's running sum and ``exact_math.softmax_rows`` step by step,
    then the ST-BIF loop; the same operations as the kernel, so the same bits."""
    e, _, _ = spike_matmul_torch(
        q, k_t, scale, count_before_steps(q, q_count), count_before_steps(k_t, k_count)
    )
    shape = e.shape[1:]
    if state is None:
        x = torch.zeros(shape, dtype=torch.float32, device=q.device)
        y, membrane, count = x.clone(), None, None
    else:
        x, y, membrane, count = state
    x, y = x.clone(), y.clone()
    u = torch.empty_like(e)
    for t in range(e.shape[0]):
        x += e[t]
        y_new = softmax_rows(x) if x.numel() else x.clone()
        torch.sub(y_new, y, out=u[t])
        y = y_new
    spikes, membrane, count = st_bif_torch(
        u, threshold, n_min, p_max, membrane, count, False, torch.int8
    )
    record_active(active, spikes)
    return spikes, x, y, membrane, count


@kernel_op(
    "spike_attention_probs",
    mutates_args=(*(name for name, _ in _STATE), "active"),
    check=_check_probs,
)
def _spike_attention_probs_op(
    q: torch.Tensor,
    k_t: torch.Tensor,
    scale: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    q_count: torch.Tensor | None = None,
    k_count: torch.Tensor | None = None,
    x_acc: torch.Tensor | None = None,
    y_prev: torch.Tensor | None = None,
    membrane: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (q, k_t, scale, threshold, n_min, p_max, q_count, k_count)
    state = None if x_acc is None else (x_acc, y_prev, membrane, count)
    backend = backend_for(q, ("triton", "torch"))
    if backend == "triton" and fused_probs_fits(q, k_t):
        from spikekernels.kernels.spike_attention import spike_attention_probs_triton

        out = spike_attention_probs_triton(launcher, *args, state, active, inplace=inplace)
        return _kernel_results(out, state, inplace)
    if backend == "reference":
        from spikekernels import reference

        spikes, new_state = reference.spike_attention_probs(*args, state)
        record_active(active, spikes)
        out = (spikes, *new_state)
    else:
        out = spike_attention_probs_torch(*args, state, active)
    return _state_results(out, state, inplace)


@_spike_attention_probs_op.register_fake
def _(
    q, k_t, scale, threshold, n_min, p_max, q_count=None, k_count=None, x_acc=None,
    y_prev=None, membrane=None, count=None, active=None, inplace=False,
):  # fmt: skip
    args = (q, k_t, scale, threshold, n_min, p_max, q_count, k_count)
    _check_probs(*args, x_acc, y_prev, membrane, count, active, inplace)
    shape = (*q.shape[1:-1], k_t.shape[-1])
    spikes = q.new_empty((q.shape[0], *shape), dtype=torch.int8)
    if inplace:
        return spikes, *(placeholder(t) for t in (x_acc, y_prev, membrane, count))
    return spikes, *(q.new_empty(shape, dtype=dtype) for _, dtype in _STATE)


def spike_attention_probs(
    q: torch.Tensor,
    k_t: torch.Tensor,
    scale: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    q_count: torch.Tensor | None = None,
    k_count: torch.Tensor | None = None,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    *,
    active: torch.Tensor | None = None,
    inplace: bool = False,
    validate: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Float-mode attention probabilities: the scores spike product, Spike-Softmax and the
    attention neuron (ST-BIF), fused (SPEC.md §5, §3, §2).

    Per step ``t``, with ``Q``, ``K`` the running counts of the two spike trains::

        e_t = fl32(scale * fl32(q_t @ K_t + Q_{t-1} @ k_t))   # spike_matmul, exact integers
        X  += e_t;  Y = softmax_rows(X);  u = Y - Y_prev;  Y_prev = Y   # Spike-Softmax
        membrane += u / theta;  sigma = ST-BIF fire rule;  count += sigma;  membrane -= sigma

    bit for bit ``spike_matmul``, ``spike_softmax`` and ``st_bif`` in a row, except that the
    softmax is the library's row function ``exact_math.softmax_rows`` (the row max,
    ``exp_rows``' polynomial, ``tree_sum``'s pairwise order, a correctly rounded division:
    the same bits on every device; within SPEC.md §8's softmax tolerance of
    ``torch.softmax``). On a GPU the scores, softmax and membrane of a step never leave the
    kernel: only int8 spikes are written per step, the state once per call.

    Args:
        q: ``[T, *batch, M, D]`` int8 ternary query spikes, any strides.
        k_t: ``[T, *batch, D, N]`` int8 ternary key spikes, any strides (a transposed view
            such as ``k.transpose(-1, -2)`` is read in place). ``D <= 65535``.
        scale: one-element float32 scores scale (``theta_q * theta_k / sqrt(D)``), read on
            the device.
        threshold: one-element float tensor, the attention neuron's step.
        n_min, p_max: Python ints, ``n_min <= 0 <= p_max``, inside int8's ``[-128, 127]``.
        q_count, k_count: optional int8 counts ``[*batch, M, D]`` and ``[*batch, D, N]``
            (any strides) of the q and k neurons *after* these steps; None: 0 before them.
            The op keeps no copy of them.
        state: ``(x_acc, y_prev, membrane, count)`` ``[*batch, M, N]`` as a previous call
            returned it (float32 running scores, float32 last softmax, float32 membrane, int8
            count), or None for a fresh input (``0, 0, 0.5, 0``).
        active: optional int32 ``[T, B]`` per-sample flags (``B`` the spikes' dim 1), set in
            place where a sample fires.
        inplace: write the new state into the given ``state`` (required, each tensor
            contiguous, sharing no memory with an input or another) and return a tuple of
            those same tensors (``ops._inplace``): a state at a fixed address, as a CUDA
            graph replays it.
        validate: also check on a GPU (host syncs) what is checked on CPU tensors: ternary
            spikes, counts consistent with the spikes and in int8, a positive, finite
            ``scale`` and ``threshold``, the incoming ``count`` inside the bounds.

    Returns:
        ``(spikes int8 [T, *batch, M, N], state)``, the state fresh tensors (never aliases
        of the given ones; with ``inplace`` the given tensors, updated): feeding it back
        makes a chunked run equal a whole one, bit for bit.

    Dispatch: CUDA tensors run the Triton kernel for up to ``kernels.spike_attention.
    MAX_KEYS`` keys (256), the PyTorch path above otherwise and on CPU (the kernel under
    ``TRITON_INTERPRET=1``). Inference only: no autograd.
    """
    args = (q, k_t, scale, threshold, n_min, p_max, q_count, k_count)
    if state is not None and (not isinstance(state, (tuple, list)) or len(state) != 4):
        raise TypeError(
            "state must be None or the tuple (x_acc, y_prev, membrane, count) a call returned"
        )
    parts = (None,) * 4 if state is None else tuple(state)
    _check_probs(*args, *parts, active, inplace)
    scalars = ((scale, "scale"), (threshold, "threshold"))
    check_data(q, k_t, "q", "k_t", q_count, k_count, scalars, validate)
    check_in_bounds(parts[3], "count", n_min, p_max, validate)
    out = call_op("spike_attention_probs", *args, *parts, active, inplace)
    if inplace:
        out = own_state(out, (1, 2, 3, 4), parts)
    return out[0], tuple(out[1:])


# ---------------------------------------------------------------------------------------------
# context product + neuron

_CONTEXT_STATE = (("membrane", torch.float32), ("count", torch.int8))


def _check_context(
    a, v, scale, threshold, n_min, p_max, a_count, v_count, membrane, count, active, merge_heads,
    inplace,
) -> None:  # fmt: skip
    """Metadata checks (no data read); the state tensors both given or both None."""
    if not isinstance(merge_heads, bool):
        raise TypeError(f"merge_heads must be a bool, got {type(merge_heads).__name__}")
    if merge_heads and a.dim() < 4:
        raise ValueError(
            "merge_heads=True merges the last batch dim (the heads) into the channels: "
            f"a needs one, [T, *batch, M, N], got shape {tuple(a.shape)}"
        )
    _check_fused(a, v, ("a", "v"), scale, threshold, n_min, p_max, a_count, v_count,
                 (membrane, count), _CONTEXT_STATE, active, inplace)  # fmt: skip


def spike_context_torch(
    a, v, scale, threshold, n_min, p_max, a_count, v_count, state, active=None
) -> tuple[torch.Tensor, ...]:
    """Vectorised PyTorch (any device, any shape): ``spike_matmul``'s dense path, then the
    ST-BIF loop; the same operations as the kernel, so the same bits."""
    e, _, _ = spike_matmul_torch(
        a, v, scale, count_before_steps(a, a_count), count_before_steps(v, v_count)
    )
    membrane, count = (None, None) if state is None else state
    spikes, membrane, count = st_bif_torch(
        e, threshold, n_min, p_max, membrane, count, False, torch.int8
    )
    record_active(active, spikes)
    return spikes, membrane, count


@kernel_op(
    "spike_context",
    mutates_args=(*(name for name, _ in _CONTEXT_STATE), "active"),
    check=_check_context,
)
def _spike_context_op(
    a: torch.Tensor,
    v: torch.Tensor,
    scale: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    a_count: torch.Tensor | None = None,
    v_count: torch.Tensor | None = None,
    membrane: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    merge_heads: bool = False,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (a, v, scale, threshold, n_min, p_max, a_count, v_count)
    state = None if membrane is None else (membrane, count)
    backend = backend_for(a, ("triton", "torch"))
    if backend == "triton" and fused_context_fits(a, v):
        from spikekernels.kernels.spike_attention import spike_context_triton

        out = spike_context_triton(
            launcher, *args, state, active, merge_heads=merge_heads, inplace=inplace
        )
        return _kernel_results(out, state, inplace)
    if backend == "reference":
        from spikekernels import reference

        spikes, new_state = reference.spike_context(*args, state)
        record_active(active, spikes)
    else:
        spikes, *new_state = spike_context_torch(*args, state, active)
    spikes = heads_merged(spikes) if merge_heads else spikes
    return _state_results((spikes, *new_state), state, inplace)


@_spike_context_op.register_fake
def _(
    a, v, scale, threshold, n_min, p_max, a_count=None, v_count=None, membrane=None,
    count=None, active=None, merge_heads=False, inplace=False,
):  # fmt: skip
    args = (a, v, scale, threshold, n_min, p_max, a_count, v_count)
    _check_context(*args, membrane, count, active, merge_heads, inplace)
    shape = (*a.shape[1:-1], v.shape[-1])
    spikes = a.new_empty((a.shape[0], *shape), dtype=torch.int8)
    if inplace:
        state = (placeholder(membrane), placeholder(count))
    else:
        state = (a.new_empty(shape, dtype=dtype) for _, dtype in _CONTEXT_STATE)
    return (heads_merged(spikes) if merge_heads else spikes), *state


def spike_context(
    a: torch.Tensor,
    v: torch.Tensor,
    scale: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    a_count: torch.Tensor | None = None,
    v_count: torch.Tensor | None = None,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    active: torch.Tensor | None = None,
    merge_heads: bool = False,
    inplace: bool = False,
    validate: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Float-mode attention context: the context spike product and the neuron after it
    (ST-BIF), fused (SPEC.md §5, §2).

    Per step ``t``, with ``A``, ``V`` the running counts of the two spike trains::

        u_t = fl32(scale * fl32(a_t @ V_t + A_{t-1} @ v_t))   # spike_matmul, exact integers
        membrane += u_t / theta;  sigma = ST-BIF fire rule;  count += sigma;  membrane -= sigma

    bit for bit ``spike_matmul`` then ``st_bif``. On a GPU the context of a step never
    leaves the kernel: only int8 spikes are written per step, the state once per call.

    Args:
        a: ``[T, *batch, M, N]`` int8 ternary attention spikes, any strides.
        v: ``[T, *batch, N, D]`` int8 ternary value spikes, any strides (the model's slice of
            the packed qkv spikes is read in place). ``N <= 65535``.
        scale: one-element float32 product scale (``theta_a * theta_v``), read on the device.
        threshold: one-element float tensor, the output neuron's step.
        n_min, p_max: Python ints, ``n_min <= 0 <= p_max``, inside int8's ``[-128, 127]``.
        a_count, v_count: optional int8 counts ``[*batch, M, N]`` and ``[*batch, N, D]``
            (any strides) of the attention and value neurons *after* these steps; None: 0
            before them. The op keeps no copy of them.
        state: ``(membrane, count)`` ``[*batch, M, D]`` as a previous call returned it
            (float32, int8), or None for a fresh input (``0.5, 0``).
        active: optional int32 ``[T, B]`` per-sample flags (``B`` the spikes' dim 1), set in
            place where a sample fires.
        merge_heads: return the spikes ``[T, *batch[:-1], M, H * D]``, the last batch dim
            ``H`` (the heads) merged into the channels, as the projection reads them (the
            kernel writes them there; no copy).
        inplace: write the new state into the given ``state`` (required, both tensors
            contiguous, sharing no memory with an input or each other) and return a tuple of
            those same tensors (``ops._inplace``): a state at a fixed address, as a CUDA
            graph replays it.
        validate: also check on a GPU (host syncs) what is checked on CPU tensors: ternary
            spikes, counts consistent with the spikes and in int8, a positive, finite
            ``scale`` and ``threshold``, the incoming count inside the bounds.

    Returns:
        ``(spikes int8, (membrane, count))``, the state fresh tensors (never aliases of the
        given ones; with ``inplace`` the given tensors, updated): feeding it back makes a
        chunked run equal a whole one, bit for bit.

    Dispatch: CUDA tensors run the Triton kernel for head dims up to
    ``kernels.spike_attention.MAX_HEAD_DIM`` (64), the PyTorch path above otherwise and on
    CPU (the kernel under ``TRITON_INTERPRET=1``). Inference only: no autograd.
    """
    args = (a, v, scale, threshold, n_min, p_max, a_count, v_count)
    if state is not None and (not isinstance(state, (tuple, list)) or len(state) != 2):
        raise TypeError("state must be None or the tuple (membrane, count) a call returned")
    parts = (None, None) if state is None else tuple(state)
    _check_context(*args, *parts, active, merge_heads, inplace)
    scalars = ((scale, "scale"), (threshold, "threshold"))
    check_data(a, v, "a", "v", a_count, v_count, scalars, validate)
    check_in_bounds(parts[1], "count", n_min, p_max, validate)
    out = call_op("spike_context", *args, *parts, active, merge_heads, inplace)
    if inplace:
        out = own_state(out, (1, 2), parts)
    return out[0], tuple(out[1:])

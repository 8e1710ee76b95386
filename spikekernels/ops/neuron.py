"""``torch.ops.spikekernels.st_bif``: the multi-step ST-BIF neuron (SPEC.md §2).

The state ``(v, count)`` comes back fresh, or with ``inplace=True`` written into the given
tensors (``ops._inplace``)."""

from __future__ import annotations

import torch

from spikekernels import levels
from spikekernels._extension import HAS_EXTENSION
from spikekernels.ops._activity import record_active
from spikekernels.ops._checks import (
    COUNT_DTYPES,
    FLOAT_DTYPES,
    check_active,
    check_bounds,
    check_flag,
    check_in_bounds,
    check_scalar_tensor,
    check_state,
    check_tensor,
    check_threshold_values,
    check_time_major,
)
from spikekernels.ops._dispatch import backend_for
from spikekernels.ops._inplace import check_inplace, own_state, placeholder, state_result
from spikekernels.ops._registry import call_op, kernel_op, launcher


def check_neuron_state(n_min, p_max, v, count, shape, like, like_name) -> torch.dtype:
    """ST-BIF bounds and optional incoming state ``v`` (float32) and count (an integer
    dtype), both or neither, of shape ``shape``; returns the outgoing count's dtype:
    ``count``'s, or ``levels.count_dtype(n_min, p_max)`` when fresh. The bounds fit int32:
    the Triton kernels count in int32 (an int64 count beyond it would wrap there alone)."""
    check_bounds(n_min, p_max, torch.int32)
    if (v is None) != (count is None):
        raise ValueError("give the incoming state as both v and count, or neither")
    check_state(v, "v", shape, (torch.float32,), like, like_name)
    check_state(count, "count", shape, COUNT_DTYPES, like, like_name)
    if count is not None:
        check_bounds(n_min, p_max, count.dtype, count_name="count")
    return neuron_count_dtype(n_min, p_max, count)


def neuron_count_dtype(n_min: int, p_max: int, count: torch.Tensor | None) -> torch.dtype:
    """The outgoing count's dtype: ``count``'s, or ``levels.count_dtype(n_min, p_max)`` when
    fresh (an op body's, after ``check_neuron_state``)."""
    return levels.count_dtype(n_min, p_max) if count is None else count.dtype


def _check_st_bif(x, threshold, n_min, p_max, v, count, active=None, inplace=False) -> torch.dtype:
    """Metadata checks (no data read); returns the dtype of the outgoing count."""
    check_tensor(x, "x", dtypes=FLOAT_DTYPES)
    check_time_major(x, "x")
    check_scalar_tensor(threshold, "threshold", x, "x")
    count_dtype = check_neuron_state(n_min, p_max, v, count, x.shape[1:], x, "x")
    check_active(active, x.shape, x, "x")
    check_inplace(inplace, (("v", v), ("count", count)), (x, threshold, active))
    return count_dtype


@kernel_op("st_bif", mutates_args=("v", "count", "active"), check=_check_st_bif)
def _st_bif_op(
    x: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    v: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    float_out: bool = False,
    active: torch.Tensor | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    count_dtype = neuron_count_dtype(n_min, p_max, count)
    backend = backend_for(x, ("triton", "cpp", "torch"))
    if backend == "triton":
        from spikekernels.kernels.neuron import st_bif_triton

        args = (v, count, float_out, count_dtype, active)
        out = st_bif_triton(launcher, x, threshold, n_min, p_max, *args, inplace=inplace)
        return (out[0], placeholder(v), placeholder(count)) if inplace else out
    # `active` is read off the int8 spikes, as the kernel reads it off sigma: a float16 spike
    # of a tiny threshold rounds to 0, and its sample still fired
    scale_after = float_out and active is not None
    float_out = float_out and not scale_after
    if backend == "cpp":
        out = torch.ops.spikekernels.st_bif_cpu(x, threshold, n_min, p_max, v, count, float_out)
    elif backend == "reference":
        from spikekernels import reference

        out, v_out, s_out = reference.st_bif(x, threshold, n_min, p_max, v, count, float_out)
        out = out, v_out, s_out.to(count_dtype)
    else:
        out = st_bif_torch(x, threshold, n_min, p_max, v, count, float_out, count_dtype)
    record_active(active, out[0])
    spikes = float_spikes(out[0], threshold, x.dtype) if scale_after else out[0]
    return spikes, state_result(inplace, out[1], v), state_result(inplace, out[2], count)


def float_spikes(spikes: torch.Tensor, threshold: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``float_out``'s spikes: ``sigma * theta`` in float32, rounded once to ``dtype``."""
    return (spikes.to(torch.float32) * threshold.to(torch.float32).reshape(())).to(dtype)


def st_bif_torch(x, threshold, n_min, p_max, v, count, float_out, count_dtype):
    """The PyTorch path (no extension, or forced): SPEC.md §2 over all elements, one step
    at a time (the rule is sequential in time), in place on fresh state tensors."""
    shape = x.shape[1:]
    theta = threshold.to(torch.float32).reshape(())
    v_cur = (
        torch.full(shape, 0.5, dtype=torch.float32, device=x.device)
        if v is None
        else v.to(torch.float32, copy=True)
    )
    s_cur = (
        torch.zeros(shape, dtype=count_dtype, device=x.device)
        if count is None
        else count.to(count_dtype, copy=True)
    )
    spikes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    for t in range(x.shape[0]):
        v_cur += x[t].to(torch.float32) / theta
        sigma = ((v_cur >= 1.0) & (s_cur < p_max)).to(torch.int8) - (
            (v_cur < 0.0) & (s_cur > n_min)
        ).to(torch.int8)
        s_cur += sigma.to(count_dtype)
        v_cur -= sigma.to(torch.float32)
        spikes[t] = sigma
    if float_out:
        spikes = float_spikes(spikes, threshold, x.dtype)
    return spikes, v_cur, s_cur


@_st_bif_op.register_fake
def _(x, threshold, n_min, p_max, v=None, count=None, float_out=False, active=None, inplace=False):
    count_dtype = _check_st_bif(x, threshold, n_min, p_max, v, count, active, inplace)
    shape = x.shape[1:]
    out = x.new_empty(x.shape, dtype=x.dtype if float_out else torch.int8)
    if inplace:
        return out, placeholder(v), placeholder(count)
    return out, x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=count_dtype)


if HAS_EXTENSION:

    @torch.library.register_fake("spikekernels::st_bif_cpu")
    def _(x, threshold, n_min, p_max, v=None, count=None, float_out=False):
        count_dtype = _check_st_bif(x, threshold, n_min, p_max, v, count)
        shape = x.shape[1:]
        out = x.new_empty(x.shape, dtype=x.dtype if float_out else torch.int8)
        return out, x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=count_dtype)


def st_bif(
    x: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    v: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    *,
    float_out: bool = False,
    active: torch.Tensor | None = None,
    inplace: bool = False,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-step ST-BIF neuron (SPEC.md §2), all T steps in one fused kernel on GPU.

    Per element, with membrane ``v`` (float32, in units of the threshold) and ``count``
    (SPEC's ``s``): ``v += u_t / theta`` (correctly rounded); ``sigma = +1`` if ``v >= 1`` and
    ``count < p_max``, ``-1`` if ``v < 0`` and ``count > n_min``, else 0; ``count += sigma``;
    ``v -= sigma``.

    Args:
        x: ``[T, *shape]`` float32, float16 or bfloat16 input increments (math in float32).
        threshold: one-element float tensor ``theta`` (the quantizer step), read on the device.
        n_min, p_max: integer count bounds, ``n_min <= 0 <= p_max``
            (see ``levels.level_bounds``).
        v, count: optional incoming state of shape ``shape`` (both or neither): ``v``
            float32, ``count`` an integer dtype. Fresh state is ``v = 0.5``, ``count = 0``
            with ``count.dtype = levels.count_dtype(n_min, p_max)`` (int8 up to level 256).
        float_out: return ``sigma * theta`` in ``x.dtype`` instead of int8 spikes.
        active: optional int32 ``[T, B]`` flags (``B = x.shape[1]``), set in place, never
            cleared: ``active[t, b] = 1`` when any element of sample ``b`` (the ``b``-th of
            ``B`` equal blocks of a step's elements) fires at step ``t``. The kernel records
            it while it writes the spikes (no extra pass). Not returned.
        inplace: write the new state into the given ``v`` and ``count`` (both required,
            contiguous, sharing no memory with an input or each other; the count keeps its
            dtype) and return those same tensors (``ops._inplace``): a state at a fixed
            address, as a CUDA graph replays it.
        validate: also check on a GPU (a host sync) what is always checked on CPU tensors:
            the threshold is finite, positive and a normal float32 (a denormal one gives NaN
            membranes), and the incoming ``count`` lies in ``[n_min, p_max]``.

    Returns:
        ``(spikes [T, *shape], v, count)``; the state is fresh, never an alias of the given
        ``v``/``count`` (with ``inplace``: the given ``v`` and ``count``, updated), so chunked
        time (feeding the state back) equals a whole run bit for bit.

    Bad input: ``TypeError``/``ValueError`` naming the argument (a float, bool or out-of-int64
    ``n_min``/``p_max`` included), before dispatch.

    Dispatch (``ops._dispatch.backend_for``): CUDA tensors run the Triton kernel; CPU tensors
    run the C++ kernel of the extension (the Triton kernel under ``TRITON_INTERPRET=1``; a
    PyTorch loop when the extension is not built). Bit-exact with ``reference.st_bif`` on
    every path. Inference only: no autograd.
    """
    _check_st_bif(x, threshold, n_min, p_max, v, count, active, inplace)
    check_flag(float_out, "float_out")
    check_threshold_values(threshold, "threshold", validate)
    check_in_bounds(count, "count", n_min, p_max, validate)
    out = call_op("st_bif", x, threshold, n_min, p_max, v, count, float_out, active, inplace)
    return own_state(out, (1, 2), (v, count)) if inplace else out

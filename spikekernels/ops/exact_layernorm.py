"""``torch.ops.spikekernels.exact_layernorm_neuron``: the residual stream's read, the LayerNorm
row function and the target-driven neuron, fused (exact mode, SPEC.md §9.2-§9.4)."""

from __future__ import annotations

import math

import torch

from spikekernels.exact_math import layer_norm_rows, pool_patch_tokens, residual_read
from spikekernels.ops._activity import record_active, record_row_active
from spikekernels.ops._checks import (
    check_active,
    check_bounds,
    check_float,
    check_in_bounds,
    check_row_active,
    check_rows_flagged,
    check_same_device,
    check_scalar_tensor,
    check_state,
    check_tensor,
    check_ternary,
    check_threshold,
    check_threshold_values,
    check_time_major,
)
from spikekernels.ops._dispatch import backend_for
from spikekernels.ops._inplace import (
    check_count_before,
    check_inplace,
    fill_count_before,
    own_state,
    placeholder,
    state_result,
)
from spikekernels.ops._registry import call_op, kernel_op, launcher
from spikekernels.ops.exact_residual import exact_residual_add_torch
from spikekernels.ops.target import target_spikes_torch

# The Triton kernel holds whole rows in registers (padded to the next power of two): ViT-L's
# width, 1024, is the widest row it takes. The other paths follow the same contract.
MAX_CHANNELS = 1024


def out_shape(d: torch.Tensor, pool: bool) -> tuple[int, ...]:
    """One step of the spikes: ``d``'s step without the token dim when pooling."""
    step = tuple(d.shape[1:])
    return (*step[:-2], step[-1]) if pool else step


def _stream(d: torch.Tensor | None, branch_spikes: torch.Tensor | None) -> tuple[str, object]:
    """The tensor that gives the residual stream's shape and device, and its name: ``d``, or
    the pending branch's spikes when ``D`` is only the branch term."""
    return ("d", d) if d is not None else ("branch_spikes", branch_spikes)


def _check_branch(prefix, name, stream, spikes, threshold, count) -> None:
    """One pending branch (``prefix`` ``branch`` or ``branch2``): all of it or none (its
    count may be None: fresh)."""
    if spikes is None:
        for arg, value in ((f"{prefix}_threshold", threshold), (f"{prefix}_count", count)):
            if value is not None:
                raise ValueError(f"{arg} needs {prefix}_spikes (the pending branch)")
        return
    check_tensor(spikes, f"{prefix}_spikes", dtypes=(torch.int8,))
    if spikes is not stream:
        if spikes.shape != stream.shape:
            raise ValueError(
                f"{prefix}_spikes must have the shape of {name} {tuple(stream.shape)}, got "
                f"{tuple(spikes.shape)}"
            )
        check_same_device(name, stream, f"{prefix}_spikes", spikes)
    if threshold is None:
        raise ValueError(f"{prefix}_spikes needs {prefix}_threshold (the branch neuron's step)")
    check_scalar_tensor(threshold, f"{prefix}_threshold", stream, name)
    check_state(count, f"{prefix}_count", stream.shape[1:], (torch.int8,), stream, name)


def _check_branches(name, stream, branch, branch2, residual_out) -> None:
    """The pending branches: the first, then optionally a second (which needs the first);
    ``residual_out`` needs a branch."""
    if not isinstance(residual_out, bool):
        raise TypeError(f"residual_out must be a bool, got {type(residual_out).__name__}")
    if branch[0] is None:
        if residual_out:
            raise ValueError("residual_out needs branch_spikes (the pending branch)")
        if any(t is not None for t in branch2):
            raise ValueError("branch2_spikes needs branch_spikes (the first pending branch)")
    _check_branch("branch", name, stream, *branch)
    _check_branch("branch2", name, stream, *branch2)


def _check_exact_layernorm_neuron(
    d,
    c,
    weight,
    bias,
    eps,
    threshold,
    n_min,
    p_max,
    count,
    pool,
    active,
    branch_spikes=None,
    branch_threshold=None,
    branch_count=None,
    branch2_spikes=None,
    branch2_threshold=None,
    branch2_count=None,
    residual_out=False,
    inplace=False,
    d_moved=None,
    residual_moved=None,
    row_active=None,
    branch_row_active=None,
    branch2_row_active=None,
    count_before=None,
) -> None:
    """Metadata checks (no data read)."""
    if not isinstance(pool, bool):
        raise TypeError(f"pool must be a bool, got {type(pool).__name__}")
    if d is None and branch_spikes is None:
        raise ValueError("d and branch_spikes are both None: give the residual stream")
    name, x = _stream(d, branch_spikes)
    check_tensor(x, name, dtypes=(torch.float64,) if name == "d" else (torch.int8,))
    check_time_major(x, name)
    branch = (branch_spikes, branch_threshold, branch_count)
    branch2 = (branch2_spikes, branch2_threshold, branch2_count)
    _check_branches(name, x, branch, branch2, residual_out)
    min_dims = 3 if pool else 2
    if x.dim() < min_dims:
        layout = "[T, *rows, tokens, C]" if pool else "[T, *rows, C]"
        raise ValueError(
            f"{name} must be {layout} with at least {min_dims} dims, got shape {tuple(x.shape)}"
        )
    channels = x.shape[-1]
    if not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(
            f"{name} has C={channels} channels (last dim); the fused LayerNorm takes 1 to "
            f"{MAX_CHANNELS} (a row is held in registers)"
        )
    if pool and x.shape[-2] < 2:
        raise ValueError(
            f"pool=True needs the class token and at least one patch token in {name}'s dim -2, "
            f"got {x.shape[-2]} tokens"
        )
    check_tensor(c, "c", dtypes=(torch.float64,))
    check_same_device(name, x, "c", c)
    # broadcasts to one step (torch.broadcast_shapes costs ~30 us a call: a check per call)
    step = x.shape[1:]
    tail = step[len(step) - c.dim() :] if c.dim() <= len(step) else None
    if tail is None or any(a not in (1, b) for a, b in zip(c.shape, tail, strict=True)):
        raise ValueError(
            f"c must broadcast to one step of {name} {tuple(x.shape[1:])}, got shape "
            f"{tuple(c.shape)}"
        )
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(t, arg, dtypes=(torch.float32,), ndim=1)
            if t.shape[0] != channels:
                raise ValueError(
                    f"{arg} must have shape ({channels},) ({name}'s C), got {tuple(t.shape)}"
                )
            check_same_device(name, x, arg, t)
    check_float(eps, "eps")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    check_threshold(threshold, "threshold", channels, x, name)
    check_bounds(n_min, p_max)
    check_state(count, "count", out_shape(x, pool), (torch.int8,), x, name)
    check_active(active, (x.shape[0], *out_shape(x, pool)), x, name)
    _check_moved(d_moved, "d_moved", d is not None, "d", x, name)
    _check_moved(residual_moved, "residual_moved", residual_out and not pool,
                 "residual_out (not pooled)", x, name)  # fmt: skip
    if residual_moved is not None and not residual_moved.is_contiguous():
        raise ValueError("residual_moved must be contiguous: the op writes it in place")
    check_row_active(row_active, (x.shape[0], *out_shape(x, pool)), x, name)
    for prefix, spikes, flags in (("branch", branch[0], branch_row_active),
                                  ("branch2", branch2[0], branch2_row_active)):  # fmt: skip
        if flags is not None and spikes is None:
            raise ValueError(f"{prefix}_row_active needs {prefix}_spikes (the pending branch)")
        if flags is not None:
            check_row_active(flags, spikes.shape, x, name, f"{prefix}_row_active", written=False)
    check_count_before(count_before, out_shape(x, pool), x, name)
    inputs = (d, c, weight, bias, threshold, active, *branch, *branch2, d_moved, row_active,
              branch_row_active, branch2_row_active)  # fmt: skip
    check_inplace(inplace, (("count", count),), inputs, (("count_before", count_before),))


def _check_moved(flags, arg: str, allowed: bool, needs: str, x, name: str) -> None:
    """``d_moved`` / ``residual_moved``: int32, one flag per row of the stream ``x`` and
    step (``x``'s shape without its channels), on its device, where the op can use them."""
    if flags is None:
        return
    if not allowed:
        raise ValueError(f"{arg} needs {needs}")
    check_tensor(flags, arg, dtypes=(torch.int32,))
    if tuple(flags.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"{arg} must have {name}'s shape without its channels {tuple(x.shape[:-1])}, got "
            f"{tuple(flags.shape)}"
        )
    check_same_device(name, x, arg, flags)


def rows_moved(d: torch.Tensor) -> torch.Tensor:
    """``residual_moved``'s truth for a stream ``d`` ``[T, *rows, C]``: int32 ``[T, *rows]``,
    1 at step 0 and where a row differs from the step before."""
    moved = torch.ones(d.shape[:-1], dtype=torch.int32, device=d.device)
    moved[1:] = (d[1:] != d[:-1]).any(dim=-1).to(torch.int32)
    return moved


def filled(d: torch.Tensor, d_moved: torch.Tensor) -> torch.Tensor:
    """The stream ``d`` ``[T, *rows, C]`` that ``d_moved`` ``[T, *rows]`` describes: a row at a
    step whose flag is 0 is the step before's (step 0 is ``d[0]``), whatever ``d`` holds
    there."""
    steps = torch.arange(d.shape[0], device=d.device).view(-1, *(1,) * (d_moved.dim() - 1))
    source = torch.where(d_moved != 0, steps, 0)
    source[0] = 0
    source = torch.cummax(source, dim=0).values
    return torch.gather(d, 0, source.unsqueeze(-1).expand(d.shape))


def _norm_input(d: torch.Tensor, c: torch.Tensor, pool: bool) -> torch.Tensor:
    """The float32 rows the LayerNorm reads at every step, as exact mode computes them."""
    return pool_patch_tokens(c, d) if pool else residual_read(c, d)


def _no_residual(like: torch.Tensor) -> torch.Tensor:
    """The op's third output when ``residual_out`` is False (a fixed return schema)."""
    return like.new_empty((0,), dtype=torch.float64)


def exact_layernorm_neuron_torch(
    d: torch.Tensor | None,
    c: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    count: torch.Tensor | None,
    pool: bool,
    active: torch.Tensor | None = None,
    branch_spikes: torch.Tensor | None = None,
    branch_threshold: torch.Tensor | None = None,
    branch_count: torch.Tensor | None = None,
    branch2_spikes: torch.Tensor | None = None,
    branch2_threshold: torch.Tensor | None = None,
    branch2_count: torch.Tensor | None = None,
    residual_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectorised PyTorch (any device): the unfused chain of exact mode over all T steps at
    once (the pending branches by ``exact_residual_add``'s PyTorch path, then ``residual_read``
    or ``pool_patch_tokens``, ``layer_norm_rows``, the target neuron, which records
    ``active``). Every float operation is elementwise (``tree_sum`` included), so a whole
    chunk gives the bits of one step at a time."""
    if branch_spikes is not None:
        d = exact_residual_add_torch(d, branch_spikes, branch_threshold, branch_count)
    if branch2_spikes is not None:
        d = exact_residual_add_torch(d, branch2_spikes, branch2_threshold, branch2_count)
    y = layer_norm_rows(_norm_input(d, c, pool), weight, bias, eps)
    spikes, count_out = target_spikes_torch(y, threshold, n_min, p_max, count, active)
    return spikes, count_out, d if residual_out else _no_residual(d)


def _flat_branch(branch, steps: int, channels: int):
    """A pending branch as the kernel takes it: ``(spikes [T, R, C] contiguous, threshold,
    count [R, C] contiguous or None)``, or None without one."""
    spikes, threshold, count = branch
    if spikes is None:
        return None
    flat = spikes.contiguous().reshape(steps, -1, channels)
    return flat, threshold, None if count is None else count.contiguous().reshape(-1, channels)


def _flat_rows(flags: torch.Tensor | None, steps: int) -> torch.Tensor | None:
    """Row flags ``[T, *rows]`` as the kernel takes them: ``[T, R]`` contiguous (or None)."""
    return None if flags is None else flags.contiguous().reshape(steps, -1)


def _constant_rows(c: torch.Tensor, step: tuple[int, ...]) -> torch.Tensor:
    """``c`` as ``[Rc, C]`` rows, contiguous, such that row ``r`` of one step of ``d`` (flat
    ``[R, C]``) adds row ``r % Rc``: ``c``'s broadcast dims must lead (``[1, N, C]`` against
    ``[B, N, C]``, the ViT's case); any other broadcast is expanded to the full step."""
    dims = (1,) * (len(step) - c.dim()) + tuple(c.shape)
    lead = 0
    while lead < len(step) - 1 and dims[lead] == 1:
        lead += 1
    if dims[-1] == step[-1] and tuple(dims[lead:]) == tuple(step[lead:]):
        return c.reshape(-1, step[-1]).contiguous()
    return c.expand(step).reshape(-1, step[-1]).contiguous()


@kernel_op(
    "exact_layernorm_neuron",
    mutates_args=("count", "active", "residual_moved", "row_active", "count_before"),
    check=_check_exact_layernorm_neuron,
)
def _exact_layernorm_neuron_op(
    d: torch.Tensor | None,
    c: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    count: torch.Tensor | None = None,
    pool: bool = False,
    active: torch.Tensor | None = None,
    branch_spikes: torch.Tensor | None = None,
    branch_threshold: torch.Tensor | None = None,
    branch_count: torch.Tensor | None = None,
    branch2_spikes: torch.Tensor | None = None,
    branch2_threshold: torch.Tensor | None = None,
    branch2_count: torch.Tensor | None = None,
    residual_out: bool = False,
    inplace: bool = False,
    d_moved: torch.Tensor | None = None,
    residual_moved: torch.Tensor | None = None,
    row_active: torch.Tensor | None = None,
    branch_row_active: torch.Tensor | None = None,
    branch2_row_active: torch.Tensor | None = None,
    count_before: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (d, c, weight, bias, eps, threshold, n_min, p_max, count, pool)
    branch = (branch_spikes, branch_threshold, branch_count)
    branch2 = (branch2_spikes, branch2_threshold, branch2_count)
    name, x = _stream(d, branch_spikes)
    backend = backend_for(x, ("triton", "torch"))
    if d_moved is not None and (pool or backend != "triton"):
        # the paths that read every row take the stream the flags describe
        d, d_moved = filled(d, d_moved), None
        args = (d, *args[1:])
    if backend == "triton":
        from spikekernels.kernels.exact_layernorm import exact_layernorm_neuron_triton
        from spikekernels.kernels.exact_residual import exact_residual_add_triton

        steps, channels = x.shape[0], x.shape[-1]
        shape = out_shape(x, pool)
        rows = math.prod(shape[:-1])
        rows_fired = None if row_active is None else row_active.view(steps, rows)
        head = (
            None if weight is None else weight.contiguous(),
            None if bias is None else bias.contiguous(),
            eps,
            n_min,
            p_max,
        )
        count_in = None if count is None else count.contiguous().reshape(rows, channels)
        before = None if count_before is None else count_before.view(rows, channels)
        if pool:
            # The readout's one pooled row per sample: the pending branches' updates and the
            # float64 token sum run first (the residual kernel, then elementwise PyTorch: the
            # bits of exact_math), the LayerNorm and neuron fused.
            for spikes_b, theta_b, count_b in (branch, branch2):
                if spikes_b is not None:
                    d = d_out = exact_residual_add_triton(launcher, spikes_b, d, theta_b, count_b)
            pooled = pool_patch_tokens(c, d).reshape(steps, rows, channels)
            spikes, count_out, _ = exact_layernorm_neuron_triton(
                launcher, threshold, pooled, None, *head, count_in, active, inplace=inplace,
                row_active=rows_fired, count_before=before,
            )  # fmt: skip
        else:
            spikes, count_out, d_out = exact_layernorm_neuron_triton(
                launcher,
                threshold,
                None if d is None else d.contiguous().reshape(steps, rows, channels),
                _constant_rows(c, shape),
                *head,
                count_in,
                active,
                _flat_branch(branch, steps, channels),
                residual_out,
                branch2=_flat_branch(branch2, steps, channels),
                inplace=inplace,
                d_moved=None if d_moved is None else d_moved.contiguous().reshape(steps, rows),
                residual_moved=None if residual_moved is None else residual_moved.view(steps, rows),
                row_active=rows_fired,
                branch_rows=_flat_rows(branch_row_active, steps),
                branch2_rows=_flat_rows(branch2_row_active, steps),
                count_before=before,
            )
        d_out = d_out.reshape(x.shape) if residual_out else _no_residual(x)
        count_out = placeholder(count) if inplace else count_out.reshape(shape)
        return spikes.reshape(steps, *shape), count_out, d_out
    fill_count_before(count_before, count)
    if backend == "reference":
        from spikekernels import reference

        out = reference.exact_layernorm_neuron(*args, *branch, *branch2, residual_out)
        record_active(active, out[0])
        record_row_active(row_active, out[0])
        out = out if residual_out else (*out, _no_residual(x))
    else:
        out = exact_layernorm_neuron_torch(*args, active, *branch, *branch2, residual_out)
        record_row_active(row_active, out[0])
    if residual_moved is not None:  # D whole: its flags where it moved
        residual_moved.copy_(rows_moved(out[2]))
    return out[0], state_result(inplace, out[1], count), out[2]


@_exact_layernorm_neuron_op.register_fake
def _(
    d,
    c,
    weight,
    bias,
    eps,
    threshold,
    n_min,
    p_max,
    count=None,
    pool=False,
    active=None,
    branch_spikes=None,
    branch_threshold=None,
    branch_count=None,
    branch2_spikes=None,
    branch2_threshold=None,
    branch2_count=None,
    residual_out=False,
    inplace=False,
    d_moved=None,
    residual_moved=None,
    row_active=None,
    branch_row_active=None,
    branch2_row_active=None,
    count_before=None,
):
    args = (d, c, weight, bias, eps, threshold, n_min, p_max, count, pool, active)
    branches = (
        branch_spikes,
        branch_threshold,
        branch_count,
        *(branch2_spikes, branch2_threshold, branch2_count),
    )
    flags = (d_moved, residual_moved, row_active, branch_row_active, branch2_row_active,
             count_before)  # fmt: skip
    _check_exact_layernorm_neuron(*args, *branches, residual_out, inplace, *flags)
    _, x = _stream(d, branch_spikes)
    shape = out_shape(x, pool)
    return (
        x.new_empty((x.shape[0], *shape), dtype=torch.int8),
        placeholder(count) if inplace else x.new_empty(shape, dtype=torch.int8),
        x.new_empty(x.shape, dtype=torch.float64) if residual_out else _no_residual(x),
    )


def exact_layernorm_neuron(
    d: torch.Tensor | None,
    c: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    count: torch.Tensor | None = None,
    *,
    pool: bool = False,
    active: torch.Tensor | None = None,
    branch_spikes: torch.Tensor | None = None,
    branch_threshold: torch.Tensor | None = None,
    branch_count: torch.Tensor | None = None,
    branch2_spikes: torch.Tensor | None = None,
    branch2_threshold: torch.Tensor | None = None,
    branch2_count: torch.Tensor | None = None,
    residual_out: bool = False,
    inplace: bool = False,
    d_moved: torch.Tensor | None = None,
    residual_moved: torch.Tensor | None = None,
    row_active: torch.Tensor | None = None,
    branch_row_active: torch.Tensor | None = None,
    branch2_row_active: torch.Tensor | None = None,
    count_before: torch.Tensor | None = None,
    validate: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Exact mode's residual read + LayerNorm + target-driven neuron, fused (SPEC.md §9.2-§9.4),
    optionally with the residual updates of the branches that feed it.

    State: the neuron's ``count`` (int8, fresh 0); the residual stream's exact state ``D`` is
    the caller's. The stream arrives as ``d`` plus at most two *pending branches* (the spikes
    of the last neuron of each branch since ``d`` was written: attention's ``proj``, the MLP's
    ``fc2``, the patch neuron), whose updates ``exact_residual_add`` would otherwise write to
    memory and this op read back. Per step ``t``, with ``C`` channels::

        count_b += branch_spikes[t]                 # int32, from branch_count (fresh 0)
        D_t = d[t] + fl64(theta_b) * fl64(count_b)  # exact_residual_add, bit for bit
                                                    # (D_t = d[t] without a branch,
                                                    #  the product alone without d)
        count_b2 += branch2_spikes[t]               # with a second branch, likewise:
        D_t = D_t + fl64(theta_b2) * fl64(count_b2) # exact_residual_add of D_t
        x = fl32(fl64(c + D_t))                     # exact_math.residual_read
        mean = fl32(tree_sum(x) / C)                # exact_math.layer_norm_rows, op by op
        xc = x - mean;  var = fl32(tree_sum(xc * xc) / C)
        y = fl32(fl32(xc / fl32(sqrt(var + fl32(eps)))) * w) + b
        target = clamp(floor(y / theta + 1/2), n_min, p_max)
        sigma  = sign(target - count);  count += sigma;  out_t = sigma

    ``tree_sum`` pads the row with zeros to a power of two and adds neighbours,
    ``x[2i] + x[2i + 1]``, until one element is left; every operation rounds once (no fused
    multiply-add; ``sqrt`` and ``/`` correctly rounded). With ``pool=True`` (the
    ``global_pool`` readout of ViT-B/L) the row is instead
    ``exact_math.pool_patch_tokens(c, D_t)``: the float64 mean of
    the patch tokens (dim -2, the class token at index 0 excluded), then ``fl32``. With
    ``residual_out`` the op also returns ``D`` for the next reader. A ViT block writes ``D``
    once: its ``norm2`` reads ``d`` and the attention branch and writes nothing, the next
    ``norm1`` reads ``d`` and both branches and writes ``D``: 27 bytes per element and step
    for the block, where one write per norm took 34 (and separate ``exact_residual_add``
    launches 50), and with the row flags (``d_moved``, ``residual_moved``) 3 for a row that
    did not move. Every path adds the first branch, then the second; in a converted model
    the order does not matter (each term and partial sum is exact in float64: SPEC.md §9.2,
    checked at conversion).

    Args:
        d: ``[T, *rows, C]`` float64 (``[T, *rows, tokens, C]`` with ``pool``): the residual
            stream's spike-driven part before the pending branches at each step (current
            values, not increments), or None when the branches are all of it (the patch
            embedding). ``1 <= C <= 1024``.
        c: float64 constant part (class token and position embedding), broadcastable to one
            step of ``d`` (e.g. ``[1, N, C]`` against ``d`` ``[T, B, N, C]``).
        weight, bias: ``[C]`` float32 or None: the LayerNorm's affine parameters.
        eps: Python float, finite, ``>= 0``; added to the variance as float32 (``fl32(eps)``,
            as PyTorch does with a scalar).
        threshold: the neuron's ``theta`` (the norm quantizer's step): one element, or ``[C]``
            per channel. Read as float32 on the device (no host sync).
        n_min, p_max: Python ints, ``n_min <= 0 <= p_max``, inside int8's ``[-128, 127]``.
        count: optional incoming int8 count, shape of one step of the spikes; fresh 0.
        pool: read the pooled patch tokens instead of every row (see above; the branch's
            update applies to every token first).
        active: optional int32 ``[T, B]`` per-sample flags, ``B`` the spikes' dim 1, set in
            place as the kernel writes the spikes (``target_spikes``' contract:
            ``active[t, b] = 1`` where sample ``b`` fires at step ``t``). Not returned.
        branch_spikes: optional int8 ``[T, *shape of d]`` in ``{-1, 0, 1}``, the pending
            branch neuron's spikes (checked ternary on CPU, on a GPU with ``validate``).
        branch_threshold: that neuron's step, a one-element float tensor (needed with
            ``branch_spikes``).
        branch_count: optional int8, one step of ``branch_spikes``: that neuron's count before
            these steps (fresh 0).
        branch2_spikes, branch2_threshold, branch2_count: optional second pending branch (the
            later one), as the first; it needs the first.
        residual_out: also return ``D`` with both branches added (needs ``branch_spikes``).
        inplace: write the new ``count`` into the given one (required, contiguous, sharing
            no memory with an input) and return that same tensor (``ops._inplace``): a state
            at a fixed address, as a CUDA graph replays it. ``branch_count`` and
            ``branch2_count`` are inputs, not written (the caller advances them by the
            chunk's branch spikes).
        d_moved: optional int32 ``[T, *rows]`` (``d``'s shape without ``C``), read only: the
            stream's row flags (its writer's ``residual_moved``). A row of ``d`` at a step
            ``t >= 1`` whose flag is 0 *is* the step before's, whatever its memory holds:
            the Triton kernel does not read it (it keeps the step before's in registers),
            the other paths and ``pool`` read ``filled(d, d_moved)``. A flag may be set
            where nothing moved. Quiet rows then cost little of the float64 stream.
        residual_moved: optional int32 ``[T, *rows]``, contiguous, with ``residual_out``
            (not with ``pool``): written in place with ``D``'s row flags, 1 at step 0 and
            wherever a row of ``D`` may differ from the step before (the Triton kernel: a
            row whose ``d`` flag is set, or that a branch spike falls in, or whose branch row
            flag is set; the other paths:
            where it does). The Triton kernel does not write ``D``'s rows whose flag is 0:
            ``D`` is then the stream together with these flags, what the next readers take
            as ``d`` and ``d_moved``.
        row_active: optional int32 ``[T, *rows]`` (the spikes' shape without ``C``),
            contiguous: ``active`` per row of the output, set in place (``row_active[t, *r] =
            1`` where row ``r`` fires at step ``t``; never cleared), on every path. The linear
            after the norm takes them as ``exact_linear``'s ``s_row_active``.
        branch_row_active, branch2_row_active: optional int32, one flag per step and row of
            that branch's spikes (their shape without ``C``), read only: the branch neuron's
            ``row_active``. A 0 promises that the row of its spikes is silent at that step
            (checked on CPU, and with ``validate``; 1 may stand for a silent row). The
            Triton kernel then does not read the branch's spikes in those rows (nor reduce
            them for ``residual_moved``); ``pool`` and the other paths ignore them. No bit of
            the result depends on them.
        count_before: optional int8 like ``count`` (contiguous), written: the neuron's count
            before these steps (``count`` as it comes in, zeros when fresh), which the linear
            after the norm takes as ``s_before``. The Triton kernel copies each count tile
            as it reads it: no clone of its own before a call that updates the count in place.
        validate: on a GPU also check the thresholds' values (the branches' too), the
            branches' spikes and row flags, and that ``count`` lies inside ``[n_min, p_max]``
            (a host sync). On CPU always.

    Returns:
        ``(spikes [T, *rows, C] int8 in {-1, 0, 1}, count [*rows, C] int8)``, and with
        ``residual_out`` a third, ``D`` ``[T, *shape of d]`` float64 (with
        ``residual_moved``: the stream it describes, see there); fresh tensors (with
        ``inplace`` the count is the given ``count``, updated), so chunked time (feeding
        ``count`` and ``branch_count`` back) equals a whole run bit for bit. (The registered
        op always returns three tensors, a fixed schema: the third is an empty ``[0]``
        float64 when ``residual_out`` is False; with ``inplace`` the second is a zero-size
        placeholder, the public face returning ``count`` itself there.)

    Exactness: bit-identical to ``reference.exact_layernorm_neuron`` and to the unfused chain
    ``exact_residual_add`` -> ``residual_read`` -> ``ExactLayerNorm`` -> ``TargetNeuron`` on
    every path and device. A row with NaN gives NaN values and no spikes; a constant row with
    ``eps == 0`` likewise.

    Dispatch (``ops._dispatch.backend_for``): CUDA tensors run the Triton kernel (one program
    per block of rows, whole rows in registers, the T loop inside with both counts in
    registers; with ``pool`` the branches' updates (``exact_residual_add``'s kernel) and the
    token mean run first); CPU tensors run vectorised PyTorch (the Triton kernel under
    ``TRITON_INTERPRET=1``); ``force_backend("reference")`` runs the oracle. Inference only:
    no autograd.
    """
    args = (d, c, weight, bias, eps, threshold, n_min, p_max, count, pool)
    branches = (branch_spikes, branch_threshold, branch_count)
    branches += (branch2_spikes, branch2_threshold, branch2_count)
    flags = (d_moved, residual_moved, row_active, branch_row_active, branch2_row_active,
             count_before)  # fmt: skip
    _check_exact_layernorm_neuron(*args, active, *branches, residual_out, inplace, *flags)
    check_threshold_values(threshold, "threshold", validate)
    check_in_bounds(count, "count", n_min, p_max, validate)
    for prefix, spikes, theta in (
        ("branch", branch_spikes, branch_threshold),
        ("branch2", branch2_spikes, branch2_threshold),
    ):
        if spikes is not None:
            check_threshold_values(theta, f"{prefix}_threshold", validate)
            check_ternary(spikes, f"{prefix}_spikes", validate)
    for prefix, spikes, hint in (("branch", branch_spikes, branch_row_active),
                                 ("branch2", branch2_spikes, branch2_row_active)):  # fmt: skip
        check_rows_flagged(spikes, hint, f"{prefix}_row_active", f"{prefix}_spikes", validate)
    out = call_op(
        "exact_layernorm_neuron",
        d,
        c,
        weight,
        bias,
        float(eps),
        threshold,
        n_min,
        p_max,
        count,
        pool,
        active,
        *branches,
        residual_out,
        inplace,
        *flags,
    )
    if inplace:
        out = own_state(out, (1,), (count,))
    return out if residual_out else out[:2]

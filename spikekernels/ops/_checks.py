"""Input checks shared by the ops. Each error names the argument and what was expected.

Metadata checks (type, dtype, rank, shape, device) are free and run everywhere, fake tensors
included. Checks that read data (a threshold's sign and range, a scale being finite, spikes
being ternary, state inside its bounds, counts fitting int8) would sync a GPU, so they run on
CPU tensors always, on a GPU only when the caller asks for validation (``validate=True``), and
never while torch.compile traces. They run in the Python faces (``spikekernels.ops.<name>``):
the registered ``torch.ops.spikekernels.<name>`` ops, which a face calls after its checks,
check metadata only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COUNT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)
THRESHOLD_DTYPES = FLOAT_DTYPES + (torch.float64,)
# exact types of a tensor with real memory and no subclass dispatch (fake, functional and
# other subclasses are not)
PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def check_tensor(
    t: object,
    name: str,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    min_ndim: int | None = None,
    ndim: int | None = None,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    return t


def check_time_major(x: torch.Tensor, name: str) -> None:
    """``x`` is ``[T, *shape]`` with ``T >= 1``."""
    if x.dim() < 1:
        raise ValueError(f"{name} must be time-major [T, ...], got a 0-d tensor")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has T == 0 time steps; give at least one step")


def check_same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}")


def check_scalar_tensor(
    t: object,
    name: str,
    like: torch.Tensor,
    like_name: str,
    dtypes: Sequence[torch.dtype] = THRESHOLD_DTYPES,
) -> None:
    """A one-element tensor of ``dtypes`` (any float by default: a threshold or a scale) on
    ``like``'s device."""
    check_tensor(t, name, dtypes=dtypes)
    if t.numel() != 1:
        raise ValueError(f"{name} must have exactly one element, got shape {tuple(t.shape)}")
    check_same_device(like_name, like, name, t)


def check_threshold(
    threshold: object, name: str, channels: int | None, like: torch.Tensor, like_name: str
) -> None:
    """A float threshold on ``like``'s device: one element, or ``[channels]`` per channel
    (``channels`` None: one element only). Its values: ``check_threshold_values``."""
    check_tensor(threshold, name, dtypes=THRESHOLD_DTYPES)
    if threshold.numel() != 1:
        if channels is None:
            raise ValueError(
                f"{name} must have exactly one element, got shape {tuple(threshold.shape)}"
            )
        if threshold.dim() != 1 or threshold.shape[0] != channels:
            raise ValueError(
                f"{name} must have one element or shape ({channels},) (one per channel of the "
                f"last dim), got shape {tuple(threshold.shape)}"
            )
    check_same_device(like_name, like, name, threshold)


# the integer dtypes' ranges, looked up once (the bounds are checked on every call; a dict,
# not functools.cache, which torch.compile warns about when it traces a face)
_INT_RANGES = {
    dtype: (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
}


def check_bounds(
    n_min: object,
    p_max: object,
    count_dtype: torch.dtype = torch.int8,
    *,
    names: tuple[str, str] = ("n_min", "p_max"),
    count_name: str | None = None,
) -> None:
    """Integer level bounds ``n_min <= 0 <= p_max`` (``names``: the arguments that carry
    them) whose counts fit ``count_dtype``, the exact-mode neurons' int8 by default
    (``count_name``: the incoming count that brings its own dtype)."""
    check_int(n_min, names[0])
    check_int(p_max, names[1])
    if n_min > p_max:
        raise ValueError(f"level bounds inverted: {names[0]}={n_min} > {names[1]}={p_max}")
    if n_min > 0 or p_max < 0:
        raise ValueError(f"level bounds must contain 0 (the fresh count): [{n_min}, {p_max}]")
    low, high = _INT_RANGES[count_dtype]
    if n_min < low or p_max > high:
        dtype = str(count_dtype).removeprefix("torch.")
        if count_name is not None:
            raise ValueError(
                f"{count_name} has dtype {dtype}, which cannot hold counts in [{n_min}, {p_max}]"
            )
        raise ValueError(
            f"level bounds [{n_min}, {p_max}]: the {dtype} count would overflow; counts must "
            f"lie in [{low}, {high}]"
        )


def check_spike_pair(a: object, b: object, a_name: str, b_name: str) -> None:
    """The two spike trains of a spike product: ``a`` ``[T, *batch, M, K]`` and ``b``
    ``[T, *batch, K, N]``, int8, on one device, the same steps and batch dims."""
    check_tensor(a, a_name, dtypes=(torch.int8,), min_ndim=3)
    check_tensor(b, b_name, dtypes=(torch.int8,), min_ndim=3)
    check_time_major(a, a_name)
    check_time_major(b, b_name)
    check_same_device(a_name, a, b_name, b)
    if b.shape[0] != a.shape[0]:
        raise ValueError(f"{b_name} has T={b.shape[0]} time steps but {a_name} has T={a.shape[0]}")
    if a.shape[1:-2] != b.shape[1:-2]:
        raise ValueError(
            f"{a_name} [T, *batch, M, K] and {b_name} [T, *batch, K, N] must have the same "
            f"batch dims (no broadcasting), got {tuple(a.shape[1:-2])} and "
            f"{tuple(b.shape[1:-2])}"
        )
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"inner dims differ: {a_name} is [.., M, K={a.shape[-1]}] but {b_name} is "
            f"[.., K={b.shape[-2]}, N]"
        )


def check_state(
    t: torch.Tensor | None,
    name: str,
    shape: Sequence[int],
    dtypes: Sequence[torch.dtype],
    like: torch.Tensor,
    like_name: str,
) -> None:
    """Optional incoming state: shape ``shape``, a dtype in ``dtypes``, ``like``'s device."""
    if t is None:
        return
    check_tensor(t, name, dtypes=dtypes)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape {tuple(shape)} (the per-step shape of {like_name}), "
            f"got {tuple(t.shape)}"
        )
    check_same_device(like_name, like, name, t)


def check_active(
    active: torch.Tensor | None,
    spikes_shape: Sequence[int],
    like: torch.Tensor,
    like_name: str,
    name: str = "active",
) -> None:
    """Optional per-sample activity flags that a neuron op sets in place: int32 ``[T, B]``,
    ``T`` and ``B`` the spikes' dims 0 and 1, contiguous (the kernels store into it), on
    ``like``'s device, and the rows of one step (the spikes' dims 1 to -2 flattened) split
    into ``B`` equal blocks, one per sample."""
    if active is not None:
        _check_flags(active, (), spikes_shape, like, like_name, name)


def check_tally(
    tally: torch.Tensor | None, steps: int, like: torch.Tensor, like_name: str, name: str
) -> None:
    """Optional per-step spike totals that a neuron op adds to in place: int64 ``[T]``, ``T``
    the op's steps, contiguous (the kernels add into it), on ``like``'s device."""
    if tally is None:
        return
    check_tensor(tally, name, dtypes=(torch.int64,))
    if tuple(tally.shape) != (steps,):
        raise ValueError(
            f"{name} must have shape ({steps},) (one total per step), got {tuple(tally.shape)}"
        )
    check_same_device(like_name, like, name, tally)
    if not tally.is_contiguous():
        raise ValueError(f"{name} must be contiguous: the op adds into it in place")


def check_group_active(
    group_active: torch.Tensor | None,
    spikes_shape: Sequence[int],
    like: torch.Tensor,
    like_name: str,
    name: str = "group_active",
) -> None:
    """Optional activity flags per sample and column group: int32 ``[T, B, G]``, its ``[T,
    B]`` as ``check_active``'s, and ``G >= 1`` groups of equal width over the spikes' last
    dim."""
    if group_active is None:
        return
    check_tensor(group_active, name, dtypes=(torch.int32,))
    if group_active.dim() == 3:
        groups, channels = group_active.shape[2], spikes_shape[-1]
        if groups == 0 or channels % groups:
            raise ValueError(
                f"{name}: its {groups} column groups (dim 2) must split the {channels} output "
                "channels evenly"
            )
    _check_flags(group_active, ("G",), spikes_shape, like, like_name, name)


def check_row_active(
    flags: torch.Tensor | None,
    spikes_shape: Sequence[int],
    like: torch.Tensor,
    like_name: str,
    name: str = "row_active",
    *,
    written: bool = True,
) -> None:
    """Optional activity flags per step and row of spikes ``[T, *rows, C]``: int32 ``[T,
    *rows]`` (the spikes' shape without its last dim) on ``like``'s device; contiguous where
    the op writes them (``written``: a neuron op's ``row_active``; a reader's hint, such as
    ``exact_linear``'s ``s_row_active``, may be strided)."""
    if flags is None:
        return
    check_tensor(flags, name, dtypes=(torch.int32,))
    want = tuple(spikes_shape[:-1])
    if tuple(flags.shape) != want:
        raise ValueError(
            f"{name} must have shape {want} (one flag per step and row of the spikes), got "
            f"{tuple(flags.shape)}"
        )
    check_same_device(like_name, like, name, flags)
    if written and not flags.is_contiguous():
        raise ValueError(f"{name} must be contiguous: the op writes it in place")


def check_rows_flagged(
    s: torch.Tensor, flags: torch.Tensor | None, name: str, s_name: str, validate: bool
) -> None:
    """Data check of a reader's row hint (CPU always, a GPU with ``validate``): a row flagged 0
    at a step must hold no spike there (the kernel skips it unread)."""
    if flags is None or not may_read_data(s, validate):
        return
    if bool(((flags == 0) & (s != 0).any(dim=-1)).any()):
        raise ValueError(
            f"{name} is 0 where a row of {s_name} holds a spike: a 0 promises the row is "
            "silent at that step (give the producer's row_active, or None)"
        )


def _check_flags(
    flags: torch.Tensor,
    extra: tuple[str, ...],
    spikes_shape: Sequence[int],
    like: torch.Tensor,
    like_name: str,
    name: str,
) -> None:
    """``check_active``'s checks of flags ``[T, B, *extra]``."""
    check_tensor(flags, name, dtypes=(torch.int32,))
    if len(spikes_shape) < 2:
        raise ValueError(
            f"{name} needs spikes [T, B, ...] with a batch dim, but the spikes have shape "
            f"{tuple(spikes_shape)}"
        )
    steps, batch = spikes_shape[0], spikes_shape[1]
    if tuple(flags.shape[:2]) != (steps, batch) or flags.dim() != 2 + len(extra):
        want = ", ".join((str(steps), str(batch), *extra))
        raise ValueError(
            f"{name} must have shape ({want}) (the spikes' steps and batch dim 1), "
            f"got {tuple(flags.shape)}"
        )
    check_same_device(like_name, like, name, flags)
    if not flags.is_contiguous():
        raise ValueError(f"{name} must be contiguous: the op writes it in place")
    rows = math.prod(spikes_shape[1:-1])
    if batch and rows % batch:
        raise ValueError(
            f"{name}: the spikes' {rows} rows per step (dims 1 to -2 of shape "
            f"{tuple(spikes_shape)}) do not split into {batch} samples (dim 1); give spikes "
            "[T, B, ..., N]"
        )


def check_int(value: object, name: str, *, lo: int | None = None, hi: int | None = None) -> int:
    """A Python int (not bool, not float) in ``[lo, hi]``; default range: int64, what the op
    schemas take. Checked before dispatch, whose own error for a float is obscure."""
    if isinstance(value, torch.SymInt):  # traced with dynamic shapes: checked when run
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    lo = -(2**63) if lo is None else lo
    hi = 2**63 - 1 if hi is None else hi
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_float(value: object, name: str) -> float:
    """A real Python number (int or float, not bool), returned as a float."""
    if isinstance(value, torch.SymFloat):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    return float(value)


def check_flag(value: object, name: str) -> None:
    """A Python bool (an int or a tensor would pass ``if`` and mean something else)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def may_read_data(t: torch.Tensor, validate: bool) -> bool:
    """Whether a data-reading check may run: CPU (no sync) or asked for, never while tracing.
    ``validate`` is the caller's flag: a bool, named if not."""
    check_flag(validate, "validate")
    if torch.compiler.is_compiling():
        return False
    if isinstance(t, torch._subclasses.fake_tensor.FakeTensor):
        return False
    if isinstance(t, torch._subclasses.functional_tensor.FunctionalTensor):
        return False
    return validate or t.device.type == "cpu"


def check_threshold_values(t: torch.Tensor, name: str, validate: bool = False) -> None:
    """A threshold's data (CPU always; a GPU only when ``validate``): every element, in
    float32 as the kernels read it, positive, finite and normal. A subnormal step makes
    ``y / theta`` overflow to inf (a NaN membrane) or loses the correctly rounded quotient
    under flush-to-zero."""
    if not may_read_data(t, validate):
        return
    t32 = t.to(torch.float32)
    if not bool(((t32 >= torch.finfo(torch.float32).tiny) & torch.isfinite(t32)).all()):
        raise ValueError(
            f"{name} must be positive, finite and a normal float32, got {t.reshape(-1).tolist()}"
        )


def check_finite_nonzero(t: torch.Tensor, name: str, validate: bool = False) -> None:
    """A scale: finite and nonzero (CPU always; GPU when validating)."""
    if may_read_data(t, validate) and not bool(
        (torch.isfinite(t.to(torch.float32)) & (t != 0)).all()
    ):
        values = t.reshape(-1).tolist()
        shown = values if len(values) <= 8 else f"{len(values)} values, some 0 or not finite"
        raise ValueError(f"{name} must be finite and nonzero, got {shown}")


def check_finite_weight(weight: torch.Tensor, validate: bool = False) -> None:
    """A float weight (or its bf16 parts): finite (CPU always; GPU when validating). A silent
    row skips its product on the GPU (SPEC.md §6: zero), where ``0 * inf`` would be NaN: a
    non-finite weight would make the answer depend on the backend."""
    if weight.is_floating_point() and may_read_data(weight, validate):
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("weight must be finite (it holds inf or NaN)")


def check_ternary(t: torch.Tensor, name: str, validate: bool) -> None:
    """Spikes in {-1, 0, 1}: on CPU tensors always (one cheap pass, no sync), on a GPU only
    when asked (a host sync). A range test, not ``abs``: int8 ``abs(-128)`` is -128."""
    if may_read_data(t, validate) and t.numel() > 0:
        lo, hi = (int(v) for v in torch.aminmax(t))
        if lo < -1 or hi > 1:
            raise ValueError(
                f"{name} must hold ternary spikes in {{-1, 0, 1}}, got values in [{lo}, {hi}]"
            )


def check_in_bounds(
    t: torch.Tensor | None, name: str, lo: int, hi: int, validate: bool = False
) -> None:
    """Incoming integer state inside ``[lo, hi]`` (CPU always; GPU when validating)."""
    if t is None or not may_read_data(t, validate) or t.numel() == 0:
        return
    got_lo, got_hi = (int(v) for v in torch.aminmax(t))
    if got_lo < lo or got_hi > hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got values in [{got_lo}, {got_hi}]")


def check_running_counts(
    x: torch.Tensor, before: torch.Tensor | None, name: str, validate: bool, hint: str = ""
) -> None:
    """The running count of spikes ``x`` from its count ``before`` the steps (None: 0), that
    count included, stays in int8 at every step: the spike products hold counts in int8.
    Reads all of ``x`` (CPU tensors always, a GPU only with ``validate``); ``hint`` ends the
    message."""
    if not may_read_data(x, validate) or x.numel() == 0:
        return
    running = torch.cumsum(x, 0, dtype=torch.int32)
    if before is not None:
        before = before.to(torch.int32)
        running = torch.cat([before[None], running + before])
    lo, hi = (int(v) for v in torch.aminmax(running))
    info = torch.iinfo(torch.int8)
    if lo < info.min or hi > info.max:
        raise ValueError(
            f"the running count of {name} reaches [{lo}, {hi}], outside int8 "
            f"[{info.min}, {info.max}]: the spike product holds counts in int8{hint}"
        )

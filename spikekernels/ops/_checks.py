"""Input checks shared by the ops. Each error names the argument and what was expected.

Metadata checks (type, dtype, rank, shape, device) are free and run everywhere, fake tensors
included. Checks that read data (a threshold's sign, spikes being ternary) would sync a GPU, so
they run on CPU tensors, or on any device when the caller asks for validation, and never while
torch.compile traces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COUNT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


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


def check_scalar_tensor(t: object, name: str, like: torch.Tensor, like_name: str) -> None:
    """A one-element floating tensor on ``like``'s device (a threshold or a scale)."""
    check_tensor(t, name, dtypes=FLOAT_DTYPES + (torch.float64,))
    if t.numel() != 1:
        raise ValueError(f"{name} must have exactly one element, got shape {tuple(t.shape)}")
    check_same_device(like_name, like, name, t)


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


def may_read_data(t: torch.Tensor, validate: bool) -> bool:
    """Whether a data-reading check may run: CPU (no sync) or asked for, never while tracing."""
    if torch.compiler.is_compiling():
        return False
    if isinstance(t, torch._subclasses.fake_tensor.FakeTensor):
        return False
    return validate or t.device.type == "cpu"


def check_positive(t: torch.Tensor, name: str, validate: bool = False) -> None:
    if may_read_data(t, validate) and not bool((t > 0).all()):
        raise ValueError(f"{name} must be positive, got {t.reshape(-1).tolist()}")


def check_ternary(t: torch.Tensor, name: str, validate: bool) -> None:
    """Only when asked: a full read of the spikes costs as much as a kernel pass."""
    if validate and may_read_data(t, validate) and not bool((t.abs() <= 1).all()):
        raise ValueError(f"{name} must hold ternary spikes in {{-1, 0, 1}}")

"""``torch.ops.spikekernels.spike_linear``: ternary spikes times a weight (SPEC.md §6)."""

from __future__ import annotations

import math

import torch

from spikekernels.exact_math import divide_by_count
from spikekernels.ops._checks import (
    FLOAT_DTYPES,
    check_finite_nonzero,
    check_finite_weight,
    check_int,
    check_same_device,
    check_scalar_tensor,
    check_tensor,
    check_ternary,
    check_threshold_values,
    check_time_major,
)
from spikekernels.ops._dispatch import backend_for
from spikekernels.ops._registry import call_op, kernel_op, launcher
from spikekernels.ops.weight_split import SPLIT_DOC, bf16x3_parts, merge_bf16x3

WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)


def check_weight(weight: object, dtypes) -> None:
    """``[N, K]`` in one of ``dtypes``, or ``[3, N, K]`` bfloat16 (the float32 weight's split)."""
    check_tensor(weight, "weight", dtypes=dtypes)
    if weight.dim() == 3 and weight.dtype == torch.bfloat16 and weight.shape[0] == 3:
        return
    if weight.dim() != 2:
        raise ValueError(
            f"weight must have 2 dims ([N, K]), or be [3, N, K] bfloat16 ({SPLIT_DOC}); got "
            f"{str(weight.dtype).removeprefix('torch.')} of shape {tuple(weight.shape)}"
        )


def check_linear_inputs(s, weight, in_threshold, bias, t0, bias_steps) -> int:
    """Metadata checks shared with the fused ``spike_linear_neuron``; returns ``N``."""
    check_tensor(s, "s", dtypes=(torch.int8,))
    check_time_major(s, "s")
    if s.dim() < 2:
        raise ValueError(f"s must be [T, *, K] with at least 2 dims, got shape {tuple(s.shape)}")
    check_same_device("s", s, "weight", weight)
    n, k = weight.shape[-2:]
    if s.shape[-1] != k:
        raise ValueError(
            f"s has K={s.shape[-1]} input features (last dim) but weight [N, K] has K={k}"
        )
    check_scalar_tensor(in_threshold, "in_threshold", s, "s")
    if bias is not None:
        check_tensor(bias, "bias", dtypes=FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != n:
            raise ValueError(f"bias must have shape ({n},) (weight's N), got {tuple(bias.shape)}")
        check_same_device("s", s, "bias", bias)
    check_int(t0, "t0")
    check_int(bias_steps, "bias_steps")
    if t0 < 0:
        raise ValueError(f"t0 (the global index of the first step) must be >= 0, got {t0}")
    if bias_steps < 1:
        raise ValueError(f"bias_steps must be >= 1, got {bias_steps}")
    return n


def _check_spike_linear(s, weight, in_threshold, bias, t0, bias_steps, weight_scale) -> None:
    """Metadata checks (no data read)."""
    check_weight(weight, WEIGHT_DTYPES)
    n = check_linear_inputs(s, weight, in_threshold, bias, t0, bias_steps)
    if weight.dtype == torch.int8:
        if weight_scale is None:
            raise ValueError(
                "weight is int8: give weight_scale, its per-output-channel float scale [N]"
            )
        check_tensor(weight_scale, "weight_scale", dtypes=FLOAT_DTYPES, ndim=1)
        if weight_scale.shape[0] != n:
            raise ValueError(
                f"weight_scale must have shape ({n},) (weight's N), got {tuple(weight_scale.shape)}"
            )
        check_same_device("s", s, "weight_scale", weight_scale)
    elif weight_scale is not None:
        raise ValueError(
            f"weight_scale is only for int8 weights; weight is {weight.dtype}, so pass None"
        )


def float32_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as float32 ``[N, K]`` (a split merged back, exactly)."""
    return merge_bf16x3(weight) if weight.dim() == 3 else weight.to(torch.float32)


def tensor_core_weight(weight: torch.Tensor) -> torch.Tensor:
    """What the kernels multiply by: a float32 ``[N, K]`` weight split into bf16 parts (per
    call, unchecked: see ``spike_linear``), any other weight as it is, contiguous."""
    if weight.dtype == torch.float32:
        return bf16x3_parts(weight)
    return weight.contiguous()


def bias_share(bias: torch.Tensor | None, bias_steps: int) -> torch.Tensor | None:
    """What is added on each due step, in float32: exactly the reference's expression
    (``bias / bias_steps`` correctly rounded, on a GPU too), contiguous (the kernels read it
    by column index; a strided or expanded bias passes the checks)."""
    if bias is None:
        return None
    share = bias.to(torch.float32)
    return (share if bias_steps == 1 else divide_by_count(share, bias_steps)).contiguous()


def due_steps(t0: int, steps: int, bias_steps: int) -> int:
    """How many of this chunk's steps (global ``t0 ..``) still get a bias share."""
    return max(0, min(steps, bias_steps - t0))


def weight_offsets_fit(weight: torch.Tensor) -> bool:
    """Whether the Triton kernels' int32 offsets reach every element of ``weight``'s tensor
    core form (a float32 weight as three bf16 parts, a split one as its parts, any other as
    itself): below 2^31 elements. Beyond that (an LLM-sized head) the PyTorch path runs."""
    n, k = weight.shape[-2:]
    parts = 3 if weight.dtype == torch.float32 else weight.shape[0] if weight.dim() == 3 else 1
    return parts * n * k < 2**31


def spike_linear_torch(
    s: torch.Tensor,
    weight: torch.Tensor,
    in_threshold: torch.Tensor,
    bias: torch.Tensor | None,
    t0: int,
    bias_steps: int,
    weight_scale: torch.Tensor | None,
) -> torch.Tensor:
    """The CPU path: one float32 matmul per step (all of the step's rows), then the bias
    schedule. A BLAS may order a float sum by the shape of its call, so a call per step keeps
    a float weight's bits independent of how the steps are chunked.

    For int8 weights every partial sum is an integer of magnitude at most ``128 K``: below
    2^24 while ``K < 2^17``, so the float32 matmul is exact in any order; longer K multiplies
    in float64 (exact to 2^53) and rounds the integer to float32 once, as the Triton kernel's
    int32 path does. Either way the same bits as that path.
    """
    n, k = weight.shape[-2:]
    theta = in_threshold.to(torch.float32).reshape(())
    steps, rows = s.shape[0], math.prod(s.shape[1:-1])
    if weight.dtype == torch.int8 and 128 * k >= 1 << 24:
        dtype, w = torch.float64, weight.double().t()
    else:
        dtype, w = torch.float32, float32_weight(weight).t()
    x = s.reshape(steps, rows, k)
    acc = torch.empty((steps, rows, n), dtype=torch.float32, device=s.device)
    for t in range(steps):
        # fresh operands a step: the same shapes and alignment whatever the step's place in
        # the chunk (a BLAS may pick its code path by either)
        acc[t] = torch.matmul(x[t].to(dtype), w)
    if weight.dtype == torch.int8:
        out = (theta * weight_scale.to(torch.float32)) * acc
    else:
        out = theta * acc
    out = out.reshape(*s.shape[:-1], n)
    due = due_steps(t0, s.shape[0], bias_steps)
    if bias is not None and due > 0:
        out[:due] += bias_share(bias, bias_steps)
    return out


@kernel_op("spike_linear", check=_check_spike_linear)
def _spike_linear_op(
    s: torch.Tensor,
    weight: torch.Tensor,
    in_threshold: torch.Tensor,
    bias: torch.Tensor | None = None,
    t0: int = 0,
    bias_steps: int = 1,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    backend = backend_for(s, ("triton", "torch"))
    if backend == "reference":
        from spikekernels import reference

        w = float32_weight(weight)
        if weight.dtype == torch.int8:
            w = w * weight_scale.to(torch.float32)[:, None]
        return reference.spike_linear(s, w, in_threshold, bias, t0=t0, bias_steps=bias_steps)
    if backend == "triton" and weight_offsets_fit(weight):
        from spikekernels.kernels.spike_linear import spike_linear_triton

        n, k = weight.shape[-2:]
        rows = math.prod(s.shape[1:-1])
        ws = None if weight_scale is None else weight_scale.to(torch.float32).contiguous()
        out = spike_linear_triton(
            launcher,
            s.contiguous().reshape(s.shape[0] * rows, k),
            tensor_core_weight(weight),
            in_threshold,
            bias_share(bias, bias_steps),
            ws,
            due_steps(t0, s.shape[0], bias_steps) * rows,
        )
        return out.reshape(*s.shape[:-1], n)
    return spike_linear_torch(s, weight, in_threshold, bias, t0, bias_steps, weight_scale)


@_spike_linear_op.register_fake
def _(s, weight, in_threshold, bias=None, t0=0, bias_steps=1, weight_scale=None):
    _check_spike_linear(s, weight, in_threshold, bias, t0, bias_steps, weight_scale)
    return s.new_empty((*s.shape[:-1], weight.shape[-2]), dtype=torch.float32)


def spike_linear(
    s: torch.Tensor,
    weight: torch.Tensor,
    in_threshold: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    t0: int = 0,
    bias_steps: int = 1,
    weight_scale: torch.Tensor | None = None,
    validate: bool = False,
) -> torch.Tensor:
    """Spike linear (SPEC.md §6): ``out_t = theta * (s_t @ W^T)`` plus the bias schedule.

    Args:
        s: ``[T, *, K]`` int8 ternary spikes in {-1, 0, 1} (the input neuron's output).
        weight: ``[N, K]``: float32, float16, bfloat16, or int8 with ``weight_scale``
            (the dequantized weight is ``weight[n, k] * weight_scale[n]``); or ``[3, N, K]``
            bfloat16, the three bf16 parts of a float32 weight, from ``split_weight_bf16x3``
            (split once per layer; a 2-D float32 weight is split on every GPU call).
        in_threshold: one-element float tensor ``theta``, the threshold of the neuron that
            produced ``s``, read on the device (no host sync).
        bias: optional ``[N]`` float bias. Added ``bias`` at global step 0 when
            ``bias_steps == 1`` (ViT), else ``bias / bias_steps`` on each global step
            ``< bias_steps`` (the RoBERTa variant).
        t0: global index of this chunk's first step, so chunks fed with ``t0 = 0, T1, ...``
            equal one whole run.
        weight_scale: ``[N]`` float per-output-channel scale, for int8 weights only (float32
            math).
        validate: also check on a GPU (a host sync) what is always checked on CPU tensors:
            ``s`` is ternary, ``in_threshold`` finite, positive and a normal float32,
            ``weight_scale`` finite and nonzero, and a float ``weight`` finite.

    Returns:
        ``[T, *, N]`` float32.

    Exactness (per weight dtype):
        - int8: bit-exact against the integer oracle ``(theta * w_scale[n]) * float(S @ W^T)``
          (``S @ W^T`` in integer arithmetic, exact), then ``+ bias_share`` where due; i.e.
          equal to ``reference.spike_linear`` with the dequantized weight up to the float32
          rounding of the dequantization and of the sum (the reference rounds every partial
          sum; we round once). Every path (Triton kernel, CPU) gives the same bits.
        - float32, float16, bfloat16: every product ``s * w`` is exact (spikes are -1, 0, 1
          and half weights widen exactly) and the sum is accumulated in float32, but in a
          different order than ``reference.spike_linear`` (blocked, tensor-core MMA: a
          float32 weight as three bf16 dots of its exact split, never tf32). So equal to the
          reference within float32 summation error, ``|err| <= ~2 K u theta (|s| @ |W|^T)``
          with ``u = 2^-24``, not bitwise (bit-exact whenever every partial sum is exact,
          e.g. dyadic weights). The CPU path is the same matmul as the reference, over all
          steps at once (a split weight merged back to float32, exactly). The per-call split
          of a 2-D float32 weight on a GPU is unchecked: a nonzero weight below 2^-103 in
          magnitude may lose parts to flush-to-zero (``split_weight_bf16x3`` rejects it).

    Bad input: ``TypeError``/``ValueError`` naming the argument (a float or bool ``t0`` or
    ``bias_steps`` included), before dispatch.

    Dispatch (``ops._dispatch.backend_for``): CUDA tensors run the Triton kernel
    (``torch.ops.spikekernels.spike_linear``), which skips tiles of 64 rows whose spikes are
    all zero (silent tokens/steps cost only the bias write), unless the weight is too big for
    its int32 offsets (``weight_offsets_fit``); CPU tensors run a float32 matmul a step (the
    Triton kernel under ``TRITON_INTERPRET=1``). Either way the bits do not depend on how the
    steps are split into calls. Inference only: no autograd.
    """
    _check_spike_linear(s, weight, in_threshold, bias, t0, bias_steps, weight_scale)
    check_threshold_values(in_threshold, "in_threshold", validate)
    if weight_scale is not None:
        check_finite_nonzero(weight_scale, "weight_scale", validate)
    check_finite_weight(weight, validate)
    check_ternary(s, "s", validate)
    return call_op("spike_linear", s, weight, in_threshold, bias, t0, bias_steps, weight_scale)

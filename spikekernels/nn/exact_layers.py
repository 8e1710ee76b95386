"""Exact mode's stateful layers (SPEC.md §9.4): each turns exact state into the current value
its neuron reads, by the formulas of ``spikekernels.exact_math``.

- ``ExactLinear``: int8 weights, an int32 accumulator ``acc += s_t @ W_int^T`` (the head);
- ``ExactLinearNeuron``: the same linear fused with the target-driven neuron it feeds (one
  ``spikekernels.ops.exact_linear`` call: int8 spikes in, int8 spikes out; the accumulator
  formed per call from the input neuron's count, not kept);
- ``ExactLayerNorm``: the LayerNorm row function of the residual stream's current value;
- ``ExactLayerNormNeuron``: residual read + LayerNorm fused with the neuron it feeds (one
  ``spikekernels.ops.exact_layernorm_neuron`` call: float64 residual in, int8 spikes out);
- ``ExactSoftmax``: the softmax row function of the current scores ``g * S``.

Values are float32 ``[T, ...]``: one per step, the current value (not an increment).
"""

from __future__ import annotations

import torch
from torch import nn

from spikekernels import exact_math
from spikekernels.nn.hooks import hooked
from spikekernels.nn.inplace_state import InPlaceState
from spikekernels.nn.neuron import FixedDtypeBuffers, scalar_tensor, threshold_tensor
from spikekernels.nn.plain_state import PlainState
from spikekernels.nn.target_neuron import SettledRowsNeuron, TargetNeuron
from spikekernels.ops._checks import check_state, check_tensor, check_time_major, may_read_data
from spikekernels.ops.exact_layernorm import exact_layernorm_neuron
from spikekernels.ops.exact_linear import MAX_K, exact_linear
from spikekernels.ops.spike_linear import spike_linear

__all__ = [
    "ExactLayerNorm",
    "ExactLayerNormNeuron",
    "ExactLinear",
    "ExactLinearNeuron",
    "ExactSoftmax",
]


def _register_int_linear(
    module: nn.Module,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_threshold: torch.Tensor,
) -> None:
    """Check and register an integer linear's buffers: ``weight`` int8 ``[N, K]``,
    ``weight_scale`` ``[N]``, ``bias``, ``in_threshold`` (the input neuron's step)."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise TypeError(f"weight must be int8 [N, K], got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if k > MAX_K:  # one step's sum, 127 K, must stay a float32 integer (and acc an int32)
        raise ValueError(f"weight has K={k} input features; at most {MAX_K} keep the sums exact")
    if tuple(weight_scale.shape) != (n,):
        raise ValueError(f"weight_scale must have shape ({n},), got {tuple(weight_scale.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias must be float32 ({n},), got {bias.dtype} {tuple(bias.shape)}")
    module.out_features, module.in_features = weight.shape
    module.register_buffer("weight", weight)
    module.register_buffer("weight_scale", weight_scale.to(torch.float32))
    module.register_buffer("bias", None if bias is None else bias.detach())
    module.register_buffer("in_threshold", threshold_tensor(in_threshold, "in_threshold"))


class ExactLinear(FixedDtypeBuffers, InPlaceState, PlainState, nn.Module):
    """``[T, *, K]`` ternary spikes in, the linear's current value ``[T, *, N]`` float32 out.

    ``acc`` (int32, ``[*, N]``) is the exact running ``q_in @ W_int^T`` of the input counts,
    kept between calls until ``reset()``; the value is
    ``fl32(fl32(m[n] * fl32(acc)) + b[n])`` with ``m = fl32(theta_in * ws)`` (SPEC.md §9.2).
    ``weight`` int8 ``[N, K]``, ``weight_scale`` ``ws`` float32 ``[N]``; ``bias`` float32 or
    None (shared with the QANN). The per-step products run ``spike_linear`` with int8 weights
    and unit scale: integers below 2^24 (``K <= ops.exact_linear.MAX_K``), exact.
    """

    STATE = {"acc": 0}  # updated in place after the first call (nn.inplace_state)
    # the value's float32 operands, and spike_linear's unit scales, keep their dtype
    _FIXED_DTYPE = FixedDtypeBuffers._FIXED_DTYPE + ("bias", "unit_scale", "unit")

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        in_threshold: torch.Tensor,
    ) -> None:
        super().__init__()
        _register_int_linear(self, weight, weight_scale, bias, in_threshold)
        # on the weight's device: convert() builds the SNN where the QANN is and moves nothing
        self.register_buffer("unit_scale", torch.ones(self.out_features, device=weight.device))
        self.register_buffer("unit", torch.ones((), device=weight.device))
        self.reset()

    def reset(self) -> None:
        """Back to a zero accumulator: call between inputs."""
        self.acc: torch.Tensor | None = None

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        step = spike_linear(s, self.weight, self.unit, weight_scale=self.unit_scale)
        acc = torch.cumsum(step.to(torch.int32), dim=0, dtype=torch.int32)
        if self.acc is None:
            self.acc = acc[-1].clone()
        else:
            if acc.shape[1:] != self.acc.shape:
                raise ValueError(
                    f"s has shape {list(s.shape)}, but the accumulator holds "
                    f"{list(self.acc.shape)} from the last call: reset() between inputs"
                )
            acc += self.acc
            self.acc.copy_(acc[-1])
        # m = fl32(theta_in * ws), formed per call: a loaded in_threshold or weight_scale counts
        return exact_math.linear_value(acc, self.in_threshold * self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def require_input_counts(neuron: nn.Module, **counts: torch.Tensor | None) -> None:
    """After a neuron's first call (its ``count`` exists) the counts of the neurons feeding
    it are required: the layer forms its products from them, and None would silently mean a
    fresh input."""
    if neuron.count is None:
        return
    for name, count in counts.items():
        if count is None:
            raise ValueError(
                f"{name} is None after the first call: give the input neuron's count after "
                "these steps (the layer's products are formed from it)"
            )


def received_count(
    before: torch.Tensor | None, s: torch.Tensor, names: tuple[str, str] = ("s", "s_before")
) -> torch.Tensor:
    """The count after the spikes ``s`` ``[T, *]`` of a reader that had received ``before``
    (int8 ``[*]``, None: fresh), int8: what a layer integrates when a hook may have replaced
    its producer's spikes (``names``: the two as the caller's arguments). Refused where it
    leaves int8, which no neuron's count does (a hook gave more spikes than a neuron can): a
    check that reads the data, so on CPU tensors only (``may_read_data``; on a GPU such a
    count wraps, as a spike product's does)."""
    check_tensor(s, names[0], dtypes=(torch.int8,), min_ndim=2)
    check_state(before, names[1], s.shape[1:], (torch.int8,), s, names[0])
    after = s.sum(0, dtype=torch.int32)
    if before is not None:
        after += before
    outside = may_read_data(after, False) and bool(((after < -128) | (after > 127)).any())
    if outside:
        raise ValueError(
            f"the spikes of {names[0]} sum to a count outside int8: a hook that replaces a "
            "neuron's spikes must keep their count within a neuron's"
        )
    return after.to(torch.int8)


def count_received(
    received: dict[str, torch.Tensor],
    key: str,
    before: torch.Tensor | None,
    spikes: torch.Tensor,
    replaced: bool,
    names: tuple[str, str] | None = None,
) -> torch.Tensor | None:
    """The count before ``spikes`` that a reader adds for its input ``key``: the producer's
    ``before``, or where a hook may have ``replaced`` the spikes, the count of what the reader
    received, kept in ``received`` (the reader's state) from the first such call, so that the
    run does not depend on its chunking (``ExactLinearNeuron``'s ``s_continues``). ``names``:
    the spikes and count as the caller's arguments, for errors (default: after ``key``)."""
    if not replaced:
        received.pop(key, None)
        return before
    before = received.get(key, before)
    received[key] = received_count(before, spikes, names or (f"{key} spikes", f"{key} count"))
    return before


def check_token_spikes(s: object, channels: int, owner: str) -> None:
    """An attention module's input: int8 spikes ``[T, B, N, C]`` with ``C == channels``."""
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"s must be a torch.Tensor, got {type(s).__name__}")
    if s.dim() != 4:
        raise ValueError(f"{owner} expects s of shape [T, B, N, C], got {list(s.shape)}")
    if s.shape[-1] != channels:
        raise ValueError(f"s has {s.shape[-1]} channels, the attention expects {channels}")


class ExactLinearNeuron(SettledRowsNeuron):
    """An ``ExactLinear`` and the target-driven neuron it feeds, as one fused op
    (``spikekernels.ops.exact_linear``): ``[T, *, K]`` spikes in, ``[T, *, N]`` int8 spikes out.

    It is a ``TargetNeuron`` (threshold, bounds, ``count``, ``fanout``); ``threshold`` may be
    per output channel (the q, k, v neurons of one qkv linear). The linear's int32
    accumulator is not kept: each call forms it from ``s_count``, the count of the neuron
    that produced ``s`` after these steps (that neuron's ``count``, which it has just
    updated), less the spikes of ``s``.

    ``counts_out``: the layer returns its neuron's count after each step instead of its
    spikes (``ops.exact_linear``'s ``counts_out``), for readers that take running counts (the
    attention products, ``ExactAttention``). Inference only.

    State: ``count`` and ``row_settled`` (int32 ``[*]``, one flag per output row: 1 where no
    neuron of the row fired at the last step; 0, the fresh value, promises nothing;
    ``SettledRowsNeuron``). Each call passes them to the op, which reads them and writes the
    call's last step's in place: its kernel skips the neurons of settled rows until their
    input spikes. They sit at their targets where the call's input continues the last one's,
    its input count before the call (from ``s_count`` or ``s_before``) the one the last
    call's spikes summed to; where it does not, the call passes zeros.

    A caller whose spikes a hook may have replaced says so (``s_continues=False``): the
    layer then integrates what it receives, as a spiking layer does, instead of reading its
    producer's count, which no longer sums the spikes it got. It keeps that count
    (``s_received``, int8 ``[*, K]``, from the producer's ``s_before`` at the first such
    call) while its calls say so, so that the run does not depend on its chunking. It is
    not in ``state()``: a run with hooks is never captured in a graph.
    """

    _FIXED_DTYPE = TargetNeuron._FIXED_DTYPE + ("bias",)  # the value's float32 operand

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        in_threshold: torch.Tensor,
        neuron: TargetNeuron,
        *,
        counts_out: bool = False,
    ) -> None:
        super().__init__(neuron.threshold, neuron.level, neuron.signed, fanout=neuron.fanout)
        _register_int_linear(self, weight, weight_scale, bias, in_threshold)
        self.counts_out = bool(counts_out)

    def reset(self) -> None:
        """Back to the fresh state: count 0, no row known settled, no count received."""
        super().reset()
        self.s_received: torch.Tensor | None = None

    def forward(
        self,
        s: torch.Tensor,
        s_count: torch.Tensor | None = None,
        *,
        s_before: torch.Tensor | None = None,
        group_active: torch.Tensor | None = None,
        row_active: torch.Tensor | None = None,
        s_row_active: torch.Tensor | None = None,
        s_continues: bool = True,
        count_before: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``s``: ``[T, *, K]`` int8 spikes; ``s_count``: ``[*, K]`` int8, the count of the
        neuron that produced them, after these steps, or ``s_before``, its count before them
        (cheaper: the kernel then reads the chunk's spikes once); neither only on a fresh
        input (the first call after ``reset()``). ``group_active``: int32 ``[T, B, G]``
        zeros, set where a sample fires in a group of ``N / G`` output channels;
        ``row_active``: int32 ``[T, *]`` zeros, set where a row of the output fires (on a
        GPU: every row of an output tile that fired), or None;
        ``s_row_active``: the input neuron's ``row_active``, or None (``ops.exact_linear``);
        ``s_continues``: whether ``s`` are the spikes of the neuron whose count is given (False
        where a hook may have replaced them: the layer then counts what it receives, from
        ``s_before`` at the first such call; ``s_count`` less spikes that are not its
        neuron's is no count it received, so it is refused there); ``count_before``: int8
        like ``count`` (contiguous), or None: receives this neuron's count before these steps
        (``ops.exact_linear``'s: copied as the kernel reads it), as the next layer's
        ``s_before``."""
        # the input count before these steps must be the one the last call's spikes summed
        # to for row_settled to hold: it is not where the input goes back to its producer's
        # count after calls that counted their own
        settled = not (s_continues and self.s_received is not None)
        if not s_continues:
            if self.s_received is not None:
                s_count, s_before = None, self.s_received
            elif s_count is not None:
                raise ValueError(
                    "give s_before, not s_count, with s_continues=False: s_count less spikes "
                    "that are not its neuron's is not the count this layer received"
                )
            received = received_count(s_before, s)  # refused before any state moves
        if s_before is None:
            require_input_counts(self, s_count=s_count)
        stateful = self.stateful_call()
        # the op reads the flags, then writes this call's last step's into them: zeros (no
        # promise) when fresh, or where the input does not continue the last call's
        if isinstance(s, torch.Tensor) and s.dim() >= 2 and (not stateful or not settled):
            self.forget_settled(s.shape[1:-1], s.device)
        spikes, self.count = exact_linear(
            s,
            self.weight,
            self.weight_scale,
            self.bias,
            self.in_threshold,
            self.threshold,
            self.n_min,
            self.p_max,
            s_count,
            self.count,
            active=self.activity,
            inplace=stateful,
            counts_out=self.counts_out,
            s_before=s_before,
            group_active=group_active,
            row_active=row_active,
            s_row_active=s_row_active,
            row_settled=self.row_settled,
            count_before=count_before,
        )
        self.s_received = None if s_continues else received
        return spikes

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int8, "
            + ("counts_out=True, " if self.counts_out else "")
            + super().extra_repr()
        )


class ExactLayerNorm(FixedDtypeBuffers, nn.Module):
    """The LayerNorm row function (``exact_math.layer_norm_rows``) over the last dim of
    ``[T, *rows, C]`` float32: each row gives the bits the QANN's does. Stateless: the
    residual stream's exact state is kept by the blocks."""

    _FIXED_DTYPE = ("weight", "bias")  # the row function's float32 operands

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> None:
        super().__init__()
        self.register_buffer("weight", None if weight is None else weight.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.eps = float(eps)

    @classmethod
    def from_layernorm(cls, ln: nn.LayerNorm) -> ExactLayerNorm:
        if not isinstance(ln, nn.LayerNorm) or len(ln.normalized_shape) != 1:
            raise TypeError(f"expected an nn.LayerNorm over the last dim, got {ln!r}")
        return cls(ln.weight, ln.bias, ln.eps)

    def reset(self) -> None:
        """Nothing to reset (stateless); here so that every spiking module has ``reset()``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, "x", min_ndim=2)
        check_time_major(x, "x")
        channels = next((t.shape[0] for t in (self.weight, self.bias) if t is not None), None)
        if channels is not None and x.shape[-1] != channels:
            raise ValueError(f"x must have {channels} channels (last dim), got {list(x.shape)}")
        return torch.stack(
            [
                exact_math.layer_norm_rows(x[t], self.weight, self.bias, self.eps)
                for t in range(len(x))
            ]
        )


class ExactLayerNormNeuron(TargetNeuron):
    """Residual read, LayerNorm and the target-driven neuron they feed, as one fused op
    (``spikekernels.ops.exact_layernorm_neuron``): the residual stream's spike-driven part
    ``D`` ``[T, *rows, C]`` float64 in, int8 spikes out. Per step the neuron reads
    ``layer_norm_rows(fl32(c + D))`` (or, with ``pool``, of the float64 mean over the patch
    tokens of ``c + D``, ``[T, B, 1 + N, C]`` in): the QANN's value, bit for bit.

    It is a ``TargetNeuron`` (``count``, ``fanout``; the runner's hooks see its spikes) that
    also holds the LayerNorm's weight, bias and eps and the residual constant ``c``.

    The stream may come with one or two pending branches (each its last neuron's spikes,
    threshold and count before them; ``branch2_*`` the later one): the op adds them to ``d``
    in registers, and with ``residual_out`` writes the updated ``D`` in the same pass, which
    the caller takes with ``take_residual()`` (the output stays the spikes). Past a hook on
    this module (a pre-hook may replace a branch's spikes) it adds the count of the spikes it
    received instead of the branch's count before (``received``, kept across calls).
    """

    # the row function's float32 operands
    _FIXED_DTYPE = TargetNeuron._FIXED_DTYPE + ("weight", "bias")

    def __init__(
        self, ln: ExactLayerNorm, neuron: TargetNeuron, constant: torch.Tensor, *, pool: bool
    ) -> None:
        super().__init__(neuron.threshold, neuron.level, neuron.signed, fanout=neuron.fanout)
        self.register_buffer("weight", ln.weight)
        self.register_buffer("bias", ln.bias)
        self.eps = ln.eps
        self.register_buffer("residual_constant", constant.to(torch.float64))
        self.pool = bool(pool)

    def reset(self) -> None:
        super().reset()
        self.residual: torch.Tensor | None = None
        # the pending branches' counts past a hook on this module (a pre-hook may replace
        # their spikes): what it received, so that the run does not depend on its chunking
        self.received: dict[str, torch.Tensor] = {}

    def take_residual(self) -> torch.Tensor:
        """The ``D`` of the last ``residual_out`` call, released here (it is a whole stream).
        Called with ``residual_moved``, ``D`` is the stream together with those flags (rows
        that did not move may be left unwritten): read it with them as ``d_moved``, or as
        ``ops.exact_layernorm.filled(D, flags)``."""
        residual, self.residual = self.residual, None
        if residual is None:
            raise RuntimeError("no residual stream: call with residual_out=True first")
        return residual

    def forward(
        self,
        d: torch.Tensor | None,
        branch_spikes: torch.Tensor | None = None,
        branch_threshold: torch.Tensor | None = None,
        branch_count: torch.Tensor | None = None,
        branch2_spikes: torch.Tensor | None = None,
        branch2_threshold: torch.Tensor | None = None,
        branch2_count: torch.Tensor | None = None,
        *,
        residual_out: bool = False,
        d_moved: torch.Tensor | None = None,
        residual_moved: torch.Tensor | None = None,
        row_active: torch.Tensor | None = None,
        branch_row_active: torch.Tensor | None = None,
        branch2_row_active: torch.Tensor | None = None,
        count_before: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``d_moved``: int32 flags per step and row of ``d``, set where a row moved (its
        writer's ``residual_moved``); ``residual_moved``: int32 ``[T, *rows]`` that receives
        the same flags of ``D`` with ``residual_out``; ``row_active``: int32 zeros, one per
        step and row of the output, set where the row fires; ``branch_row_active``,
        ``branch2_row_active``: each pending branch's neuron's ``row_active``, or None;
        ``count_before``: int8 like ``count``, or None: receives this neuron's count before
        these steps, as the next linear's ``s_before`` (``ops.exact_layernorm_neuron``).
        Past a hook on this module the branches' counts
        before are those of the spikes it received (``count_received``)."""
        replaced = hooked(self)
        if branch_spikes is not None:
            branch_count = count_received(self.received, "branch", branch_count, branch_spikes,
                                          replaced, ("branch_spikes", "branch_count"))  # fmt: skip
        if branch2_spikes is not None:
            branch2_count = count_received(self.received, "branch2", branch2_count,
                                           branch2_spikes, replaced,
                                           ("branch2_spikes", "branch2_count"))  # fmt: skip
        stateful = self.stateful_call()  # first: it may replace the state with a copy
        out = exact_layernorm_neuron(
            d,
            self.residual_constant,
            self.weight,
            self.bias,
            self.eps,
            self.threshold,
            self.n_min,
            self.p_max,
            self.count,
            pool=self.pool,
            active=self.activity,
            branch_spikes=branch_spikes,
            branch_threshold=branch_threshold,
            branch_count=branch_count,
            branch2_spikes=branch2_spikes,
            branch2_threshold=branch2_threshold,
            branch2_count=branch2_count,
            residual_out=residual_out,
            inplace=stateful,
            d_moved=d_moved,
            residual_moved=residual_moved,
            row_active=row_active,
            branch_row_active=branch_row_active,
            branch2_row_active=branch2_row_active,
            count_before=count_before,
        )
        spikes, self.count = out[:2]
        self.residual = out[2] if residual_out else None
        return spikes

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}, pool={self.pool}, " + super().extra_repr()


class ExactSoftmax(FixedDtypeBuffers, nn.Module):
    """Attention probabilities from the running integer scores ``S`` ``[T, *rows, N]`` int32:
    ``softmax_rows(fl32(g * fl32(S)))``, ``g`` the score gain (``exact_math.score_gain``).
    Stateless."""

    def __init__(self, gain: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("gain", scalar_tensor(gain, "gain"))

    def reset(self) -> None:
        """Nothing to reset (stateless)."""

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return exact_math.softmax_rows(exact_math.score_value(scores, self.gain))

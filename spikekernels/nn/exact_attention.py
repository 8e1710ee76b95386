"""Exact mode's attention (SPEC.md §9.2-9.4): the fused attention neurons and the block."""

from __future__ import annotations

import torch
from torch import nn

from spikekernels.nn.exact_layers import (
    ExactLinearNeuron,
    check_token_spikes,
    require_input_counts,
)
from spikekernels.nn.flags import carve
from spikekernels.nn.hooks import SpikeTally, hooked, tally_hooks, unless_hooked
from spikekernels.nn.neuron import scalar_tensor, threshold_tensor
from spikekernels.nn.target_neuron import SettledRowsNeuron, TargetNeuron
from spikekernels.ops.exact_attention import (
    exact_attention,
    exact_attention_probs,
    exact_context,
)

__all__ = ["ExactAttention", "ExactAttentionProbs", "ExactContext"]


class ExactAttentionProbs(SettledRowsNeuron):
    """Scores product, softmax and the attention-probability neuron, fused
    (``spikekernels.ops.exact_attention_probs``): q ``[T, *batch, M, D]`` and k transposed
    ``[T, *batch, D, N]`` spikes in, int8 spikes ``[T, *batch, M, N]`` out. Per step
    ``S += q_t @ K_t + Q_{t-1} @ k_t`` (int32), the neuron reads
    ``softmax_rows(fl32(g * fl32(S)))``. A ``TargetNeuron`` (``count``, ``fanout``): the
    running counts of q and k are their neurons' (each call takes them after its steps), and
    ``S = Q K^T`` of them is formed at each call's start, not kept.

    ``counts_in``: q and k arrive as their running counts after each step (``S = Q_t K_t^T``
    per step; no ``q_count``/``k_count``); ``counts_out``: the neuron's count after each step
    goes out instead of its spikes. ``ExactAttention``
    sets both: running counts are what its products read. State: ``count`` and
    ``row_settled`` (``SettledRowsNeuron``)."""

    def __init__(
        self,
        neuron: TargetNeuron,
        gain: torch.Tensor,
        *,
        counts_in: bool = False,
        counts_out: bool = False,
    ) -> None:
        super().__init__(neuron.threshold, neuron.level, neuron.signed, fanout=neuron.fanout)
        self.register_buffer("gain", scalar_tensor(gain, "gain"))
        self.counts_in, self.counts_out = bool(counts_in), bool(counts_out)

    def forward(
        self,
        q: torch.Tensor,
        k_t: torch.Tensor,
        q_count: torch.Tensor | None = None,
        k_count: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q_count`` ``[*batch, M, D]`` and ``k_count`` ``[*batch, D, N]``: the counts of the
        q and k neurons after these steps (any strides); None only on a fresh input, and
        always with ``counts_in``."""
        if not self.counts_in:
            require_input_counts(self, q_count=q_count, k_count=k_count)
        stateful = self.stateful_call()  # first: it may replace the state with a copy
        spikes, self.count = exact_attention_probs(
            q, k_t, self.gain, self.threshold, self.n_min, self.p_max,
            q_count, k_count, self.count, active=self.activity,
            inplace=stateful, counts_in=self.counts_in, counts_out=self.counts_out,
        )  # fmt: skip
        self.forget_settled(q.shape[1:-1], q.device)
        return spikes


class ExactContext(SettledRowsNeuron):
    """Context product and its neuron, fused (``spikekernels.ops.exact_context``): attention
    ``[T, *batch, M, N]`` and v ``[T, *batch, N, Dh]`` spikes in, int8 spikes out. Per step
    ``Z += a_t @ V_t + A_{t-1} @ v_t`` (int32), the neuron reads
    ``fl32(fl32(theta_a * theta_v) * fl32(Z))``. A ``TargetNeuron``: the running counts of a
    and v are their neurons' (each call takes them after its steps), and ``Z = A V`` of them
    is formed at each call's start, not kept. ``counts_in``: a and v arrive as their running
    counts after each step (``Z = A_t V_t`` per step; no ``a_count``/``v_count``), as
    ``ExactAttention`` wires it. State: ``count`` and ``row_settled``
    (``SettledRowsNeuron``; per query row of each head, the heads not merged)."""

    def __init__(
        self,
        neuron: TargetNeuron,
        theta_a: torch.Tensor,
        theta_v: torch.Tensor,
        *,
        counts_in: bool = False,
    ) -> None:
        super().__init__(neuron.threshold, neuron.level, neuron.signed, fanout=neuron.fanout)
        # copies: the thresholds as of conversion, as every neuron's own
        self.register_buffer("theta_a", threshold_tensor(theta_a, "theta_a"))
        self.register_buffer("theta_v", threshold_tensor(theta_v, "theta_v"))
        self.counts_in = bool(counts_in)

    def forward(
        self,
        a: torch.Tensor,
        v: torch.Tensor,
        a_count: torch.Tensor | None = None,
        v_count: torch.Tensor | None = None,
        *,
        merge_heads: bool = False,
        row_active: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``a_count`` ``[*batch, M, N]`` and ``v_count`` ``[*batch, N, D]``: the counts of the
        attention and value neurons after these steps (any strides); None only on a fresh
        input, and always with ``counts_in``. ``merge_heads``: spikes ``[T, *batch[:-1], M,
        H * D]``, the last batch dim merged into the channels; ``row_active``: int32 zeros,
        one per step and row of the spikes, set where a row fires (``ops.exact_context``)."""
        if not self.counts_in:
            require_input_counts(self, a_count=a_count, v_count=v_count)
        stateful = self.stateful_call()  # first: it may replace the state with a copy
        spikes, self.count = exact_context(
            a, v, self.theta_a, self.theta_v, self.threshold, self.n_min, self.p_max,
            a_count, v_count, self.count, active=self.activity,
            inplace=stateful, merge_heads=merge_heads, counts_in=self.counts_in,
            row_active=row_active,
        )  # fmt: skip
        self.forget_settled(a.shape[1:-1], a.device)
        return spikes


class ExactAttention(nn.Module):
    """Multi-head attention of exact mode: ``[T, B, N, C]`` spikes in, ``proj``'s spikes out.

    Four fused layers, each a neuron with its exact state (every value the current one):

    1. ``qkv``: ``ExactLinearNeuron`` (int32 accumulator formed per call; one neuron with
       per-channel thresholds, the steps of ``quan_q``, ``quan_k``, ``quan_v``);
    2. ``probs``: ``ExactAttentionProbs`` (``S = Q K^T`` per head, softmax, the
       ``attn_quan`` neuron);
    3. ``context``: ``ExactContext`` (``Z = A V``, the ``after_attn_quan`` neuron);
    4. merge heads -> ``proj``: ``ExactLinearNeuron`` (the ``quan_proj`` neuron).

    Between the first three the currency is running counts, not spikes: ``qkv`` and
    ``probs`` write their neurons' count after each step (``counts_out``), and ``probs`` and
    ``context`` read them (``counts_in``) and form ``S_t = Q_t K_t^T`` and ``Z_t = A_t V_t``
    directly. The same bytes as spikes, the same integers as the running sums, and no pass
    that turns spikes back into running counts (about 60 MB per block and step at ViT-S,
    batch 64). The constructor sets those flags on the parts.

    ``probs`` and ``context`` then run as one kernel (``ops.exact_attention``), which keeps
    the attention counts ``[T, B, H, N, N]`` in registers instead of writing them for the
    context to read (another 30 MB per block and step): their state and activity flags are
    the modules', updated in place, and the bits are the two modules'. ``qkv`` records which
    of each sample's heads' q, k and v fired at each step (``group_active``), and the kernel
    skips the reads of those that did not (``qkv_active``); the kernel records which rows of
    its spikes fire (``row_active``), from which ``proj`` finds its silent row tiles
    (``s_row_active``), as ``qkv`` does from its input's. When either module
    has a forward hook (a user's probe) the two are called one after the other instead, so
    that the hook sees what it hooks (``context`` then records the rows); hooks that need
    only the spikes per step (``observer(..., tallies=True)``: a ``SpikeCounter``'s) keep the
    kernel, which adds each neuron's spikes per step up for them (a ``SpikeTally``).

    State lives in the parts until ``reset()``. Inference only.
    """

    def __init__(
        self,
        qkv: ExactLinearNeuron,
        probs: ExactAttentionProbs,
        context: ExactContext,
        proj: ExactLinearNeuron,
        *,
        num_heads: int,
    ) -> None:
        super().__init__()
        self.dim = proj.out_features
        if self.dim % num_heads or qkv.out_features != 3 * self.dim:
            raise ValueError(
                f"qkv must map to 3 x {self.dim} channels split over {num_heads} heads, "
                f"got {qkv.out_features}"
            )
        self.num_heads = int(num_heads)
        self.qkv, self.probs, self.context, self.proj = qkv, probs, context, proj
        qkv.counts_out = probs.counts_in = probs.counts_out = context.counts_in = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def reset(self) -> None:
        for m in self.children():
            m.reset()

    def flag_shapes(self, t: int, b: int, n: int) -> tuple[tuple[int, ...], ...]:
        """The flags a call on ``[t, b, n, C]`` spikes sets: which of each sample's heads'
        q, k and v fired, and which rows of the context spikes (``forward``'s ``flags``)."""
        return (t, b, 3 * self.num_heads), (t, b, n)

    def forward(
        self,
        s: torch.Tensor,
        s_count: torch.Tensor | None = None,
        *,
        s_before: torch.Tensor | None = None,
        s_row_active: torch.Tensor | None = None,
        row_active: torch.Tensor | None = None,
        s_continues: bool = True,
        count_before: torch.Tensor | None = None,
        flags: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``s``: ``[T, B, N, C]`` int8 spikes; ``s_count``: ``[B, N, C]`` int8, the count of
        their neuron after these steps, or ``s_before``, before them (neither only on a fresh
        input: see ``ExactLinearNeuron``); ``s_row_active``: int32 ``[T, B, N]``, that
        neuron's ``row_active``, or None (``qkv`` takes it); ``row_active``: int32 zeros
        ``[T, B, N]`` that receive ``proj``'s row flags; ``s_continues``: False where a hook
        may have replaced ``s`` (``ExactLinearNeuron``); ``count_before``: int8 like
        ``proj``'s count, or None: receives it as it was before these steps; ``flags``:
        int32 zeros, flat, that the flags of ``flag_shapes`` are cut from (``nn.flags``: a
        caller's one memset for several modules), or None: made here. Returns the
        ``quan_proj`` neuron's spikes."""
        check_token_spikes(s, self.dim, "ExactAttention")
        t, b, n, c = s.shape
        h, dh = self.num_heads, self.head_dim
        # which of each sample's heads' q, k and v fired at each step: the attention skips
        # the reads of those that did not (ops.exact_attention's qkv_active); which rows of
        # the context spikes fire: proj's s_row_active
        fired, rows = carve(flags, self.flag_shapes(t, b, n), s.device)
        s_row_active = unless_hooked(s_row_active, self.qkv)  # a hook may replace the input
        # the running counts of q, k, v after each step, as strided views of one layout (the
        # qkv neuron first: it names a shape that differs from its state's)
        continues = s_continues and not hooked(self.qkv)
        qkv = self.qkv(s, s_count, s_before=s_before, group_active=fired,
                       s_row_active=s_row_active, s_continues=continues)  # fmt: skip
        qkv = qkv.view(t, b, n, 3, h, dh)
        qkv_active = unless_hooked(fired.view(t, b, 3, h).transpose(2, 3), self.qkv)  # [T,B,H,3]
        # proj starts from the context neuron's count before these steps, heads merged (a
        # copy: the attention updates that count in place; the fused op writes it as it
        # reads the count)
        hooks = self._fusable()  # None: run as two ops
        fused = hooks is not None
        context_before = None
        if self.context.count is not None and fused:
            context_before = torch.empty((b, n, c), dtype=torch.int8, device=s.device)
        elif self.context.count is not None:
            merged = self.context.count.transpose(1, 2)
            context_before = merged.clone(memory_format=torch.contiguous_format).view(b, n, c)
        q = qkv[:, :, :, 0].transpose(2, 3)  # [T, B, H, N, Dh]
        k_t = qkv[:, :, :, 1].permute(0, 1, 3, 4, 2)  # [T, B, H, Dh, N]
        v = qkv[:, :, :, 2].transpose(2, 3)
        if fused:
            context = self._fused(q, k_t, v, qkv_active, rows, context_before, (t, b, n, c), hooks)
        else:
            a = self.probs(q, k_t)  # [T, B, H, N, N] running attention counts
            # [T, B, N, C] spikes: the kernel writes the heads merged, as proj reads them
            context = self.context(a, v, merge_heads=True, row_active=rows)
        rows = unless_hooked(rows, self.context, self.proj)
        continues = not hooked(self.context, self.proj)  # the context spikes are proj's input
        return self.proj(context, s_before=context_before, s_row_active=rows,
                         row_active=row_active, s_continues=continues,
                         count_before=count_before)  # fmt: skip

    def _fusable(self) -> tuple[list, list] | None:
        """The tally hooks of ``probs`` and ``context`` (``tally_hooks``) where the two may run
        as one op: no hook on either but ones that take a tally, and their states both fresh
        or both there (one op updates both); else None."""
        probs, context = self.probs, self.context
        hooks = tally_hooks(probs), tally_hooks(context)
        if None in hooks or probs.stateful_call() != context.stateful_call():
            return None
        return hooks

    def _fused(
        self,
        q: torch.Tensor,
        k_t: torch.Tensor,
        v: torch.Tensor,
        qkv_active: torch.Tensor | None,
        row_active: torch.Tensor,
        count_before: torch.Tensor | None,
        spikes_shape: tuple[int, ...],
        hooks: tuple[list, list],
    ) -> torch.Tensor:
        """``probs`` then ``context`` as one op, on the modules' own state; ``row_active``
        receives the rows of the spikes that fire, ``count_before`` (or None) the context
        neuron's count before these steps, heads merged. The two modules' ``row_settled`` go in and
        come back as the op leaves them (the rows whose neurons did not fire at the last
        step): with ``qkv_active`` the next call's blocks of settled queries whose q, k and v
        did not move skip their neurons from the first step on, not only from the second.
        Their tally ``hooks`` (``_fusable``'s), if any, then get each neuron's spikes per step
        (``SpikeTally``, standing for the outputs the two calls would return: ``[T, *batch, M,
        N]`` counts and ``spikes_shape``)."""
        probs, context = self.probs, self.context
        tallies = (None, None)
        if any(hooks):  # both neurons' in one int64 [2, T] (one memset), only for hooks
            tallies = torch.zeros(2, q.shape[0], dtype=torch.int64, device=q.device)
        for part in (probs, context):  # fresh: created (zeros), then written by the op
            if part.row_settled is None:
                part.forget_settled(q.shape[1:-1], q.device)
        stateful = probs.stateful_call() and context.stateful_call()
        spikes, attn_count, count = exact_attention(
            q, k_t, v, probs.gain, probs.threshold, probs.n_min, probs.p_max,
            context.theta_a, context.theta_v, context.threshold, context.n_min, context.p_max,
            probs.count if stateful else None, context.count if stateful else None,
            attn_active=probs.activity, active=context.activity, inplace=stateful,
            merge_heads=True, qkv_active=qkv_active, row_active=row_active,
            attn_row_settled=probs.row_settled, row_settled=context.row_settled,
            count_before=count_before, attn_tally=tallies[0], tally=tallies[1],
        )  # fmt: skip
        probs.count, context.count = attn_count, count
        shapes = (*q.shape[:-1], k_t.shape[-1]), spikes_shape
        for module, its_hooks, tally, shape in zip(
            (probs, context), hooks, tallies, shapes, strict=True
        ):
            for hook in its_hooks:
                hook(module, (), SpikeTally(tally, torch.Size(shape)))
        if qkv_active is None:
            # a hook on qkv may have replaced its counts: the next call's first flags would
            # not say whether q, k and v moved since what this call read, so no promise
            probs.forget_settled(q.shape[1:-1], q.device)
            context.forget_settled(q.shape[1:-1], q.device)
        return spikes

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"

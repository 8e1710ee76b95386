"""SPEC.md in plain PyTorch, step by step: the oracle for every kernel and the CPU fallback.

Each function follows its SPEC.md section literally, one time step at a time, so that a reader
can check it against the contract line by line. It imports the shared level definitions
(``spikekernels.levels``) and, for the attention neuron's value, the one row softmax that
SPEC.md §9.2 defines (``exact_math.softmax_rows``: the kernels must equal its bits, so it is
the definition, tested on its own against float64); nothing in the library imports it at run
time. Inference only.

Tensors that carry time are time-major, ``[T, *shape]``. State tensors have ``shape`` and
are returned as fresh tensors (never aliases of an input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spikekernels.levels import count_dtype, level_bounds, quantize

__all__ = [
    "level_bounds",
    "quantize",
    "count_dtype",
    "st_bif_step",
    "st_bif",
    "spike_softmax",
    "spike_layernorm",
    "spike_matmul",
    "spike_linear",
    "spike_linear_neuron",
    "target_spikes_step",
    "target_spikes",
    "exact_linear",
    "exact_layer_norm_rows",
    "exact_layernorm_neuron",
]


def st_bif_step(
    u: torch.Tensor,
    theta: torch.Tensor,
    n_min: int,
    p_max: int,
    v: torch.Tensor,
    s: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ST-BIF step (SPEC.md §2). Returns ``(sigma int8, v, s)``.

    ``v`` is the membrane in units of the threshold (float32), ``s`` the spike count.
    """
    v = v + u.to(torch.float32) / theta.to(torch.float32).reshape(())
    fire_pos = (v >= 1.0) & (s < p_max)
    fire_neg = (v < 0.0) & (s > n_min)
    sigma = fire_pos.to(torch.int8) - fire_neg.to(torch.int8)
    s = s + sigma.to(s.dtype)
    v = v - sigma.to(torch.float32)
    return sigma, v, s


def st_bif(
    x: torch.Tensor,
    theta: torch.Tensor,
    n_min: int,
    p_max: int,
    v: torch.Tensor | None = None,
    s: torch.Tensor | None = None,
    float_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-step ST-BIF neuron over ``x`` ``[T, *shape]`` (SPEC.md §2).

    Fresh state is ``v = 0.5`` (float32) and ``s = 0`` (``count_dtype(n_min, p_max)``).
    Returns ``(spikes, v, s)``: spikes int8 in {-1, 0, 1}, or ``sigma * theta`` in ``x.dtype``
    when ``float_out``.
    """
    shape = x.shape[1:]
    if v is None:
        v = torch.full(shape, 0.5, dtype=torch.float32, device=x.device)
    if s is None:
        s = torch.zeros(shape, dtype=count_dtype(n_min, p_max), device=x.device)
    v, s = v.clone(), s.clone()
    spikes = []
    for t in range(x.shape[0]):
        sigma, v, s = st_bif_step(x[t], theta, n_min, p_max, v, s)
        spikes.append(sigma)
    out = torch.stack(spikes)
    if float_out:
        out = (out.to(torch.float32) * theta.to(torch.float32).reshape(())).to(x.dtype)
    return out, v, s


def _masked_softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where a fully ``-inf`` row gives zeros, not NaN."""
    dead = (x == float("-inf")).all(dim=-1, keepdim=True)
    return torch.softmax(x.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def spike_softmax(
    x: torch.Tensor,
    x_acc: torch.Tensor | None = None,
    y_prev: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spike-Softmax over ``x`` ``[T, *rows, N]`` (SPEC.md §3).

    ``X = X + e_t; Y = softmax(X); out_t = Y - Y_prev; Y_prev = Y``, computed in ``dtype``
    (float32 normally; tests pass float64 for the high-precision oracle). Returns
    ``(out in x.dtype, x_acc, y_prev)`` with the state in ``dtype``.
    """
    shape = x.shape[1:]
    x_acc = torch.zeros(shape, dtype=dtype, device=x.device) if x_acc is None else x_acc.to(dtype)
    y_prev = (
        torch.zeros(shape, dtype=dtype, device=x.device) if y_prev is None else y_prev.to(dtype)
    )
    outs = []
    for t in range(x.shape[0]):
        x_acc = x_acc + x[t].to(dtype)
        y = _masked_softmax(x_acc)
        outs.append((y - y_prev).to(x.dtype))
        y_prev = y
    return torch.stack(outs), x_acc.clone(), y_prev.clone()


def spike_layernorm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    x_acc: torch.Tensor | None = None,
    y_prev: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spike-LayerNorm over ``x`` ``[T, *rows, C]`` (SPEC.md §4).

    ``X = X + h_t; Y = layer_norm(X, weight, bias, eps); out_t = Y - Y_prev``, computed in
    ``dtype``. Returns ``(out in x.dtype, x_acc, y_prev)``.
    """
    shape = x.shape[1:]
    c = shape[-1]
    w = None if weight is None else weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    x_acc = torch.zeros(shape, dtype=dtype, device=x.device) if x_acc is None else x_acc.to(dtype)
    y_prev = (
        torch.zeros(shape, dtype=dtype, device=x.device) if y_prev is None else y_prev.to(dtype)
    )
    outs = []
    for t in range(x.shape[0]):
        x_acc = x_acc + x[t].to(dtype)
        y = F.layer_norm(x_acc, (c,), w, b, eps)
        outs.append((y - y_prev).to(x.dtype))
        y_prev = y
    return torch.stack(outs), x_acc.clone(), y_prev.clone()


def spike_layernorm_neuron(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    theta: torch.Tensor,
    n_min: int,
    p_max: int,
    x_acc: torch.Tensor | None = None,
    y_prev: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """``spike_layernorm`` (SPEC.md §4) then ``st_bif`` (§2) on its output, float mode: the
    neuron's input at step ``t`` is the LayerNorm increment ``out_t`` in ``x.dtype``. The two
    rules are sequential in time but the neuron at ``t`` reads only ``out_t``, so running
    each over all steps is the step-by-step interleaving. Returns int8
    ``(spikes, x_acc, y_prev, v, count)``.
    """
    u, x_acc, y_prev = spike_layernorm(x, weight, bias, eps, x_acc, y_prev)
    spikes, v, count = st_bif(u, theta, n_min, p_max, v, count)
    return spikes, x_acc, y_prev, v, count


__all__ += ["spike_layernorm_neuron"]


def _exact_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Integer matmul as float64 products (exact below 2^53), back to int64."""
    return torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.int64)


def spike_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    a_acc: torch.Tensor | None = None,
    b_acc: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spike product (SESA, SPEC.md §5) of ternary trains ``a`` ``[T, *, M, K]`` and
    ``b`` ``[T, *, K, N]``.

    ``out_t = scale * (a_t @ B_t + A_{t-1} @ b_t)`` with ``B_t = B_{t-1} + b_t``: the increment
    of the product of the running counts. The integer part is exact, scaled once in float32.
    Returns ``(out float32, a_acc int8, b_acc int8)``.

    The integer products are float64 matmuls of the integer counts: exact while every partial
    sum stays below 2^53 in magnitude (``2 * K * 2^31`` at worst, far beyond any count this
    op holds), and they run on every device (CUDA has no integer matmul).
    """
    a_cnt = (
        torch.zeros(a.shape[1:], dtype=torch.int32, device=a.device)
        if a_acc is None
        else a_acc.to(torch.int32)
    )
    b_cnt = (
        torch.zeros(b.shape[1:], dtype=torch.int32, device=b.device)
        if b_acc is None
        else b_acc.to(torch.int32)
    )
    scale32 = scale.to(torch.float32).reshape(())
    outs = []
    for t in range(a.shape[0]):
        a_t, b_t = a[t].to(torch.int32), b[t].to(torch.int32)
        b_cnt = b_cnt + b_t
        integer = _exact_matmul(a_t, b_cnt) + _exact_matmul(a_cnt, b_t)
        a_cnt = a_cnt + a_t
        outs.append(scale32 * integer.to(torch.float32))
    return torch.stack(outs), a_cnt.to(torch.int8), b_cnt.to(torch.int8)


def spike_linear(
    s: torch.Tensor,
    weight: torch.Tensor,
    threshold: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    t0: int = 0,
    bias_steps: int = 1,
) -> torch.Tensor:
    """Spike linear (SPEC.md §6): ``out_t = theta * (s_t @ W^T)`` plus the bias schedule.

    ``s`` ``[T, *, K]`` ternary, ``weight`` ``[N, K]``. The bias is added as ``bias /
    bias_steps`` on each global step ``t0 + t < bias_steps`` (``bias_steps = 1``: all of it at
    step 0, the ViT rule). ``t0`` is the global index of this chunk's first step. Float32 out.
    """
    w = weight.to(torch.float32)
    theta = threshold.to(torch.float32).reshape(())
    outs = []
    for t in range(s.shape[0]):
        out = theta * torch.matmul(s[t].to(torch.float32), w.t())
        if bias is not None and t0 + t < bias_steps:
            share = (
                bias.to(torch.float32) if bias_steps == 1 else bias.to(torch.float32) / bias_steps
            )
            out = out + share
        outs.append(out)
    return torch.stack(outs)


def spike_linear_neuron(
    s: torch.Tensor,
    weight: torch.Tensor,
    in_threshold: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    bias: torch.Tensor | None = None,
    t0: int = 0,
    bias_steps: int = 1,
    v: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    *,
    float_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``spike_linear`` (SPEC.md §6) followed by ``st_bif`` (§2) on its output, float mode.

    ``weight`` ``[N, K]`` float; ``threshold`` one element or ``[N]`` per output channel: the
    channels that share a threshold run as one ``st_bif`` (elementwise, so the same bits as
    one neuron per channel). ``in_threshold`` scales the linear. Fresh ``v = 0.5``,
    ``count = 0``. Returns ``(spikes [T, *, N], v, count)`` (spikes int8, or ``sigma * theta``
    float32 when ``float_out``).
    """
    y = spike_linear(s, weight, in_threshold, bias, t0=t0, bias_steps=bias_steps)
    shape = y.shape[1:]
    if v is None:
        v = torch.full(shape, 0.5, dtype=torch.float32, device=y.device)
    if count is None:
        count = torch.zeros(shape, dtype=count_dtype(n_min, p_max), device=y.device)
    theta = threshold.to(torch.float32).reshape(-1).expand(shape[-1])
    spikes = torch.empty_like(y, dtype=torch.float32 if float_out else torch.int8)
    v_out, count_out = torch.empty_like(v), torch.empty_like(count)
    for value in theta.unique():
        cols = theta == value
        spikes[..., cols], v_out[..., cols], count_out[..., cols] = st_bif(
            y[..., cols], value, n_min, p_max, v[..., cols], count[..., cols], float_out
        )
    return spikes, v_out, count_out


def _per_channel(theta: torch.Tensor) -> torch.Tensor:
    """A threshold in float32 that broadcasts over ``[*, C]``: 0-d, or ``[C]`` per channel."""
    theta = theta.to(torch.float32)
    return theta.reshape(()) if theta.numel() == 1 else theta


def target_spikes_step(
    y: torch.Tensor,
    theta: torch.Tensor,
    n_min: int,
    p_max: int,
    c: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One target-driven neuron step (SPEC.md §9.3). Returns ``(sigma int8, c int8)``.

    ``target = clamp(floor(y / theta + 1/2), n_min, p_max)`` in float32 (``/`` correctly
    rounded, round half up as ``quantize``); ``sigma = sign(target - c)``; ``c += sigma``.
    ``theta`` has one element or one per channel (last dim). A NaN ``y`` gives ``sigma = 0``.
    """
    target = torch.clamp(torch.floor(y.to(torch.float32) / _per_channel(theta) + 0.5), n_min, p_max)
    sigma = torch.sign(target - c.to(torch.float32)).nan_to_num(0.0).to(torch.int8)
    return sigma, c + sigma


def target_spikes(
    value: torch.Tensor,
    theta: torch.Tensor,
    n_min: int,
    p_max: int,
    count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-step target-driven neuron over current values ``value`` ``[T, *shape]``
    (SPEC.md §9.3). Fresh count is 0 (int8). Returns ``(spikes int8, count int8)``."""
    c = torch.zeros(value.shape[1:], dtype=torch.int8, device=value.device)
    c = c if count is None else count.clone()
    spikes = []
    for t in range(value.shape[0]):
        sigma, c = target_spikes_step(value[t], theta, n_min, p_max, c)
        spikes.append(sigma)
    return torch.stack(spikes), c


def exact_linear(
    s: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_threshold: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    s_count: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    counts_out: bool = False,
    s_before: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact linear + target-driven neuron (SPEC.md §9.2-§9.4), step by step.

    ``s`` ``[T, *, K]`` ternary, ``weight`` ``[N, K]`` integer (int8), ``weight_scale`` ``[N]``.
    ``acc = S @ W^T`` of the input count ``S`` before these steps, ``s_count`` (the input
    neuron's count after them) less the spikes of ``s`` (``acc`` is not state: always the
    product of the count); then per step: ``acc += s_t @ W^T`` (exact: float64 products of
    integers, then int32); ``y = fl32(fl32(m * fl32(acc)) + b)`` with ``m = fl32(theta_in *
    ws)``; then ``target_spikes_step(y, threshold, ...)``. Fresh ``count`` is 0 (int8); no
    ``s_count``, no earlier input. Returns ``(spikes int8 [T, *, N], count)``; with
    ``counts_out`` the count after each step in place of the spikes. ``s_before``: the input
    count before these steps given directly (instead of ``s_count``).
    """
    shape = (*s.shape[1:-1], weight.shape[0])
    w = weight.to(torch.float64)
    acc = torch.zeros(shape, dtype=torch.int32, device=s.device)
    before = None if s_before is None else s_before.to(torch.int32)
    if s_count is not None:
        before = s_count.to(torch.int32)
        for t in range(s.shape[0]):
            before = before - s[t].to(torch.int32)
    if before is not None:
        acc = torch.matmul(before.to(torch.float64), w.t()).to(torch.int32)
    c = torch.zeros(shape, dtype=torch.int8, device=s.device) if count is None else count.clone()
    m = in_threshold.to(torch.float32).reshape(()) * weight_scale.to(torch.float32)
    spikes = []
    for t in range(s.shape[0]):
        acc = acc + torch.matmul(s[t].to(torch.float64), w.t()).to(torch.int32)
        y = m * acc.to(torch.float32)
        if bias is not None:
            y = y + bias.to(torch.float32)
        sigma, c = target_spikes_step(y, threshold, n_min, p_max, c)
        spikes.append(c if counts_out else sigma)
    return torch.stack(spikes), c


def _tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim (kept) in exact mode's fixed order: pad with zeros to a power of
    two, then add neighbours, ``x[2i] + x[2i + 1]``, until one element is left."""
    width = 1
    while width < x.shape[-1]:
        width *= 2
    x = F.pad(x, (0, width - x.shape[-1]))
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x


def _sqrt_rn(v: torch.Tensor) -> torch.Tensor:
    """float32 ``sqrt``, correctly rounded on every device. ``torch.sqrt`` need not be (CPU
    builds of torch 2.13 are an ulp off for about one float32 in five), so its float64 root,
    rounded, is corrected against the neighbouring float32 midpoints, whose squares are exact
    in float64 (at most 50 significant bits); a root is never a midpoint itself."""
    s = torch.sqrt(v.to(torch.float64)).to(torch.float32)
    v64 = v.to(torch.float64)
    for direction in (float("inf"), float("-inf")):
        other = torch.nextafter(s, torch.full_like(s, direction))
        mid = (s.to(torch.float64) + other.to(torch.float64)) / 2
        beyond = mid * mid < v64 if direction > 0 else (mid > 0) & (mid * mid > v64)
        s = torch.where(beyond, other, s)
    return s


def exact_layer_norm_rows(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Exact mode's LayerNorm row function over the last dim of float32 ``x`` (SPEC.md §9.2),
    one correctly rounded float32 operation at a time: ``mean = tree_sum(x) / C``,
    ``xc = x - mean``, ``var = tree_sum(xc * xc) / C``, ``y = xc / sqrt(var + fl32(eps))``,
    then ``y * w``, then ``+ b``."""
    x = x.to(torch.float32)
    channels = x.shape[-1]
    xc = x - _tree_sum(x) / channels
    var = _tree_sum(xc * xc) / channels
    y = xc / _sqrt_rn(var + torch.tensor(eps, dtype=torch.float32, device=x.device))
    if weight is not None:
        y = y * weight.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y


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
    pool: bool = False,
    branch_spikes: torch.Tensor | None = None,
    branch_threshold: torch.Tensor | None = None,
    branch_count: torch.Tensor | None = None,
    branch2_spikes: torch.Tensor | None = None,
    branch2_threshold: torch.Tensor | None = None,
    branch2_count: torch.Tensor | None = None,
    residual_out: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Exact mode's residual read, LayerNorm row function and target-driven neuron (SPEC.md
    §9.2-§9.4), step by step.

    ``d`` ``[T, *rows, C]`` float64 (the residual stream's spike-driven part), ``c``
    float64 broadcastable to one step. A pending branch (``branch_spikes``, its neuron's
    ``branch_threshold`` and ``branch_count`` before these steps) is added first by
    ``exact_residual_add``: ``D = exact_residual_add(d, branch_spikes, ...)`` (``d`` may then
    be None), then a second one (``branch2_*``) likewise to that; else ``D = d``. Per step:
    ``r = c + D_t`` (float64); the row is ``x = fl32(r)``, or with ``pool``
    ``fl32(tree_sum(r[..., 1:, :] over tokens) / N)`` (the float64 mean of the N patch
    tokens); ``y = exact_layer_norm_rows(x, weight, bias, eps)``; then
    ``target_spikes_step(y, threshold, ...)``. Fresh ``count`` 0 (int8).
    Returns ``(spikes int8 [T, *rows, C], count)``, and ``D`` third with ``residual_out``.
    """
    if branch_spikes is not None:
        d = exact_residual_add(d, branch_spikes, branch_threshold, branch_count)
    if branch2_spikes is not None:
        d = exact_residual_add(d, branch2_spikes, branch2_threshold, branch2_count)
    state = None if count is None else count.clone()
    spikes = []
    for t in range(d.shape[0]):
        r = c + d[t]
        if pool:
            patches = r[..., 1:, :].movedim(-2, -1)
            x = (_tree_sum(patches)[..., 0] / patches.shape[-1]).to(torch.float32)
        else:
            x = r.to(torch.float32)
        y = exact_layer_norm_rows(x, weight, bias, eps)
        if state is None:
            state = torch.zeros(y.shape, dtype=torch.int8, device=d.device)
        sigma, state = target_spikes_step(y, threshold, n_min, p_max, state)
        spikes.append(sigma)
    if residual_out:
        return torch.stack(spikes), state, d
    return torch.stack(spikes), state


def _count_before(x: torch.Tensor, after: torch.Tensor | None) -> torch.Tensor:
    """The count of the neuron behind spikes ``x`` ``[T, ...]`` before these steps, int32:
    its count ``after`` them less the spikes (0 when ``after`` is None)."""
    if after is None:
        return torch.zeros(x.shape[1:], dtype=torch.int32, device=x.device)
    return after.to(torch.int32) - x.to(torch.int32).sum(0)


def _state_or_zeros(state, shape, dtype, device) -> torch.Tensor:
    """Incoming state as a fresh ``dtype`` tensor (never an alias), or zeros when None."""
    if state is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return state.to(dtype=dtype, copy=True)


def _running_product_step(a_t, b_t, a_cnt, b_cnt, product):
    """One step of the running product of the counts (SPEC.md §5, §9.4): ``B += b_t``;
    ``S += a_t @ B + A @ b_t``; ``A += a_t``. Counts int32, ``S`` int64 (exact)."""
    b_cnt = b_cnt + b_t.to(torch.int32)
    product = product + _exact_matmul(a_t, b_cnt) + _exact_matmul(a_cnt, b_t)
    return a_cnt + a_t.to(torch.int32), b_cnt, product


def exact_attention_probs(
    q: torch.Tensor,
    k_t: torch.Tensor,
    gain: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    q_count: torch.Tensor | None = None,
    k_count: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    counts_in: bool = False,
    counts_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-mode attention probabilities (SPEC.md §5, §9.2-§9.4), step by step.

    ``q`` ``[T, *, M, D]`` and ``k_t`` ``[T, *, D, N]`` ternary, with the counts of their
    neurons after these steps (``q_count``, ``k_count``; None: 0 before them). ``S = Q @ K``
    of the counts before these steps, the counts after less the spikes (exact; S is not
    state, always the product of the counts), then per step:
    ``S += q_t @ K_t + Q_{t-1} @ k_t`` (exact); ``p = softmax_rows(fl32(g * fl32(S)))``;
    ``target_spikes_step(p, threshold, ...)``. The softmax is exact mode's row function,
    ``spikekernels.exact_math.softmax_rows``: SPEC.md §9.2 defines the probabilities as that
    code's bits (the QANN calls it too), so the oracle calls it rather than restating it.
    A fresh neuron count is 0. Returns ``(spikes int8 [T, *, M, N], count int8)``.

    ``counts_in``: ``q`` and ``k_t`` are the running counts ``Q_t``, ``K_t`` after each step
    (``q_count``, ``k_count`` unused), and ``S = Q_t @ K_t`` at each step, the same integers.
    ``counts_out``: the neuron's count after each step comes out in place of its spikes.
    """
    from spikekernels.exact_math import softmax_rows

    shape = (*q.shape[1:-1], k_t.shape[-1])
    q_cnt, k_cnt = _count_before(q, q_count), _count_before(k_t, k_count)
    s = _exact_matmul(q_cnt, k_cnt)
    c = _state_or_zeros(count, shape, torch.int8, q.device)
    g = gain.to(torch.float32).reshape(())
    spikes = []
    for t in range(q.shape[0]):
        if counts_in:
            s = _exact_matmul(q[t], k_t[t])
        else:
            q_cnt, k_cnt, s = _running_product_step(q[t], k_t[t], q_cnt, k_cnt, s)
        z = g * s.to(torch.int32).to(torch.float32)
        p = softmax_rows(z) if z.numel() else z
        sigma, c = target_spikes_step(p, threshold, n_min, p_max, c)
        spikes.append(c if counts_out else sigma)
    return torch.stack(spikes), c


def exact_context(
    a: torch.Tensor,
    v: torch.Tensor,
    theta_a: torch.Tensor,
    theta_v: torch.Tensor,
    threshold: torch.Tensor,
    n_min: int,
    p_max: int,
    a_count: torch.Tensor | None = None,
    v_count: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    counts_in: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-mode attention context (SPEC.md §5, §9.2-§9.4), step by step.

    ``a`` ``[T, *, M, N]`` and ``v`` ``[T, *, N, D]`` ternary, with the counts of their
    neurons after these steps (``a_count``, ``v_count``; None: 0 before them). ``Z = A @ V``
    of the counts before these steps (exact; Z is not state, always the product of the
    counts), then per step: ``Z += a_t @ V_t + A_{t-1} @ v_t`` (exact); ``y =
    fl32(fl32(theta_a * theta_v) * fl32(Z))``; ``target_spikes_step(y, threshold, ...)``. A
    fresh neuron count is 0. Returns ``(spikes int8 [T, *, M, D], count int8)``.
    ``counts_in``: ``a`` and ``v`` are the running counts ``A_t``, ``V_t`` after each step
    (``a_count``, ``v_count`` unused), and ``Z = A_t @ V_t`` at each step.
    """
    shape = (*a.shape[1:-1], v.shape[-1])
    a_cnt, v_cnt = _count_before(a, a_count), _count_before(v, v_count)
    z = _exact_matmul(a_cnt, v_cnt)
    c = _state_or_zeros(count, shape, torch.int8, a.device)
    m = theta_a.to(torch.float32).reshape(()) * theta_v.to(torch.float32).reshape(())
    spikes = []
    for t in range(a.shape[0]):
        if counts_in:
            z = _exact_matmul(a[t], v[t])
        else:
            a_cnt, v_cnt, z = _running_product_step(a[t], v[t], a_cnt, v_cnt, z)
        y = m * z.to(torch.int32).to(torch.float32)
        sigma, c = target_spikes_step(y, threshold, n_min, p_max, c)
        spikes.append(sigma)
    return torch.stack(spikes), c


__all__ += ["exact_attention_probs", "exact_context"]


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
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Float-mode attention probabilities (SPEC.md §5, §3, §2), step by step: the scores
    spike product of ``q`` ``[T, *, M, D]`` and ``k_t`` ``[T, *, D, N]`` (their running
    counts start from their neurons' counts after these steps less the spikes; None: 0),
    Spike-Softmax over the keys, and the ST-BIF neuron on its differences. The softmax is the
    library's row function, ``exact_math.softmax_rows``, which the fused kernel implements
    operation for operation. ``state``: ``(X, Y_prev, v, s)`` ``[*, M, N]`` (float32 x3,
    int8), fresh ``(0, 0, 0.5, 0)``. Returns ``(spikes int8 [T, *, M, N], state)``."""
    from spikekernels.exact_math import softmax_rows

    e, _, _ = spike_matmul(q, k_t, scale, _count_before(q, q_count), _count_before(k_t, k_count))
    shape = e.shape[1:]
    if state is None:
        x = torch.zeros(shape, dtype=torch.float32, device=q.device)
        y, v = x.clone(), torch.full_like(x, 0.5)
        s = torch.zeros(shape, dtype=torch.int8, device=q.device)
    else:
        x, y, v, s = (t.clone() for t in state)
    spikes = []
    for t in range(e.shape[0]):
        x = x + e[t]
        y_new = softmax_rows(x) if x.numel() else x
        sigma, v, s = st_bif_step(y_new - y, threshold, n_min, p_max, v, s)
        y = y_new
        spikes.append(sigma)
    return torch.stack(spikes), (x, y, v, s)


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
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Float-mode attention context (SPEC.md §5, §2), step by step: the spike product of
    ``a`` ``[T, *, M, N]`` and ``v`` ``[T, *, N, D]`` (their running counts start from their
    neurons' counts after these steps less the spikes; None: 0), then the ST-BIF neuron on
    its increments. ``state``: ``(membrane, count)`` ``[*, M, D]``, fresh ``(0.5, 0)``.
    Returns ``(spikes int8 [T, *, M, D], state)``."""
    e, _, _ = spike_matmul(a, v, scale, _count_before(a, a_count), _count_before(v, v_count))
    membrane, count = (None, None) if state is None else state
    spikes, membrane, count = st_bif(e, threshold, n_min, p_max, membrane, count)
    return spikes, (membrane, count)


__all__ += ["spike_attention_probs", "spike_context"]


def exact_residual_add(
    d: torch.Tensor | None,
    branch_spikes: torch.Tensor,
    branch_threshold: torch.Tensor,
    branch_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact mode's residual update for one branch (SPEC.md §9.2, §9.4), step by step.

    Per step: ``count += branch_spikes[t]`` (int32, exact, from ``branch_count``); ``out[t] =
    d[t] + fl64(theta) * fl64(count)``, or the product alone when ``d`` is None. The fresh
    count is 0. Returns ``out`` ``[T, *shape]`` float64."""
    theta = branch_threshold.to(torch.float64).reshape(())
    c = _state_or_zeros(branch_count, branch_spikes.shape[1:], torch.int32, branch_spikes.device)
    out = []
    for t in range(branch_spikes.shape[0]):
        c = c + branch_spikes[t].to(torch.int32)
        product = theta * c.to(torch.float64)
        out.append(product if d is None else d[t] + product)
    return torch.stack(out)


__all__ += ["exact_residual_add"]

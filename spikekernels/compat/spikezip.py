"""The official SpikeZIP-TF names, backed by spikekernels: switch a script by one import.

SpikeZIP-TF's public code (``spike_quan_layer.py``, ``spike_quan_wrapper.py``) runs an SNN as
single-step stateful modules called once per time step. This module offers the same class and
function names, constructor arguments and the attributes other code reads, computed by our ops:

- ``IFNeuron(q_threshold, level, sym)``: the ST-BIF neuron (``st_bif`` with T = 1); returns
  ``spike * q_threshold``; ``q`` (membrane, in thresholds), ``acc_q`` (count), ``cur_output``,
  ``is_work``, ``pos_max``, ``neg_min``, ``reset()``.
- ``spiking_softmax()``, ``Spiking_LayerNorm(dim)``: Spike-Softmax / Spike-LayerNorm
  (``X``, ``Y_pre``, ``reset()``); ``LLLinear(linear, neuron_type=..., level=...)``: the linear
  with its bias at the first step (``realize_time``, ``is_work``).
- ``SAttention(dim, num_heads, ...)``: the spiking attention; its two products run on our exact
  spike product (``spike_matmul``) from the neurons' int8 spikes.
- ``MyQuan(level, sym)``, ``QAttention(dim, num_heads, ...)``: the QANN side.
- ``SNNWrapper(ann_model, cfg, time_step, Encoding_type, level=..., neuron_type=...,
  model_name=..., is_softmax=...)``: runs a QANN ViT as an SNN until silent, through
  ``spikekernels.convert`` (multi-step chunks, early stop), returning ``(logits, steps)`` or,
  with ``verbose=True``, also the logits as of each step (float mode: summed up to it;
  exact mode: the head's current value).
- ``reset_model(model)``, ``myquan_replace(model, level, weight_bit=32, is_softmax=True)``.

Step-for-step the outputs equal the official modules' (bit for bit for the neuron; to float
rounding where the official code computes in a different order). Differences we chose:

- ``acc_q`` is an integer tensor (int8 for the paper's levels), not float32; ``cur_output`` is
  the int8 spike in {-1, 0, 1}. ``is_work`` is a 0-d bool tensor after the first step (reading
  it as a Python bool syncs a GPU, as the official per-step check always does).
- ``Spiking_LayerNorm`` takes ``eps`` (default 1e-5, nn.LayerNorm's, as the official class);
  ``SNNWrapper`` copies the QANN LayerNorm's eps (1e-6 for the ViT), where the official
  wrapper silently used 1e-5.
- ``SNNWrapper`` supports ``Encoding_type="analog"`` (the image at t = 0, the paper's ViT
  setting) only, and converts the QANN's structure at construction (load the checkpoint
  first, as the official scripts do); ``steps`` counts like the official loop (the settled
  step included). ``myquan_replace`` supports ``weight_bit=32`` (no weight quantization).
- ``MyQuan`` is ``spikekernels.nn.Quantizer`` (``pos_max``/``neg_min`` are ints; ``level >=
  512`` means no quantization, as the official ``'full'``). An odd signed level has the bounds
  of SPEC.md §1, ``[-(L // 2), L // 2 - 1]``; the official ``-level//2`` is ``(-L) // 2`` in
  Python, one lower (-8 for L = 15). The paper's levels are even, where both agree.
- ``SAttention`` takes levels up to 128: its spike products keep int8 running counts.

Inference only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spikekernels.levels import count_dtype
from spikekernels.nn.quantizer import Quantizer
from spikekernels.ops import spike_matmul, st_bif
from spikekernels.ops.layernorm import spike_layernorm
from spikekernels.ops.softmax import spike_softmax

__all__ = [
    "IFNeuron",
    "LLLinear",
    "MyQuan",
    "QAttention",
    "SAttention",
    "SNNWrapper",
    "Spiking_LayerNorm",
    "myquan_replace",
    "reset_model",
    "spiking_softmax",
]


class IFNeuron(nn.Module):
    """Single-step ST-BIF neuron (SPEC.md §2) under the official name and attributes.

    ``q_threshold``: the quantizer step (tensor or float); ``level``, ``sym``: the bounds
    ``pos_max = level // 2 - 1``, ``neg_min = -(level // 2)`` (sym) or ``level - 1``, ``0``;
    both may be reassigned afterwards, as the official converter does. ``forward(x)`` takes one
    step's input (any shape) and returns ``spike * q_threshold`` in ``x.dtype``.
    """

    def __init__(self, q_threshold, level, sym: bool = False) -> None:
        super().__init__()
        self.q_threshold = torch.as_tensor(q_threshold, dtype=torch.float32).detach().clone()
        self.level = int(level)
        self.sym = bool(sym)
        self.pos_max = self.level // 2 - 1 if self.sym else self.level - 1
        self.neg_min = -(self.level // 2) if self.sym else 0
        self.reset()

    # Bounds are plain ints inside (the kernel's arguments); tensors are accepted.
    @property
    def pos_max(self) -> int:
        return self._pos_max

    @pos_max.setter
    def pos_max(self, value) -> None:
        self._pos_max = int(value)

    @property
    def neg_min(self) -> int:
        return self._neg_min

    @neg_min.setter
    def neg_min(self, value) -> None:
        self._neg_min = int(value)

    def reset(self) -> None:
        self.q: torch.Tensor | float = 0.0
        self.acc_q: torch.Tensor | float = 0.0
        self.cur_output: torch.Tensor | float = 0.0
        self.is_work: torch.Tensor | bool = False

    def _apply(self, fn, recurse=True):
        # q_threshold is not a buffer (the official state_dict has no key for it) but moves too.
        self.q_threshold = fn(self.q_threshold)
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = torch.as_tensor(self.q_threshold, dtype=torch.float32).to(x.device)
        fresh = not torch.is_tensor(self.q)
        v = None if fresh else self.q
        s = None if fresh else self.acc_q
        if s is not None and s.dtype != count_dtype(self.neg_min, self.pos_max):
            s = s.to(count_dtype(self.neg_min, self.pos_max))
        spikes, self.q, self.acc_q = st_bif(
            x.unsqueeze(0).contiguous(), theta, self.neg_min, self.pos_max, v, s
        )
        self.cur_output = spikes[0]
        self.is_work = (x != 0).any() | (self.cur_output != 0).any()
        return (self.cur_output.to(torch.float32) * theta.reshape(())).to(x.dtype)


class spiking_softmax(nn.Module):  # noqa: N801  (the official name)
    """Single-step Spike-Softmax (SPEC.md §3): ``X += x; Y = softmax(X); return Y - Y_pre``."""

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.X: torch.Tensor | float = 0.0
        self.Y_pre: torch.Tensor | float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_acc = self.X if torch.is_tensor(self.X) else None
        y_prev = self.Y_pre if torch.is_tensor(self.Y_pre) else None
        out, self.X, self.Y_pre = spike_softmax(x.unsqueeze(0), x_acc, y_prev)
        return out[0]


class Spiking_LayerNorm(nn.Module):  # noqa: N801  (the official name)
    """Single-step Spike-LayerNorm (SPEC.md §4) over the last dim ``dim``.

    ``layernorm`` is an ``nn.LayerNorm(dim, eps=eps)`` (the official attribute and state_dict
    keys); ``eps`` defaults to nn.LayerNorm's 1e-5 like the official class.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(dim, eps=eps)
        self.reset()

    def reset(self) -> None:
        self.X: torch.Tensor | float = 0.0
        self.Y_pre: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ln = self.layernorm
        x_acc = self.X if torch.is_tensor(self.X) else None
        out, self.X, self.Y_pre = spike_layernorm(
            x.unsqueeze(0), ln.weight, ln.bias, ln.eps, x_acc, self.Y_pre
        )
        return out[0]


class LLLinear(nn.Module):
    """Single-step linear of spike increments with the bias released at the first step.

    ``LLLinear(linear, neuron_type="ST-BIF", level=...)``: ``linear`` is kept (shared) as the
    attribute ``linear``. ST-BIF: ``x @ W^T`` every step plus ``bias / steps`` on the first
    ``steps = 1`` steps (``realize_time`` counts down); ``neuron_type="IF"``: the plain linear,
    bias included, on every step with a nonzero input, and on an all-zero step zeros plus the
    bias while ``realize_time`` lasts (as the official class; it checks the input on the host).
    ``is_work``: the input had a nonzero or the bias was released.
    """

    def __init__(self, linear: nn.Linear, **kwargs) -> None:
        super().__init__()
        self.linear = linear
        self.neuron_type = kwargs.get("neuron_type", "ST-BIF")
        self.level = kwargs.get("level")
        self.steps = 1
        self.reset()

    def reset(self) -> None:
        self.is_work: torch.Tensor | bool = False
        self.first = True
        self.zero_output = None
        self.realize_time = self.steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.neuron_type == "IF":
            # The official IF path: the plain linear (bias included) on a step with a nonzero
            # input; an all-zero step gives zeros, plus the bias once while realize_time lasts.
            self.is_work = (x != 0).any()
            if bool(self.is_work):
                return self.linear(x)
            out = x.new_zeros(*x.shape[:-1], self.linear.out_features)
            if self.realize_time > 0 and self.linear.bias is not None:
                out = out + self.linear.bias / self.steps
                self.realize_time -= 1
                self.is_work = torch.ones((), dtype=torch.bool, device=x.device)
            return out
        out = F.linear(x, self.linear.weight)
        self.is_work = (x != 0).any()
        if self.realize_time > 0 and self.linear.bias is not None:
            out = out + self.linear.bias / self.steps
            self.realize_time -= 1
            self.is_work = torch.ones((), dtype=torch.bool, device=x.device)
        self.first = False
        return out


class MyQuan(Quantizer):
    """The QANN quantizer under its official name: ``MyQuan(level, sym=False)``.

    ``spikekernels.nn.Quantizer`` (learned step ``s``, round half up, official state_dict key
    ``s``) with ``level >= 512`` meaning no quantization, as the official ``pos_max='full'``.
    """

    def __init__(self, level, sym: bool = False, **kwargs) -> None:
        super().__init__(int(level), signed=bool(sym))
        if self.level >= 512:
            self.enabled = False


class QAttention(nn.Module):
    """The official quantized attention: ``q * scale`` before the product, as in
    ``spike_quan_layer.QAttention``; ``is_softmax=False`` divides the quantized scores by N."""

    def __init__(
        self,
        dim,
        num_heads=8,
        qkv_bias=False,
        qk_norm=False,
        attn_drop=0.0,
        proj_drop=0.0,
        norm_layer=nn.LayerNorm,
        level=2,
        is_softmax=True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.level = level
        self.is_softmax = is_softmax
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.quan_q = MyQuan(level, sym=True)
        self.quan_k = MyQuan(level, sym=True)
        self.quan_v = MyQuan(level, sym=True)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.quan_proj = MyQuan(level, sym=True)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_quan = MyQuan(level, sym=False)
        self.after_attn_quan = MyQuan(level, sym=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k, v = self.quan_q(q), self.quan_k(k), self.quan_v(v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.is_softmax:
            attn = self.attn_quan(attn.softmax(dim=-1))
        else:
            attn = self.attn_quan(attn) / n
        x = self.after_attn_quan(self.attn_drop(attn) @ v)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.quan_proj(self.proj_drop(self.proj(x)))


class SAttention(nn.Module):
    """Single-step spiking attention under the official name, arguments and submodules.

    ``qkv`` and ``proj`` are plain linears until ``attn_convert``-style code (or
    ``SAttention.from_qattention``) replaces them with ``LLLinear``; the neurons ``q_IF``,
    ``k_IF``, ``v_IF``, ``attn_IF``, ``after_attn_IF``, ``proj_IF`` have threshold 1 until set.
    The scores and context products run on ``spike_matmul`` from the neurons' int8 spikes
    (exact integers, one float scaling), the official code's
    ``A_t b_t + a_t B_t - a_t b_t`` in float.
    """

    def __init__(
        self,
        dim,
        num_heads=8,
        qkv_bias=False,
        qk_norm=False,
        attn_drop=0.0,
        proj_drop=0.0,
        norm_layer=nn.LayerNorm,
        neuron_layer=IFNeuron,
        level=2,
        is_softmax=True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if isinstance(level, bool) or not isinstance(level, int) or not 2 <= level <= 128:
            # the unsigned attention neuron counts up to level - 1 in int8 running counts
            raise ValueError(f"level must be an int in [2, 128] (int8 spike counts), got {level!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.neuron_layer = neuron_layer
        self.level = level
        self.is_softmax = is_softmax
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        one = torch.tensor(1.0)
        self.q_IF = neuron_layer(q_threshold=one, level=level, sym=True)
        self.k_IF = neuron_layer(q_threshold=one, level=level, sym=True)
        self.v_IF = neuron_layer(q_threshold=one, level=level, sym=True)
        self.attn_drop = nn.Dropout(attn_drop)
        self.attn_IF = neuron_layer(q_threshold=one, level=level, sym=False)
        self.after_attn_IF = neuron_layer(q_threshold=one, level=level, sym=True)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)
        self.proj_IF = neuron_layer(q_threshold=one, level=level, sym=True)
        if self.is_softmax:
            self.Ssoftmax = spiking_softmax()
        self.reset()

    @classmethod
    def from_qattention(cls, qattn: nn.Module, level: int, neuron_type: str = "ST-BIF"):
        """The official ``attn_convert(QAttn, SAttn, level, neuron_type)`` in one call."""
        sattn = cls(
            dim=qattn.num_heads * qattn.head_dim,
            num_heads=qattn.num_heads,
            level=level,
            is_softmax=getattr(qattn, "is_softmax", True),
        )
        sattn.qkv = LLLinear(qattn.qkv, neuron_type="ST-BIF", level=level)
        sattn.proj = LLLinear(qattn.proj, neuron_type="ST-BIF", level=level)
        pairs = (("q_IF", "quan_q"), ("k_IF", "quan_k"), ("v_IF", "quan_v"),
                 ("attn_IF", "attn_quan"), ("after_attn_IF", "after_attn_quan"),
                 ("proj_IF", "quan_proj"))  # fmt: skip
        for neuron_name, quan_name in pairs:
            neuron, quan = getattr(sattn, neuron_name), getattr(qattn, quan_name)
            neuron.q_threshold = quan.s.detach().clone()
            neuron.pos_max, neuron.neg_min = quan.pos_max, quan.neg_min
            neuron.neuron_type, neuron.level = neuron_type, level
        if hasattr(qattn, "attn_drop"):
            sattn.attn_drop = qattn.attn_drop
        if hasattr(qattn, "proj_drop"):
            sattn.proj_drop = qattn.proj_drop
        return sattn

    def reset(self) -> None:
        for m in self.children():
            if hasattr(m, "reset") and not isinstance(m, nn.Linear):
                m.reset()
        self.scores_acc = (None, None)
        self.context_acc = (None, None)
        self.T = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, dh = self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(b, n, 3, h, dh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        self.q_IF(q), self.k_IF(k), self.v_IF(v)
        theta = [torch.as_tensor(m.q_threshold, dtype=torch.float32).to(x.device)
                 for m in (self.q_IF, self.k_IF, self.attn_IF, self.v_IF)]  # fmt: skip
        q_s, k_s, v_s = (m.cur_output.unsqueeze(0) for m in (self.q_IF, self.k_IF, self.v_IF))
        scores, *acc = spike_matmul(
            q_s, k_s.transpose(-1, -2), theta[0] * theta[1] * self.scale, *self.scores_acc
        )
        self.scores_acc = tuple(acc)
        attn = self.Ssoftmax(scores[0]) if self.is_softmax else scores[0]
        self.attn_IF(attn)
        context_scale = theta[2] * theta[3] * (1.0 if self.is_softmax else 1.0 / n)
        a_s = self.attn_drop(self.attn_IF.cur_output).unsqueeze(0)
        context, *acc = spike_matmul(a_s, v_s, context_scale, *self.context_acc)
        self.context_acc = tuple(acc)
        x = self.after_attn_IF(context[0].to(x.dtype))
        x = x.transpose(1, 2).reshape(b, n, c)
        x = self.proj_IF(self.proj_drop(self.proj(x)))
        self.T += 1
        return x


def reset_model(model: nn.Module) -> None:
    """``reset()`` every module in ``model`` that has one: the compat classes, ours
    (neurons, spike linears, Spike-LayerNorm/Softmax, attention, the SNN itself), and any
    other stateful module a user adds."""
    for m in list(model.modules()):
        reset = getattr(m, "reset", None)
        if callable(reset):
            reset()


def _is_block(m: nn.Module) -> bool:
    attn, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
    return (
        all(hasattr(m, name) for name in ("norm1", "norm2"))
        and attn is not None
        and all(hasattr(attn, name) for name in ("qkv", "proj", "num_heads"))
        and mlp is not None
        and all(hasattr(mlp, name) for name in ("fc1", "act", "fc2"))
    )


def myquan_replace(model: nn.Module, level: int, weight_bit: int = 32, is_softmax: bool = True):
    """Turn a ViT into the QANN in place, as the official ``myquan_replace`` does.

    Each transformer block (anything with ``norm1``, ``attn`` (``qkv``, ``proj``,
    ``num_heads``), ``norm2``, ``mlp`` (``fc1``, ``act``, ``fc2``)): ``attn`` -> ``QAttention``
    sharing qkv/proj, ``norm1``/``norm2`` -> ``(LayerNorm, MyQuan signed)``, ``mlp.act`` ->
    ``(MyQuan unsigned, act)``, ``mlp.fc2`` -> ``(fc2, MyQuan signed)``. Elsewhere every
    ``Conv2d`` and ``LayerNorm`` gets a signed ``MyQuan`` after it. Returns ``model``.
    """
    if weight_bit < 32:
        raise ValueError("myquan_replace: weight quantization (weight_bit < 32) is not supported")

    def replace(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if _is_block(child):
                old = child.attn
                dim = old.qkv.in_features
                qattn = QAttention(dim, num_heads=old.num_heads, level=level, is_softmax=is_softmax)
                qattn.qkv, qattn.proj = old.qkv, old.proj
                for drop in ("attn_drop", "proj_drop"):
                    if hasattr(old, drop):
                        setattr(qattn, drop, getattr(old, drop))
                child.attn = qattn
                child.norm1 = nn.Sequential(child.norm1, MyQuan(level, sym=True))
                child.norm2 = nn.Sequential(child.norm2, MyQuan(level, sym=True))
                child.mlp.act = nn.Sequential(MyQuan(level, sym=False), child.mlp.act)
                child.mlp.fc2 = nn.Sequential(child.mlp.fc2, MyQuan(level, sym=True))
            elif isinstance(child, (nn.Conv2d, nn.LayerNorm)):
                setattr(parent, name, nn.Sequential(child, MyQuan(level, sym=True)))
            else:
                replace(child)

    replace(model)
    return model


class SNNWrapper(nn.Module):
    """Run a QANN ViT as its SNN until silent: the official wrapper's interface.

    ``SNNWrapper(ann_model, cfg, time_step=2000, Encoding_type="analog", level=...,
    neuron_type="ST-BIF", model_name="vit...", is_softmax=True)``. ``model`` is the QANN
    (kept, registered: the state_dict keys are ``model.*``); the SNN is
    ``spikekernels.convert(model)`` and runs in chunks of ``chunk`` steps (default 8; the
    official loop is chunk 1), as CUDA graph replays with ``cuda_graph=True`` (a CUDA model:
    one capture per batch shape, ``SpikingViT(..., cuda_graph=True)``; the same bits as
    without). ``forward(x, verbose=False)`` returns ``(logits, T)`` with ``T``
    counted as the official loop does (the steps run, the first silent one included, at most
    ``time_step``), and with ``verbose`` also ``[T, B, classes]``, the logits as of each step
    (float mode: summed up to it; exact mode: the head's current value).

    The SNN copies the QANN's thresholds (and, in exact mode, its integer weights) when it is
    built, so loading a state_dict into the wrapper or into ``model`` (a resumed or evaluated
    checkpoint) makes the next ``forward`` rebuild it. Other in-place edits of the QANN's
    parameters are not seen: build a new wrapper after them.
    """

    def __init__(
        self, ann_model: nn.Module, cfg=None, time_step: int = 2000, Encoding_type="rate", **kwargs
    ) -> None:
        from spikekernels.convert import convert

        super().__init__()
        if Encoding_type != "analog":
            raise ValueError(
                f"SNNWrapper: Encoding_type={Encoding_type!r} is not supported; use 'analog' "
                "(the image at t = 0, the paper's ViT setting)"
            )
        if kwargs.get("is_softmax", True) is False:
            raise ValueError("SNNWrapper: only softmax attention (is_softmax=True) is supported")
        self.T = time_step
        self.cfg = cfg
        self.Encoding_type = Encoding_type
        self.level = kwargs.get("level")
        self.neuron_type = kwargs.get("neuron_type", "ST-BIF")
        self.model_name = kwargs.get("model_name", "vit")
        self.is_softmax = True
        self.kwargs = kwargs
        self.chunk = int(kwargs.get("chunk", 8))
        self.cuda_graph = kwargs.get("cuda_graph", False)
        if not isinstance(self.cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {type(self.cuda_graph).__name__}")
        self.max_T = 0
        self.model = ann_model
        # Held outside the module tree: it shares the QANN's weights, and the state_dict stays
        # the QANN's (model.*), loadable from an official checkpoint.
        object.__setattr__(self, "snn", convert(ann_model))
        self._stale = False
        ann_model.register_load_state_dict_post_hook(self._mark_stale)

    def _mark_stale(self, module, incompatible_keys) -> None:
        self._stale = True

    def _apply(self, fn, recurse=True):
        self.snn._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def reset(self) -> None:
        self.snn.reset()

    def forward(self, x: torch.Tensor, verbose: bool = False):
        if self._stale:  # a checkpoint was loaded: its thresholds and weights
            from spikekernels.convert import convert

            object.__setattr__(self, "snn", convert(self.model))
            self._stale = False
        logits, steps, trace = self.snn(
            x, max_steps=self.T, chunk=self.chunk, return_trace=True, cuda_graph=self.cuda_graph
        )
        count = min(steps + 1, self.T)
        self.max_T = max(self.max_T, count)
        if not verbose:
            return logits, count
        per_step = trace.logits
        if count > steps:  # the official loop also runs the first silent step
            per_step = torch.cat((per_step, per_step[-1:]))
        return logits, count, per_step

"""The exact integer forward of an integer-weight QuantViT (SPEC.md §9.2).

Every quantizer's integer is computed from the integers of the quantizers before it:

- linears: ``acc = q_in @ W_int^T`` exact, value ``fl32(fl32(m * fl32(acc)) + b)``;
- attention: ``S = Q @ K^T`` and ``Z = A @ V`` exact, with the score gain and context scale
  of ``exact_math``;
- the residual stream as a float64 constant ``c`` (class token, positions) plus the exact sum
  ``D`` of ``fl64(theta_b) * q_b`` over the quantizers feeding it; LayerNorms read
  ``fl32(c + D)``;
- LayerNorm and softmax by the row functions the SNN calls too;
- logits: the head's value of the final quantizer's integers.

The exact SNN (``spikekernels.convert``) evaluates the same formulas on its own exact state, on
tensors of the same shapes, so at silence its counts and logits equal these bit for bit.

``record`` (a dict) receives ``name -> (integer, value)`` for every quantizer, with
``integer`` float32 in the QANN's layout and ``value`` the float32 it quantized; ``override``
(``name -> integer``) replaces a quantizer's integer by the given one downstream, which is how
``spikekernels.parity`` applies the QANN's formulas to an SNN's own counts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from spikekernels import exact_math
from spikekernels.nn.quantizer import Quantizer

__all__ = ["check_exact_attention", "exact_forward", "residual_constant"]


def check_exact_attention(attn: object, name: str, head_dim: int) -> None:
    """Exact mode's attention (SPEC.md §9.2): softmax attention whose scores are scaled by
    ``head_dim^-1/2`` (the score gain's factor). Another ``scale`` or ``is_softmax=False``
    raises ``ValueError`` naming the module, rather than run a different attention."""
    if getattr(attn, "is_softmax", True) is False:
        raise ValueError(f"`{name}`: exact mode supports softmax attention only (is_softmax=True)")
    scale = getattr(attn, "scale", None)
    if scale is not None and float(scale) != head_dim**-0.5:
        raise ValueError(
            f"`{name}`: exact mode scales the scores by head_dim^-1/2 = {head_dim**-0.5!r}; "
            f"this attention's scale is {float(scale)!r}"
        )


def residual_constant(cls_token: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
    """``c`` ``[1, 1 + N, D]`` float64: the class token on row 0, plus the position embedding."""
    cls = cls_token.detach().to(torch.float64)
    rest = torch.zeros(
        1, pos_embed.shape[1] - 1, pos_embed.shape[2], dtype=torch.float64, device=cls.device
    )
    return torch.cat((cls, rest), dim=1) + pos_embed.detach().to(torch.float64)


class _Integers:
    """Quantizer -> integer (float32), recorded and overridden by quantizer name."""

    def __init__(self, model, record: dict | None, override: Mapping | None) -> None:
        self.names = {id(q): n for n, q in model.named_modules() if isinstance(q, Quantizer)}
        self.record = record
        self.override = override or {}

    def __call__(self, q: Quantizer, y: torch.Tensor) -> torch.Tensor:
        integer = exact_math.target(y, q.s.detach().to(torch.float32), q.n_min, q.p_max)
        name = self.names[id(q)]
        if self.record is not None:
            self.record[name] = (integer, y)
        if name in self.override:
            integer = self.override[name].to(device=y.device, dtype=torch.float32)
        return integer


def _step(q: Quantizer) -> torch.Tensor:
    return q.s.detach().to(torch.float32)


def _linear(linear, q_in: torch.Tensor, theta_in: torch.Tensor) -> torch.Tensor:
    w_int, ws = linear.int_weights()
    acc = exact_math.int_matmul(q_in, w_int.t())
    return exact_math.linear_value(acc, theta_in * ws, linear.bias)


def _layer_norm(ln, x: torch.Tensor) -> torch.Tensor:
    return exact_math.layer_norm_rows(x, ln.weight, ln.bias, ln.eps)


@torch.no_grad()
def exact_forward(
    model, x: torch.Tensor, *, record: dict | None = None, override: Mapping | None = None
) -> torch.Tensor:
    """Logits ``[B, num_classes]`` of an integer-weight ``QuantViT`` by SPEC.md §9.2."""
    integer = _Integers(model, record, override)
    conv, patch_q = model.patch_embed.proj[0], model.patch_embed.proj[1]
    model._check_input(x)
    y = conv(x)  # [B, D, H', W'], float: the image, not spikes
    q = integer(patch_q, y).flatten(2).transpose(1, 2)  # [B, N, D]
    b, _, dim = q.shape
    d = torch.cat(
        (
            torch.zeros(b, 1, dim, dtype=torch.float64, device=y.device),
            _step(patch_q).to(torch.float64) * q.to(torch.float64),
        ),
        dim=1,
    )
    c = residual_constant(model.cls_token, model.pos_embed)
    for i, block in enumerate(model.blocks):
        check_exact_attention(block.attn, f"blocks.{i}.attn", block.attn.head_dim)
        d = _block(block, c, d, integer)
    final = model.fc_norm if model.global_pool else model.norm
    if model.global_pool:
        feature = exact_math.pool_patch_tokens(c, d)
    else:
        feature = exact_math.residual_read(c, d)[:, 0]
    q_final = integer(final[1], _layer_norm(final[0], feature))
    return _linear(model.head, q_final, _step(final[1]))


def _block(block, c: torch.Tensor, d: torch.Tensor, integer: _Integers) -> torch.Tensor:
    attn, mlp = block.attn, block.mlp
    q1 = integer(block.norm1[1], _layer_norm(block.norm1[0], exact_math.residual_read(c, d)))
    qkv = _linear(attn.qkv, q1, _step(block.norm1[1]))
    b, n, dim = q1.shape
    h, dh = attn.num_heads, attn.head_dim
    qkv = qkv.reshape(b, n, 3, h, dh).permute(2, 0, 3, 1, 4)  # [3, B, H, N, Dh]
    q = integer(attn.quan_q, qkv[0])
    k = integer(attn.quan_k, qkv[1])
    v = integer(attn.quan_v, qkv[2])
    gain = exact_math.score_gain(_step(attn.quan_q), _step(attn.quan_k), dh)
    scores = exact_math.score_value(exact_math.int_matmul(q, k.transpose(-2, -1)), gain)
    a = integer(attn.attn_quan, exact_math.softmax_rows(scores))
    context = exact_math.context_value(
        exact_math.int_matmul(a, v), _step(attn.attn_quan), _step(attn.quan_v)
    )
    ctx = integer(attn.after_attn_quan, context)
    merged = ctx.transpose(1, 2).reshape(b, n, dim)
    proj = integer(attn.quan_proj, _linear(attn.proj, merged, _step(attn.after_attn_quan)))
    d = d + _step(attn.quan_proj).to(torch.float64) * proj.to(torch.float64)

    q2 = integer(block.norm2[1], _layer_norm(block.norm2[0], exact_math.residual_read(c, d)))
    hidden = integer(mlp.act[0], _linear(mlp.fc1, q2, _step(block.norm2[1])))
    out = integer(mlp.fc2[1], _linear(mlp.fc2[0], hidden, _step(mlp.act[0])))
    return d + _step(mlp.fc2[1]).to(torch.float64) * out.to(torch.float64)

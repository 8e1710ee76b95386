"""``Quantizer``: the QANN activation quantizer with a learned step (SPEC.md §1).

The quantized network that SpikeZIP-TF converts puts one of these after every layer whose
output becomes a spike train; each quantizer becomes one ST-BIF neuron whose threshold is the
learned step ``s``. Training follows LSQ (Esser et al., ICLR 2020), as the official ``MyQuan``
does: a straight-through floor and a gradient scale ``g = 1 / sqrt(numel * p_max)`` on ``s``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from spikekernels.levels import count_dtype, level_bounds, quantize

__all__ = ["Quantizer"]

# Calibration: grid search for the least squared quantization error on a subsample of the
# activations: 64 fractions of the step that covers the whole observed range, on at most 2**16
# elements, so one quantizer costs 64 passes over 64K values whatever the batch.
_CALIB_CANDIDATES = 64
_CALIB_SAMPLE = 1 << 16


class _LSQQuantize(torch.autograd.Function):
    """Forward: exactly ``levels.quantize``. Backward: LSQ's straight-through estimator.

    With ``v = x / s`` and ``r = floor(v + 1/2)``: ``dy/dx = 1`` where ``n_min <= r <= p_max``
    (else 0); ``dy/ds = g * (r - v)`` inside, ``g * clamp(r)`` outside.
    """

    @staticmethod
    def forward(ctx, x, s, grad_scale, n_min, p_max):
        ctx.save_for_backward(x, s)
        ctx.grad_scale, ctx.n_min, ctx.p_max = grad_scale, n_min, p_max
        return quantize(x, s, n_min, p_max)

    @staticmethod
    def backward(ctx, grad_out):
        x, s = ctx.saved_tensors
        v = x / s
        r = torch.floor(v + 0.5)
        inside = (r >= ctx.n_min) & (r <= ctx.p_max)
        grad_x = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out * inside.to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            ds = torch.where(inside, r - v, torch.clamp(r, ctx.n_min, ctx.p_max))
            grad_s = (grad_out * ds).sum().to(s.dtype).reshape(s.shape) * ctx.grad_scale
        return grad_x, grad_s, None, None, None


class Quantizer(nn.Module):
    """``s * clamp(floor(x / s + 1/2), n_min, p_max)`` with a learned 0-d step ``s`` (SPEC.md §1).

    Round half up. ``level`` L gives the bounds (``levels.level_bounds``): signed
    ``[-(L // 2), L // 2 - 1]``, unsigned ``[0, L - 1]``. Any shape and float dtype in, the same
    out. The state_dict holds only ``s``, like the official ``MyQuan``, so official QANN
    checkpoints load as they are.

    Modes (plain attributes, not saved):

    - ``enabled = False``: identity, the float network (first phase of training from scratch).
    - ``calibrating = True``: set ``s`` from this input by least squared error (grid search,
      see ``calibrate_step``), then quantize with it. ``spikekernels.models.calibrate`` turns it
      on for every quantizer and runs one batch, so each quantizer sees its input as quantized
      by the ones before it.
    - training, first forward on a step that was never set (not calibrated, not loaded): LSQ's
      init ``s = 2 * mean|x| / sqrt(p_max)``, as the official ``MyQuan`` does.

    ``integer(x)`` is the clamped integer ``clamp(floor(x / s + 1/2), n_min, p_max)`` in the
    ST-BIF count dtype: what a converted neuron's spike count equals once the SNN is silent.
    """

    def __init__(self, level: int, signed: bool) -> None:
        super().__init__()
        if isinstance(level, bool) or not isinstance(level, numbers.Integral):
            raise TypeError(f"level must be an int, got {type(level).__name__}")
        self.level = int(level)
        self.signed = bool(signed)
        self.n_min, self.p_max = level_bounds(self.level, self.signed)
        self.s = nn.Parameter(torch.ones(()))
        self.enabled = True
        self.calibrating = False
        self.initialized = False

    # Official MyQuan attribute names, read by SpikeZIP-TF-style converters (SpikingJelly's).
    @property
    def sym(self) -> bool:
        return self.signed

    @property
    def pos_max(self) -> int:
        return self.p_max

    @property
    def neg_min(self) -> int:
        return self.n_min

    @property
    def _q_max(self) -> int:
        # LSQ's Q_P, as the official code uses it (pos_max); >= 1 so level 2 signed works.
        return max(self.p_max, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.calibrating:
            self.set_step(self.calibrate_step(x))
        elif self.training and not self.initialized and x.numel():
            self.set_step(2.0 * x.detach().abs().mean() / math.sqrt(self._q_max))
        grad_scale = 1.0 / math.sqrt(max(x.numel(), 1) * self._q_max)  # an empty batch: any
        return _LSQQuantize.apply(x, self.s, grad_scale, self.n_min, self.p_max)

    def integer(self, x: torch.Tensor) -> torch.Tensor:
        """``clamp(floor(x / s + 1/2), n_min, p_max)`` as integers (``levels.count_dtype``)."""
        s = self.s.detach()
        q = torch.clamp(torch.floor(x.detach() / s + 0.5), self.n_min, self.p_max)
        return q.to(count_dtype(self.n_min, self.p_max))

    @torch.no_grad()
    def set_step(self, s: float | torch.Tensor) -> None:
        """Set ``s`` (must be positive and finite) and mark the step as initialized."""
        s = torch.as_tensor(s, dtype=self.s.dtype, device=self.s.device).reshape(())
        if not bool(torch.isfinite(s) & (s > 0)):
            raise ValueError(f"quantizer step must be positive and finite, got {s.item()}")
        self.s.copy_(s)
        self.initialized = True

    @torch.no_grad()
    def calibrate_step(self, x: torch.Tensor) -> torch.Tensor:
        """The step that minimises ``sum((quantize(x) - x)**2)`` over a grid (0-d tensor).

        Candidates are ``k / 64`` (k = 1..64) of the step that maps the observed range onto the
        integer bounds, evaluated on up to 65536 elements (an evenly strided subsample). An
        all-zero input gives the step 1 (any positive step is exact there); an empty or
        non-finite one raises ``ValueError`` (a NaN would pass for all-zero, step 1).
        """
        flat = x.detach().reshape(-1).to(torch.float32)
        if flat.numel() == 0:
            raise ValueError("calibration input is empty: no step can be chosen from it")
        if not bool(torch.isfinite(flat).all()):
            raise ValueError(
                "calibration input has non-finite values (NaN or inf): no step can be chosen "
                "from it"
            )
        if flat.numel() > _CALIB_SAMPLE:
            stride = flat.numel() // _CALIB_SAMPLE
            flat = flat[::stride][:_CALIB_SAMPLE]
        cover = flat.max() / self.p_max if self.p_max > 0 else flat.new_zeros(())
        if self.n_min < 0:
            cover = torch.maximum(cover, flat.min() / self.n_min)
        if not bool(cover > 0):
            return torch.ones((), device=x.device)
        fractions = torch.arange(1, _CALIB_CANDIDATES + 1, device=flat.device) / _CALIB_CANDIDATES
        steps = cover * fractions
        errors = torch.stack(
            [((quantize(flat, s, self.n_min, self.p_max) - flat) ** 2).sum() for s in steps]
        )
        return steps[torch.argmin(errors)]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "s" in state_dict:
            self.initialized = True

    def extra_repr(self) -> str:
        step = "meta" if self.s.is_meta else f"{self.s.item():.4g}"
        return (
            f"level={self.level}, signed={self.signed}, bounds=[{self.n_min}, {self.p_max}], "
            f"s={step}" + ("" if self.enabled else ", disabled")
        )

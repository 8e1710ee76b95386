"""Quantizer (SPEC.md §1): the reference's rounding and bounds, LSQ gradients, integer()."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import CPU_PASS_ONLY, assert_same_bits

from spikekernels import reference
from spikekernels.models import calibrate, quant_vit_tiny
from spikekernels.nn import Quantizer

LEVELS = [2, 8, 16, 32]


def _quantize_oracle(x: torch.Tensor, step: float, n_min: int, p_max: int) -> torch.Tensor:
    """SPEC.md §1 in float64 numpy, rounded to float32 after each operation (float64 holds
    each exact result of two float32 operands, so one rounding gives float32's own): an
    oracle that shares no code with the library."""
    s = np.float64(np.float32(step))
    q = (x.double().numpy() / s).astype(np.float32).astype(np.float64)
    k = np.clip(np.floor((q + 0.5).astype(np.float32)), n_min, p_max)
    return torch.from_numpy((k * s).astype(np.float32))


def _quantizer(level, signed, step):
    q = Quantizer(level, signed)
    q.set_step(step)
    return q


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("level", LEVELS)
def test_forward_matches_reference_bit_for_bit(gen, level, signed):
    step = 0.37
    q = _quantizer(level, signed, step)
    x = torch.randn(4, 33, generator=gen) * level * step
    ties = torch.randint(-level, level, (4, 33), generator=gen) * step + step / 2
    for inp in (x, ties):
        assert_same_bits(q(inp).detach(), _quantize_oracle(inp, step, q.n_min, q.p_max))
        want = reference.quantize(inp, torch.tensor(step), q.n_min, q.p_max)
        assert_same_bits(want, _quantize_oracle(inp, step, q.n_min, q.p_max), "reference")


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("level", LEVELS)
def test_bounds_are_level_bounds(level, signed):
    q = _quantizer(level, signed, 0.5)
    # SPEC.md §1: signed [-(L // 2), L // 2 - 1], unsigned [0, L - 1]
    assert (q.n_min, q.p_max) == ((-(level // 2), level // 2 - 1) if signed else (0, level - 1))
    assert (q.n_min, q.p_max) == reference.level_bounds(level, signed)
    assert (q.level, q.signed) == (level, signed)
    assert (q.neg_min, q.pos_max, q.sym) == (q.n_min, q.p_max, signed)
    big = torch.tensor([-1e6, -3.0, 0.0, 3.0, 1e6])
    ints = q.integer(big)
    assert ints.min().item() == q.n_min and ints.max().item() == q.p_max


def test_ties_round_half_up():
    q = _quantizer(16, True, 1.0)
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    assert q.integer(x).tolist() == [-2, -1, 0, 1, 2, 3]
    assert q(x).tolist() == [-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("signed", [True, False])
def test_integer_is_the_count_the_neuron_reaches(gen, signed):
    q = _quantizer(16, signed, 0.25)
    x = torch.randn(64, generator=gen) * 3
    ints = q.integer(x)
    assert ints.dtype == reference.count_dtype(q.n_min, q.p_max) == torch.int8
    assert torch.equal(q.s.detach() * ints.to(torch.float32), q(x).detach())


def _official_lsq(x, s, n_min, p_max):
    """The official MyQuan's autograd formulation (grad_scale, floor_pass), for comparison,
    with ``torch.clamp``'s gradient as it was trained with: through a value on a bound. (torch
    2.15 passes none there, so a plain clamp would make this oracle depend on the torch.)"""
    g = 1.0 / math.sqrt(x.numel() * p_max)
    s_scaled = (s - s * g).detach() + s * g
    v = x / s_scaled + 0.5
    floored = (v.floor() - v).detach() + v
    inside = (floored >= n_min) & (floored <= p_max)
    clamped = torch.where(inside, floored, torch.clamp(floored.detach(), n_min, p_max))
    return clamped * s_scaled


@pytest.mark.parametrize("signed", [True, False])
def test_lsq_gradients_match_the_official_formulation(gen, signed):
    q = _quantizer(8, signed, 0.3)
    x = (torch.randn(5, 17, generator=gen) * 1.5).requires_grad_()
    upstream = torch.randn(5, 17, generator=gen)
    (q(x) * upstream).sum().backward()

    s = torch.tensor(0.3, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    (_official_lsq(x2, s, q.n_min, q.p_max) * upstream).sum().backward()

    inside = (torch.floor(x.detach() / 0.3 + 0.5) >= q.n_min) & (
        torch.floor(x.detach() / 0.3 + 0.5) <= q.p_max
    )
    assert not inside.all() and inside.any(), "the input must reach both sides of the clamp"
    assert torch.equal(x.grad, upstream * inside)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(q.s.grad, s.grad, rtol=1e-5, atol=1e-6)


def test_step_learns():
    q = _quantizer(16, False, 0.01)
    x = torch.rand(256) * 4
    opt = torch.optim.SGD(q.parameters(), lr=1.0)
    before = ((q(x) - x) ** 2).mean().item()
    for _ in range(50):
        opt.zero_grad()
        ((q(x) - x) ** 2).mean().backward()
        opt.step()
    assert ((q(x) - x) ** 2).mean().item() < 0.1 * before


def test_first_training_forward_initializes_once(gen):
    q = Quantizer(16, True)
    q.eval()
    x = torch.randn(100, generator=gen)
    q(x)
    assert not q.initialized and q.s.item() == 1.0, "eval must not touch the step"
    q.train()
    q(x)
    want = 2 * x.abs().mean().item() / math.sqrt(q.p_max)
    assert q.initialized and q.s.item() == pytest.approx(want)
    q(x * 10)
    assert q.s.item() == pytest.approx(want), "only the first training forward initializes"


def test_loading_a_step_counts_as_initialized():
    q = Quantizer(8, False)
    q.load_state_dict({"s": torch.tensor(0.2)})
    assert q.initialized and list(q.state_dict()) == ["s"]
    q.train()
    q(torch.ones(3) * 50)
    assert q.s.item() == pytest.approx(0.2)


def test_disabled_is_identity(gen):
    q = _quantizer(8, True, 0.5)
    q.enabled = False
    x = torch.randn(10, generator=gen)
    assert q(x) is x


@pytest.mark.parametrize("signed", [True, False])
def test_calibrated_step_beats_lsq_init(gen, signed):
    q = Quantizer(16, signed)
    x = torch.randn(5000, generator=gen).abs() if not signed else torch.randn(5000, generator=gen)
    x = x**3  # heavy tails
    step = q.calibrate_step(x)
    lsq = 2 * x.abs().mean() / math.sqrt(q.p_max)

    def err(s):
        return ((reference.quantize(x, s, q.n_min, q.p_max) - x) ** 2).sum()

    assert step > 0 and torch.isfinite(step)
    assert err(step) <= err(lsq)
    assert q.calibrate_step(torch.zeros(7)).item() == 1.0


def test_calibration_refuses_what_it_cannot_measure(gen):
    """A NaN would pass for an all-zero input (step 1) and spread to every later quantizer."""
    q = Quantizer(16, True)
    x = torch.randn(1000, generator=gen)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[17] = bad
        with pytest.raises(ValueError, match="non-finite"):
            q.calibrate_step(y)
    with pytest.raises(ValueError, match="empty"):
        q.calibrate_step(torch.zeros(0))
    qann = quant_vit_tiny(level=8)
    images = torch.randn(2, 1, 8, 8, generator=gen)
    images[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="calibrate: x has non-finite"):
        calibrate(qann, images)


def test_empty_batch_in_training_leaves_the_step_alone():
    """LSQ's first-forward init has nothing to average on an empty batch: it waits."""
    q = Quantizer(8, True).train()
    assert q(torch.zeros(0, 4)).shape == (0, 4) and not q.initialized
    q(torch.ones(3))
    assert q.initialized and torch.isfinite(q.s)


def test_bad_step_is_rejected():
    q = Quantizer(8, True)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive and finite"):
            q.set_step(bad)


def test_level_below_two_is_rejected():
    with pytest.raises(ValueError, match="level"):
        Quantizer(1, True)


@CPU_PASS_ONLY
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("step", [0.125, 2.0])
def test_calibration_finds_a_step_that_fills_the_bounds(gen, signed, step):
    """The grid's last candidate is the full-range step itself (k = 64 of 64): data on the
    integer grid of that step, reaching both bounds, quantize losslessly with it, while every
    smaller candidate clamps an extreme. Power-of-two steps keep every product and quotient
    exact."""
    q = Quantizer(4, signed)
    x = torch.randint(q.n_min, q.p_max + 1, (50,), generator=gen).to(torch.float32)
    x[:2] = torch.tensor([q.n_min, q.p_max], dtype=torch.float32)
    x *= step
    got = q.calibrate_step(x)
    assert got.item() == step
    q.set_step(got)
    assert torch.equal(q(x).detach(), x)


@CPU_PASS_ONLY
@pytest.mark.parametrize("level", [8, 16])
def test_signed_calibration_covers_the_negative_side(gen, level):
    """A signed quantizer's range is measured on both sides: when ``min / n_min`` exceeds
    ``max / p_max`` (the negative side dominates), the calibrated step covers the negative
    extreme. On data that is the integers ``n_min .. 1`` times a step, that step is lossless
    and every smaller candidate clamps ``n_min``."""
    q = Quantizer(level, True)
    step = 0.25
    x = torch.randint(q.n_min, 2, (60,), generator=gen).to(torch.float32)
    x[:2] = torch.tensor([q.n_min, 1.0])
    x *= step
    assert x.min() / q.n_min > x.max() / q.p_max, "the negative side must dominate"
    got = q.calibrate_step(x)
    assert got.item() == step
    q.set_step(got)
    assert torch.equal(q(x).detach(), x)

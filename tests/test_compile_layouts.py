"""torch.compile(fullgraph=True) with non-contiguous operands, for every op: compiled == eager.

Each op reads the strides it is given (or makes its input contiguous): a transposed, sliced
(offset, gaps) or expanded (stride 0) operand must give the same outputs compiled as eager.
Without the interpreter the ops are ``triton_op``s whose bodies Inductor compiles (on CPU:
the PyTorch paths); under the interpreter they are ``custom_op``s that Inductor calls. The op's
outputs are compared at the op's own contract: bit for bit where it is exact, as values (the
same float32 result up to a few ulps) for LayerNorm and softmax, whose PyTorch path Inductor
may recompile in another order.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_bits, st_bif_margin

import spikekernels
from spikekernels import reference

LAYOUTS = ["transposed", "sliced", "expanded"]


# The membrane after a float LayerNorm + neuron: T = 4 steps, each within 4 ulps of |Y| <= 8,
# divided by theta = 0.2.
MEMBRANE_ATOL = 4 * 4 * 8 * 2.0**-23 / 0.2


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` ``[T, A, B]`` (values kept) as a non-contiguous view of the same shape."""
    if layout == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        big = torch.zeros((x.shape[0], x.shape[1] + 2, x.shape[2] + 3), dtype=x.dtype)
        big[:, 1 : 1 + x.shape[1], 2 : 2 + x.shape[2]] = x
        return big[:, 1 : 1 + x.shape[1], 2 : 2 + x.shape[2]]
    # expanded: one row repeated over dim 1 with stride 0
    return x[:, :1].expand(x.shape)


def _spikes(gen, shape):
    return torch.randint(-1, 2, shape, generator=gen, dtype=torch.int8)


def _compare(got, want, exact: bool):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if exact:
            assert_same_bits(g, w, f"output {i}")
        else:
            torch.testing.assert_close(
                g, w, rtol=4 * 2.0**-24, atol=1e-6, msg=lambda m, i=i: f"output {i}: {m}"
            )


def _run(fn, *args, exact=True):
    torch._dynamo.reset()
    want = fn(*args)
    got = torch.compile(fn, fullgraph=True)(*args)
    _compare(got, want, exact)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_st_bif(gen, layout):
    x = _layout(torch.randn(4, 6, 5, generator=gen) * 0.7, layout)
    theta = torch.tensor(0.3)
    _run(lambda x: spikekernels.st_bif(x, theta, -8, 7), x)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("operand", ["a", "b"])
def test_spike_matmul(gen, layout, operand):
    a = _spikes(gen, (3, 5, 8))
    b = _spikes(gen, (3, 8, 6))
    if operand == "a":
        a = _layout(a, layout)
    else:
        b = _layout(b, layout)
    scale = torch.tensor([0.37])
    _run(lambda a, b: spikekernels.spike_matmul(a[:, None], b[:, None], scale), a, b)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.int8])
def test_spike_linear(gen, layout, wdtype):
    s = _layout(_spikes(gen, (3, 4, 16)), layout)
    w = torch.randn(9, 16, generator=gen)
    w_scale = None
    if wdtype == torch.int8:
        w, w_scale = (
            torch.randint(-127, 128, (9, 16), generator=gen, dtype=torch.int8),
            torch.rand(9, generator=gen) + 0.1,
        )
    theta, bias = torch.tensor(0.4), torch.randn(9, generator=gen)
    out = lambda s: (spikekernels.spike_linear(s, w, theta, bias, weight_scale=w_scale),)
    # Float weights: the same float32 sums in the same order (exact for int8 weights).
    _run(out, s, exact=wdtype == torch.int8)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_spike_layernorm(gen, layout):
    x = _layout(torch.randn(4, 5, 24, generator=gen), layout)
    w, b = torch.randn(24, generator=gen), torch.randn(24, generator=gen)
    _run(lambda x: spikekernels.spike_layernorm(x, w, b, 1e-6), x, exact=False)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_spike_layernorm_neuron(gen, layout):
    x = _layout(torch.randn(4, 5, 24, generator=gen), layout)
    w, b = torch.randn(24, generator=gen), torch.randn(24, generator=gen)
    theta = torch.tensor(0.2)
    out = lambda x: spikekernels.ops.spike_layernorm_neuron(x, w, b, 1e-6, theta, -8, 7)
    torch._dynamo.reset()
    want, got = out(x), torch.compile(out, fullgraph=True)(x)
    # the spikes and count bit for bit; the float state as values: the LayerNorm meets its
    # contract in any summation order (Inductor may compile its PyTorch body, and layouts
    # change the order), within a few ulps of |Y| per step, and the membrane sums T of them
    # divided by theta. The spikes hold only while no membrane comes that close to a decision
    # (v + u / theta against 1 and 0), which this data must show first.
    margin = st_bif_margin(reference.spike_layernorm(x.contiguous(), w, b, 1e-6)[0], theta, -8, 7)
    assert margin > 2 * MEMBRANE_ATOL, f"data too close to a decision: margin {margin:.3g}"
    _compare((got[0], got[4]), (want[0], want[4]), exact=True)
    _compare(got[1:3], want[1:3], exact=False)
    torch.testing.assert_close(got[3], want[3], rtol=0, atol=MEMBRANE_ATOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_spike_softmax(gen, layout):
    x = _layout(torch.randn(4, 5, 23, generator=gen) * 3, layout)
    _run(lambda x: spikekernels.spike_softmax(x), x, exact=False)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("split", [False, True])
def test_spike_linear_neuron(gen, layout, split):
    s = _layout(_spikes(gen, (3, 4, 16)), layout)
    w = torch.randint(-20, 21, (9, 16), generator=gen).to(torch.float32) / 256
    w = spikekernels.ops.split_weight_bf16x3(w) if split else w
    theta_in, bias = torch.tensor(0.4), torch.randn(9, generator=gen)
    theta = torch.rand(9, generator=gen) * 0.05 + 0.02
    out = lambda s: spikekernels.ops.spike_linear_neuron(s, w, theta_in, theta, -8, 7, bias)
    # dyadic weights: every sum exact, so the same bits in any order
    _run(out, s)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("operand", ["d", "spikes"])
def test_exact_residual_add(gen, layout, operand):
    d = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    s = _spikes(gen, (3, 5, 7))
    if operand == "d":
        d = _layout(d, layout)
    else:
        s = _layout(s, layout)
    theta, count = torch.tensor([0.37]), _spikes(gen, (5, 7))
    _run(lambda d, s: (spikekernels.ops.exact_residual_add(d, s, theta, count),), d, s)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("operand", ["d", "branch_spikes"])
def test_exact_layernorm_neuron_pending_branch(gen, layout, operand):
    d = torch.randn(3, 5, 24, generator=gen, dtype=torch.float64)
    s = _spikes(gen, (3, 5, 24))
    if operand == "d":
        d = _layout(d, layout)
    else:
        s = _layout(s, layout)
    c = torch.randn(5, 24, generator=gen, dtype=torch.float64)
    w, theta, count = torch.rand(24, generator=gen) + 0.5, torch.tensor(0.2), _spikes(gen, (5, 24))

    def out(d, s):
        return spikekernels.ops.exact_layernorm_neuron(
            d, c, w, None, 1e-6, theta, -8, 7,
            branch_spikes=s, branch_threshold=torch.tensor([0.37]), branch_count=count,
            residual_out=True,
        )  # fmt: skip

    _run(out, d, s)

"""Exact mode (SPEC.md §9): integer weights, the exact QANN forward, and its SNN bit for bit.

After silence every count equals the QANN's integer and the logits are bitwise equal: the
paper's ViT-S (depth 12, 224 px); at ViT-S width (384, 6 heads) and depth 4, chunk sizes 1, 3
and 8, levels 8, 16 and 32, ``global_pool``; and with the reference backend forced.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_PASS_ONLY, DEVICES, INTERPRETED
from torch import nn

from spikekernels import convert, parity
from spikekernels.exact_math import int_weights, layer_norm_rows, softmax_rows, tree_sum
from spikekernels.models import (
    QuantViT,
    calibrate,
    quant_vit_small,
    quantize_weights,
    quantizers,
)
from spikekernels.nn import ExactLinear, QuantLinear, TargetNeuron
from spikekernels.ops import exact_linear, st_bif
from spikekernels.ops._dispatch import force_backend

# Width 384 through the Triton interpreter takes minutes per run: the CPU pass of `make test`
# runs those tests (CPU_PASS_ONLY); the interpreter pass runs the exact SNN's kernels on the
# tiny model below.
TINY = dict(img_size=8, patch_size=4, in_chans=3, num_classes=5, embed_dim=16, depth=2,
            num_heads=2)  # fmt: skip


def make_exact(gen, *, batch_calib=4, **config) -> QuantViT:
    """Random weights (unit-gain linears so activity reaches every layer), W8, calibrated."""
    qann = QuantViT(**config, weight_bits=8)
    with torch.no_grad():
        for m in qann.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / fan_in**0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
        for p in (qann.cls_token, qann.pos_embed):
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    shape = (batch_calib, config["in_chans"], config["img_size"], config["img_size"])
    return calibrate(qann, torch.randn(shape, generator=gen))


def images(gen, qann: QuantViT, batch: int) -> torch.Tensor:
    return torch.randn(batch, qann.in_chans, qann.img_size, qann.img_size, generator=gen)


def assert_bitwise(qann, snn, x, chunk=8) -> int:
    """After silence: 100% of counts equal the QANN's integers, logits bitwise equal."""
    report = parity(qann, snn, x, max_steps=96, chunk=chunk)
    assert report.steps < 96, f"not silent after 96 steps (chunk {chunk})"
    active = sum(int(site.neuron.count.ne(0).sum()) for site in snn.sites)
    total = sum(site.neuron.count.numel() for site in snn.sites)
    assert active > total // 4, f"a mostly silent network proves little ({active} of {total})"
    assert report.agreement == 1.0 and report.local_agreement == 1.0, str(report)
    with torch.no_grad():
        assert torch.equal(report.qann_logits, qann(x)), "parity ran the QANN's own forward"
    assert torch.equal(report.snn_logits, report.qann_logits), (
        f"chunk {chunk}: logits differ by {report.max_logit_difference:.3g}"
    )
    return report.steps


# --- integer weights and the exact QANN ----------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_int_weights_follow_spec(gen, device):
    """The SPEC.md §9.1 weights, the same bits on every device: ``ws`` is ``max|w| / 127``
    correctly rounded (PyTorch's CUDA kernel divides by a host number as a product with its
    reciprocal, two roundings), so a model converted on a GPU is the one converted on a CPU."""
    w = torch.randn(7, 33, generator=gen)
    w[3] = 0.0  # an all-zero row gets scale 1
    w_int, ws = int_weights(w.to(device))
    w_int, ws = w_int.cpu(), ws.cpu()
    assert w_int.dtype == torch.int8 and ws.dtype == torch.float32
    expected_ws = (w.abs().amax(dim=1).double() / 127).float()  # one rounding
    expected_ws[3] = 1.0
    assert torch.equal(ws, expected_ws)
    expected = torch.clamp(torch.round(w / expected_ws[:, None]), -127, 127)
    assert torch.equal(w_int.to(torch.float32), expected)
    assert int(w_int.abs().max()) == 127 and not w_int[3].any()
    # hand-worked ties (max |w| = 127, so ws = 1 and w / ws is exact): half to even
    ties = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]])
    w_int, ws = int_weights(ties)
    assert ws.tolist() == [1.0]
    assert w_int.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126]]


def test_quantize_weights_in_place_and_state_dict_round_trip(gen):
    qann = QuantViT(**TINY, level=8)
    keys = list(qann.state_dict())
    assert qann.weight_bits is None
    qkv = qann.blocks[0].attn.qkv.weight
    assert quantize_weights(qann) is qann
    assert qann.weight_bits == 8 and qann.config["weight_bits"] == 8
    assert isinstance(qann.blocks[1].mlp.fc2[0], QuantLinear) and isinstance(qann.head, QuantLinear)
    assert qann.blocks[0].attn.qkv.weight is qkv, "parameters shared, not copied"
    assert list(qann.state_dict()) == keys, "the state_dict keys stay the official ones"
    calibrate(qann, torch.randn(4, 3, 8, 8, generator=gen))
    again = QuantViT(**TINY, level=8, weight_bits=8)
    again.load_state_dict(qann.state_dict())
    x = torch.randn(3, 3, 8, 8, generator=gen)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), qann.eval()(x))


def test_calibrate_sets_the_steps_of_an_integer_weight_qann(gen):
    """Its exact forward never calls the quantizers, so calibration runs the float one."""
    qann = make_exact(gen, **TINY, level=16)
    steps = torch.stack([q.s.detach() for q in quantizers(qann)])
    assert not torch.any(steps == 1.0), "a quantizer kept its initial step"
    assert len(set(steps.tolist())) > len(steps) // 2


def test_exact_qann_trains_by_qat(gen):
    """Training mode: the float forward with straight-through weight rounding (gradients
    reach the float weights and the steps); evaluation: the exact integer forward, which the
    float fake-quantized forward approximates."""
    qann = make_exact(gen, **TINY, level=16)
    x = torch.randn(6, 3, 8, 8, generator=gen)
    qann.train()
    loss = qann(x).square().sum()
    loss.backward()
    assert qann.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert qann.blocks[0].mlp.act[0].s.grad is not None
    qann.eval()
    with torch.no_grad():
        exact = qann(x)
        fake = qann.head(qann.forward_features(x))
    torch.testing.assert_close(exact, fake, rtol=0.05, atol=0.05)


def test_bad_weights_are_rejected(gen):
    qann = QuantViT(**TINY, level=8)
    with pytest.raises(ValueError, match="quantize_weights"):
        convert(qann, exact=True)
    with pytest.raises(ValueError, match="bits must be 8"):
        quantize_weights(qann, bits=16)
    with pytest.raises(TypeError, match="QuantViT"):
        quantize_weights(nn.Linear(2, 2))
    quantize_weights(qann)
    qann.blocks[1].mlp.fc1 = nn.Linear(16, 64)  # one float linear among integer ones
    with pytest.raises(ValueError, match=r"mixes integer-weight.*`blocks\.1\.mlp\.fc1`"):
        convert(qann)
    with pytest.raises(ValueError, match=r"mixes integer-weight.*blocks\.1\.mlp\.fc1"):
        qann.weight_bits  # noqa: B018
    with pytest.raises(TypeError, match="exact must be"):
        convert(QuantViT(**TINY, level=8), exact="yes")


def test_mismatched_weight_dtypes_are_rejected():
    """Exact mode's layers and op take int8 weights and float32 scales, nothing else."""
    w = torch.randint(-127, 128, (6, 4), dtype=torch.int8)
    ws, theta = torch.ones(6), torch.tensor(0.5)
    with pytest.raises(TypeError, match="weight must be int8"):
        ExactLinear(w.float(), ws, None, theta)
    with pytest.raises(ValueError, match=r"weight_scale must have shape \(6,\)"):
        ExactLinear(w, torch.ones(5), None, theta)
    s = torch.zeros(2, 3, 4, dtype=torch.int8)
    with pytest.raises(TypeError, match="weight"):
        exact_linear(s, w.to(torch.int16), ws, None, theta, theta, -8, 7)
    with pytest.raises(TypeError, match="weight_scale"):
        exact_linear(s, w, ws.to(torch.int32), None, theta, theta, -8, 7)


def test_count_overflow_above_int8_is_rejected():
    """Exact mode keeps counts in int8: a level above 256 (signed) or 128 (unsigned) cannot
    be converted; the levels at the edge can."""
    with pytest.raises(ValueError, match="int8"):
        TargetNeuron(0.5, 512, True)
    with pytest.raises(ValueError, match="int8"):
        TargetNeuron(0.5, 256, False)  # [0, 255]
    TargetNeuron(0.5, 256, True)  # [-128, 127] fits
    TargetNeuron(0.5, 128, False)  # [0, 127] fits


def test_count_dtype_at_the_int8_edges():
    """The narrowest integer that holds the bounds: int8 up to [-128, 127] exactly (every
    backend's fresh count then has that dtype), int16 one past either end."""
    from spikekernels.levels import count_dtype

    assert count_dtype(-128, 127) == torch.int8
    assert count_dtype(-129, 127) == count_dtype(0, 128) == torch.int16
    x = torch.randn(2, 3, 5)
    for backend in ("cpp", "torch", "reference"):
        with force_backend(backend):
            assert st_bif(x, torch.tensor(0.5), -128, 127)[2].dtype == torch.int8


def test_exact_linear_takes_k_up_to_its_limit():
    """``ExactLinear`` refuses K past ``MAX_K`` and takes ``MAX_K`` itself."""
    from spikekernels.nn import ExactLinear
    from spikekernels.ops.exact_linear import MAX_K

    for k, fits in ((MAX_K, True), (MAX_K + 1, False)):
        args = (torch.zeros(2, k, dtype=torch.int8), torch.ones(2), None, torch.tensor(0.5))
        if fits:
            assert ExactLinear(*args).in_features == MAX_K
        else:
            with pytest.raises(ValueError, match=f"K={k} input features"):
                ExactLinear(*args)


def test_softmax_rows_within_the_float_tolerance(gen):
    """exact_math.softmax_rows, the one softmax of the oracle and the kernels (SPEC.md §9.2),
    on its own against float64: within 2x the error of torch's float32 softmax (floor 2^-24,
    about 2 ulp of these probabilities, so the bound does not depend on this CPU's exp)."""
    z = 4 * torch.randn(64, 197, generator=gen)
    exact = torch.softmax(z.double(), dim=-1)
    ours = (softmax_rows(z).double() - exact).abs().max().item()
    torchs = (torch.softmax(z, dim=-1).double() - exact).abs().max().item()
    assert ours <= 2 * max(torchs, 2**-24), (ours, torchs)


@CPU_PASS_ONLY
def test_softmax_rows_masks_minus_inf():
    """``-inf`` scores are masked out: their probability is exactly 0, a row with one finite
    entry gives exactly 1 there, and a fully ``-inf`` row gives zeros (documented), never
    NaN (its max, -inf, minus itself would be)."""
    inf = float("inf")
    z = torch.tensor([[-inf, -inf, -inf, -inf], [-inf, 3.0, -inf, -inf], [0.0, 1.0, -inf, 2.0]])
    got = softmax_rows(z)
    assert not got.isnan().any()
    assert torch.equal(got[:2], torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]))
    assert got[2, 2].item() == 0.0
    want = torch.softmax(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), dim=0)
    torch.testing.assert_close(got[2, [0, 1, 3]].double(), want, rtol=0, atol=2**-22)


def test_int_matmul_refuses_sums_past_int32(gen):
    """Int8 by int8 sums fit int32 up to INT32_MAX_TERMS terms; one more is refused by name,
    not saturated (the exact QANN's linears call it with their K)."""
    from spikekernels.exact_math import INT32_MAX_TERMS, int_matmul

    k = INT32_MAX_TERMS
    a = torch.full((1, k), -128, dtype=torch.int8)
    b = torch.full((k, 1), -128, dtype=torch.int8)
    assert int_matmul(a, b).item() == 128 * 128 * k
    with pytest.raises(ValueError, match="int_matmul sums K = 131072"):
        int_matmul(torch.ones(1, k + 1, dtype=torch.int8), torch.ones(k + 1, 1, dtype=torch.int8))


def test_row_functions_do_not_depend_on_batch_or_threads(gen):
    """exact_math's row functions give a row the same bits alone, in a large batch, and with
    one thread or several (torch's own softmax/LayerNorm need not: vectorised tails and
    reductions split over threads depend on the tensor around the row)."""
    z = 4 * torch.randn(64, 6, 197, generator=gen)
    h = 3 * torch.randn(64, 197, 384, generator=gen) + 1
    w, b = torch.randn(384, generator=gen), torch.randn(384, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_probs, one_norm = softmax_rows(z[5:6]), layer_norm_rows(h[5:6], w, b, 1e-6)
        one_sum = tree_sum(z[7:8], dim=1)[0]
        # several threads even where pytest-xdist gave this worker one (conftest)
        torch.set_num_threads(max(2, threads))
        probs, norm, sums = softmax_rows(z), layer_norm_rows(h, w, b, 1e-6), tree_sum(z, dim=1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(probs[5:6], one_probs)
    assert torch.equal(norm[5:6], one_norm)
    assert torch.equal(sums[7], one_sum)


def test_tree_sum_adds_neighbours_first():
    """tree_sum's order is part of exact mode's row functions (the kernels reproduce it): pad
    to a power of two, then ``x[2i] + x[2i + 1]`` per level. Rows where another order rounds
    differently: ``(2^24 + 1) + (1 - 2^24)`` is 1 in float32, while upper-half-plus-lower-half,
    ``(2^24 - 2^24) + (1 + 1)``, is 2."""
    big = 2.0**24
    row = torch.tensor([big, 1.0, -big, 1.0])
    assert tree_sum(row).item() == 1.0
    assert (row[:2] + row[2:]).sum().item() == 2.0  # the other order, for contrast
    # padded with zeros to 8: the same as 4, then + 0 twice; and along another dim
    five = torch.tensor([big, 1.0, -big, 1.0, 3.0])
    assert tree_sum(five).item() == 4.0
    assert torch.equal(tree_sum(five[:, None].expand(5, 3), dim=0), torch.full((1, 3), 4.0))


# --- the exact SNN -------------------------------------------------------------------------


@pytest.mark.parametrize("global_pool", [False, True])
def test_exact_snn_tiny_bitwise_every_chunk(gen, global_pool):
    """Through the default backend: in the interpreter pass, the Triton kernels, on
    chunkings that cross chunk boundaries (conftest.CPU_PASS_ONLY); the pooled readout too
    (it reads the last block's stream with its row flags: rows that did not move are not
    written)."""
    qann = make_exact(gen, **TINY, level=16, global_pool=global_pool)
    snn = convert(qann)
    assert snn.exact
    x = images(gen, qann, 3)
    if global_pool:
        chunks = (3,) if INTERPRETED else (1, 3)
    else:
        chunks = (3, (5, 2)) if INTERPRETED else (1, 3, 8, (5, 2))
    steps = {chunk: assert_bitwise(qann, snn, x, chunk) for chunk in chunks}
    assert len(set(steps.values())) == 1, f"the settle step depends on the chunk: {steps}"


def test_exact_state_is_each_neurons_count_once(gen):
    """Exact mode's state between chunks is one int8 count per neuron, no copies of it (the
    products and the operands' running counts are formed per call): per block and image,
    the counts of norm1, qkv, context, proj, norm2, fc1, fc2 (12 C per token) and of the
    attention neuron (H N^2). Besides: each linear's settled rows (one int32 flag per token:
    qkv, proj, fc1, fc2), the attention's and the context's settled query rows (one int32
    flag per head and token each) and the head's int32 accumulator of the logits."""
    qann = make_exact(gen, **{**TINY, "depth": 3}, level=16)
    snn = convert(qann)
    batch = 2
    snn(images(gen, qann, batch), max_steps=4, chunk=2)
    entries = snn.state_tensors()
    counts = [(m, t) for m, name, t in entries if name == "count"]
    settled = [(type(m).__name__, tuple(t.shape), t.dtype) for m, name, t in entries
               if name == "row_settled"]  # fmt: skip
    others = [(type(m).__name__, name, t.dtype) for m, name, t in entries
              if name not in ("count", "row_settled")]  # fmt: skip
    assert all(t.dtype == torch.int8 for _, t in counts)
    assert others == [("ExactLinear", "acc", torch.int32)], others
    n = (TINY["img_size"] // TINY["patch_size"]) ** 2 + 1
    h = TINY["num_heads"]
    linear = ("ExactLinearNeuron", (batch, n), torch.int32)
    heads = [(name, (batch, h, n), torch.int32) for name in ("ExactAttentionProbs", "ExactContext")]
    assert settled == [linear, *heads, linear, linear, linear] * 3, settled
    c = TINY["embed_dim"]
    per_block = batch * (n * 12 * c + h * n * n)
    in_blocks = {id(m) for block in snn.blocks for m in block.modules()}
    block_bytes = sum(t.numel() for m, t in counts if id(m) in in_blocks)
    assert block_bytes == 3 * per_block


def test_exact_blocks_write_the_residual_stream_once(gen, monkeypatch):
    """Each block writes ``D`` once, at ``norm1``, which adds the two branches pending since
    (the previous block's attention and MLP; the patch embedding's in block 0); ``norm2`` and
    the readout add theirs in registers and write nothing. Bitwise all the same."""
    import spikekernels.nn.exact_layers as exact_layers

    calls = []
    op = exact_layers.exact_layernorm_neuron

    def recording(*args, **kwargs):
        branches = sum(kwargs[f"{b}_spikes"] is not None for b in ("branch", "branch2"))
        calls.append((branches, kwargs["residual_out"], args[0] is None))
        return op(*args, **kwargs)

    monkeypatch.setattr(exact_layers, "exact_layernorm_neuron", recording)
    qann = make_exact(gen, **{**TINY, "depth": 3}, level=16)
    snn = convert(qann)
    steps = assert_bitwise(qann, snn, images(gen, qann, 3), chunk=4)
    block0 = [(1, True, True), (1, False, False)]
    per_chunk = block0 + [(2, True, False), (1, False, False)] * 2 + [(2, False, False)]
    chunks = len(calls) // len(per_chunk)
    assert chunks >= -(-steps // 4) and calls == per_chunk * chunks, calls[: len(per_chunk)]


def test_exact_snn_reference_backend(gen):
    qann = make_exact(gen, **TINY, level=8)
    snn = convert(qann)
    x = images(gen, qann, 2)
    fast, fast_steps = snn(x)
    ref, ref_steps = snn(x, reference=True)
    assert ref_steps == fast_steps and torch.equal(ref, fast)
    with force_backend("reference"):
        assert_bitwise(qann, snn, x, chunk=1)


def test_exact_snn_trace_and_silence(gen):
    qann = make_exact(gen, **TINY, level=16)
    snn = convert(qann)
    x = torch.cat((images(gen, qann, 2), torch.zeros(1, 3, 8, 8)))
    logits, steps, trace = snn(x, return_trace=True)
    assert trace.logits.shape == (steps, 3, 5)
    assert torch.equal(trace.logits[-1], logits)
    for i, s in enumerate(trace.sample_steps.tolist()):
        # Settled: the logits are the head's current value and stop moving.
        assert torch.equal(trace.logits[s - 1 :, i], logits[i].expand(steps - s + 1, -1))


@CPU_PASS_ONLY
def test_vit_s_width_depth4_224px_bitwise(gen):
    """ViT-S width and resolution (384, 6 heads, 197 tokens) at depth 4, level 16."""
    qann = make_exact(gen, **{**_vit_s(), "depth": 4}, level=16, batch_calib=2)
    assert_bitwise(qann, convert(qann), images(gen, qann, 2), chunk=8)


@CPU_PASS_ONLY
@pytest.mark.parametrize(
    "level, global_pool, chunks",
    [(16, False, (1, 3, 8)), (8, False, (8,)), (32, False, (3,)), (16, True, (8,))],
    ids=["level16-chunks-1-3-8", "level8", "level32-chunk3", "global-pool"],
)
def test_vit_s_width_depth4_bitwise(gen, level, global_pool, chunks):
    """ViT-S width at depth 4 on 64 px images (17 tokens): levels, pooling, chunk sizes."""
    config = {**_vit_s(), "depth": 4, "img_size": 64, "global_pool": global_pool}
    qann = make_exact(gen, **config, level=level)
    snn = convert(qann)
    x = images(gen, qann, 2)
    steps = {chunk: assert_bitwise(qann, snn, x, chunk) for chunk in chunks}
    assert len(set(steps.values())) == 1, f"the settle step depends on the chunk: {steps}"


@CPU_PASS_ONLY
def test_float_mode_parity_is_reported_honestly(gen):
    """The same network with float weights: parity reports its agreement (float rounding
    puts some counts on the other side of a tie, SPEC.md §8) and finds no bug."""
    qann = make_exact(gen, **{**_vit_s(), "depth": 4, "img_size": 64}, level=16)
    floats = QuantViT(**{**qann.config, "weight_bits": None})
    floats.load_state_dict(qann.state_dict())
    report = parity(floats.eval(), convert(floats), images(gen, qann, 2))
    assert report.mode == "float" and report.unexplained == 0, str(report)
    assert 0.9 < report.agreement <= 1.0


@CPU_PASS_ONLY  # parity's bookkeeping, whatever the backend
@pytest.mark.parametrize("exact", [True, False])
def test_parity_finds_a_broken_neuron(gen, exact):
    """One neuron's threshold 3% off: parity reports local mismatches no upstream count
    explains, and that neuron's site as the first divergence (an oracle that compared the
    SNN's counts with themselves reported 100%)."""
    qann = make_exact(gen, **TINY)
    snn = convert(qann, exact=exact)
    with torch.no_grad():
        snn.blocks[0].mlp.fc1.threshold.mul_(1.03)
    report = parity(qann, snn, images(gen, qann, 3), max_steps=96)
    assert report.unexplained > 0 and report.local_agreement < 1.0, str(report)
    assert report.first_divergence == "blocks.0.mlp.act.0", str(report)


def test_parity_of_float_mode_of_an_integer_qann(gen):
    """convert(qann, exact=False) on integer weights runs float mode on the dequantized
    weights; parity compares it with what the QANN computes, its exact integer forward (whose
    quantizers no module hook sees): it reports, and finds no bug."""
    qann = make_exact(gen, **TINY)
    x = images(gen, qann, 3)
    report = parity(qann, convert(qann, exact=False), x, max_steps=96)
    assert report.mode == "float" and report.unexplained == 0, str(report)
    with torch.no_grad():
        assert torch.equal(report.qann_logits, qann(x))
    assert report.agreement > 0.9


@CPU_PASS_ONLY
def test_vit_s_full_depth_bitwise(gen):
    """The paper's ViT-S: depth 12, 224 px, level 16 (about 40 s on 2 cores)."""
    qann = make_exact(gen, **_vit_s(), level=16, batch_calib=2)
    assert_bitwise(qann, convert(qann), images(gen, qann, 2), chunk=8)


@pytest.mark.cuda
def test_exact_bitwise_on_cuda(gen, monkeypatch):
    """On the GPU too (TF32 off), through the Triton kernels and the CUDA extension."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    qann = make_exact(gen, **{**_vit_s(), "depth": 4}, level=16, batch_calib=2).cuda()
    x = images(gen, qann, 4).cuda()
    for chunk in (3, 8):
        assert_bitwise(qann, convert(qann), x, chunk)


def _vit_s() -> dict:
    config = dict(quant_vit_small().config)
    config.pop("level"), config.pop("weight_bits")
    return config

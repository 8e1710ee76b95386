"""convert() and the SNN runner: a tiny QuantViT run until silent equals the QANN."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import CPU_PASS_ONLY, INTERPRETED
from torch import nn

from spikekernels import convert, parity
from spikekernels.models import QuantViT, calibrate, quantize_weights, quantizers
from spikekernels.models.spiking_vit import SpikingViT, _EagerChunks
from spikekernels.nn import Quantizer
from spikekernels.ops._dispatch import force_backend

CONFIG = dict(img_size=8, patch_size=4, in_chans=3, num_classes=5, embed_dim=16, depth=2,
              num_heads=2, level=8)  # fmt: skip


def make_qann(gen, **overrides) -> QuantViT:
    """Random weights (unit-gain linears, so that activity reaches every layer), calibrated."""
    qann = QuantViT(**{**CONFIG, **overrides})
    with torch.no_grad():
        for m in qann.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / fan_in**0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
        for p in (qann.cls_token, qann.pos_embed):
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return calibrate(qann, torch.randn(16, 3, 8, 8, generator=gen))


@pytest.fixture
def qann(gen) -> QuantViT:
    return make_qann(gen)


@pytest.fixture
def images(gen) -> torch.Tensor:
    return torch.randn(3, 3, 8, 8, generator=gen)


def counts(snn: SpikingViT) -> list[torch.Tensor]:
    """Every neuron site's count after a run, in the QANN's layout."""
    return [site.to_qann(site.neuron.count).clone() for site in snn.sites]


def agree(qann: QuantViT, snn: SpikingViT, images: torch.Tensor):
    """Run both (``spikekernels.parity``) and assert every count equals its quantizer's
    integer, or sits on a rounding tie; returns ``(qann logits, snn logits, report)``."""
    report = parity(qann, snn, images)
    assert report.unexplained == 0, str(report)
    assert len(report.rows) == len(list(quantizers(qann))), "every quantizer has a neuron"
    with torch.no_grad():
        expected = qann(images)
    logits, _ = snn(images)
    return expected, logits, report


def test_snn_equals_qann(qann, images):
    snn = convert(qann)
    assert not snn.exact, "float weights: the float SNN"
    _, steps = snn(images, max_steps=64, chunk=8)
    assert 1 <= steps < 64, f"did not fall silent in 64 steps (steps={steps})"
    expected, logits, report = agree(qann, snn, images)
    # Float mode is equal up to rounding (SPEC.md §8); at this size no count sits on a tie.
    assert report.agreement == 1.0, str(report)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_global_pool_variant(gen, images):
    qann = make_qann(gen, global_pool=True, depth=1)
    snn = convert(qann)
    _, steps = snn(images)
    assert steps < 64
    expected, logits, report = agree(qann, snn, images)
    assert report.agreement == 1.0, str(report)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpp", None])
def test_chunk_sizes_identical(qann, images, backend):
    """Chunk 1, 3, 8 and a schedule (5, 2): the same steps, counts and logits, bit for bit
    (float mode: the CPU path's spike linears multiply a step per call, since a BLAS may
    order its sums by the call's shape). ``cpp``: the CPU runtime path; None: the default
    (the Triton kernels through the interpreter in the second pass of ``make test``)."""
    snn = convert(qann)
    # the interpreter: two chunkings across chunk boundaries (conftest.CPU_PASS_ONLY)
    chunks = (3, (5, 2)) if INTERPRETED and backend is None else (1, 3, (5, 2))
    with force_backend(backend):
        base, base_steps, base_trace = snn(images, chunk=8, return_trace=True)
        base_counts = counts(snn)
        for chunk in chunks:
            sizes = []  # the steps of each call, as the readout sees them
            hook = snn.readout.register_forward_hook(
                lambda m, i, out, sizes=sizes: sizes.append(len(out))
            )
            try:
                logits, steps, trace = snn(images, chunk=chunk, return_trace=True)
            finally:
                hook.remove()
            schedule = (chunk,) if isinstance(chunk, int) else chunk
            want = [*schedule, *[schedule[-1]] * len(sizes)][: len(sizes)]
            assert sizes[:-1] == want[:-1] and 0 < sizes[-1] <= want[-1], (chunk, sizes)
            assert steps == base_steps, f"chunk {chunk}: {steps} steps, chunk 8: {base_steps}"
            assert torch.equal(trace.sample_steps, base_trace.sample_steps)
            for site, c, c8 in zip(snn.sites, counts(snn), base_counts, strict=True):
                assert torch.equal(c, c8), f"chunk {chunk}: counts of {site.name} differ"
            assert torch.equal(logits, base), f"chunk {chunk}: other logits"
            assert torch.equal(trace.logits, base_trace.logits), f"chunk {chunk}: other trace"


def test_reference_mode_equals_fast(qann, images):
    snn = convert(qann)
    fast, fast_steps = snn(images)
    fast_counts = counts(snn)
    ref, ref_steps = snn(images, reference=True)
    assert ref_steps == fast_steps
    torch.testing.assert_close(ref, fast, rtol=1e-6, atol=1e-6)
    for site, c, f in zip(snn.sites, counts(snn), fast_counts, strict=True):
        assert torch.equal(c, f), f"reference counts of {site.name} differ"


def test_non_finite_images_get_nan_logits(qann, images):
    """A NaN or inf image gives NaN logits (as the QANN does), not plausible numbers; the
    other samples of the batch are untouched."""
    snn = convert(qann)
    clean, _ = snn(images)
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    bad[2] = float("inf")
    logits, steps, trace = snn(bad, return_trace=True)
    assert torch.isnan(logits[0]).all() and torch.isnan(logits[2]).all()
    assert torch.isnan(trace.logits[:, 0]).all()
    torch.testing.assert_close(logits[1], clean[1], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert torch.isnan(qann(bad)[0]).all(), "the QANN gives NaN too"


def test_per_sample_silence(qann, images):
    snn = convert(qann)
    # A blank image and a strong one settle at different steps.
    batch = torch.cat((images[:2], torch.zeros(1, 3, 8, 8), 3 * images[2:]))
    logits, steps, trace = snn(batch, return_trace=True)
    assert steps == int(trace.sample_steps.max())
    assert trace.logits.shape == (steps, 4, 5)
    torch.testing.assert_close(trace.logits[-1], logits, rtol=0, atol=0)
    alone = [snn(batch[i : i + 1], return_trace=True) for i in range(4)]
    assert trace.sample_steps.tolist() == [s for _, s, _ in alone]
    for i, (l_i, s_i, _) in enumerate(alone):
        torch.testing.assert_close(logits[i], l_i[0], rtol=1e-6, atol=1e-6)
        # Settled: the cumulative logits do not move after the sample's own settle step.
        torch.testing.assert_close(
            trace.logits[s_i - 1 :, i], logits[i].expand(steps - s_i + 1, -1)
        )
    assert len(set(trace.sample_steps.tolist())) > 1, "the samples should settle at different steps"


@CPU_PASS_ONLY  # the runner's loop: no kernel path of its own
def test_max_steps_honoured(qann, images):
    snn = convert(qann)
    _, full_steps, trace = snn(images, return_trace=True)
    for max_steps, chunk in ((3, 8), (5, 2)):
        logits, steps = snn(images, max_steps=max_steps, chunk=chunk)
        assert steps == max_steps < full_steps
        # 1e-6: the interpreted spike linear rounds per chunk size (test_chunk_sizes_identical).
        torch.testing.assert_close(logits, trace.logits[max_steps - 1], rtol=1e-6, atol=1e-6)


def test_weights_shared_not_copied(qann):
    snn = convert(qann)
    assert snn.blocks[0].mlp.fc1.weight.data_ptr() == qann.blocks[0].mlp.fc1.weight.data_ptr()
    assert snn.blocks[1].attn.qkv.bias.data_ptr() == qann.blocks[1].attn.qkv.bias.data_ptr()
    assert snn.readout.norm.weight.data_ptr() == qann.norm[0].weight.data_ptr()
    assert snn.readout.head.weight.data_ptr() == qann.head.weight.data_ptr()
    assert snn.readout.norm.eps == qann.norm[0].eps == 1e-6


@CPU_PASS_ONLY  # module ownership, whatever the backend
@pytest.mark.parametrize("exact", [False, True])
def test_moving_one_model_leaves_the_other(gen, exact):
    """The SNN shares the QANN's weight tensors, never its modules or Parameters: moving
    either model (``meta`` standing in for a GPU) leaves the other whole where it was, and it
    still runs (a shared patch conv and class token moved with both)."""
    from test_exact import TINY, make_exact
    from test_exact import images as exact_images

    def model(seed):
        g = torch.Generator().manual_seed(seed)
        return make_exact(g, **TINY, level=16) if exact else make_qann(g)

    x = exact_images(gen, model(0), 2)
    for moved in ("snn", "qann"):
        qann = model(0)
        snn = convert(qann)
        want_qann, want_snn = qann(x), snn(x, 20, 4)
        (snn if moved == "snn" else qann).to("meta")
        kept = qann if moved == "snn" else snn
        where = {t.device.type for t in itertools.chain(kept.parameters(), kept.buffers())}
        assert where == {"cpu"}, f"moving the {moved} moved the other's tensors"
        if moved == "snn":
            assert torch.equal(qann(x), want_qann)
        else:
            got = snn(x, 20, 4)
            assert got[1] == want_snn[1] and torch.equal(got[0], want_snn[0])


@pytest.mark.parametrize("exact", [False, True])
def test_thresholds_copied_not_shared(gen, exact):
    """Thresholds, gains and scales are the quantizers' steps as of conversion (convert's
    promise): no SNN tensor shares storage with a quantizer step, so recalibrating the QANN
    afterwards leaves the SNN as it was (a shared step would move only part of it)."""
    qann = make_qann(gen, weight_bits=8 if exact else None)
    snn = convert(qann.eval())
    assert snn.exact == exact
    steps = {q.s.untyped_storage().data_ptr() for q in quantizers(qann)}
    shared = [
        name
        for name, t in [*snn.named_buffers(), *snn.named_parameters()]
        if t.untyped_storage().data_ptr() in steps
    ]
    assert not shared, f"SNN tensors share a quantizer step: {shared}"
    images = torch.randn(2, 3, 8, 8, generator=gen)
    before = snn(images, max_steps=64)[0]
    with torch.no_grad():
        for q in quantizers(qann):
            q.s.mul_(1.5)
    torch.testing.assert_close(snn(images, max_steps=64)[0], before, rtol=0, atol=0)


def test_snn_refuses_dtype_casts(qann, images):
    """The converted network keeps its dtypes (exact mode's float64 stream, the float32
    steps): a cast is refused before it changes anything; device moves work."""
    snn = convert(qann)
    before = snn(images, max_steps=64)[0]
    for cast in (lambda m: m.half(), lambda m: m.float(), lambda m: m.to(torch.bfloat16)):
        with pytest.raises(TypeError, match="SpikingViT keeps the dtypes"):
            cast(snn)
    snn.to("cpu")
    torch.testing.assert_close(snn(images, max_steps=64)[0], before, rtol=0, atol=0)


@CPU_PASS_ONLY  # the runner's autocast guard: no kernel path of its own
@pytest.mark.parametrize("weight_bits", [None, 8], ids=["float", "exact"])
def test_snn_runs_float32_under_autocast(gen, images, weight_bits):
    """The official evaluation loop calls the model under autocast: the SNN still computes
    in float32 (bf16 patches failed the float32 stream's checks), the same bits."""
    snn = convert(make_qann(gen, weight_bits=weight_bits))
    want = snn(images)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = snn(images)[0]
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("exact", [False, True])
def test_chunks_compile_to_one_graph(gen, images, exact):
    """``torch.compile(fullgraph=True)`` traces the runner's whole chunk (every layer's ops,
    the modules' state updates, the fired flags) without a graph break, first chunk and later
    ones, and runs the eager chunks' bits. Where the Triton kernels run (the interpreter's pass
    here, a GPU), float mode's linears once broke the graph at each layer (the check of their
    cached weight split), and on torch 2.11 every block did (``bool`` of a tuple)."""
    snn = convert(make_qann(gen, weight_bits=8 if exact else None))
    chunks = _EagerChunks(snn)
    with torch.no_grad():
        patches = snn.patch_embed.first_step(images)
        chunks.start(patches)
        want = [chunks.step(3), chunks.step(2)]
        torch._dynamo.reset()
        step = torch.compile(chunks.step, fullgraph=True, backend="eager")
        chunks.start(patches)
        got = [step(3), step(2)]
    for (logits, fired), (want_logits, want_fired) in zip(got, want, strict=True):
        assert torch.equal(logits, want_logits) and torch.equal(fired, want_fired)
    assert want[0][1].any(), "a silent chunk would check little"


@pytest.mark.parametrize("exact", [False, True])
def test_fanout_set_for_sop_counts(qann, exact):
    """Each neuron knows the synaptic operations one of its spikes causes downstream, in
    both modes (exact mode's attention neurons are ``probs`` and ``context``)."""
    if exact:
        quantize_weights(qann)
    snn = convert(qann)
    block, n = snn.blocks[0], qann.pos_embed.shape[1]
    attn = block.attn
    probs, context = (attn.probs, attn.context) if exact else (attn.attn_if, attn.after_attn_if)
    assert block.norm1.fanout == 3 * 16
    assert attn.qkv.fanout == n  # the fused q, k, v neuron: each spike meets N tokens
    assert probs.fanout == 8  # head_dim
    assert context.fanout == 16  # proj's inputs
    assert block.norm2.fanout == 64 and block.mlp.fc1.fanout == 16
    assert snn.readout.norm.fanout == 5
    assert attn.proj.fanout == block.mlp.fc2.fanout == 0, "they feed only the residual"


def test_bad_inputs(qann, images):
    snn = convert(qann)
    for kwargs, err, match in (
        (dict(max_steps=0), ValueError, "max_steps must be >= 1"),
        (dict(chunk=0), ValueError, "chunk must be >= 1"),
        (dict(chunk=2.0), TypeError, "chunk must be an int"),
        (dict(chunk=()), ValueError, "chunk must not be an empty sequence"),
        (dict(chunk=(4, 0)), ValueError, "chunk sizes must be >= 1"),
        (dict(chunk=(4, 2.0)), TypeError, "chunk sizes must be ints"),
        (dict(chunk="8"), TypeError, "chunk must be an int or a sequence"),
        (dict(max_steps=True), TypeError, "max_steps must be an int"),
    ):
        with pytest.raises(err, match=match):
            snn(images, **kwargs)
    with pytest.raises(ValueError, match=r"\[B, 3, 8, 8\]"):
        snn(torch.zeros(2, 3, 8, 7))
    with pytest.raises(ValueError, match=r"\[B, 3, 8, 8\]"):
        snn(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"with B >= 1"):
        snn(torch.zeros(0, 3, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        snn(torch.zeros(2, 3, 8, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="nn.Module"):
        convert("vit")


def test_unknown_model_names_the_module(gen):
    qann = make_qann(gen, depth=1)
    qann.blocks[0].mlp.act[1] = nn.GELU()
    with pytest.raises(TypeError, match=r"`blocks\.0\.mlp\.act\.1` \(GELU\)"):
        convert(qann)

    qann = make_qann(gen, depth=1)
    qann.blocks[0].extra = nn.BatchNorm1d(16)
    with pytest.raises(TypeError, match=r"`blocks\.0\.extra` \(BatchNorm1d\)"):
        convert(qann)

    qann = make_qann(gen, depth=1)
    qann.blocks[0].norm2 = qann.blocks[0].norm2[0]
    with pytest.raises(TypeError, match=r"blocks\.0\.norm2\.1"):
        convert(qann)

    qann = make_qann(gen, depth=1)
    qann.blocks[0].attn.quan_k.enabled = False
    with pytest.raises(ValueError, match=r"`blocks\.0\.attn\.quan_k`: a disabled quantizer"):
        convert(qann)

    qann = make_qann(gen, depth=1)
    qann.blocks[0].mlp.act[0].s = nn.Parameter(torch.ones(4))  # a per-channel step
    with pytest.raises(ValueError, match=r"`blocks\.0\.mlp\.act\.0` has a step s of shape"):
        convert(qann)

    qann = make_qann(gen, depth=1, weight_bits=8)
    qann.blocks[0].attn.quan_v = Quantizer(16, signed=True)
    with pytest.raises(ValueError, match=r"`blocks\.0\.attn\.quan_q`, `quan_k` and `quan_v`"):
        convert(qann)

    with pytest.raises(TypeError, match="no `patch_embed`"):
        convert(nn.Sequential(nn.Linear(2, 2)))


def _stray_gamma(qann):
    qann.blocks[0].gamma_1 = nn.Parameter(torch.ones(16))  # a layer scale, as BEiT / DeiT-III


_ZERO_STEP = r"`blocks\.0\.attn\.quan_k` step s must be positive.*got \[0\.0\]"


def _zero_step(qann):
    qann.blocks[0].attn.quan_k.s.data.zero_()  # a damaged checkpoint


def _unsigned_256(qann):
    qann.blocks[0].mlp.act[0].level = 256  # counts [0, 255]: past exact mode's int8


def _attention_level(name, level):
    def change(qann):  # float mode: the attention products' int8 counts
        getattr(qann.blocks[0].attn, name).level = level

    return change


# the first level past int8 counts: 256 unsigned (the probabilities), 512 signed
_ATTENTION_LEVELS = {"quan_q": 512, "quan_k": 512, "quan_v": 512, "attn_quan": 256,
                     "after_attn_quan": 512}  # fmt: skip


def _wide_residual_steps(qann):
    with torch.no_grad():  # one step feeding the stream 2^20 below the others
        qann.blocks[0].mlp.fc2[1].s.mul_(2.0**-20)


@pytest.mark.parametrize(
    ("weight_bits", "change", "error", "words"),
    [
        (None, _stray_gamma, TypeError, r"`blocks\.0\.gamma_1` \(a tensor of QuantBlock"),
        (8, _stray_gamma, TypeError, r"`blocks\.0\.gamma_1`"),
        (None, _zero_step, ValueError, _ZERO_STEP),
        (8, _zero_step, ValueError, _ZERO_STEP),
        (8, _unsigned_256, ValueError, r"`blocks\.0\.mlp\.act\.0` has level 256 \(unsigned\)"),
        *(
            (None, _attention_level(q, n), ValueError, rf"attn\.{q}` has level {n} .*spike")
            for q, n in _ATTENTION_LEVELS.items()
        ),
        (8, _wide_residual_steps, ValueError, r"residual stream span 1\.\d+e\+06x"),
        (None, lambda q: q.double(), ValueError, r"`cls_token` is torch\.float64: .*qann\.float"),
        (8, lambda q: q.half(), ValueError, r"is torch\.float16: .*qann\.float"),
        (None, lambda q: q.bfloat16(), ValueError, r"is torch\.bfloat16"),
    ],
    ids=["gamma float", "gamma exact", "step 0 float", "step 0 exact", "level 256 exact",
         "q level 512 float", "k level 512 float", "v level 512 float",
         "attention level 256 float", "context level 512 float", "residual span",
         "float64", "float16 exact", "bfloat16"],
)  # fmt: skip
def test_conversion_errors_name_the_tensor(gen, weight_bits, change, error, words):
    """What convert cannot take faithfully is refused, naming the tensor or the quantizer:
    a container's own tensor (it would have been ignored: the SNN computed the model without
    it), a step that is no threshold, a level exact mode's int8 counts cannot hold, a QANN that
    is not float32 (whose SNN failed on every call, and refuses casts)."""
    qann = make_qann(gen, depth=1, weight_bits=weight_bits)
    qann = change(qann) or qann
    with pytest.raises(error, match=words):
        convert(qann)


@pytest.mark.parametrize("change", ["scale", "is_softmax"])
def test_exact_mode_refuses_another_attention(gen, images, change):
    """Exact mode's scores are scaled by head_dim^-1/2 through softmax (SPEC.md §9.2): an
    attention with another scale or without softmax is refused, naming it, by the converter
    and by the QANN's exact forward alike (both used to run the standard attention)."""
    qann = make_qann(gen, weight_bits=8)
    setattr(qann.blocks[1].attn, change, 0.05 if change == "scale" else False)
    with pytest.raises(ValueError, match=rf"`blocks\.1\.attn`: exact mode .*{change[:5]}"):
        convert(qann)
    with torch.no_grad(), pytest.raises(ValueError, match=r"`blocks\.1\.attn`"):
        qann(images)
    if change == "scale":
        convert(qann, exact=False)  # float mode follows the module's own scale
    else:
        with pytest.raises(ValueError, match="softmax attention only"):
            convert(qann, exact=False)


def test_drop_path_is_ignored(gen, images):
    """timm's DropPath (the official scripts train with --drop_path 0.1) is the identity in
    evaluation: a block holding one converts, and the SNN is the same."""

    class DropPath(nn.Module):  # timm's name; timm is not a dependency
        def forward(self, x):
            return x

    qann = make_qann(gen, depth=1)
    want, _ = convert(qann)(images)
    qann.blocks[0].drop_path = DropPath()
    got, _ = convert(qann)(images)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.cuda
def test_snn_equals_qann_cuda(qann, images):
    """The Triton kernels and the CUDA softmax end to end: counts, logits, chunk invariance."""
    qann, images = qann.cuda(), images.cuda()
    snn = convert(qann)
    logits, steps, trace = snn(images, chunk=8, return_trace=True)
    assert steps < 64
    expected, _, report = agree(qann, snn, images)
    assert report.agreement == 1.0, str(report)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    logits3, steps3, trace3 = snn(images, chunk=3, return_trace=True)
    assert steps3 == steps and torch.equal(trace3.sample_steps, trace.sample_steps)
    torch.testing.assert_close(logits3, logits, rtol=1e-6, atol=1e-6)


@CPU_PASS_ONLY  # the modules' references, whatever the backend
@pytest.mark.parametrize("exact", [False, True])
def test_no_module_keeps_a_chunks_output(gen, exact):
    """After a call, no module holds its output of a chunk (a view of its last step kept the
    whole ``[T, B, ...]`` tensor alive: every layer's, for a model's memory of one chunk)."""
    import gc
    import weakref

    from test_exact import TINY, make_exact
    from test_exact import images as exact_images

    qann = make_exact(gen, **TINY, level=16) if exact else make_qann(gen)
    snn = convert(qann)
    outputs = []

    def keep(module, inputs, out):
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor):
                outputs.append((type(module).__name__, weakref.ref(t)))

    for module in snn.modules():
        if module is not snn:
            module.register_forward_hook(keep)
    x = exact_images(gen, qann, 2) if exact else torch.randn(2, 3, 8, 8, generator=gen)
    snn(x, 20, 4)  # the result dropped at once
    gc.collect()
    assert len(outputs) > 50
    assert not sorted({name for name, ref in outputs if ref() is not None})


@CPU_PASS_ONLY  # pickling, whatever the backend
@pytest.mark.parametrize("exact", [False, True])
def test_snn_pickles(gen, exact):
    """``torch.save(snn)`` and back: the same logits and the same parity layouts (the sites'
    ``to_qann`` were lambdas, which pickle refused)."""
    import io

    from test_exact import TINY, make_exact
    from test_exact import images as exact_images

    qann = make_exact(gen, **TINY, level=16) if exact else make_qann(gen)
    snn = convert(qann)
    x = exact_images(gen, qann, 2) if exact else torch.randn(2, 3, 8, 8, generator=gen)
    buffer = io.BytesIO()
    torch.save(snn, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    want, got = snn(x, 20, 4), loaded(x, 20, 4)
    assert got[1] == want[1] and torch.equal(got[0], want[0])
    for mine, theirs in zip(snn.sites, loaded.sites, strict=True):
        count = mine.neuron.count
        assert torch.equal(theirs.to_qann(theirs.neuron.count), mine.to_qann(count))


@pytest.mark.parametrize(("depth", "refused"), [(31, False), (33, True)])
def test_residual_sum_must_fit_float64(gen, depth, refused):
    """Exact mode's float64 residual sum is exact while its terms fit 53 bits: with steps
    spanning 2^16 (the span rule's limit) and level-256 counts, 63 terms (depth 31) do and 67
    (depth 33) need not, so that model is refused by name (the span rule alone let it by)."""
    qann = make_qann(gen, depth=depth, weight_bits=8)
    feeds = [qann.patch_embed.proj[1]]
    feeds += [q for b in qann.blocks for q in (b.attn.quan_proj, b.mlp.fc2[1])]
    with torch.no_grad():
        for i, q in enumerate(feeds):
            q.level = 256
            q.s.fill_(2.0**-16 if i == 1 else 1.0)
    if refused:
        with pytest.raises(ValueError, match=r"67 quantizers feed the residual stream"):
            convert(qann)
    else:
        assert convert(qann).exact

"""The evaluation tool (spikekernels.evaluate): SOP counting by hand, end to end on digits and
on an ImageFolder, torchrun on gloo against one process, checkpoints, and every bad input.

The tool is not a kernel: its runs use the CPU runtime path (``force_backend("cpp")`` here,
``TRITON_INTERPRET=0`` for subprocesses), so the interpreter pass of ``make test`` would only
repeat them: they run in the CPU pass (and on a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CPU_PASS_ONLY, DEVICES
from torch import nn

import spikekernels
from spikekernels.evaluate import sops
from spikekernels.evaluate.__main__ import main
from spikekernels.evaluate.data import digits_split
from spikekernels.evaluate.model import load_qann
from spikekernels.models import (
    QuantViT,
    calibrate,
    float_to_quant_state_dict,
    load_checkpoint,
    load_model,
    quant_vit_tiny,
    quantize_weights,
    save_checkpoint,
)
from spikekernels.nn import STBIF, Quantizer, SpikeLayerNorm, SpikeSoftmax
from spikekernels.ops._dispatch import force_backend

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(level=8, depth=1, patch_size=4, embed_dim=16, num_heads=2)
pytestmark = CPU_PASS_ONLY

RUN = dict(max_steps=24, chunk=8, batch_size=16, progress=False)
# The QANN's MACs per image of TINY on 8x8 digits, by hand: 4x4 patches, N = 5 tokens,
# D = 16, hidden 64, 10 classes.
TINY_MACS = {
    "patch_embed.proj.0": 4 * 16 * 16,
    "blocks.0.attn.qkv": 5 * 48 * 16,
    "blocks.0.attn.proj": 5 * 16 * 16,
    "blocks.0.attn.scores": 5 * 5 * 16,
    "blocks.0.attn.context": 5 * 5 * 16,
    "blocks.0.mlp.fc1": 5 * 64 * 16,
    "blocks.0.mlp.fc2.0": 5 * 16 * 64,
    "head": 10 * 16,
}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def cpu_runtime_path():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with force_backend("cpp"):
        yield
    torch.set_num_threads(threads)


def _env() -> dict[str, str]:
    return {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spikekernels.evaluate", *args],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny QANN trained for a few epochs on digits, saved by save_checkpoint."""
    torch.manual_seed(0)
    x, y, _, _ = digits_split()
    model = quant_vit_tiny(**TINY).quantize(False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(4):
        for i in range(0, len(y), 64):
            loss = nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    calibrate(model, x[:256])
    return Path(save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.pth"))


# --- SOPs by hand ---------------------------------------------------------------------------


class _Replay(STBIF):
    """A neuron that emits given spike trains, one ``[T, B, ...]`` tensor per call."""

    def __init__(self, trains: list[torch.Tensor], fanout: int, float_out: bool = False):
        super().__init__(0.25, level=8, signed=True, float_out=float_out)
        self.trains, self.fanout = list(trains), fanout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spikes = self.trains.pop(0)
        return spikes.float() * self.threshold if self.float_out else spikes


def _train(shape, spikes: dict[tuple[int, int], int]) -> torch.Tensor:
    """int8 zeros of ``shape`` ``[T, B, ...]`` with ``spikes[(t, flat index in step t)]``."""
    out = torch.zeros(shape, dtype=torch.int8)
    flat = out.view(shape[0], -1)
    for (t, i), value in spikes.items():
        flat[t, i] = value
    return out


class _HandNet(nn.Module):
    """Two chunks of two steps, batch 2; one attention head, N = 3 tokens, Dh = 2.

    spikes per step (t0, t1 | t2, t3), fan-out, SOPs per step:
    - ``fc_in`` (into a linear with 3 outputs): 3, 1 | 8, 0; x3 -> 9, 3, 24, 0
    - ``q_if`` (meets N = 3 keys):              2, 0 | 1, 1; x3 -> 6, 0, 3, 3
    - ``k_if`` (meets N = 3 queries):           1, 1 | 0, 0; x3 -> 3, 3, 0, 0
    - ``v_if`` (meets N = 3 queries):           3, 0 | 0, 0; x3 -> 9, 0, 0, 0
    - ``attn_if`` (meets Dh = 2 values):        4, 2 | 0, 1; x2 -> 8, 4, 0, 2
    - ``proj_if`` (float out, residual only):   2, 1 | 0, 0; x0 -> 0, 0, 0, 0
    total per step 35, 10, 27, 5 = 77. -1 spikes everywhere; the SESA operands are q, k, v, attn.
    """

    def __init__(self) -> None:
        super().__init__()
        tbc, tbhnd, tbhnn = (2, 2, 4), (2, 2, 1, 3, 2), (2, 2, 1, 3, 3)
        self.fc_in = _Replay(
            [_train(tbc, {(0, 0): 1, (0, 1): -1, (0, 6): 1, (1, 3): -1}),
             _train(tbc, {(0, i): 1 if i < 4 else -1 for i in range(8)})],
            fanout=3,
        )  # fmt: skip
        self.q_if = _Replay(
            [_train(tbhnd, {(0, 0): 1, (0, 7): -1}), _train(tbhnd, {(0, 11): -1, (1, 2): 1})], 3
        )
        self.k_if = _Replay([_train(tbhnd, {(0, 5): -1, (1, 5): 1}), _train(tbhnd, {})], 3)
        self.v_if = _Replay(
            [_train(tbhnd, {(0, 0): 1, (0, 1): 1, (0, 2): -1}), _train(tbhnd, {})], 3
        )
        self.attn_if = _Replay(
            [_train(tbhnn, {(0, 0): 1, (0, 4): 1, (0, 8): 1, (0, 17): -1, (1, 0): -1, (1, 9): 1}),
             _train(tbhnn, {(1, 3): 1})],
            fanout=2,
        )  # fmt: skip
        self.proj_if = _Replay(
            [_train(tbc, {(0, 2): -1, (0, 5): 1, (1, 7): 1}), _train(tbc, {})], 0, float_out=True
        )
        self.softmax = SpikeSoftmax()
        self.norm = SpikeLayerNorm(4)
        self.patch = nn.Linear(4, 3)

    def forward(self, chunk: int) -> None:
        if chunk == 0:
            self.patch(torch.zeros(2, 4))  # an analog layer at t = 0: 2 x 3 x 4 = 24 MACs
        for m in (self.fc_in, self.q_if, self.k_if, self.v_if, self.attn_if, self.proj_if):
            m(torch.zeros(2))
        self.softmax(torch.zeros(2, 2, 1, 3, 3))  # 9 elements per sample and step
        self.norm(torch.zeros(2, 2, 3, 4))  # 12 elements per sample and step


def test_sops_by_hand():
    net = _HandNet()
    counter = sops.SpikeCounter(net, max_steps=6)
    assert counter.neuron_names == ["fc_in", "q_if", "k_if", "v_if", "attn_if", "proj_if"]
    with counter.counting():
        net(0)
        net(1)
    spikes = counter.spikes.tolist()
    assert spikes == [
        [3, 1, 8, 0, 0, 0],
        [2, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [3, 0, 0, 0, 0, 0],
        [4, 2, 0, 1, 0, 0],
        [2, 1, 0, 0, 0, 0],
    ]
    per_step = (counter.spikes * torch.tensor(counter.fanouts)[:, None]).sum(0).tolist()
    assert per_step == [35, 10, 27, 5, 0, 0] and sum(per_step) == 77
    assert counter.dense_elements == {"softmax": 9, "norm": 12}
    assert counter.dense_ops == {"softmax": 7, "norm": 7}
    assert counter.macs == {"patch": 24}
    assert counter.neuron_elements["attn_if"] == 9
    counter.close()


@pytest.mark.parametrize("exact", [False, True])
def test_every_norm_and_softmax_is_charged(gen, exact):
    """Float mode's fused LayerNorm + neuron (an STBIF, not a SpikeLayerNorm) used to be left
    out of the dense ops: its energy was not counted."""
    qann = QuantViT(img_size=8, patch_size=4, in_chans=3, num_classes=5, embed_dim=16, depth=2,
                    num_heads=2, level=8)  # fmt: skip
    if exact:
        quantize_weights(qann)
    calibrate(qann, torch.randn(8, 3, 8, 8, generator=gen))
    counter = sops.SpikeCounter(spikekernels.convert(qann), max_steps=8)
    norms = [f"blocks.{b}.{n}.1" for b in range(2) for n in ("norm1", "norm2")] + ["norm.1"]
    softmaxes = [f"blocks.{b}.attn.attn_quan" for b in range(2)]
    assert sorted(counter.dense_ops) == sorted(norms + softmaxes)
    counter.close()


def test_counter_batches_are_independent(gen):
    """Exact mode's neurons emit running counts (``counts_out``), whose spikes the counter
    takes as differences from the count after the last step it saw: each ``counting()`` block
    is a fresh run from count 0, so one counter over two batches counts what two counters,
    one per batch, count together."""
    qann = quant_vit_tiny(**TINY)
    quantize_weights(qann, bits=8)
    x = torch.randn(4, 1, 8, 8, generator=gen)
    calibrate(qann, x)
    snn = spikekernels.convert(qann.eval())
    assert any(getattr(m, "counts_out", False) for m in snn.modules())

    def count(counter, images):
        with counter.counting():
            snn(images, max_steps=24, chunk=8)

    both = sops.SpikeCounter(snn, 24)
    count(both, x[:2])
    count(both, x[2:])
    both.close()
    one, two = sops.SpikeCounter(snn, 24), sops.SpikeCounter(snn, 24)
    count(one, x[:2])
    count(two, x[2:])
    one.close()
    two.close()
    assert one.spikes.sum() > 0 and two.spikes.sum() > 0
    assert torch.equal(both.spikes, one.spikes + two.spikes)


def test_count_per_step_paths():
    """Every CPU strategy (small, row-sum, per-row; int8 and float views) counts the same."""
    gen = torch.Generator().manual_seed(0)
    for m in (100, 5000, 70000):
        s = torch.randint(-1, 2, (3, m), generator=gen, dtype=torch.int8)
        want = s.ne(0).sum(1)
        assert sops._count_per_step(s).tolist() == want.tolist()
        assert sops._count_per_step(s.float() * 0.3).tolist() == want.tolist()
        assert sops._count_per_step(s.to(torch.bfloat16)).tolist() == want.tolist()


def test_energy_and_qann_macs_by_hand():
    e = sops.energy(
        sops.ENERGY_TABLES["fp32_45nm"], sops=77, snn_macs=24, snn_dense=10, qann_macs=100,
        qann_dense=0,
    )  # fmt: skip
    assert e["snn_joules"]["total"] == pytest.approx((77 * 0.9 + 34 * 4.6) * 1e-12)
    assert e["qann_joules"]["total"] == pytest.approx(460e-12)
    int8 = sops.energy(
        sops.ENERGY_TABLES["int8_45nm"], sops=77, snn_macs=0, snn_dense=0, qann_macs=100,
        qann_dense=0,
    )  # fmt: skip
    assert int8["snn_over_qann"] == pytest.approx(77 * 0.03 / 23)
    macs, dense = sops.profile_qann(quant_vit_tiny(**TINY).eval(), torch.zeros(1, 1, 8, 8))
    assert macs == TINY_MACS
    assert dense["blocks.0.attn.softmax"] == 2 * 5 * 5 * 5
    assert dense["blocks.0.norm1.0"] == 5 * 16 * 5


def test_counter_refuses_a_run_past_its_max_steps(gen):
    """A ValueError that says so (it was a shape mismatch in an in-place add), whether the
    neuron is called directly or by a SpikingViT's runner, whose chunk may fit while the run
    does not."""
    net = _HandNet()
    counter = sops.SpikeCounter(net, max_steps=1)
    with counter.counting(), pytest.raises(ValueError, match="ran to step 2, past the counter"):
        net(0)
    counter.close()
    qann = quant_vit_tiny(**TINY)
    calibrate(qann, torch.randn(4, 1, 8, 8, generator=gen))
    snn = spikekernels.convert(qann.eval())
    # a chunk longer than the counter's steps; one that fits, then a second chunk (no sample
    # settles at step 0, so there is always one)
    for max_steps, chunk in ((4, 8), (1, 1)):
        counter = sops.SpikeCounter(snn, max_steps)
        with counter.counting(), pytest.raises(ValueError, match="past the counter's max_steps"):
            snn(torch.randn(1, 1, 8, 8, generator=gen), max_steps=8, chunk=chunk)
        counter.close()


def test_counter_needs_fanouts():
    snn = nn.Module()
    snn.neuron = STBIF(0.5, 8, True)
    snn.neuron.fanout = None
    with pytest.raises(ValueError, match="neuron `neuron` .* no valid `fanout`"):
        sops.SpikeCounter(snn, 8)


# --- end to end -----------------------------------------------------------------------------


def _check_results(r: dict, images: int) -> None:
    """A run of TINY on ``images`` digits: the figures agree with each other, with the settle
    histogram (an image silent at step ``s`` ran steps ``0 .. s-1``) and with the QANN's MACs
    per image by hand."""
    assert r["images"] == images
    assert r["snn_top1"] == r["snn_top1_per_step"][-1]
    assert len(r["snn_top1_per_step"]) == r["steps_to_silence"]["max"]
    hist = r["steps_to_silence"]["histogram"]
    assert sum(hist.values()) == images
    steps = sum(int(s) * n for s, n in hist.items())
    assert r["steps_to_silence"]["mean"] == pytest.approx(steps / images)
    dense = r["snn_dense_ops"]["per_layer"].values()
    assert all(v["ops"] == v["elements_per_step"] * v["ops_per_element"] * steps for v in dense)
    assert r["qann_macs"]["per_layer"] == {k: v * images for k, v in TINY_MACS.items()}
    assert r["agreement"] >= 0.9
    layers = r["sops"]["per_layer"]
    assert r["sops"]["total"] == sum(v["sops"] for v in layers.values()) > 0
    assert all(v["sops"] == v["spikes"] * v["fanout"] for v in layers.values())
    assert r["sops"]["total"] == sum(r["sops"]["per_step"])
    assert r["qann_macs"]["total"] == sum(r["qann_macs"]["per_layer"].values()) > 0
    for table in ("fp32_45nm", "int8_45nm"):
        e = r["energy"][table]
        assert e["snn_joules"]["total"] > 0 and e["qann_joules"]["total"] > 0
    assert set(r["images_per_s"]) >= {"qann", "snn"}


def test_digits_end_to_end(trained, tmp_path):
    """Batches of 5 (the last of 2) fall silent at different steps: a batch that settles
    early keeps its final answer in the later steps of the per-step accuracy (whose last
    entry ``_check_results`` compares with the final top-1)."""
    out = tmp_path / "out"
    r = spikekernels.evaluate(
        str(trained), "digits", limit=32, out=out, parity=True, parity_images=2,
        **{**RUN, "batch_size": 5},
    )  # fmt: skip
    _check_results(r, 32)
    assert len(r["steps_to_silence"]["histogram"]) > 1
    assert r["parity"]["images"] == 2 and "blocks.0.attn.quan_q" in r["parity"]["table"]
    # well above chance (0.1): images and labels go together; the figure itself moves with
    # the float order of the fixture's training (threads), so no tighter bound
    assert r["qann_top1"] > 0.3 and r["float_top1"] is not None, r["qann_top1"]
    assert r["model"]["source"] == "save_checkpoint" and r["data"]["classes"] == 10
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["sops"] == r["sops"] and on_disk["snn_top1_per_step"] == r["snn_top1_per_step"]
    for name in ("accuracy_per_step.png", "steps_to_silence.png", "energy_per_layer.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["results.json", "accuracy_per_step.png", "steps_to_silence.png", "energy_per_layer.png"]
    )


def _image_folder(root: Path, per_class: int = 4) -> Path:
    from PIL import Image

    _, _, x, y = digits_split()
    raw = ((x - x.min()) / (x.max() - x.min()) * 255).round().to(torch.uint8)
    counts = {}
    for img, label in zip(raw, y.tolist(), strict=True):
        if label >= 3 or counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy(), mode="L").save(folder / f"{counts[label]}.png")
    (root / "class_0" / "broken.png").write_bytes(PNG + b"not an image")
    (root / "class_1" / "notes.txt").write_text("ignored: not an image extension")
    return root


def test_image_folder_cli(trained, tmp_path):
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "out"
    done = _cli(
        "--checkpoint", str(trained), "--data", str(data), "--crop-pct", "1", "--mean", "0.3",
        "--std", "0.35", "--max-steps", "24", "--batch-size", "5", "--out", str(out), "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    r = json.loads((out / "results.json").read_text())
    _check_results(r, 12)
    assert r["skipped_images"] == {"count": 1, "paths": [os.path.join("class_0", "broken.png")]}
    assert r["data"]["classes"] == 3


def test_torchrun_two_ranks_equal_one_process(trained, tmp_path):
    args = ["--checkpoint", str(trained), "--data", "digits", "--limit", "40", "--max-steps",
            "24", "--batch-size", "8", "--quiet"]  # fmt: skip
    one = _cli(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "spikekernels.evaluate", *args, "--out",
         str(tmp_path / "two")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert b["run"]["world_size"] == 2 and b["run"]["backend"] == "gloo"
    varying = {"run", "images_per_s", "outputs"}
    assert {k: v for k, v in a.items() if k not in varying} == {
        k: v for k, v in b.items() if k not in varying
    }
    # A bad --out stops every rank before any work (only rank 0 used to check it).
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    bad = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "spikekernels.evaluate", *args, "--out", str(not_a_dir)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert bad.returncode != 0
    assert bad.stderr.count("exists and is not a directory") == 2, bad.stderr[-3000:]


# --- checkpoints ----------------------------------------------------------------------------


def test_save_checkpoint_round_trip(trained):
    model = load_model(trained)
    again = quant_vit_tiny(**TINY)
    load_checkpoint(again, str(trained))  # the official loader reads our files too
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert model.config == {**quant_vit_tiny(**TINY).config}


def test_save_checkpoint_keeps_quantizer_levels(tmp_path, gen):
    """A quantizer's level set after construction (not in the config or the state_dict) comes
    back with load_model, and the logits with it; an entry naming no quantizer is refused."""
    model = quant_vit_tiny(level=16)
    model.blocks[0].attn.attn_quan = Quantizer(8, signed=False)
    images = torch.randn(4, 1, 8, 8, generator=gen)
    calibrate(model, images)
    path = save_checkpoint(model, tmp_path / "mixed.pth")
    loaded = load_model(path)
    assert (
        loaded.blocks[0].attn.attn_quan.level == 8 and loaded.blocks[1].attn.attn_quan.level == 16
    )
    assert (loaded.blocks[0].attn.attn_quan.n_min, loaded.blocks[0].attn.attn_quan.p_max) == (0, 7)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    # the evaluator's loader and load_checkpoint read it too; a compiled model saves its names
    assert load_qann(checkpoint=path)[0].blocks[0].attn.attn_quan.level == 8
    again = quant_vit_tiny(level=16)
    load_checkpoint(again, str(path))
    assert again.blocks[0].attn.attn_quan.level == 8
    compiled = save_checkpoint(torch.compile(model), tmp_path / "compiled.pth")
    assert load_model(compiled).blocks[0].attn.attn_quan.level == 8
    payload = torch.load(path, weights_only=False)
    entry = {"level": 8, "signed": False, "enabled": True}
    for name, bad, words in [
        ("blocks.9.attn.attn_quan", entry, r"quantizers the model lacks: .*blocks\.9"),
        ("blocks.0.attn.attn_quan", {**entry, "level": 8.7}, "expected"),
        ("blocks.0.attn.attn_quan", {**entry, "signed": "False"}, "expected"),
        ("blocks.0.attn.attn_quan", "level 8", "expected"),
    ]:
        broken = {**payload, "quantizers": {**payload["quantizers"], name: bad}}
        torch.save(broken, tmp_path / "bad.pth")
        with pytest.raises(ValueError, match=words):
            load_model(tmp_path / "bad.pth")


def _to_timm(state: dict) -> dict:
    """QuantViT keys back to a timm float ViT's (the inverse of the checkpoint mapping)."""
    out = {}
    for k, v in state.items():
        if k.endswith(".s"):
            continue
        for a, b in ((".proj.0.", ".proj."), (".norm1.0.", ".norm1."), (".norm2.0.", ".norm2."),
                     (".fc2.0.", ".fc2."), ("norm.0.", "norm.")):  # fmt: skip
            k = k.replace(a, b)
        out[k] = v.clone()
    return out


def test_float_checkpoint_maps_and_calibrates(tmp_path):
    """A timm float ViT's keys land on QuantViT's, each weight on its own module: the final
    ``norm`` of a class-token ViT and the ``fc_norm`` of a globally pooled one alike."""
    torch.manual_seed(0)
    for global_pool in (False, True):
        qann = QuantViT(img_size=8, in_chans=1, num_classes=10, global_pool=global_pool, **TINY)
        state = {k: v for k, v in qann.state_dict().items() if not k.endswith(".s")}
        timm = _to_timm(state)
        final = "fc_norm" if global_pool else "norm"
        assert f"{final}.weight" in timm and f"{final}.0.weight" in state
        mapped = float_to_quant_state_dict(timm, qann)
        assert sorted(mapped) == sorted(state)
        assert all(torch.equal(mapped[k], v) for k, v in state.items())
    timm = _to_timm(quant_vit_tiny(level=8).state_dict())  # the preset's own architecture
    assert "blocks.0.mlp.fc2.weight" in timm and "norm.weight" in timm
    mapped = float_to_quant_state_dict(timm, quant_vit_tiny(level=8))
    assert "blocks.1.mlp.fc2.0.weight" in mapped and "patch_embed.proj.0.bias" in mapped
    path = tmp_path / "float.pth"
    torch.save({"model": timm}, path)
    r = spikekernels.evaluate(
        float_checkpoint=path, model="quant_vit_tiny", level=8, calibrate=64, data="digits",
        limit=8, **RUN,
    )  # fmt: skip
    assert r["model"]["source"] == "float" and r["images"] == 8
    assert r["model"]["calibration"].startswith("64 images of digits (train split)")
    exact = spikekernels.evaluate(
        float_checkpoint=path, model="quant_vit_tiny", level=8, calibrate=64, weight_bits=8,
        limit=8, **RUN,
    )  # fmt: skip
    assert exact["model"]["mode"] == "exact" and exact["model"]["config"]["weight_bits"] == 8
    assert exact["agreement"] == 1.0  # exact mode: the SNN's answer is the QANN's
    assert exact["float_top1"] is not None  # the float weights, kept from before quantizing


# --- bad input ------------------------------------------------------------------------------


def _assert_loads(state, path):
    """``load_checkpoint`` of ``path`` into a fresh preset gives exactly ``state``."""
    again = quant_vit_tiny(**TINY)
    load_checkpoint(again, path)
    for (k, a), (_, b) in zip(state.items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


class _NotPlainData:  # a pickled object beyond the weights (module level: picklable)
    pass


def test_training_script_checkpoints_load(trained, tmp_path):
    """The official SpikeZIP-TF ``save_model`` (as MAE's, DeiT's, timm's) stores its
    ``argparse.Namespace`` under ``"args"`` beside the weights: read as plain data. Any other
    pickled object is refused naming what it is, and a model the weights do not fit gets a
    ValueError naming the file and the keys (not ``load_state_dict``'s RuntimeError)."""
    import argparse

    state = load_model(trained).state_dict()
    official = tmp_path / "official.pth"
    args = argparse.Namespace(model="vit_small_patch16", level=16, lr=1e-3)
    torch.save({"model": state, "optimizer": {}, "epoch": 3, "args": args}, official)
    _assert_loads(state, official)
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": state, "extra": _NotPlainData()}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.pth cannot be read: .*not plain data"):
        load_checkpoint(quant_vit_tiny(**TINY), foreign)
    deeper = quant_vit_tiny(**{**TINY, "depth": TINY["depth"] + 1})
    with pytest.raises(ValueError, match=r"official\.pth does not fit .*missing keys"):
        load_checkpoint(deeper, official)


@pytest.mark.parametrize(
    "prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."]
)
def test_wrapper_prefixes_are_stripped(trained, tmp_path, prefix):
    """A state_dict saved from a DDP-wrapped, a compiled, or a compiled DDP model (either
    nesting) loads into the bare model."""
    state = load_model(trained).state_dict()
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {prefix + k: v for k, v in state.items()}}, path)
    _assert_loads(state, path)


def test_missing_and_corrupt_checkpoints(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        spikekernels.evaluate(tmp_path / "nope.pth", **RUN)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="cannot be read"):
        spikekernels.evaluate(junk, **RUN)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot be read"):
        load_model(cut)
    done = _cli("--checkpoint", str(junk), "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "cannot be read" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o").exists()


def test_state_dict_mismatches_are_named(tmp_path):
    state = quant_vit_tiny().state_dict()  # an official-layout file of the preset
    state.pop("blocks.0.attn.qkv.bias")
    state["blocks.0.extra.weight"] = torch.zeros(1)
    state["head.weight"] = torch.zeros(10, 31)
    path = tmp_path / "official.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError) as err:
        spikekernels.evaluate(checkpoint=path, model="quant_vit_tiny", **RUN)
    message = str(err.value)
    assert "missing keys [blocks.0.attn.qkv.bias]" in message
    assert "unexpected keys [blocks.0.extra.weight]" in message
    assert "head.weight: checkpoint [10, 31], model [10, 32]" in message
    with pytest.raises(ValueError, match="--model"):
        spikekernels.evaluate(checkpoint=path, **RUN)


def test_bad_data_and_out(trained, tmp_path):
    empty = tmp_path / "empty"
    (empty / "class_a").mkdir(parents=True)
    with pytest.raises(ValueError, match="is empty"):
        spikekernels.evaluate(trained, empty, **RUN)
    broken = tmp_path / "broken" / "class_a"
    broken.mkdir(parents=True)
    (broken / "x.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"no readable image .* \(1 could not be decoded"):
        spikekernels.evaluate(trained, broken.parent, **RUN)
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        spikekernels.evaluate(trained, tmp_path / "missing", **RUN)
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="not writable"):
        spikekernels.evaluate(trained, out=a_file / "sub", **RUN)
    with pytest.raises(ValueError, match="exists and is not a directory"):
        spikekernels.evaluate(trained, out=a_file, **RUN)


@pytest.mark.parametrize(
    ("bad", "error", "words"),
    [
        (dict(data=None), TypeError, "data must be"),
        (dict(energy_table=["x"]), ValueError, "energy_table must be"),
        (dict(weight_bits=4), ValueError, "weight_bits must be"),
        (dict(weight_bits=8.0), ValueError, "weight_bits must be"),
        (dict(parity="False"), TypeError, "parity must be a bool"),
        (dict(progress=1), TypeError, "progress must be a bool"),
        (dict(device="gpu"), ValueError, "device must be auto, cpu or cuda"),
        (dict(device="meta"), ValueError, "device must be auto, cpu or cuda"),
        (dict(crop_pct=0.0), ValueError, r"crop_pct must be in \(0, 1\]"),
        # the digits are normalised by their own statistics: image options were ignored
        (dict(mean=(0.5, 0.5)), ValueError, "mean and std normalise an image folder"),
        (dict(std=(0.2,)), ValueError, "mean and std normalise an image folder"),
        (dict(cuda_graph=1), TypeError, "cuda_graph must be a bool"),
        (dict(cuda_graph=True, device="cpu"), ValueError, "cuda_graph=True needs a CUDA device"),
    ],
    ids=lambda v: str(v) if not isinstance(v, type) else v.__name__,
)
def test_bad_arguments_are_named(trained, bad, error, words):
    """Before any work, each a TypeError/ValueError naming the argument: a list energy table
    used to fail on hashing, None data on os.fspath, a bad device in torch.device."""
    with pytest.raises(error, match=words):
        spikekernels.evaluate(trained, **{**RUN, **bad})


def test_failure_while_writing_leaves_nothing(trained, tmp_path, monkeypatch):
    from spikekernels.evaluate import results

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(results, "write_plots", fail)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        spikekernels.evaluate(trained, limit=4, out=out, **RUN)
    assert list(out.iterdir()) == []


def test_demo_saves_a_checkpoint(tmp_path):
    path = tmp_path / "demo.pth"
    done = subprocess.run(
        [sys.executable, "python/demo.py", "--epochs", "1", "--qat-epochs", "0", "--w8-epochs",
         "0", "--snn-images", "2", "--no-reference", "--max-steps", "8",
         "--save-checkpoint", str(path)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    model = load_model(path)
    assert model.config["embed_dim"] == 64  # the demo's digits width


def test_module_input_and_quantizer_names(trained):
    r = spikekernels.evaluate(load_model(trained), limit=4, **RUN)
    assert r["model"]["source"] == "module"
    names = list(r["sops"]["per_layer"])
    assert names[0] == "patch_embed.proj.1" and names[-1] == "norm.1"
    assert any(n.startswith("blocks.0.attn.quan_q") for n in names)


@pytest.mark.parametrize("mode", ["exact", "float"])
@pytest.mark.parametrize("device", DEVICES)
def test_cuda_graph_run_equals_the_eager_run(trained, tmp_path, monkeypatch, device, mode):
    """``cuda_graph=True``: the same results as the eager run of the same QANN in either
    mode, SOPs, dense work and energy included (the counter's hooks are replayable), with the
    counting overhead measured on graphs too. Every batch shape is captured once (the last
    batch, 2 images, its own; the overhead's runs with and without a counter, their own). On
    a CPU the graphs are ``replay_graph.ReplayGraph``, which replays the ops its capture
    recorded."""
    from replay_graph import graphs_replayed_on

    from spikekernels.evaluate import evaluation

    captured = graphs_replayed_on(device, monkeypatch)
    monkeypatch.setattr(evaluation, "_GRAPH_DEVICE_TYPES", (device,))
    run = {**RUN, "batch_size": 5, "limit": 12, "device": device, "float_top1": False}
    run["weight_bits"] = 8 if mode == "exact" else None
    with force_backend(None):  # a replay runs the Triton kernels it captured
        eager = spikekernels.evaluate(trained, **run)
        assert not captured
        out = tmp_path / "out"
        graphed = spikekernels.evaluate(
            trained, cuda_graph=True, measure_overhead=True, out=out, **run
        )
    assert graphed["model"]["mode"] == mode
    assert [g.patches.shape[0] for g in captured] == [5, 2, 5, 5], "one capture a shape"
    assert graphed["sops"]["total"] > 0
    for key in ("images", "qann_top1", "snn_top1", "snn_top1_per_step", "agreement",
                "steps_to_silence", "sops", "snn_dense_ops", "snn_macs", "neuron_updates",
                "qann_macs", "qann_dense_ops", "energy", "energy_per_layer"):  # fmt: skip
        assert graphed[key] == eager[key], key
    assert graphed["run"]["counting_overhead"]["seconds_with"] > 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["results.json", "accuracy_per_step.png", "steps_to_silence.png", "energy_per_layer.png"]
    )


def test_cuda_graph_flag(trained, capsys):
    """``--cuda-graph`` reaches ``evaluate``: on a CPU, one line that says what it needs."""
    assert main(["--checkpoint", str(trained), "--cuda-graph", "--device", "cpu"]) == 2
    assert "error: cuda_graph=True needs a CUDA device, got device cpu" in capsys.readouterr().err

"""Small pieces of the evaluation tool (spikekernels.evaluate) on inputs with known answers:
results.json's figures from hand-made counts, the image folder's eval transform, and the
torchrun sharding. No SNN runs here (see test_evaluate.py for those), no Triton kernel: CPU
pass only.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import CPU_PASS_ONLY

from spikekernels.evaluate.data import ImageFolderDataset
from spikekernels.evaluate.distributed import DistContext, shard
from spikekernels.evaluate.evaluation import _RunState
from spikekernels.evaluate.results import assemble
from spikekernels.evaluate.sops import ENERGY_TABLES

pytestmark = CPU_PASS_ONLY


def _assembled(settle_hist: list[int], images: int) -> dict:
    """``assemble`` of one rank's hand-made counts: ``settle_hist[s]`` images fell silent at
    step ``s`` (the last entry: not silent within ``max_steps = len(settle_hist) - 1``)."""
    max_steps = len(settle_hist) - 1
    st = _RunState(max_steps, torch.device("cpu"))
    st.images += images
    st.snn_correct += 1
    st.snn_correct_per_step += 1
    st.settle_hist += torch.tensor(settle_hist)
    st.float_note = "no float network"
    st.qann_macs = {"patch_embed.proj.0": 100, "head": 30}  # per image
    st.qann_dense = {"blocks.0.norm1.0": 50}  # per image
    spikes = torch.zeros(2, max_steps, dtype=torch.int64)
    spikes[0, :3] = torch.tensor([3, 1, 1])
    spikes[1, :2] = torch.tensor([2, 2])
    counter = SimpleNamespace(
        spikes=spikes, fanouts=[2, 0], neuron_names=["blocks.0.a", "head.b"],
        neuron_modules=["blocks.0.a", "head.b"], macs={"patch_embed.proj.0": 24},
        neuron_elements={"blocks.0.a": 10, "head.b": 5},  # per sample and step
        dense_elements={"blocks.0.norm1": 12}, dense_ops={"blocks.0.norm1": 7},
    )  # fmt: skip
    return assemble(
        DistContext(), st, counter, max_steps=max_steps, chunk=1, energy_table="fp32_45nm",
        model_info={}, data_info={"description": "hand-made counts"},
    )  # fmt: skip


def test_steps_and_per_step_work_follow_the_settle_histogram():
    """An image silent at step ``s`` ran steps ``0 .. s-1`` (one never silent: all
    ``max_steps``): 1 image at 2, 2 at 3, 1 not silent in 6 steps = 2 + 6 + 6 = 14 steps.
    Every per-step figure is its per-step size times those 14 steps."""
    r = _assembled([0, 0, 1, 2, 0, 0, 1], images=4)
    steps = 2 * 1 + 3 * 2 + 6 * 1
    assert r["steps_to_silence"] == {
        "histogram": {"2": 1, "3": 2, "6": 1}, "mean": steps / 4, "max": 6, "not_silent": 1
    }  # fmt: skip
    assert r["neuron_updates"] == (10 + 5) * steps
    layer = r["snn_dense_ops"]["per_layer"]["blocks.0.norm1"]
    assert layer == {"elements_per_step": 12, "ops_per_element": 7, "ops": 12 * 7 * steps}
    assert r["snn_dense_ops"]["total"] == 12 * 7 * steps
    assert r["sops"]["total"] == (3 + 1 + 1) * 2


def test_qann_costs_are_per_image_times_images():
    """``profile_qann`` measures one image; the QANN ran every image, so the reported MACs,
    dense ops and their energy are those per-image figures times the images."""
    images = 4
    r = _assembled([0, 0, 4, 0], images=images)
    assert r["qann_macs"] == {
        "total": 130 * images,
        "per_image": 130,
        "per_layer": {"patch_embed.proj.0": 100 * images, "head": 30 * images},
    }
    assert r["qann_dense_ops"] == {"total": 50 * images, "per_layer": {"blocks.0.norm1.0": 200}}
    mac_joules = ENERGY_TABLES["fp32_45nm"].mac_pj * 1e-12
    qann = r["energy"]["fp32_45nm"]["qann_joules"]
    assert qann["total"] == pytest.approx((130 + 50) * images * mac_joules)


def _folder_with_centre_square(root, size: int, square: tuple[int, int]):
    """One class, one ``size`` x ``size`` greyscale PNG: white on ``[square[0], square[1])``
    in both axes, black around it."""
    from PIL import Image

    img = torch.zeros(size, size, dtype=torch.uint8)
    img[square[0] : square[1], square[0] : square[1]] = 255
    (root / "a").mkdir(parents=True)
    Image.fromarray(img.numpy()).save(root / "a" / "x.png")
    return root


@pytest.mark.parametrize("crop_pct", [0.5, 1.0])
def test_eval_transform_resizes_by_crop_pct(tmp_path, crop_pct):
    """The short side goes to ``img_size / crop_pct`` before the centre crop. A 32 x 32 image,
    white on [4, 28) and black around: at crop_pct 0.5 it is resized to 16 and the 8 x 8 crop
    is the middle [8, 24) of the original, white well beyond the bicubic filter's reach (4
    source pixels at this scale), so every pixel is white; at crop_pct 1 the whole image is
    resized to 8, and the black border darkens the corners."""
    root = _folder_with_centre_square(tmp_path, 32, (4, 28))
    ds = ImageFolderDataset(root, img_size=8, in_chans=1, crop_pct=crop_pct, mean=(0.5,),
                            std=(0.25,))  # fmt: skip
    x, label, skipped = ds[0]
    assert x.shape == (1, 8, 8) and label == 0 and skipped is None
    white = (1.0 - 0.5) / 0.25
    if crop_pct == 0.5:
        assert torch.equal(x, torch.full((1, 8, 8), white))
    else:
        assert x[0, 4, 4] == white
        assert all(x[0, i, j] < white for i in (0, 7) for j in (0, 7))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 33])
def test_shard_covers_every_index_once(n, world):
    """Rank ``r`` takes ``r, r + world, ...`` (the documented order): over all ranks every
    index of ``range(n)`` exactly once, including uneven splits (33 over 2, 3 or 4 ranks),
    shard sizes differing by at most one."""
    parts = [shard(n, rank, world) for rank in range(world)]
    assert sorted(i for part in parts for i in part) == list(range(n))
    for rank, part in enumerate(parts):
        assert part == list(range(rank, n, world))
        assert len(part) in (n // world, n // world + 1)

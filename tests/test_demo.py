"""python/demo.py's pieces on a few images: data, float training, QAT, evaluation, plot."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import CPU_PASS_ONLY

from spikekernels.models import quant_vit_tiny, quantizers

_DEMO_PATH = Path(__file__).resolve().parents[1] / "python" / "demo.py"
_spec = importlib.util.spec_from_file_location("spikekernels_demo", _DEMO_PATH)
demo = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = demo  # dataclasses look their module up there
_spec.loader.exec_module(demo)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model is overhead-bound; extra threads only spin on the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return demo.load_digits_tensors()


@pytest.fixture
def small(digits):
    x_train, y_train, x_test, y_test = digits
    return x_train[:48], y_train[:48], x_test[:16], y_test[:16]


def _model():
    torch.manual_seed(0)
    return quant_vit_tiny(level=16)


def test_digits_split(digits):
    x_train, y_train, x_test, y_test = digits
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert abs(x_train.mean().item()) < 1e-4 and abs(x_train.std().item() - 1) < 1e-4
    assert set(y_test.tolist()) == set(range(10))
    again = demo.load_digits_tensors()
    assert torch.equal(again[0], x_train) and torch.equal(again[3], y_test)


def test_train_is_float_and_deterministic(small):
    x, y, _, _ = small
    runs = []
    for _ in range(2):
        model = _model()
        runs.append(demo.train(model, x, y, epochs=2, batch_size=16, show_progress=False))
        assert all(not q.enabled for q in quantizers(model))
        assert not model.training
    assert len(runs[0]) == 2 and all(math.isfinite(v) for v in runs[0])
    assert runs[0] == runs[1]


def test_qat_calibrates_and_learns_steps(small):
    x, y, _, _ = small
    model = _model()
    demo.train(model, x, y, epochs=1, batch_size=16, show_progress=False)
    before = {n: q.s.item() for n, q in model.named_modules() if hasattr(q, "calibrating")}
    losses = demo.qat(model, x, y, epochs=1, batch_size=16, calib_size=16, show_progress=False)
    assert len(losses) == 1 and math.isfinite(losses[0])
    qs = list(quantizers(model))
    assert all(q.enabled and q.initialized for q in qs)
    assert all(torch.isfinite(q.s) and q.s.item() > 0 for q in qs)
    after = {n: q.s.item() for n, q in model.named_modules() if hasattr(q, "calibrating")}
    assert after != before


def test_evaluate(small):
    _, _, x, y = small
    model = _model()
    demo.qat(model, x, y, epochs=0, calib_size=16, show_progress=False)
    accuracy, pred, seconds = demo.evaluate(model, x, y, batch_size=5)
    assert 0.0 <= accuracy <= 1.0 and pred.shape == (16,) and seconds > 0
    assert accuracy == (pred == y).float().mean().item()


def test_plot_writes_png(tmp_path):
    result = demo.SNNResult(0.9, torch.zeros(4), 12, 1e-3, [1, 4, 12], [0.1, 0.6, 0.9])
    path = demo.plot_accuracy(result, 0.92, str(tmp_path / "curve.png"))
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_snn_part_agrees_with_qann(small):
    _, _, x, y = small
    # The smallest network with every SNN part: under the Triton interpreter (CPU CI) the
    # cost is per kernel launch, so one block, 5 tokens and level 8 (few steps) keep it fast.
    torch.manual_seed(0)
    model = quant_vit_tiny(level=8, depth=1, patch_size=4, embed_dim=16, num_heads=2)
    demo.qat(model, x, y, epochs=0, calib_size=16, show_progress=False)
    _, qann_pred, _ = demo.evaluate(model, x[:2], y[:2])
    result = demo.run_snn(
        model, x[:2], y[:2], max_steps=32, chunk=16, reference=False, show_progress=False
    )
    assert torch.equal(result.predictions, qann_pred)
    assert 0 < result.steps < 32 and result.curve_steps[-1] == result.steps
    assert result.curve_accuracy[-1] == result.accuracy
    assert result.sample_steps.shape == (2,) and int(result.sample_steps.max()) == result.steps


@CPU_PASS_ONLY  # the runner's graphs; test_chunk_graph replays them through the interpreter
@pytest.mark.parametrize("mode", ["exact", "float"])
def test_snn_part_times_cuda_graphs(small, monkeypatch, capsys, mode):
    """On a GPU the SNN is also timed as CUDA graph replays, in either mode (here on a CPU:
    the ``replay_graph.ReplayGraph`` stand-in), one capture per batch shape (3 and the last
    1), and the demo says on how many images their logits equal the eager run's bits."""
    from replay_graph import graphs_replayed_on

    from spikekernels.models import quantize_weights

    captured = graphs_replayed_on("cpu", monkeypatch)
    _, _, x, y = small
    torch.manual_seed(0)
    model = quant_vit_tiny(level=8, depth=1, patch_size=4, embed_dim=16, num_heads=2)
    demo.qat(model, x, y, epochs=0, calib_size=16, show_progress=False)
    if mode == "exact":
        quantize_weights(model)
    run = dict(max_steps=32, chunk=4, batch_size=3, curve=False, reference=False)
    eager = demo.run_snn(model, x[:7], y[:7], **run, show_progress=False)
    assert eager.exact == (mode == "exact")
    assert eager.graph_seconds_per_image is None and not captured
    result = demo.run_snn(model, x[:7], y[:7], **run, show_progress=False, cuda_graph=True)
    assert sorted(g.patches.shape[0] for g in captured) == [1, 3]
    assert result.graph_seconds_per_image > 0
    assert result.graph_equal == 7 and torch.equal(result.predictions, eager.predictions)
    demo._report_snn(result, eager.predictions, 1e-3, 32)
    line = next(t for t in capsys.readouterr().out.splitlines() if "CUDA graphs" in t)
    assert "equal to the eager run's on 7 of 7 images" in line, line


@CPU_PASS_ONLY  # the command line's flow; test_snn_part_agrees_with_qann runs the SNN part
def test_synthetic_main_runs(capsys):
    demo.main(["--synthetic", "--batch", "2", "--max-steps", "4", "--chunk", "2"])
    assert "quant_vit_tiny" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["quant_vit_small", "quant_vit_base", "quant_vit_large"])
def test_other_presets_need_synthetic(model, capsys):
    # Rejected by the parser, before any data or model: the digits fit only quant_vit_tiny.
    with pytest.raises(SystemExit) as exc:
        demo.main(["--model", model])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--model {model} needs --synthetic" in err and "quant_vit_tiny" in err
    assert "Traceback" not in err


def test_unknown_preset_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--model", "vit_huge", "--synthetic"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--model: invalid choice" in err and "vit_huge" in err


def test_shown_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inside = str(tmp_path / "out" / "curve.png")
    assert demo.shown_path(inside) == str(Path("out") / "curve.png")
    outside = str(tmp_path.parent / "elsewhere.png")
    assert demo.shown_path(outside) == outside

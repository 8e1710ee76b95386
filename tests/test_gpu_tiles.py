"""The Triton kernels at the tiles they take on a GPU, and at each tile candidate that
bench/bench_tiles.py times, bit for bit against the reference.

The rest of the suite runs the kernels through the interpreter at small tiles (16 rows,
16-32 columns, 4 warps), so that small shapes cover many tiles. A GPU launches the same
kernels at 64-128 rows, 32-128 columns, K slices of 64-256 and 8 warps. That moves the
masks' edges, changes which rows share a skipped silent tile, and for the scores kernels
reorders the keys of the softmax's tree sum (the order follows the warps). Here each
module's tile constants are set to a GPU tile, at shapes past one such tile with partial
edges, and the launch itself is checked to have taken the tile. On a GPU this runs the
candidates that the default tiles do not."""

from __future__ import annotations

import pytest
import test_exact_attention_ops as exact_attention_tests
import test_exact_linear as exact_linear_tests
import test_running_counts as running_counts_tests
import test_spike_attention as spike_attention_tests
import test_spike_linear as spike_linear_tests
import test_spike_linear_neuron as spike_linear_neuron_tests
import torch
from conftest import TRITON_DEVICES

import spikekernels
from spikekernels.kernels import exact_attention as ea
from spikekernels.kernels import exact_linear as el
from spikekernels.kernels import spike_attention as sa
from spikekernels.kernels import spike_linear as sl
from spikekernels.kernels import spike_linear_neuron as sln


class _Watched:
    """A kernel whose launches record their constexpr block sizes and warps, then run."""

    def __init__(self, kernel, seen: list[dict]):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        run = self.kernel[grid]

        def record(*args, **kwargs):
            picked = ("num_warps", "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D", "BLOCK_DV",
                      "K_TILES")  # fmt: skip
            self.seen.append({name: kwargs[name] for name in picked if name in kwargs})
            return run(*args, **kwargs)

        return record


def _set_tiles(monkeypatch, module, tiles, names, kernel) -> list[dict]:
    """``module``'s tile constants ``names`` (the interpreter's and the GPU's) set to
    ``tiles``, and its ``kernel`` watched: returns the list its launches record into."""
    for name in names:
        assert hasattr(module, name), f"{module.__name__} has no tile constant {name}"
        monkeypatch.setattr(module, name, tiles)
    seen: list[dict] = []
    monkeypatch.setattr(module, kernel, _Watched(getattr(module, kernel), seen))
    return seen


def _launched(seen: list[dict], **want) -> None:
    """The kernel ran, and every launch took the tile ``want``."""
    assert seen, "the kernel was never launched: the test ran another path"
    for launch in seen:
        assert {k: launch[k] for k in want} == want, f"launched at {launch}, not {want}"


def _silent_row_tile(s: torch.Tensor, rows: int) -> torch.Tensor:
    """``s`` ``[T, *lead, K]`` with its first ``rows`` flat rows silent at every step and the
    next ``rows`` silent at the last step: whole silent GPU row tiles next to active ones."""
    flat = s.clone().reshape(s.shape[0], -1, s.shape[-1])
    flat[:, :rows] = 0
    flat[-1, rows : 2 * rows] = 0
    return flat.reshape(s.shape)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("tiles", el.TILE_CANDIDATES, ids=str)
def test_exact_linear(gen, device, tiles, monkeypatch):
    """134 rows (three 64-row tiles, the last partial), K = 300 (a partial K slice at every
    candidate's depth), N = 150 (partial column tiles), per-channel thresholds, mid-run,
    with its flags per sample and column group and per row, its input's row flags, and its
    settled rows (all but the last 3: the first row tile settled and silent for the whole
    call, the last not settled and silent at the first step)."""
    seen = _set_tiles(
        monkeypatch, el, tiles, ("_INTERPRET_TILES", "_GPU_TILES"), "exact_linear_kernel"
    )
    layer = exact_linear_tests._layer(gen, 150, 300, per_channel=True, device=device)
    s = _silent_row_tile(exact_linear_tests._spikes(gen, 4, (2, 67), 300, device), tiles[0])
    s.view(4, -1, 300)[0, 128:] = 0  # the last row tile silent at the first step
    s_count, count = exact_linear_tests._random_state(gen, s, 150)
    before = (s_count.to(torch.int32) - s.sum(0, dtype=torch.int32)).to(torch.int8)
    silent = torch.zeros(16, *s.shape[1:], dtype=torch.int8, device=device)
    _, at_targets = exact_linear_tests._run(silent, layer, -8, 7, None, count, s_before=before)
    count.view(-1, 150)[:131] = at_targets.view(-1, 150)[:131]
    settled = exact_linear_tests._settled_rows(layer, count, before)
    assert settled.view(-1)[: tiles[0]].all() and not settled.all(), "the case proves little"
    # group_active in 6 groups of 25 columns, which straddle the column tiles
    flags = torch.zeros(4, 2, 6, dtype=torch.int32, device=device)
    rows = torch.zeros(4, 2, 67, dtype=torch.int32, device=device)
    hint = (s != 0).any(dim=-1).to(torch.int32)
    got = exact_linear_tests._run(s, layer, -8, 7, s_count, count, group_active=flags,
                                  row_active=rows, s_row_active=hint,
                                  row_settled=settled)  # fmt: skip
    exact_linear_tests._assert_same(
        got, exact_linear_tests._reference(s, layer, -8, 7, s_count, count)
    )
    assert got[0].any(), "the case should make the neuron fire"
    want = exact_linear_tests._tile_superset(got[0].cpu(), 6, tiles[0], tiles[1])
    assert torch.equal(flags.cpu(), want)
    assert torch.equal(rows.cpu(), exact_linear_tests._row_tiles(got[0].cpu(), tiles[0]))
    k_tiles = -(-300 // tiles[2])  # resident when at most tiles[5] K tiles, else streamed
    k_tiles = k_tiles if k_tiles <= tiles[5] else 0
    _launched(seen, BLOCK_M=tiles[0], BLOCK_N=tiles[1], BLOCK_K=tiles[2], num_warps=tiles[3],
              K_TILES=k_tiles)  # fmt: skip


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", spike_linear_tests.WEIGHT_DTYPES, ids=str)
def test_spike_linear(gen, device, dtype, monkeypatch):
    """Each weight dtype at its own GPU tile: 140 rows, K = 300, N = 200 (two 128-column
    tiles, the second partial)."""
    tiles = sl._GPU_TILES[dtype]
    seen = _set_tiles(monkeypatch, sl, tiles, ("_INTERPRET_TILES",), "spike_linear_kernel")
    s = _silent_row_tile(spike_linear_tests._spikes(gen, 3, (2, 70), 300), tiles[0]).to(device)
    w, ws = spike_linear_tests._weight(gen, 200, 300, dtype)
    theta = torch.tensor([0.1 + torch.rand((), generator=gen).item()])
    bias = torch.randn(200, generator=gen)
    w, theta, bias = w.to(device), theta.to(device), bias.to(device)
    ws = None if ws is None else ws.to(device)
    got = spikekernels.spike_linear(s, w, theta, bias, weight_scale=ws)
    spike_linear_tests._assert_linear(got, s, w, ws, theta, bias, 0, 1)
    _launched(seen, BLOCK_M=tiles[0], BLOCK_N=tiles[1], BLOCK_K=tiles[2], num_warps=tiles[3])


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("tiles", sln.TILE_CANDIDATES, ids=str)
@pytest.mark.parametrize("float_out", [False, True])
def test_spike_linear_neuron(gen, device, tiles, float_out, monkeypatch):
    """A float32 weight's bf16 split (what a float checkpoint runs): 140 rows, K = 150,
    N = 100, per-channel thresholds, mid-run."""
    names = ("_INTERPRET_TILES", "_GPU_TILES", "_GPU_TILES_FLOAT_OUT")
    seen = _set_tiles(monkeypatch, sln, tiles, names, "spike_linear_neuron_kernel")
    layer = spike_linear_neuron_tests._layer(gen, 100, 150, per_channel=True)
    s = _silent_row_tile(spike_linear_neuron_tests._spikes(gen, 4, (2, 70), 150), tiles[0])
    v = torch.rand(2, 70, 100, generator=gen)
    count = torch.randint(-8, 8, (2, 70, 100), generator=gen, dtype=torch.int8)
    kwargs = dict(v=v, count=count, float_out=float_out)
    got = spike_linear_neuron_tests._run(s, layer, -8, 7, "split", device, **kwargs)
    spike_linear_neuron_tests._assert_same(
        got, spike_linear_neuron_tests._reference(s, layer, -8, 7, **kwargs)
    )
    assert got[0].any(), "the case should make the neuron fire"
    _launched(seen, BLOCK_M=tiles[0], BLOCK_N=tiles[1], BLOCK_K=tiles[2], num_warps=tiles[3])


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_spike_attention_probs(gen, device, monkeypatch):
    """Float mode's scores kernel at 8 warps (the keys' tree order follows them): 197 keys,
    35 queries (three 16-row blocks), head dim 64 (two 32-wide slices), mid-run."""
    seen = _set_tiles(monkeypatch, sa, sa._GPU, ("_INTERPRET",), "spike_attention_probs_kernel")
    case = spike_attention_tests._case(gen, 3, (2,), 35, 64, 197, state=True, device=device)
    tests = spike_attention_tests
    tests._assert_same(tests._run(case), tests._reference(case), tests.NAMES)
    block_m, block_d, num_warps = sa._GPU
    _launched(seen, BLOCK_M=block_m, BLOCK_N=256, BLOCK_D=block_d, num_warps=num_warps)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_spike_context(gen, device, monkeypatch):
    """Float mode's context kernel at 64 rows and key slices of 64: 70 queries (two row
    blocks), 197 keys (four slices, the last partial), head dim 64, mid-run."""
    seen = _set_tiles(
        monkeypatch, sa, sa._CONTEXT_GPU, ("_CONTEXT_INTERPRET",), "spike_context_kernel"
    )
    case = spike_attention_tests._ctx_case(gen, 3, (2,), 70, 197, 64, state=True, device=device)
    tests = spike_attention_tests
    tests._assert_same(tests._run_ctx(case), tests._reference_ctx(case), tests.CTX_NAMES)
    block_m, block_k, num_warps = sa._CONTEXT_GPU
    _launched(seen, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=64, num_warps=num_warps)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("tiles", ea.TILE_CANDIDATES, ids=str)
def test_exact_attention_probs(gen, device, tiles, monkeypatch):
    """Exact mode's scores kernel at each candidate (8 warps: the keys' tree order follows
    them): 197 keys, 35 queries, head dim 64, mid-run."""
    names = ("_PROBS_INTERPRET", "_PROBS_GPU")
    seen = _set_tiles(monkeypatch, ea, tiles, names, "exact_attention_probs_kernel")
    tests = exact_attention_tests
    case = tests._probs_case(gen, 3, (2,), 35, 64, 197, state=True, device=device)
    tests._assert_same(tests._run_probs(case), tests._reference_probs(case), tests.PROBS_NAMES)
    _launched(seen, BLOCK_M=tiles[0], BLOCK_N=256, BLOCK_D=tiles[1], num_warps=tiles[2])


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_exact_context(gen, device, monkeypatch):
    """Exact mode's context kernel at 64 rows and key slices of 64: 70 queries, 197 keys,
    head dim 64, mid-run."""
    names = ("_CONTEXT_INTERPRET", "_CONTEXT_GPU")
    seen = _set_tiles(monkeypatch, ea, ea._CONTEXT_GPU, names, "exact_context_kernel")
    tests = exact_attention_tests
    case = tests._context_case(gen, 3, (2,), 70, 197, 64, state=True, device=device)
    want = tests._reference_context(case)
    tests._assert_same(tests._run_context(case), want, tests.CONTEXT_NAMES)
    block_m, block_k, num_warps = ea._CONTEXT_GPU
    _launched(seen, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=64, num_warps=num_warps)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("tiles", ea.TILE_CANDIDATES, ids=str)
def test_exact_attention(gen, device, tiles, monkeypatch):
    """The fused attention (scores, softmax, attention neuron, context, neuron in one kernel)
    at each scores candidate: 197 keys, 35 queries, head dim 64, mid-run; and again with
    the qkv layer's flags, some operands held (the reads they let the kernel skip)."""
    names = ("_PROBS_INTERPRET", "_ATTENTION_GPU")
    seen = _set_tiles(monkeypatch, ea, tiles, names, "exact_attention_kernel")
    tests = running_counts_tests
    case = tests._hold(gen, tests._attention_case(gen, 4, (2,), 35, 64, 197, 64, state=True))
    flags = tests._qkv_moved(case).to(device)
    case = {name: t.to(device) for name, t in case.items()}
    spikes, attn_count, count, _ = tests._composed(case)
    want = (spikes, attn_count, count)
    tests._assert_equal(tests._run_attention(case), want, tests.ATTENTION_NAMES)
    got = tests._run_attention(case, qkv_active=flags)
    tests._assert_equal(got, want, tests.ATTENTION_NAMES)
    _launched(
        seen, BLOCK_M=tiles[0], BLOCK_N=256, BLOCK_D=tiles[1], BLOCK_DV=64, num_warps=tiles[2]
    )


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("keys, block_n", [(5, 32), (40, 64), (65, 128)])
def test_exact_attention_other_key_tiles(gen, device, keys, block_n, monkeypatch):
    """The fused attention on the GPU tile at fewer keys than ViT's 197: the tiny models' 5
    (32 keys a tile, the fewest its int8 context product may contract over: 16 did not
    compile for sm_90), 40 and a CIFAR ViT's 65 (each tile's own key order across 8 warps),
    head dim 8, the padding silent."""
    names = ("_PROBS_INTERPRET", "_ATTENTION_GPU")
    seen = _set_tiles(monkeypatch, ea, ea._ATTENTION_GPU, names, "exact_attention_kernel")
    tests = running_counts_tests
    case = tests._attention_case(gen, 3, (2,), 5, 8, keys, 8, state=True)
    case = {name: t.to(device) for name, t in case.items()}
    spikes, attn_count, count, _ = tests._composed(case)
    want = (spikes, attn_count, count)
    tests._assert_equal(tests._run_attention(case), want, tests.ATTENTION_NAMES)
    _launched(seen, BLOCK_N=block_n, BLOCK_DV=16, num_warps=ea._ATTENTION_GPU[2])

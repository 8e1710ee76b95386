"""kernels.spike_count: the spikes per step that SpikeCounter's hooks add up, counted in one
pass, equal to PyTorch's count of the nonzero elements (or of the counts' differences)."""

from __future__ import annotations

import pytest
import torch
from conftest import GUARD, TRITON_DEVICES, guarded

from spikekernels.evaluate import sops
from spikekernels.kernels import spike_count
from spikekernels.kernels.spike_count import nonzero_per_step_triton
from spikekernels.ops._dispatch import force_backend

_launch = sops._launch  # the counter's own direct launch


def _sparse(gen, T, M, dtype=torch.int8, density=0.3):
    """Ternary values, about ``density`` of them nonzero, with a silent step (T > 2)."""
    x = torch.randint(-1, 2, (T, M), generator=gen, dtype=torch.int8)
    x *= (torch.rand(T, M, generator=gen) < density).to(torch.int8)
    if T > 2:
        x[1] = 0
    return x.to(dtype)


def _walk(gen, T, M):
    """A neuron's int8 count after each step (a walk of +-1 and 0 steps) and the count
    before the first."""
    before = torch.randint(-8, 8, (M,), generator=gen, dtype=torch.int8)
    steps = _sparse(gen, T, M)
    return (before + steps.cumsum(0, dtype=torch.int8)).to(torch.int8), before


# (T, M): single elements, a block less and more one (4096), T not a power of two
SHAPES = [(1, 1), (5, 4095), (3, 4097), (17, 5000)]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(("T", "M"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
def test_nonzero_per_step(gen, device, T, M, dtype, poisoned_allocations):
    x = _sparse(gen, T, M, dtype)
    got = nonzero_per_step_triton(_launch, x.to(device))
    assert got.dtype == torch.int32 and got.shape == (T,)
    assert torch.equal(got.cpu(), x.ne(0).sum(1, dtype=torch.int32))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(("T", "M"), SHAPES)
def test_changes_per_step_and_before_in_place(gen, device, T, M):
    counts, before = _walk(gen, T, M)
    (state,) = guarded((before.to(device),))
    got = nonzero_per_step_triton(_launch, counts.to(device), state)
    want = torch.diff(counts, dim=0, prepend=before[None]).ne(0).sum(1, dtype=torch.int32)
    assert torch.equal(got.cpu(), want)
    assert torch.equal(state.cpu(), counts[-1]), "before is the last step's count"
    assert state._base[0] == GUARD and state._base[-1] == GUARD, "written outside before"


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_programs_that_stride_over_blocks(gen, device, monkeypatch):
    """A grid capped below the blocks: each program walks several blocks, the last partial."""
    monkeypatch.setattr(spike_count, "MAX_PROGRAMS", 2)
    counts, before = _walk(gen, 6, 5 * 4096 + 7)
    x = _sparse(gen, 6, 5 * 4096 + 7)
    assert torch.equal(
        nonzero_per_step_triton(_launch, x.to(device)).cpu(), x.ne(0).sum(1, dtype=torch.int32)
    )
    state = before.to(device, copy=True)  # written in place
    got = nonzero_per_step_triton(_launch, counts.to(device), state)
    want = torch.diff(counts, dim=0, prepend=before[None]).ne(0).sum(1, dtype=torch.int32)
    assert torch.equal(got.cpu(), want) and torch.equal(state.cpu(), counts[-1])


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_chunks_equal_the_whole_run(gen, device):
    """``before`` carried from call to call: chunks of 4, 1 and 4 steps count as one call."""
    counts, before = _walk(gen, 9, 3000)
    state = before.to(device, copy=True)  # written in place
    parts = [nonzero_per_step_triton(_launch, c.to(device), state) for c in counts.split([4, 1, 4])]
    whole = nonzero_per_step_triton(_launch, counts.to(device), before.to(device, copy=True))
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_empty(device):
    none = nonzero_per_step_triton(_launch, torch.ones(0, 5, dtype=torch.int8, device=device))
    assert none.shape == (0,)
    got = nonzero_per_step_triton(_launch, torch.ones(3, 0, dtype=torch.int8, device=device))
    assert torch.equal(got.cpu(), torch.zeros(3, dtype=torch.int32))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_hook_counts_equal_the_pytorch_path(gen, device):
    """SpikeCounter's two counts (spikes; a counts_out neuron's changes, with its count
    carried between calls) give the same numbers by the kernel and by PyTorch."""
    x = _sparse(gen, 5, 3000).reshape(5, 2, 1500)
    # a fresh run's count: from 0, by at most one a step
    counts = _sparse(gen, 5, 3000).cumsum(0, dtype=torch.int8).reshape(5, 2, 1500)
    results = []
    for backend in (None, "torch"):
        counter = object.__new__(sops.SpikeCounter)  # only the per-step counting is used
        counter._last_counts = {}
        with force_backend(backend):
            spikes = sops._count_per_step(x.to(device).float().reshape(5, -1) * 0.25)
            first = counter._changes_per_step(0, counts[:3].to(device))
            second = counter._changes_per_step(0, counts[3:].to(device))
        (before,) = counter._last_counts.values()
        results.append([t.cpu().to(torch.int64) for t in (spikes, first, second, before)])
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(results[0][0], x.reshape(5, -1).ne(0).sum(1))

"""Test setup: the Triton interpreter on machines without a GPU, and the `cuda` marker.

TRITON_INTERPRET must be set before any ``@triton.jit`` kernel is defined, i.e. before
spikekernels is imported, so it is set here at collection time.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# torch.compile's on-disk caches (Inductor's FX graph cache, AOTAutograd's) key a compiled
# graph on the graph and the configuration, not on the Python bodies of the custom ops it
# calls: a cache left by an earlier checkout of this code returned the old tree_sum's bits
# for a compiled spike_attention_probs. So each test session compiles into a directory of
# its own (pytest-xdist's workers inherit it), removed at the end.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="spikekernels-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`make test` without a GPU) each worker gets its share of the cores:
# PyTorch's default of one thread per core in every worker would oversubscribe them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

# Where the kernels under test run: CPU always (interpreter or reference), CUDA when present.
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture
def gen() -> torch.Generator:
    """A fixed-seed CPU generator: fresh random data, the same on every run."""
    g = torch.Generator()
    g.manual_seed(1234)
    return g


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every fresh output is allocated poisoned, on every allocation path: Python's
    ``torch.empty``/``empty_like`` (Triton host code, PyTorch paths) return NaN-filled (float)
    or 77-filled (integer) tensors, and ``SPIKEKERNELS_POISON=1`` makes the C++/CUDA kernels
    fill their ``at::empty`` outputs (csrc/poison.h), which no Python patch reaches. An element
    a kernel fails to write then shows up in the result."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan") if t.is_floating_point() else 77)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    monkeypatch.setenv("SPIKEKERNELS_POISON", "1")
    yield

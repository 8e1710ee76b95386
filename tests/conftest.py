"""Test setup: the Triton interpreter on machines without a GPU, and the `cuda` marker.

TRITON_INTERPRET must be set before any ``@triton.jit`` kernel is defined, i.e. before
spikekernels is imported, so it is set here at collection time.
"""

from __future__ import annotations

import atexit
import inspect
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
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# whether tests/triton_interpreter.py's patch is in place (this triton's interpreter may
# follow another protocol: then it is left alone, and so is its test)
INTERPRETER_PATCHED = False
if INTERPRETED:
    from triton_interpreter import patch_language_once_per_launch  # noqa: E402

    INTERPRETER_PATCHED = patch_language_once_per_launch()

# The interpreter pass (`make test`'s second pass) is there to run the Triton kernels on a
# CPU; the first pass runs every test on the CPU runtime paths, and a GPU runs every test on
# the real kernels. A model-level test that takes minutes through the interpreter runs there
# on a subset that still reaches each kernel path it covers (fewer chunk sizes, batches),
# or not at all when the rest of the interpreter pass reaches those paths already.
CPU_PASS_ONLY = pytest.mark.skipif(
    INTERPRETED, reason="too slow through the Triton interpreter; the CPU pass runs it"
)

# Under pytest-xdist (`make test` without a GPU) each worker gets its share of the cores:
# PyTorch's default of one thread per core in every worker would oversubscribe them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

# Where the kernels under test run: CPU always (interpreter or reference), CUDA when present.
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# Where a test that launches pieces of the Triton kernels runs them: the GPU when there is one,
# else the CPU through the interpreter, else nowhere (an empty parameter set: skipped). A
# parameter rather than a skipif so that on a GPU the test's id says "cuda": that is how
# bench/device_check.sh selects the GPU tests (-k cuda).
TRITON_DEVICES = (
    ["cuda"] if HAS_CUDA else ["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []
)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}  # fmt: skip


GUARD = 99  # what the elements around a guarded state hold


def guarded(state):
    """Copies of ``state`` (a tuple of tensors, or a dict of them by name), each a contiguous
    view into a buffer two elements longer, whose guards (``GUARD``, one before it and one
    after) show a write outside it: the state an in-place test hands an op."""

    def one(t: torch.Tensor) -> torch.Tensor:
        buf = torch.full((t.numel() + 2,), GUARD, dtype=t.dtype, device=t.device)
        return buf[1:-1].view(t.shape).copy_(t)

    if isinstance(state, dict):
        return {name: one(t) for name, t in state.items()}
    return tuple(one(t) for t in state)


def called_in_place(call, names, given):
    """``call()``, an op's call with ``inplace=True`` on the ``guarded`` tensors ``given``
    (named ``names``, in the order of the state in its outputs, which follows its first
    output), checked: that state is ``given`` itself, at the same addresses, and nothing
    around it was written. Returns the outputs."""
    given = list(given.values()) if isinstance(given, dict) else list(given)
    ptrs = [t.data_ptr() for t in given]
    out = call()
    returned = out[1 : 1 + len(given)]
    for name, got, t, ptr in zip(names, returned, given, ptrs, strict=True):
        assert got is t, f"{name}: not the given tensor"
        assert t.data_ptr() == ptr, f"{name} moved"
        assert t._base[0].item() == GUARD and t._base[-1].item() == GUARD, f"{name}: outside"
    return out


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, name: str = "output") -> None:
    """Same dtype, shape and bit pattern (floats viewed as integers of their width: -0.0 is
    not 0.0, and a NaN equals the same NaN), for an op that promises its bits."""
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.cpu(), want.cpu()
    if got.is_floating_point():
        got, want = got.view(_BITS[got.dtype]), want.view(_BITS[want.dtype])
    diff = int((got != want).sum())
    assert diff == 0, f"{name}: {diff} of {got.numel()} elements differ in their bits"


def assert_each_same_bits(got, want, names) -> None:
    """``assert_same_bits`` on each pair of ``got`` and ``want``, named by ``names``."""
    assert len(got) == len(want) == len(names), f"{len(got)} outputs, {len(want)} expected"
    for name, g, w in zip(names, got, want, strict=True):
        assert_same_bits(g, w, name)


def st_bif_margin(u: torch.Tensor, threshold: torch.Tensor, n_min: int, p_max: int) -> float:
    """How close the reference ST-BIF's membrane on the inputs ``u`` ``[T, ...]`` comes to a
    decision point (1 and 0, SPEC.md §2) before it decides: two runs whose ``u`` agree
    within ``e`` (in units of the threshold, summed over the steps) fire the same spikes when
    the margin exceeds ``e``. A test that compares such runs' spikes asserts it first."""
    from spikekernels import reference

    v, count, margin = None, None, float("inf")
    for t in range(u.shape[0]):
        pre = (torch.full(u.shape[1:], 0.5) if v is None else v) + u[t] / threshold
        margin = min(margin, float(torch.minimum((pre - 1).abs(), pre.abs()).min()))
        _, v, count = reference.st_bif(u[t : t + 1], threshold, n_min, p_max, v, count)
    return margin


@pytest.fixture(autouse=True)
def _seeded_global_generator() -> None:
    """Modules draw their initial weights from torch's global generator: seeded for every
    test, so that no test's data depend on the order the tests run in (or the xdist
    worker)."""
    torch.manual_seed(1234)


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


def moved_to(device: str, *args: dict) -> list[dict]:
    """Each dict of arguments with its CPU tensors moved to ``device``, those inside tuples
    and lists too (an op's ``state``); tensors that share memory (in one dict or across them)
    still share it there, as views of one moved storage, so that an overlap a test builds on
    purpose survives the move. Meta tensors (a wrong device on purpose) and non-tensors stay
    as they are."""
    storages: dict[int, torch.UntypedStorage] = {}

    def move(t):
        if isinstance(t, (tuple, list)):
            return type(t)(move(x) for x in t)
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or device == "cpu":
            return t
        storage = t.untyped_storage()
        if storage.data_ptr() not in storages:
            storages[storage.data_ptr()] = storage.to(device=device)
        out = torch.empty(0, dtype=t.dtype, device=device)
        return out.set_(storages[storage.data_ptr()], t.storage_offset(), t.shape, t.stride())

    return [{name: move(value) for name, value in d.items()} for d in args]


def call_on(device: str, op, **kwargs):
    """``op(**kwargs)`` on ``device`` (``moved_to``), and off the CPU with ``validate=True``
    where the op takes it and the call does not set it: a bad-input test run on every device
    in ``DEVICES`` then asserts that a GPU asked to validate refuses what a CPU refuses
    always (its data checks sync, so a GPU runs them only on request)."""
    (kwargs,) = moved_to(device, kwargs)
    if device != "cpu" and "validate" in inspect.signature(op).parameters:
        kwargs.setdefault("validate", True)
    return op(**kwargs)

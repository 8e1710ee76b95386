# Two commands for a newcomer: `make demo` (the main job) and `make test` (the test suite).
# Both create or reuse a virtual environment that sees the system's packages, install the
# pinned toolchain into it, build the extension, then run.

PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip

# torch==2.13.0 only when no torch is importable: a bare `torch` pulls a multi-GB CUDA build.
TORCH_PIN   := torch==2.13.0
# triton 3.6 is the GPU machine's version; its CPU interpreter needs numpy < 2.4.
TRITON_PINS := triton==3.6.0 "numpy<2.4"
TOOLCHAIN   := $(TRITON_PINS) pybind11 ninja setuptools wheel
DEMO_DEPS   := scikit-learn matplotlib tqdm pillow
TEST_DEPS   := pytest pytest-benchmark pytest-xdist expecttest hypothesis ruff==0.17.6
BENCH_DEPS  := spikingjelly==2.0.0 loguru tqdm scipy

# Without a GPU the Triton kernels run through the interpreter (set before any kernel is defined).
HAS_CUDA    = $(shell $(VPY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
INTERPRET   = $(if $(filter 1,$(HAS_CUDA)),0,1)
# Without a GPU the tests spread over the CPU's cores (pytest-xdist, when the venv has it; each
# test makes its own data, so order does not matter); with one, one process owns the GPU.
XDIST       = $(if $(filter 1,$(HAS_CUDA)),,$(shell $(VPY) -c "import xdist" 2>/dev/null && printf '%s' '-n auto'))
TORCH_INC   = $(shell $(VPY) -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))")
PY_INC      = $(shell $(VPY) -c "import sysconfig; print('-I' + sysconfig.get_paths()['include'])")
CU_SOURCES  := $(shell find csrc -name '*.cu' 2>/dev/null)
CXX_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)

.PHONY: demo test bench wheels cuda-check fake-cuda-check lint format clean

$(VENV)/.toolchain:
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VPY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_PIN)
	$(PIP) install $(TOOLCHAIN) $(DEMO_DEPS) $(TEST_DEPS)
	touch $@

$(VENV)/.built: $(VENV)/.toolchain setup.py pyproject.toml $(CU_SOURCES) $(CXX_SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

# The demo runs the real paths too: Triton on a GPU, the C++/PyTorch CPU kernels otherwise.
demo: $(VENV)/.built
	TRITON_INTERPRET=0 $(VPY) python/demo.py $(ARGS)

# Two passes without a GPU: the CPU runtime paths (C++ kernels, PyTorch; ops registered as
# triton_op), then the Triton kernels themselves through the interpreter. One pass on a GPU.
# Both passes always run (a failure in the first must not hide the second); the target fails
# at the end, naming each pass that failed.
test: $(VENV)/.built
	@failed=""; \
	echo "== pass 1: the CPU runtime paths (TRITON_INTERPRET=0)"; \
	TRITON_INTERPRET=0 $(VPY) -m pytest tests -q $(XDIST) $(ARGS) || failed="$$failed TRITON_INTERPRET=0"; \
	if [ "$(INTERPRET)" = 1 ]; then \
	  echo "== pass 2: again with the Triton kernels on CPU (TRITON_INTERPRET=1)"; \
	  TRITON_INTERPRET=1 $(VPY) -m pytest tests -q $(XDIST) $(ARGS) || failed="$$failed TRITON_INTERPRET=1"; \
	fi; \
	if [ -n "$$failed" ]; then echo "== make test FAILED in pass(es):$$failed" >&2; exit 1; fi; \
	echo "== make test: all passes passed"

# SpikingJelly brings its own torch pin: --no-deps keeps ours.
# Benchmarks time the real paths: CPU kernels on a CPU machine, never the interpreter.
bench: $(VENV)/.built
	$(PIP) install --no-deps $(BENCH_DEPS)
	$(VPY) -m pytest bench -q $(ARGS)

# The GPU machine has no network: put the baseline's wheels (and pytest-xdist, for the GPU
# tests' Triton compiles) where bench/device_check.sh finds them, then carry bench/.wheels
# to the machine with the run.
wheels: $(VENV)/.toolchain
	$(PIP) download --no-deps -d bench/.wheels spikingjelly==2.0.0 loguru tqdm pytest-xdist execnet

# Compile-only check of every CUDA source for sm_90 against the installed torch's headers.
cuda-check: $(VENV)/.toolchain
	@for f in $(CU_SOURCES); do \
	  echo "nvcc -c $$f (sm_90)"; \
	  nvcc -c -arch=sm_90 -std=c++20 --expt-relaxed-constexpr -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
	    $(TORCH_INC) $(PY_INC) -o /tmp/spikekernels_$$(basename $$f).o $$f || exit 1; \
	done

# The GPU branch of the Python (tile choice, launches, the modules' and runner's CUDA paths) on
# fake CUDA tensors, its launches compiled for sm_90, without a GPU: tests/fake_cuda_check.py.
# It needs a CUDA build of torch: a venv of its own with the GPU machine's (several GB, so not
# in CI). Run it after changing a kernel's launch or a module's GPU path.
FAKE_CUDA_VENV  ?= .venv-cu130
FAKE_CUDA_TORCH := torch==2.11.0
fake-cuda-check:
	test -x $(FAKE_CUDA_VENV)/bin/python || $(PYTHON) -m venv $(FAKE_CUDA_VENV)
	$(FAKE_CUDA_VENV)/bin/python -m pip install -q $(FAKE_CUDA_TORCH) $(TRITON_PINS) pytest
	PYTHONPATH=. TRITON_INTERPRET=0 $(FAKE_CUDA_VENV)/bin/python tests/fake_cuda_check.py

lint: $(VENV)/.toolchain
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.toolchain
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf build *.egg-info spikekernels/_C*.so $(VENV)/.built

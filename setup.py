"""Builds spikekernels._C from csrc/ with torch.utils.cpp_extension (pybind11 module, ninja).

C++ CPU kernels are always built. CUDA kernels (csrc/cuda/*.cu) are built when the installed
torch has CUDA and nvcc is found; SPIKEKERNELS_CUDA=0/1 forces the choice. The GPU
architectures are TORCH_CUDA_ARCH_LIST's; unset, those of the visible GPUs (torch's rule) or,
on a build machine with none, every architecture the installed torch was built for, so the same
command works on a CPU-only build machine and its extension runs wherever that torch runs.

Install with ``pip install --no-build-isolation -e .``: an isolated build would fetch another
torch and build against it.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    forced = os.environ.get("SPIKEKERNELS_CUDA")
    if forced not in (None, "0", "1"):
        raise SystemExit(f"SPIKEKERNELS_CUDA must be 0 or 1 (or unset), got {forced!r}")
    if forced == "1" and (torch.version.cuda is None or CUDA_HOME is None):
        raise SystemExit(
            "SPIKEKERNELS_CUDA=1, but "
            + ("this torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit")
            + " (CUDA_HOME / nvcc not found)"
        )
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def _default_arch_list() -> str | None:
    """TORCH_CUDA_ARCH_LIST for a machine with no visible GPU: the installed torch's own
    architectures (``sm_90`` -> ``9.0``), PTX for the newest. Without it torch derives the list
    from the visible GPUs, finds none and fails (an IndexError in torch 2.11)."""
    try:
        flags = torch._C._cuda_getArchFlags().split()  # what torch.cuda.get_arch_list() reads
    except (AttributeError, RuntimeError):
        flags = []
    arches = sorted(
        {(int(f[3:-1]), int(f[-1])) for f in flags if f.startswith("sm_") and f[3:].isdigit()}
    )
    if not arches:
        return None
    names = [f"{major}.{minor}" for major, minor in arches]
    return ";".join(names[:-1] + [names[-1] + "+PTX"])


def _extension():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # -ffp-contract=off: the neuron must round exactly like the reference (no fused multiply-add).
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if _want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
            arch_list = _default_arch_list()
            if arch_list is None:
                raise SystemExit(
                    "no GPU visible and this torch lists no CUDA architecture: set "
                    "TORCH_CUDA_ARCH_LIST (e.g. '9.0') or build with SPIKEKERNELS_CUDA=0"
                )
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
            print(f"spikekernels: no GPU visible, building for TORCH_CUDA_ARCH_LIST={arch_list}")
        cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        return CUDAExtension(
            "spikekernels._C",
            cpp_sources + cu_sources,
            # SPIKEKERNELS_WITH_CUDA: csrc/module.cpp exports it as spikekernels._C.with_cuda.
            extra_compile_args={
                "cxx": cxx_flags + ["-DSPIKEKERNELS_WITH_CUDA"],
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=["-fopenmp"],
        )
    # The C++ standard is left to torch.utils.cpp_extension, which matches the installed torch.
    return CppExtension(
        "spikekernels._C",
        cpp_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["spikekernels", "spikekernels.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

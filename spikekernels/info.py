"""``python -m spikekernels.info``: what this installation can run, for bug reports."""

from __future__ import annotations

import platform

import torch


def report() -> str:
    from spikekernels import __version__
    from spikekernels._extension import EXTENSION_ERROR
    from spikekernels.kernels import INTERPRET, TRITON_AVAILABLE

    lines = [
        f"spikekernels {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}",
        f"CUDA available: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        f"torch built with CUDA: {torch.version.cuda}",
    ]
    if TRITON_AVAILABLE:
        import triton

        lines.append(f"triton {triton.__version__}" + (" (interpreter)" if INTERPRET else ""))
    else:
        lines.append("triton: not installed (CUDA ops fall back to PyTorch)")
    if EXTENSION_ERROR is None:
        from spikekernels import _C

        # Set at build time: whether setup.py compiled csrc/cuda/*.cu into this extension.
        cuda = getattr(_C, "with_cuda", "unknown: built before _C.with_cuda, rebuild")
        lines.append(f"extension spikekernels._C: loaded (CUDA kernels: {cuda})")
    else:
        lines.append(f"extension spikekernels._C: NOT loaded ({EXTENSION_ERROR})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())

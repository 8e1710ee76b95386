"""``torch.compile`` of an op that launches a Triton kernel (on a GPU: ``triton_op`` +
``wrap_triton``) makes Inductor re-emit the kernel and the ``@triton.jit`` helpers it calls as
source, with the module globals their bodies name. A helper whose global appears only as a
parameter default was emitted without it, so every compiled op that reached it failed to load
(``tile_flags.any_nonzero`` did). This runs Inductor's own emitter on every kernel of the
library and loads what it emits: on the CPU, where the ops trace their PyTorch paths, nothing
else reaches that code."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

import pytest
from conftest import INTERPRETED

import spikekernels.kernels

pytestmark = pytest.mark.skipif(
    INTERPRETED, reason="the interpreter's kernels are not JITFunctions: the CPU pass runs it"
)


def _kernels():
    from triton.runtime.jit import JITFunction

    found = []
    for info in pkgutil.iter_modules(spikekernels.kernels.__path__):
        module = importlib.import_module(f"spikekernels.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                found.append(pytest.param(obj, id=f"{info.name}.{name}"))
    return found


@pytest.mark.parametrize("kernel", _kernels())
def test_inductor_emits_a_loadable_kernel(kernel, tmp_path):
    wrapper = pytest.importorskip("torch._inductor.codegen.wrapper")
    emit = getattr(wrapper, "user_defined_triton_kernel_transitive_closure_source_code", None)
    if emit is None:
        pytest.skip("this torch's Inductor has no user-kernel source emitter")
    path = tmp_path / "emitted.py"
    path.write_text("import triton\nimport triton.language as tl\n" + emit(kernel))
    spec = importlib.util.spec_from_file_location("emitted", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # a NameError fails here


@pytest.mark.parametrize("kernel", _kernels())
def test_a_launch_passes_every_parameter(kernel):
    """Under ``torch.compile`` torch works out which tensors a kernel writes (so that it copies
    only those) by compiling the kernel from the launch's arguments alone: a parameter left to
    a default fails that, and torch then only warns, takes every tensor argument as written and
    copies each one at every call. ``st_bif_kernel``'s ``STAGES`` did (found tracing the ops on
    fake CUDA tensors: tests/fake_cuda_check.py). No default, so every launch names them all."""
    defaulted = [p.name for p in kernel.params if p.has_default]
    assert not defaulted, f"parameters with a default: {defaulted}"

"""Run the GPU branch of the library's Python on fake CUDA tensors, without a GPU.

No CPU run takes the ``is_cuda`` branches: the ops' tile choice and launch code for a GPU, the
modules' and the runner's CUDA paths. Under FakeTensorMode, ``cuda`` tensors need no GPU, and
``wrap_triton`` launches do nothing, so this runs all of that Python down to every Triton
launch, checks that it reaches them, and checks the outputs' shapes and dtypes against a real
CPU run. Kernels do not run: their bits are the interpreter's and the GPU's business.

It needs a CUDA build of torch (a CPU build refuses some ops on fake ``cuda`` tensors), so it
is a script rather than a test: CI's torch is a CPU build, and on a GPU the real tests run.

    TRITON_INTERPRET=0 python tests/fake_cuda_check.py

Checked this way with torch 2.11+cu130 on a machine with no GPU (session 24): every op in
``test_activity.CASES`` and both tiny models, whole and chunked, reached their launches.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

import spikekernels.nn.linear  # noqa: E402
from spikekernels import convert  # noqa: E402
from spikekernels.models import QuantViT, calibrate  # noqa: E402
from spikekernels.ops import _registry  # noqa: E402

LAUNCHES: Counter[str] = Counter()


def _patch() -> None:
    """What a fake run needs: launches counted, a current GPU to ask for, and the op bodies
    themselves run through ``wrap_triton`` (not the ops' fake impls, nor raw launches)."""
    wrap_triton = torch.library.wrap_triton

    def counted(kernel):
        LAUNCHES[getattr(kernel, "fn", kernel).__name__] += 1
        return wrap_triton(kernel)

    class Never:  # call_op's "running directly" flag, which would skip wrap_triton
        on = property(lambda self: False, lambda self, value: None)

    torch.library.wrap_triton = counted
    torch.cuda.current_device = lambda: 0
    _registry._direct = Never()
    _registry.runs_directly = lambda args: True
    # float mode's weight split checks the weight's values once (a host read): its shape only
    spikekernels.nn.linear.split_weight_bf16x3 = lambda w: torch.empty(
        (3, *w.shape), dtype=torch.bfloat16, device=w.device
    )


def _fake(x):
    if isinstance(x, torch.Tensor):
        return torch.empty(x.shape, dtype=x.dtype, device="cuda:0")
    return x


def _same_form(got, want, what: str) -> None:
    got = got if isinstance(got, (tuple, list)) else [got]
    want = want if isinstance(want, (tuple, list)) else [want]
    assert len(got) == len(want), what
    for g, w in zip(got, want, strict=True):
        assert g.device.type == "cuda", what
        assert (g.shape, g.dtype) == (w.shape, w.dtype), (what, g.shape, w.shape, g.dtype)


def check_ops(gen: torch.Generator) -> None:
    from test_activity import CASES, B

    for name, make in CASES.items():
        case = make(gen, 3)
        want = case.op(*case.op_args(torch.zeros(3, B, dtype=torch.int32)))
        body = _registry._BODIES[case.op._opname][0]
        before = sum(LAUNCHES.values())
        with FakeTensorMode():
            args = [_fake(a) for a in case.op_args(torch.zeros(3, B, dtype=torch.int32))]
            got = body(*args)
        assert sum(LAUNCHES.values()) > before, f"{name}: no Triton launch"
        _same_form(got, want, name)
        print(f"op {name}: ok")


def check_model(gen: torch.Generator, mode: str, chunks: tuple[int, ...]) -> None:
    from test_exact import TINY, images, make_exact

    if mode == "exact":
        qann = make_exact(gen, **TINY, level=16)
    else:
        qann = calibrate(QuantViT(**TINY, level=16), torch.randn(4, 3, 8, 8, generator=gen))
    snn = convert(qann)
    x = images(gen, qann, 2)
    with torch.no_grad():
        patches = snn.patch_embed.first_step(x)
        want = [snn.step_chunk(patches, steps) for steps in chunks]
    snn.reset()
    before = Counter(LAUNCHES)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        snn = snn._apply(_fake)
        patches = snn.patch_embed.first_step(_fake(x))
        got = [snn.step_chunk(patches, steps) for steps in chunks]
    for g, w in zip(got, want, strict=True):
        _same_form(g, w, f"{mode} model, chunks {chunks}")
    launched = dict(LAUNCHES - before)
    assert launched, f"{mode} model: no Triton launch"
    print(f"model {mode}, chunks {chunks}: ok, launches {launched}")


def main() -> None:
    if _registry.INTERPRET or not _registry.TRACEABLE_TRITON:
        sys.exit("needs Triton, with TRITON_INTERPRET=0 (the ops as triton_op)")
    _patch()
    gen = torch.Generator().manual_seed(0)
    check_ops(gen)
    for mode in ("exact", "float"):
        for chunks in ((3,), (2, 1, 4)):
            check_model(gen, mode, chunks)


if __name__ == "__main__":
    main()

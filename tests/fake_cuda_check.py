"""Run the GPU branch of the library's Python on fake CUDA tensors, without a GPU.

No CPU run takes the ``is_cuda`` branches: the ops' tile choice and launch code for a GPU, the
modules' and the runner's CUDA paths. Under FakeTensorMode, ``cuda`` tensors need no GPU, and
``wrap_triton`` launches do nothing, so this

1. runs all of that Python down to every Triton launch (each op of ``test_activity.CASES``;
   the test models and the demo's, one block of larger ViTs, ViT-S at the benchmark's batch
   64, exact and float, whole and chunked, through the runner's chunks; ``compat.spikezip``'s
   single-step modules; the unfused stateful modules, fresh then in place), checks that it
   reaches them, and checks the outputs' shapes and dtypes against a real CPU run;
2. compiles every distinct launch it met for sm_90 (Triton's compiler needs no GPU): the tile
   choices and specialisations of real calls, which tests/triton_sm90.py's hand-made cases
   may miss, checks that no argument the TTIR reads is lost by the GPU passes (as
   triton_sm90 does), and lists the launches that spill registers (ptxas), each with how many
   of its local loads and stores sit inside a loop (SASS);
3. traces each op under ``torch.compile(fullgraph=True)`` down to Triton's kernels, as
   torch.compile does on a GPU, and checks that torch's analysis of which tensors each kernel
   writes succeeded (when it fails, torch only warns, assumes every tensor argument written
   and copies each one every call); and the runner's whole chunk of the test model, exact
   and float, into one graph; and the unfused stateful modules' in-place calls.

Kernels do not run: their bits are the interpreter's and the GPU's business.

It needs a CUDA build of torch (a CPU build refuses some ops on fake ``cuda`` tensors), so it
is a script rather than a test: CI's torch is a CPU build, and on a GPU the real tests run.

    make fake-cuda-check   # a venv with torch 2.11+cu130 (the GPU machine's), then:
    TRITON_INTERPRET=0 python tests/fake_cuda_check.py

Checked this way on a machine with no GPU, with torch 2.11+cu130 and 2.15+cu132 (triton 3.6).
Session 24: part 1. Session 25: parts 2 and 3 found the fused attention kernel's 16-key
tile (the test models' 5 tokens) refused by the sm_90 compiler, ``st_bif_kernel``'s defaulted
parameter failing torch's analysis, and the first chunk's linears at ViT-S spilling 8-24 B
(outside the step loop). Session 26: the whole chunk in part 3 found float mode's linears,
and torch 2.11's ``bool`` of a tuple, breaking the graph. All fixed. Session 27: the fused
attention's launches with the settled flags (every later chunk's) compile without a spill.
Session 28 (torch 2.11+cu130): the exact linears write their settled rows (173 launches).
Spills it still lists: float mode's first-chunk qkv layer at rows not a multiple of 64 (12 B,
outside every loop), the linears of ``test_activity``'s odd shapes, K = 45 (1-7 KB, in the
step loop: a K that is not a multiple of 16 spills; no ViT has one), and the compat
LayerNorm's fresh ``spike_layernorm`` at 16 channels (8 B at 72 registers, outside every
loop). Session 29: the linears pad a K that is not a multiple of 16 (aligned strides); the
K = 45 launches of ``test_activity`` then spill 1376 B (float, 17 local accesses in a loop,
from 7280 B and 1049) and 796 B (exact, 35, from 1024 B and 48): what is left comes from
rows and N that are not multiples of 16 either (every dim masked, unaligned state rows).
Session 31 (torch 2.11+cu130, after session 30's module state setter and the runner's one
flags slab): 173 launches, none failed, the same four spills; both models one graph a chunk.
Session 32 (the SOP counter placing chunks as the runner's chunk observer): the same.
Session 34 (the unfused modules in place, parts 1 and 3 for them): 182 launches, none failed,
the same four spills; torch tells what every in-place building block's kernels write.
Session 35 (the SOP counter's one-pass counts, kernels.spike_count, under the counted models):
187 launches, none failed, the same four spills. Session 36 (the fused attention's values laid out
key-major by a launch of their own, values_key_major_kernel): 190 launches, none failed, the
same four spills; both models still one graph a chunk. Session 37 (the counted exact model
keeps the fused attention, its kernel adding the neurons' spikes per step into tallies; the
LayerNorm neuron quiet by its row flags): 189 launches (the counted model's two unfused
attention kernels gone, the tallying fused one added), none failed, the same four spills.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import contextlib  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from triton_sm90 import PTXAS, TARGET, _args_used, _ptxas_usage  # noqa: E402

import spikekernels.nn.linear  # noqa: E402
from spikekernels import convert  # noqa: E402
from spikekernels.evaluate import sops  # noqa: E402
from spikekernels.evaluate.sops import SpikeCounter  # noqa: E402
from spikekernels.models import QuantViT, calibrate, quant_vit_tiny  # noqa: E402
from spikekernels.models.spiking_vit import _EagerChunks  # noqa: E402
from spikekernels.ops import _registry  # noqa: E402

LAUNCHES: Counter[str] = Counter()
# one (kernel, args, kwargs) for each distinct specialisation launched: what part 2 compiles
DISTINCT: dict[tuple, tuple] = {}


class _Sm90Driver:
    """What Triton asks its driver for when it compiles (part 2) or when torch traces a kernel
    (part 3): an H200 as the current target, there being no GPU to ask."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cuda", 0)

    def is_active(self):
        return True


def _specialisation(a) -> tuple:
    """What Triton compiles an argument for: a tensor's dtype, an integer's 1 / multiple of 16
    / 64-bit, any other value itself (constexprs)."""
    if isinstance(a, torch.Tensor):
        return ("tensor", a.dtype)
    if isinstance(a, int) and not isinstance(a, bool):
        return ("int", a == 1, a % 16 == 0, not -(2**31) <= a < 2**31)
    return ("value", a)


def _patch() -> None:
    """What a fake run needs: launches counted and recorded, a current GPU to ask for, and the
    op bodies themselves run through ``wrap_triton`` (not the ops' fake impls, nor raw
    launches)."""
    wrap_triton = torch.library.wrap_triton

    def recorded(kernel):
        name = kernel.fn.__name__
        LAUNCHES[name] += 1

        class Launch:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    key = (name, tuple(map(_specialisation, args)))
                    key += tuple((k, _specialisation(v)) for k, v in sorted(kwargs.items()))
                    DISTINCT.setdefault(key, (kernel, args, kwargs))
                    return wrap_triton(kernel)[grid](*args, **kwargs)

                return run

        return Launch()

    class Never:  # call_op's "running directly" flag, which would skip wrap_triton
        on = property(lambda self: False, lambda self, value: None)

    torch.library.wrap_triton = recorded
    sops._launch = recorded  # the SpikeCounter hooks' direct launches
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


def _qann(gen: torch.Generator, config: dict, mode: str) -> QuantViT:
    """A calibrated QANN of ``config`` at level 16: integer weights in exact mode."""
    from test_exact import make_exact

    if mode == "exact":
        return make_exact(gen, **config, level=16)
    qann = QuantViT(**config, level=16)
    size = (4, qann.in_chans, qann.img_size, qann.img_size)
    return calibrate(qann, torch.randn(size, generator=gen))


def check_model(
    gen: torch.Generator, name: str, config: dict, mode: str, chunks, batch=2, counted=False
) -> None:
    """``counted``: under ``evaluate``'s ``SpikeCounter`` (its hooks take the fused
    attention's tallies of the probabilities' spikes: the kernel with ``HAS_TALLY``)."""
    from test_exact import images

    qann = _qann(gen, config, mode)
    snn = convert(qann)
    x = images(gen, qann, batch)

    def run(snn, x):  # as the runner does: every neuron records the chunk's fired flags
        counter = SpikeCounter(snn, sum(chunks)) if counted else None
        with counter.counting() if counted else contextlib.nullcontext():
            chunk = _EagerChunks(snn)
            chunk.start(snn.patch_embed.first_step(x))
            out, t0 = [], 0
            for steps in chunks:
                out.append(chunk.step(steps))
                if counted:  # the runner tells the counter where the chunk fell
                    counter.chunk_done(t0, steps)
                t0 += steps
        if counted:
            counter.close()
            out.append(counter.spikes)
        return out

    with torch.no_grad():
        want = run(snn, x)
    before = Counter(LAUNCHES)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        got = run(snn._apply(_fake), _fake(x))
    what = f"{name} model, {mode}, chunks {chunks}"
    for g, w in zip(got, want, strict=True):
        _same_form(g, w, what)
    launched = dict(LAUNCHES - before)
    assert launched, f"{what}: no Triton launch"
    print(f"{what}: ok, launches {launched}")


def check_compat(gen: torch.Generator) -> None:
    """The official-name single-step modules (``compat.spikezip``), as a SpikeZIP-TF script
    steps them: the spiking attention over three steps, the neuron, the LayerNorm."""
    from test_compat import make_qattention

    from spikekernels.compat.spikezip import IFNeuron, SAttention, Spiking_LayerNorm, reset_model

    qattn, theta, counts = make_qattention(gen)
    sattn = SAttention.from_qattention(qattn, level=8)
    spikes = (torch.sign(counts) * (torch.arange(3).view(-1, 1, 1, 1) < counts.abs())).float()
    want = [sattn(spikes[t] * theta) for t in range(3)]
    reset_model(sattn)  # its state is plain attributes, which a move leaves where they are
    others = (IFNeuron(torch.tensor(0.3), 8, True), Spiking_LayerNorm(16))
    before = Counter(LAUNCHES)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        sattn = sattn._apply(_fake)
        for t in range(3):
            _same_form(sattn(_fake(spikes[t]) * theta), want[t], f"SAttention step {t}")
        x = torch.empty(2, 9, 16, device="cuda:0")
        for module in others:
            _same_form(module._apply(_fake)(x), x, type(module).__name__)
    launched = dict(LAUNCHES - before)
    assert launched, "compat: no Triton launch"
    print(f"compat modules: ok, launches {launched}")


def _building_blocks(gen: torch.Generator) -> dict:
    """``test_inplace_state``'s unfused stateful modules, and ``SpikeMatmul`` at K = 70 too
    (the split path: its count kernel writes in place, where the fused one copies)."""
    from test_inplace_state import _standalone, _ternary

    from spikekernels.nn import SpikeMatmul

    blocks = _standalone(gen)
    split = (_ternary(gen, 9, 2, 5, 70), _ternary(gen, 9, 2, 70, 7))
    blocks["SpikeMatmul, split K"] = (SpikeMatmul(torch.tensor(0.25)), split)
    return blocks


def check_building_blocks(gen: torch.Generator) -> None:
    """Part 1 for the unfused stateful modules a user puts in a model of their own: a fresh
    call, then two that update the state in place (the same tensors)."""
    for name, (module, inputs) in _building_blocks(gen).items():
        chunks = [[x[i : i + 3] for x in inputs] for i in (0, 3, 6)]
        with torch.no_grad():
            want = [module(*chunk) for chunk in chunks]
        module.reset()
        before = Counter(LAUNCHES)
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            module = module._apply(_fake)
            got = [module(*map(_fake, chunks[0]))]
            state = module.state()
            got += [module(*map(_fake, chunk)) for chunk in chunks[1:]]
            moved = [k for k, t in module.state().items() if t is not state[k]]
        assert not moved, f"{name}: {moved} not updated in place"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _same_form(g, w, f"{name} call {i}")
        print(f"module {name}: ok, launches {dict(LAUNCHES - before)}")


def check_compiled_building_blocks(gen: torch.Generator) -> None:
    """Part 3 for the unfused modules' in-place calls: torch could tell what each kernel
    writes (the state's in and out pointers one tensor)."""
    graphs, backend, warnings = _capture()
    for name, (module, inputs) in _building_blocks(gen).items():
        torch._dynamo.reset()
        warnings.messages.clear()
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            module = module._apply(_fake)
            module(*(_fake(x[:3]) for x in inputs))  # eager: the state, on the device
            compiled = torch.compile(module, backend=backend, fullgraph=True)
            compiled(*(_fake(x[3:6]) for x in inputs))  # in place
        kernels = [n for n in graphs[-1].graph.nodes if "triton_kernel_wrapper" in str(n.target)]
        failed = [m for m in warnings.messages if "assuming every input is mutated" in m]
        assert not failed, f"{name}: torch could not tell what its kernels write: {failed}"
        print(f"compiled module {name}, in place: ok, {len(kernels)} kernels traced")


def _local_accesses(cubin: bytes) -> tuple[int, int]:
    """``(local loads and stores, those inside a loop)`` in the SASS: a spill outside every
    loop costs a few instructions a program, one inside the step loop costs every step."""
    nvdisasm = os.path.join(os.path.dirname(PTXAS), "nvdisasm")  # Triton's, beside its ptxas
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True)
    address, labels, pending, loops = {}, {}, [], []
    lines = sass.stdout.splitlines()
    for i, line in enumerate(lines):
        if label := re.match(r"\s*(\.L_\w+):", line):
            pending.append(label.group(1))
        elif at := re.search(r"/\*([0-9a-f]{4,})\*/", line):
            address[i] = int(at.group(1), 16)
            labels.update((name, address[i]) for name in pending)
            pending = []
    for i, line in enumerate(lines):  # a branch back to a label closes a loop
        branch = re.search(r"BRA[^`]*`\((\.L_\w+)\)", line)
        if branch and i in address and labels.get(branch.group(1), address[i]) < address[i]:
            loops.append((labels[branch.group(1)], address[i]))
    local = [address[i] for i, line in enumerate(lines) if re.search(r"\b(LDL|STL)\b", line)]
    return len(local), sum(any(a <= x <= b for a, b in loops) for x in local)


# the running-count operands of the spike-form attention kernels, unread on running counts
# (COUNTS_IN), whose pointer steps the GPU passes drop (triton_sm90's ``unread_args``)
_UNREAD_ON_COUNTS = {"q_prev_ptr", "k_cur_ptr", "a_prev_ptr", "v_cur_ptr"}


def compile_launches() -> None:
    """Part 2: each distinct launch, compiled for sm_90 as its first real launch would be
    (pointer arguments stand in as small CPU tensors of the same dtype)."""

    def stand_in(a):
        return torch.empty(16, dtype=a.dtype) if isinstance(a, torch.Tensor) else a

    failures, spilled = [], []
    for (name, *_), (kernel, args, kwargs) in DISTINCT.items():
        tiles = {k: v for k, v in kwargs.items() if k.startswith("BLOCK")}
        try:
            compiled = kernel.warmup(
                *map(stand_in, args), grid=(1,), **{k: stand_in(v) for k, v in kwargs.items()}
            )
        except Exception as exc:  # the compiler's last line names the problem
            failures.append(f"{name} {tiles}: {str(exc).strip().splitlines()[-1]}")
            continue
        names = [n for i, n in enumerate(kernel.arg_names) if i not in kernel.constexprs]
        lost = _args_used(compiled.asm["ttir"], names) - _args_used(compiled.asm["ttgir"], names)
        if lost - _UNREAD_ON_COUNTS:
            failures.append(f"{name} {tiles}: the GPU passes lost the reads of {sorted(lost)}")
        regs, spills = _ptxas_usage(compiled.asm["ptx"])
        if spills:
            total, looped = _local_accesses(compiled.asm["cubin"])
            spilled.append(
                f"{name} {kwargs}: {regs} registers, {spills} B spilled, "
                f"{total} local loads/stores ({looped} inside a loop)"
            )
    print(f"compiled {len(DISTINCT)} distinct launches for sm_90: {len(failures)} failed")
    print(f"{len(spilled)} of them spill registers:", *spilled, sep="\n  ")
    assert not failures, "\n".join(failures)


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _capture() -> tuple[list, object, _Warnings]:
    """A torch.compile backend that keeps each graph AOTAutograd captured (compiling nothing
    further), and the warnings torch gives while it traces user Triton kernels."""
    import torch._higher_order_ops.triton_kernel_wrap as wrap
    from torch._dynamo.backends.common import aot_autograd

    graphs = []
    backend = aot_autograd(fw_compiler=lambda gm, _: graphs.append(gm) or gm.forward)
    warnings = _Warnings()
    wrap.log.addHandler(warnings)  # the logger torch warns on (torch._dynamo)
    return graphs, backend, warnings


def check_compiled_ops(gen: torch.Generator) -> None:
    """Part 3: each op under ``torch.compile(fullgraph=True)``, traced through AOTAutograd (the
    graph captured, not compiled further) down to its Triton kernels, and torch's analysis of
    what each kernel writes done without a failure."""
    from test_activity import CASES, B

    graphs, backend, warnings = _capture()
    torch.cuda.current_device = lambda: 0
    for name, make in CASES.items():
        case = make(gen, 3)
        torch._dynamo.reset()
        warnings.messages.clear()
        with FakeTensorMode():
            args = [_fake(a) for a in case.op_args(torch.zeros(3, B, dtype=torch.int32))]
            torch.compile(case.op, backend=backend, fullgraph=True)(*args)
        kernels = [n for n in graphs[-1].graph.nodes if "triton_kernel_wrapper" in str(n.target)]
        assert kernels, f"{name}: no Triton kernel in the compiled graph"
        failed = [m for m in warnings.messages if "assuming every input is mutated" in m]
        assert not failed, f"{name}: torch could not tell what its kernels write: {failed}"
        print(f"compiled op {name}: ok, {len(kernels)} kernels traced")


def check_compiled_model(gen: torch.Generator) -> None:
    """Part 3 too: the runner's chunk of the test model under ``torch.compile(fullgraph=True)``,
    exact and float, first chunk and a later one: one graph each (float mode's linears once
    broke it at every layer, torch 2.11 at every block), its Triton kernels traced as in
    ``check_compiled_ops``."""
    from test_exact import TINY, images

    graphs, backend, warnings = _capture()
    for mode in ("exact", "float"):
        qann = _qann(gen, TINY, mode)
        snn, x = convert(qann), images(gen, qann, 2)
        torch._dynamo.reset()
        graphs.clear()
        warnings.messages.clear()
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            chunks = _EagerChunks(snn._apply(_fake))
            chunks.start(chunks.snn.patch_embed.first_step(_fake(x)))
            step = torch.compile(chunks.step, backend=backend, fullgraph=True)
            for steps in (3, 2):
                step(steps)
        kernels = [
            n for gm in graphs for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)
        ]
        assert kernels, f"{mode} model: no Triton kernel in the compiled graphs"
        failed = [m for m in warnings.messages if "assuming every input is mutated" in m]
        assert not failed, f"{mode} model: torch could not tell what its kernels write: {failed}"
        print(f"compiled {mode} model: ok, {len(graphs)} graphs, 2 chunks, {len(kernels)} kernels")


def vit(img_size: int, embed_dim: int, num_heads: int) -> dict:
    """One block of a ViT of this width: patches of 16 (of 4 below 64 px), 3 channels."""
    patch = 16 if img_size >= 64 else 4
    return dict(img_size=img_size, patch_size=patch, in_chans=3, num_classes=1000,
                embed_dim=embed_dim, depth=1, num_heads=num_heads)  # fmt: skip


def main() -> None:
    if _registry.INTERPRET or not _registry.TRACEABLE_TRITON:
        sys.exit("needs Triton, with TRITON_INTERPRET=0 (the ops as triton_op)")
    if not torch.backends.cuda.is_built():
        sys.exit("needs a CUDA build of torch (a CPU build refuses ops on fake cuda tensors)")
    triton.runtime.driver.set_active(_Sm90Driver())
    gen = torch.Generator().manual_seed(0)
    check_compiled_ops(gen)  # first: the patches below stand in for what compiling does
    check_compiled_model(gen)
    check_compiled_building_blocks(gen)
    _patch()
    check_ops(gen)
    from test_exact import TINY

    demo = {k: v for k, v in quant_vit_tiny().config.items() if k not in ("level", "weight_bits")}
    models = [
        ("tiny test", TINY, ((3,), (2, 1, 4))),  # 5 tokens, head dim 8
        ("tiny test, global pool", {**TINY, "global_pool": True}, ((3,),)),
        ("demo", demo, ((3,), (2, 1, 4))),  # 17 tokens, head dim 8
        # one block of larger models: other tiles (keys, head-dim slices, value channels)
        ("CIFAR-style", dict(vit(32, 384, 8), num_classes=10), ((3,),)),  # 65 tokens, dim 48
        ("ViT-B/16 at 224", dict(vit(224, 768, 12), global_pool=True), ((3,),)),
        ("ViT-S/16 at 224, batch 64", vit(224, 384, 6), ((3, 2),), 64),  # the benchmark's
        ("demo, counted", demo, ((3, 2),), 2, True),  # evaluate's counter hooked in
    ]
    for name, config, all_chunks, *options in models:
        for mode in ("exact", "float"):
            for chunks in all_chunks:
                check_model(gen, name, config, mode, chunks, *options)
    check_compat(gen)
    check_building_blocks(gen)
    compile_launches()


if __name__ == "__main__":
    main()

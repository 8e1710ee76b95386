"""Compile every Triton kernel for the H200 (sm_90) on a machine without a GPU.

The interpreter checks what a kernel computes, not whether it lowers to GPU code: dtype
mismatches, int8 `tl.dot` shapes and constexpr misuse only show up in the real compiler. This
script runs the compiler (TTIR -> PTX -> cubin with Triton's bundled ptxas) for each kernel at
the specialisations its launcher uses, and checks a few properties of the PTX and that no
register spills to local memory (``ptxas -v``). As a real launch does, pointers are marked
16-byte aligned and the integer arguments named in ``aligned`` divisible by 16 (true at the
ViT shapes): without those hints Triton neither vectorises nor pipelines loads, and the
register counts mean nothing. Run it with TRITON_INTERPRET unset: tests/test_triton_sm90.py
does that in a subprocess.

Usage: python tests/triton_sm90.py  (exit status 0 when all compile)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run this with TRITON_INTERPRET unset: it compiles real GPU code")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@dataclass
class Case:
    name: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    ptx_must_contain: list[str] = field(default_factory=list)
    ptx_must_not_contain: list[str] = field(default_factory=list)
    aligned: list[str] = field(default_factory=list)  # int arguments divisible by 16
    # every float32 FMA in the PTX is fma(a, b, +0.0), i.e. a lone product, or a product by
    # a power of two (exact, so fused or not the same sum): no multiply was contracted with an
    # add (SPEC.md §9.2: one rounding per operation)
    no_contracted_fma: bool = False
    # software pipelining that the kernel's speed rests on: at least this many asynchronous
    # global-to-shared copies in the TTGIR (an unpipelined loop has none of its own)
    min_async_copies: int = 0
    # arguments this specialisation never reads, whose uses in the TTIR (pointer steps carried
    # through the loop) the GPU passes may drop: every other argument the TTIR uses must still
    # be used in the TTGIR (_args_lost)
    unread_args: list[str] = field(default_factory=list)


def _lone_or_exact_product(fma: str) -> bool:
    """Whether a PTX ``fma.rn.f32 d, a, b, c;`` rounds once as written: ``c`` is +0.0 (a lone
    product), or ``a`` or ``b`` is an immediate power of two, so that ``a * b`` is exact but
    below 2^-126. In its uses, ``target_estimate``'s margins (``edge - |q| 2^-19`` or ``2^-18``,
    the edge near 1/2), a product that small vanishes beside the edge fused or not."""
    *_, a, b, c = (x.strip() for x in fma.rstrip(";").split(","))
    if c == "0f00000000":
        return True
    return any(
        x.startswith("0f") and int(x[2:], 16) & 0x7FFFFF == 0 and int(x[2:], 16) & 0x7F800000
        for x in (a, b)
    )


def _attrs(case: Case) -> dict:
    """Divisibility hints as a launch derives them: every pointer, and ``case.aligned``."""
    names = case.kernel.arg_names
    hinted = [k for k, ty in case.signature.items() if ty.startswith("*")] + case.aligned
    return {(names.index(k),): [["tt.divisibility", 16]] for k in hinted}


def _args_used(ir: str, names: list[str]) -> set[str]:
    """Which of the kernel arguments ``names`` an MLIR module uses outside its signature."""
    body = "\n".join(line for line in ir.splitlines() if "tt.func" not in line)
    return {name for name in names if re.search(rf"%{name}\b", body)}


def _args_lost(case: Case, asm: dict) -> list[str]:
    """The arguments the TTIR uses and the TTGIR no longer does, less ``unread_args``: a GPU
    pass dropped a live use. Triton 3.6's tritongpu-remove-layout-conversions did, in
    ``spike_linear_neuron_kernel``: the step loop's flag pointer lost its increment (the flag
    feeding the K loop's bound), so every step read step 0's flag (H200, 2026-12-04)."""
    names = [name for name in case.signature if name not in case.constexprs]
    lost = _args_used(asm["ttir"], names) - _args_used(asm["ttgir"], names)
    return sorted(lost - set(case.unread_args))


def _ptxas_usage(ptx: str) -> tuple[int, int]:
    """``(registers, spill bytes)`` of the kernel, from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        cmd = [PTXAS, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull]
        report = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill", report))
    return regs, spills


def _with_constexprs(signature: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    return {**signature, **{name: "constexpr" for name in constexprs}}


def neuron_cases() -> list[Case]:
    from spikekernels.kernels import neuron

    cases = []
    for x_ty, s_ty, float_out, bf16, active in [
        ("fp32", "i8", False, False, False),
        ("fp16", "i16", True, False, False),
        ("bf16", "i32", True, True, False),
        ("fp32", "i8", False, False, True),  # the runner's call: activity recorded
    ]:
        out_ty = "i16" if bf16 else (x_ty if float_out else "i8")
        signature = {
            "x_ptr": f"*{x_ty}",
            "theta_ptr": "*fp32",
            "v_in_ptr": "*fp32",
            "s_in_ptr": f"*{s_ty}",
            "out_ptr": f"*{out_ty}",
            "v_out_ptr": "*fp32",
            "s_out_ptr": f"*{s_ty}",
            "active_ptr": "*i32",
            "numel": "i32",
            "T": "i32",
            "n_min": "i32",
            "p_max": "i32",
            "B": "i32",
            "per_sample": "i32",
        }
        constexprs = dict(
            HAS_STATE=s_ty != "i8",
            FLOAT_OUT=float_out,
            OUT_BF16_BITS=bf16,
            HAS_ACTIVE=active,
            WIDE_SAMPLES=True,
            BLOCK=neuron.BLOCK,
            STAGES=neuron.STAGES,
        )
        cases.append(
            Case(
                f"st_bif x={x_ty} s={s_ty} float_out={float_out} active={active}",
                neuron.st_bif_kernel,
                signature,
                constexprs,
                num_warps=neuron.NUM_WARPS,
                aligned=["numel"],
                # SPEC.md §2: a correctly rounded division, never the approximate one; the
                # steps' inputs pipelined (asynchronous copies a few steps ahead)
                ptx_must_contain=["div.rn.f32", "cp.async"],
                ptx_must_not_contain=["div.full.f32", "div.approx"],
            )
        )
    return cases


def spike_linear_cases() -> list[Case]:
    from spikekernels.kernels import spike_linear

    cases = []
    for w_dtype, w_ty in [
        (torch.int8, "i8"),
        (torch.float16, "fp16"),
        (torch.bfloat16, "bf16"),
        (torch.float32, "bf16x3"),  # a float32 weight runs as its [3, N, K] bf16 split
    ]:
        block_m, block_n, block_k, num_warps, num_stages = spike_linear.tile_config(w_dtype)
        signature = {
            # the spikes in the weight's dtype for a float weight (spike_linear.dot_operands)
            "s_ptr": "*i8" if w_dtype == torch.int8 else f"*{w_ty.removesuffix('x3')}",
            "w_ptr": f"*{w_ty.removesuffix('x3')}",
            "theta_ptr": "*fp32",
            "w_scale_ptr": "*fp32",
            "bias_ptr": "*fp32",
            "flag_ptr": "*i32",
            "out_ptr": "*fp32",
            "R": "i32",
            "N": "i32",
            "K": "i32",
            "due_rows": "i32",
            "part_stride": "i32",
        }
        constexprs = dict(
            HAS_BIAS=True,
            INT8_W=w_dtype == torch.int8,
            PARTS=3 if w_dtype == torch.float32 else 1,
            DOT_FP32=False,
            EVEN_M=True,  # ViT's dims; exact_linear's cases compile the masked K loop
            EVEN_N=True,
            EVEN_K=True,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
        )
        # every weight reaches the tensor cores (wgmma on sm_90, or mma); float32 as bf16
        tensor_cores = ["wgmma", ".f32.bf16.bf16"] if w_dtype == torch.float32 else ["mma"]
        cases.append(
            Case(
                f"spike_linear weight={w_ty}",
                spike_linear.spike_linear_kernel,
                signature,
                constexprs,
                num_warps=num_warps,
                num_stages=num_stages,
                aligned=["R", "N", "K", "part_stride"],
                ptx_must_contain=tensor_cores,
            )
        )
    return cases


def layernorm_cases() -> list[Case]:
    from spikekernels.kernels import layernorm

    cases = []
    for x_ty, c in [("fp32", 384), ("bf16", 768), ("fp16", 1000)]:
        block_c, rows, num_warps = layernorm.launch_config(c)
        bf16 = x_ty == "bf16"
        signature = {
            "x_ptr": f"*{x_ty}",
            "w_ptr": "*fp32",
            "b_ptr": "*fp32",
            "x_acc_in_ptr": "*fp32",
            "y_prev_in_ptr": "*fp32",
            "out_ptr": "*i16" if bf16 else f"*{x_ty}",
            "x_acc_out_ptr": "*fp32",
            "y_prev_out_ptr": "*fp32",
            "T": "i32",
            "R": "i32",
            "C": "i32",
            "eps": "fp32",
        }
        constexprs = dict(
            HAS_WEIGHT=True,
            HAS_BIAS=True,
            HAS_X_ACC=x_ty == "fp32",
            HAS_Y_PREV=x_ty == "fp32",
            OUT_BF16_BITS=bf16,
            ROWS=rows,
            BLOCK_C=block_c,
            LOG2_C=block_c.bit_length() - 1,
        )
        cases.append(
            Case(
                f"spike_layernorm x={x_ty} C={c}",
                layernorm.spike_layernorm_kernel,
                signature,
                constexprs,
                num_warps=num_warps,
                aligned=["R"] + (["C"] if c % 16 == 0 else []),
                # mean and variance divide by C correctly rounded, never approximately
                ptx_must_contain=["sqrt.rn.f32", "div.rn.f32"],
                ptx_must_not_contain=["div.full.f32", "div.approx"],
            )
        )
    # Triton specialises an integer argument equal to 1 into a constant: C == 1 and R == 1.
    block_c, rows, num_warps = layernorm.launch_config(1)
    signature = {
        "x_ptr": "*fp32",
        "w_ptr": "*fp32",
        "b_ptr": "*fp32",
        "x_acc_in_ptr": "*fp32",
        "y_prev_in_ptr": "*fp32",
        "out_ptr": "*fp32",
        "x_acc_out_ptr": "*fp32",
        "y_prev_out_ptr": "*fp32",
        "T": "i32",
        "eps": "fp32",
    }
    constexprs = dict(
        R=1,
        C=1,
        HAS_WEIGHT=False,
        HAS_BIAS=False,
        HAS_X_ACC=False,
        HAS_Y_PREV=False,
        OUT_BF16_BITS=False,
        ROWS=rows,
        BLOCK_C=block_c,
        LOG2_C=0,
    )
    cases.append(
        Case(
            "spike_layernorm x=fp32 C=1 R=1",
            layernorm.spike_layernorm_kernel,
            signature,
            constexprs,
            num_warps=num_warps,
            ptx_must_not_contain=["div.full.f32", "div.approx"],
        )
    )
    return cases


def spike_layernorm_neuron_cases() -> list[Case]:
    from spikekernels.kernels import layernorm, layernorm_neuron

    def signature(x_ty: str, count_ty: str) -> dict[str, str]:
        pointers = ["w_ptr", "b_ptr", "x_acc_in_ptr", "y_prev_in_ptr", "out_ptr"]
        pointers += ["x_acc_out_ptr", "y_prev_out_ptr", "theta_ptr", "v_in_ptr"]
        pointers += ["count_in_ptr", "v_out_ptr", "count_out_ptr", "active_ptr"]
        types = {"out_ptr": "*i8", "count_in_ptr": count_ty, "count_out_ptr": count_ty}
        types["active_ptr"] = "*i32"
        sig = {"x_ptr": f"*{x_ty}"} | {p: types.get(p, "*fp32") for p in pointers}
        ints = ["T", "R", "C", "eps", "n_min", "p_max", "B", "rows_per_sample"]
        sig |= {name: "fp32" if name == "eps" else "i32" for name in ints}
        sig |= {"branch_ptr": "*i8", "branch_theta_ptr": "*fp32", "branch2_ptr": "*i8"}
        return sig | {"branch2_theta_ptr": "*fp32", "residual_ptr": "*fp32"}

    cases = []
    # ViT-S/B widths and a width that is not a power of two; fresh and incoming state; the
    # runner's calls record per-sample activity and add one or two pending branches (the
    # first block's norm2 and every later norm, norm1 writing the stream)
    for x_ty, c, state, active, branches, residual_out in [
        ("fp32", 384, False, False, 0, False),
        ("bf16", 768, True, True, 0, False),
        ("fp16", 1000, True, False, 0, False),
        ("fp32", 384, True, True, 1, False),
        ("fp32", 384, True, True, 2, True),
        ("fp32", 768, False, True, 2, True),
    ]:
        block_c, rows, num_warps = layernorm.launch_config(c)
        constexprs = dict(
            BRANCHES=branches,
            RESIDUAL_OUT=residual_out,
            HAS_WEIGHT=True,
            HAS_BIAS=True,
            HAS_X_ACC=state,
            HAS_Y_PREV=state,
            HAS_STATE=state,
            X_BF16=x_ty == "bf16",
            HAS_ACTIVE=active,
            ROWS=rows,
            BLOCK_C=block_c,
            LOG2_C=block_c.bit_length() - 1,
        )
        cases.append(
            Case(
                f"spike_layernorm_neuron x={x_ty} C={c} state={state} active={active} "
                f"branches={branches} residual_out={residual_out}",
                layernorm_neuron.spike_layernorm_neuron_kernel,
                signature(x_ty, "*i8"),
                constexprs,
                num_warps=num_warps,
                aligned=["R"] + (["C"] if c % 16 == 0 else []),
                # the LayerNorm's divisions and root and the neuron's division correctly
                # rounded, as in the two kernels it fuses, and no product contracted into an
                # add (that would depend on the layout: the same bits as spike_layernorm's)
                ptx_must_contain=["sqrt.rn.f32", "div.rn.f32"],
                ptx_must_not_contain=["div.full.f32", "div.approx"],
                no_contracted_fma=True,
            )
        )
    # Triton specialises an integer argument equal to 1 into a constant: C == 1 and R == 1.
    block_c, rows, num_warps = layernorm.launch_config(1)
    sig = {k: ty for k, ty in signature("fp32", "*i8").items() if k not in ("R", "C")}
    cases.append(
        Case(
            "spike_layernorm_neuron x=fp32 C=1 R=1",
            layernorm_neuron.spike_layernorm_neuron_kernel,
            sig,
            dict(cases[0].constexprs, R=1, C=1, ROWS=rows, BLOCK_C=block_c, LOG2_C=0),
            num_warps=num_warps,
            ptx_must_contain=["div.rn.f32"],
            ptx_must_not_contain=["div.full.f32", "div.approx"],
        )
    )
    return cases


def spike_matmul_cases() -> list[Case]:
    from spikekernels.kernels import spike_matmul as sm

    strides = ["H", "stride_at", "stride_ab", "stride_ah", "stride_am", "stride_ak"]
    strides += ["stride_bt", "stride_bb", "stride_bh", "stride_bk", "stride_bn", "stride_ot"]
    cases = []
    # Scores (b = k^T, a strided view) with K = 64 and a context-like plain b with K = 32.
    for k, transposed_b in [(64, True), (32, False)]:
        block_m, block_n, block_k, num_warps = sm.fused_config(k)
        # Triton specialises a stride of 1 into a constant, as it does at a real launch.
        ones = {"stride_ak": 1, ("stride_bk" if transposed_b else "stride_bn"): 1}
        signature = {
            p: "*fp32" if p in ("scale_ptr", "out_ptr") else "*i8"
            for p in ["a_ptr", "b_ptr", "scale_ptr", "a_in_ptr", "b_in_ptr", "out_ptr"]
            + ["a_out_ptr", "b_out_ptr"]
        }
        signature |= {name: "i32" for name in ["T", "M", "N", "K", *strides] if name not in ones}
        constexprs = dict(
            ones,
            HAS_A_IN=True,
            HAS_B_IN=True,
            EVEN_M=False,
            EVEN_N=False,
            EVEN_K=k == block_k,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
        )
        cases.append(
            Case(
                f"spike_matmul fused K={k} b{'^T' if transposed_b else ''}",
                sm.spike_matmul_kernel,
                signature,
                constexprs,
                num_warps=num_warps,
                ptx_must_contain=["mma", ".s8"],  # int8 tensor cores, exact int32 sums
            )
        )
    block_m, block_n, block_k, num_warps = sm.split_config()
    ones = {"stride_ak": 1, "stride_bn": 1}
    pointers = ["a_ptr", "b_ptr", "a_prev_ptr", "b_cur_ptr", "scale_ptr", "out_ptr"]
    signature = {p: "*fp32" if p in ("scale_ptr", "out_ptr") else "*i8" for p in pointers}
    signature |= {
        name: "i32"
        for name in ["T", "M", "N", "K", *strides, "stride_a_prev_t", "stride_b_cur_t"]
        if name not in ones
    }
    cases.append(
        Case(
            "spike_matmul split-K",
            sm.spike_matmul_split_kernel,
            signature,
            dict(ones, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k),
            num_warps=num_warps,
            ptx_must_contain=["mma", ".s8"],
        )
    )
    signature = {"x_ptr": "*i8", "known_ptr": "*i8", "counts_ptr": "*i8", "final_ptr": "*i8"}
    signature |= {
        name: "i32"
        for name in ["T", "R", "C", "H", "stride_xt", "stride_xb", "stride_xh", "stride_xr"]
        + ["stride_xc", "stride_ct", "stride_sb", "stride_sh", "stride_sr", "stride_sc"]
    }
    # from the count after the steps, backwards (exact attention), and forward from the
    # count before them with the outgoing one written (spike_matmul's split path)
    for after in (True, False):
        constexprs = dict(EXCLUSIVE=True, HAS_KNOWN=True, FROM_AFTER=after)
        cases.append(
            Case(
                f"running_count from_after={after}",
                sm.running_count_kernel,
                signature,
                dict(constexprs, WRITE_FINAL=not after, BLOCK=sm.COUNT_BLOCK),
            )
        )
        # Triton specialises an integer argument equal to 1 into a constant: one step (a
        # chunk of 1) and one head. `(T - 1).to(...)` failed to compile there.
        cases.append(
            Case(
                f"running_count from_after={after} T=1 H=1",
                sm.running_count_kernel,
                {name: ty for name, ty in signature.items() if name not in ("T", "H")},
                dict(constexprs, T=1, H=1, WRITE_FINAL=not after, BLOCK=sm.COUNT_BLOCK),
            )
        )
    return cases


def target_cases() -> list[Case]:
    from spikekernels.kernels import target

    cases = []
    for value_ty, has_count, per_channel, active in [
        ("fp32", False, False, False),
        ("fp32", True, True, False),
        ("bf16", True, False, False),
        ("fp32", True, True, True),  # recording per-sample activity
    ]:
        signature = {
            "value_ptr": f"*{value_ty}",
            "theta_ptr": "*fp32",
            "count_in_ptr": "*i8",
            "out_ptr": "*i8",
            "count_out_ptr": "*i8",
            "active_ptr": "*i32",
            "numel": "i32",
            "T": "i32",
            "C": "i32",
            "n_min": "i32",
            "p_max": "i32",
            "B": "i32",
            "per_sample": "i32",
        }
        constexprs = dict(
            HAS_COUNT=has_count,
            PER_CHANNEL=per_channel,
            HAS_ACTIVE=active,
            WIDE_SAMPLES=True,
            BLOCK=target.BLOCK,
        )
        cases.append(
            Case(
                f"target_spikes value={value_ty} count={has_count} per_channel={per_channel}"
                f" active={active}",
                target.target_spikes_kernel,
                signature,
                constexprs,
                num_warps=target.NUM_WARPS,
                aligned=["numel", "C"],
                # SPEC.md §9.3: y / theta correctly rounded, never the approximate division,
                # and subnormal quotients kept (no flush to zero), as on the CPU
                ptx_must_contain=["div.rn.f32"],
                ptx_must_not_contain=["div.full.f32", "div.approx", "div.rn.ftz"],
            )
        )
    return cases


def exact_linear_cases() -> list[Case]:
    from spikekernels.kernels import exact_linear as el
    from spikekernels.kernels import tile_flags

    block_m, block_n, block_k, num_warps, num_stages, resident = el.tile_config()
    cases = [
        Case(
            "tile_flags step_tile_any (early exit)",
            tile_flags.step_tile_any_kernel,
            {
                "s_ptr": "*i8",
                "flag_ptr": "*i32",
                "rows": "i32",
                "K": "i32",
                "num_m": "i32",
                "settled_ptr": "*i32",
            },  # fmt: skip
            dict(BLOCK_M=block_m, BLOCK_K=tile_flags.FLAG_BLOCK_K, HAS_SETTLED=False),
            num_warps=num_warps,
            aligned=["rows", "K"],
        ),
    ]
    # the same pass over a producer's row flags ([T, rows, 1] int32: s_row_active), alone and
    # with a layer's settled rows (exact_linear's row_settled)
    for settled in (False, True):
        cases.append(
            Case(
                "tile_flags step_tile_any (row flags" + (", settled rows)" if settled else ")"),
                tile_flags.step_tile_any_kernel,
                {
                    "s_ptr": "*i32",
                    "flag_ptr": "*i32",
                    "rows": "i32",
                    "num_m": "i32",
                    "settled_ptr": "*i32",
                },  # fmt: skip
                # K = 1: a constant, as Triton passes it
                dict(BLOCK_M=block_m, BLOCK_K=1, K=1, HAS_SETTLED=settled),
                num_warps=num_warps,
                aligned=["rows"],
            )
        )
    signature = {
        "s_ptr": "*i8",
        "w_ptr": "*i8",
        "ws_ptr": "*fp32",
        "bias_ptr": "*fp32",
        "theta_in_ptr": "*fp32",
        "theta_ptr": "*fp32",
        "flag_ptr": "*i32",
        "s_count_ptr": "*i8",
        "count_in_ptr": "*i8",
        "out_ptr": "*i8",
        "count_out_ptr": "*i8",
        "before_ptr": "*i8",
        "active_ptr": "*i32",
        "group_active_ptr": "*i32",
        "row_active_ptr": "*i32",
        "unsettled_ptr": "*i32",
        "settled_ptr": "*i32",
        "T": "i32",
        "rows": "i32",
        "N": "i32",
        "K": "i32",
        "num_m": "i32",
        "s_step": "i32",
        "out_step": "i32",
        "n_min": "i32",
        "p_max": "i32",
        "B": "i32",
        "rows_per_sample": "i32",
        "groups": "i32",
        "group_size": "i32",
    }
    # counts_out: the qkv layer, whose per-step counts the attention reads (with its input
    # count before the steps given, as ExactAttention passes it, and its activity per head's
    # q, k and v recorded, group_active)
    # even: ViT-S at batch 64, every dim a multiple of its tile (no mask in the K loop); the
    # fifth variant again with every load of the K loop masked. K: ViT-S's 384 (qkv, proj and
    # fc1: weights resident at the default tiles), its fc2's 1536 (streamed) and ViT-Ti's 192
    # (resident, a partial second K tile). Then the model's calls, as ExactLinearNeuron makes
    # them mid-run, recording its rows (row_active) and reading its settled rows
    # (row_settled): proj and fc1, fc2, qkv (even and masked), and a per-channel layer
    # without activity. (Per-channel thresholds with activity and row flags, a call no model
    # makes, spill 8 B; 20 B without row_settled.)
    variants = [(False, False, False, False, True, 384), (True, True, False, False, True, 384),
                (True, True, True, False, True, 384), (True, True, True, True, True, 384),
                (True, True, True, True, False, 384), (True, True, True, False, True, 1536),
                (True, True, True, True, False, 192)]  # fmt: skip
    model_calls = [(True, False, True, False, True, 384), (True, False, True, False, True, 1536),
                   (True, True, True, True, True, 384), (True, True, True, True, False, 384),
                   (True, True, False, False, True, 384)]  # fmt: skip
    variants = [(*v, False) for v in variants] + [(*v, True) for v in model_calls]

    def add(name: str, constexprs: dict) -> None:
        cases.append(
            Case(
                name,
                el.exact_linear_kernel,
                signature,
                constexprs,
                num_warps=num_warps,
                num_stages=num_stages,
                aligned=["rows", "N", "K", "s_step", "out_step", "group_size"],
                # int8 wgmma (exact int32 sums), and the neuron's correctly rounded
                # division without flush to zero (SPEC.md §9.2-§9.3)
                ptx_must_contain=["wgmma", ".s32.s8.s8", "div.rn.f32"],
                ptx_must_not_contain=["div.full.f32", "div.approx", "div.rn.ftz"],
                no_contracted_fma=True,
                # resident weights: each spike tile copied in ahead (prologue and loop)
                min_async_copies=2 * constexprs["K_TILES"],
            )
        )

    tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    for state, per_channel, active, counts_out, even, k, rows_out in variants:
        groups = counts_out
        constexprs = dict(
            HAS_BIAS=True,
            HAS_S_COUNT=state,
            S_BEFORE=counts_out,
            HAS_COUNT=state,
            COUNT_IN_PLACE=rows_out,  # the model's calls: the state in place
            PER_CHANNEL=per_channel,
            HAS_ACTIVE=active,
            HAS_GROUPS=groups,
            HAS_ROW_ACTIVE=rows_out and not counts_out,  # qkv's rows: no reader needs them
            HAS_SETTLED=rows_out,
            COUNTS_OUT=counts_out,
            HAS_BEFORE=rows_out and not counts_out,  # proj, fc1, fc2: the next one's s_before
            **tiles,
            EVEN_M=even,
            EVEN_N=even,
            EVEN_K=even,
            **el.weight_residency(k, block_k, resident),
        )
        add(
            f"exact_linear state={state} per_channel={per_channel} active={active} "
            f"counts_out={counts_out} s_before={counts_out}"
            + (" group_active" if groups else "")
            + (" row_active" if rows_out and not counts_out else "")
            + (" row_settled" if rows_out else "")
            + (" count_before" if rows_out and not counts_out else "")
            + ("" if even else " masked")
            + ("" if k == 384 else f" K={k}"),
            constexprs,
        )
    # the model's first chunk at ViT-S, batch 64 (a fresh state: the settled rows zeros, which
    # the kernel writes), as the runner makes it (activity recorded): qkv, then proj and fc1
    # (from a constant zero count these spilled 24 and 8 B; tests/fake_cuda_check.py found
    # them)
    for qkv in (True, False):
        constexprs = dict(
            HAS_BIAS=True,
            HAS_S_COUNT=False,
            S_BEFORE=False,
            HAS_COUNT=False,
            COUNT_IN_PLACE=False,
            PER_CHANNEL=qkv,
            HAS_ACTIVE=True,
            HAS_GROUPS=qkv,
            HAS_ROW_ACTIVE=not qkv,
            HAS_SETTLED=True,
            COUNTS_OUT=qkv,
            HAS_BEFORE=False,
            **tiles,
            EVEN_M=True,
            EVEN_N=True,
            EVEN_K=True,
            **el.weight_residency(384, block_k, resident),
        )
        add(f"exact_linear first chunk, {'qkv' if qkv else 'proj and fc1'}", constexprs)
    return cases


def exact_layernorm_cases() -> list[Case]:
    from spikekernels.kernels import exact_layernorm as eln

    cases = []
    # ViT-S/B/L widths with the residual's constant part (one threshold; a tuple's third
    # entry False: per channel), the readout's pooled float32 rows without it, and a width
    # that is not a power of two (and the widest rows again recording per-sample activity);
    # a count is always read (zeros when fresh)
    # branch: 0 none, 1 d + pending branch with D written, 2 the branch alone, fresh, D
    # written (block 0's norm1), 3 d + branch, no D (a block's norm2), 4 d + two branches, D
    # written (a later block's norm1), 5 d + two branches, no D (the readout)
    variants = [
        (384, True, True, False, 0), (768, True, False, False, 0), (1024, True, True, False, 0),
        (100, False, False, False, 0), (384, True, True, True, 0), (1024, True, True, True, 0),
        (100, False, False, True, 0), (384, True, True, False, 1), (384, True, True, True, 1),
        (1024, True, True, True, 1), (768, True, False, False, 1), (384, True, False, True, 2),
        (384, True, True, True, 2), (384, True, False, True, 3), (384, True, False, True, 4),
        (1024, True, True, True, 3), (384, True, True, True, 4), (768, True, False, False, 4),
        (1024, True, True, True, 4), (384, True, True, True, 5), (1024, True, True, True, 5),
    ]  # fmt: skip
    # the model's calls with the stream's row flags: d_moved read where there is a d,
    # residual_moved written where D is, the spikes' row flags (row_active) recorded for the
    # linear after the norm, and the branches' row flags read (ViT-S's norms of block 0, of
    # later blocks and the readout, and ViT-L's norm1)
    variants = [(*v, False) for v in variants] + [
        (384, True, True, True, 2, True), (384, True, True, True, 4, True),
        (384, True, True, True, 3, True), (384, True, True, True, 5, True),
        (1024, True, True, True, 4, True),
    ]  # fmt: skip
    for c, has_c, state, active, branch, flags in variants:
        block_c, rows, num_warps = eln.launch_config(c)
        signature = {
            "d_ptr": "*fp64" if has_c else "*fp32",
            "branch_ptr": "*i8",
            "branch_theta_ptr": "*fp32",
            "branch_count_ptr": "*i8",
            "branch2_ptr": "*i8",
            "branch2_theta_ptr": "*fp32",
            "branch2_count_ptr": "*i8",
            "branch_rows_ptr": "*i32",
            "branch2_rows_ptr": "*i32",
            "residual_out_ptr": "*fp64",
            "c_ptr": "*fp64",
            "w_ptr": "*fp32",
            "b_ptr": "*fp32",
            "theta_ptr": "*fp32",
            "count_in_ptr": "*i8",
            "out_ptr": "*i8",
            "count_out_ptr": "*i8",
            "before_ptr": "*i8",
            "active_ptr": "*i32",
            "d_moved_ptr": "*i32",
            "moved_out_ptr": "*i32",
            "row_active_ptr": "*i32",
            "T": "i32",
            "R": "i32",
            "C": "i32",
            "RC": "i32",
            "eps": "fp32",
            "n_min": "i32",
            "p_max": "i32",
            "B": "i32",
            "rows_per_sample": "i32",
        }
        constexprs = dict(
            HAS_D=branch != 2,
            HAS_BRANCH=branch != 0,
            HAS_BRANCH_COUNT=branch in (1, 3, 4, 5),
            HAS_BRANCH2=branch in (4, 5),
            HAS_BRANCH2_COUNT=branch in (4, 5),
            # the branches' row flags: proj's and fc2's (the patch embedding has none)
            HAS_BRANCH_ROWS=flags and branch in (1, 3, 4, 5),
            HAS_BRANCH2_ROWS=flags and branch in (4, 5),
            RESIDUAL_OUT=branch in (1, 2, 4),
            HAS_C=has_c,
            HAS_WEIGHT=True,
            HAS_BIAS=True,
            PER_CHANNEL=not state,
            HAS_ACTIVE=active,
            HAS_D_MOVED=flags and branch != 2,
            MOVED_OUT=flags and branch in (1, 2, 4),
            HAS_ROW_ACTIVE=flags and branch != 5,
            # the count before, for the linear after (qkv, fc1): not the readout's
            HAS_BEFORE=flags and branch != 5,
            ROWS=rows,
            BLOCK_C=block_c,
            LOG2_C=block_c.bit_length() - 1,
        )
        cases.append(
            Case(
                f"exact_layernorm_neuron C={c} residual={has_c} per_channel={not state} "
                f"active={active} branch={branch}" + (" moved" if flags else ""),
                eln.exact_layernorm_neuron_kernel,
                signature,
                constexprs,
                num_warps=num_warps,
                aligned=["R", "RC"] + (["C"] if c % 16 == 0 else []),
                # SPEC.md §9.2: the LayerNorm's divisions and root correctly rounded, no
                # flush to zero, and no multiply contracted into an add (the branch's
                # theta * count into D's add included)
                ptx_must_contain=["div.rn.f32", "sqrt.rn.f32"],
                ptx_must_not_contain=[
                    "div.full.f32",
                    "div.approx",
                    "div.rn.ftz",
                    "sqrt.approx",
                    "fma.rn.f64",
                ],  # fmt: skip
                no_contracted_fma=True,
            )
        )
    # Triton specialises integer arguments equal to 1 into constants: C == 1 (LOG2_C = 0, no
    # tree level), one row, one constant row
    block_c, rows, num_warps = eln.launch_config(1)
    signature = {
        name: ty for name, ty in cases[0].signature.items() if name not in ("R", "C", "RC")
    }
    cases.append(
        Case(
            "exact_layernorm_neuron C=1 R=1",
            eln.exact_layernorm_neuron_kernel,
            signature,
            dict(cases[0].constexprs, R=1, C=1, RC=1, ROWS=rows, BLOCK_C=1, LOG2_C=0),
            num_warps=num_warps,
            ptx_must_not_contain=["div.full.f32", "div.approx", "div.rn.ftz", "sqrt.approx"],
            no_contracted_fma=True,
        )
    )
    # the row function alone (values out), as a QANN on the GPU would run it
    block_c, rows, num_warps = eln.launch_config(384)
    signature = {"x_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*fp32"}
    signature |= {"R": "i32", "C": "i32", "eps": "fp32"}
    cases.append(
        Case(
            "exact layer_norm_rows C=384",
            eln.layer_norm_rows_kernel,
            signature,
            dict(HAS_WEIGHT=True, HAS_BIAS=True, ROWS=rows, BLOCK_C=block_c, LOG2_C=9),
            num_warps=num_warps,
            aligned=["R", "C"],
            ptx_must_contain=["div.rn.f32", "sqrt.rn.f32"],
            ptx_must_not_contain=["div.full.f32", "div.approx", "div.rn.ftz", "sqrt.approx"],
            no_contracted_fma=True,
        )
    )
    return cases


def exact_attention_cases() -> list[Case]:
    from spikekernels.kernels import exact_attention as ea

    checks = dict(
        # int8 tensor cores (exact int32 sums); the softmax's and the neuron's divisions
        # correctly rounded without flush to zero; no multiply contracted into an add, and no
        # plain mul.f32 that ptxas could still contract (every product is fma(a, b, +0.0))
        ptx_must_contain=["mma", ".s32.s8.s8", "div.rn.f32"],
        ptx_must_not_contain=["div.full.f32", "div.approx", "div.rn.ftz", "mul.f32"],
        no_contracted_fma=True,
    )
    cases = []
    # ViT: 197 tokens (BLOCK_N 256), head dim 64. The host hands keys and queries over with
    # the head dim contiguous (copying other layouts), which Triton specialises as a launch
    # does; spike strides are multiples of 16 where the head dim makes them so. The tile is
    # transposed, [keys, queries], so that the 256 keys are wgmma's M.
    block_m, block_n, block_d, num_warps = ea.probs_config(197)
    # counts_in: q and k arrive as running counts (the qkv neuron's per-step counts) and the
    # attention neuron's counts go out, as ExactAttention wires them
    variants = [(False, False, False), (True, False, False), (False, True, False),
                (True, True, False), (False, False, True), (True, True, True)]  # fmt: skip
    for state, active, counts_in in variants:
        strides = ["stride_qt", "stride_qb", "stride_qh", "stride_qm"]
        strides += ["stride_kt", "stride_kb", "stride_kh", "stride_kn"]
        signature = {
            "q_ptr": "*i8",
            "k_ptr": "*i8",
            "q_prev_ptr": "*i8",
            "k_cur_ptr": "*i8",
            "gain_ptr": "*fp32",
            "theta_ptr": "*fp32",
            "count_in_ptr": "*i8",
            "out_ptr": "*i8",
            "count_out_ptr": "*i8",
            "active_ptr": "*i32",
        }
        signature |= {
            name: "i32"
            for name in ["T", "M", "N", "D", "H", *strides, "n_min", "p_max", "samples"]
            + ["rows_per_sample"]
        }
        constexprs = dict(
            stride_qd=1,
            stride_kd=1,
            HAS_ACC=state and not counts_in,  # (a count is always read: zeros when fresh)
            HAS_ACTIVE=active,
            COUNTS_IN=counts_in,
            COUNTS_OUT=counts_in,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            D_SLICES=triton.cdiv(64, block_d),
            LOG2_N=block_n.bit_length() - 1,
            **ea.key_codes(block_n, num_warps, gather=False),
        )
        cases.append(
            Case(
                f"exact_attention_probs N=197 D=64 state={state} active={active} "
                f"counts_in/out={counts_in}",
                ea.exact_attention_probs_kernel,
                signature,
                constexprs,
                num_warps=num_warps,
                aligned=["D", *strides],
                # on running counts the spike-form's running-count operands go unread
                unread_args=["q_prev_ptr", "k_cur_ptr"] if counts_in else [],
                **dict(checks, ptx_must_contain=["wgmma", *checks["ptx_must_contain"]]),
            )
        )
    # the whole attention on running counts: the scores tile, then V_t^T @ A_t^T
    strides = ["stride_qt", "stride_qb", "stride_qh", "stride_qm"]
    strides += ["stride_kt", "stride_kb", "stride_kh", "stride_kn"]
    strides += ["stride_vt", "stride_ot", "stride_ob", "stride_oh", "stride_om"]
    signature = {name: "*i8" for name in ("q_ptr", "k_ptr", "vt_ptr")}
    signature |= {
        name: "*fp32"
        for name in ("gain_ptr", "attn_theta_ptr", "theta_a_ptr", "theta_v_ptr", "theta_ptr")
    }
    signature |= {
        name: "*i8"
        for name in ("attn_count_in_ptr", "count_in_ptr", "out_ptr", "attn_count_out_ptr")
        + ("count_out_ptr", "before_ptr")
    }
    signature |= {
        name: "*i32"
        for name in ("attn_active_ptr", "active_ptr", "qkv_active_ptr", "row_active_ptr")
        + ("attn_settled_ptr", "settled_ptr")
    }
    signature |= {"attn_tally_ptr": "*i64", "tally_ptr": "*i64"}
    signature |= {
        name: "i32"
        for name in ["T", "M", "N", "D", "DV", "H", "row_heads", "rows_per_step", *strides]
        + ["stride_flag_t", "stride_flag_b"]
        + ["stride_flag_i", "attn_n_min", "attn_p_max", "n_min", "p_max", "samples"]
        + ["rows_per_sample"]
    }
    # (state, active, qkv_active, tally). The model's calls: activity, the qkv layer's flags
    # (qkv_active, [T, B, 3, H] seen as [T, B, H, 3]: the head stride is 1), both row flags,
    # and after the first call the state, the settled flags and the count before; counted
    # (a SpikeCounter's tallies) after the first call. At ViT-S, and at the smallest tile (5
    # tokens, head dim 8, as the tiny test models): 32 keys, the least an int8 dot contracts
    # over (16 did not compile)
    model_calls = [(False, True, True, False), (True, True, True, False), (True, True, True, True)]
    for n, d, variants in [(197, 64, [(False, False, False, False), (True, True, False, False),
                                      *model_calls]),
                           (5, 8, model_calls)]:  # fmt: skip
        block_m, block_n, block_d, block_dv, num_warps = ea.attention_config(n, d)
        vit = n == 197
        for state, active, qkv_active, tally in variants:
            constexprs = dict(
                stride_qd=1,
                stride_kd=1,
                stride_flag_h=1,
                HAS_COUNT=state,
                HAS_ATTN_ACTIVE=active,
                HAS_ACTIVE=active,
                HAS_QKV_ACTIVE=qkv_active,
                HAS_ROW_ACTIVE=qkv_active,
                READ_SETTLED=state and qkv_active,
                WRITE_SETTLED=qkv_active,
                HAS_BEFORE=state and qkv_active,  # proj's s_before, after the first call
                HAS_TALLY=tally,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                BLOCK_D=block_d,
                D_SLICES=triton.cdiv(d, block_d),
                BLOCK_DV=block_dv,
                LOG2_N=block_n.bit_length() - 1,
                **ea.key_codes(block_n, num_warps),
            )
            cases.append(
                Case(
                    f"exact_attention (fused) N={n} D={d} state={state} active={active}"
                    + (" qkv_active row flags" if qkv_active else "")
                    + (" settled" if state and qkv_active else "")
                    + (" tally" if tally else ""),
                    ea.exact_attention_kernel,
                    signature,
                    constexprs,
                    num_warps=num_warps,
                    aligned=["D", "DV", *strides] if vit else [],
                    # wgmma at ViT-S (the small tile's 32 keys are below its M)
                    **dict(checks, ptx_must_contain=["wgmma"] * vit + checks["ptx_must_contain"]),
                    # the step loop pipelined: the next steps' K and Q slices copied in ahead
                    # (unpipelined, only the head-dim loop's: 3)
                    min_async_copies=6 if vit else 0,
                )
            )
    # the fused kernel's value operand, key-major: at ViT-S from the qkv layer's packed counts
    # (channel stride 1), and at the tiny models' tile
    for n, d in [(197, 64), (5, 8)]:
        _, block_n, _, block_dv, num_warps = ea.attention_config(n, d)
        strides = ["stride_vt", "stride_vb", "stride_vh", "stride_vn"]
        cases.append(
            Case(
                f"values_key_major N={n} DV={d}",
                ea.values_key_major_kernel,
                {"v_ptr": "*i8", "out_ptr": "*i8"}
                | {name: "i32" for name in ["N", "DV", "H", "nb", *strides]},
                dict(
                    stride_vd=1,
                    BLOCK_N=block_n,
                    BLOCK_DV=block_dv,
                    LOG2_N=block_n.bit_length() - 1,
                    KEY_PERM=ea.key_codes(block_n, num_warps)["KEY_PERM"],
                ),
                aligned=["DV", *strides] if n == 197 else [],
            )
        )
    # the context: attention spikes [M, N] and values [N, D] contiguous, as they arrive
    block_m, block_k, block_d, num_warps = ea.context_config(64)
    signature = {
        "a_ptr": "*i8",
        "v_ptr": "*i8",
        "a_prev_ptr": "*i8",
        "v_cur_ptr": "*i8",
        "theta_a_ptr": "*fp32",
        "theta_v_ptr": "*fp32",
        "theta_ptr": "*fp32",
        "count_in_ptr": "*i8",
        "out_ptr": "*i8",
        "count_out_ptr": "*i8",
        "active_ptr": "*i32",
        "row_active_ptr": "*i32",
    }
    strides = ["stride_at", "stride_ab", "stride_ah", "stride_am"]
    strides += ["stride_vt", "stride_vb", "stride_vh", "stride_vn"]
    strides += ["stride_ot", "stride_ob", "stride_oh", "stride_om"]
    signature |= {
        name: "i32"
        for name in ["T", "M", "N", "D", "H", "row_heads", "rows_per_step", *strides]
        + ["n_min", "p_max", "samples", "rows_per_sample"]
    }
    # (state, active, counts_in, row_active); the last: the model's call past a hook
    variants = [(False, False, False, False), (True, False, False, False),
                (True, True, False, False), (False, False, True, False),
                (True, True, True, False), (True, True, True, True)]  # fmt: skip
    for state, active, counts_in, rows in variants:
        constexprs = dict(
            stride_an=1,
            stride_vd=1,
            HAS_ACC=state and not counts_in,  # (a count is always read: zeros when fresh)
            HAS_ACTIVE=active,
            COUNTS_IN=counts_in,
            HAS_ROW_ACTIVE=rows,
            BLOCK_M=block_m,
            BLOCK_K=block_k,
            BLOCK_D=block_d,
        )
        cases.append(
            Case(
                f"exact_context N=197 D=64 state={state} active={active} counts_in={counts_in}"
                f" row_active={rows}",
                ea.exact_context_kernel,
                signature,
                constexprs,
                num_warps=num_warps,
                aligned=["D", "stride_vt", "stride_vb", "stride_vh", "stride_vn"]
                + ["stride_ot", "stride_ob", "stride_oh", "stride_om"],
                unread_args=["a_prev_ptr", "v_cur_ptr"] if counts_in else [],
                **checks,
            )
        )
    return cases


def spike_linear_neuron_cases() -> list[Case]:
    from spikekernels.kernels import spike_linear_neuron as sln

    cases = []
    for w_ty, parts, state, per_channel, float_out, active in [
        ("bf16", 3, False, False, False, False),  # a float32 weight's split, fresh state
        ("bf16", 3, True, True, True, False),
        ("bf16", 3, True, True, False, True),  # the runner's call: activity recorded
        ("fp16", 1, True, False, False, False),
    ]:
        signature = {
            "s_ptr": f"*{w_ty}",  # spike_linear.dot_operands
            "w_ptr": f"*{w_ty}",
            "theta_in_ptr": "*fp32",
            "bias_ptr": "*fp32",
            "theta_ptr": "*fp32",
            "flag_ptr": "*i32",
            "v_in_ptr": "*fp32",
            "count_in_ptr": "*i8",
            "out_ptr": "*fp32" if float_out else "*i8",
            "v_out_ptr": "*fp32",
            "count_out_ptr": "*i8",
            "active_ptr": "*i32",
            "T": "i32",
            "rows": "i32",
            "N": "i32",
            "K": "i32",
            "num_m": "i32",
            "s_step": "i32",
            "out_step": "i32",
            "due_steps": "i32",
            "part_stride": "i32",
            "n_min": "i32",
            "p_max": "i32",
            "B": "i32",
            "rows_per_sample": "i32",
        }
        block_m, block_n, block_k, num_warps, num_stages = sln.tile_config(float_out)
        constexprs = dict(
            HAS_BIAS=True,
            HAS_STATE=state,
            PER_CHANNEL=per_channel,
            FLOAT_OUT=float_out,
            HAS_ACTIVE=active,
            INT8_W=False,
            PARTS=parts,
            DOT_FP32=False,
            EVEN_M=True,
            EVEN_N=True,
            EVEN_K=True,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
        )
        cases.append(
            Case(
                f"spike_linear_neuron weight={w_ty}x{parts} state={state} "
                f"per_channel={per_channel} float_out={float_out} active={active}",
                sln.spike_linear_neuron_kernel,
                signature,
                constexprs,
                num_warps=num_warps,
                num_stages=num_stages,
                aligned=["rows", "N", "K", "s_step", "out_step", "part_stride"],
                # tensor cores in the weight's dtype, and the neuron's correctly rounded
                # division without flush to zero (SPEC.md §2)
                ptx_must_contain=["wgmma", ".f32." + w_ty.replace("fp", "f") + ".", "div.rn.f32"],
                ptx_must_not_contain=["div.full.f32", "div.approx", "div.rn.ftz"],
                no_contracted_fma=True,
            )
        )
    return cases


def exact_residual_cases() -> list[Case]:
    from spikekernels.kernels import exact_residual as er

    signature = {
        "d_ptr": "*fp64",
        "spikes_ptr": "*i8",
        "theta_ptr": "*fp32",
        "count_ptr": "*i8",
        "out_ptr": "*fp64",
        "numel": "i32",
        "T": "i32",
    }
    return [
        Case(
            f"exact_residual_add d={has_d} count={has_count}",
            er.exact_residual_add_kernel,
            signature,
            dict(HAS_D=has_d, HAS_COUNT=has_count, BLOCK=er.BLOCK),
            num_warps=er.NUM_WARPS,
            aligned=["numel"],
            # the stream in 16-byte accesses; SPEC.md §9.2: the float64 product is not
            # contracted into the add (one rounding per operation)
            ptx_must_contain=["st.global.v2.b64"] + (["ld.global.v2.b64"] if has_d else []),
            ptx_must_not_contain=["fma.rn.f64"],
        )
        for has_d, has_count in [(True, True), (True, False), (False, True)]
    ]


def spike_count_cases() -> list[Case]:
    from spikekernels.kernels import spike_count as sc

    return [
        Case(
            f"nonzero_per_step x={ty} diff={diff}",
            sc.nonzero_per_step_kernel,
            {"x_ptr": f"*{ty}", "before_ptr": f"*{ty}", "out_ptr": "*i32", "T": "i32", "M": "i32"},
            dict(DIFF=diff, T_BLOCK=8, BLOCK=sc._BLOCK),
            num_warps=sc._NUM_WARPS,
            aligned=["M"],
            # one pass in 16-byte loads (int8: 16 a thread), one atomic add per step
            ptx_must_contain=["ld.global.v4.b32", "atom.global"],
        )
        for ty, diff in [("i8", False), ("i8", True), ("i32", False)]
    ]


def spike_attention_cases() -> list[Case]:
    from spikekernels.kernels import exact_attention as ea
    from spikekernels.kernels import spike_attention as sa

    # ViT: 197 tokens (BLOCK_N 256), head dim 64, the operands head-dim contiguous as the
    # host hands them over (see exact_attention_cases); int8 wgmma for the scores, the
    # softmax and the neuron's divisions correctly rounded, no contracted multiply-add
    block_m, block_n, block_d, num_warps = sa.probs_config(197)
    strides = ["stride_qt", "stride_qb", "stride_qh", "stride_qm"]
    strides += ["stride_kt", "stride_kb", "stride_kh", "stride_kn"]
    signature = {name: "*i8" for name in ["q_ptr", "k_ptr", "q_prev_ptr", "k_cur_ptr"]}
    signature |= {"scale_ptr": "*fp32", "theta_ptr": "*fp32"}
    signature |= {name: "*fp32" for name in ["x_in_ptr", "y_in_ptr", "v_in_ptr"]}
    signature |= {"s_in_ptr": "*i8", "out_ptr": "*i8"}
    signature |= {name: "*fp32" for name in ["x_out_ptr", "y_out_ptr", "v_out_ptr"]}
    signature |= {"s_out_ptr": "*i8", "active_ptr": "*i32"}
    signature |= {
        name: "i32"
        for name in ["T", "M", "N", "D", "H", *strides, "n_min", "p_max", "samples"]
        + ["rows_per_sample"]
    }
    checks = dict(
        ptx_must_contain=["wgmma", ".s32.s8.s8", "div.rn.f32"],
        ptx_must_not_contain=["div.full.f32", "div.approx", "div.rn.ftz", "mul.f32"],
        no_contracted_fma=True,
    )
    cases = []
    for state, active in [(False, False), (True, False), (False, True), (True, True)]:
        constexprs = dict(
            stride_qd=1,
            stride_kd=1,
            HAS_STATE=state,
            HAS_ACTIVE=active,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            LOG2_N=block_n.bit_length() - 1,
            **ea.key_codes(block_n, num_warps, by_layout=False),
        )
        cases.append(
            Case(
                f"spike_attention_probs N=197 D=64 state={state} active={active}",
                sa.spike_attention_probs_kernel,
                signature,
                constexprs,
                num_warps=num_warps,
                aligned=["D", *strides],
                **checks,
            )
        )
    # the context: attention spikes [M, N] and values [N, D] contiguous, as they arrive
    block_m, block_k, block_d, num_warps = sa.context_config(64)
    signature = {name: "*i8" for name in ["a_ptr", "v_ptr", "a_prev_ptr", "v_cur_ptr"]}
    signature |= {"scale_ptr": "*fp32", "theta_ptr": "*fp32", "mem_in_ptr": "*fp32"}
    signature |= {"s_in_ptr": "*i8", "out_ptr": "*i8", "mem_out_ptr": "*fp32"}
    signature |= {"s_out_ptr": "*i8", "active_ptr": "*i32"}
    strides = ["stride_at", "stride_ab", "stride_ah", "stride_am"]
    strides += ["stride_vt", "stride_vb", "stride_vh", "stride_vn"]
    strides += ["stride_ot", "stride_ob", "stride_oh", "stride_om"]
    signature |= {
        name: "i32"
        for name in ["T", "M", "N", "D", "H", *strides, "n_min", "p_max", "samples"]
        + ["rows_per_sample"]
    }
    for state, active in [(False, False), (True, False), (False, True), (True, True)]:
        constexprs = dict(
            stride_an=1,
            stride_vd=1,
            HAS_STATE=state,
            HAS_ACTIVE=active,
            BLOCK_M=block_m,
            BLOCK_K=block_k,
            BLOCK_D=block_d,
        )
        cases.append(
            Case(
                f"spike_context N=197 D=64 state={state} active={active}",
                sa.spike_context_kernel,
                signature,
                constexprs,
                num_warps=num_warps,
                aligned=["D", "stride_vt", "stride_vb", "stride_vh", "stride_vn"]
                + ["stride_ot", "stride_ob", "stride_oh", "stride_om"],
                **dict(checks, ptx_must_contain=["wgmma", ".s32.s8.s8", "div.rn.f32"]),
            )
        )
    return cases


def tile_candidate_cases() -> list[Case]:
    """The hot kernels at each alternative tile shape that bench/bench_tiles.py times
    (``TILE_CANDIDATES`` beside each default): each must compile without a spill, as the
    defaults do. The module constant is set while the kernel's cases are built (they read it
    through the launchers' config functions), then restored."""
    from spikekernels.kernels import exact_attention as ea
    from spikekernels.kernels import exact_layernorm as eln
    from spikekernels.kernels import exact_linear as el
    from spikekernels.kernels import spike_linear_neuron as sln

    hot = [
        (el, "_GPU_TILES", exact_linear_cases, "exact_linear state=True per_channel=True "
         "active=True counts_out=False s_before=False"),
        (ea, "_ATTENTION_GPU", exact_attention_cases,
         "exact_attention (fused) N=197 D=64 state=True active=True"),
        (ea, "_ATTENTION_GPU", exact_attention_cases,
         "exact_attention (fused) N=197 D=64 state=True active=True qkv_active row flags "
         "settled"),
        (eln, "ELEMENTS_PER_PROGRAM", exact_layernorm_cases,
         "exact_layernorm_neuron C=384 residual=True per_channel=False active=True branch=1"),
        (sln, "_GPU_TILES", spike_linear_neuron_cases, "spike_linear_neuron weight=bf16x3 "
         "state=True per_channel=True float_out=False active=True"),
    ]  # fmt: skip
    cases = []
    for module, constant, factory, name in hot:
        default = getattr(module, constant)
        assert module.TILE_CANDIDATES[0] == default, f"{module.__name__}: default first"
        for candidate in module.TILE_CANDIDATES[1:]:
            setattr(module, constant, candidate)
            try:
                (case,) = [c for c in factory() if c.name == name]
            finally:
                setattr(module, constant, default)
            case.name = f"{name} tiles={candidate}"
            cases.append(case)
    # st_bif's launch (BLOCK, NUM_WARPS, STAGES), which bench/bench_neuron.py times
    from spikekernels.kernels import neuron

    name = "st_bif x=fp32 s=i8 float_out=False active=True"
    assert neuron.TILE_CANDIDATES[0] == (neuron.BLOCK, neuron.NUM_WARPS, neuron.STAGES)
    for block, warps, stages in neuron.TILE_CANDIDATES[1:]:
        (case,) = [c for c in neuron_cases() if c.name == name]
        case.constexprs = dict(case.constexprs, BLOCK=block, STAGES=stages)
        case.num_warps = warps
        if stages == 1:  # nothing to pipeline: plain loads, no asynchronous copies
            case.ptx_must_contain = [s for s in case.ptx_must_contain if s != "cp.async"]
        case.name = f"{name} launch={(block, warps, stages)}"
        cases.append(case)
    return cases


CASE_FACTORIES = [
    neuron_cases,
    spike_linear_cases,
    spike_linear_neuron_cases,
    layernorm_cases,
    spike_layernorm_neuron_cases,
    spike_matmul_cases,
    target_cases,
    exact_linear_cases,
    exact_layernorm_cases,
    exact_attention_cases,
    spike_attention_cases,
    exact_residual_cases,
    spike_count_cases,
    tile_candidate_cases,
]


def compile_case(case: Case) -> tuple[list[str], str]:
    """Compile one case; return the problems found (empty when fine) and a usage note."""
    constexprs = case.constexprs
    src = ASTSource(
        fn=case.kernel,
        signature=_with_constexprs(case.signature, constexprs),
        constexprs=constexprs,
        attrs=_attrs(case),
    )
    options = {"num_warps": case.num_warps, "num_stages": case.num_stages}
    try:
        compiled = triton.compile(src, target=TARGET, options=options)
    except Exception as exc:  # the compiler's own message is the useful part
        return [f"does not compile for sm_90: {type(exc).__name__}: {exc}"], ""
    ptx = compiled.asm["ptx"]
    problems = [f"PTX lacks {s!r}" for s in case.ptx_must_contain if s not in ptx]
    problems += [f"PTX contains {s!r}" for s in case.ptx_must_not_contain if s in ptx]
    if case.no_contracted_fma:
        fmas = re.findall(r"fma\.rn(?:\.ftz)?\.f32[^;]*;", ptx)
        contracted = [f for f in fmas if not _lone_or_exact_product(f)]
        if contracted:
            problems.append(f"{len(contracted)} contracted multiply-adds, e.g. {contracted[0]!r}")
    lost = _args_lost(case, compiled.asm)
    if lost:
        problems.append(f"arguments read in the TTIR but gone from the TTGIR: {lost}")
    copies = compiled.asm["ttgir"].count("ttg.async_copy_global_to_local")
    if copies < case.min_async_copies:
        problems.append(f"{copies} asynchronous copies, not {case.min_async_copies}: unpipelined")
    if not compiled.asm.get("cubin"):
        problems.append("no cubin produced")
    regs, spills = _ptxas_usage(ptx)
    if spills:
        problems.append(f"{spills} bytes of register spills")
    return problems, f"{regs} registers, {spills} B spilled"


def main() -> int:
    failures = 0
    for factory in CASE_FACTORIES:
        for case in factory():
            problems, usage = compile_case(case)
            status = "ok" if not problems else "FAIL"
            print(f"[{status}] {case.name}: {usage}")
            for problem in problems:
                print(f"    {problem}")
            failures += bool(problems)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

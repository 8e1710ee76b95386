"""Every Triton kernel compiles for sm_90 (the H200), checked without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import CPU_PASS_ONLY

SCRIPT = Path(__file__).with_name("triton_sm90.py")


@CPU_PASS_ONLY  # the same compile in either pass (TRITON_INTERPRET=0 in the subprocess)
def test_triton_kernels_compile_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[ok]" in result.stdout


def test_contracted_fma_check_passes_only_single_roundings():
    """The PTX check lets through a lone product (addend +0.0) and a product by an immediate
    power of two (exact), and flags any other multiply-add."""
    cases = {
        "fma.rn.f32 \t%r1, %r2, %r3, 0f00000000;": True,
        "fma.rn.f32 \t%r1, %r2, 0fB6000000, 0f3EFFFF80;": True,
        "fma.rn.f32 \t%r1, 0f40000000, %r2, %r3;": True,
        "fma.rn.f32 \t%r1, %r2, %r3, %r4;": False,
        "fma.rn.f32 \t%r1, %r2, 0f3F800001, %r4;": False,  # 1 + 2^-23: not a power of two
        "fma.rn.f32 \t%r1, %r2, 0f00000000, %r4;": False,  # zero: not a power of two
    }
    code = (
        "import triton_sm90 as t\n"
        f"cases = {cases!r}\n"
        "wrong = [f for f, ok in cases.items() if t._lone_or_exact_product(f) != ok]\n"
        "assert not wrong, wrong\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=SCRIPT.parent, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr

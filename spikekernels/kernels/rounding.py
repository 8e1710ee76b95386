"""Rounding helpers shared by the Triton kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bf16_bits_rtne(f):
    """float32 -> bfloat16 bits (int16), round to nearest even, for finite ``f``.

    Done by hand because the CPU interpreter truncates on a bf16 cast; the GPU's own cast
    rounds the same way as this. Store the result through an int16 view of the bf16 output.
    """
    bits = f.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.int16, bitcast=True)

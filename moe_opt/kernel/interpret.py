"""Work-arounds for Triton's CPU interpreter (TRITON_INTERPRET=1), used only when it runs the kernels.

Seen with Triton 3.9 on the CPU (tests/test_kernel.py checks them): its float32 -> bfloat16 cast truncates
instead of rounding to nearest, and its float32 -> float8_e4m3fn cast gets the carry wrong when rounding up
crosses a power of two (7.94 becomes 4, not 8). Kernels take an ``INTERP_ROUND`` constexpr that is True only
under the interpreter: they then round in float32 first, so the cast is exact. On the GPU the flag is False and
the branch is not compiled, so what the GPU runs is unchanged. The interpreter's tl.dot on two bf16 operands is
wrong as well (Triton 3.6 and 3.9); gemm.py upcasts those operands under the same condition (UPCAST_DOT). So is
its int8 -> bfloat16 cast (Triton 3.9: -1 becomes NaN, 1 a denormal): under UPCAST_DOT int8_w8a16 converts its
weights to float32 directly, the same values the GPU gets through bf16. Its libdevice (rint and friends) is not
implemented at all, so activation.py rounds to int8 with float32 arithmetic that is exact on both.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ROUND_NONE, ROUND_BF16, ROUND_FP8 = 0, 1, 2


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def round_mode(dtype: torch.dtype) -> int:
    """The INTERP_ROUND value for a kernel storing ``dtype``: a rounding mode under the interpreter, else 0."""
    if not interpreting():
        return ROUND_NONE
    return {torch.bfloat16: ROUND_BF16, torch.float8_e4m3fn: ROUND_FP8}.get(dtype, ROUND_NONE)


@triton.jit
def round_for_cast(x, MODE: tl.constexpr):
    """Round float32 ``x`` to the nearest bf16 (MODE 1) or float8_e4m3fn (MODE 2) value, kept in float32."""
    if MODE == 1:
        u = x.to(tl.uint32, bitcast=True)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        return u.to(tl.float32, bitcast=True)
    elif MODE == 2:
        u = x.to(tl.uint32, bitcast=True)
        u = ((u + 0x7FFFF + ((u >> 20) & 1)) >> 20) << 20
        normal = u.to(tl.float32, bitcast=True)
        # Below 2**-6, e4m3 values are subnormal: a fixed grid of 2**-9.
        sub = tl.floor(x * 512.0 + 0.5) / 512.0  # ties round up, not to even: rare and harmless
        return tl.where(tl.abs(x) < 0.015625, sub, normal)
    else:
        return x

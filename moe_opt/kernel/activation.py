"""Step 3 of the fused MoE (the gated activation) and the activation quantization of the w8a8 paths, as Triton kernels.

SwiGLU on GEMM1's output h (M*topk, 2N), gate = h[:, :N], up = h[:, N:]:

    act = silu(gate) * up                                   (swiglu_limit None)
    act = silu(min(gate, L)) * clamp(up, -L, L)             (swiglu_limit L; DeepSeek-V4, L = 10)

The gate is clamped from above only, the up projection on both sides. The result is written in the compute
dtype, or quantized to fp8 e4m3 or int8 in the same pass: per group of ``group_size`` columns of a token (block
fp8, one scale per group, scale = max|act| / 448), per token (the per-channel w8a8 paths: one group spanning the
row; int8 scale = max|act| / 127), or with one per-tensor scale given on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpret import round_for_cast, round_mode
from .quant import FP8_DTYPE, FP8_MAX, INT8_MAX, SCALE_EPS

OUT_PLAIN, OUT_STATIC, OUT_GROUP = 0, 1, 2
# float32 round-to-nearest-even for |x| < 2**22: adding 1.5 * 2**23 leaves no fraction bits. libdevice's rint is
# not available under the interpreter, and this is exact on both (Triton does not reassociate float adds).
RINT_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _quantize(y, scale, qmax, INT8: tl.constexpr, INTERP_ROUND: tl.constexpr):
    """y / scale clamped to +-qmax and rounded to the int8 (round half to even) or fp8 grid, in float32."""
    q = tl.clamp(y / scale, -qmax, qmax)
    if INT8:
        return (q + RINT_MAGIC) - RINT_MAGIC
    else:
        return round_for_cast(q, INTERP_ROUND)


@triton.jit
def _act_quant_kernel(x_ptr, out_ptr, scale_ptr, n_cols, stride_x, stride_out, stride_scale_row,
                      swiglu_limit, qmax, scale_eps,
                      GATED: tl.constexpr, HAS_LIMIT: tl.constexpr, OUT_MODE: tl.constexpr, INT8: tl.constexpr,
                      BLOCK: tl.constexpr, INTERP_ROUND: tl.constexpr):
    """One program per (row, BLOCK columns). With OUT_GROUP, BLOCK is the quantization group (for per-token
    quantization one power-of-two block covering the row, its tail masked)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    if GATED:
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_LIMIT:
            gate = tl.minimum(gate, swiglu_limit)
            up = tl.minimum(tl.maximum(up, -swiglu_limit), swiglu_limit)
        y = gate * tl.sigmoid(gate) * up
    else:
        y = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if OUT_MODE == 0:
        tl.store(out_ptr + row * stride_out + cols, round_for_cast(y, INTERP_ROUND).to(out_ptr.dtype.element_ty),
                 mask=mask)
    elif OUT_MODE == 1:
        q = _quantize(y, tl.load(scale_ptr), qmax, INT8, INTERP_ROUND)
        tl.store(out_ptr + row * stride_out + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        amax = tl.max(tl.abs(tl.where(mask, y, 0.0)), axis=0)
        scale = tl.maximum(amax, scale_eps) / qmax
        q = _quantize(y, scale, qmax, INT8, INTERP_ROUND)
        tl.store(out_ptr + row * stride_out + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row * stride_scale_row + tl.program_id(1), scale)


def _launch(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None, n_cols: int, *, gated: bool,
            swiglu_limit: float | None, out_mode: int, block: int) -> None:
    rows = x.shape[0]
    if rows == 0:
        return
    grid = (rows, triton.cdiv(n_cols, block))
    int8 = out.dtype == torch.int8
    _act_quant_kernel[grid](
        x, out, scale, n_cols, x.stride(0), out.stride(0), scale.stride(0) if scale is not None and scale.dim() == 2 else 0,
        float(swiglu_limit) if swiglu_limit is not None else 0.0, INT8_MAX if int8 else FP8_MAX, SCALE_EPS,
        GATED=gated, HAS_LIMIT=swiglu_limit is not None, OUT_MODE=out_mode, INT8=int8, BLOCK=block,
        INTERP_ROUND=round_mode(out.dtype),
        num_warps=8 if block >= 4096 else 4 if block >= 512 else 1,
    )


def _check_qdtype(dtype: torch.dtype) -> None:
    if dtype not in (FP8_DTYPE, torch.int8):
        raise ValueError(f"activations quantize to float8_e4m3fn or int8, got {dtype}")


def swiglu(h: torch.Tensor, swiglu_limit: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up of ``h`` (rows, 2N), clamped by ``swiglu_limit`` when given; same dtype as ``h``.

    Example:
        >>> import torch
        >>> h = torch.tensor([[20.0, -1.0, 30.0, 2.0]])
        >>> swiglu(h, swiglu_limit=10.0)  # doctest: +SKIP
        tensor([[99.9955, -0.5379]])
    """
    n = h.shape[1] // 2
    out = torch.empty(h.shape[0], n, dtype=h.dtype, device=h.device) if out is None else out
    _launch(h, out, None, n, gated=True, swiglu_limit=swiglu_limit, out_mode=OUT_PLAIN,
            block=min(1024, triton.next_power_of_2(n)))
    return out


def swiglu_quant_group(h: torch.Tensor, group_size: int, swiglu_limit: float | None = None,
                       dtype: torch.dtype = FP8_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU fused with per-token-group quantization: (q (rows, N), float32 scales (rows, N/group))."""
    _check_qdtype(dtype)
    n = h.shape[1] // 2
    q = torch.empty(h.shape[0], n, dtype=dtype, device=h.device)
    scales = torch.empty(h.shape[0], triton.cdiv(n, group_size), dtype=torch.float32, device=h.device)
    _launch(h, q, scales, n, gated=True, swiglu_limit=swiglu_limit, out_mode=OUT_GROUP, block=group_size)
    return q, scales


def swiglu_quant_token(h: torch.Tensor, swiglu_limit: float | None = None, dtype: torch.dtype = FP8_DTYPE
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU fused with per-token quantization: (q (rows, N), float32 scales (rows, 1)), as the per-channel
    w8a8 paths need GEMM2's input."""
    _check_qdtype(dtype)
    n = h.shape[1] // 2
    q = torch.empty(h.shape[0], n, dtype=dtype, device=h.device)
    scales = torch.empty(h.shape[0], 1, dtype=torch.float32, device=h.device)
    _launch(h, q, scales, n, gated=True, swiglu_limit=swiglu_limit, out_mode=OUT_GROUP,
            block=triton.next_power_of_2(n))
    return q, scales


def quant_group(x: torch.Tensor, group_size: int, dtype: torch.dtype = FP8_DTYPE
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group quantization of ``x`` (rows, K): (q (rows, K), float32 scales (rows, K/group))."""
    _check_qdtype(dtype)
    k = x.shape[1]
    q = torch.empty(x.shape[0], k, dtype=dtype, device=x.device)
    scales = torch.empty(x.shape[0], triton.cdiv(k, group_size), dtype=torch.float32, device=x.device)
    _launch(x, q, scales, k, gated=False, swiglu_limit=None, out_mode=OUT_GROUP, block=group_size)
    return q, scales


def quant_token(x: torch.Tensor, dtype: torch.dtype = FP8_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization of ``x`` (rows, K): (q (rows, K), float32 scales (rows, 1))."""
    _check_qdtype(dtype)
    k = x.shape[1]
    q = torch.empty(x.shape[0], k, dtype=dtype, device=x.device)
    scales = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    _launch(x, q, scales, k, gated=False, swiglu_limit=None, out_mode=OUT_GROUP, block=triton.next_power_of_2(k))
    return q, scales


def quant_static(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = FP8_DTYPE) -> torch.Tensor:
    """Quantization of ``x`` (rows, K) with one per-tensor ``scale`` (a 1-element device tensor)."""
    _check_qdtype(dtype)
    k = x.shape[1]
    q = torch.empty(x.shape[0], k, dtype=dtype, device=x.device)
    _launch(x, q, scale, k, gated=False, swiglu_limit=None, out_mode=OUT_STATIC,
            block=min(1024, triton.next_power_of_2(k)))
    return q


def dynamic_tensor_scale(x: torch.Tensor, dtype: torch.dtype = FP8_DTYPE,
                         rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-tensor scale max|x| / 448 (fp8) or / 127 (int8) as a 1-element float32 device tensor (no host sync);
    with a boolean ``rows`` mask, over those rows only (an expert-sorted x has rows nothing wrote)."""
    qmax = INT8_MAX if dtype == torch.int8 else FP8_MAX
    a = x.abs() if rows is None else torch.where(rows[:, None], x.abs(), 0)
    return (a.amax().float().clamp_min(SCALE_EPS) / qmax).reshape(1)

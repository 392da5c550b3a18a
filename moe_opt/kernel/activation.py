"""Step 3 of the fused MoE (the gated activation) and the fp8 activation quantization, as Triton kernels.

SwiGLU on GEMM1's output h (M*topk, 2N), gate = h[:, :N], up = h[:, N:]:

    act = silu(gate) * up                                   (swiglu_limit None)
    act = silu(min(gate, L)) * clamp(up, -L, L)             (swiglu_limit L; DeepSeek-V4, L = 10)

The gate is clamped from above only, the up projection on both sides. The result is written in the compute
dtype, or quantized to fp8 e4m3 in the same pass: per token group of ``group_size`` columns (block fp8, one
scale per group, scale = max|act| / 448) or with one per-tensor scale given on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpret import round_for_cast, round_mode

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Scales are floored so an all-zero group quantizes to zeros rather than NaN (SGLang uses the same eps).
SCALE_EPS = 1e-10

OUT_PLAIN, OUT_FP8_STATIC, OUT_FP8_GROUP = 0, 1, 2


@triton.jit
def _act_quant_kernel(x_ptr, out_ptr, scale_ptr, n_cols, stride_x, stride_out, stride_scale_row,
                      swiglu_limit, fp8_max, scale_eps,
                      GATED: tl.constexpr, HAS_LIMIT: tl.constexpr, OUT_MODE: tl.constexpr,
                      BLOCK: tl.constexpr, INTERP_ROUND: tl.constexpr):
    """One program per (row, BLOCK columns). With OUT_FP8_GROUP, BLOCK is the quantization group size."""
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
        scale = tl.load(scale_ptr)
        q = round_for_cast(tl.clamp(y / scale, -fp8_max, fp8_max), INTERP_ROUND)
        tl.store(out_ptr + row * stride_out + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        amax = tl.max(tl.abs(tl.where(mask, y, 0.0)), axis=0)
        scale = tl.maximum(amax, scale_eps) / fp8_max
        q = round_for_cast(tl.clamp(y / scale, -fp8_max, fp8_max), INTERP_ROUND)
        tl.store(out_ptr + row * stride_out + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row * stride_scale_row + tl.program_id(1), scale)


def _launch(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None, n_cols: int, *, gated: bool,
            swiglu_limit: float | None, out_mode: int, block: int) -> None:
    rows = x.shape[0]
    if rows == 0:
        return
    grid = (rows, triton.cdiv(n_cols, block))
    _act_quant_kernel[grid](
        x, out, scale, n_cols, x.stride(0), out.stride(0), scale.stride(0) if scale is not None and scale.dim() == 2 else 0,
        float(swiglu_limit) if swiglu_limit is not None else 0.0, FP8_MAX, SCALE_EPS,
        GATED=gated, HAS_LIMIT=swiglu_limit is not None, OUT_MODE=out_mode, BLOCK=block,
        INTERP_ROUND=round_mode(out.dtype),
        num_warps=4 if block >= 512 else 1,
    )


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


def swiglu_quant_group(h: torch.Tensor, group_size: int, swiglu_limit: float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU fused with per-token-group fp8 quantization: (fp8 (rows, N), float32 scales (rows, N/group))."""
    n = h.shape[1] // 2
    q = torch.empty(h.shape[0], n, dtype=FP8_DTYPE, device=h.device)
    scales = torch.empty(h.shape[0], triton.cdiv(n, group_size), dtype=torch.float32, device=h.device)
    _launch(h, q, scales, n, gated=True, swiglu_limit=swiglu_limit, out_mode=OUT_FP8_GROUP, block=group_size)
    return q, scales


def quant_group(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group fp8 quantization of ``x`` (rows, K): (fp8 (rows, K), float32 scales (rows, K/group))."""
    k = x.shape[1]
    q = torch.empty(x.shape[0], k, dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty(x.shape[0], triton.cdiv(k, group_size), dtype=torch.float32, device=x.device)
    _launch(x, q, scales, k, gated=False, swiglu_limit=None, out_mode=OUT_FP8_GROUP, block=group_size)
    return q, scales


def quant_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 quantization of ``x`` (rows, K) with one per-tensor ``scale`` (a 1-element device tensor)."""
    k = x.shape[1]
    q = torch.empty(x.shape[0], k, dtype=FP8_DTYPE, device=x.device)
    _launch(x, q, scale, k, gated=False, swiglu_limit=None, out_mode=OUT_FP8_STATIC,
            block=min(1024, triton.next_power_of_2(k)))
    return q


def dynamic_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor fp8 scale max|x| / 448 as a 1-element float32 device tensor (no host sync)."""
    return (x.abs().amax().float().clamp_min(SCALE_EPS) / FP8_MAX).reshape(1)

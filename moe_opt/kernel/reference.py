"""A plain torch reference of the fused MoE in float64, independent of the Triton kernels.

The reference dequantizes the weights of every format from what the kernel reads (packed weights, scales, zero
points) and, for the w8a8 paths, reproduces the activation quantization in float64 (``emulate_activation_quant``),
so the kernel's remaining error is its own arithmetic, not fp8/int8 rounding.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .quant import (
    FP8_DTYPE,
    FP8_MAX,
    INT4_ZERO_POINT,
    INT8_MAX,
    SCALE_EPS,
    UINT8_ZERO_POINT,
    group_size_of,
    quantize_weight_fp8,
    resolve_quant_dtype,
    unpack_int4,
)

__all__ = ["fused_moe_reference", "reference_weights", "dequantize_weight", "swiglu_reference", "quant_group_reference",
           "quant_tensor_reference", "quantize_weight_fp8"]  # quantize_weight_fp8 lived here; quant.py now


def swiglu_reference(h: torch.Tensor, swiglu_limit: float | None = None) -> torch.Tensor:
    """silu(gate) * up on the last dim of ``h`` (gate first), clamped like DeepSeek-V4 when a limit is set."""
    n = h.shape[-1] // 2
    gate, up = h[..., :n], h[..., n:]
    if swiglu_limit is not None:
        gate = gate.clamp(max=swiglu_limit)
        up = up.clamp(-swiglu_limit, swiglu_limit)
    return torch.nn.functional.silu(gate) * up


def _quant_dequant(x: torch.Tensor, scale: torch.Tensor, int8: bool) -> torch.Tensor:
    """x / scale rounded to the int8 grid (half to even, +-127) or to float8_e4m3fn, times scale."""
    q = x / scale
    if int8:
        q = q.round().clamp(-INT8_MAX, INT8_MAX)
    else:
        q = q.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(x.dtype)
    return q * scale


def quant_group_reference(x: torch.Tensor, group_size: int, int8: bool = False) -> torch.Tensor:
    """Per-token-group quantize-dequantize of ``x`` (rows, cols) in x's precision; ``group_size=cols`` is per
    token. Scale max|group| / 448 (fp8) or / 127 (int8)."""
    rows, cols = x.shape
    g = x.reshape(rows, cols // group_size, group_size)
    scale = g.abs().amax(-1, keepdim=True).clamp_min(SCALE_EPS) / (INT8_MAX if int8 else FP8_MAX)
    return _quant_dequant(g, scale, int8).reshape(rows, cols)


def quant_tensor_reference(x: torch.Tensor, scale: torch.Tensor | None = None, int8: bool = False) -> torch.Tensor:
    """Per-tensor quantize-dequantize (dynamic scale max|x| / 448 or / 127 unless ``scale`` is given)."""
    qmax = INT8_MAX if int8 else FP8_MAX
    s = x.abs().amax().clamp_min(SCALE_EPS) / qmax if scale is None else scale.to(x.dtype).reshape(())
    return _quant_dequant(x, s, int8)


def dequantize_weight(w: torch.Tensor, scale: torch.Tensor | None, block_shape: Sequence[int] | None = None, *,
                      quant_dtype: str | None = None, zp: torch.Tensor | None = None) -> torch.Tensor:
    """float64 weights (E, rows, cols) from any format: fp8/int8 with scales per expert, per output channel
    ((E, rows) or (E, rows, 1)) or per [block_n, block_k] block; group-quantized int4 (packed two per byte along
    cols, zero points packed along rows) or uint8 with block_shape [0, group_size] as ``(q - zp) * scale``.

    Example:
        >>> from moe_opt.kernel.quant import quantize_weights
        >>> w = torch.randn(2, 8, 64)
        >>> q, s, z = quantize_weights(w, "int4_w4a16", group_size=32, zero_point=True)
        >>> W = dequantize_weight(q, s, [0, 32], quant_dtype="int4_w4a16", zp=z)
        >>> bool(((W - w.double()).abs() <= s.double().repeat_interleave(32, 2) / 2 + 1e-6).all())
        True
    """
    quant_dtype = resolve_quant_dtype(w.dtype, quant_dtype)
    int4 = quant_dtype == "int4_w4a16"
    group_size = group_size_of(quant_dtype, block_shape)
    q = (unpack_int4(w, dim=-1) if int4 else w).double()
    if group_size is not None:
        if zp is None:
            z = float(INT4_ZERO_POINT if int4 else UINT8_ZERO_POINT)
        else:
            z = (unpack_int4(zp, dim=1) if int4 else zp).double().repeat_interleave(group_size, dim=2)
        return (q - z) * scale.double().repeat_interleave(group_size, dim=2)
    if scale is None:
        return q
    E, rows, cols = q.shape
    if block_shape is not None:
        bn, bk = block_shape
        s = scale.double().repeat_interleave(bn, dim=1).repeat_interleave(bk, dim=2)
        return q * s[:, :rows, :cols]
    if scale.numel() == E:
        return q * scale.double().reshape(E, 1, 1)
    return q * scale.double().reshape(E, rows, 1)  # per output channel


def reference_weights(w1: torch.Tensor, w2: torch.Tensor, dtype: torch.dtype, *, quant_dtype: str | None = None,
                      block_shape: Sequence[int] | None = None, w1_scale: torch.Tensor | None = None,
                      w2_scale: torch.Tensor | None = None, w1_zp: torch.Tensor | None = None,
                      w2_zp: torch.Tensor | None = None, round_intermediates: bool = True,
                      **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(W1, W2): the weights as :func:`fused_moe_reference` computes with them, float64 on the CPU: dequantized,
    and rounded to the activations' ``dtype`` where the kernel feeds group-dequantized weights to the dot in it.
    Takes fused_moe's weight arguments (others are ignored).

    Example:
        >>> W1, W2 = reference_weights(torch.randn(2, 6, 8), torch.randn(2, 8, 3), torch.float32)
        >>> W1.dtype, tuple(W2.shape)
        (torch.float64, (2, 8, 3))
    """
    quant_dtype = resolve_quant_dtype(w1.dtype, quant_dtype)

    def cpu(t):
        return None if t is None else t.cpu()

    W1 = dequantize_weight(w1.cpu(), cpu(w1_scale), block_shape, quant_dtype=quant_dtype, zp=cpu(w1_zp))
    W2 = dequantize_weight(w2.cpu(), cpu(w2_scale), block_shape, quant_dtype=quant_dtype, zp=cpu(w2_zp))
    if round_intermediates and group_size_of(quant_dtype, block_shape) is not None:
        W1, W2 = W1.to(dtype).double(), W2.to(dtype).double()
    return W1, W2


def fused_moe_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, *, swiglu_limit: float | None = None,
                        quant_dtype: str | None = None, per_channel_quant: bool = False,
                        block_shape: Sequence[int] | None = None, w1_scale: torch.Tensor | None = None,
                        w2_scale: torch.Tensor | None = None, w1_zp: torch.Tensor | None = None,
                        w2_zp: torch.Tensor | None = None, a1_scale: torch.Tensor | None = None,
                        a2_scale: torch.Tensor | None = None, emulate_activation_quant: bool = True,
                        round_intermediates: bool = True,
                        dequantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The fused MoE in float64 on the CPU, expert by expert; returns (M, K) float64. Takes fused_moe's arguments.

    With ``round_intermediates`` the GEMM1 output and the activation are rounded to x's dtype where the kernel
    stores them, and group-dequantized weights where the kernel feeds them to the dot in that dtype (SGLang's
    gptq/awq kernel does). With ``emulate_activation_quant`` the w8a8 paths quantize activations like the kernel:
    per tensor, per token (per_channel_quant) or per token group (block fp8). Both keep the comparison about
    the kernel's arithmetic rather than storage formats. ``dequantized``: what :func:`reference_weights` returned
    for these w1, w2 and scales, so that many comparisons against the same experts dequantize them once.

    Example:
        >>> import torch
        >>> x = torch.randn(3, 8); w1 = torch.randn(2, 6, 8); w2 = torch.randn(2, 8, 3)
        >>> out = fused_moe_reference(x, w1, w2, torch.ones(3, 1), torch.tensor([[0], [1], [-1]]))
        >>> out.shape, bool(out[2].eq(0).all())
        (torch.Size([3, 8]), True)
    """
    quant_dtype = resolve_quant_dtype(w1.dtype, quant_dtype)
    W1, W2 = dequantized if dequantized is not None else reference_weights(
        w1, w2, x.dtype, quant_dtype=quant_dtype, block_shape=block_shape, w1_scale=w1_scale, w2_scale=w2_scale,
        w1_zp=w1_zp, w2_zp=w2_zp, round_intermediates=round_intermediates)

    def cpu(t):
        return None if t is None else t.cpu()

    # How activations are quantized: per token group (block fp8), per token, per tensor, or not (w*a16).
    act_quant = None
    if quant_dtype in ("fp8_w8a8", "int8_w8a8"):
        act_quant = "group" if block_shape is not None else "token" if per_channel_quant else "tensor"
    int8 = quant_dtype == "int8_w8a8"

    def quantize(t: torch.Tensor, static_scale: torch.Tensor | None) -> torch.Tensor:
        if not emulate_activation_quant:
            return t
        if act_quant == "group":
            return quant_group_reference(t, block_shape[1])
        if act_quant == "token":
            return quant_group_reference(t, t.shape[1], int8)
        if act_quant == "tensor":
            return quant_tensor_reference(t, cpu(static_scale), int8)
        return t

    a = quantize(x.cpu().double(), a1_scale)
    ids = topk_ids.cpu().long()
    weights = topk_weights.cpu().double()
    M, topk = ids.shape
    K = x.shape[1]
    out = torch.zeros(M, K, dtype=torch.float64)
    hidden = torch.zeros(M, topk, W2.shape[2], dtype=torch.float64)
    for e in ids.unique().tolist():
        if e < 0:
            continue
        rows, slots = (ids == e).nonzero(as_tuple=True)
        h = a[rows] @ W1[e].T
        if round_intermediates:
            h = h.to(x.dtype).double()
        g = swiglu_reference(h, swiglu_limit)
        if round_intermediates and act_quant not in ("group", "token"):
            g = g.to(x.dtype).double()  # per group/token quantization reads the activation straight from float32
        hidden[rows, slots] = g
    hidden = quantize(hidden.reshape(M * topk, -1), a2_scale).reshape(M, topk, -1)
    for e in ids.unique().tolist():
        if e < 0:
            continue
        rows, slots = (ids == e).nonzero(as_tuple=True)
        out.index_add_(0, rows, (hidden[rows, slots] @ W2[e].T) * weights[rows, slots, None])
    return out

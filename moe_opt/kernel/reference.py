"""A plain torch reference of the fused MoE in float64, and helpers that quantize weights like the checkpoints do.

The reference dequantizes fp8 weights and, for fp8 paths, reproduces the activation quantization in float64
(``emulate_activation_quant``), so the kernel's remaining error is its own arithmetic, not fp8 rounding.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .activation import FP8_DTYPE, FP8_MAX, SCALE_EPS


def swiglu_reference(h: torch.Tensor, swiglu_limit: float | None = None) -> torch.Tensor:
    """silu(gate) * up on the last dim of ``h`` (gate first), clamped like DeepSeek-V4 when a limit is set."""
    n = h.shape[-1] // 2
    gate, up = h[..., :n], h[..., n:]
    if swiglu_limit is not None:
        gate = gate.clamp(max=swiglu_limit)
        up = up.clamp(-swiglu_limit, swiglu_limit)
    return torch.nn.functional.silu(gate) * up


def _round_fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(x.dtype)


def quant_group_reference(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-token-group fp8 quantize-dequantize of ``x`` (rows, cols) in x's precision."""
    rows, cols = x.shape
    g = x.reshape(rows, cols // group_size, group_size)
    scale = g.abs().amax(-1, keepdim=True).clamp_min(SCALE_EPS) / FP8_MAX
    return (_round_fp8(g / scale) * scale).reshape(rows, cols)


def quant_tensor_reference(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per-tensor fp8 quantize-dequantize (dynamic scale max|x|/448 unless ``scale`` is given)."""
    s = x.abs().amax().clamp_min(SCALE_EPS) / FP8_MAX if scale is None else scale.to(x.dtype).reshape(())
    return _round_fp8(x / s) * s


def dequantize_weight(w: torch.Tensor, scale: torch.Tensor | None,
                      block_shape: Sequence[int] | None) -> torch.Tensor:
    """float64 weights (E, rows, cols) from fp8 + scales (per expert, or per [block_n, block_k] block)."""
    w64 = w.double()
    if scale is None:
        return w64
    if block_shape is None:
        return w64 * scale.double().reshape(-1, 1, 1)
    bn, bk = block_shape
    s = scale.double().repeat_interleave(bn, dim=1).repeat_interleave(bk, dim=2)
    return w64 * s[:, : w.shape[1], : w.shape[2]]


def fused_moe_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, *, swiglu_limit: float | None = None,
                        block_shape: Sequence[int] | None = None, w1_scale: torch.Tensor | None = None,
                        w2_scale: torch.Tensor | None = None, a1_scale: torch.Tensor | None = None,
                        a2_scale: torch.Tensor | None = None, emulate_activation_quant: bool = True,
                        round_intermediates: bool = True) -> torch.Tensor:
    """The fused MoE in float64 on the CPU, expert by expert; returns (M, K) float64.

    With ``round_intermediates`` the GEMM1 output and the activation are rounded to x's dtype, where the
    kernel stores them; with ``emulate_activation_quant`` fp8 paths quantize activations like the kernel.
    Both keep the comparison about the kernel's arithmetic rather than storage formats.

    Example:
        >>> import torch
        >>> x = torch.randn(3, 8); w1 = torch.randn(2, 6, 8); w2 = torch.randn(2, 8, 3)
        >>> out = fused_moe_reference(x, w1, w2, torch.ones(3, 1), torch.tensor([[0], [1], [-1]]))
        >>> out.shape, bool(out[2].eq(0).all())
        (torch.Size([3, 8]), True)
    """
    fp8 = w1.dtype == FP8_DTYPE
    W1 = dequantize_weight(w1.cpu(), None if w1_scale is None else w1_scale.cpu(), block_shape)
    W2 = dequantize_weight(w2.cpu(), None if w2_scale is None else w2_scale.cpu(), block_shape)
    a = x.cpu().double()
    if fp8 and emulate_activation_quant:
        a = (quant_group_reference(a, block_shape[1]) if block_shape is not None
             else quant_tensor_reference(a, None if a1_scale is None else a1_scale.cpu()))
    ids = topk_ids.cpu().long()
    weights = topk_weights.cpu().double()
    M, topk = ids.shape
    out = torch.zeros(M, w2.shape[1], dtype=torch.float64)
    hidden = torch.zeros(M, topk, w2.shape[2], dtype=torch.float64)
    for e in ids.unique().tolist():
        if e < 0:
            continue
        rows, slots = (ids == e).nonzero(as_tuple=True)
        h = a[rows] @ W1[e].T
        if round_intermediates:
            h = h.to(x.dtype).double()
        g = swiglu_reference(h, swiglu_limit)
        if round_intermediates and not (fp8 and block_shape is not None):
            g = g.to(x.dtype).double()  # block fp8 quantizes the activation straight from float32
        hidden[rows, slots] = g
    if fp8 and emulate_activation_quant:
        flat = hidden.reshape(M * topk, -1)
        flat = (quant_group_reference(flat, block_shape[1]) if block_shape is not None
                else quant_tensor_reference(flat, None if a2_scale is None else a2_scale.cpu()))
        hidden = flat.reshape(M, topk, -1)
    for e in ids.unique().tolist():
        if e < 0:
            continue
        rows, slots = (ids == e).nonzero(as_tuple=True)
        out.index_add_(0, rows, (hidden[rows, slots] @ W2[e].T) * weights[rows, slots, None])
    return out


def quantize_weight_fp8(w: torch.Tensor, block_shape: Sequence[int] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float weights (E, rows, cols) to float8_e4m3fn with per-expert or per-block float32 scales."""
    w = w.float()
    E, rows, cols = w.shape
    if block_shape is None:
        scale = w.abs().amax(dim=(1, 2)).clamp_min(SCALE_EPS) / FP8_MAX
        return (w / scale.reshape(E, 1, 1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
    bn, bk = block_shape
    nb_r, nb_c = -(-rows // bn), -(-cols // bk)
    padded = torch.zeros(E, nb_r * bn, nb_c * bk, dtype=w.dtype, device=w.device)
    padded[:, :rows, :cols] = w
    blocks = padded.reshape(E, nb_r, bn, nb_c, bk)
    scale = blocks.abs().amax(dim=(2, 4)).clamp_min(SCALE_EPS) / FP8_MAX
    q = (blocks / scale[:, :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(E, nb_r * bn, nb_c * bk)[:, :rows, :cols].contiguous(), scale

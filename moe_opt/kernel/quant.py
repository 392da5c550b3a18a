"""The weight formats of the quantized paths: how each ``quant_dtype`` stores weights and scales, quantizers that
build such weights, and what the candidate space needs to know about each format.

The formats are SGLang's (``fused_moe_triton_kernels.py``, ``quantization/moe_wna16.py``), so weights laid out
for SGLang run here unchanged. w1 is (E, 2N, K), w2 is (E, K, N); "rows" below are the output channels (2N or K):

    quant_dtype  weights                               weight scales                          activations
    fp8_w8a8     float8_e4m3fn                         (E,); (E, rows); or per [bn, bk] block  fp8 per tensor, token, group
    int8_w8a8    int8                                  (E,); (E, rows) with per_channel_quant  int8 per tensor/token
    int8_w8a16   int8; uint8 with block_shape [0, g]   (E, rows); (E, rows, cols/g) per group  bf16/fp16 as given
    int4_w4a16   uint8 (E, rows, cols/2), 2 int4/byte  (E, rows, cols/g), block_shape [0, g]   bf16/fp16 as given

Per-channel scales may carry a trailing 1, (E, rows, 1), as SGLang's compressed-tensors checkpoints store them.
Group-quantized weights (GPTQ/AWQ, SGLang's ``fused_moe_kernel_gptq_awq``) are dequantized as
``(q - zero_point) * scale``; without zero points the zero point is 8 for int4 and 128 for uint8.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError

QUANT_DTYPES = ("fp8_w8a8", "int8_w8a8", "int8_w8a16", "int4_w4a16")
FP8_EXPERTS_AT_ONCE = 16  # experts quantized together by quantize_weight_fp8 (bounds its temporaries)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0  # SGLang's per-token int8 scale is max|x| / 127 (int8_kernel.py, per_token_quant_int8)
# Scales are floored so an all-zero group quantizes to zeros rather than NaN (SGLang uses the same eps).
SCALE_EPS = 1e-10
# Zero points fused_moe_kernel_gptq_awq subtracts when a checkpoint has none (symmetric GPTQ): 8 for int4, 128
# for uint8 weights. They are also GPTQ's own symmetric zero point, (maxq + 1) / 2.
INT4_ZERO_POINT, UINT8_ZERO_POINT = 8, 128

def resolve_quant_dtype(weight_dtype: torch.dtype, quant_dtype: str | None) -> str | None:
    """The quant_dtype of a call: as given, else "fp8_w8a8" for fp8 weights and None for bf16/fp16 weights.

    Example:
        >>> resolve_quant_dtype(torch.float8_e4m3fn, None), resolve_quant_dtype(torch.bfloat16, None)
        ('fp8_w8a8', None)
    """
    if quant_dtype is not None:
        if quant_dtype not in QUANT_DTYPES:
            raise ConfigError(f"quant_dtype must be one of {', '.join(QUANT_DTYPES)} or None, got {quant_dtype!r}")
        return quant_dtype
    if weight_dtype == FP8_DTYPE:
        return "fp8_w8a8"
    if weight_dtype in (torch.int8, torch.uint8):
        raise ConfigError(f"{weight_dtype} weights need quant_dtype ('int8_w8a8', 'int8_w8a16' or 'int4_w4a16')")
    return None


def group_size_of(quant_dtype: str | None, block_shape: Sequence[int] | None) -> int | None:
    """The K group size of group-quantized weights (``block_shape [0, group_size]``, SGLang's moe_wna16), else None."""
    if quant_dtype in ("int8_w8a16", "int4_w4a16") and block_shape is not None and block_shape[1] > 0:
        return int(block_shape[1])
    return None


def pack_int4(q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Pack int4 values (0..15, any integer dtype) two per uint8 along ``dim``: element 2i in the low nibble.

    That is SGLang's layout for fused_moe_kernel_gptq_awq: weights packed along K (the kernel shifts by
    ``(k % 2) * 4``), zero points along N (``(n % 2) * 4``); moe_wna16.py repacks AWQ/GPTQ checkpoints into it.

    Example:
        >>> pack_int4(torch.tensor([[1, 2, 15, 0]]))
        tensor([[33, 15]], dtype=torch.uint8)
    """
    q = q.movedim(dim, -1).to(torch.uint8)
    if q.shape[-1] % 2:
        raise ConfigError(f"int4 packing needs an even length along dim {dim}, got {q.shape[-1]}")
    packed = (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)
    return packed.movedim(-1, dim).contiguous()


def unpack_int4(packed: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: uint8 values 0..15, twice as long along ``dim``.

    Example:
        >>> unpack_int4(torch.tensor([[33, 15]], dtype=torch.uint8))
        tensor([[ 1,  2, 15,  0]], dtype=torch.uint8)
    """
    p = packed.movedim(dim, -1)
    q = torch.stack((p & 0xF, p >> 4), dim=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])
    return q.movedim(-1, dim).contiguous()


def quantize_weight_fp8(w: torch.Tensor, block_shape: Sequence[int] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float weights (E, rows, cols) to float8_e4m3fn with per-expert or per-block float32 scales.

    Scales are per expert or per block, so experts are quantized ``FP8_EXPERTS_AT_ONCE`` at a time into the
    result: the same values, and float32 temporaries of a few experts instead of the whole weight (DeepSeek-V4-Flash
    TP8's w1 took ~10 GiB of temporaries, which in 14 compile workers starting at once ran an H200 out of memory).
    """
    E = w.shape[0]
    if E <= FP8_EXPERTS_AT_ONCE:
        return _quantize_weight_fp8(w, block_shape)
    q0, s0 = _quantize_weight_fp8(w[:FP8_EXPERTS_AT_ONCE], block_shape)
    q = torch.empty((E, *q0.shape[1:]), dtype=q0.dtype, device=w.device)
    scale = torch.empty((E, *s0.shape[1:]), dtype=s0.dtype, device=w.device)
    q[:FP8_EXPERTS_AT_ONCE], scale[:FP8_EXPERTS_AT_ONCE] = q0, s0
    for start in range(FP8_EXPERTS_AT_ONCE, E, FP8_EXPERTS_AT_ONCE):
        stop = min(start + FP8_EXPERTS_AT_ONCE, E)
        q[start:stop], scale[start:stop] = _quantize_weight_fp8(w[start:stop], block_shape)
    return q, scale


def _quantize_weight_fp8(w: torch.Tensor, block_shape: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
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


def _quantize_groups(w: torch.Tensor, group_size: int, bits: int, zero_point: bool, scale_dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's quantizer on groups of ``group_size`` columns: (q 0..2**bits-1, scale, zero point), unpacked.

    Symmetric: scale = 2 max|w| / maxq and zero point (maxq + 1) / 2; asymmetric: the range [min(w, 0),
    max(w, 0)] over maxq steps and zero point round(-min / scale). The scale is rounded to ``scale_dtype`` before
    q is computed, so q fits the scale stored.
    """
    E, rows, cols = w.shape
    if group_size <= 0 or cols % group_size:
        raise ConfigError(f"group size {group_size} must divide the weights' K dimension {cols}")
    maxq = 2 ** bits - 1
    g = w.float().reshape(E, rows, cols // group_size, group_size)
    if zero_point:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = ((hi - lo).clamp_min(SCALE_EPS) / maxq).to(scale_dtype)
        zp = (-lo / scale.float()).round().clamp(0, maxq)
    else:
        scale = (2 * g.abs().amax(-1).clamp_min(SCALE_EPS) / maxq).to(scale_dtype)
        zp = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.float32)
    q = ((g / scale.float()[..., None]).round() + zp[..., None]).clamp(0, maxq)
    return q.reshape(E, rows, cols).to(torch.uint8), scale, zp.to(torch.uint8)


def quantize_weights(w: torch.Tensor, quant_dtype: str | None, *, per_channel_quant: bool = False,
                     group_size: int | None = None, zero_point: bool = False,
                     block_shape: Sequence[int] | None = None, scale_dtype: torch.dtype = torch.float32
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Quantize float weights (E, rows, cols), w1 or w2, to a format that :func:`~moe_opt.fused_moe` reads.

    Args:
        w: (E, rows, cols) float weights.
        quant_dtype: "fp8_w8a8", "int8_w8a8", "int8_w8a16", "int4_w4a16", or None (returned as is).
        per_channel_quant: fp8_w8a8/int8_w8a8: one scale per output row instead of one per expert.
        group_size: int4_w4a16 (required) and int8_w8a16: scales per group of ``group_size`` columns, the
            GPTQ/AWQ format of SGLang's moe_wna16 (uint8 storage, call with ``block_shape=[0, group_size]``).
            Without it int8_w8a16 is signed int8 with per-channel scales.
        zero_point: for group quantization, asymmetric with zero points (AWQ, GPTQ sym=False) instead of the
            fixed zero point 8 (int4) or 128 (uint8).
        block_shape: fp8_w8a8 block-wise [block_n, block_k] scales (DeepSeek V3/V4).
        scale_dtype: dtype of the group scales (checkpoints store them in bf16/fp16); per-channel, per-tensor
            and block scales are float32.

    Returns:
        (qweight, scale, zero_point or None). int4 packs two values per byte along cols; its zero points,
        (E, rows/2, cols/group_size), along rows (SGLang's layout, see :func:`pack_int4`).

    Example:
        >>> w = torch.randn(2, 64, 128)
        >>> q, s, z = quantize_weights(w, "int4_w4a16", group_size=32, zero_point=True)
        >>> q.shape, q.dtype, s.shape, z.shape
        (torch.Size([2, 64, 64]), torch.uint8, torch.Size([2, 64, 4]), torch.Size([2, 32, 4]))
    """
    if w.dim() != 3:
        raise ConfigError(f"weights must be (E, rows, cols), got {tuple(w.shape)}")
    grouped = group_size is not None
    if quant_dtype is None:
        return w, None, None
    if quant_dtype not in QUANT_DTYPES:
        raise ConfigError(f"quant_dtype must be one of {', '.join(QUANT_DTYPES)} or None, got {quant_dtype!r}")
    if grouped and quant_dtype not in ("int8_w8a16", "int4_w4a16"):
        raise ConfigError(f"group_size is for int8_w8a16 and int4_w4a16, not {quant_dtype}")
    if zero_point and not grouped:
        raise ConfigError("zero_point needs group_size (zero points are per group)")
    if quant_dtype == "int4_w4a16" and not grouped:
        raise ConfigError("int4_w4a16 needs group_size (SGLang's block_shape [0, group_size])")
    if block_shape is not None and quant_dtype != "fp8_w8a8":
        raise ConfigError(f"block_shape [block_n, block_k] scales are for fp8_w8a8, not {quant_dtype}")
    if quant_dtype == "fp8_w8a8" and not per_channel_quant:
        q, s = quantize_weight_fp8(w, block_shape)
        return q, s, None
    if per_channel_quant and block_shape is not None:
        raise ConfigError("per_channel_quant and block_shape are exclusive")
    if grouped:
        bits = 4 if quant_dtype == "int4_w4a16" else 8
        q, s, z = _quantize_groups(w, group_size, bits, zero_point, scale_dtype)
        if bits == 4:
            return pack_int4(q, dim=-1), s, pack_int4(z, dim=1) if zero_point else None
        return q, s, z if zero_point else None
    w = w.float()
    if quant_dtype == "int8_w8a8" and not per_channel_quant:
        scale = w.abs().amax(dim=(1, 2)).clamp_min(SCALE_EPS) / INT8_MAX  # one per expert
        return (w / scale.reshape(-1, 1, 1)).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale, None
    # Per output channel: fp8_w8a8/int8_w8a8 with per_channel_quant, and plain int8_w8a16.
    qmax = FP8_MAX if quant_dtype == "fp8_w8a8" else INT8_MAX
    scale = w.abs().amax(dim=2).clamp_min(SCALE_EPS) / qmax
    q = (w / scale[..., None]).clamp(-qmax, qmax)
    q = q.to(FP8_DTYPE) if quant_dtype == "fp8_w8a8" else q.round().to(torch.int8)
    return q, scale, None

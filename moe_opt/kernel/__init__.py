"""The Triton fused-MoE kernel (align, GEMM1, clamped SwiGLU, GEMM2, sum), its weight formats and float64 reference."""

from .fused_moe import fused_moe
from .quant import (BLOCK_SIZE_K_CHOICES, QUANT_DTYPES, block_size_k_choices, operand_bytes, pack_int4,
                    quantize_weight_fp8, quantize_weights, unpack_int4)
from .reference import dequantize_weight, fused_moe_reference

# Activations the kernel implements. GPT-OSS's "swigluoai" resolves but is refused for tuning.
SUPPORTED_ACTIVATIONS = ("silu",)

__all__ = ["fused_moe", "fused_moe_reference", "quantize_weight_fp8", "quantize_weights", "dequantize_weight",
           "pack_int4", "unpack_int4", "operand_bytes", "block_size_k_choices", "BLOCK_SIZE_K_CHOICES",
           "QUANT_DTYPES", "SUPPORTED_ACTIVATIONS"]

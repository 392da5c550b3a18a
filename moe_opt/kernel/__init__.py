"""The Triton fused-MoE kernel (align, GEMM1, clamped SwiGLU, GEMM2, sum) and its float64 reference."""

from .fused_moe import fused_moe
from .reference import fused_moe_reference, quantize_weight_fp8

# Activations the kernel implements. GPT-OSS's "swigluoai" resolves but is refused for tuning.
SUPPORTED_ACTIVATIONS = ("silu",)

__all__ = ["fused_moe", "fused_moe_reference", "quantize_weight_fp8", "SUPPORTED_ACTIVATIONS"]

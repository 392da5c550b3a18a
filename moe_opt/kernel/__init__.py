"""The builtin Triton fused-MoE kernel (align, GEMM1, clamped SwiGLU, GEMM2, sum), its weight formats, its float64
reference, its inputs, and the kernel-backend seam (backend.py).

Without a CUDA GPU, Triton can only run kernels through its CPU interpreter, which must be chosen before the
kernels are defined; importing this package on such a machine therefore sets TRITON_INTERPRET=1 unless it is set.
It must be set before Triton itself is imported, too: Triton's own library functions (tl.cdiv, the reductions'
combine functions) are compiled-mode functions otherwise, and every config then fails in the interpreter with
"Cannot call @triton.jit'd outside of the scope of a kernel". Where Triton was imported first, this package says so.
"""

import os as _os
import sys as _sys

import torch as _torch

from ..errors import MoeOptError as _MoeOptError

if not _torch.cuda.is_available():
    if "triton" in _sys.modules and "TRITON_INTERPRET" not in _os.environ:
        raise _MoeOptError("Triton was imported before moe_opt on a machine without a CUDA GPU, so its CPU "
                           "interpreter can no longer be chosen; import moe_opt before triton, or set "
                           "TRITON_INTERPRET=1 before Triton is imported")
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from .backend import SUPPORTED_ACTIVATIONS, BuiltinBackend, KernelBackend, get_backend  # noqa: E402
from .fused_moe import fused_moe  # noqa: E402
from .quant import QUANT_DTYPES, pack_int4, quantize_weight_fp8, quantize_weights, unpack_int4  # noqa: E402
from .reference import dequantize_weight, fused_moe_reference  # noqa: E402

__all__ = ["BuiltinBackend", "KernelBackend", "QUANT_DTYPES", "SUPPORTED_ACTIVATIONS", "dequantize_weight", "fused_moe",
           "fused_moe_reference", "get_backend", "pack_int4", "quantize_weight_fp8", "quantize_weights",
           "unpack_int4"]

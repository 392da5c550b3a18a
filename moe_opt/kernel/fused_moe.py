"""The public fused-MoE entry point: align, GEMM1, (clamped) SwiGLU, GEMM2 with routed weights, sum over topk."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..errors import ConfigError
from ..space import Config, as_config
from . import activation as act
from .align import moe_align_block_size
from .gemm import QUANT_BLOCK, QUANT_NONE, QUANT_PER_TENSOR, invoke_fused_moe_kernel

COMPUTE_DTYPES = (torch.bfloat16, torch.float16)


def _check_inputs(x, w1, w2, topk_weights, topk_ids, block_shape, w1_scale, w2_scale) -> int:
    """Validate shapes and dtypes; return the quantization mode. Raises ConfigError with one line."""
    if x.dim() != 2 or w1.dim() != 3 or w2.dim() != 3:
        raise ConfigError(f"expected x (M, K), w1 (E, 2N, K), w2 (E, K, N); got x {tuple(x.shape)}, "
                          f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    M, K = x.shape
    E, two_n, k1 = w1.shape
    if k1 != K or two_n % 2 or w2.shape != (E, K, two_n // 2):
        raise ConfigError(f"shape mismatch: x {tuple(x.shape)}, w1 {tuple(w1.shape)} (want (E, 2N, {K})), "
                          f"w2 {tuple(w2.shape)} (want ({E}, {K}, {two_n // 2}))")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != M:
        raise ConfigError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must "
                          f"both be (M={M}, topk)")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ConfigError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if x.dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"x must be bfloat16 or float16, got {x.dtype}")
    if w1.dtype != w2.dtype:
        raise ConfigError(f"w1 and w2 must share a dtype, got {w1.dtype} and {w2.dtype}")
    if w1.dtype == act.FP8_DTYPE:
        if w1_scale is None or w2_scale is None:
            raise ConfigError("fp8 weights need w1_scale and w2_scale")
        if block_shape is None:
            if w1_scale.numel() != E or w2_scale.numel() != E:
                raise ConfigError(f"per-tensor fp8 needs one scale per expert: w1_scale/w2_scale of {E} elements, "
                                  f"got {w1_scale.numel()} and {w2_scale.numel()}")
            return QUANT_PER_TENSOR
        bn, bk = block_shape
        n = two_n // 2
        want1 = (E, -(-two_n // bn), -(-K // bk))
        want2 = (E, -(-K // bn), -(-n // bk))
        if tuple(w1_scale.shape) != want1 or tuple(w2_scale.shape) != want2:
            raise ConfigError(f"block_shape {list(block_shape)} needs w1_scale {want1} and w2_scale {want2}, got "
                              f"{tuple(w1_scale.shape)} and {tuple(w2_scale.shape)}")
        if K % bk or n % bk:
            raise ConfigError(f"block_shape {list(block_shape)}: block_k {bk} must divide K {K} and N {n}")
        return QUANT_BLOCK
    if w1.dtype != x.dtype:
        raise ConfigError(f"unquantized weights must match x's dtype {x.dtype}, got {w1.dtype}; "
                          "fp8 weights are torch.float8_e4m3fn")
    if block_shape is not None:
        raise ConfigError(f"block_shape {list(block_shape)} needs fp8 (torch.float8_e4m3fn) weights")
    return QUANT_NONE


def fused_moe(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: Config | Mapping[str, int], *, swiglu_limit: float | None = None,
              block_shape: Sequence[int] | None = None, w1_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None, a1_scale: torch.Tensor | None = None,
              a2_scale: torch.Tensor | None = None, config_down: Config | Mapping[str, int] | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused Mixture-of-Experts layer: ``sum_k w_k * (act(x @ w1[e_k].T) @ w2[e_k].T)`` for each token.

    Args:
        x: (M, K) bf16/fp16 hidden states.
        w1: (E, 2N, K) gate (rows 0..N-1) and up (rows N..2N-1) projections; bf16/fp16 like ``x``, or
            float8_e4m3fn with ``w1_scale``.
        w2: (E, K, N) down projection, same dtype as ``w1``.
        topk_weights: (M, topk) float32 routed weights.
        topk_ids: (M, topk) int32/int64 expert ids; -1 marks an expert on another EP rank (contributes zero).
        config: the launch config (a :class:`~moe_opt.space.Config` or a dict with the six keys), used for both
            GEMMs unless ``config_down`` is given for the second.
        swiglu_limit: DeepSeek-V4's clamp L: ``silu(min(gate, L)) * clamp(up, -L, L)``; None for plain SwiGLU.
        block_shape: [block_n, block_k] for block-wise fp8 weights; activations are then quantized per token
            and group of block_k columns (DeepSeek V3/V4 fp8 checkpoints). None with fp8 weights means
            per-tensor scales.
        w1_scale, w2_scale: fp8 weight scales: (E,) per tensor, or (E, ceil(2N/bn), ceil(K/bk)) and
            (E, ceil(K/bn), ceil(N/bk)) per block.
        a1_scale, a2_scale: static per-tensor activation scales (1 element) for per-tensor fp8; computed
            dynamically from the data when None. Ignored for block-wise fp8 (always per token group).
        out: optional (M, K) output tensor.

    Returns:
        (M, K) tensor in x's dtype.

    Example:
        >>> import torch, moe_opt
        >>> M, E, N, K, topk = 4, 8, 128, 256, 2
        >>> x = torch.randn(M, K, dtype=torch.float16)
        >>> w1 = torch.randn(E, 2 * N, K, dtype=torch.float16) / 16
        >>> w2 = torch.randn(E, K, N, dtype=torch.float16) / 16
        >>> topk_weights, topk_ids = torch.rand(M, E).softmax(-1).topk(topk)
        >>> cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1,
        ...        "num_warps": 4, "num_stages": 2}
        >>> moe_opt.fused_moe(x, w1, w2, topk_weights, topk_ids, cfg).shape  # doctest: +SKIP
        torch.Size([4, 256])
    """
    config = as_config(config)
    config_down = config if config_down is None else as_config(config_down)
    if config_down.BLOCK_SIZE_M != config.BLOCK_SIZE_M:
        raise ConfigError("config_down must use the same BLOCK_SIZE_M as config (both GEMMs share one alignment)")
    block_shape = tuple(int(v) for v in block_shape) if block_shape is not None else None
    quant = _check_inputs(x, w1, w2, topk_weights, topk_ids, block_shape, w1_scale, w2_scale)
    if quant == QUANT_BLOCK and block_shape[1] % config.BLOCK_SIZE_K:
        raise ConfigError(f"BLOCK_SIZE_K {config.BLOCK_SIZE_K} must divide block_k {block_shape[1]} "
                          "(the kernel reads one weight scale per K step)")
    M, K = x.shape
    E, two_n, _ = w1.shape
    topk = topk_ids.shape[1]
    dtype = x.dtype
    aligned = moe_align_block_size(topk_ids, config.BLOCK_SIZE_M, E)
    topk_weights = topk_weights.float().contiguous() if topk_weights.dtype != torch.float32 else topk_weights

    # GEMM1: (M, K) x (E, 2N, K) -> (M*topk, 2N)
    if quant == QUANT_BLOCK:
        a1, a1s = act.quant_group(x, block_shape[1])
    elif quant == QUANT_PER_TENSOR:
        a1s = act.dynamic_tensor_scale(x) if a1_scale is None else a1_scale.float().reshape(1)
        a1 = act.quant_static(x, a1s)
    else:
        a1, a1s = x, None
    h = torch.empty(M * topk, two_n, dtype=dtype, device=x.device)
    invoke_fused_moe_kernel(a1, w1, h, a1s, w1_scale, None, aligned, topk, config, compute_type=dtype,
                            quant=quant, block_shape=block_shape, mul_routed_weight=False)

    # Activation (+ quantization of GEMM2's input), one Triton kernel.
    if quant == QUANT_BLOCK:
        a2, a2s = act.swiglu_quant_group(h, block_shape[1], swiglu_limit)
    elif quant == QUANT_PER_TENSOR:
        g = act.swiglu(h, swiglu_limit)
        a2s = act.dynamic_tensor_scale(g) if a2_scale is None else a2_scale.float().reshape(1)
        a2 = act.quant_static(g, a2s)
    else:
        a2, a2s = act.swiglu(h, swiglu_limit), None

    # GEMM2: (M*topk, N) x (E, K, N) -> (M*topk, K), times the routed weight of each slot.
    y = torch.empty(M * topk, K, dtype=dtype, device=x.device)
    invoke_fused_moe_kernel(a2, w2, y, a2s, w2_scale, topk_weights, aligned, 1, config_down, compute_type=dtype,
                            quant=quant, block_shape=block_shape, mul_routed_weight=True)

    # Sum over topk.
    if out is None:
        out = torch.empty(M, K, dtype=dtype, device=x.device)
    torch.sum(y.view(M, topk, K), dim=1, out=out)
    return out

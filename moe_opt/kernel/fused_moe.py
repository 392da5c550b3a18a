"""The public fused-MoE entry point: align, GEMM1, (clamped) SwiGLU, GEMM2 with routed weights, sum over topk."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from ..errors import ConfigError
from ..space import Config, as_config
from . import activation as act
from .align import moe_align_block_size, vllm_em, vllm_naive_block_assignment, vllm_uses_naive_block_assignment
from .gemm import QUANT_BLOCK, QUANT_NONE, QUANT_PER_CHANNEL, QUANT_PER_TENSOR, QUANT_W8A16, invoke_fused_moe_kernel
from .gemm_wna16 import invoke_fused_moe_kernel_wna16
from .quant import FP8_DTYPE, group_size_of, resolve_quant_dtype

COMPUTE_DTYPES = (torch.bfloat16, torch.float16)
# Whose launch rules the call follows (the target engine, docs/kernel.md): SGLang's, or vLLM's tiny-batch path
# and grid trimming (align.py's vllm_* functions).
LAUNCH_RULES = ("sglang", "vllm")
QUANT_WNA16 = -1  # group-quantized weights: gemm_wna16.py's kernel rather than gemm.py's

# Weight dtype of each format; int8_w8a16 is uint8 when group-quantized (GPTQ 8-bit, SGLang's moe_wna16).
WEIGHT_DTYPES = {"fp8_w8a8": FP8_DTYPE, "int8_w8a8": torch.int8, "int8_w8a16": torch.int8,
                 "int4_w4a16": torch.uint8}


class Scheme(NamedTuple):
    """How one call computes: the format, the GEMM path, the dtype activations are quantized to (None: kept as
    bf16/fp16) and the group size of group-quantized weights."""
    quant_dtype: str | None
    quant: int
    act_dtype: torch.dtype | None
    group_size: int | None


def _shape(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else tuple(t.shape)


def _check_channel_scales(w1_scale, w2_scale, E: int, two_n: int, K: int, what: str) -> None:
    ok1 = w1_scale is not None and tuple(w1_scale.shape) in ((E, two_n), (E, two_n, 1))
    ok2 = w2_scale is not None and tuple(w2_scale.shape) in ((E, K), (E, K, 1))
    if not (ok1 and ok2):
        raise ConfigError(f"{what} needs per-channel w1_scale ({E}, {two_n}) and w2_scale ({E}, {K}), optionally with "
                          f"a trailing 1; got {_shape(w1_scale)} and {_shape(w2_scale)}")


def _check_group(quant_dtype, block_shape, w1_scale, w2_scale, w1_zp, w2_zp, E, two_n, K) -> int:
    """Scales and zero points of group-quantized weights; returns the group size."""
    if block_shape is None or block_shape[0] != 0 or block_shape[1] <= 0:
        raise ConfigError(f"{quant_dtype} group scales take block_shape [0, group_size] (SGLang's moe_wna16), got "
                          f"{None if block_shape is None else list(block_shape)}")
    g, n = block_shape[1], two_n // 2
    if K % g or n % g:
        raise ConfigError(f"group size {g} must divide K {K} and N {n}")
    want1, want2 = (E, two_n, K // g), (E, K, n // g)
    if _shape(w1_scale) != want1 or _shape(w2_scale) != want2:
        raise ConfigError(f"block_shape [0, {g}] needs w1_scale {want1} and w2_scale {want2}, got "
                          f"{_shape(w1_scale)} and {_shape(w2_scale)}")
    if (w1_zp is None) != (w2_zp is None):
        raise ConfigError("w1_zp and w2_zp must be given together")
    if w1_zp is not None:
        pack = 2 if quant_dtype == "int4_w4a16" else 1  # int4 zero points are packed along N
        want1, want2 = (E, two_n // pack, K // g), (E, K // pack, n // g)
        if _shape(w1_zp) != want1 or _shape(w2_zp) != want2 or w1_zp.dtype != torch.uint8 or w2_zp.dtype != torch.uint8:
            raise ConfigError(f"{quant_dtype} zero points must be uint8 w1_zp {want1} and w2_zp {want2}, got "
                              f"{w1_zp.dtype} {_shape(w1_zp)} and {w2_zp.dtype} {_shape(w2_zp)}")
    return g


def _check_inputs(x, w1, w2, topk_weights, topk_ids, quant_dtype, per_channel_quant, block_shape, w1_scale,
                  w2_scale, w1_zp, w2_zp, a1_scale, a2_scale) -> Scheme:
    """Validate shapes and dtypes; return how to compute. Raises ConfigError with one line."""
    if x.dim() != 2 or w1.dim() != 3 or w2.dim() != 3:
        raise ConfigError(f"expected x (M, K), w1 (E, 2N, K), w2 (E, K, N); got x {tuple(x.shape)}, "
                          f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    quant_dtype = resolve_quant_dtype(w1.dtype, quant_dtype)
    M, K = x.shape
    E, two_n, k1 = w1.shape
    pack = 2 if quant_dtype == "int4_w4a16" else 1  # two int4 per byte along K (w1) and N (w2)
    n = two_n // 2
    if k1 * pack != K or two_n % 2 or n % pack or w2.shape != (E, K, n // pack):
        packed = " (int4: K/2 and N/2 bytes)" if pack == 2 else ""
        raise ConfigError(f"shape mismatch: x {tuple(x.shape)}, w1 {tuple(w1.shape)} (want (E, 2N, {K // pack})), "
                          f"w2 {tuple(w2.shape)} (want ({E}, {K}, {n // pack})){packed}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != M:
        raise ConfigError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must "
                          f"both be (M={M}, topk)")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ConfigError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if x.dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"x must be bfloat16 or float16, got {x.dtype}")
    if w1.dtype != w2.dtype:
        raise ConfigError(f"w1 and w2 must share a dtype, got {w1.dtype} and {w2.dtype}")
    if quant_dtype is None:
        if w1.dtype != x.dtype:
            raise ConfigError(f"unquantized weights must match x's dtype {x.dtype}, got {w1.dtype}; "
                              "fp8 weights are torch.float8_e4m3fn")
        if block_shape is not None:
            raise ConfigError(f"block_shape {list(block_shape)} needs fp8 (torch.float8_e4m3fn) weights")
        if per_channel_quant or w1_scale is not None or w1_zp is not None:
            raise ConfigError("per_channel_quant, scales and zero points need a quant_dtype")
        return Scheme(None, QUANT_NONE, None, None)

    group_size = group_size_of(quant_dtype, block_shape)
    want = torch.uint8 if group_size is not None else WEIGHT_DTYPES[quant_dtype]
    if w1.dtype != want:
        if quant_dtype == "int8_w8a16":
            raise ConfigError(f"int8_w8a16 weights must be torch.int8 (per-channel scales) or torch.uint8 with "
                              f"block_shape [0, group_size] (GPTQ 8-bit); got {w1.dtype} with block_shape "
                              f"{None if block_shape is None else list(block_shape)}")
        layout = " (two int4 per byte)" if quant_dtype == "int4_w4a16" else ""
        raise ConfigError(f"{quant_dtype} weights must be {want}{layout}, got {w1.dtype}")
    if w1_scale is None or w2_scale is None:
        raise ConfigError(f"{'fp8' if quant_dtype == 'fp8_w8a8' else quant_dtype} weights need w1_scale and w2_scale")
    if (w1_zp is not None or w2_zp is not None) and group_size is None and quant_dtype != "int4_w4a16":
        raise ConfigError("w1_zp/w2_zp need group-quantized weights: int4_w4a16, or int8_w8a16 with block_shape "
                          "[0, group_size]")
    if per_channel_quant and quant_dtype == "int4_w4a16":
        raise ConfigError("per_channel_quant is for fp8_w8a8, int8_w8a8 and int8_w8a16, not int4_w4a16")
    if quant_dtype == "int4_w4a16" or group_size is not None:
        g = _check_group(quant_dtype, block_shape, w1_scale, w2_scale, w1_zp, w2_zp, E, two_n, K)
        return Scheme(quant_dtype, QUANT_WNA16, None, g)
    if quant_dtype == "int8_w8a16":
        if block_shape is not None:
            raise ConfigError(f"int8_w8a16 group scales take block_shape [0, group_size], got {list(block_shape)}")
        _check_channel_scales(w1_scale, w2_scale, E, two_n, K, "int8_w8a16")
        return Scheme(quant_dtype, QUANT_W8A16, None, None)

    # fp8_w8a8 and int8_w8a8: activations are quantized too.
    act_dtype = FP8_DTYPE if quant_dtype == "fp8_w8a8" else torch.int8
    if per_channel_quant:
        if block_shape is not None:
            raise ConfigError(f"per_channel_quant and block_shape {list(block_shape)} are exclusive")
        if a1_scale is not None or a2_scale is not None:
            raise ConfigError("per_channel_quant quantizes activations per token, dynamically; a1_scale/a2_scale "
                              "are per-tensor scales")
        _check_channel_scales(w1_scale, w2_scale, E, two_n, K, f"{quant_dtype} with per_channel_quant")
        return Scheme(quant_dtype, QUANT_PER_CHANNEL, act_dtype, None)
    if block_shape is None:
        if w1_scale.numel() != E or w2_scale.numel() != E:
            raise ConfigError(f"per-tensor {quant_dtype.split('_')[0]} needs one scale per expert: w1_scale/w2_scale "
                              f"of {E} elements, got {w1_scale.numel()} and {w2_scale.numel()}")
        return Scheme(quant_dtype, QUANT_PER_TENSOR, act_dtype, None)
    if quant_dtype == "int8_w8a8":
        raise ConfigError(f"block-wise int8_w8a8 (block_shape {list(block_shape)}) is not implemented; use "
                          "per_channel_quant=True")
    bn, bk = block_shape
    want1 = (E, -(-two_n // bn), -(-K // bk))
    want2 = (E, -(-K // bn), -(-n // bk))
    if tuple(w1_scale.shape) != want1 or tuple(w2_scale.shape) != want2:
        raise ConfigError(f"block_shape {list(block_shape)} needs w1_scale {want1} and w2_scale {want2}, got "
                          f"{tuple(w1_scale.shape)} and {tuple(w2_scale.shape)}")
    if K % bk or n % bk:
        raise ConfigError(f"block_shape {list(block_shape)}: block_k {bk} must divide K {K} and N {n}")
    return Scheme(quant_dtype, QUANT_BLOCK, act_dtype, None)


def _check_block_size_k(scheme: Scheme, block_shape, configs: Sequence[Config]) -> None:
    """SGLang's rule for block and group scales: BLOCK_SIZE_K divides block_k (the kernels read one scale per step)."""
    for c in configs:
        if scheme.quant == QUANT_BLOCK and block_shape[1] % c.BLOCK_SIZE_K:
            raise ConfigError(f"BLOCK_SIZE_K {c.BLOCK_SIZE_K} must divide block_k {block_shape[1]} "
                              "(the kernel reads one weight scale per K step)")
        if scheme.quant == QUANT_WNA16 and scheme.group_size % c.BLOCK_SIZE_K:
            raise ConfigError(f"BLOCK_SIZE_K {c.BLOCK_SIZE_K} must divide the group size {scheme.group_size} "
                              "(the kernel reads one row of group scales per K step)")


def _check_tma(scheme: Scheme, launch: str, up: Config, down: Config) -> None:
    """Where USE_TMA runs: SGLang's fused_moe_kernel paths (docs/kernel.md, "TMA")."""
    if not (up.USE_TMA or down.USE_TMA):
        return
    if launch != "sglang":
        raise ConfigError(f"USE_TMA is SGLang's path; launch {launch!r} has none")
    if scheme.quant == QUANT_WNA16:
        raise ConfigError(f"USE_TMA: {scheme.quant_dtype} with groups runs SGLang's gptq/awq kernel, which has no "
                          "TMA path")
    if down.USE_TMA and scheme.quant == QUANT_PER_CHANNEL:
        raise ConfigError("USE_TMA in the down config: per-channel w8a8 is left out (SGLang's down path reads the "
                          "sorted activations' per-token scales at the unsorted slot index)")


def fused_moe(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: Config | Mapping[str, int], *, swiglu_limit: float | None = None,
              quant_dtype: str | None = None, per_channel_quant: bool = False,
              block_shape: Sequence[int] | None = None, w1_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None, w1_zp: torch.Tensor | None = None,
              w2_zp: torch.Tensor | None = None, a1_scale: torch.Tensor | None = None,
              a2_scale: torch.Tensor | None = None, config_down: Config | Mapping[str, int] | None = None,
              out: torch.Tensor | None = None, up_only: bool = False, launch: str = "sglang",
              invoke: Callable[..., None] | None = None, after_up: Callable[[], Any] | None = None,
              global_num_experts: int | None = None) -> torch.Tensor:
    """Fused Mixture-of-Experts layer: ``sum_k w_k * (act(x @ w1[e_k].T) @ w2[e_k].T)`` for each token.

    Args:
        x: (M, K) bf16/fp16 hidden states.
        w1: (E, 2N, K) gate (rows 0..N-1) and up (rows N..2N-1) projections; bf16/fp16 like ``x``, or quantized
            (see ``quant_dtype``; int4 weights are (E, 2N, K/2) uint8).
        w2: (E, K, N) down projection, same dtype as ``w1`` (int4: (E, K, N/2)).
        topk_weights: (M, topk) float32 routed weights.
        topk_ids: (M, topk) int32/int64 expert ids; -1 marks an expert on another EP rank (contributes zero).
        config: the launch config (a :class:`~moe_opt.space.Config` or a dict with the six keys), used for both
            GEMMs unless ``config_down`` is given for the second. USE_TMA (SGLang's key) in the config of GEMM1
            loads its weights through tensor descriptors; in GEMM2's config, GEMM1 writes its output in
            expert-sorted order and GEMM2 reads A and B through descriptors (docs/kernel.md, "TMA").
        swiglu_limit: DeepSeek-V4's clamp L: ``silu(min(gate, L)) * clamp(up, -L, L)``; None for plain SwiGLU.
        quant_dtype: SGLang's names: "fp8_w8a8" (float8_e4m3fn weights), "int8_w8a8" (int8 weights and
            activations), "int8_w8a16" (int8 weights, or uint8 GPTQ weights with ``block_shape [0, group]``),
            "int4_w4a16" (two int4 per uint8 byte along K). None: "fp8_w8a8" for fp8 weights, else unquantized.
        per_channel_quant: fp8_w8a8/int8_w8a8 with one weight scale per output channel and activations
            quantized per token, dynamically (SGLang's per_channel_quant). int8_w8a16 is always per channel.
        block_shape: [block_n, block_k] for block-wise fp8 weights (activations then quantized per token and
            group of block_k columns; DeepSeek V3/V4 fp8 checkpoints); [0, group_size] for group-quantized
            int4_w4a16/int8_w8a16 (GPTQ/AWQ). None with fp8/int8_w8a8 weights and no per_channel_quant means
            per-tensor scales.
        w1_scale, w2_scale: weight scales: (E,) per tensor; (E, 2N) and (E, K) per channel, optionally with a
            trailing 1; (E, ceil(2N/bn), ceil(K/bk)) and (E, ceil(K/bn), ceil(N/bk)) per block; (E, 2N, K/group)
            and (E, K, N/group) per group.
        w1_zp, w2_zp: optional uint8 zero points of group-quantized weights, (E, 2N, K/group) and (E, K, N/group),
            for int4 packed two per byte along the 2N/K dimension. Without them: 8 (int4), 128 (uint8).
        a1_scale, a2_scale: static per-tensor activation scales (1 element) for per-tensor fp8/int8; computed
            dynamically from the data when None. Ignored for block-wise fp8 (always per token group).
        out: optional (M, K) output tensor.
        up_only: stop after GEMM1's stage (alignment, GEMM1, activation) and return GEMM2's input. With USE_TMA
            in the down config that input is expert-sorted, one row per position of the alignment.
        after_up: called between GEMM1's stage and GEMM2 (with nothing launched in between): how a pair tune's
            timer records an event there, inside the whole call's CUDA graph (measure/cuda_graph.py).
        launch: whose launch rules to follow: "sglang" (moe_align_block_size always; the grid covers the whole
            sorted_token_ids) or "vllm" (vLLM's fused_experts_impl: below M * topk * 4 <= E each (token, expert)
            pair gets a block of its own without alignment; the grid trimmed to M * topk * BLOCK_SIZE_M rows where
            a GEMM's input has fewer than BLOCK_SIZE_M rows). Same result either way; what differs is the work.
        invoke: the GEMM launch, with gemm.invoke_fused_moe_kernel's signature (the default); an engine's own
            kernel launched through it (kernel/engine_kernels.py) runs inside this pipeline. Not for
            group-quantized weights.
        global_num_experts: the experts ``topk_ids`` may name (SGLang's and vLLM's name; default: w1's E), where
            the weights hold only some of them (expert parallelism; a compile worker's few experts,
            measure/compile_pool.py): the alignment counts this many and vLLM's tiny-batch rule compares with it,
            so the kernels launched are those of the whole shape. topk_ids must name experts below w1's E.

    Returns:
        (M, K) tensor in x's dtype (with ``up_only``: GEMM2's (M*topk, N) input).

    Example:
        >>> import torch, moe_opt
        >>> from moe_opt.kernel import quantize_weights
        >>> M, E, N, K, topk = 4, 8, 128, 256, 2
        >>> x = torch.randn(M, K, dtype=torch.bfloat16)
        >>> w1, s1, z1 = quantize_weights(torch.randn(E, 2 * N, K) / 16, "int4_w4a16", group_size=128)
        >>> w2, s2, z2 = quantize_weights(torch.randn(E, K, N) / 16, "int4_w4a16", group_size=128)
        >>> topk_weights, topk_ids = torch.rand(M, E).softmax(-1).topk(topk)
        >>> cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1,
        ...        "num_warps": 4, "num_stages": 2}
        >>> moe_opt.fused_moe(x, w1, w2, topk_weights, topk_ids, cfg, quant_dtype="int4_w4a16",
        ...                   block_shape=[0, 128], w1_scale=s1, w2_scale=s2).shape  # doctest: +SKIP
        torch.Size([4, 256])
    """
    if launch not in LAUNCH_RULES:
        raise ConfigError(f"unknown launch {launch!r}; accepted: {', '.join(LAUNCH_RULES)}")
    config = as_config(config)
    config_down = config if config_down is None else as_config(config_down)
    if config_down.BLOCK_SIZE_M != config.BLOCK_SIZE_M:
        raise ConfigError("config_down must use the same BLOCK_SIZE_M as config (both GEMMs share one alignment)")
    block_shape = tuple(int(v) for v in block_shape) if block_shape is not None else None
    scheme = _check_inputs(x, w1, w2, topk_weights, topk_ids, quant_dtype, per_channel_quant, block_shape,
                           w1_scale, w2_scale, w1_zp, w2_zp, a1_scale, a2_scale)
    _check_block_size_k(scheme, block_shape, (config, config_down))
    _check_tma(scheme, launch, config, config_down)
    quant, qdtype = scheme.quant, scheme.act_dtype
    M, K = x.shape
    E, two_n, _ = w1.shape
    if global_num_experts is not None:
        if isinstance(global_num_experts, bool) or not isinstance(global_num_experts, int) or global_num_experts < E:
            raise ConfigError(f"global_num_experts must be an integer >= w1's {E} experts, got {global_num_experts!r}")
        E = global_num_experts  # what the alignment and the launch rules count; the weights' own E is w1.shape[0]
    topk = topk_ids.shape[1]
    dtype = x.dtype
    block_m = config.BLOCK_SIZE_M
    naive = launch == "vllm" and vllm_uses_naive_block_assignment(M, topk, E, scheme.quant == QUANT_WNA16)
    aligned = vllm_naive_block_assignment(topk_ids, block_m) if naive else moe_align_block_size(topk_ids, block_m, E)
    # Rows each GEMM's grid covers: GEMM1's input has M rows, GEMM2's M * topk (vLLM's A.size(0)).
    em1 = vllm_em(M * topk, M, E, block_m, naive) if launch == "vllm" else None
    em2 = vllm_em(M * topk, M * topk, E, block_m, naive) if launch == "vllm" else None
    topk_weights = topk_weights.float().contiguous() if topk_weights.dtype != torch.float32 else topk_weights

    # SGLang's down TMA (fused_moe.py, _fused_moe_kernel_sequence): GEMM1 writes C in sorted order (c_sorted),
    # one row per position of sorted_token_ids (SGLang's total_tokens, M*topk + min(M*topk, E+1)*(BLOCK_SIZE_M-1),
    # is that length), so GEMM2's A rows of a block are contiguous and GEMM2 loads A and B by TMA.
    c_sorted = config_down.USE_TMA
    h_rows = aligned.sorted_token_ids.shape[0] if c_sorted else M * topk
    if invoke is not None and quant == QUANT_WNA16:
        raise ConfigError("invoke= launches gemm.py's kernel family; group-quantized weights use gemm_wna16.py's")
    if invoke is not None and (config.USE_TMA or config_down.USE_TMA):
        raise ConfigError("invoke= launches an engine's own GEMM without moe_opt's TMA paths; give configs with "
                          "USE_TMA false")

    def gemm(a, w, c, a_scale, w_scale, w_zp, routed_weights, top_k, cfg, em, a_tma=False, b_tma=False,
             sorted_out=False):
        if quant == QUANT_WNA16:  # never naive: vLLM keeps the alignment for group-quantized weights
            invoke_fused_moe_kernel_wna16(a, w, c, w_scale, w_zp, routed_weights, aligned, top_k, cfg,
                                          compute_type=dtype, group_size=scheme.group_size,
                                          int4=scheme.quant_dtype == "int4_w4a16",
                                          mul_routed_weight=routed_weights is not None, em=em)
        else:
            if invoke is not None:
                invoke(a, w, c, a_scale, w_scale, routed_weights, aligned, top_k, cfg, compute_type=dtype,
                       quant=quant, block_shape=block_shape, mul_routed_weight=routed_weights is not None, em=em,
                       naive=naive)
            else:
                invoke_fused_moe_kernel(a, w, c, a_scale, w_scale, routed_weights, aligned, top_k, cfg,
                                        compute_type=dtype, quant=quant, block_shape=block_shape,
                                        mul_routed_weight=routed_weights is not None, em=em, naive=naive,
                                        a_tma=a_tma, b_tma=b_tma, c_sorted=sorted_out,
                                        vllm_body=launch == "vllm")

    # GEMM1: (M, K) x (E, 2N, K) -> (M*topk, 2N)
    if quant == QUANT_BLOCK:
        a1, a1s = act.quant_group(x, block_shape[1], qdtype)
    elif quant == QUANT_PER_TENSOR:
        a1s = act.dynamic_tensor_scale(x, qdtype) if a1_scale is None else a1_scale.float().reshape(1)
        a1 = act.quant_static(x, a1s, qdtype)
    elif quant == QUANT_PER_CHANNEL:
        a1, a1s = act.quant_token(x, qdtype)
    else:
        a1, a1s = x, None
    h = torch.empty(h_rows, two_n, dtype=dtype, device=x.device)
    gemm(a1, w1, h, a1s, w1_scale, w1_zp, None, topk, config, em1, b_tma=config.USE_TMA, sorted_out=c_sorted)

    # Activation (+ quantization of GEMM2's input), one Triton kernel.
    if quant == QUANT_BLOCK:
        a2, a2s = act.swiglu_quant_group(h, block_shape[1], swiglu_limit, qdtype)
    elif quant == QUANT_PER_TENSOR:
        g = act.swiglu(h, swiglu_limit)
        # A sorted h has rows GEMM1 never wrote (padding positions, the unused tail): the scale leaves them out.
        # (SGLang takes max|g| over the whole buffer there.)
        valid = aligned.sorted_token_ids < M * topk if c_sorted else None
        a2s = act.dynamic_tensor_scale(g, qdtype, valid) if a2_scale is None else a2_scale.float().reshape(1)
        a2 = act.quant_static(g, a2s, qdtype)
    elif quant == QUANT_PER_CHANNEL:
        a2, a2s = act.swiglu_quant_token(h, swiglu_limit, qdtype)
    else:
        a2, a2s = act.swiglu(h, swiglu_limit), None
    if up_only:
        return a2
    if after_up is not None:
        after_up()

    # GEMM2: (M*topk, N) x (E, K, N) -> (M*topk, K), times the routed weight of each slot.
    y = torch.empty(M * topk, K, dtype=dtype, device=x.device)
    gemm(a2, w2, y, a2s, w2_scale, w2_zp, topk_weights, 1, config_down, em2, a_tma=c_sorted, b_tma=c_sorted)

    # Sum over topk.
    if out is None:
        out = torch.empty(M, K, dtype=dtype, device=x.device)
    torch.sum(y.view(M, topk, K), dim=1, out=out)
    return out

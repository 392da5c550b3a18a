"""Steps 2 and 4 for group-quantized weights: int4_w4a16 and uint8 int8_w8a16 (GPTQ/AWQ checkpoints).

The same grouped GEMM as gemm.py (same tiles, ordering and tunables; SGLang's ``fused_moe_kernel_gptq_awq``),
but B is dequantized in registers, tile by tile, before the dot with the bf16/fp16 activations:

    B[n, k] = (q[n, k] - zero_point[n, k // group_size]) * scale[n, k // group_size]   (then the compute dtype)

SGLang's layout: int4 weights (E, N, K/2) uint8 with k = 2i in the low nibble of byte i; scales
(E, N, K/group_size); zero points (E, N/2, K/group_size) uint8 for int4, packed along N (n = 2j low), or
(E, N, K/group_size) for uint8 weights. Without zero points the zero point is 8 (int4) or 128 (uint8).

BLOCK_SIZE_K divides group_size (SGLang's tuner rule) and group_size divides K, so every K step is whole and lies
in one group: the kernel reads one row of BLOCK_SIZE_N scales (and zero points) per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..space import Config
from .align import AlignedSlots
from .interpret import interpreting, round_for_cast, round_mode
from .quant import INT4_ZERO_POINT, UINT8_ZERO_POINT


@triton.jit(do_not_specialize=["EM", "num_valid_tokens"])
def fused_moe_kernel_wna16(
    a_ptr, b_ptr, c_ptr, b_scale_ptr, b_zp_ptr, topk_weights_ptr,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    N, K, EM, num_valid_tokens,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_bse, stride_bsn, stride_bsk, stride_bze, stride_bzn, stride_bzk,
    group_size: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr, top_k: tl.constexpr, compute_type: tl.constexpr,
    INT4: tl.constexpr, HAS_ZP: tl.constexpr, ZERO_POINT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    INTERP_ROUND: tl.constexpr,
):
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(EM, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    num_tokens_post_padded = tl.load(num_tokens_post_padded_ptr)
    if pid_m * BLOCK_SIZE_M >= num_tokens_post_padded:
        return
    offs_token_id = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M).to(tl.int64)
    offs_token = tl.load(sorted_token_ids_ptr + offs_token_id).to(tl.int64)
    token_mask = offs_token < num_valid_tokens
    offs_cn = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    c_ptrs = c_ptr + stride_cm * offs_token[:, None] + stride_cn * offs_cn[None, :]
    c_mask = token_mask[:, None] & (offs_cn[None, :] < N)

    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert == -1:
        # Expert-parallel: this expert lives on another rank; its slots contribute zero.
        tl.store(c_ptrs, tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=compute_type), mask=c_mask)
        return

    # Columns past N wrap around to valid addresses; their results are masked at the store.
    offs_bn = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N).to(tl.int64)) % N
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    a_ptrs = a_ptr + (offs_token[:, None] // top_k * stride_am + offs_k[None, :] * stride_ak)
    if INT4:
        b_ptrs = b_ptr + expert * stride_be + (offs_k[:, None] // 2) * stride_bk + offs_bn[None, :] * stride_bn
        b_shift = (offs_k[:, None] % 2) * 4
    else:
        b_ptrs = b_ptr + expert * stride_be + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
    b_scale_ptrs = b_scale_ptr + expert * stride_bse + offs_bn * stride_bsn
    if HAS_ZP:
        if INT4:
            b_zp_ptrs = b_zp_ptr + expert * stride_bze + (offs_bn // 2) * stride_bzn
            zp_shift = (offs_bn % 2) * 4
        else:
            b_zp_ptrs = b_zp_ptr + expert * stride_bze + offs_bn * stride_bzn

    accumulator = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_SIZE_K):
        a = tl.load(a_ptrs, mask=token_mask[:, None], other=0.0)
        q = tl.load(b_ptrs)
        if INT4:
            q = (q >> b_shift) & 0xF
        group = k_start // group_size
        scale = tl.load(b_scale_ptrs + group * stride_bsk).to(tl.float32)
        if HAS_ZP:
            zp = tl.load(b_zp_ptrs + group * stride_bzk)
            if INT4:
                zp = (zp >> zp_shift) & 0xF
            b = (q.to(tl.float32) - zp.to(tl.float32)[None, :]) * scale[None, :]
        else:
            b = (q.to(tl.float32) - ZERO_POINT) * scale[None, :]
        # The dot takes the weights in the compute dtype, as SGLang's kernel does.
        b = round_for_cast(b, INTERP_ROUND).to(compute_type)
        if UPCAST_DOT:
            # Only under TRITON_INTERPRET=1 (interpret.py says why); the GPU never compiles this branch.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        accumulator = tl.dot(a, b, acc=accumulator)
        a_ptrs += BLOCK_SIZE_K * stride_ak
        if INT4:
            b_ptrs += (BLOCK_SIZE_K // 2) * stride_bk
        else:
            b_ptrs += BLOCK_SIZE_K * stride_bk

    if MUL_ROUTED_WEIGHT:
        routed_weight = tl.load(topk_weights_ptr + offs_token, mask=token_mask, other=0.0)
        accumulator = accumulator * routed_weight[:, None]
    tl.store(c_ptrs, round_for_cast(accumulator, INTERP_ROUND).to(compute_type), mask=c_mask)


def invoke_fused_moe_kernel_wna16(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, b_scale: torch.Tensor,
                                  b_zp: torch.Tensor | None, topk_weights: torch.Tensor | None,
                                  aligned: AlignedSlots, top_k: int, config: Config, *,
                                  compute_type: torch.dtype, group_size: int, int4: bool,
                                  mul_routed_weight: bool, em: int | None = None) -> None:
    """Launch fused_moe_kernel_wna16: C (M*topk, N) = per-slot A @ dequant(B[expert]).T, B (E, N, K or K/2).

    ``em``: the rows the grid covers (default: the length of sorted_token_ids, SGLang's)."""
    sorted_token_ids, expert_ids, num_tokens_post_padded = aligned
    N = b.shape[1]
    K = a.shape[1]
    EM = sorted_token_ids.shape[0] if em is None else em
    grid = (triton.cdiv(EM, config.BLOCK_SIZE_M) * triton.cdiv(N, config.BLOCK_SIZE_N),)
    stride_bze, stride_bzn, stride_bzk = b_zp.stride() if b_zp is not None else (0, 0, 0)
    triton_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[compute_type]
    fused_moe_kernel_wna16[grid](
        a, b, c, b_scale, b_zp, topk_weights,
        sorted_token_ids, expert_ids, num_tokens_post_padded,
        N, K, EM, a.shape[0] * top_k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        *b_scale.stride(), stride_bze, stride_bzn, stride_bzk,
        group_size=group_size,
        BLOCK_SIZE_M=config.BLOCK_SIZE_M, BLOCK_SIZE_N=config.BLOCK_SIZE_N, BLOCK_SIZE_K=config.BLOCK_SIZE_K,
        GROUP_SIZE_M=config.GROUP_SIZE_M,
        MUL_ROUTED_WEIGHT=mul_routed_weight, top_k=top_k, compute_type=triton_dtype,
        INT4=int4, HAS_ZP=b_zp is not None, ZERO_POINT=float(INT4_ZERO_POINT if int4 else UINT8_ZERO_POINT),
        UPCAST_DOT=interpreting() and compute_type == torch.bfloat16, INTERP_ROUND=round_mode(compute_type),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )

"""Steps 2 and 4 of the fused MoE: one grouped GEMM over the expert-sorted token slots.

The algorithm and the meaning of the six tunables are those of SGLang's and vLLM's ``fused_moe_kernel``, so a
config tuned here is valid there: each program computes one BLOCK_SIZE_M x BLOCK_SIZE_N tile of C for the
slots of one BLOCK_SIZE_M block of ``sorted_token_ids`` (all routed to one expert), stepping through K by
BLOCK_SIZE_K; programs are ordered in groups of GROUP_SIZE_M rows of tiles for L2 reuse; num_warps and
num_stages go to the Triton launch.

    C[slot, :] = A[slot // top_k, :] @ B[expert(slot)].T  (* routed weight of the slot, for the down GEMM)

Quantization (QUANT): 0 = bf16/fp16 operands; 1 = fp8_w8a8 or int8_w8a8 with per-tensor scales (one for A, one
per expert for B); 2 = fp8_w8a8 block-wise: B scales per (expert, group_n rows, group_k cols) block, A scales per
(token, group_k cols) group; 3 = fp8_w8a8 or int8_w8a8 per channel (SGLang's per_channel_quant): one B scale per
output column, one A scale per token; 4 = int8_w8a16: int8 B converted to the compute dtype (exact), one B scale
per output column. The per-tensor and per-channel scales multiply the accumulator once, after the K loop. int8 A
and B (INT8_DOT) give exact int32 partial sums, added to the float32 accumulator as SGLang does. Group-quantized
weights (int4_w4a16, GPTQ/AWQ) have their own kernel in gemm_wna16.py.

TMA (SGLang's USE_TMA; tma.py builds the descriptors): B_TMA loads B tiles through a tensor descriptor of B
(E, N, K); A_TMA loads A tiles through a descriptor of an expert-sorted A, whose rows are the positions of
``sorted_token_ids`` (block pid_m's rows are pid_m * BLOCK_SIZE_M onwards, contiguous), its per-token-group scales
read at those positions too; C_SORTED stores C at those positions instead of the slots' (how GEMM1 writes GEMM2's
TMA input).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..space import Config
from . import tma
from .align import AlignedSlots
from .interpret import interpreting, round_for_cast, round_mode
from .quant import FP8_DTYPE

QUANT_NONE, QUANT_PER_TENSOR, QUANT_BLOCK, QUANT_PER_CHANNEL, QUANT_W8A16 = 0, 1, 2, 3, 4


# EM and num_valid_tokens change with the batch size; not specializing on them keeps one binary per config for
# every batch size, so a config compiled once (or by a compile worker) serves all of them.
@triton.jit(do_not_specialize=["EM", "num_valid_tokens"])
def fused_moe_kernel(
    a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, topk_weights_ptr, a_desc, b_desc,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    N, K, EM, num_valid_tokens,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
    group_n: tl.constexpr, group_k: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr, top_k: tl.constexpr, compute_type: tl.constexpr,
    QUANT: tl.constexpr, INT8_DOT: tl.constexpr, EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INTERP_ROUND: tl.constexpr, NAIVE: tl.constexpr = False,
    TILE_SCALE: tl.constexpr = True,
    A_TMA: tl.constexpr = False, B_TMA: tl.constexpr = False, C_SORTED: tl.constexpr = False,
):
    # Grouped ordering of the (M blocks x N blocks) tiles, as in Triton's matmul tutorial.
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
    if NAIVE:
        # vLLM's tiny-batch path (align.vllm_naive_block_assignment): block pid_m holds the (token, expert) pair
        # pid_m in its first row and padding in the others; sorted_token_ids is not read.
        offs = tl.arange(0, BLOCK_SIZE_M).to(tl.int64)
        offs_token = tl.where(offs == 0, pid_m, num_valid_tokens).to(tl.int64)
    else:
        offs_token_id = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M).to(tl.int64)
        offs_token = tl.load(sorted_token_ids_ptr + offs_token_id).to(tl.int64)
    token_mask = offs_token < num_valid_tokens
    offs_cn = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    if C_SORTED:
        c_ptrs = c_ptr + stride_cm * offs_token_id[:, None] + stride_cn * offs_cn[None, :]
    else:
        c_ptrs = c_ptr + stride_cm * offs_token[:, None] + stride_cn * offs_cn[None, :]
    c_mask = token_mask[:, None] & (offs_cn[None, :] < N)

    expert_i32 = tl.load(expert_ids_ptr + pid_m)
    expert = expert_i32.to(tl.int64)
    if expert == -1:
        # Expert-parallel: this expert lives on another rank; its slots contribute zero. (With C_SORTED, SGLang
        # stores nothing here, as GEMM2 never reads these rows; zeros keep a per-tensor scale off stale memory.)
        tl.store(c_ptrs, tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=compute_type), mask=c_mask)
        return

    # Columns past N wrap around to valid addresses; their results are masked at the store.
    offs_bn = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N).to(tl.int64)) % N
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    a_ptrs = a_ptr + (offs_token[:, None] // top_k * stride_am + offs_k[None, :] * stride_ak)
    b_ptrs = b_ptr + expert * stride_be + (offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn)
    start_m = pid_m * BLOCK_SIZE_M  # the block's first row in an expert-sorted A (A_TMA)
    start_n = pid_n * BLOCK_SIZE_N

    if QUANT == 1:
        a_scale = tl.load(a_scale_ptr)
        b_scale = tl.load(b_scale_ptr + expert)
    if QUANT == 2:
        if A_TMA:
            a_scale_ptrs = a_scale_ptr + offs_token_id * stride_asm  # the sorted A's scales are sorted too
        else:
            a_scale_ptrs = a_scale_ptr + (offs_token // top_k) * stride_asm
        if BLOCK_SIZE_N > group_n or not TILE_SCALE:
            offs_bsn = offs_bn // group_n
        else:
            offs_bsn = pid_n * BLOCK_SIZE_N // group_n  # SGLang's: the whole tile shares one scale row
        b_scale_ptrs = b_scale_ptr + expert * stride_bse + offs_bsn * stride_bsn
    if QUANT == 3:
        a_scale = tl.load(a_scale_ptr + (offs_token // top_k) * stride_asm, mask=token_mask, other=0.0)
    if QUANT == 3 or QUANT == 4:
        b_scale = tl.load(b_scale_ptr + expert * stride_bse + offs_bn * stride_bsn)

    if SWAP_AB:
        accumulator = tl.zeros((BLOCK_SIZE_N, BLOCK_SIZE_M), dtype=tl.float32)
    else:
        accumulator = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)

    for k_start in range(0, K, BLOCK_SIZE_K):
        # A descriptor reads rows and columns past the tensor as zero: no mask. Padding rows of a sorted A hold
        # whatever GEMM1 left there; they only reach C rows that are masked at the store.
        if A_TMA:
            a = a_desc.load([start_m, k_start])
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=token_mask[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=token_mask[:, None] & (offs_k[None, :] < K - k_start), other=0.0)
        if B_TMA:
            b = b_desc.load([expert_i32, start_n, k_start]).reshape(BLOCK_SIZE_N, BLOCK_SIZE_K).T
        elif EVEN_K:
            b = tl.load(b_ptrs)
        else:
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k_start, other=0.0)
        if QUANT == 4 and not UPCAST_DOT:
            b = b.to(compute_type)  # |q| <= 128 is exact in bf16/fp16; the scale comes after the loop
        if UPCAST_DOT:
            # Only under TRITON_INTERPRET=1 (interpret.py says why); the GPU never compiles this branch.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if QUANT == 2:
            a_s = tl.load(a_scale_ptrs + (k_start // group_k) * stride_ask, mask=token_mask, other=0.0)
            b_s = tl.load(b_scale_ptrs + (k_start // group_k) * stride_bsk)
            if SWAP_AB:
                # SGLang's swap_ab: for small BLOCK_SIZE_M the transposed product fills Hopper's wgmma better.
                partial = tl.dot(tl.trans(b, (1, 0)), tl.trans(a, (1, 0)))
                if BLOCK_SIZE_N > group_n or not TILE_SCALE:
                    accumulator += partial * b_s[:, None] * a_s[None, :]
                else:
                    accumulator += partial * (b_s * a_s[None, :])
            else:
                if BLOCK_SIZE_N > group_n or not TILE_SCALE:
                    accumulator += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
                else:
                    accumulator += tl.dot(a, b) * (a_s[:, None] * b_s)
        elif INT8_DOT:
            accumulator += tl.dot(a, b)
        elif SWAP_AB:
            accumulator = tl.dot(tl.trans(b, (1, 0)), tl.trans(a, (1, 0)), acc=accumulator)
        else:
            accumulator = tl.dot(a, b, acc=accumulator)
        a_ptrs += BLOCK_SIZE_K * stride_ak
        b_ptrs += BLOCK_SIZE_K * stride_bk

    if SWAP_AB:
        accumulator = tl.trans(accumulator, (1, 0))
    if QUANT == 1:
        accumulator = accumulator * (a_scale * b_scale)
    if QUANT == 3:
        accumulator = accumulator * a_scale[:, None] * b_scale[None, :]
    if QUANT == 4:
        accumulator = accumulator * b_scale[None, :]
    if MUL_ROUTED_WEIGHT:
        routed_weight = tl.load(topk_weights_ptr + offs_token, mask=token_mask, other=0.0)
        accumulator = accumulator * routed_weight[:, None]
    tl.store(c_ptrs, round_for_cast(accumulator, INTERP_ROUND).to(compute_type), mask=c_mask)


def use_swap_ab(config: Config, fp8: bool, device: torch.device) -> bool:
    """SGLang's rule: swap A and B for fp8_w8a8 (any scales) with BLOCK_SIZE_M < 64 and BLOCK_SIZE_N >= 64 on
    Hopper (sm_90); never for the int8 paths."""
    if not fp8 or config.BLOCK_SIZE_M >= 64 or config.BLOCK_SIZE_N < 64:
        return False
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


def invoke_fused_moe_kernel(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, a_scale: torch.Tensor | None,
                            b_scale: torch.Tensor | None, topk_weights: torch.Tensor | None,
                            aligned: AlignedSlots, top_k: int, config: Config, *, compute_type: torch.dtype,
                            quant: int, block_shape: tuple[int, int] | None, mul_routed_weight: bool,
                            em: int | None = None, naive: bool = False, a_tma: bool = False,
                            b_tma: bool = False, c_sorted: bool = False, vllm_body: bool = False) -> None:
    """Launch fused_moe_kernel: C (M*topk, N) = per-slot A @ B[expert].T with B of shape (E, N, K).

    ``em``: the rows the grid covers (default: the length of sorted_token_ids, SGLang's); ``naive``: vLLM's
    tiny-batch block assignment, one (token, expert) pair per block (align.vllm_naive_block_assignment).
    ``b_tma``: B through a tensor descriptor; ``a_tma``: A is expert-sorted (one row per position of
    sorted_token_ids, as GEMM1 writes it with ``c_sorted``) and read through a descriptor; ``c_sorted``: C is
    written that way, with as many rows as sorted_token_ids. A ConfigError says why a tensor cannot be described.
    ``vllm_body``: vLLM's kernel body where it differs from SGLang's at equal results (vLLM 0.33.0's
    fused_moe_kernel): K loads always masked (SGLang skips the mask where BLOCK_SIZE_K divides K), and block-fp8 B
    scales always loaded per column (SGLang loads one per tile where BLOCK_SIZE_N <= group_n).
    """
    if a_tma and c.shape[0] >= a.shape[0]:
        raise ValueError("a_tma reads an expert-sorted A: one row per position of sorted_token_ids")
    sorted_token_ids, expert_ids, num_tokens_post_padded = aligned
    E, N, K = b.shape
    # An upper bound; programs past num_tokens_post_padded return at once.
    EM = sorted_token_ids.shape[0] if em is None else em
    grid = (triton.cdiv(EM, config.BLOCK_SIZE_M) * triton.cdiv(N, config.BLOCK_SIZE_N),)
    group_n, group_k = block_shape if quant == QUANT_BLOCK else (0, 0)
    stride_asm = stride_ask = stride_bse = stride_bsn = stride_bsk = 0
    if quant == QUANT_BLOCK:
        stride_asm, stride_ask = a_scale.stride()
        stride_bse, stride_bsn, stride_bsk = b_scale.stride()
    if quant == QUANT_PER_CHANNEL:
        stride_asm = a_scale.stride(0)  # (tokens, 1)
    if quant in (QUANT_PER_CHANNEL, QUANT_W8A16):
        stride_bse, stride_bsn = b_scale.stride()[:2]  # (E, N) or SGLang's (E, N, 1)
    upcast = interpreting() and a.dtype == torch.bfloat16
    triton_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[compute_type]
    a_desc = tma.descriptor(a, [config.BLOCK_SIZE_M, config.BLOCK_SIZE_K], "the sorted A") if a_tma else None
    b_desc = tma.descriptor(b, [1, config.BLOCK_SIZE_N, config.BLOCK_SIZE_K], "the weights") if b_tma else None
    fused_moe_kernel[grid](
        a, b, c, a_scale, b_scale, topk_weights, a_desc, b_desc,
        sorted_token_ids, expert_ids, num_tokens_post_padded,
        # The slots (SGLang's topk_ids.numel()): C's rows, or A's times top_k where C is sorted.
        N, K, EM, a.shape[0] * top_k if c_sorted else c.shape[0],
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
        group_n=group_n, group_k=group_k,
        BLOCK_SIZE_M=config.BLOCK_SIZE_M, BLOCK_SIZE_N=config.BLOCK_SIZE_N, BLOCK_SIZE_K=config.BLOCK_SIZE_K,
        GROUP_SIZE_M=config.GROUP_SIZE_M,
        MUL_ROUTED_WEIGHT=mul_routed_weight, top_k=top_k, compute_type=triton_dtype,
        QUANT=quant, INT8_DOT=a.dtype == torch.int8, EVEN_K=K % config.BLOCK_SIZE_K == 0 and not vllm_body,
        SWAP_AB=use_swap_ab(config, a.dtype == FP8_DTYPE, a.device),
        UPCAST_DOT=upcast, INTERP_ROUND=round_mode(compute_type), NAIVE=naive,
        A_TMA=a_tma, B_TMA=b_tma, C_SORTED=c_sorted, TILE_SCALE=not vllm_body,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )

"""Step 1 of the fused MoE: group the M*topk token slots by expert, each expert's run padded to BLOCK_SIZE_M.

The GEMM kernels walk ``sorted_token_ids`` one BLOCK_SIZE_M block at a time; every block belongs to one expert,
named in ``expert_ids``. Padding slots hold the sentinel ``M * topk`` and are masked out by the GEMMs.

Slots routed to expert -1 (expert-parallel: the expert lives on another rank) go to an extra bucket whose
blocks carry expert id -1; the GEMMs write zeros for them, so the sum over topk stays right.

Everything runs on the device with no host sync (no ``.item()``, no data-dependent shapes), so the whole
fused MoE can be captured in a CUDA graph. Four launches: zero the counts, count, prefix-sum + fill, scatter.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class AlignedSlots(NamedTuple):
    sorted_token_ids: torch.Tensor  # (max_num_tokens_padded,) int32, slot index or the sentinel M*topk
    expert_ids: torch.Tensor  # (max_num_blocks,) int32, expert of each BLOCK_SIZE_M block, -1 for "none"
    num_tokens_post_padded: torch.Tensor  # (1,) int32, length of the used prefix of sorted_token_ids


# Batch-size-dependent arguments are not specialized on, so each kernel compiles once per BLOCK_SIZE_M.
@triton.jit(do_not_specialize=["numel"])
def _count_kernel(topk_ids_ptr, counts_ptr, ranks_ptr, numel, num_experts, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    expert = tl.load(topk_ids_ptr + offs, mask=mask, other=0).to(tl.int32)
    expert = tl.where(expert < 0, num_experts, expert)
    # The old value of the counter is the slot's rank within its expert; any order within an expert is valid.
    rank = tl.atomic_add(counts_ptr + expert, 1, mask=mask)
    tl.store(ranks_ptr + offs, rank, mask=mask)


@triton.jit(do_not_specialize=["max_num_blocks", "max_num_tokens_padded", "sentinel"])
def _offsets_kernel(counts_ptr, offsets_ptr, expert_ids_ptr, num_tokens_post_padded_ptr, sorted_token_ids_ptr,
                    num_experts, max_num_blocks, max_num_tokens_padded, sentinel,
                    BLOCK_SIZE_M: tl.constexpr, BUCKETS: tl.constexpr, CHUNK: tl.constexpr):
    bucket = tl.arange(0, BUCKETS)
    bucket_mask = bucket <= num_experts  # buckets 0..E-1 are experts, bucket E holds the -1 slots
    count = tl.load(counts_ptr + bucket, mask=bucket_mask, other=0)
    padded = (count + BLOCK_SIZE_M - 1) // BLOCK_SIZE_M * BLOCK_SIZE_M
    ends = tl.cumsum(padded, 0)
    tl.store(offsets_ptr + bucket, ends - padded, mask=bucket_mask)
    tl.store(num_tokens_post_padded_ptr, tl.sum(padded, 0))
    end_blocks = ends // BLOCK_SIZE_M
    for start in range(0, max_num_blocks, CHUNK):
        block = start + tl.arange(0, CHUNK)
        # A block's bucket is the number of buckets that end at or before it.
        owner = tl.sum((end_blocks[None, :] <= block[:, None]).to(tl.int32), axis=1)
        owner = tl.where(owner >= num_experts, -1, owner)
        tl.store(expert_ids_ptr + block, owner, mask=block < max_num_blocks)
    for start in range(0, max_num_tokens_padded, CHUNK * 16):
        pos = start + tl.arange(0, CHUNK * 16)
        tl.store(sorted_token_ids_ptr + pos, tl.full((CHUNK * 16,), sentinel, tl.int32),
                 mask=pos < max_num_tokens_padded)


@triton.jit(do_not_specialize=["numel"])
def _scatter_kernel(topk_ids_ptr, ranks_ptr, offsets_ptr, sorted_token_ids_ptr, numel, num_experts,
                    BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    expert = tl.load(topk_ids_ptr + offs, mask=mask, other=0).to(tl.int32)
    expert = tl.where(expert < 0, num_experts, expert)
    pos = tl.load(offsets_ptr + expert, mask=mask, other=0) + tl.load(ranks_ptr + offs, mask=mask, other=0)
    tl.store(sorted_token_ids_ptr + pos, offs.to(tl.int32), mask=mask)


def max_num_tokens_padded(numel: int, num_experts: int, block_size_m: int) -> int:
    """Upper bound of the padded length: each non-empty bucket (at most min(numel, E + 1)) pads < BLOCK_SIZE_M."""
    return numel + min(numel, num_experts + 1) * (block_size_m - 1)


def moe_align_block_size(topk_ids: torch.Tensor, block_size_m: int, num_experts: int) -> AlignedSlots:
    """Sort the token slots of ``topk_ids`` (M, topk) by expert, padding each expert to BLOCK_SIZE_M.

    Example:
        >>> import torch
        >>> ids = torch.tensor([[0, 1], [1, 0], [1, -1]], dtype=torch.int32)
        >>> a = moe_align_block_size(ids, 16, num_experts=2)  # doctest: +SKIP
        >>> int(a.num_tokens_post_padded)  # doctest: +SKIP
        48
    """
    numel = topk_ids.numel()
    device = topk_ids.device
    max_len = max_num_tokens_padded(numel, num_experts, block_size_m)
    max_blocks = triton.cdiv(max_len, block_size_m)
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
    ranks = torch.empty(numel, dtype=torch.int32, device=device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    sorted_token_ids = torch.empty(max_len, dtype=torch.int32, device=device)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_tokens_post_padded = torch.empty(1, dtype=torch.int32, device=device)
    ids = topk_ids.reshape(-1)
    block = 256
    grid = (triton.cdiv(numel, block),)
    _count_kernel[grid](ids, counts, ranks, numel, num_experts, BLOCK=block)
    _offsets_kernel[(1,)](counts, offsets, expert_ids, num_tokens_post_padded, sorted_token_ids,
                          num_experts, max_blocks, max_len, numel,
                          BLOCK_SIZE_M=block_size_m, BUCKETS=triton.next_power_of_2(num_experts + 1), CHUNK=64)
    _scatter_kernel[grid](ids, ranks, offsets, sorted_token_ids, numel, num_experts, BLOCK=block)
    return AlignedSlots(sorted_token_ids, expert_ids, num_tokens_post_padded)


# --- vLLM's launch rules (target="vllm") ---------------------------------------------------------------------------
# vLLM's fused_experts_impl (vllm/model_executor/layers/fused_moe/fused_moe.py): "SPARSITY_FACTOR is a heuristic
# margin ensuring num_tokens * top_k activates only a small fraction of total experts"; with it, and without an
# expert_map or group-quantized int4/int8_w8a16 weights, moe_align_block_size is skipped.
VLLM_SPARSITY_FACTOR = 4


def vllm_uses_naive_block_assignment(M: int, topk: int, num_experts: int, group_quantized: bool) -> bool:
    """vLLM's condition for its tiny-batch path: ``M * topk * SPARSITY_FACTOR <= E``, no expert_map (moe_opt
    never has one) and not int4_w4a16/int8_w8a16 with block_shape [0, group] ("block quantized code path is not
    implemented yet").

    Example:
        >>> vllm_uses_naive_block_assignment(1, 8, 256, False), vllm_uses_naive_block_assignment(9, 8, 256, False)
        (True, False)
    """
    return not group_quantized and M * topk * VLLM_SPARSITY_FACTOR <= num_experts


def vllm_naive_block_assignment(topk_ids: torch.Tensor, block_size_m: int) -> AlignedSlots:
    """vLLM's naive block assignment: no sorting; block i computes the (token, expert) pair i alone (its first row;
    the other BLOCK_SIZE_M - 1 rows are padding), its expert ``topk_ids.view(-1)[i]``, and
    ``num_tokens_post_padded = M * topk * BLOCK_SIZE_M``. vLLM passes ``sorted_token_ids=None``; the GEMM kernels'
    NAIVE path never reads it, so the expert ids stand in for the pointer.

    Example:
        >>> a = vllm_naive_block_assignment(torch.tensor([[3, 1]], dtype=torch.int32), 16)
        >>> a.expert_ids.tolist(), int(a.num_tokens_post_padded)
        ([3, 1], 32)
    """
    expert_ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    num_tokens_post_padded = torch.full((1,), expert_ids.numel() * block_size_m, dtype=torch.int32,
                                        device=topk_ids.device)
    return AlignedSlots(expert_ids, expert_ids, num_tokens_post_padded)


def vllm_max_num_tokens_padded(numel: int, num_experts: int, block_size_m: int) -> int:
    """The length of vLLM's sorted_token_ids (moe_align_block_size.py): ``numel + E * (BLOCK_SIZE_M - 1)``, or
    ``numel * BLOCK_SIZE_M`` when that is smaller (numel < E)."""
    padded = numel + num_experts * (block_size_m - 1)
    return min(numel * block_size_m, padded) if numel < num_experts else padded


def vllm_em(numel: int, a_rows: int, num_experts: int, block_size_m: int, naive: bool) -> int:
    """The rows vLLM's invoke_fused_moe_kernel launches programs for (EM; the grid is
    cdiv(EM, BLOCK_SIZE_M) * cdiv(N, BLOCK_SIZE_N)): ``numel * BLOCK_SIZE_M`` on the naive path; else the
    sorted_token_ids length, trimmed to ``min(that, numel * BLOCK_SIZE_M)`` when the GEMM's A has fewer rows than
    BLOCK_SIZE_M (``A.size(0) < config["BLOCK_SIZE_M"]``: GEMM1's A has M rows, GEMM2's M * topk). numel is
    M * topk for both GEMMs (``num_tokens = M * top_k``, top_k 1 for GEMM2's M * topk rows).

    Example:
        >>> vllm_em(8, 4, 64, 16, False), vllm_em(8, 8, 64, 16, False), vllm_em(8, 8, 64, 16, True)
        (128, 128, 128)
        >>> vllm_em(256, 128, 64, 16, False)
        1216
    """
    if naive:
        return numel * block_size_m
    em = vllm_max_num_tokens_padded(numel, num_experts, block_size_m)
    if a_rows < block_size_m:
        em = min(em, numel * block_size_m)
    return em

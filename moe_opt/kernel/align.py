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

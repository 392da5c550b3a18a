"""What a fused-MoE call must do at least: its FLOPs and the fewest bytes it must move, and the card's copy
bandwidth, so that a latency can be read as achieved TFLOP/s and GB/s."""

from __future__ import annotations

import statistics

from ..model.spec import ModelSpec
from ..space import operand_bytes


def moe_flops(spec: ModelSpec, M: int) -> float:
    """Multiply-adds x 2 of both GEMMs: 2*M*topk*(2N*K) + 2*M*topk*(N*K)."""
    return 6.0 * M * spec.topk * spec.N * spec.K


def weight_bytes_per_expert(spec: ModelSpec) -> float:
    """Bytes of one expert's w1 (2N x K) and w2 (K x N)."""
    return 3 * spec.N * spec.K * operand_bytes(spec.dtype)[1]


def expected_active_experts(spec: ModelSpec, M: int) -> float:
    """Expected distinct experts hit by M tokens routed uniformly at random, topk each."""
    return spec.E * (1.0 - (1.0 - spec.topk / spec.E) ** M)


def moe_min_bytes(spec: ModelSpec, M: int, active_experts: float | None = None) -> float:
    """Fewest bytes a fused-MoE call must move: the touched experts' weights, x read and the output written."""
    active = expected_active_experts(spec, M) if active_experts is None else active_experts
    act_bytes = 2 * M * spec.K * 2
    return active * weight_bytes_per_expert(spec) + act_bytes


def copy_bandwidth_gbps(device: str = "cuda", size_bytes: int = 1 << 30, repeats: int = 20) -> float:
    """The card's device-to-device copy bandwidth, bytes read plus bytes written per second (GB/s), median.

    Example:
        >>> copy_bandwidth_gbps()  # an H100 80GB HBM3  # doctest: +SKIP
        2988.2
    """
    import torch

    src = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rates = []
    for _ in range(repeats):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        rates.append(2 * size_bytes / (start.elapsed_time(end) / 1000) / 1e9)
    return statistics.median(rates)



"""The builtin kernel's inputs for one spec on one device: weights once, activations and routing per batch size."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from ..model.routing import RoutingSpec
from ..model.spec import ModelSpec
from ..space import Config, ConfigPair
from .fused_moe import fused_moe
from .quant import quantize_weight_fp8, quantize_weights

PER_M_BYTES = 1 << 30  # activations, routing and outputs kept resident across batch sizes


def _nbytes(tensors) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_nbytes(t) for t in tensors)


class MoeInputs:
    """Random inputs for one spec on one device: weights once, activations and routing per batch size.

    Routing follows ``routing`` (model/routing/): by default a real top-k over random softmaxed logits, or a
    Zipf-skewed popularity, or slices of a recorded trace; ``routing_sets`` different draws are made per batch
    size, so repeated calls touch different experts as serving does.
    """

    def __init__(self, spec: ModelSpec, device, *, routing_sets: int = 10, seed: int = 0,
                 routing: RoutingSpec | None = None, launch: str = "sglang", global_num_experts: int | None = None):
        """``global_num_experts``: the whole shape's experts, where ``spec`` has fewer (a compile worker's inputs:
        fused_moe's global_num_experts, so its alignment and launch rules are the whole shape's)."""
        self.spec = spec
        self.launch = launch  # whose launch rules each call follows (fused_moe's launch): the target engine
        self.routing = routing if routing is not None else RoutingSpec()
        self._route = self.routing.router(spec.E, spec.topk)  # a trace is read and checked here, once
        self.device = torch.device(device)
        self.routing_sets = routing_sets
        self.seed = seed
        gen = torch.Generator(device=self.device).manual_seed(seed)
        E, N, K = spec.E, spec.N, spec.K
        dtype = spec.activation_dtype
        self.kwargs: dict = {"swiglu_limit": spec.swiglu_limit}
        if global_num_experts is not None:
            self.kwargs["global_num_experts"] = global_num_experts
        if spec.dtype == "fp8_w8a8" and not spec.per_channel_quant:  # as every fp8 table was recorded
            w1 = torch.randn(E, 2 * N, K, generator=gen, device=self.device, dtype=torch.bfloat16)
            self.w1, s1 = quantize_weight_fp8(w1, spec.block_shape)
            del w1
            w2 = torch.randn(E, K, N, generator=gen, device=self.device, dtype=torch.bfloat16)
            self.w2, s2 = quantize_weight_fp8(w2, spec.block_shape)
            del w2
            self.kwargs.update(block_shape=spec.block_shape, w1_scale=s1 / K ** 0.5, w2_scale=s2 / N ** 0.5)
        elif spec.dtype is not None:  # the other formats (kernel/quant.py), from weights of unit output scale
            # In place: no second copy of a whole weight (compile workers build these at once: kernel/quant.py)
            w1 = torch.randn(E, 2 * N, K, generator=gen, device=self.device, dtype=torch.float32).div_(K ** 0.5)
            w2 = torch.randn(E, K, N, generator=gen, device=self.device, dtype=torch.float32).div_(N ** 0.5)
            quantized = [quantize_weights(w, spec.dtype, per_channel_quant=spec.per_channel_quant,
                                          group_size=spec.group_size, zero_point=spec.has_zero_point,
                                          block_shape=spec.block_shape if spec.group_size is None else None,
                                          scale_dtype=dtype) for w in (w1, w2)]
            del w1, w2
            (self.w1, s1, z1), (self.w2, s2, z2) = quantized
            self.kwargs.update(quant_dtype=spec.dtype, per_channel_quant=spec.per_channel_quant,
                               block_shape=spec.block_shape, w1_scale=s1, w2_scale=s2, w1_zp=z1, w2_zp=z2)
        else:
            self.w1 = torch.randn(E, 2 * N, K, generator=gen, device=self.device, dtype=dtype).div_(K ** 0.5)
            self.w2 = torch.randn(E, K, N, generator=gen, device=self.device, dtype=dtype).div_(N ** 0.5)
        self._per_m: dict[int, tuple] = {}
        self._active: dict[int, float] = {}

    def for_batch(self, M: int) -> tuple:
        """(x, [(topk_weights, topk_ids), ...], out) for batch size M; cached."""
        if M not in self._per_m:
            spec = self.spec
            gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + M)
            x = torch.randn(M, spec.K, generator=gen, device=self.device, dtype=spec.activation_dtype)
            routing = [self._route(M, gen, self.device) for _ in range(self.routing_sets)]
            out = torch.empty(M, spec.K, device=self.device, dtype=spec.activation_dtype)
            self._per_m[M] = (x, routing, out)
            # A tune measures its batch sizes round-robin: keep them all, unless they outgrow PER_M_BYTES (the
            # weights are what must fit); the oldest go first. Same seed, same draws when one is built again.
            while len(self._per_m) > 1 and sum(_nbytes(v) for v in self._per_m.values()) > PER_M_BYTES:
                oldest = next(iter(self._per_m))
                del self._per_m[oldest]
                self._active.pop(oldest, None)
        return self._per_m[M]

    def active_experts(self, M: int) -> float:
        """Mean number of experts the routing draws at batch size M touch (one device sync, once per M)."""
        if M not in self._active:
            _, routing, _ = self.for_batch(M)
            self._active[M] = statistics.mean(len(torch.unique(ids)) for _, ids in routing)
        return self._active[M]

    def call(self, config: Config | ConfigPair, M: int, routing_index: int = 0, *, up_only: bool = False,
             after_up: Any = None) -> torch.Tensor:
        """One fused-MoE call at batch size M with the ``routing_index``-th routing draw; a ConfigPair runs each
        GEMM with its own config; ``up_only`` stops after GEMM1's stage; ``after_up`` is called between the stages
        (fused_moe's)."""
        x, routing, out = self.for_batch(M)
        weights, ids = routing[routing_index % len(routing)]
        up, down = (config.up, config.down) if isinstance(config, ConfigPair) else (config, None)
        return fused_moe(x, self.w1, self.w2, weights, ids, up, config_down=down, out=out, up_only=up_only,
                         launch=self.launch, after_up=after_up, **self.kwargs)



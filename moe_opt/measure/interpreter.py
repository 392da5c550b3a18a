"""The interpreter timer: the same fused-MoE call through Triton's CPU interpreter, timed by the wall clock."""

from __future__ import annotations

import math
import time
from typing import Any

from ..kernel.backend import KernelBackend, get_backend
from ..model.spec import ModelSpec
from ..space import Config, ConfigPair
from ..store.identity import INTERPRETER_SOURCE
from .base import Measurement, MeasurerInfo, describe_failure

# A shape the interpreter runs in seconds per config, the scaled-down shape of a real model: a shape whose E*N*K
# and topk*N*K stay within these bounds' products is tuned as given; a larger one has each of E, topk, N, K that
# exceeds its bound brought down to it (N and K to a multiple the block_shape allows).
INTERPRETER_BOUNDS = {"E": 8, "topk": 2, "N": 128, "K": 256}


class InterpreterTimer:
    """Runs the same fused-MoE call through Triton's CPU interpreter and times it with the wall clock.

    The numbers say nothing about GPU speed; they exercise the tuning path (studies, export) without a GPU.
    """

    info = MeasurerInfo(device_name=INTERPRETER_SOURCE, source=INTERPRETER_SOURCE,
                        description="Triton CPU interpreter, wall clock (not a performance measurement)",
                        is_performance=False, kind="interpreter")

    def __init__(self, spec: ModelSpec, *, seed: int = 0, backend: str | KernelBackend = "builtin",
                 routing: Any = None, split_stages: bool = False):
        from ..kernel.interpret import interpreting

        if not interpreting():
            raise RuntimeError("InterpreterTimer needs TRITON_INTERPRET=1 set before moe_opt.kernel is imported")
        self.spec = spec
        self.backend = get_backend(backend)
        self.split_stages = split_stages  # also time GEMM1's stage alone: attrs up_us, down_us (pair tunes)
        self.inputs = self.backend.make_inputs(spec, "cpu", routing_sets=1, seed=seed, routing=routing)

    def measure(self, config: Config | ConfigPair, M: int) -> Measurement:
        try:
            split = self.split_stages and isinstance(config, Config)
            marks = []  # the clock between GEMM1's stage and GEMM2, as the CUDA-graph timer's event
            t0 = time.perf_counter()
            self.backend.call(self.inputs, config, M, after_up=(lambda: marks.append(time.perf_counter()))
                              if split else None)
            latency = (time.perf_counter() - t0) * 1e6
            attrs = {}
            if split:
                up_us = (marks[0] - t0) * 1e6
                attrs = {"up_us": up_us, "down_us": max(latency - up_us, 1e-3 * latency)}
            return Measurement(latency, None, attrs)
        except Exception as exc:
            return Measurement(None, describe_failure(exc))


    def run_with_inputs(self, fn, *args):
        """``fn(backend, inputs, *args)`` with this timer's kernel inputs (the correctness guard)."""
        return fn(self.backend, self.inputs, *args)


def interpreter_spec(spec: ModelSpec) -> ModelSpec:
    """``spec`` itself if the CPU interpreter runs it in seconds (INTERPRETER_BOUNDS), else a scaled-down copy:
    each of E, topk, N, K above its bound brought down to it, the others and the numerics kept.

    The kernel masks N and K that its blocks do not divide, so any N and K run; block-quantized weights need
    block_k to divide N and K and block_n to divide 2N and K (ModelSpec checks it), so a scaled N or K is the
    largest such multiple within the bound (or the smallest one, where the blocks are larger than the bound).

    Example:
        >>> s = ModelSpec.from_shape(num_experts=256, topk=8, hidden_size=7168, intermediate_size=2048,
        ...                          dtype="fp8_w8a8", block_shape=[128, 128], tp_size=8)
        >>> small = interpreter_spec(s); (small.E, small.topk, small.N, small.K)
        (8, 2, 128, 256)
        >>> tiny = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=64, intermediate_size=32)
        >>> interpreter_spec(tiny) == tiny
        True
    """
    b = INTERPRETER_BOUNDS
    NK = spec.N * spec.K
    if spec.E * NK <= b["E"] * b["N"] * b["K"] and spec.topk * NK <= b["topk"] * b["N"] * b["K"]:
        return spec

    def within(value: int, bound: int, step: int) -> int:
        return value if value <= bound else max(step, bound // step * step)

    block_n, block_k = spec.block_shape or (1, 1)
    block_n = block_n or 1  # a group format's [0, group_size]: the group divides N and K
    E = min(spec.E, b["E"])
    N = within(spec.N, b["N"], math.lcm(block_k, block_n // math.gcd(block_n, 2)))
    K = within(spec.K, b["K"], math.lcm(block_k, block_n))
    return spec.replace(num_experts=E, topk=min(spec.topk, b["topk"]), hidden_size=K,
                        intermediate_size=N * (spec.tp_size // spec.ep_size),
                        num_fused_shared_experts=spec.num_fused_shared_experts if E == spec.E else 0)

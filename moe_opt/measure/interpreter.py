"""The interpreter timer: the same fused-MoE call through Triton's CPU interpreter, timed by the wall clock."""

from __future__ import annotations

import time
from typing import Any

from ..kernel.backend import KernelBackend, get_backend
from ..model.spec import ModelSpec
from ..space import Config, ConfigPair
from ..store.identity import INTERPRETER_SOURCE
from .base import Measurement, MeasurerInfo, describe_failure


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
            t0 = time.perf_counter()
            self.backend.call(self.inputs, config, M)
            latency = (time.perf_counter() - t0) * 1e6
            attrs = {}
            if self.split_stages and isinstance(config, Config):
                t0 = time.perf_counter()
                self.backend.call_up(self.inputs, config, M)
                up_us = (time.perf_counter() - t0) * 1e6
                attrs = {"up_us": up_us, "down_us": max(latency - up_us, 1e-3 * latency)}
            return Measurement(latency, None, attrs)
        except Exception as exc:
            return Measurement(None, describe_failure(exc))


    def run_with_inputs(self, fn, *args):
        """``fn(backend, inputs, *args)`` with this timer's kernel inputs (the correctness guard)."""
        return fn(self.backend, self.inputs, *args)

"""Compile configs ahead of timing, in a pool of worker processes, so the GPU never waits on the compiler.

Compiling one config (both GEMMs) takes about a second of CPU time, benchmarking it about 20 ms, so compile
cost dominates a tune. Each worker launches the fused MoE once per config on a small batch; Triton writes the
binaries to its on-disk cache, where the measuring process finds them. The GEMM kernel does not specialize on
batch-size-dependent arguments (kernel/gemm.py), so one binary serves every batch size.

A config that fails to compile (OutOfResources: shared memory, a compiler error) is reported as a failure
string, not raised. Configs are first screened by the shared-memory estimate and never compiled if rejected.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable

from .measure import describe_failure
from .space import Config, fits_shared_memory
from .spec import ModelSpec

_worker_inputs = None


def _init_worker(spec_dict: dict, device: str) -> None:
    global _worker_inputs
    import torch

    from .measure import MoeInputs

    spec = ModelSpec.from_dict(spec_dict)
    # Few experts are enough: strides (hence the binary) depend on N and K only.
    small = spec.replace(num_experts=spec.topk, num_fused_shared_experts=0)
    if torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))
    _worker_inputs = MoeInputs(small, device, routing_sets=1, seed=0)


def _compile_one(config: Config) -> str | None:
    import torch

    try:
        _worker_inputs.call(config, 4)
        torch.cuda.synchronize()
        return None
    except Exception as exc:
        return describe_failure(exc)


def operand_bytes(spec: ModelSpec) -> tuple[int, int]:
    """Bytes per element of the GEMMs' A and B operands for this spec."""
    size = 1 if spec.dtype == "fp8_w8a8" else 2
    return size, size


def screen(spec: ModelSpec, config: Config, shared_memory_bytes: int) -> str | None:
    """Reject a config without compiling it when it cannot fit the device's shared memory."""
    a_bytes, b_bytes = operand_bytes(spec)
    if not fits_shared_memory(config, a_bytes, b_bytes, shared_memory_bytes):
        return f"Rejected: shared-memory estimate exceeds the device's {shared_memory_bytes} bytes per block"
    if spec.block_shape is not None and spec.block_shape[1] % config.BLOCK_SIZE_K:
        return f"Rejected: BLOCK_SIZE_K {config.BLOCK_SIZE_K} does not divide block_k {spec.block_shape[1]}"
    return None


class CompilePool:
    """A pool of compile workers for one spec. ``compile(configs)`` returns {config: failure or None}.

    Results are remembered, so asking again for a config costs nothing.

    Example:
        >>> pool = CompilePool(spec, workers=15)  # doctest: +SKIP
        >>> failures = pool.compile(space.grid(block_k=128))  # doctest: +SKIP
    """

    def __init__(self, spec: ModelSpec, *, workers: int | None = None, device: str = "cuda",
                 shared_memory_bytes: int | None = None):
        import torch

        self.spec = spec
        # One core stays free for the measuring process, which launches kernels while workers compile.
        self.workers = workers if workers is not None else max(1, min(15, (os.cpu_count() or 2) - 2))
        if shared_memory_bytes is None:
            props = torch.cuda.get_device_properties(torch.device(device))
            shared_memory_bytes = getattr(props, "shared_memory_per_block_optin", 232_448)
        self.shared_memory_bytes = shared_memory_bytes
        self.results: dict[Config, str | None] = {}
        self._inflight: dict[Config, object] = {}
        self._executor = ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(spec.to_dict(), device))

    def ensure(self, configs: Iterable[Config], *, speculative: bool = False) -> None:
        """Start compiling the configs not compiled or in flight yet.

        Speculative submissions (configs the search will likely ask for next) are only made while fewer
        compiles than workers are in flight, so they never queue ahead of configs that are needed now.
        """
        for config in configs:
            if config in self.results or config in self._inflight:
                continue
            if speculative and len(self._inflight) >= self.workers:
                return
            reason = screen(self.spec, config, self.shared_memory_bytes)
            if reason is not None:
                self.results[config] = reason
                continue
            self._inflight[config] = self._executor.submit(_compile_one, config)

    def result(self, config: Config) -> str | None:
        """Wait until ``config`` is compiled; its failure, or None."""
        if config not in self.results:
            self.ensure([config])
        future = self._inflight.pop(config, None)
        if future is not None:
            self.results[config] = future.result()
        for done in [c for c, f in self._inflight.items() if f.done()]:
            self.results[done] = self._inflight.pop(done).result()
        return self.results[config]

    def compile(self, configs: Iterable[Config]) -> dict[Config, str | None]:
        """Compile all configs (in parallel) and return {config: failure or None}."""
        configs = list(configs)
        self.ensure(configs)
        return {c: self.result(c) for c in configs}

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "CompilePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Compile configs ahead of timing, in a pool of worker processes, so the GPU never waits on the compiler.

Compiling one config (both GEMMs) takes about a second of CPU time, benchmarking it about 20 ms, so compile
cost dominates a tune. Each worker launches the fused MoE once per config; Triton writes the binaries to its
on-disk cache, where the measuring process finds them. The builtin GEMM kernel does not specialize on
batch-size-dependent arguments (kernel/gemm.py), so one launch on a small batch (two for vLLM's launch rules,
one on each side of its tiny-batch rule) compiles the binary of every batch size; the launch has the weights of a
few experts only, aligned as the whole shape's experts (KernelBackend.compile_inputs: the alignment's kernels
specialize on E; aligned as few experts, the measuring process compiled them again, 7 kernels for the 5
BLOCK_SIZE_M of DeepSeek-V4-Flash TP8 on the H200, benchmarks/measurer_compiles.py). An engine's own kernel does
specialize on them (Triton specializes ints on divisibility by 16 and on 1: EM, num_valid_tokens; vLLM's
tiny-batch path takes other arguments), so for such a backend (``specializes_on_m``) a job is a (config, batch
size) and the worker launches the whole shape at that
batch size, so the measuring process finds exactly the binary it launches.

A config that fails to compile (OutOfResources: shared memory, a compiler error) is reported as a failure
string, not raised. Configs are first screened by the shared-memory estimate and never compiled if rejected.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from typing import Callable, Iterable

from ..model.spec import ModelSpec
from ..space import Config, ConfigPair
from ..store.schema import is_compile_failure
from .base import describe_failure

_worker = None  # (backend, inputs, batch sizes each compile launches at) of this compile worker
SMALL_M = 4  # the batch size in the key of a compile that serves every batch size


def _init_worker(spec_dict: dict, device: str, backend_name: str) -> None:
    global _worker
    import torch

    from ..kernel.backend import get_backend

    spec = ModelSpec.from_dict(spec_dict)
    backend = get_backend(backend_name)
    if torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))
    sizes = None if backend.specializes_on_m else backend.compile_batch_sizes(spec)
    _worker = backend, backend.compile_inputs(spec, device), sizes
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the weights' quantization temporaries: the other workers need the memory


def _started() -> None:
    """A task that does nothing: sent once per worker, it makes the pool start (import torch, CUDA context)."""


def _compile_one(config: Config | ConfigPair, M: int) -> str | None:
    import torch

    backend, inputs, sizes = _worker
    try:
        for m in sizes or (M,):
            backend.call(inputs, config, m)
        torch.cuda.synchronize()
        return None
    except Exception as exc:
        return describe_failure(exc)


def usable_cores() -> int:
    """CPU cores this process may run on (taskset, cgroups' cpusets), not all the host has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 2


Job = tuple[Config | ConfigPair, int]  # a config (or a config per GEMM) and the batch size it runs at


class CompilePool:
    """A pool of compile workers for one spec. A job is a (config, batch size), the config a Config or a ConfigPair
    (a config per GEMM); ``compile(configs, M)`` returns {config: failure or None}.

    Results are remembered, so asking again costs nothing. For a backend that does not specialize on the batch
    size, one compile serves every batch size: jobs of one config at different batch sizes are one compile.

    Example:
        >>> pool = CompilePool(spec, workers=15)  # doctest: +SKIP
        >>> failures = pool.compile(space.grid(block_k=128), M=64)  # doctest: +SKIP
    """

    def __init__(self, spec: ModelSpec, *, workers: int | None = None, device: str = "cuda",
                 shared_memory_bytes: int | None = None, executor: Executor | None = None,
                 compile_fn: Callable[[Config, int], str | None] | None = None, backend: str = "builtin"):
        """Args:
            spec: the shape whose kernels are compiled.
            workers: processes (default: CPU cores - 2, at most 15).
            device: the CUDA device the workers compile for.
            shared_memory_bytes: the device's per-block limit for the screen (default: asked of the device).
            executor, compile_fn: where and how to compile instead of the worker processes (tests and other
                backends): ``executor.submit(compile_fn, config, M)`` must return the failure string or None.
            backend: the kernel backend's name (kernel/backend.py), which builds the inputs and runs the call;
                its ``specializes_on_m`` decides whether a compile serves one batch size or all.
        """
        from ..kernel.backend import get_backend

        self.spec = spec
        self.backend = get_backend(backend)
        self.per_batch_size = self.backend.specializes_on_m
        # One core stays free for the measuring process, which launches kernels while workers compile.
        self.workers = workers if workers is not None else max(1, min(15, usable_cores() - 2))
        if shared_memory_bytes is None:
            from .cuda_graph import cuda_graph_info

            shared_memory_bytes = cuda_graph_info(device).shared_memory_bytes
        self.shared_memory_bytes = shared_memory_bytes
        self.results: dict[Job, str | None] = {}
        self._inflight: dict[Job, Future] = {}
        self._submitted = 0
        self.broken: str | None = None  # why the pool stopped compiling, once it has
        self.launch_failed: str | None = None  # the first launch error of a worker (not a compile failure)
        self.ready_at: float | None = None  # when the first worker had started, after prestart()
        self._compile = compile_fn or _compile_one
        self._executor = executor or ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(spec.to_dict(), device, self.backend.ref))

    def _key(self, config: Config, M: int) -> Job:
        """What one compile serves: the config at this batch size, or at every one."""
        return (config, M) if self.per_batch_size else (config, SMALL_M)

    def ensure(self, jobs: Iterable[Job], *, speculative: bool = False) -> None:
        """Start compiling the (config, batch size) jobs not compiled or in flight yet.

        Speculative submissions (configs the search will likely ask for next) are only made while fewer
        compiles than workers are in flight, so they never queue ahead of configs that are needed now.
        """
        self._sweep()
        for config, M in jobs:
            key = self._key(config, M)
            if key in self.results or key in self._inflight:
                continue
            if speculative and len(self._inflight) >= self.workers:
                return
            parts = (config.up, config.down) if isinstance(config, ConfigPair) else (config,)
            reason = next(filter(None, (self.backend.screen(self.spec, c, self.shared_memory_bytes) for c in parts)),
                          None)
            if reason is not None:
                self.results[key] = reason
                continue
            try:
                self._inflight[key] = self._executor.submit(self._compile, *key)
            except RuntimeError as exc:  # a broken pool (a worker died): the measurer compiles it itself
                self._broke(exc)
                self.results[key] = None
                continue
            self._submitted += 1

    def prestart(self) -> None:
        """Start every worker now (seconds of imports and CUDA set-up), not when the first configs arrive.
        ``ready_at`` becomes the time.perf_counter() at which the first of them could compile."""

        def started(_future: Future) -> None:
            if self.ready_at is None:
                self.ready_at = time.perf_counter()

        for _ in range(self.workers):
            self._executor.submit(_started).add_done_callback(started)

    @property
    def compiled(self) -> int:
        """Compiles sent to a worker so far (screened-out configs not counted)."""
        return self._submitted

    def ready(self, config: Config, M: int) -> bool:
        """Whether the compile of ``config`` at batch size M has finished (or it was screened out): result()
        will not wait."""
        key = self._key(config, M)
        future = self._inflight.get(key)
        return key in self.results or (future is not None and future.done())

    def wait_any(self, jobs: Iterable[Job], timeout_s: float | None = None) -> None:
        """Block until one of the jobs is ready (starting the compiles not started yet)."""
        jobs = list(jobs)
        self.ensure(jobs)
        if any(self.ready(c, M) for c, M in jobs):
            return
        futures = [self._inflight[k] for k in (self._key(c, M) for c, M in jobs) if k in self._inflight]
        if futures:
            wait(futures, timeout=timeout_s, return_when=FIRST_COMPLETED)

    def result(self, config: Config, M: int) -> str | None:
        """Wait until ``config`` is compiled for batch size M; its failure, or None."""
        key = self._key(config, M)
        if key not in self.results:
            self.ensure([(config, M)])
        future = self._inflight.get(key)
        if future is not None:
            future.exception()  # waits
        self._sweep()
        return self.results[key]

    def _sweep(self) -> None:
        """Move finished compiles from in flight to results. A compile whose worker died (a crash in the
        compiler breaks the whole pool) reports None: the measuring process compiles the config itself."""
        for done in [k for k, f in self._inflight.items() if f.done()]:
            future = self._inflight.pop(done)
            if future.exception() is not None:
                self._broke(future.exception())
            self.results[done] = None if future.exception() is not None else future.result()
            failure = self.results[done]
            if failure is not None and not is_compile_failure(failure) and self.launch_failed is None:
                # A worker whose CUDA context an earlier config broke, or inputs it cannot launch: the measuring
                # process compiles such configs (compile_failure() does not report them), slower: said once.
                self.launch_failed = failure
                print(f"moe-opt: a compile worker could not launch {done[0]} at M={done[1]} ({failure}); the "
                      "measuring process compiles such configs itself", file=sys.stderr, flush=True)

    def _broke(self, exc: BaseException) -> None:
        """Say once that compiles fall back to the measuring process (a tune goes on, slower: it should be seen)."""
        if self.broken is None:
            self.broken = describe_failure(exc)
            print(f"moe-opt: the compile pool failed ({self.broken}); the measuring process compiles each config "
                  "itself from now on (slower)", file=sys.stderr, flush=True)

    def compile(self, configs: Iterable[Config], M: int = SMALL_M) -> dict[Config, str | None]:
        """Compile all configs for batch size M (in parallel) and return {config: failure or None}."""
        configs = list(configs)
        self.ensure((c, M) for c in configs)
        return {c: self.result(c, M) for c in configs}

    def close(self) -> None:
        """Cancel the compiles not started and let the workers exit without waiting for them: a tune's result is
        written by then, and each worker's exit (its CUDA context's teardown) is the driver's work, not the tune's.
        The pool's own thread reaps them; an interpreter that exits meanwhile waits for that (concurrent.futures)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "CompilePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

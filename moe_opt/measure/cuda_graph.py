"""The CUDA-graph timer: a config timed as serving runs it, on the GPU."""

from __future__ import annotations

import statistics
from functools import partial
from typing import Any

import torch

from ..kernel.backend import KernelBackend, get_backend
from ..model.spec import ModelSpec
from ..space import HOPPER_SHARED_MEMORY_BYTES, Config, ConfigPair
from .base import Measurement, MeasurerInfo, describe_failure
from .roofline import moe_flops, moe_min_bytes


def cuda_graph_description(device_name: str, calls_per_graph: int = 10, replays: int = 5) -> str:
    """How :class:`CudaGraphTimer` measures, for the study's "measurement" attribute."""
    return f"CUDA graph of {calls_per_graph} calls, L2 flushed, median of {replays} replays, {device_name}"


def cuda_graph_info(device: str | torch.device = "cuda", calls_per_graph: int = 10, replays: int = 5) -> MeasurerInfo:
    """The :class:`MeasurerInfo` of a CUDA-graph timer on ``device``, read from the device (name, shared memory
    per block); the tuning process asks it without building the timer."""
    from ..kernel.tma import device_supports_tma

    props = torch.cuda.get_device_properties(torch.device(device))
    smem = getattr(props, "shared_memory_per_block_optin", 0) or HOPPER_SHARED_MEMORY_BYTES
    return MeasurerInfo(device_name=props.name, source=props.name,
                        description=cuda_graph_description(props.name, calls_per_graph, replays),
                        is_performance=True, shared_memory_bytes=int(smem), kind="cuda_graph",
                        tma=device_supports_tma(device), stops_early=True)


class CudaGraphTimer:
    """Times a config as serving runs it: ``calls_per_graph`` fused-MoE calls captured in one CUDA graph,
    each with its own routing draw; the L2 cache flushed before every timed replay; the median over
    ``replays`` replays, divided by the calls per graph.

    Example:
        >>> timer = CudaGraphTimer(spec)  # doctest: +SKIP
        >>> timer.measure(Config(64, 128, 128, 32, 4, 3), M=64).latency_us  # doctest: +SKIP
        41.7
    """

    def __init__(self, spec: ModelSpec, device: str | torch.device = "cuda", *, calls_per_graph: int = 10,
                 replays: int = 5, seed: int = 0, backend: str | KernelBackend = "builtin", routing: Any = None,
                 split_stages: bool = False):
        self.spec = spec
        self.device = torch.device(device)
        self.calls_per_graph = calls_per_graph
        self.replays = replays
        self.backend = get_backend(backend)
        self.split_stages = split_stages  # also time GEMM1's stage alone: attrs up_us, down_us (pair tunes)
        self.inputs = self.backend.make_inputs(spec, self.device, routing_sets=calls_per_graph, seed=seed,
                                               routing=routing)
        props = torch.cuda.get_device_properties(self.device)
        # Twice the L2 size, zeroed before each timed replay, evicts the weights of the previous replay.
        l2_bytes = getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20
        self._flush = torch.empty(2 * l2_bytes, dtype=torch.uint8, device=self.device)
        self.info = cuda_graph_info(self.device, calls_per_graph, replays)
        with torch.cuda.device(self.device):
            self._stream = torch.cuda.Stream()  # the capture stream, one for every graph
            self._pool = _GraphPool(self.device)

    def measure(self, config: Config | ConfigPair, M: int, stop_above_us: float | None = None) -> Measurement:
        """The config's Measurement at M; with ``stop_above_us``, one timed replay only where that one is
        slower (attrs ``replays``: 1), the rest skipped (MeasurerInfo.stops_early)."""
        try:
            with torch.cuda.device(self.device):
                return self._measure(config, M, stop_above_us)
        except Exception as exc:  # a config that does not compile or launch is a result, not a crash
            try:
                torch.cuda.synchronize(self.device)
            except Exception:
                pass  # a sticky error: healthy() says so, and the isolated process is replaced
            return Measurement(None, describe_failure(exc))

    def run_with_inputs(self, fn, *args):
        """``fn(backend, inputs, *args)`` with this timer's kernel inputs (the correctness guard)."""
        with torch.cuda.device(self.device):
            return fn(self.backend, self.inputs, *args)

    def healthy(self) -> bool:
        """Whether the CUDA context still works: an illegal memory access breaks it for every later call, and
        only a new process recovers (isolation.py)."""
        try:
            with torch.cuda.device(self.device):
                torch.cuda.synchronize()
                return torch.ones(1, device=self.device).add_(1).item() == 2.0
        except Exception:
            return False

    def _measure(self, config: Config | ConfigPair, M: int, stop_above_us: float | None = None) -> Measurement:
        call = partial(self.backend.call, self.inputs, config, M)
        split = self.split_stages and isinstance(config, Config)
        latency, times_us, up_us = self._time(call, split, stop_above_us)
        active = self.inputs.active_experts(M)
        attrs = {"tflops": moe_flops(self.spec, M) / latency / 1e6,
                 "gbps": moe_min_bytes(self.spec, M, active) / latency / 1e3,
                 "replay_spread": (max(times_us) - min(times_us)) / latency}
        if split:
            attrs.update(up_us=up_us, down_us=max(latency - up_us, 1e-3 * latency))
        if len(times_us) < self.replays:
            attrs.update(replays=len(times_us), stopped_above_us=stop_above_us)
        return Measurement(latency, None, attrs)

    def _time(self, call, split: bool = False,
              stop_above_us: float | None = None) -> tuple[float, list[float], float | None]:
        """(median µs per call, every replay's µs per call, median µs of GEMM1's stage per call or None) of
        ``call(routing_index=i)`` for i < calls_per_graph, captured in one CUDA graph, the L2 flushed before each
        replay.

        ``split``: GEMM1's stage (alignment, GEMM1, activation) is timed inside the same graph, by an event before
        each call and one the call records between its stages (``after_up``); GEMM2's stage is the rest of the
        whole call. One graph serves both: a second graph of GEMM1's stage alone took a pair tune's measurement
        from 48.9 to 64.4 ms on the H200 (benchmarks/profile_measure.py), and a separate GEMM2 graph would read
        GEMM1's output from HBM after the flush, not from L2 as serving does. The two events add about 8 µs to each
        call there, the same for every config (docs/tuning.md).

        ``stop_above_us``: where the first timed replay's µs per call is above it, the other replays are skipped."""
        marks = [(torch.cuda.Event(enable_timing=True, external=True),
                  torch.cuda.Event(enable_timing=True, external=True)) for _ in range(self.calls_per_graph)] \
            if split else None
        call()  # compiles (or loads from Triton's cache) outside the graph
        torch.cuda.synchronize()
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            call()  # warm-up on the capture stream, as torch.cuda.graphs asks
            # capture_begin, not torch.cuda.graph(): that one empties the allocator's cache before every capture,
            # so each measurement paid cudaFree and cudaMalloc again for every buffer (_GraphPool says why not).
            graph.capture_begin(pool=self._pool.id)
            try:
                for i in range(self.calls_per_graph):
                    if marks is None:
                        call(routing_index=i)
                    else:  # external events: record nodes in the graph, timed at every replay
                        marks[i][0].record()
                        call(routing_index=i, after_up=marks[i][1].record)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        graph.replay()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        times_us, up_times_us = [], []
        for _ in range(self.replays):
            self._flush.zero_()
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times_us.append(start.elapsed_time(end) * 1000.0 / self.calls_per_graph)
            if marks is not None:
                up_times_us.append(sum(a.elapsed_time(b) for a, b in marks) * 1000.0 / self.calls_per_graph)
            if stop_above_us is not None and times_us[0] > stop_above_us:
                break
        self._pool.keep(graph)
        return statistics.median(times_us), times_us, statistics.median(up_times_us) if marks else None


class _GraphPool:
    """One memory pool for the graphs this timer captures, one graph replayed at a time: the buffers a capture
    allocates are reused by the next instead of being freed to the driver and allocated again.

    A pool lives as long as a graph uses it, and holding it with a ``torch.cuda.MemPool`` instead trips the pinned-
    host allocator's assertion (``use_count > 0``, torch 2.11 on the H200), so the last graph is held until the
    next one has been captured into its pool. Nothing is replayed out of order: a capture may reuse the previous
    graph's memory, and that graph is never replayed again. Different batch sizes leave different buffers behind:
    once the process holds ``limit_bytes`` more than when it started, the pool is let go and the cache emptied, so
    compile workers on the same GPU keep theirs.
    """

    def __init__(self, device: torch.device, limit_bytes: int = 4 << 30):
        self.device = device
        self.limit_bytes = limit_bytes
        self._base = torch.cuda.memory_reserved(device)
        self._last: torch.cuda.CUDAGraph | None = None

    @property
    def id(self):
        """The pool the next capture goes into."""
        return self._last.pool() if self._last is not None else torch.cuda.graph_pool_handle()

    def keep(self, graph: torch.cuda.CUDAGraph) -> None:
        """``graph`` is timed: it holds the pool open for the next capture (the one before it is let go)."""
        self._last = graph
        if torch.cuda.memory_reserved(self.device) - self._base > self.limit_bytes:
            self._last = None
            torch.cuda.empty_cache()

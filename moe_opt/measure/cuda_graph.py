"""The CUDA-graph timer: a config timed as serving runs it, on the GPU."""

from __future__ import annotations

import statistics
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ..kernel.backend import KernelBackend, get_backend
from ..model.spec import ModelSpec
from ..space import HOPPER_SHARED_MEMORY_BYTES, Config, ConfigPair
from .base import Measurement, MeasurerInfo, describe_failure
from .roofline import moe_flops, moe_min_bytes

Upcoming = Callable[[], "tuple[Config | ConfigPair, int] | None"]  # the next measurement, where known


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
                        tma=device_supports_tma(device), stops_early=True, prefetches=True)


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
        self.prefetched = False

    def measure(self, config: Config | ConfigPair, M: int, stop_above_us: float | None = None,
                upcoming: Upcoming | None = None) -> Measurement:
        """The config's Measurement at M; with ``stop_above_us``, one timed replay only where that one is
        slower (attrs ``replays``: 1), the rest skipped (MeasurerInfo.stops_early); with ``upcoming``, the next
        measurement's graph captured while this one's first replays run (MeasurerInfo.prefetches; afterwards
        ``prefetched`` says whether that put the next config's eager call on the GPU during this measurement)."""
        self.prefetched = False
        try:
            with torch.cuda.device(self.device):
                return self._measure(config, M, stop_above_us, upcoming)
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

    def _measure(self, config: Config | ConfigPair, M: int, stop_above_us: float | None = None,
                 upcoming: Upcoming | None = None) -> Measurement:
        split = self.split_stages and isinstance(config, Config)
        key = (config, M, split)
        captured = self._pool.take(key)
        if captured is None:
            captured = self._capture(config, M, split)
        latency, times_us, up_us = self._time(captured, stop_above_us, upcoming)
        self._pool.keep(key, captured)
        active = self.inputs.active_experts(M)
        attrs = {"tflops": moe_flops(self.spec, M) / latency / 1e6,
                 "gbps": moe_min_bytes(self.spec, M, active) / latency / 1e3,
                 "replay_spread": (max(times_us) - min(times_us)) / latency}
        if split:
            attrs.update(up_us=up_us, down_us=max(latency - up_us, 1e-3 * latency))
        if len(times_us) < self.replays:
            attrs.update(replays=len(times_us), stopped_above_us=stop_above_us)
        return Measurement(latency, None, attrs)

    def _capture(self, config: Config | ConfigPair, M: int, split: bool,
                 after: torch.cuda.Event | None = None) -> _Captured:
        """``call(routing_index=i)`` for i < calls_per_graph, captured in one CUDA graph on the capture stream.

        ``split``: GEMM1's stage (alignment, GEMM1, activation) is timed inside the same graph, by an event before
        each call and one the call records between its stages (``after_up``); GEMM2's stage is the rest of the
        whole call. One graph serves both: a second graph of GEMM1's stage alone took a pair tune's measurement
        from 48.9 to 64.4 ms on the H200 (benchmarks/profile_measure.py), and a separate GEMM2 graph would read
        GEMM1's output from HBM after the flush, not from L2 as serving does. The two events add about 8 µs to each
        call there, the same for every config (docs/tuning.md).

        ``after``: the event of another measurement's replay running now (a prefetch, :meth:`_time`): the eager
        call here runs on the GPU after it, never beside a timed replay, and nothing waits for it.
        """
        call = partial(self.backend.call, self.inputs, config, M)
        marks = [(torch.cuda.Event(enable_timing=True, external=True),
                  torch.cuda.Event(enable_timing=True, external=True)) for _ in range(self.calls_per_graph)] \
            if split else None
        stream = self._stream
        if after is None:
            stream.wait_stream(torch.cuda.current_stream())
        else:
            stream.wait_event(after)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            call()  # loads the kernels (Triton's cache, or compiles) and warms them up, outside the graph
            if after is None:
                torch.cuda.synchronize()  # an error of this config's kernels surfaces here, in its own measurement
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
        return _Captured(graph, marks)

    def _time(self, captured: _Captured, stop_above_us: float | None = None,
              upcoming: Upcoming | None = None) -> tuple[float, list[float], float | None]:
        """(median µs per call, every replay's µs per call, median µs of GEMM1's stage per call or None) of a
        captured graph: one replay to warm up, then ``replays`` timed ones, the L2 flushed before each.

        ``stop_above_us``: where the first timed replay's µs per call is above it, the other replays are skipped.

        ``upcoming``: asked once, while the warm-up and the first timed replay run on the GPU, for the next
        measurement (config, M); its graph is captured meanwhile (the CPU's share of a measurement, about as long
        as those replays on the H200), and its eager call runs on the GPU before this one's second timed replay,
        so no timed replay shares the GPU with it. The next measurement then finds its graph captured."""
        current = torch.cuda.current_stream()
        current.wait_stream(self._stream)  # the capture's eager call ran before any replay
        marks = captured.marks
        captured.graph.replay()  # warm-up (the first replay of a graph also uploads it)
        times_us, up_times_us = [], []
        for r in range(self.replays):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            self._flush.zero_()
            start.record()
            captured.graph.replay()
            end.record()
            if r == 0 and upcoming is not None:
                self._prefetch(upcoming, end)
                current.wait_stream(self._stream)  # the next config's eager call, before the next timed replay
            end.synchronize()
            times_us.append(start.elapsed_time(end) * 1000.0 / self.calls_per_graph)
            if marks is not None:
                up_times_us.append(sum(a.elapsed_time(b) for a, b in marks) * 1000.0 / self.calls_per_graph)
            if stop_above_us is not None and times_us[0] > stop_above_us:
                break
        return statistics.median(times_us), times_us, statistics.median(up_times_us) if marks else None

    def _prefetch(self, upcoming: Upcoming, after: torch.cuda.Event) -> None:
        """Capture the next measurement's graph now, if there is one and it was not captured before. A config
        that fails here is left to its own measurement, which captures it again and records why."""
        try:
            nxt = upcoming()
        except Exception:
            return
        if nxt is None:
            return
        config, M = nxt
        split = self.split_stages and isinstance(config, Config)
        key = (config, M, split)
        if self._pool.has(key):
            return
        self.prefetched = True  # its eager call runs on the GPU during this measurement (isolated.py asks)
        try:
            captured = self._capture(config, M, split, after=after)
        except Exception:
            return
        self._pool.keep(key, captured)


@dataclass
class _Captured:
    """A captured graph of one measurement and, for a pair tune's Config, the events around GEMM1's stage."""

    graph: torch.cuda.CUDAGraph
    marks: list | None


class _GraphPool:
    """One memory pool for the graphs this timer captures, and the last ``kept`` graphs, to be timed again without
    a capture (re-measuring times each contender three times; a prefetched graph waits here for its measurement).

    The buffers a capture allocates are reused by the next instead of being freed to the driver and allocated
    again, so graphs of the pool share memory. That is safe here because the graphs never run at the same time
    (one stream, each replay waited for) and a fused-MoE call writes every buffer it reads within the call (the
    alignment's, GEMM1's, the activation's, GEMM2's outputs); its inputs live outside the pool.

    The pool lives as long as a graph uses it, and holding it with a ``torch.cuda.MemPool`` instead trips the
    pinned-host allocator's assertion (``use_count > 0``, torch 2.11 on the H200), so the first graph is held as the
    pool's anchor. Different batch sizes leave different buffers behind: once the process holds ``limit_bytes`` more
    than when it started, the pool and every kept graph are let go and the cache emptied, so compile workers on the
    same GPU keep theirs.
    """

    def __init__(self, device: torch.device, limit_bytes: int = 4 << 30, kept: int = 128):
        self.device = device
        self.limit_bytes = limit_bytes
        self.kept = kept
        self._base = torch.cuda.memory_reserved(device)
        self._anchor: torch.cuda.CUDAGraph | None = None
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()

    @property
    def id(self):
        """The pool the next capture goes into."""
        return self._anchor.pool() if self._anchor is not None else torch.cuda.graph_pool_handle()

    @property
    def held(self) -> bool:
        """Whether the pool is held (False right after it was let go)."""
        return self._anchor is not None

    def has(self, key: tuple) -> bool:
        return key in self._graphs

    def take(self, key: tuple) -> _Captured | None:
        """The kept graph of (config, M, split), or None."""
        return self._graphs.pop(key, None)

    def keep(self, key: tuple, captured: _Captured) -> None:
        """Keep a graph to be timed again (the oldest kept one is let go past ``kept``)."""
        if self._anchor is None:
            self._anchor = captured.graph
        self._graphs[key] = captured
        while len(self._graphs) > self.kept:
            self._graphs.popitem(last=False)
        if torch.cuda.memory_reserved(self.device) - self._base > self.limit_bytes:
            self._anchor = None
            self._graphs.clear()
            torch.cuda.empty_cache()

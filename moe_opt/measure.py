"""Ways to measure a config: a CUDA-graph timer on the GPU, a wall-clock run on Triton's CPU interpreter, and a
recorded table (replay). The tuner takes any object with ``measure(config, M) -> Measurement``.

A config that cannot compile or run is not an exception here: it comes back as a Measurement with ``error`` set.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .space import Config
from .spec import ModelSpec


@dataclass(frozen=True)
class Measurement:
    """The outcome of timing one config at one batch size.

    Attributes:
        latency_us: microseconds per fused-MoE call (median of the timed replays), or None if it failed.
        error: why the config failed to compile or run ("OutOfResources: ..."), or None.
        attrs: extra facts to record with the trial (achieved TFLOP/s and GB/s, replays, ...).
    """

    latency_us: float | None
    error: str | None = None
    attrs: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.latency_us is not None


class Measurer(Protocol):
    """Anything that can measure a config at a batch size. ``is_performance`` is False for the interpreter."""

    is_performance: bool
    description: str

    def measure(self, config: Config, M: int) -> Measurement: ...


def describe_failure(exc: BaseException) -> str:
    """One line naming the failure: the exception type and the first line of its message."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:500]


def moe_flops(spec: ModelSpec, M: int) -> float:
    """Multiply-adds x 2 of both GEMMs: 2*M*topk*(2N*K) + 2*M*topk*(N*K)."""
    return 6.0 * M * spec.topk * spec.N * spec.K


def weight_bytes_per_expert(spec: ModelSpec) -> int:
    per_elem = 1 if spec.dtype == "fp8_w8a8" else 2
    return 3 * spec.N * spec.K * per_elem


def expected_active_experts(spec: ModelSpec, M: int) -> float:
    """Expected distinct experts hit by M tokens routed uniformly at random, topk each."""
    return spec.E * (1.0 - (1.0 - spec.topk / spec.E) ** M)


def moe_min_bytes(spec: ModelSpec, M: int, active_experts: float | None = None) -> float:
    """Fewest bytes a fused-MoE call must move: the touched experts' weights, x read and the output written."""
    active = expected_active_experts(spec, M) if active_experts is None else active_experts
    act_bytes = 2 * M * spec.K * 2
    return active * weight_bytes_per_expert(spec) + act_bytes


class MoeInputs:
    """Random inputs for one spec on one device: weights once, activations and routing per batch size.

    Routing is a real top-k over random softmaxed logits; ``routing_sets`` different draws are made per batch
    size, so repeated calls touch different experts as serving does.
    """

    def __init__(self, spec: ModelSpec, device: str | torch.device, *, routing_sets: int = 10, seed: int = 0):
        from .kernel import quantize_weight_fp8

        self.spec = spec
        self.device = torch.device(device)
        self.routing_sets = routing_sets
        self.seed = seed
        gen = torch.Generator(device=self.device).manual_seed(seed)
        E, N, K = spec.E, spec.N, spec.K
        dtype = spec.activation_dtype
        self.kwargs: dict = {"swiglu_limit": spec.swiglu_limit}
        if spec.dtype == "fp8_w8a8":
            w1 = torch.randn(E, 2 * N, K, generator=gen, device=self.device, dtype=torch.bfloat16)
            self.w1, s1 = quantize_weight_fp8(w1, spec.block_shape)
            del w1
            w2 = torch.randn(E, K, N, generator=gen, device=self.device, dtype=torch.bfloat16)
            self.w2, s2 = quantize_weight_fp8(w2, spec.block_shape)
            del w2
            self.kwargs.update(block_shape=spec.block_shape, w1_scale=s1 / K ** 0.5, w2_scale=s2 / N ** 0.5)
        else:
            self.w1 = torch.randn(E, 2 * N, K, generator=gen, device=self.device, dtype=dtype) / K ** 0.5
            self.w2 = torch.randn(E, K, N, generator=gen, device=self.device, dtype=dtype) / N ** 0.5
        self._per_m: dict[int, tuple] = {}

    def for_batch(self, M: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """(x, [(topk_weights, topk_ids), ...], out) for batch size M; cached."""
        if M not in self._per_m:
            spec = self.spec
            gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + M)
            x = torch.randn(M, spec.K, generator=gen, device=self.device, dtype=spec.activation_dtype)
            routing = []
            for _ in range(self.routing_sets):
                logits = torch.randn(M, spec.E, generator=gen, device=self.device, dtype=torch.float32)
                weights, ids = logits.softmax(-1).topk(spec.topk, dim=-1)
                routing.append((weights.contiguous(), ids.to(torch.int32).contiguous()))
            out = torch.empty(M, spec.K, device=self.device, dtype=spec.activation_dtype)
            self._per_m = {M: (x, routing, out)}  # keep one batch size resident: weights dominate memory
        return self._per_m[M]

    def active_experts(self, M: int) -> float:
        _, routing, _ = self.for_batch(M)
        return statistics.mean(len(torch.unique(ids)) for _, ids in routing)

    def call(self, config: Config, M: int, routing_index: int = 0) -> torch.Tensor:
        from .kernel import fused_moe

        x, routing, out = self.for_batch(M)
        weights, ids = routing[routing_index % len(routing)]
        return fused_moe(x, self.w1, self.w2, weights, ids, config, out=out, **self.kwargs)


def copy_bandwidth_gbps(device: str = "cuda", size_bytes: int = 1 << 30, repeats: int = 20) -> float:
    """The card's device-to-device copy bandwidth, bytes read plus bytes written per second (GB/s), median.

    Example:
        >>> copy_bandwidth_gbps()  # an H100 80GB HBM3  # doctest: +SKIP
        2988.2
    """
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


def cuda_graph_description(device_name: str, calls_per_graph: int = 10, replays: int = 5) -> str:
    """How :class:`CudaGraphTimer` measures, for the study's "measurement" attribute."""
    return f"CUDA graph of {calls_per_graph} calls, L2 flushed, median of {replays} replays, {device_name}"


class CudaGraphTimer:
    """Times a config as serving runs it: ``calls_per_graph`` fused-MoE calls captured in one CUDA graph,
    each with its own routing draw; the L2 cache flushed before every timed replay; the median over
    ``replays`` replays, divided by the calls per graph.

    Example:
        >>> timer = CudaGraphTimer(spec)  # doctest: +SKIP
        >>> timer.measure(Config(64, 128, 128, 32, 4, 3), M=64).latency_us  # doctest: +SKIP
        41.7
    """

    is_performance = True

    def __init__(self, spec: ModelSpec, device: str | torch.device = "cuda", *, calls_per_graph: int = 10,
                 replays: int = 5, seed: int = 0):
        self.spec = spec
        self.device = torch.device(device)
        self.calls_per_graph = calls_per_graph
        self.replays = replays
        self.inputs = MoeInputs(spec, self.device, routing_sets=calls_per_graph, seed=seed)
        props = torch.cuda.get_device_properties(self.device)
        self.device_name = props.name
        # Twice the L2 size, zeroed before each timed replay, evicts the weights of the previous replay.
        l2_bytes = getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20
        self._flush = torch.empty(2 * l2_bytes, dtype=torch.uint8, device=self.device)
        self.description = cuda_graph_description(props.name, calls_per_graph, replays)

    def measure(self, config: Config, M: int) -> Measurement:
        try:
            with torch.cuda.device(self.device):
                return self._measure(config, M)
        except Exception as exc:  # a config that does not compile or launch is a result, not a crash
            try:
                torch.cuda.synchronize(self.device)
            except Exception:
                pass  # a sticky error: healthy() says so, and the isolated process is replaced
            return Measurement(None, describe_failure(exc))

    def healthy(self) -> bool:
        """Whether the CUDA context still works: an illegal memory access breaks it for every later call, and
        only a new process recovers (isolation.py)."""
        try:
            with torch.cuda.device(self.device):
                torch.cuda.synchronize()
                return torch.ones(1, device=self.device).add_(1).item() == 2.0
        except Exception:
            return False

    def _measure(self, config: Config, M: int) -> Measurement:
        self.inputs.call(config, M)  # compiles (or loads from Triton's cache) outside the graph
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.inputs.call(config, M)  # warm-up on the capture stream, as torch.cuda.graphs asks
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            for i in range(self.calls_per_graph):
                self.inputs.call(config, M, routing_index=i)
        graph.replay()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        times_us = []
        for _ in range(self.replays):
            self._flush.zero_()
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times_us.append(start.elapsed_time(end) * 1000.0 / self.calls_per_graph)
        del graph
        latency = statistics.median(times_us)
        active = self.inputs.active_experts(M)
        return Measurement(latency, None, {
            "tflops": moe_flops(self.spec, M) / latency / 1e6,
            "gbps": moe_min_bytes(self.spec, M, active) / latency / 1e3,
            "replay_spread": (max(times_us) - min(times_us)) / latency,
        })


class InterpreterTimer:
    """Runs the same fused-MoE call through Triton's CPU interpreter and times it with the wall clock.

    The numbers say nothing about GPU speed; they exercise the tuning path (studies, export) without a GPU.
    """

    is_performance = False

    def __init__(self, spec: ModelSpec, *, seed: int = 0):
        from .kernel.interpret import interpreting

        if not interpreting():
            raise RuntimeError("InterpreterTimer needs TRITON_INTERPRET=1 set before moe_opt is imported")
        self.spec = spec
        self.inputs = MoeInputs(spec, "cpu", routing_sets=1, seed=seed)
        self.device_name = "cpu-interpreter"
        self.description = "Triton CPU interpreter, wall clock (not a performance measurement)"

    def measure(self, config: Config, M: int) -> Measurement:
        try:
            t0 = time.perf_counter()
            self.inputs.call(config, M)
            return Measurement((time.perf_counter() - t0) * 1e6, None, {})
        except Exception as exc:
            return Measurement(None, describe_failure(exc))


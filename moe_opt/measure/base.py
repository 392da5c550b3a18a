"""What a measurer is: ``measure(config, M) -> Measurement`` plus the facts the tune needs about it.

A config that cannot compile or run is not an exception here: it comes back as a Measurement with ``error`` set.
The tune takes any :class:`Measurer`: the CUDA-graph timer (cuda_graph.py), the CPU interpreter
(interpreter.py), a recorded table (replay.py), the isolated measuring process around one of them
(isolated.py), or one of your own. Three capabilities are optional and declared here too:
:class:`AsyncMeasurer` (queue the next measurement behind the running one), :class:`KernelRunner` (run a
function where the kernel's inputs live: the correctness guard does) and :class:`HealthReporting` (say whether
the device still works: the isolated process replaces itself when it does not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

from ..space import HOPPER_SHARED_MEMORY_BYTES, Config


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


@dataclass(frozen=True)
class MeasurerInfo:
    """What the tune needs to know about a measurer.

    Attributes:
        device_name: the GPU the configs are for, as ``torch.cuda.get_device_name()`` says (names the files).
        source: where the numbers come from, part of the study identity: the GPU's name, "cpu-interpreter" or
            "replay:<table file name>".
        description: how it measures, one line (the study's "measurement" attribute).
        is_performance: False where timings say nothing about GPU speed (the interpreter).
        shared_memory_bytes: the device's per-block shared-memory limit; configs that cannot fit are never
            proposed. Measurers that run no device (the interpreter, replays of Hopper tables) screen as Hopper.
        kind: "cuda_graph", "interpreter", "replay" or "custom"; a cuda_graph measurer gets a compile pool.
        tma: the device can load through tensor descriptors (Hopper's TMA, kernel/tma.py): only then the space
            offers USE_TMA. False for the interpreter; a replay table's says whether it recorded USE_TMA configs.
        stops_early: ``measure`` (and ``submit``) take ``stop_above_us``: a config whose first timed replay is
            slower than that is reported from that replay alone (the search passes a margin over the batch size's
            best; such a config's exact latency does not matter). The CUDA-graph timer does.
        prefetches: ``measure`` takes ``upcoming``, a callable it asks once for the next measurement's
            (config, M) or None, and prepares that one while the device runs this one (the CUDA-graph timer
            captures the next graph during this one's first replays); afterwards its ``prefetched`` says whether
            the next config ran on the device meanwhile (a sticky device error then may be that config's). The
            isolated process passes the call queued behind (isolated.py).
    """

    device_name: str
    source: str
    description: str
    is_performance: bool = True
    shared_memory_bytes: int = HOPPER_SHARED_MEMORY_BYTES
    kind: str = "custom"
    tma: bool = False
    stops_early: bool = False
    prefetches: bool = False


@runtime_checkable
class Measurer(Protocol):
    """Anything that can measure a config at a batch size."""

    @property
    def info(self) -> MeasurerInfo: ...

    def measure(self, config: Config, M: int) -> Measurement: ...


@runtime_checkable
class AsyncMeasurer(Measurer, Protocol):
    """A measurer that takes the next measurement while this process records the last one."""

    def submit(self, config: Config, M: int) -> None: ...

    def collect(self) -> Measurement:
        """The result of the oldest submitted measurement."""
        ...


@runtime_checkable
class KernelRunner(Protocol):
    """A measurer whose kernel runs where it lives: ``run_with_inputs(fn, *args)`` returns
    ``fn(backend, inputs, *args)`` with the measurer's kernel backend and inputs (weights, scales), in the process
    that holds them."""

    def run_with_inputs(self, fn: Callable[..., Any], *args: Any) -> Any: ...


@runtime_checkable
class HealthReporting(Protocol):
    """A measurer that can tell whether its device still works after a measurement (a sticky CUDA error breaks
    the context for good); the isolated process then replaces itself."""

    def healthy(self) -> bool: ...


def custom_info(measurer: Any) -> MeasurerInfo:
    """The info of a measurer given to ``tune(measurer=...)``: its own, or a plain description for an object
    that only has ``measure``."""
    info = getattr(measurer, "info", None)
    if isinstance(info, MeasurerInfo):
        return info
    name = type(measurer).__name__
    return MeasurerInfo(device_name="unknown", source=f"custom:{name}", description=name)


def measure_options(stop_above_us: float | None = None, upcoming: Callable | None = None) -> dict[str, Any]:
    """The optional arguments of ``measure``/``submit`` that are set, by name (MeasurerInfo.stops_early and
    prefetches say which a measurer takes; one that declares neither is called with none)."""
    options: dict[str, Any] = {}
    if stop_above_us is not None:
        options["stop_above_us"] = stop_above_us
    if upcoming is not None:
        options["upcoming"] = upcoming
    return options


def describe_failure(exc: BaseException) -> str:
    """One line naming the failure: the exception type and the first line of its message."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:500]

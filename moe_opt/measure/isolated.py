"""Measure in a child process, so a config that crashes the CUDA context or hangs fails alone.

An illegal memory access poisons the CUDA context for good, a segfault in a driver ends the process, a deadlocked
kernel never returns: none of these may end the study. :class:`IsolatedMeasurer` builds the real measurer in a
child process and sends it one config at a time. When the child dies, the config is recorded as
``"WorkerCrashed: exit code -11"``; when it gives no answer within ``timeout_s``, the child is killed and the
config recorded as ``"Timeout: no result after 60 s"``; when the measurer reports itself unhealthy after a
measurement (``measurer.healthy()`` is False: the CUDA error was sticky), the config keeps the error it got and the
child exits. The next measurement starts a fresh child.

The child loads compiled kernels from Triton's on-disk cache, which the compile pool (compile.py) fills ahead.
Where its measurer prepares the next measurement during the running one (``MeasurerInfo.prefetches``: the CUDA-graph
timer captures the next graph), the child tells it the call queued behind; a failure that may be the prepared
config's (a sticky error, or a timeout, with the next config's work on the device meanwhile) is measured again
alone in a fresh child before it counts.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import signal
import time
from collections import deque
from typing import Any, Callable

from ..errors import TuneError
from ..space import Config
from .base import HealthReporting, Measurement, MeasurerInfo, custom_info, describe_failure, measure_options

DEFAULT_TIMEOUT_S = 60.0
START_TIMEOUT_S = 600.0  # building the measurer: CUDA context, weights, imports


class IsolatedFailure(Exception):
    """The child process crashed or timed out; ``str()`` is the recorded reason."""


def _child_main(factory: Callable[[], Any] | None, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the tuning process's to handle
    try:
        measurer = factory() if factory is not None else None
        info = custom_info(measurer)
    except BaseException as exc:
        conn.send(("error", describe_failure(exc)))
        return
    conn.send(("ready", info, time.time()))  # when it was ready: the tuning process may ask later
    pending: deque = deque()  # messages read ahead: a measurement asked what comes next (upcoming)

    def upcoming() -> tuple[Config, int] | None:
        """The (config, M) of the measurement sent behind the running one, if it was sent already."""
        try:
            while conn.poll(0):
                pending.append(conn.recv())
        except (EOFError, OSError):
            return None
        if pending and pending[0][0] == "call" and pending[0][1] is _measure and not pending[0][3]:
            return pending[0][2][0], pending[0][2][1]
        return None

    while True:
        try:
            message = pending.popleft() if pending else conn.recv()
        except (EOFError, OSError):  # the tuning process is gone
            return
        if message[0] == "stop":
            return
        _, fn, args, alone = message
        options = {"upcoming": upcoming} if info.prefetches and fn is _measure and not alone else {}
        started = time.perf_counter()
        try:
            kind, value = "ok", fn(measurer, *args, **options)
        except Exception as exc:
            kind, value = "error", describe_failure(exc)
        busy_s = time.perf_counter() - started
        # A sticky CUDA error (an illegal memory access) breaks the context for good: say so, and leave.
        alive = not isinstance(measurer, HealthReporting) or measurer.healthy()
        if not alive and options and measurer.prefetched and not (kind == "ok" and value.ok):
            # The next config's eager call ran during this measurement (a prefetch): the error may be that one's.
            # Measured again alone, in a fresh process, before it counts.
            kind = "retry"
        try:
            conn.send((kind, value, alive, busy_s))
        except (BrokenPipeError, OSError):
            return
        if not alive:
            return


def _measure(measurer, config: Config, M: int, stop_above_us: float | None = None,
             upcoming: Callable[[], tuple[Config, int] | None] | None = None) -> Measurement:
    return measurer.measure(config, M, **measure_options(stop_above_us, upcoming))


def _with_inputs(measurer, fn: Callable[..., Any], *args: Any) -> Any:
    return measurer.run_with_inputs(fn, *args)


class IsolatedMeasurer:
    """A measurer that runs ``factory()``'s measurer in a replaceable child process.

    Args:
        factory: a picklable callable (a class, a functools.partial) that builds the real measurer in the child.
        timeout_s: seconds one measurement may take before the child is killed.
        info: the measurer's facts, known without building it (the tuning process reads them from the device);
            without them they are asked of the child, which then starts at once (else on the first measurement).

    Example:
        >>> from functools import partial
        >>> m = IsolatedMeasurer(partial(CudaGraphTimer, spec, "cuda:0"), timeout_s=60)  # doctest: +SKIP
        >>> m.measure(Config(64, 128, 128, 32, 4, 3), 64)  # doctest: +SKIP
        Measurement(latency_us=41.7, error=None, attrs={...})
    """

    def __init__(self, factory: Callable[[], Any] | None, timeout_s: float = DEFAULT_TIMEOUT_S, *,
                 start_timeout_s: float = START_TIMEOUT_S, info: MeasurerInfo | None = None):
        self.factory = factory
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self._info = info  # known facts; None: asked of the child, which then starts at once
        self._proc = None
        self._conn = None
        self._ready = False
        self._sent: deque = deque()  # (fn, args, alone) sent to the child and not collected yet, oldest first
        self.crashes = 0
        self.ready_at: float | None = None  # time.perf_counter() when the first child had built its measurer
        self.busy_s = 0.0  # seconds the children spent in the calls whose results came back

    @property
    def info(self) -> MeasurerInfo:
        """The measurer's facts, from the constructor or from the child; the description says it is isolated."""
        if self._info is None:
            self._start()
        return self._info

    def run_with_inputs(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(backend, inputs, *args)`` in the child, with its measurer's kernel inputs (KernelRunner); raises
        IsolatedFailure if the child crashes or times out."""
        return self.run(_with_inputs, fn, *args)

    # The child process.
    def start(self) -> None:
        """Start the child now without waiting for it (its imports and CUDA context take seconds; a tune starts it
        while it opens its studies). Measurements sent meanwhile queue up in the pipe."""
        if self._proc is not None and (self._proc.is_alive() or self._sent):
            return  # running, or dead with calls outstanding: collect_call() charges the oldest and resends the rest
        self._kill()
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(self.factory, child_conn), daemon=True,
                                 name="moe-opt-measure")
        try:
            self._proc.start()
        except BaseException:
            self._proc = None
            raise
        finally:
            child_conn.close()

    def _start(self) -> None:
        """Start the child if needed and wait until it has built its measurer."""
        self.start()
        self._await_ready()

    def _await_ready(self) -> None:
        if self._ready:
            return
        if not self._conn.poll(self.start_timeout_s):
            self._kill()
            raise TuneError(f"the measuring process did not start within {self.start_timeout_s:g} s")
        try:
            kind, value, *ready_time = self._conn.recv()
        except (EOFError, OSError):
            code = self._kill()
            raise TuneError(f"the measuring process died while starting (exit code {code})") from None
        if kind == "error":
            self._kill()
            raise TuneError(f"the measuring process could not build its measurer: {value}")
        if self._info is None:
            self._info = dataclasses.replace(value, description=f"{value.description}, in an isolated process")
        self._ready = True
        if self.ready_at is None:  # the child's clock says when, however much later this process asks
            self.ready_at = time.perf_counter() - (max(0.0, time.time() - ready_time[0]) if ready_time else 0.0)

    def _kill(self) -> int | None:
        proc, self._proc = self._proc, None
        self._ready = False
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if proc is None:
            return None
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        return proc.exitcode

    # Calls, queued: the child runs them in order, so the next one starts the moment the last one ends.
    def submit_call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Send ``fn(measurer, *args)`` to the child; :meth:`collect_call` returns the results in order."""
        self._send(fn, args, alone=False)

    def _send(self, fn: Callable[..., Any], args: tuple, alone: bool) -> None:
        """``alone``: a measurement run without preparing the next one meanwhile (a retry of one whose failure
        could have been the next config's)."""
        self.start()
        self._sent.append((fn, args, alone))
        try:
            self._conn.send(("call", fn, args, alone))
        except (BrokenPipeError, OSError):
            pass  # the child is gone: collect_call() says so and resends the calls behind the oldest

    def collect_call(self) -> Any:
        """The result of the oldest submitted call; raises IsolatedFailure if the child crashed or timed out on it
        (the calls behind it are sent to a fresh child)."""
        if not self._sent:
            raise RuntimeError("collect_call() without a submitted call")
        self._await_ready()
        failure = None
        retry = False  # measured again alone first: its failure may have been the next config's (a prefetch)
        fn, args, alone = self._sent[0]
        try:
            ready = self._conn.poll(self.timeout_s)
        except (BrokenPipeError, OSError):
            ready = True  # the child is gone: recv() below says so
        if not ready:
            self._kill()
            self.crashes += 1
            failure = f"Timeout: no result after {self.timeout_s:g} s"
            # A measurement behind it may have been prepared meanwhile, its eager call the one that hangs.
            retry = (fn is _measure and not alone and self._info.prefetches
                     and any(f is _measure for f, _, _ in list(self._sent)[1:]))
        else:
            try:
                kind, value, alive, busy_s = self._conn.recv()
            except (EOFError, OSError):
                code = self._kill()
                self.crashes += 1
                failure = f"WorkerCrashed: exit code {code}"
            else:
                self.busy_s += busy_s
                if not alive:
                    self._kill()  # it leaves by itself; the calls behind go to a fresh one
                if kind == "error":
                    failure = value
                retry = kind == "retry"
        self._sent.popleft()
        if retry:
            self._sent.appendleft((fn, args, True))
        if self._proc is None and self._sent:
            behind, self._sent = list(self._sent), deque()
            for f, a, was_alone in behind:
                self._send(f, a, was_alone)
        if retry:
            return self.collect_call()
        if failure is not None:
            raise IsolatedFailure(failure)
        return value

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(measurer, *args)`` in the child; raises IsolatedFailure if the child crashes or times out."""
        if self._sent:
            raise RuntimeError("run() while submitted calls are outstanding; collect them first")
        self.submit_call(fn, *args)
        return self.collect_call()

    def measure(self, config: Config, M: int, stop_above_us: float | None = None) -> Measurement:
        try:
            return self.run(_measure, config, M, stop_above_us)
        except IsolatedFailure as exc:
            return Measurement(None, str(exc))

    def submit(self, config: Config, M: int, stop_above_us: float | None = None) -> None:
        """Queue a measurement; :meth:`collect` returns it (the tuner keeps the next one queued behind the one
        running, so the GPU does not wait while the tuning process writes the last result). ``stop_above_us``
        only where the measurer in the child stops early (its info says so)."""
        self.submit_call(_measure, config, M, stop_above_us)

    def collect(self) -> Measurement:
        try:
            return self.collect_call()
        except IsolatedFailure as exc:
            return Measurement(None, str(exc))

    def close(self) -> None:
        """Tell the child to stop, and leave it to exit: nothing waits for its CUDA context's teardown (it is
        daemonic: multiprocessing reaps it, and ends it at the interpreter's exit if it is still there)."""
        self._sent.clear()
        proc, conn = self._proc, self._conn
        if proc is None or not proc.is_alive():
            self._kill()
            return
        try:
            conn.send(("stop",))
        except (BrokenPipeError, OSError):
            self._kill()
            return
        self._proc, self._conn, self._ready = None, None, False
        conn.close()

    def __enter__(self) -> "IsolatedMeasurer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._kill()
        except Exception:
            pass

    # Sent to worker processes without its child: each worker starts its own.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_proc=None, _conn=None, _ready=False, _sent=deque())
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def isolated_cuda_graph_timer(spec, device: str | None, timeout_s: float = DEFAULT_TIMEOUT_S,
                              backend: str = "builtin", routing: Any = None,
                              split_stages: bool = False, start: bool = False) -> IsolatedMeasurer:
    """The GPU path's default measurer: a CudaGraphTimer in an isolated process, started by the first
    measurement (so a tune that stops on bad input, or whose workers do the measuring, never starts it), or with
    ``start`` at once: before this process reads the device's facts (its own CUDA context, half a second), so
    the child's imports and CUDA context, the seconds a tune's first measurement waits for, begin that much
    sooner."""
    from functools import partial

    from .cuda_graph import CudaGraphTimer, cuda_graph_info

    factory = partial(CudaGraphTimer, spec, device or "cuda", backend=backend, routing=routing,
                      split_stages=split_stages)
    measurer = IsolatedMeasurer(factory, timeout_s)
    if start:
        measurer.start()
    try:
        info = cuda_graph_info(device or "cuda")
    except BaseException:  # a device this process cannot open: the child started for it goes too
        measurer.close()
        raise
    measurer._info = dataclasses.replace(info, description=f"{info.description}, in an isolated process")
    return measurer

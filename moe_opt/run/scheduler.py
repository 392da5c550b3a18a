"""The trial loop of a tune: claim a trial per batch size, compile its config, measure it, tell its study.

On a GPU three kinds of work overlap, so that the GPU rarely waits:
- compiling, in a pool of processes (compile.py): every batch size's claimed config, and the likely next ones;
- measuring, in the measuring process (isolation.py), with the next measurements queued behind the running one
  (the CUDA-graph timer captures the next one's graph while the running one's first replays are on the GPU);
- this process's bookkeeping between measurements: telling the study a result, claiming the next trial.

A batch size's next config depends on its last result, so each batch size holds at most one claimed trial. On the
GPU every open batch size holds one at once (its config compiles meanwhile) and the loop measures whichever has
compiled, in round-robin order. With a measurer that answers at once and no compiling (a replay table, the CPU
interpreter) a trial is claimed just before it is measured, round-robin, one batch size after another.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from ..errors import TuneError
from ..measure.base import AsyncMeasurer, Measurement, describe_failure, measure_options
from ..search.base import Strategy
from ..space import Config
from ..store.results import DOWN_ATTR, UP_ATTR
from ..store.schema import is_compile_failure
from ..store.trial_writes import finish_trial
from ..view.notes import refresh_study_note
from .coordinator import BUSY, DONE, CreatedTrial

LOOKAHEAD = 3  # configs per batch size compiled ahead of being asked for
# A trial whose first timed replay is this much slower than its batch size's best so far is not timed further
# (where the measurer stops early, MeasurerInfo.stops_early): the search only needs to know it is slow, and the
# replays skipped are the slow ones. The margin is meant to lie far above the differences between one
# measurement's replays (each trial records them: replay_spread); re-measuring (confirm.py) never stops early.
STOP_ABOVE_BEST = 1.2
BUSY_POLL_S = 0.5  # how often a process whose batch sizes all run elsewhere looks again
COMPILE_POLL_S = 0.5  # how long one wait for a compile lasts before the loop looks at Ctrl-C and the clock


@dataclass
class Claim:
    """A trial this process claimed: its config runs next at batch size M."""

    M: int
    study: optuna.Study
    trial: optuna.Trial | CreatedTrial  # Optuna's where the claim asked Optuna, else the one it created
    config: Config


@dataclass
class LoopTimes:
    """Where the loop's wall-clock time went (seconds), for the tune's summary and docs/performance.md."""

    measuring_s: float = 0.0  # waiting for the measurer's results
    compile_wait_s: float = 0.0  # nothing to measure: every claimed config was still compiling
    measured: int = 0  # configurations measured on the measurer
    compile_failed: int = 0  # claimed configs that failed to compile (told without measuring)
    first_submit_at: float | None = None  # time.perf_counter() when the first config was handed to the measurer
    first_result_at: float | None = None  # time.perf_counter() when the first measurement came back


def measure_one(measurer: Any, pool: Any, config: Config, M: int, stop_above_us: float | None = None) -> Measurement:
    """Measure one config now: its compile's failure if it has one, else the measurer's result; never raises
    (except TuneError: the measurer itself cannot work). ``stop_above_us`` only for a measurer that stops early."""
    if pool is not None:
        failure = compile_failure(pool, config, M)
        if failure is not None:
            return Measurement(None, failure)
    try:
        return measurer.measure(config, M, **measure_options(stop_above_us))
    except TuneError:
        raise
    except Exception as exc:  # failure is a value: never let one config end the study
        return Measurement(None, describe_failure(exc))


def compile_failure(pool: Any, config: Config, M: int) -> str | None:
    """The compile pool's failure for a config at batch size M, if it is a compile failure. A launch error in a
    compile worker (one whose CUDA context an earlier config broke) is not: the measurer retries the config."""
    try:
        failure = pool.result(config, M)
    except Exception:  # a broken compile pool: the measurer compiles the config itself
        return None
    return failure if is_compile_failure(failure) else None


class MeasureQueue:
    """submit()/collect() over any measurer: the isolated one queues in its process, others measure at collect."""

    def __init__(self, measurer: Any):
        self.measurer = measurer
        self.asynchronous = isinstance(measurer, AsyncMeasurer)
        info = getattr(measurer, "info", None)
        self.stops_early = bool(getattr(info, "stops_early", False))
        self.prefetches = bool(getattr(info, "prefetches", False))
        self._waiting: deque = deque()

    def submit(self, config: Config, M: int, stop_above_us: float | None = None) -> None:
        """Queue one measurement; ``stop_above_us`` is passed on where the measurer stops early, else dropped."""
        stop_above_us = stop_above_us if self.stops_early else None
        if self.asynchronous:
            self.measurer.submit(config, M, **measure_options(stop_above_us))
        else:
            self._waiting.append((config, M, stop_above_us))

    def collect(self) -> Measurement:
        if not self.asynchronous:
            config, M, stop_above_us = self._waiting.popleft()
            return measure_one(self.measurer, None, config, M, stop_above_us)
        try:
            return self.measurer.collect()
        except TuneError:
            raise
        except Exception as exc:
            return Measurement(None, describe_failure(exc))


def run_trials(studies: dict[int, optuna.Study], strategy: Strategy, measurer: Any, pool: Any, n_trials: int, *,
               coord: Any, defaults: dict[int, Config], deadline: float | None, progress: bool, stop: Any = None,
               times: LoopTimes | None = None) -> bool:
    """Run trials until every study has n_trials counted trials, the deadline (time.perf_counter()) passes, or
    Ctrl-C. Every trial is claimed through the coordinator (shared budget, no config twice, stale trials retried),
    so this runs the same alone or as one of many workers. Returns whether the search was interrupted.

    Example:
        >>> times = LoopTimes()  # the session sets up the studies, strategy and coordinator  # doctest: +SKIP
        >>> run_trials(studies, strategy, measurer, pool, 48, coord=coord, defaults=defaults, deadline=None,
        ...            progress=True, times=times)  # doctest: +SKIP
        False
        >>> times.measured, round(times.compile_wait_s, 1)  # doctest: +SKIP
        (864, 17.2)
    """
    from ..view.progress import Progress
    from .stop import StopFlag, deferred_signals

    times = times if times is not None else LoopTimes()
    queue = MeasureQueue(measurer)
    eager = pool is not None  # claim every batch size's next trial at once, so their configs compile meanwhile
    # Measurements handed to the measurer at a time: the next one queued behind the running one, and one more where
    # the measurer prepares the next during the running one (so that one is there when it asks).
    depth = (3 if queue.prefetches else 2) if queue.asynchronous else 1
    order = list(studies)
    bar = Progress(studies, n_trials, defaults, enabled=progress)
    done: set[int] = set()
    busy: set[int] = set()
    measured_here: set[int] = set()
    pending: dict[int, Claim] = {}  # claimed, not yet handed to the measurer
    inflight: deque[Claim] = deque()  # handed to the measurer, oldest first
    cursor = 0  # round-robin position in order
    told_since_ahead = len(order)  # compile ahead at once, then about once per round

    def claim(M: int) -> Claim | None:
        result = coord.claim(studies[M], M, strategy, n_trials)
        if result == DONE:
            done.add(M)
            if M in measured_here:
                refresh_study_note(studies[M])  # this batch size is done: its dashboard note is final
            return None
        if result == BUSY:
            busy.add(M)
            return None
        return Claim(M, studies[M], *result)  # held by the coordinator until finish() has told it

    def finish(c: Claim, m: Measurement) -> None:
        nonlocal told_since_ahead
        told_since_ahead += 1
        with deferred_signals():  # a measurement taken is told, not thrown away by a Ctrl-C
            told = tell(c.study, c.trial, c.config, m, strategy, c.M)
            coord.drop(c.trial)
        if told:
            measured_here.add(c.M)
            bar.update(c.M, c.config, m)

    def in_flight(M: int) -> bool:
        return any(c.M == M for c in inflight)

    def round_robin(candidates: list[int]) -> list[int]:
        return sorted(candidates, key=lambda M: (order.index(M) - cursor) % len(order))

    def next_claim(block: bool) -> Claim | None:
        """The next trial to hand to the measurer: a compiled one of pending (eager), or a new claim."""
        nonlocal cursor
        if not eager:
            for M in round_robin([M for M in order if M not in done and not in_flight(M)]):
                c = claim(M)
                if c is not None:
                    cursor = order.index(M) + 1
                    return c
            return None
        while pending:
            for M in round_robin(list(pending)):
                if pool.ready(pending[M].config, M):
                    cursor = order.index(M) + 1
                    return pending.pop(M)
            if not block:
                return None
            t0 = time.perf_counter()
            pool.wait_any([(c.config, c.M) for c in pending.values()], timeout_s=COMPILE_POLL_S)
            times.compile_wait_s += time.perf_counter() - t0
            if flag.stop or out_of_time():
                return None
        return None

    def out_of_time() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    with StopFlag(external=stop, install=stop is None) as flag, coord.heartbeat():
        try:
            while True:
                stopping = flag.stop or out_of_time()
                if not stopping:
                    busy.clear()
                    if eager:
                        for M in order:
                            if M not in done and M not in pending and not in_flight(M):
                                c = claim(M)
                                if c is not None:
                                    pending[M] = c
                                    pool.ensure([(c.config, M)])
                        if told_since_ahead >= len(order) - len(done):
                            _compile_ahead(pool, studies, strategy, coord, [M for M in order if M not in done])
                            told_since_ahead = 0
                    while len(inflight) < depth and not (flag.stop or out_of_time()):
                        c = next_claim(block=not inflight)
                        if c is None:
                            break
                        failure = compile_failure(pool, c.config, c.M) if pool is not None else None
                        if failure is not None:
                            times.compile_failed += 1
                            finish(c, Measurement(None, failure))
                            continue
                        best_us = strategy.best_us(c.M)
                        queue.submit(c.config, c.M, None if best_us is None else STOP_ABOVE_BEST * best_us)
                        inflight.append(c)
                        if times.first_submit_at is None:
                            times.first_submit_at = time.perf_counter()
                if not inflight:
                    if stopping or len(done) == len(studies):
                        break
                    if busy and not pending:
                        time.sleep(BUSY_POLL_S)  # the last trials run in other processes; they may finish or go stale
                    continue
                c = inflight.popleft()  # still held (coordinator) while it is measured: released if interrupted
                t0 = time.perf_counter()
                m = queue.collect()
                times.measuring_s += time.perf_counter() - t0
                times.measured += 1
                if times.first_result_at is None:
                    times.first_result_at = time.perf_counter()
                finish(c, m)
        except BaseException:  # Ctrl-C twice, SIGTERM, or an error: every held trial is released, none left RUNNING
            with deferred_signals():
                coord.release_held("stopped before it was measured", [c.trial for c in pending.values()])
                coord.release_held("stopped while it was measured")
            raise
        coord.release_held("stopped before it was measured")  # claimed, not measured: retried first by the next run
    bar.close()
    return flag.stop


def _compile_ahead(pool: Any, studies: dict[int, optuna.Study], strategy: Strategy, coord: Any,
                   open_ms: list[int]) -> None:
    """Compile what each batch size will likely run next while the GPU measures: the queued configs (warm start,
    retries) as the last claim read them, then speculatively the search's next likely proposals."""
    pool.ensure((c, M) for M in open_ms for c in coord.queued(studies[M]))
    pool.ensure(((c, M) for M in open_ms for c in strategy.lookahead(M, LOOKAHEAD)), speculative=True)


def tell(study: optuna.Study, trial: optuna.Trial | CreatedTrial, config: Config, m: Measurement, strategy: Strategy,
         M: int) -> bool:
    """Record a measurement; False if another process failed the trial meanwhile (its heartbeat looked stale:
    the config is retried, this measurement dropped)."""
    attrs = dict(m.attrs) if m.ok else {**m.attrs, "error": m.error}
    try:
        if strategy.optuna_tell:  # the sampler learns in Optuna's tell (its after_trial hook)
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            if m.ok:
                study.tell(trial, m.latency_us)
            else:
                study.tell(trial, state=TrialState.FAIL)
        else:  # one transaction: attributes, state and value (store/trial_writes.py)
            state = TrialState.COMPLETE if m.ok else TrialState.FAIL
            if not finish_trial(study, trial._trial_id, state, m.latency_us if m.ok else None, attrs):
                raise UpdateFinishedTrialError(f"trial {trial.number} finished meanwhile")
    except (UpdateFinishedTrialError, ValueError):
        if study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
            raise
        print(f"moe-opt: trial {trial.number} (M={M}) was failed by another process meanwhile; its config is "
              "retried and this measurement dropped", flush=True)
        return False
    stages = {k: v for k, v in m.attrs.items() if k in (UP_ATTR, DOWN_ATTR)}
    strategy.observe(M, config, m.latency_us if m.ok else None, compile_failure=is_compile_failure(m.error),
                     stages=stages or None)
    return True

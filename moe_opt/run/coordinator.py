"""Several processes on one set of studies: who runs which trial, what happens to the trials of a dead process.

Every trial is claimed under a lock that all processes tuning the same studies share (a file lock next to a
SQLite or journal file, an advisory lock on PostgreSQL/MySQL). Under the lock a process reads the study, learns
what the others measured and are measuring, fails the trials of processes that are gone, checks the shared
trial budget, and only then asks Optuna for a trial. So two processes never run the same config at one batch
size, and together they run exactly ``n_trials`` counted trials per batch size.

A claimed trial carries who runs it (host, boot, pid namespace, pid and the process's start time) and a heartbeat
that a thread refreshes while the trial runs. A RUNNING trial is stale when its process is gone (same host: the
pid no longer names the same process) or its heartbeat is older than ``STALE_AFTER_S`` (other hosts). A RUNNING
trial with no worker stamp, seen under a lock that every process shares, is stale at once: trials are asked and
stamped under that lock in one step, so no live process can still be stamping it; its claimer stopped in
between (killed, or a crash). A stale trial is failed with ``"Interrupted: ..."`` (not counted) and its config
enqueued, so it is retried first.

Claiming (ask, stamp, hold) and releasing run with Ctrl-C and SIGTERM held back (run/stop.py), so neither stops
halfway in a live process.

Optuna's own heartbeat (RDBStorage(heartbeat_interval=...)) is not used: it only exists for RDB storages, is
only automatic inside Study.optimize, and cannot tell at once that a process on the same host is gone.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from ..search.base import Strategy
from ..space import PARAM_NAMES, Config
from ..store.locks import claim_lock
from ..store.results import DOWN_ATTR, UP_ATTR
from ..store.schema import (
    INTERRUPTED,
    config_of,
    error_of,
    is_compile_failure,
    is_counted,
)
from ..store.trial_writes import create_running_trial
from .stop import deferred_signals

WORKER_KEY = "moe_opt:worker"  # trial system attribute: who runs the trial
HEARTBEAT_KEY = "moe_opt:heartbeat"  # trial system attribute: time.time() of the last sign of life
HEARTBEAT_INTERVAL_S = 10.0
STALE_AFTER_S = 120.0  # a trial of another host with no heartbeat for this long is failed and retried


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The start time of a process in clock ticks since boot (/proc/PID/stat field 22); "" where unknown."""
    stat = _read(f"/proc/{pid}/stat")
    fields = stat.rsplit(")", 1)[-1].split()  # the command name, in parentheses, may hold spaces
    return fields[19] if len(fields) > 19 else ""


@dataclass(frozen=True)
class WorkerId:
    """Who runs a trial. Two ids are on the same machine when host, boot and pid namespace agree; then the pid
    and its start time tell whether the process still lives (a reused pid has another start time)."""

    host: str
    boot: str
    pidns: str
    pid: int
    start: str
    device: str | None = None

    @classmethod
    def current(cls, device: str | None = None) -> "WorkerId":
        pidns = ""
        with contextlib.suppress(OSError):
            pidns = os.readlink("/proc/self/ns/pid")
        return cls(socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), pidns, os.getpid(),
                   _process_start(os.getpid()), device)

    def same_machine(self, other: dict) -> bool:
        return (other.get("host"), other.get("boot"), other.get("pidns")) == (self.host, self.boot, self.pidns)

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}"


def process_alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` runs on this machine and is the one that started at ``start``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return not start or _process_start(pid) in ("", start)


# --- Claiming trials ------------------------------------------------------------------------------------------

def observe(strategy: Strategy, M: int, trial: FrozenTrial) -> None:
    """Feed one counted trial into the strategy (idempotent)."""
    config = config_of(trial)
    if config is None:
        return
    if trial.state == TrialState.COMPLETE:
        stages = {k: float(v) for k, v in trial.user_attrs.items() if k in (UP_ATTR, DOWN_ATTR)}
        strategy.observe(M, config, float(trial.value), stages=stages or None)
    else:
        strategy.observe(M, config, None, compile_failure=is_compile_failure(error_of(trial)))


DONE, BUSY = "done", "busy"  # claim() outcomes besides a trial: budget used up; the rest is running elsewhere


class Coordinator:
    """Claims trials for one process, keeps their heartbeat, and fails the trials of processes that are gone.

    Example:
        >>> coord = Coordinator(store, "sqlite:///studies/x.db", base)  # doctest: +SKIP
        >>> with coord.heartbeat():  # doctest: +SKIP
        ...     claim = coord.claim(study, 64, strategy, n_trials=48)
    """

    def __init__(self, store: optuna.storages.BaseStorage, storage_arg: Any, name: str, *,
                 device: str | None = None, stale_after_s: float = STALE_AFTER_S,
                 heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S):
        self.lock = claim_lock(storage_arg, store, name)
        self.me = WorkerId.current(device)
        self.stale_after_s = stale_after_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self._held: dict[int, tuple[optuna.Study, optuna.Trial | CreatedTrial]] = {}  # the trials this process claimed and runs
        self._recorded: dict[str, set[int]] = {}  # per study, the trials already fed to the search state
        self._queued: dict[str, list[Config]] = {}  # per study, its WAITING trials' configs at the last scan
        self._beat_lock = threading.Lock()

    # Heartbeats.
    @contextlib.contextmanager
    def heartbeat(self) -> Iterator[None]:
        """A thread that refreshes the heartbeat of the trials this process holds, for the duration of the block."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_interval_s):
                with self._beat_lock:
                    held = list(self._held.items())
                for trial_id, (study, _) in held:
                    with contextlib.suppress(Exception):  # finished meanwhile, or the storage is briefly away
                        study._storage.set_trial_system_attr(trial_id, HEARTBEAT_KEY, time.time())

        thread = threading.Thread(target=beat, name="moe-opt-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def hold(self, study: optuna.Study, trial: optuna.Trial | CreatedTrial) -> None:
        """Keep the heartbeat of a claimed trial until :meth:`drop` (it may wait for its compile, then run).
        :meth:`claim` holds the trials it returns."""
        with self._beat_lock:
            self._held[trial._trial_id] = (study, trial)

    def drop(self, trial: optuna.Trial | CreatedTrial) -> None:
        """Stop holding a trial: call after its result was told."""
        with self._beat_lock:
            self._held.pop(trial._trial_id, None)

    def release_held(self, why: str, trials: list[optuna.Trial | CreatedTrial] | None = None) -> None:
        """Fail the held trials (or those of ``trials`` that are held) as interrupted and enqueue their configs, so
        the next run retries them first; with Ctrl-C and SIGTERM held back, so no trial is left RUNNING halfway."""
        with deferred_signals():
            with self._beat_lock:
                ids = list(self._held) if trials is None else [t._trial_id for t in trials if t._trial_id in self._held]
                held = [self._held.pop(i) for i in ids]
            for study, trial in held:
                with contextlib.suppress(Exception):  # the storage is away: the next run finds the trial stale
                    self.release(study, trial._trial_id, trial.params, trial.number, why)

    # Stale trials.
    def stale_reason(self, trial: FrozenTrial, now: float, *, under_lock: bool = False) -> str | None:
        """Why a RUNNING trial's process is gone, or None while it may still run. ``under_lock``: the caller holds
        the claim lock, so a trial without a worker stamp is one whose claimer stopped between ask and stamp."""
        who = trial.system_attrs.get(WORKER_KEY) or {}
        if not who and under_lock and self.lock.shared:
            return "it was asked but never stamped with its worker (the process stopped in between)"
        name = f"{who.get('host', '?')}:{who.get('pid', '?')}"
        if who and self.me.same_machine(who):
            if who.get("pid") == self.me.pid and who.get("start") == self.me.start:
                return None  # this process's own
            return None if process_alive(int(who["pid"]), who.get("start")) else f"worker {name} is gone"
        last = trial.system_attrs.get(HEARTBEAT_KEY, who.get("time"))
        if last is None and trial.datetime_start is not None:
            last = trial.datetime_start.timestamp()  # started by something that keeps no heartbeat
        if last is not None and now - float(last) > self.stale_after_s:
            return f"no heartbeat from worker {name} for {now - float(last):.0f} s"
        return None

    def release(self, study: optuna.Study, trial_id: int, params: dict, number: int, why: str) -> bool:
        """Fail a trial as interrupted and enqueue its config to be retried first; False if it had finished."""
        storage = study._storage
        retried = all(p in params for p in PARAM_NAMES)
        with deferred_signals():  # failed but never enqueued would lose the retry
            try:
                storage.set_trial_user_attr(trial_id, "error", f"{INTERRUPTED}: {why}" +
                                            ("; its config is retried" if retried else ""))
                storage.set_trial_state_values(trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:
                return False  # its owner told the result first, or another process failed it already
            if retried:
                study.enqueue_trial(dict(params), user_attrs={"retry_of": number}, skip_if_exists=False)
        return True

    # Claims.
    def claim(self, study: optuna.Study, M: int, strategy: Strategy,
              n_trials: int) -> tuple[optuna.Trial | CreatedTrial, Config] | str:
        """Under the shared lock: learn the study's trials, fail stale ones, then ask for a trial if the budget
        allows. Returns (trial, config), held (see :meth:`hold`), DONE (n_trials counted) or BUSY (the rest runs
        in other processes)."""
        with self.lock:
            for _ in range(len(strategy.state.candidates) + 1):
                result = self._claim_once(study, M, strategy, n_trials)
                if result is not None:
                    return result
            return BUSY

    def queued(self, study: optuna.Study) -> list[Config]:
        """The configs of ``study``'s queued trials (warm start, retries) as this process last read them under the
        lock (every claim reads them; the compile-ahead takes them from here instead of reading again)."""
        return self._queued.get(study.study_name, [])

    def reap(self, study: optuna.Study) -> None:
        """Fail the stale trials of a study now (a tune does this first, so their retries come first)."""
        with self.lock:
            self._scan(study, None, None)

    def _scan(self, study, M, strategy) -> tuple[int, int, dict[Config, int], dict[int, Config]]:
        """(counted trials, live running trials, {running config: trial number}, {waiting trial number: config});
        stale trials are failed on the way and counted trials recorded in the search state."""
        now = time.time()
        counted, n_running, running, waiting = 0, 0, {}, {}
        recorded = self._recorded.setdefault(study.study_name, set())
        for t in study.get_trials(deepcopy=False):
            if t.state == TrialState.RUNNING:
                why = self.stale_reason(t, now, under_lock=True)
                if why is not None:
                    self.release(study, t._trial_id, t.params, t.number, why)
                    continue
                n_running += 1
                config = config_of(t)
                if config is not None:
                    running[config] = t.number
            elif t.state == TrialState.WAITING:
                config = config_of(t)
                if config is not None:
                    waiting[t.number] = config
            elif is_counted(t):
                counted += 1
                if strategy is not None and t.number not in recorded:
                    observe(strategy, M, t)
                    recorded.add(t.number)
        self._queued[study.study_name] = list(waiting.values())
        return counted, n_running, running, waiting

    def _claim_once(self, study, M, strategy: Strategy, n_trials: int):
        now = time.time()
        counted, n_running, running, waiting = self._scan(study, M, strategy)
        if counted >= n_trials:
            return DONE
        if counted + n_running >= n_trials:
            return BUSY
        if not waiting and strategy.exhausted(M, set(running)):
            return BUSY if n_running else DONE
        strategy.exclude(M, set(running) | set(waiting.values()))
        stamp = {**asdict(self.me), "time": now}
        if not waiting:  # queued configs (warm start, retries) go through Optuna's ask, which pops them first
            config = strategy.next_config(M)
            if config is not None:
                with deferred_signals():
                    trial = _create_running_trial(study, config, strategy, stamp)
                    strategy.asked(M, config)
                    self.hold(study, trial)
                return trial, config
        with deferred_signals():  # asked, stamped and held in one step (an unstamped trial is a dead claimer's)
            trial = study.ask()
            try:
                config = Config.from_dict({p: trial.suggest_categorical(p, strategy.choices[p])
                                           for p in strategy.choices})  # the six, and USE_TMA where offered
                strategy.asked(M, config)
                enqueued = trial.number in waiting  # Optuna pops queued trials first
                if config in running or (enqueued and config in strategy.tried(M)):
                    taken = f"trial {running[config]} runs it" if config in running else "it was tried already"
                    trial.set_user_attr("error", f"{INTERRUPTED}: duplicate config ({taken})")
                    study.tell(trial, state=TrialState.FAIL)
                    return None
                study._storage.set_trial_system_attr(trial._trial_id, WORKER_KEY, stamp)
            except BaseException:  # the storage failed: nothing runs this trial
                with contextlib.suppress(Exception):
                    self.release(study, trial._trial_id, trial.params, trial.number, "its claim failed")
                raise
            self.hold(study, trial)
        return trial, config


@dataclass(frozen=True)
class CreatedTrial:
    """A trial :func:`_create_running_trial` made: what the trial loop and :meth:`Coordinator.release` read of a
    claimed trial, under optuna.Trial's names, so that both kinds of claim are read alike. (An optuna.Trial reads
    the whole trial back from storage when it is made: a query per trial, 2.7 s of the claims' 16 s in a cProfile
    of the default tune on the H200.)"""

    _trial_id: int
    number: int
    params: dict[str, Any]


def _create_running_trial(study: optuna.Study, config: Config, strategy: Strategy, stamp: dict) -> CreatedTrial:
    """A RUNNING trial of ``config`` stamped with its worker, created in one transaction (store/trial_writes.py;
    Optuna's ask, six suggests and the stamp are eight, most of a trial's bookkeeping time on SQLite). What is stored
    is what the ask path stores: the same params (the six, and USE_TMA where the space offers it) and
    distributions, so readers and Optuna's own tools cannot tell them apart."""
    from ..search.base import distributions

    dists = distributions(strategy.choices)
    params = {p: getattr(config, p) for p in dists}
    trial_id, number = create_running_trial(study, params, dists, {WORKER_KEY: stamp})
    return CreatedTrial(trial_id, number, params)

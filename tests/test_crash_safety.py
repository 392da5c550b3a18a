"""Crash safety of the storage and the trial loop: whenever a tune is killed (SIGKILL, SIGTERM, Ctrl-C once or
twice), the next run starts in seconds, keeps every completed trial, leaves no trial RUNNING and ends as an
uninterrupted run ends; several processes can open a new storage at once; readers change nothing.

Everything is real: SQLite and journal files, subprocesses, signals. Measurements come from recorded tables
(replay mode).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import moe_opt
from moe_opt.run.coordinator import STALE_AFTER_S, WORKER_KEY
from moe_opt.store.schema import config_of, is_counted
from moe_opt.store.storage import open_storage

REPO = Path(__file__).resolve().parents[1]
QWEN = str(REPO / "moe_opt/data/Qwen3-30B-A3B_tp1_H200.csv")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(autouse=True)
def sigint_as_in_a_terminal():
    """Subprocesses get SIGINT as a terminal gives it. A shell without job control starts background commands
    (these tests) with SIGINT ignored, which children inherit; a handled signal is reset to its default in them."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def python(code: str, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def all_trials(storage: str) -> dict[str, list]:
    store = open_storage(storage, create=False)
    try:
        return {s.study_name: optuna.load_study(study_name=s.study_name, storage=store).get_trials()
                for s in optuna.get_all_study_summaries(store, include_best_trial=False)}
    finally:
        if isinstance(store, optuna.storages.RDBStorage):
            store.engine.dispose()  # hold no connection while the next run writes


def running(storage: str) -> list:
    return [t for ts in all_trials(storage).values() for t in ts if t.state == TrialState.RUNNING]


def exported(out: Path) -> dict[str, str]:
    """The engines' files under out (temp files of an export cut short are hidden, and no engine reads them)."""
    return {str(p.relative_to(out)): p.read_text() for p in sorted(out.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


# --- a trial asked but not yet stamped with its worker -------------------------------------------------

FOREIGN_ASK = """
import sys, optuna
u = sys.argv[1]
name = optuna.get_all_study_summaries(u)[0].study_name
optuna.load_study(study_name=name, storage=u).ask()
"""

KILLED_CLAIMER = """
import os, signal, sys
import optuna
from moe_opt.run.coordinator import Coordinator
from moe_opt.store.storage import open_storage
u = sys.argv[1]
store = open_storage(u)
name = optuna.get_all_study_summaries(store)[0].study_name
study = optuna.load_study(study_name=name, storage=store)
with Coordinator(store, u, name).lock:  # as a claim: asked under the claim lock ...
    study.ask()
    os.kill(os.getpid(), signal.SIGKILL)  # ... and killed before the worker stamp
"""


@pytest.mark.parametrize("who", ["a plain Optuna ask", "a claimer killed between ask and stamp"])
def test_a_trial_asked_but_never_stamped_is_failed_at_once_by_the_next_run(tmp_path, who):
    storage = f"sqlite:///{tmp_path}/r.db"
    kwargs = dict(replay=QWEN, batch_sizes=[1], storage=storage, output_dir=None, progress=False)
    moe_opt.tune(n_trials=5, **kwargs)
    python(FOREIGN_ASK if who == "a plain Optuna ask" else KILLED_CLAIMER, storage, cwd=tmp_path)
    [orphan] = running(storage)
    assert WORKER_KEY not in orphan.system_attrs

    t0 = time.perf_counter()
    result = moe_opt.tune(n_trials=10, **kwargs)
    elapsed = time.perf_counter() - t0
    assert elapsed < 15, f"the resume took {elapsed:.0f} s (it waited for the orphan to go stale, {STALE_AFTER_S:.0f} s)"
    assert result.trials_used == {1: 10}
    [trials] = all_trials(storage).values()
    failed = next(t for t in trials if t.number == orphan.number)
    assert failed.state == TrialState.FAIL and not is_counted(failed)
    assert failed.user_attrs["error"].startswith("Interrupted: it was asked but never stamped with its worker")
    assert not running(storage)


# --- SIGTERM, Ctrl-C twice, Ctrl-C held down -------------------------------------------------------------

STALLING_RUN = """
import sys, time
import moe_opt
from moe_opt.measure.replay import ReplayTable

class StallingReplay(ReplayTable):
    calls = 0

    def measure(self, config, M):
        StallingReplay.calls += 1
        if StallingReplay.calls == 3:  # the test signals this process while it measures
            open("stalled", "w").write(str(M))
            time.sleep(600)
        return super().measure(config, M)

moe_opt.tune(replay={table!r}, measurer=StallingReplay({table!r}), batch_sizes=[1, 64], n_trials=4,
             storage="sqlite:///s.db", output_dir=None, progress=False)
"""


@pytest.mark.parametrize("signals", [["SIGTERM"], ["SIGINT", "SIGINT"], ["SIGINT"] * 40],
                         ids=["SIGTERM", "Ctrl-C twice", "Ctrl-C held down"])
def test_sigterm_or_a_second_ctrl_c_mid_measurement_releases_the_trial_it_held(tmp_path, signals):
    with open(tmp_path / "run.log", "w") as log:  # Ctrl-C held down also interrupts Python's exit: noise
        proc = subprocess.Popen([sys.executable, "-c", STALLING_RUN.format(table=QWEN)], cwd=tmp_path, env=ENV,
                                stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while not (tmp_path / "stalled").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the tune never reached its 3rd measurement"
        time.sleep(0.05)
    time.sleep(0.3)
    for name in signals:  # held down: the later ones arrive while the held trial is being released
        if proc.poll() is None:
            proc.send_signal(getattr(signal, name))
            time.sleep(0.002)
    proc.wait(60)
    assert proc.returncode != 0

    storage = f"sqlite:///{tmp_path}/s.db"
    assert not running(storage)  # at once, not after the next run's reaping
    stalled = int((tmp_path / "stalled").read_text())
    trials = next(ts for name, ts in all_trials(storage).items() if name.endswith(f"|M={stalled}"))
    [released] = [t for t in trials if t.state == TrialState.FAIL]
    assert released.user_attrs["error"] == "Interrupted: stopped while it was measured; its config is retried"
    [retry] = [t for t in trials if t.state == TrialState.WAITING and t.user_attrs.get("retry_of") == released.number]
    assert config_of(retry) == config_of(released)


def test_ctrl_c_and_sigterm_wait_for_the_end_of_a_deferred_block():
    from moe_opt.run.stop import deferred_signals

    seen = []
    handlers = {s: signal.signal(s, lambda n, f: seen.append((n, "handled"))) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with deferred_signals():
            signal.raise_signal(signal.SIGINT)  # raise_signal: delivered to this (the main) thread
            signal.raise_signal(signal.SIGTERM)
            time.sleep(0.05)  # the handlers would have run here
            seen.append("block done")
        assert seen == ["block done", (signal.SIGINT, "handled"), (signal.SIGTERM, "handled")]
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)

"""Crash safety of the storage and the trial loop: whenever a tune is killed (SIGKILL, SIGTERM, Ctrl-C once or
twice), the next run starts in seconds, keeps every completed trial, leaves no trial RUNNING and ends as an
uninterrupted run ends; several processes can open a new storage at once; readers change nothing.

Everything is real: SQLite and journal files, subprocesses, signals. Measurements come from recorded tables
(replay mode).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import moe_opt
from moe_opt.cli import main
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


# --- the journal's lock and a torn last line --------------------------------------------------------------

KILLED_WRITER = """
import os, signal, sys
from moe_opt.store.storage import open_storage
store = open_storage(sys.argv[1])
store._backend._lock.acquire()  # a journal write under way (the lock the storage's appends take) ...
os.kill(os.getpid(), signal.SIGKILL)  # ... cut short by a kill
"""


@pytest.mark.parametrize("left_by", ["a killed moe_opt writer", "a plain Optuna writer killed a minute ago"])
def test_a_journal_lock_left_by_a_killed_writer_costs_the_next_run_no_wait(tmp_path, left_by):
    journal = tmp_path / "s.journal"
    kwargs = dict(replay=QWEN, batch_sizes=[1], storage=f"journal:{journal}", output_dir=None, progress=False)
    moe_opt.tune(n_trials=2, **kwargs)
    lock = Path(str(journal) + ".lock")  # Optuna's JournalFileBackend lock file
    if left_by == "a killed moe_opt writer":
        assert python(KILLED_WRITER, f"journal:{journal}", cwd=tmp_path).returncode == -signal.SIGKILL
    else:  # Optuna's own JournalFileSymlinkLock, as an older moe_opt took it, left a minute ago
        os.symlink(journal, lock)
        os.utime(lock, (time.time() - 60,) * 2, follow_symlinks=False)
    assert os.path.lexists(lock)

    t0 = time.perf_counter()
    result = moe_opt.tune(n_trials=4, **kwargs)
    elapsed = time.perf_counter() - t0
    assert result.trials_used == {1: 4}
    assert elapsed < 10, f"the resume took {elapsed:.0f} s (Optuna's grace period for a stale lock is 30 s)"
    assert not os.path.lexists(lock)


def test_a_torn_last_journal_line_is_cut_away_once_and_every_later_run_works(tmp_path, capfd):
    journal = tmp_path / "s.journal"
    kwargs = dict(replay=QWEN, batch_sizes=[1], storage=f"journal:{journal}", output_dir=None, progress=False)
    moe_opt.tune(n_trials=3, **kwargs)
    whole = journal.read_bytes()
    last = whole.splitlines(keepends=True)[-1]
    torn = last[: len(last) // 2]  # the first half of a write, as a kill in the middle of it leaves it
    journal.write_bytes(whole + torn)
    capfd.readouterr()

    assert moe_opt.tune(n_trials=5, **kwargs).trials_used == {1: 5}
    err = capfd.readouterr().err
    assert err.count("torn last line") == 1, err
    assert f"moe-opt: {journal}: cut away its torn last line ({len(torn)} bytes)" in err
    assert journal.read_bytes().startswith(whole)
    assert all(isinstance(json.loads(line), dict) for line in journal.read_bytes().splitlines())
    assert moe_opt.tune(n_trials=7, **kwargs).trials_used == {1: 7}  # and later runs are not refused
    assert "torn" not in capfd.readouterr().err


def test_a_journal_whose_first_write_was_cut_short_is_resumed(tmp_path, capfd):
    journal = tmp_path / "s.journal"
    torn = b'{"op_code":0,"worker_id":"5c1f'  # a kill during the very first write
    journal.write_bytes(torn)
    result = moe_opt.tune(replay=QWEN, batch_sizes=[1], n_trials=2, storage=f"journal:{journal}", output_dir=None,
                          progress=False)
    assert result.trials_used == {1: 2}
    assert f"cut away its torn last line ({len(torn)} bytes)" in capfd.readouterr().err


# --- several processes creating one new SQLite file ----------------------------------------------------

RACE = """
import sys, time
import optuna
from moe_opt.store.storage import open_storage
directory, start, rounds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
optuna.logging.set_verbosity(optuna.logging.ERROR)
for i in range(rounds):
    while time.time() < start + 0.4 * i:  # every process opens the round's new file at the same moment
        pass
    try:
        store = open_storage(f"sqlite:///{directory}/new{i}.db")
        optuna.create_study(study_name="moe", storage=store, load_if_exists=True)
    except Exception as exc:
        print(f"round {i}: {exc}", flush=True)
"""


def test_processes_opening_one_new_sqlite_file_at_once_all_get_it(tmp_path):
    n_processes, rounds = 4, 6
    start = time.time() + 6  # after every process has imported Optuna
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), str(start), str(rounds)], cwd=tmp_path,
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(n_processes)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * n_processes
    assert outputs == [""] * n_processes, "".join(outputs)
    for i in range(rounds):
        assert [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/new{i}.db")] == ["moe"]


# --- readers change nothing ------------------------------------------------------------------------------

def files_state(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


READERS = [["export", "{db}", "-o", "out"], ["show", "{db}"], ["report", "{db}", "-o", "r.html"],
           ["record", "{db}", "-o", "t.csv"], ["dashboard", "{db}", "--port", "0"]]


def test_readers_leave_a_foreign_sqlite_file_as_it_is_and_create_no_file_for_a_mistyped_one(tmp_path, monkeypatch,
                                                                                            capsys):
    monkeypatch.chdir(tmp_path)
    con = sqlite3.connect("other.db")
    con.execute("CREATE TABLE notes (text TEXT)")
    con.execute("INSERT INTO notes VALUES ('not an Optuna database')")
    con.commit()
    con.close()
    before = files_state(tmp_path)
    for argv in READERS:
        for db in ("sqlite:///other.db", "other.db"):
            assert main([a.format(db=db) for a in argv]) == 2, argv
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "other.db holds no Optuna studies" in err, err
            assert files_state(tmp_path) == before  # no tables added, no WAL, no lock file, no output
    con = sqlite3.connect("file:other.db?mode=ro", uri=True)
    assert con.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    con.close()

    for typo in ("sqlite+pysqlite:///typo.db", "sqlite:///typo/studies.db", "sqlite:///file:typo.db?mode=ro&uri=true"):
        for argv in READERS:
            assert main([a.format(db=typo) for a in argv]) == 2, (typo, argv)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "does not exist" in err, err
            assert files_state(tmp_path) == before and not (tmp_path / "typo").exists()


READ_ONLY_DRIVER = """
import contextlib, io, json, sys, urllib.request
from moe_opt.cli import main
from moe_opt.view.dashboard import start_dashboard
db, out = sys.argv[1], sys.argv[2]
results = {}
for argv in (["show", db], ["export", db, "-o", out + "/configs"], ["report", db, "-o", out + "/r.html"],
             ["record", db, "-o", out + "/t.csv"]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    results[argv[0]] = [rc, err.getvalue()]
with start_dashboard(db, port=0) as handle:
    page = urllib.request.urlopen(handle.url.replace("/dashboard", "/api/studies"), timeout=30).read().decode()
    results["dashboard"] = [0 if "moe|" in page else 1, page[:300]]
json.dump(results, open(out + "/results.json", "w"))
"""


def run_read_only(directory: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """Run argv with ``directory`` read-only: chmod for a normal user; root ignores permission bits, so for root
    a read-only bind mount in a mount namespace of the command's own."""
    if os.geteuid() != 0:
        for p in directory.iterdir():
            p.chmod(0o444)
        directory.chmod(0o555)
        try:
            return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=180)
        finally:
            directory.chmod(0o755)
    mount = f"mount --bind {directory} {directory} && mount -o remount,ro,bind {directory}"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"as root a read-only database needs a read-only mount, which fails here: {probe.stderr.strip()}")
    return subprocess.run(["unshare", "-m", "sh", "-c", f'{mount} && exec "$0" "$@"', *argv], env=ENV,
                          capture_output=True, text=True, timeout=180)


def test_the_read_only_commands_read_a_read_only_database(tmp_path):
    studies, out = tmp_path / "studies", tmp_path / "out"
    studies.mkdir()
    out.mkdir()
    tuned = f"{tmp_path}/tuned.db"
    moe_opt.tune(replay=QWEN, batch_sizes=[1, 64], n_trials=3, storage=f"sqlite:///{tuned}", output_dir=None,
                 progress=False)
    # The tune's database as a finished tune leaves it (WAL mode, no -wal/-shm files: this process may still hold
    # connections to the original).
    src, dst = sqlite3.connect(tuned), sqlite3.connect(f"{studies}/s.db")
    src.backup(dst)
    assert dst.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)  # read-only WAL needs care
    src.close()
    dst.close()
    db = f"sqlite:///{studies}/s.db"
    before = files_state(studies)
    assert list(before) == ["s.db"]

    proc = run_read_only(studies, [sys.executable, "-c", READ_ONLY_DRIVER, db, str(out)])
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert {name: rc for name, (rc, _) in results.items()} == dict.fromkeys(
        ["show", "export", "report", "record", "dashboard"], 0), results
    assert len(exported(out / "configs")) == 2 and (out / "r.html").exists() and (out / "t.csv").exists()
    assert files_state(studies) == before

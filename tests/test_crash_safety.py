"""Crash safety of the storage and the trial loop: whenever a tune is killed (SIGKILL, SIGTERM, Ctrl-C once or
twice), the next run starts in seconds, keeps every completed trial, leaves no trial RUNNING and ends as an
uninterrupted run ends; several processes can open a new storage at once; readers change nothing.

Everything is real: SQLite and journal files, subprocesses, signals. Measurements come from recorded tables
(replay mode).
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import sqlite3
import statistics
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


@pytest.mark.parametrize("signals,one_by_one", [(["SIGTERM"], False), (["SIGINT", "SIGINT"], True),
                                                (["SIGINT"] * 40, False)],
                         ids=["SIGTERM", "Ctrl-C twice", "Ctrl-C held down"])
def test_sigterm_or_a_second_ctrl_c_mid_measurement_releases_the_trial_it_held(tmp_path, signals, one_by_one):
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
        # Twice, as a person presses it: the second after the first was seen (two SIGINTs 2 ms apart on a loaded
        # machine reach Python's handler as one, and the tune then rightly waits out the 600 s measurement).
        while one_by_one and proc.poll() is None and "Ctrl-C again" not in (tmp_path / "run.log").read_text():
            assert time.monotonic() < deadline, "the first Ctrl-C was never acknowledged"
            time.sleep(0.05)
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


# --- fault injection: a tune killed at many random moments ------------------------------------------------------

SEED = 20250611
BATCH_SIZES = (1, 64, 4096)
TINY_SHARED_MEMORY = 12288  # leaves 8 of the grid's configs: the search ends having measured them all
STARTUP_BOUND_S = 10.0  # from a run's start to its first trial: seconds (importing torch is ~2 of them), where a
# stale journal lock cost 30 s and a stale trial 120 s


def tiny_table(directory: Path) -> Path:
    """The Qwen3-30B-A3B table at three batch sizes, on a device with so little shared memory that 8 configs fit."""
    table = directory / "tiny.csv"
    with open(QWEN, newline="") as f, open(table, "w", newline="") as g:
        reader = csv.DictReader(f)
        writer = csv.DictWriter(g, reader.fieldnames)
        writer.writeheader()
        writer.writerows(row for row in reader if int(row["M"]) in BATCH_SIZES)
    meta = json.loads(Path(QWEN + ".json").read_text())
    meta.update(shared_memory_bytes=TINY_SHARED_MEMORY, batch_sizes=list(BATCH_SIZES))
    Path(str(table) + ".json").write_text(json.dumps(meta))
    return table


class Runs:
    """The same `moe-opt tune` command, started again and again in one folder, each run killed or not."""

    def __init__(self, directory: Path, table: Path):
        self.dir = directory
        self.storage = f"sqlite:///{directory}/t.db"
        self.out = directory / "out"
        self.cmd = [sys.executable, "-m", "moe_opt.cli", "tune", "--replay", str(table), "--n-trials", "12",
                    "--seed", "3", "--storage", self.storage, "--output-dir", str(self.out)]
        self.sigkilled: set[int] = set()
        self.startups_s: list[float] = []
        self.log = directory / "runs.log"
        self.record: list[str] = []  # one line per run, printed at the end
        self.asked_at_start = 0

    def run(self, when_s: float | None = None, signals: tuple[str, ...] = (), trigger=None) -> tuple[int, float]:
        """One run; with signals, sent ``when_s`` after its start or once ``trigger()`` holds. Returns (exit code,
        wall time)."""
        before = self.numbers()
        self.asked_at_start = self.trials_asked()
        t0 = time.time()
        with open(self.log, "a") as log:
            proc = subprocess.Popen(self.cmd, cwd=self.dir, env=ENV, stdout=log, stderr=log)
            if signals:
                while proc.poll() is None and not (trigger(t0) if trigger else time.time() - t0 >= when_s):
                    time.sleep(0.001)
                for name in signals:
                    if proc.poll() is None:
                        proc.send_signal(getattr(signal, name))
                        time.sleep(0.05)
                        if name == "SIGKILL":
                            self.sigkilled.add(proc.pid)
            proc.wait(120)
        wall_s = time.time() - t0
        started = [t.datetime_start.timestamp() for name, ts in self.trials().items() for t in ts
                   if t.number > before.get(name, -1) and t.datetime_start is not None]
        if started:
            self.startups_s.append(min(started) - t0)
        how = "no signal" if not signals else "+".join(signals) + (
            f" when {trigger.__name__}" if trigger else f" at {when_s:.2f} s")
        self.record.append(f"{how}: exit {proc.returncode} after {wall_s:.2f} s, "
                           f"{len(started)} trials started" + (f", first at {min(started) - t0:.2f} s" if started else "")
                           + f", {len(self.complete())} complete; storage: {self.state()}")
        return proc.returncode, wall_s

    def trials_asked(self) -> int:
        """How many trials have been asked (enqueued ones not counted), read without Optuna: cheap enough to poll
        while a run writes."""
        try:
            con = sqlite3.connect(f"file:{self.dir}/t.db?mode=rw", uri=True)
            try:
                return con.execute("SELECT count(datetime_start) FROM trials").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error:
            return 0

    def state(self) -> str:
        """What the storage file holds: no file, no (complete) Optuna tables, or its trials."""
        if not (self.dir / "t.db").exists():
            return "no file"
        con = sqlite3.connect(f"file:{self.dir}/t.db?mode=rw", uri=True)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "alembic_version" not in tables or not con.execute("SELECT count(*) FROM alembic_version").fetchone()[0]:
                return f"Optuna's tables incomplete ({len(tables)} tables)"
            return f"{con.execute('SELECT count(*) FROM trials').fetchone()[0]} trial rows"
        finally:
            con.close()

    def trials(self) -> dict[str, list]:
        if not (self.dir / "t.db").exists():
            return {}
        try:
            return all_trials(self.storage)
        except moe_opt.TuneError:  # killed before Optuna's tables were complete
            return {}

    def numbers(self) -> dict[str, int]:
        return {name: max((t.number for t in ts), default=-1) for name, ts in self.trials().items()}

    def complete(self) -> dict[tuple[str, int], tuple]:
        return {(name, t.number): (t.params, t.value) for name, ts in self.trials().items() for t in ts
                if t.state == TrialState.COMPLETE}


def test_a_tune_killed_at_random_moments_resumes_in_seconds_and_ends_as_an_uninterrupted_run(tmp_path):
    table = tiny_table(tmp_path)
    # The uninterrupted run, twice (the API and the command): a replay with a seed is deterministic.
    reference = tmp_path / "reference"
    reference.mkdir()
    moe_opt.tune(replay=str(table), n_trials=12, seed=3, storage=f"sqlite:///{reference}/t.db",
                 output_dir=reference / "out", progress=False)
    whole = Runs(tmp_path / "whole", table)
    whole.dir.mkdir()
    assert whole.run()[0] == 0
    expected = exported(reference / "out")
    assert exported(whole.out) == expected and len(expected) == 2
    first_s = whole.startups_s[0]
    counted = [t for ts in whole.trials().values() for t in ts if is_counted(t)]
    assert len(counted) == 8 * len(BATCH_SIZES)  # every config of the tiny space, at each M

    rng = random.Random(SEED)
    runs = Runs(tmp_path / "killed", table)
    runs.dir.mkdir()

    def storage_appears(t0: float) -> bool:
        return (runs.dir / "t.db").exists()

    def export_under_way(t0: float) -> bool:  # a file (or an export's temp file) written by this run
        return runs.out.exists() and any(p.is_file() and p.stat().st_mtime > t0 for p in runs.out.rglob("*"))

    def trials_started(k: int):
        def trigger(t0: float) -> bool:  # k trials asked by this run: a random moment among its trials
            return runs.trials_asked() >= runs.asked_at_start + k
        trigger.__name__ = f"{k} trials started"
        return trigger

    def some_signals() -> tuple[str, ...]:
        return rng.choice([("SIGKILL",), ("SIGKILL",), ("SIGINT",), ("SIGINT", "SIGINT"), ("SIGTERM",)])

    # (when after start, signals, trigger): right at start, while the storage is created, at random moments from
    # 0.05 s to 3 s (mostly while Python imports, here) and among the trials, then while the files are exported.
    plan = [(rng.uniform(0, 0.05), some_signals(), None) for _ in range(2)]
    plan.append((None, ("SIGKILL",), storage_appears))
    middle = [(rng.uniform(0.05, 3.0), some_signals(), None) for _ in range(3)]
    middle += [(None, some_signals(), trials_started(rng.randint(1, 4))) for _ in range(4)]
    rng.shuffle(middle)
    plan += middle + [(None, some_signals(), export_under_way) for _ in range(2)]

    kept = runs.complete()
    for when_s, signals, trigger in plan:
        runs.run(when_s, signals, trigger)
        now = runs.complete()
        assert kept.items() <= now.items(), "a completed trial was lost or changed"
        kept = now
        for t in running(runs.storage) if runs.trials() else []:  # only a SIGKILLed process leaves one RUNNING
            assert t.system_attrs.get(WORKER_KEY, {}).get("pid") in runs.sigkilled | {None}, t.system_attrs
        for name, text in exported(runs.out).items():
            json.loads(text)  # every export file is whole, whenever the run was killed

    code, final_s = runs.run()
    assert code == 0
    assert runs.complete().items() >= kept.items()
    assert not running(runs.storage)
    assert exported(runs.out) == expected
    assert max(runs.startups_s) < STARTUP_BOUND_S, (runs.startups_s, first_s)
    print("\n" + "\n".join(runs.record))
    print(f"{len(plan)} kills; start-up to the first trial: median {statistics.median(runs.startups_s):.2f} s, "
          f"max {max(runs.startups_s):.2f} s over {len(runs.startups_s)} runs; the final resume {final_s:.2f} s; "
          f"uninterrupted: first trial at {first_s:.2f} s")

"""Many workers on one set of studies: the budget per batch size is shared exactly, no config is measured twice
at one batch size, nothing crashes with "database is locked". One host: JournalStorage; many hosts: PostgreSQL.

Replay mode with a measurer slowed to 0.1 s per config, so the workers' trials really interleave.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import optuna
import pytest

import moe_opt
from moe_opt import TuneError
from moe_opt.cli import main
from moe_opt.measure.replay import ReplayTable
from moe_opt.run.coordinator import WORKER_KEY
from moe_opt.store.schema import config_of, is_counted
from moe_opt.store.storage import open_storage

REPO = Path(__file__).resolve().parents[1]
TABLE = str(REPO / "moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv")
POSTGRES_URL = os.environ.get("MOE_OPT_TEST_POSTGRES_URL")


class SlowReplay(ReplayTable):
    """The recorded table, 0.1 s per measurement (a GPU takes ~1 s with compilation)."""

    def measure(self, config, M):
        time.sleep(0.1)
        return super().measure(config, M)


def check_shared_study(storage, result, n_trials: int, n_workers: int) -> None:
    """Exactly n_trials counted trials per batch size, no config twice, no interrupted trials, several workers."""
    store = open_storage(storage)
    pids = collections.Counter()
    for M, name in result.study_names.items():
        trials = optuna.load_study(study_name=name, storage=store).get_trials()
        counted = [t for t in trials if is_counted(t)]
        assert len(counted) == n_trials, (M, len(counted))
        configs = [config_of(t) for t in counted]
        assert len(set(configs)) == len(configs), f"duplicate configs at M={M}"
        assert len(trials) == n_trials, [t.user_attrs.get("error") for t in trials if not is_counted(t)]
        pids.update(t.system_attrs[WORKER_KEY]["pid"] for t in counted)
    assert result.trials_used == {M: n_trials for M in result.study_names}
    assert result.worker_errors == []
    assert 2 <= len(pids) <= n_workers and os.getpid() not in pids  # the workers did the measuring


def test_four_workers_on_a_journal_share_the_budget_without_duplicates(tmp_path, capfd):
    storage = f"journal:{tmp_path}/studies.journal"
    result = moe_opt.tune(replay=TABLE, measurer=SlowReplay(TABLE), n_workers=4, n_trials=10, storage=storage,
                          output_dir=tmp_path / "out", progress=False)
    check_shared_study(storage, result, n_trials=10, n_workers=4)
    assert sorted(result.best) == [1, 16, 64, 256, 1024, 4096] and result.files["sglang"].exists()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "locked" not in err
    # The same call again: the budget is spent, so no worker is started (each would import torch for nothing).
    again = moe_opt.tune(replay=TABLE, measurer=SlowReplay(TABLE), n_workers=4, n_trials=10, storage=storage,
                         output_dir=tmp_path / "out", progress=False)
    assert "every batch size already has its 10 trials: no worker was started" in again.notes
    assert again.best == result.best and again.trials_used == result.trials_used


def test_several_workers_default_to_a_journal_and_refuse_sqlite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TuneError, match=r"is SQLite, which takes one writing process; with n_workers=2 use "
                                        r"journal:PATH \(one host\) or postgresql://"):
        moe_opt.tune(replay=TABLE, n_workers=2, storage="sqlite:///s.db", output_dir=None, progress=False)
    assert main(["tune", "--replay", TABLE, "--workers", "2", "--storage", "sqlite:///s.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "use journal:PATH" in err
    with pytest.raises(TuneError, match="n_workers must be an integer >= 1, got 0"):
        moe_opt.tune(replay=TABLE, n_workers=0, output_dir=None, progress=False)
    assert main(["tune", "--replay", TABLE, "--workers", "-1"]) == 2
    assert "n_workers must be an integer >= 1, got -1" in capsys.readouterr().err

    result = moe_opt.tune(replay=TABLE, n_workers=2, n_trials=2, output_dir=None)
    # A replay's default storage is its own file (store/identity.py), journal here for several processes.
    assert result.storage == "journal:studies/replay_DeepSeek-V4-Flash_tp8_H200.journal"
    assert "2 workers share journal:studies/replay_DeepSeek-V4-Flash_tp8_H200.journal" in capsys.readouterr().out
    assert (tmp_path / "studies" / "replay_DeepSeek-V4-Flash_tp8_H200.journal").exists()
    assert not (tmp_path / "studies" / "DeepSeek-V4-Flash.db").exists()


def test_workers_across_hosts_share_a_postgresql_storage(tmp_path):
    """CI starts a PostgreSQL server and sets MOE_OPT_TEST_POSTGRES_URL (.ci/run); an unreachable server fails."""
    if not POSTGRES_URL:
        pytest.skip("MOE_OPT_TEST_POSTGRES_URL is not set (CI sets it and starts PostgreSQL)")
    # Fresh studies on every run of this test against a long-lived server: study names hold the sidecar's shape
    # and device (not the table's file name), so the copy's sidecar names a device of its own.
    table = tmp_path / "dsv4.csv"
    shutil.copy(TABLE, table)
    meta = json.loads(Path(TABLE + ".json").read_text())
    meta["device"] = f"NVIDIA H200 test-{uuid.uuid4().hex[:8]}"
    Path(str(table) + ".json").write_text(json.dumps(meta))
    store = open_storage(POSTGRES_URL)  # raises TuneError (the test fails) if the server is unreachable
    try:
        result = moe_opt.tune(replay=str(table), measurer=SlowReplay(str(table)), n_workers=3, n_trials=6,
                              storage=POSTGRES_URL, output_dir=None, progress=False)
        check_shared_study(POSTGRES_URL, result, n_trials=6, n_workers=3)
    finally:
        for summary in optuna.get_all_study_summaries(store, include_best_trial=False):
            if table.stem in summary.study_name:
                optuna.delete_study(study_name=summary.study_name, storage=store)


def test_a_worker_killed_mid_run_leaves_the_others_finishing_and_a_rerun_completes_the_budget(tmp_path):
    """SIGKILL one of three workers once it has measured: the other two finish (the killed one's running trial
    is failed as interrupted and retried, its pid being gone), the tune reports the dead worker, and a rerun
    ends with exactly the budget, no config measured twice at one batch size."""
    import signal
    import threading

    storage = f"journal:{tmp_path}/k.journal"
    kwargs = dict(replay=TABLE, measurer=SlowReplay(TABLE), n_workers=3, n_trials=8, storage=storage,
                  batch_sizes=[1, 16, 64], output_dir=None, progress=False, seed=5)
    results = []
    tune = threading.Thread(target=lambda: results.append(moe_opt.tune(**kwargs)))
    tune.start()
    victim, deadline = None, time.monotonic() + 120
    while victim is None and time.monotonic() < deadline:  # a worker that has measured something
        time.sleep(0.2)
        if not Path(f"{tmp_path}/k.journal").exists():
            continue
        store = open_storage(storage)
        pids = collections.Counter(t.system_attrs[WORKER_KEY]["pid"] for s in optuna.get_all_study_summaries(store)
                                   for t in optuna.load_study(study_name=s.study_name, storage=store).get_trials()
                                   if is_counted(t) and WORKER_KEY in t.system_attrs)
        victim = next((pid for pid, n in pids.items() if n >= 2 and pid != os.getpid()), None)
    assert victim is not None, "no worker measured within two minutes"
    os.kill(victim, signal.SIGKILL)
    tune.join(timeout=300)
    first = results[0]
    assert any("exited with code -9" in e for e in first.worker_errors)
    again = moe_opt.tune(**kwargs)  # resumes: whatever the killed worker left is retried, the budget completed
    assert again.worker_errors == []
    store = open_storage(storage)
    for M, name in again.study_names.items():
        counted = [t for t in optuna.load_study(study_name=name, storage=store).get_trials() if is_counted(t)]
        assert len(counted) == 8, (M, len(counted))
        configs = [config_of(t) for t in counted]
        assert len(set(configs)) == len(configs), f"duplicate configs at M={M}"
    assert again.trials_used == {1: 8, 16: 8, 64: 8}

"""Issue 18 on the CPU: ``tune(n_workers=N)`` in replay mode, and one worker SIGKILLed mid-run.

    PYTHONPATH=. python benchmarks/workers_replay.py \
        --json benchmarks/results/workers_replay_DeepSeek-V4-Flash_tp8_H200.json

Every measurement comes from the recorded H200 table (``--table``), so this measures the workers' coordination
(spawn, claims under the shared lock, the journal), not how a tune scales over GPUs: on a machine with few cores
the N workers share them, and a replayed measurement takes no time. Issue 18's measurement on several GPUs is a
different run.

For each seed of ``--seeds`` (default 0 to 4) and each N of ``--workers`` (default 1,2,4): one tune of all the
table's batch sizes with the default budget, in a new work directory (its own journal and config files).
Recorded per run: the wall time of the ``tune()`` call; per batch size the counted trials (must be n_trials),
the duplicates (see ``duplicates``; must be 0), the Interrupted trials; the counted trials each worker process
ran; the best config and its latency (the table's value) against the table's optimum and the 1-worker run's of
the same seed. N workers do not search as one process does (worker i seeds its sampler seed * 7919 + i, and
the claims interleave as the processes happen to run), so that comparison is one of two searches; ``summary``
says per N over the seeds how often every batch size was within 1%. For the first seed the same call runs
once more, its budget spent: that wall time is the cost of starting N workers with nothing to measure.

Then the kill run: ``--kill-workers`` workers (default 4) whose measurer sleeps ``--kill-measure-s`` per config
(as a GPU would take time, so the trials interleave and there is a "mid-run"); once one worker process has
measured ``--kill-after`` trials and holds a running one, it is SIGKILLed. Recorded: what the first run left (counted and Interrupted
trials per batch size, the worker errors), then the same call again and what it ends with. The kill run's tunes
skip the confirm step (tune() re-measures the contenders of a measurer passed in, even a table's, whose values
would only repeat), so their wall times are the search's and the workers' start.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

import moe_opt
from moe_opt.measure.replay import ReplayTable
from moe_opt.run.coordinator import WORKER_KEY
from moe_opt.store.schema import config_of, is_counted, is_interrupted
from moe_opt.store.storage import open_storage

TABLE = "moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv"
WITHIN = 1.01  # issue 18: the tuned configs are the 1-worker run's or within 1% of its latency


class SlowReplay(ReplayTable):
    """The recorded table, ``delay_s`` per measurement (tests/test_workers.py's SlowReplay, the delay settable)."""

    def __init__(self, path: str, delay_s: float):
        super().__init__(path)
        self.delay_s = delay_s

    def measure(self, config, M):
        time.sleep(self.delay_s)
        return super().measure(config, M)


def duplicates(trials: list) -> int:
    """Measurements of a config beyond its first in one study: over the counted trials (COMPLETE, or FAIL for a
    reason of its own; an Interrupted trial was never measured), sum of (trials of a config - 1). The confirm
    step's re-measurements are a study attribute, not trials (and replay mode skips it)."""
    seen = collections.Counter(config_of(t) for t in trials if is_counted(t))
    return sum(n - 1 for n in seen.values())


def study_facts(storage: str, result) -> dict:
    """Per batch size: counted, duplicates, interrupted, all trials; and the counted trials per worker pid."""
    store = open_storage(storage)
    per_M, per_pid = {}, collections.Counter()
    for M, name in sorted(result.study_names.items()):
        trials = optuna.load_study(study_name=name, storage=store).get_trials(deepcopy=False)
        counted = [t for t in trials if is_counted(t)]
        per_M[M] = {"counted": len(counted), "duplicates": duplicates(trials),
                    "interrupted": sum(is_interrupted(t) for t in trials), "trials": len(trials)}
        per_pid.update(t.system_attrs.get(WORKER_KEY, {}).get("pid") for t in counted)
    return {"per_M": per_M, "per_pid": per_pid}


def best_rows(result, table: ReplayTable, baseline: dict | None) -> dict:
    """{M: best config, its table latency, ratio to the table optimum and (given) to the baseline run's}."""
    rows = {}
    for M in sorted(result.best):
        us = result.latency_us[M]
        row = {"config": result.best[M], "us": us, "vs_optimum": round(us / table.best(M)[1], 6)}
        if baseline is not None:
            row["same_as_1_worker"] = result.best[M] == baseline[M]["config"]
            row["vs_1_worker"] = round(us / baseline[M]["us"], 6)
        rows[M] = row
    return rows


def one_run(table_path: str, n: int, n_trials: int | None, seed: int, work: Path, baseline: dict | None,
            idle_rerun: bool) -> dict:
    """One tune; with ``idle_rerun`` the same call again, whose budget is spent: its wall time was what starting
    the N workers (spawn, imports, loading the journal) cost with nothing to measure, until such a call stopped
    starting them (the record at ef5a4fa holds the old figure; now it is the studies' reading alone)."""
    storage = f"journal:{work}/studies.journal"
    kwargs = {"replay": table_path, "n_workers": n, "n_trials": n_trials, "storage": storage,
              "output_dir": work / "out", "progress": False, "seed": seed}
    t0 = time.perf_counter()
    result = moe_opt.tune(**kwargs)
    wall_s = time.perf_counter() - t0
    facts = study_facts(storage, result)
    idle_s = None
    if idle_rerun:
        t0 = time.perf_counter()
        moe_opt.tune(**kwargs)
        idle_s = round(time.perf_counter() - t0, 2)
    return {"workers": n, "wall_s": round(wall_s, 2), "tune_wall_s": round(result.wall_s, 2),
            "idle_rerun_wall_s": idle_s,
            "trials_used": result.trials_used, "per_M": facts["per_M"],
            "trials_per_worker": sorted(facts["per_pid"].values(), reverse=True),
            "tuning_process_measured": facts["per_pid"].get(os.getpid(), 0),
            "worker_errors": result.worker_errors, "best": best_rows(result, ReplayTable(table_path), baseline)}


def kill_run(table_path: str, n: int, n_trials: int | None, seed: int, work: Path, delay_s: float,
             kill_after: int, baseline: dict) -> dict:
    """Tune with n slowed workers, SIGKILL one once it counted ``kill_after`` trials, then tune again."""
    storage = f"journal:{work}/studies.journal"
    kwargs = {"replay": table_path, "measurer": SlowReplay(table_path, delay_s), "n_workers": n,
              "n_trials": n_trials, "storage": storage, "output_dir": work / "out", "progress": False, "seed": seed,
              "confirm": False}  # a measurer of the caller's is re-measured; a table's values would only repeat
    results = []
    t0 = time.perf_counter()
    tune = threading.Thread(target=lambda: results.append(moe_opt.tune(**kwargs)))
    tune.start()
    victim, measured, deadline = None, 0, time.monotonic() + 120
    while victim is None and time.monotonic() < deadline:  # as tests/test_workers.py finds a worker that measured
        time.sleep(0.2)
        if not (work / "studies.journal").exists():
            continue
        store = open_storage(storage)
        trials = [t for s in optuna.get_all_study_summaries(store)
                  for t in optuna.load_study(study_name=s.study_name, storage=store).get_trials()
                  if WORKER_KEY in t.system_attrs]
        pids = collections.Counter(t.system_attrs[WORKER_KEY]["pid"] for t in trials if is_counted(t))
        running = {t.system_attrs[WORKER_KEY]["pid"] for t in trials if t.state == TrialState.RUNNING}
        victim, measured = next(((pid, k) for pid, k in pids.items()  # one that is measuring now: mid-trial
                                 if k >= kill_after and pid in running and pid != os.getpid()), (None, 0))
    if victim is None:
        raise SystemExit("kill run: no worker measured within two minutes")
    index = next((p.name for p in multiprocessing.active_children() if p.pid == victim), "?")
    killed_at_s = time.perf_counter() - t0
    os.kill(victim, signal.SIGKILL)
    tune.join(timeout=600)
    first_wall_s = time.perf_counter() - t0
    first = results[0]
    first_facts = study_facts(storage, first)
    t1 = time.perf_counter()
    again = moe_opt.tune(**kwargs)
    again_wall_s = time.perf_counter() - t1
    again_facts = study_facts(storage, again)
    return {
        "workers": n, "measure_s": delay_s, "kill_after": kill_after,
        "killed": {"worker": index, "counted_trials_before_kill": measured, "at_s": round(killed_at_s, 2)},
        "first": {"wall_s": round(first_wall_s, 2), "worker_errors": first.worker_errors,
                  "trials_used": first.trials_used, "per_M": first_facts["per_M"],
                  "trials_per_worker": sorted(first_facts["per_pid"].values(), reverse=True)},
        "rerun": {"wall_s": round(again_wall_s, 2), "worker_errors": again.worker_errors,
                  "trials_used": again.trials_used, "per_M": again_facts["per_M"],
                  "best": best_rows(again, ReplayTable(table_path), baseline)},
    }


def commit() -> str | None:
    if os.environ.get("MOE_OPT_COMMIT"):
        return os.environ["MOE_OPT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def problems_of(label: str, run: dict, n_trials: int) -> list[str]:
    """What contradicts issue 18's hard expectations: a budget not met, a config measured twice, a worker error."""
    out = [f"{label}, M={M}: {f['counted']} counted trials, not {n_trials}"
           for M, f in run["per_M"].items() if f["counted"] != n_trials]
    out += [f"{label}, M={M}: {f['duplicates']} duplicate measurements"
            for M, f in run["per_M"].items() if f["duplicates"]]
    return out + [f"{label}: {e}" for e in run["worker_errors"]]


def outside(label: str, run: dict) -> list[str]:
    """Batch sizes whose best is more than 1% slower than the 1-worker run's (search variance or a bug)."""
    return [f"{label}, M={M}: best {b['us']} us is {b['vs_1_worker']:.4f}x the 1-worker run's "
            f"({b['vs_optimum']:.4f}x the table's optimum)"
            for M, b in run["best"].items() if b.get("vs_1_worker", 1.0) > WITHIN]


def summary(runs: list[dict]) -> list[dict]:
    """Per N over the seeds: wall time, how many runs had every batch size within 1% of the 1-worker run's
    (same seed) and of the table's optimum, and the worst ratios."""
    rows = []
    for n in dict.fromkeys(r["workers"] for r in runs):
        mine = [r for r in runs if r["workers"] == n]
        vs_1 = [max(b.get("vs_1_worker", 1.0) for b in r["best"].values()) for r in mine]
        vs_opt = [max(b["vs_optimum"] for b in r["best"].values()) for r in mine]
        rows.append({"workers": n, "seeds": len(mine),
                     "wall_s_median": round(statistics.median(r["wall_s"] for r in mine), 2),
                     "wall_s": [r["wall_s"] for r in mine],
                     "duplicates": sum(f["duplicates"] for r in mine for f in r["per_M"].values()),
                     "budget_met": all(f["counted"] == mine[0]["per_M"][M]["counted"] for r in mine
                                       for M, f in r["per_M"].items()),
                     "same_configs_as_1_worker": sum(b.get("same_as_1_worker", True) for r in mine
                                                     for b in r["best"].values()),
                     "configs": sum(len(r["best"]) for r in mine),
                     "runs_all_within_1pct_of_1_worker": sum(x <= WITHIN for x in vs_1),
                     "runs_all_within_1pct_of_optimum": sum(x <= WITHIN for x in vs_opt),
                     "worst_vs_1_worker": max(vs_1), "worst_vs_optimum": max(vs_opt)})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", default=TABLE)
    p.add_argument("--workers", default="1,2,4", help="N,N,...: n_workers of the runs (1 first: the baseline)")
    p.add_argument("--n-trials", type=int, default=None, help="tune()'s n_trials (default: its default, 32)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="S,S,...: a run per N and seed (the kill run: the first)")
    p.add_argument("--kill-workers", type=int, default=4, help="n_workers of the kill run (0: no kill run)")
    p.add_argument("--kill-measure-s", type=float, default=0.5, help="seconds per measurement in the kill run")
    p.add_argument("--kill-after", type=int, default=3, help="kill a worker once it counted this many trials")
    p.add_argument("--workdir", default=None, help="the runs' work directories go here (default: a new temp dir)")
    p.add_argument("--json", required=True, help="where the record goes")
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    table_path = str(Path(args.table).resolve())
    workers = [int(n) for n in args.workers.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if workers[0] != 1:
        sys.exit("--workers must start with 1: the other runs' configs are compared with the 1-worker run's")
    base = Path(args.workdir or tempfile.mkdtemp(prefix="moe_opt_workers_replay_"))
    base.mkdir(parents=True, exist_ok=True)

    runs, baselines = [], {}
    for seed in seeds:
        for n in workers:
            work = Path(tempfile.mkdtemp(prefix=f"w{n}_s{seed}_", dir=base))
            run = {"seed": seed, **one_run(table_path, n, args.n_trials, seed, work, baselines.get(seed),
                                                 idle_rerun=seed == seeds[0])}
            baselines.setdefault(seed, run["best"])
            runs.append(run)
            print(f"seed {seed}, {n} workers: {run['wall_s']:.1f} s, trials per worker {run['trials_per_worker']}, "
                  f"duplicates {sum(f['duplicates'] for f in run['per_M'].values())}", flush=True)
    n_trials = args.n_trials or next(iter(runs[0]["trials_used"].values()))
    problems = [x for r in runs for x in problems_of(f"seed {r['seed']}, {r['workers']} workers", r, n_trials)]
    beyond = [x for r in runs for x in outside(f"seed {r['seed']}, {r['workers']} workers", r)]
    kill = None
    if args.kill_workers:
        work = Path(tempfile.mkdtemp(prefix=f"kill{args.kill_workers}_", dir=base))
        kill = kill_run(table_path, args.kill_workers, args.n_trials, seeds[0], work, args.kill_measure_s,
                        args.kill_after, baselines[seeds[0]])
        problems += problems_of("kill run, rerun", kill["rerun"], n_trials)
        beyond += outside("kill run, rerun", kill["rerun"])
        print(f"kill run: {kill['killed']}, first run errors {kill['first']['worker_errors']}, rerun "
              f"{kill['rerun']['trials_used']}", flush=True)
    for x in problems:
        print(f"PROBLEM: {x}", flush=True)
    for x in beyond:
        print(f"beyond 1%: {x}", flush=True)

    import torch
    import triton

    table = ReplayTable(table_path)
    record = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "mode": "replay", "table": args.table, "table_device": table.info.device_name,
        "batch_sizes": table.batch_sizes, "n_trials": n_trials, "seeds": seeds,
        "machine": {"cpu_cores": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
                    "gpus": torch.cuda.device_count()},
        "measures": "coordination overhead of the workers (replayed measurements take no time); not GPU scaling",
        "duplicates_counted": " ".join(duplicates.__doc__.split()),
        "within": WITHIN, "summary": summary(runs), "runs": runs, "kill": kill, "problems": problems,
        "beyond_1pct_of_1_worker": beyond,
        "optuna": optuna.__version__, "triton": triton.__version__, "torch": torch.__version__,
        "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d"), "commit": commit(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.json}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

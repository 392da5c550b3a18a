"""Compare samplers on recorded grid tables (replay mode, no GPU): how close to the grid optimum each gets.

    PYTHONPATH=. python benchmarks/compare_samplers.py moe_opt/data/DeepSeek-V4-Flash_tp8_H100.csv --seeds 20 \
        --json benchmarks/results/samplers_DeepSeek-V4-Flash_tp8_H100.json

For every sampler and seed, one tune of all the table's batch sizes with 48 trials each; the best config after the
first n trials (n = 16, 24, 32, 48) is compared with the table's optimum. Prints a Markdown table per budget: median
ratio to the optimum, P(all within 1%) (the goal's measure: the seeds in which every batch size is within 1% of its
optimum at once), and P(within 1%) per batch size (worst and mean over batch sizes); ``--json`` also writes the
numbers, per batch size too, for benchmarks/write_performance.py.

Optuna's GP sampler needs scipy (not a moe_opt dependency); without it that row is skipped with a note.
``--samplers`` picks rows by label prefix, e.g. ``--samplers moe_opt`` for moe_opt's rows only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import optuna

import moe_opt
from moe_opt.measure.replay import ReplayTable

BUDGETS = (16, 24, 32, 48)
WITHIN = 1.01


SAMPLERS = {  # label: (sampler, warm start)
    "random": ("random", False),
    "Optuna TPE (defaults)": ("tpe", False),
    "Optuna GP (defaults)": ("gp", False),
    "moe_opt (default)": ("moe", True),
    "moe_opt without warm start": ("moe", False),
}


def ratios(table_path: str, sampler, warm_start: bool, seed: int) -> dict[int, dict[int, float]]:
    """{budget: {M: best-after-budget / grid optimum}} for one seeded run."""
    table = ReplayTable(table_path)
    result = moe_opt.tune(replay=table_path, n_trials=max(BUDGETS), sampler=sampler, seed=seed,
                          warm_start=warm_start,
                          storage=optuna.storages.InMemoryStorage(), output_dir=None, progress=False)
    df = result.trials_dataframe()
    value = "value" if "value" in df else next(c for c in df.columns if c.startswith("value"))
    out: dict[int, dict[int, float]] = {b: {} for b in BUDGETS}
    for M in table.batch_sizes:
        trials = df[df.M == M].sort_values("number")
        for b in BUDGETS:
            best = trials.head(b)[value].min()
            out[b][M] = best / table.best(M)[1]
    return out


def summarize(label: str, runs: list[dict[int, dict[int, float]]], batch_sizes: list[int]) -> list[dict]:
    rows = []
    for b in BUDGETS:
        all_ratios = [r[b][M] for r in runs for M in batch_sizes]
        p_within = {M: sum(r[b][M] <= WITHIN for r in runs) / len(runs) for M in batch_sizes}
        p_all = sum(all(r[b][M] <= WITHIN for M in batch_sizes) for r in runs) / len(runs)
        rows.append({"sampler": label, "trials": b, "seeds": len(runs), "median_ratio": statistics.median(all_ratios),
                     "worst_ratio": max(all_ratios), "p_all": p_all, "p_within_1pct": p_within,
                     "p_worst": min(p_within.values()), "p_mean": statistics.mean(p_within.values())})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--samplers", default=None, help="comma-separated label prefixes of the rows to run (default all)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    from workers_replay import commit as current_commit  # benchmarks/: MOE_OPT_COMMIT, else git's HEAD

    commit = current_commit()  # the code imported now, whatever is committed while the comparison runs
    batch_sizes = ReplayTable(args.table).batch_sizes
    chosen = {label: spec for label, spec in SAMPLERS.items()
              if args.samplers is None or any(label.startswith(x) for x in args.samplers.split(","))}
    print(f"table {args.table}, batch sizes {batch_sizes}, {args.seeds} seeds\n")
    print("| sampler | trials per M | median ratio to optimum | P(all within 1%) | P(within 1%), worst M | "
          "P(within 1%), mean over M |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows, skipped, seconds = [], {}, {}
    for label, (sampler, warm) in chosen.items():
        if sampler == "gp" and importlib.util.find_spec("scipy") is None:
            skipped[label] = "Optuna's GPSampler needs scipy, which is not installed"
            print(f"<!-- {label}: skipped, {skipped[label]} -->", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        runs = [ratios(args.table, sampler, warm, seed) for seed in range(args.seeds)]
        seconds[label] = round(time.perf_counter() - t0, 1)
        for r in summarize(label, runs, batch_sizes):
            rows.append(r)
            print(f"| {label} | {r['trials']} | {r['median_ratio']:.4f} | {r['p_all']:.2f} | {r['p_worst']:.2f} | "
                  f"{r['p_mean']:.2f} |", flush=True)
        print(f"<!-- {label}: {seconds[label]:.0f} s -->", file=sys.stderr)
    if args.json:
        out = {"table": args.table, "batch_sizes": batch_sizes, "seeds": args.seeds, "budgets": list(BUDGETS),
               "within": WITHIN, "rows": rows, "skipped": skipped, "seconds": seconds,
               "commits": {label: commit for label in seconds}}
        out = _merged(Path(args.json), out)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(args.json)
    return 0


def _merged(path: Path, new: dict) -> dict:
    """``new`` with the rows of the samplers it did not run kept from the file at ``path`` (a ``--samplers`` rerun
    of one row keeps the others), where that file compared the same table, seeds and budgets."""
    if not path.exists():
        return new
    old = json.loads(path.read_text())
    if any(old.get(k) != new[k] for k in ("table", "seeds", "budgets", "within")):
        return new
    ran = set(new["seconds"]) | set(new["skipped"])
    out = dict(new, rows=[r for r in old["rows"] if r["sampler"] not in ran] + new["rows"])
    for key in ("skipped", "seconds", "commits"):
        out[key] = {**{k: v for k, v in old.get(key, {}).items() if k not in ran}, **new[key]}
    order = list(SAMPLERS)
    out["rows"].sort(key=lambda r: (order.index(r["sampler"]) if r["sampler"] in order else len(order), r["trials"]))
    return out


if __name__ == "__main__":
    sys.exit(main())

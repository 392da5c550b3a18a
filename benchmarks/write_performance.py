"""Write docs/performance.md from the measurements kept in the repository (no GPU needed).

    PYTHONPATH=. python benchmarks/write_performance.py

Reads
- ``benchmarks/results/e2e_*.json``: end-to-end tunes (benchmarks/e2e_tune.py, run on a GPU);
- ``moe_opt/data/*.csv`` with their ``.csv.json`` sidecars: full-grid tables (benchmarks/record_grid.py, GPU);
- ``benchmarks/results/samplers_*.json``: sampler comparisons on those tables (benchmarks/compare_samplers.py);
- ``benchmarks/results/parity_*.json``: an engine's kernel beside the builtin (benchmarks/engine_parity.py, GPU).
Every number in the page comes from these files; the prose around them is fixed here.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moe_opt.measure.replay import ReplayTable
from moe_opt.space import PARAM_NAMES, Config

GOAL_2_S = 45.0  # issue 16: all 18 batch sizes of DeepSeek-V4-Flash TP8 on one H200
GOAL_3_S = 240.0  # issue 16: DeepSeek-V4-Flash at TP 1, 2, 4, 8 in one command on one H200
# An end-to-end run of DeepSeek-V4-Flash TP8 with tune()'s defaults of its day (a pair tune, USE_TMA offered), and
# every run of the same search and timer with torch's bytecode cached (goal 2 counts every one of them); the runs
# with the lent machine's Python as it came (torch compiled from source in every process) are shown beside them.
DEFAULT_E2E = "pair/e2e_DeepSeek-V4-Flash_tp8_H200_pair_tma_32trials_v15c.json"
GOAL_2_RUNS = "pair/e2e_DeepSeek-V4-Flash_tp8_H200_pair_tma_32trials_v1[45][a-z].json"
AS_LENT_RUNS = "pair/as_lent/e2e_DeepSeek-V4-Flash_tp8_H200_pair_tma_32trials_v*.json"
# The search's rules were chosen while replaying every table but these, recorded after them.
UNSEEN_TABLES = ("Qwen3-Next-80B-A3B-Instruct_tp4_H200.csv",)
GOAL_1_P = 0.95
GOAL_1_TRIALS = 32  # the default n_trials


def short(config: dict | Config) -> str:
    c = config if isinstance(config, Config) else Config.from_dict(config)
    return "/".join(str(v) for v in (c.BLOCK_SIZE_M, c.BLOCK_SIZE_N, c.BLOCK_SIZE_K, c.GROUP_SIZE_M,
                                      c.num_warps, c.num_stages)) + ("/tma" if c.USE_TMA else "")


class Grid(ReplayTable):
    """A recorded table with the extra columns record_grid.py writes (is_default, gbps)."""

    def __init__(self, path: Path):
        super().__init__(path)
        with open(path, newline="") as f:
            self.extra = {(int(r["M"]), Config(*(int(r[k]) for k in PARAM_NAMES))): r for r in csv.DictReader(f)}


def load_tables() -> dict[str, tuple[Grid, dict]]:
    out = {}
    for path in sorted((REPO / "moe_opt/data").glob("*.csv")):
        meta_path = Path(str(path) + ".json")
        out[path.stem] = (Grid(path), json.loads(meta_path.read_text()) if meta_path.exists() else {})
    return out


def table_stats(table: Grid, M: int) -> dict:
    results = {c: us for c, us in table.configs(M).items() if us is not None}
    best_config, best_us = min(results.items(), key=lambda kv: kv[1])
    default = next((c for (m, c), row in table.extra.items() if m == M and row.get("is_default") == "1"), None)
    return {"best": best_config, "best_us": best_us,
            "within_1": sum(us <= 1.01 * best_us for us in results.values()),
            "within_2": sum(us <= 1.02 * best_us for us in results.values()),
            "default_us": results.get(default), "timed": len(results),
            "gbps": float(table.extra[(M, best_config)].get("gbps") or "nan")}


def bytecode_text(run: dict) -> str:
    """How the run's Python loaded torch (benchmarks/python_env.py), in words."""
    state = run.get("python_bytecode")
    if state is None:
        return ("torch's bytecode not recorded (the record predates benchmarks/python_env.py; the lent machine sets "
                "PYTHONDONTWRITEBYTECODE=1 and its torch has no `__pycache__`, so every process compiled torch from "
                "source)")
    if state["torch_bytecode_cached"]:
        return (f"torch loaded from bytecode compiled once into PYTHONPYCACHEPREFIX={state['pycache_prefix']} "
                "before the runs, as a pip-installed torch has it")
    return "torch compiled from source in every process (the lent machine's Python as it came)"


def min_speedup(run: dict) -> float:
    return min(r["default_us"] / r["us"] for r in run["per_batch_size"] if r["default_us"])


def max_speedup(run: dict) -> float:
    return max(r["default_us"] / r["us"] for r in run["per_batch_size"] if r["default_us"])


def e2e_section(run: dict, tables: dict) -> list[str]:
    t = run["timings"]
    device = run["device"]
    grid = next(((name, tbl) for name, (tbl, meta) in tables.items()
                 if meta.get("device") == device and meta.get("spec", {}).get("model") == run["model"]), None)
    trials = "/".join(map(str, sorted({r["trials"] for r in run["per_batch_size"] if r.get("trials")}))) or "48"
    pair = " (a config per GEMM, USE_TMA offered)" if run.get("pairs") else ""
    lines = [f"### {device}: `moe-opt tune --model {run['model']} --tp {run['tp_size']}`{pair}", "",
             (f"Recorded {run['date']} (commit {run.get('commit') or '?'}) by `{run['command']}`; "
             f"{run['cpu_affinity']} CPU cores usable (of {run['cpu_cores']} on the host), Triton {run['triton']}, "
             f"torch {run['torch']}, Python {run['python']}; {bytecode_text(run)}; empty `TRITON_CACHE_DIR`, new "
             f"SQLite study file, all {len(run['per_batch_size'])} batch sizes x {trials} trials."), "",
             f"**{run['wall_s']:.1f} s** from the script's start to the written config files (imports included); "
             f"the tune itself reported {run['tune_wall_s']:.1f} s: start-up {t['start_s']:.1f} s (studies, warm "
             f"start, the measuring process and compile workers starting), trials {t['search_s']:.1f} s "
             f"({t['measured']:.0f} configurations measured, {t.get('compiled', 0):.0f} compiled; the loop waited "
             f"{t['measuring_s']:.1f} s for measurements and {t['compile_wait_s']:.1f} s for compiles, the rest is "
             f"study bookkeeping that overlaps the GPU's work), re-measuring the close contenders and SGLang's "
             f"default {t['confirm_s']:.1f} s, correctness guard {t['guard_s']:.1f} s "
             f"({'all passed' if all(v.startswith('passed') for v in run['guard'].values()) else 'see guard'})."
             + (f" {run['note']}" if run.get("note") else ""), ""]
    copy = run.get("copy_gbps")
    header = "| M | tuned config | µs | SGLang default µs | speedup | GB/s |"
    rule = "| --- | --- | --- | --- | --- | --- |"
    if copy:
        header += " % of copy bandwidth |"
        rule += " --- |"
    header += " TFLOP/s |"
    rule += " --- |"
    if grid:
        header += " grid optimum µs (table) | tuned / optimum |"
        rule += " --- | --- |"
    lines += [header, rule]
    for row in run["per_batch_size"]:
        speedup = row["default_us"] / row["us"] if row["default_us"] else float("nan")
        cells = [str(row["M"]), short(row["config"]), f"{row['us']:.1f}", f"{row['default_us']:.1f}",
                 f"{speedup:.3f}", f"{row['gbps']:.0f}"]
        if copy:
            cells.append(f"{100 * row['gbps'] / copy:.0f}%")
        cells.append(f"{row['tflops']:.1f}")
        if grid:
            tbl = grid[1]
            if row["M"] in tbl.batch_sizes:
                best_us = table_stats(tbl, row["M"])["best_us"]
                cells += [f"{best_us:.1f}", f"{row['us'] / best_us:.3f}"]
            else:
                cells += ["—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    speedups = [r["default_us"] / r["us"] for r in run["per_batch_size"] if r["default_us"]]
    lines += ["", f"Speedup over SGLang's default: {min(speedups):.3f}x to {max(speedups):.3f}x, geometric mean "
              f"**{run['geomean_speedup']:.3f}x**. Latencies are the medians of the re-measurement after the search "
              "(confirm.py), default and tuned config measured in the same pass."
              + (" The config shown is the best single config (for both GEMMs; `/tma`: USE_TMA), its latency its own;"
                 " the recorded grid has no USE_TMA configs, so tuned / optimum below 1 at a `/tma` config is TMA's "
                 "gain (the table was also recorded in another run). What SGLang's up and `_down` files hold at "
                 f"{sum(p['up'] != p['down'] for p in run['pairs'].values())} of {len(run['per_batch_size'])} batch "
                 "sizes is a pair, a config per GEMM (the pair section below)." if run.get("pairs") else "")
              + (f" The card's device-to-device copy bandwidth, measured right after the tune: {copy:.0f} GB/s "
                 "(bytes read plus written); GB/s counts the weights of the experts the routing touched, x and the "
                 "output." if copy else "")]
    if grid:
        lines += ["", (f"The grid optimum column is from `moe_opt/data/{grid[0]}.csv`, recorded on another "
                  "GPU of the same kind; the optimum there is the least of over a thousand single measurements "
                  "(biased low, as a tune's best was before re-measuring), so ratios within 1–2% are within the "
                  "noise between two machines and two measuring schemes.")]
    return lines + [""]


def grids_section(tables: dict) -> list[str]:
    lines = []
    for name, (table, meta) in tables.items():
        spec = meta.get("spec", {})
        copy = meta.get("copy_gbps")
        lines += [f"### `moe_opt/data/{name}.csv`", "",
                  f"{spec.get('model', '?')} TP{spec.get('tp_size', '?')}: E={spec.get('E')}, N={spec.get('N')}, "
                  f"K={spec.get('K')}, topk={spec.get('topk')}, {spec.get('dtype') or spec.get('torch_dtype')}"
                  + (f", block {spec['block_shape']}" if spec.get("block_shape") else "")
                  + (f", swiglu_limit {spec['swiglu_limit']:g}" if spec.get("swiglu_limit") else "") + ". "
                  f"Recorded {meta.get('recorded', '?')} on an {meta.get('device', '?')} ({meta.get('gpus', 1)} "
                  f"GPU(s) timing shares of the grid), Triton {meta.get('triton')}, torch {meta.get('torch')}: "
                  f"{meta.get('configs')} configs compiled by {meta.get('compile_workers')} processes in "
                  f"{meta.get('compile_s')} s, {meta.get('compiled_ok')} compiled; the rest failed with "
                  "`OutOfResources: shared memory`. Timer: " + str(meta.get("timer", "?")) + "."
                  + (f" Copy bandwidth of the card: {copy:.0f} GB/s." if copy else "")
                  + (f" {meta['note']}" if meta.get("note") else ""), "",
                  "| M | grid optimum µs | its config | configs within 1% | within 2% | SGLang default / optimum |"
                  + (" optimum GB/s (% of copy) |" if copy else ""),
                  "| --- | --- | --- | --- | --- | --- |" + (" --- |" if copy else "")]
        for M in table.batch_sizes:
            s = table_stats(table, M)
            default = f"{s['default_us'] / s['best_us']:.3f}" if s["default_us"] else "—"
            row = (f"| {M} | {s['best_us']:.2f} | {short(s['best'])} | {s['within_1']} | {s['within_2']} | "
                   f"{default} |")
            if copy:
                row += f" {s['gbps']:.0f} ({100 * s['gbps'] / copy:.0f}%) |"
            lines.append(row)
        lines.append("")
    return lines


def samplers_section(runs: dict[str, dict]) -> list[str]:
    lines = []
    for name, data in runs.items():
        lines += [f"### On `{Path(data['table']).name}` ({len(data['batch_sizes'])} batch sizes: "
                  f"{', '.join(map(str, data['batch_sizes']))}; {data['seeds']} seeds)", "",
                  "| sampler | trials per M | median ratio to optimum | worst ratio | P(all within 1%) | "
                  "P(within 1%), worst M | P(within 1%), mean over M |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in data["rows"]:
            bold = "**" if r["sampler"].startswith("moe_opt (default)") else ""
            if r.get("seeds", data["seeds"]) != data["seeds"]:  # a slow sampler run over fewer seeds
                r = {**r, "sampler": f"{r['sampler']} ({r['seeds']} seeds)"}
            p_all = f"{r['p_all']:.2f}" if "p_all" in r else "not recorded"
            lines.append(f"| {bold}{r['sampler']}{bold} | {r['trials']} | {r['median_ratio']:.4f} | "
                         f"{r['worst_ratio']:.4f} | {p_all} | {r['p_worst']:.2f} | {r['p_mean']:.2f} |")
        for label, why in data.get("skipped", {}).items():
            lines.append(f"\n{label}: not run ({why}).")
        if data.get("note"):
            lines.append(f"\n{data['note']}.")
        lines.append("")
    return lines


def goal_rows(e2e: dict[str, dict], samplers: dict[str, dict]) -> list[str]:
    g1 = []
    for data in samplers.values():
        row = next((r for r in data["rows"] if r["sampler"] == "moe_opt (default)" and r["trials"] == GOAL_1_TRIALS),
                   None)
        if row:  # the goal's measure: every batch size within 1% in the same seed
            g1.append((Path(data["table"]).name, row.get("p_all", row["p_worst"]), len(data["batch_sizes"]),
                       data["seeds"]))
    g1_met = bool(g1) and all(p >= GOAL_1_P for _, p, _, _ in g1)
    speedups = [r["default_us"] / r["us"] for run in e2e.values() for r in run["per_batch_size"] if r["default_us"]]
    g1_text = "; ".join(f"`{n}`: {p:.2f} of {s} seeds with all {k} batch sizes within 1%" for n, p, k, s in g1)
    g2 = json.loads((REPO / "benchmarks/results" / DEFAULT_E2E).read_text())
    g2_runs = [json.loads(f.read_text()) for f in sorted((REPO / "benchmarks/results").glob(GOAL_2_RUNS))] or [g2]
    as_lent = [json.loads(f.read_text()) for f in sorted((REPO / "benchmarks/results").glob(AS_LENT_RUNS),
                                                         key=lambda f: (int(re.search(r"_v(\d+)", f.name)[1]), f.name))
               if "cprofile" not in f.name]
    g2_within = sum(r["wall_s"] <= GOAL_2_S for r in g2_runs)
    trials = {r.get("trials") for r in g2["per_batch_size"]}
    walls = " / ".join(f"{r['wall_s']:.1f}" for r in g2_runs)
    commits = ", ".join(dict.fromkeys(r.get("commit") or "?" for r in g2_runs))
    lent_walls = " / ".join(f"{r['wall_s']:.1f}" for r in as_lent) or "not measured"
    g2_text = (f"{walls} s in {len(g2_runs)} runs on an {g2['device']} "
               f"({g2['cpu_affinity']} cores; commits {commits}), cold Triton cache, torch's bytecode cached, "
               f"{'/'.join(map(str, sorted(t for t in trials if t)))} trials per batch size, a config pair per "
               f"batch size with USE_TMA offered (`{GOAL_2_RUNS}`); {g2_within} of {len(g2_runs)} within "
               f"{GOAL_2_S:.0f} s; with the machine's Python as lent (torch compiled from source in each of the "
               f"tune's 16 processes) {lent_walls} s (commits "
               f"{', '.join(dict.fromkeys(r.get('commit') or '?' for r in as_lent)) or '—'}) "
               "(Where the time goes, below)")
    g2_met = g2_within == len(g2_runs)
    sweeps = [json.loads(f.read_text()) for f in sorted((REPO / "benchmarks/results").glob("sweep_*.json"))]
    g3_text = "; ".join(f"{r['wall_s']:.1f} s for TP {', '.join(map(str, r['tp_sizes']))} on an {r['device']}"
                        for r in sweeps) or "not measured yet (`benchmarks/e2e_sweep.py` exists; no GPU time was left)"
    g3_met = bool(sweeps) and all(r["wall_s"] <= GOAL_3_S for r in sweeps)
    g4_text = "; ".join(f"{label}: {min_speedup(run):.3f}x–{max_speedup(run):.3f}x, geometric mean "
                        f"{run['geomean_speedup']:.3f}x" for label, run in e2e.items())
    return ["| goal | status | evidence |", "| --- | --- | --- |",
            f"| 1. within 1% of the grid optimum at every batch size in ≥ 95% of seeds, ≤ {GOAL_1_TRIALS} trials | "
            f"**{'met' if g1_met else 'not met'}** | P(all within 1%) with {GOAL_1_TRIALS} trials: {g1_text}; "
            "checked on every CI run, on the tables where it holds, by "
            "`tests/test_tune.py::test_search_reaches_one_percent_of_grid_optimum_in_95_percent_of_seeds`" +
            (f"; it does not hold on {', '.join(f'`{n}`' for n, p, _, _ in g1 if p < GOAL_1_P)} (the samplers "
             "section), so no test asserts 1% there" if not g1_met else
             "; the search's rules were chosen while replaying the other tables; "
             f"{', '.join(f'`{n}`' for n in UNSEEN_TABLES)} was recorded after them and replayed with them "
             "unchanged") + " |",
            f"| 2. all 18 batch sizes of DeepSeek-V4-Flash TP8 in ≤ {GOAL_2_S:.0f} s on one H200, cold Triton cache, "
            f"studies and both exports included | **{'met' if g2_met else 'not met'}** | {g2_text} |",
            f"| 3. DeepSeek-V4-Flash at TP 1, 2, 4, 8 (4 shapes x 18 batch sizes) in one command in ≤ {GOAL_3_S:.0f} s "
            f"on one H200 | **{'met' if g3_met else 'not met'}** | {g3_text} |",
            f"| never slower than SGLang's default; geometric-mean speedup reported | "
            f"**{'met' if speedups and min(speedups) >= 1.0 else 'not met'}** | {g4_text} |", ""]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "docs/performance.md"))
    args = p.parse_args()
    results = REPO / "benchmarks/results"
    e2e = {}
    for f in sorted(results.glob("e2e_*.json")):
        run = json.loads(f.read_text())
        repeat = f.stem.rsplit("_", 1)[-1]
        e2e[run["device"] + (f" ({repeat.replace('run', 'run ')})" if repeat.startswith("run") else "")] = run
    e2e = dict(sorted(e2e.items(), key=lambda kv: "H100" not in kv[1]["device"]))  # the H100 first
    samplers = {f.stem: json.loads(f.read_text()) for f in sorted(results.glob("samplers_*.json"))}
    tables = load_tables()
    lines = ["# Performance", "",
             ("<!-- Written by benchmarks/write_performance.py from benchmarks/results/*.json and moe_opt/data/*.csv; "
             "edit the script, not this page. -->"), "",
             ("What moe_opt achieves against the goals of tuning DeepSeek-V4-Flash, with the numbers measured on this "
             "project's lent GPUs. Timings are medians of CUDA-graph replays (tuning.md); compare ratios within one "
             "run and one card, not absolute microseconds across machines."), "",
             "## Goals (issue 16)", ""] + goal_rows(e2e, samplers)
    lines += ["## End to end (goals 2 and 3)", ""]
    shown: set[str] = set()
    for run in e2e.values():
        if run["device"] in shown:  # a repeat on the same card: one line
            lines += [(f"Repeat on the {run['device']}: **{run['wall_s']:.1f} s** from the script's start (tune "
                      f"{run['tune_wall_s']:.1f} s), speedup {min_speedup(run):.3f}x–{max_speedup(run):.3f}x, "
                      f"geometric mean {run['geomean_speedup']:.3f}x. {run.get('note', '')}"), ""]
            continue
        shown.add(run["device"])
        lines += e2e_section(run, tables)
    lines += e2e_section(json.loads((results / DEFAULT_E2E).read_text()), tables)  # the newest, today's defaults
    lines += ["## The recorded grids", "",
              ("Every config of SGLang's space (`space.grid()`: BLOCK_SIZE_K limited to divisors of block_k under "
              "block quantization) compiled, then timed at each batch size listed with the tuner's timer. Configs are "
              "written BLOCK_SIZE_M/N/K/GROUP_SIZE_M/num_warps/num_stages. The landscapes are sharp: a handful "
              "of configs lie within 1% of the optimum."), ""] + grids_section(tables)
    lines += ["## Samplers on the recorded grids (goal 1)", "",
              "`benchmarks/compare_samplers.py` (replay mode, CPU): per sampler and seed one tune of all the "
              "table's batch sizes together with 48 trials each; the best after the first n trials is compared "
              "with the grid optimum. Trials are counted as every configuration looked up, failures included. "
              "\"P(all within 1%)\" is the share of seeds in which every batch size is within 1% of its optimum "
              "(the goal's measure); \"P(within 1%)\" is per batch size, over seeds. Optuna's GP sampler (it needs "
              "scipy) takes 3 to 5 times as long per tune on the CPU as the others; where it ran over fewer seeds its "
              "label says so.", ""] + samplers_section(samplers)
    lines += pairs_section([json.loads(f.read_text()) for f in sorted(results.glob("pair_*.json"))])
    lines += formats_section([json.loads(f.read_text()) for f in sorted((results / "formats").glob("e2e_*.json"))])
    lines += routing_section([json.loads(f.read_text()) for f in sorted(results.glob("routing_*.json"))])
    lines += sweep_section([json.loads(f.read_text()) for f in sorted(results.glob("sweep_*.json"))])
    parity = [json.loads(f.read_text()) for f in sorted(results.glob("parity_*.json"))]
    lines += parity_section(parity)
    lines += engine_tunes_section([json.loads(f.read_text())
                                   for f in sorted((results / "engine_tunes").glob("e2e_*.json"))])
    lines += workers_section([json.loads(f.read_text()) for f in sorted(results.glob("workers_replay_*.json"))])
    lines += where_time_goes(e2e)
    lines += ["## Not measured", ""]
    if not parity:
        lines += [("- SGLang's own kernel beside moe_opt's at the same configs: no `benchmarks/engine_parity.py` "
                  "result is recorded yet. The exported files are in SGLang's format and name; the speedups above "
                  "are of moe_opt's kernel (same algorithm and tunables, docs/kernel.md).")]
    lines += [
              ("- Full grids on an H100 at six batch sizes: only M = 1 and 16 of DeepSeek-V4-Flash were recorded on "
              "one (see the tables' notes); the end-to-end runs are on the H100."),
              "- `--workers N` on a multi-GPU host (issue 18: no machine with several GPUs was lent; replay mode "
              "above, PostgreSQL and kill tests in tests/test_workers.py).", ""]
    text = "\n".join(lines).rstrip() + "\n"
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


def pairs_section(runs: list[dict]) -> list[str]:
    """A config per GEMM (SGLang's up and _down files) against one config for both, timed in one process; with
    USE_TMA where a third record was compared."""
    if not runs:
        return []
    lines = ["## A config per GEMM (SGLang's `_down` file) and TMA", "",
             ("`benchmarks/compare_pair.py` after `benchmarks/e2e_tune.py` runs of the same model on the same card, "
              "one with `--down-config off` (one config for both GEMMs) and one with a config per GEMM (sharing "
              "BLOCK_SIZE_M): per batch size, SGLang's default, the single tune's config and the pair tune's "
              "(up, down) pair are timed with the tuner's CUDA-graph timer, interleaved, and the medians compared. "
              "Where a third record is given (`--pair-tma`: the default tune on a Hopper GPU, USE_TMA offered), its "
              "pair is timed in the same pass; the pair without TMA comes from a tune made before USE_TMA existed "
              "(the same as `--tma off`). A `tma` in a config is USE_TMA true: GEMM1's weights by TMA in the up "
              "config; in the down config GEMM1 writes expert-sorted and GEMM2 loads A and B by TMA "
              "(docs/kernel.md)."), ""]
    for run in runs:
        tma = run.get("geomean_pair_tma_vs_single") is not None
        lines += [f"### {run['device']}: {run['model']} TP{run['tp_size']}", "",
                  (f"Recorded {run['date']} by `{run['command']}`; Triton {run['triton']}, torch {run['torch']}, "
                   f"{run['rounds']} interleaved rounds. Wall time of the tunes (cold Triton cache each, 48 trials "
                   f"per batch size): single {run['single_wall_s']:.1f} s, pair {run['pair_wall_s']:.1f} s"
                   + (f", pair with TMA offered {run['pair_tma_wall_s']:.1f} s." if tma else ".")), "",
                  "| M | SGLang default µs | single config µs | pair µs | pair / single |"
                  + (" pair with TMA µs | with TMA / single | with TMA / pair | pair with TMA |" if tma
                     else " pair / default | pair |"),
                  "| --- | --- | --- | --- | --- |" + (" --- | --- | --- | --- |" if tma else " --- | --- |")]
        for r in run["per_batch_size"]:
            row = (f"| {r['M']} | {r['default_us']:.1f} | {r['single_us']:.1f} | {r['pair_us']:.1f} | "
                   f"{r['pair_vs_single']:.3f} |")
            if not tma:
                row += f" {r['pair_vs_default']:.3f} | `{r['pair']}` |"
            elif "pair_tma_us" in r:
                row += (f" {r['pair_tma_us']:.1f} | {r['pair_tma_vs_single']:.3f} | {r['pair_tma_vs_pair']:.3f} | "
                        f"`{r['pair_tma']}` |")
            else:
                row += " — | — | — | — |"
            lines.append(row)
        lines += ["", (f"Geometric mean over the batch sizes: pair vs single config "
                       f"**{run['geomean_pair_vs_single']:.3f}x**, pair vs SGLang's default "
                       f"{run['geomean_pair_vs_default']:.3f}x"
                       + (f"; the pair tune with USE_TMA offered vs the single config "
                          f"**{run['geomean_pair_tma_vs_single']:.3f}x**, vs the pair without TMA "
                          f"{run['geomean_pair_tma_vs_pair']:.3f}x." if tma else ".")), ""]
    return lines


def _num(value, fmt: str = ".3f") -> str:
    return "–" if value is None else format(value, fmt)


PATHS = {"fused_experts": "the engine's full `fused_experts`",
         "engine_kernel": "the engine's own Triton GEMM kernel and launch function for both GEMMs, inside moe_opt's "
                          "alignment, activation and sum (docs/engines.md)"}


def parity_section(runs: list[dict]) -> list[str]:
    """The engine's kernel beside the builtin at the same configs, and tuned vs shipped vs default, per batch size."""
    if not runs:
        return []
    lines = ["## The engines' kernels beside moe_opt's", "",
             ("`benchmarks/engine_parity.py`: per batch size the engine's default config, its shipped file's entry, "
             "the tuned file's entry and configs sampled from the grid, each timed through the engine and through "
             "moe_opt's builtin launched by the engine's rules, interleaved, with the tuner's CUDA-graph timer. "
             "builtin/engine < 1: the builtin is faster. Spearman: how alike the two rank the configs (what tuning "
             "on the builtin relies on). The last columns are the engine's own times: tuned / shipped and "
             "tuned / default (< 1: the tuned file is faster)."), ""]
    for run in sorted(runs, key=lambda r: (r["engine"], r["model"])):
        src = run.get("engine_source") or {}
        replaced = ", ".join(f"`{m}`" for m in src.get("replaced_imports", {}))
        lines += [f"### {run['engine']} {run['engine_version']} on {run['device']}: {run['model']} TP{run['tp_size']}",
                  "", (f"What ran as the engine: {PATHS.get(run['path'], run['path'])}. Recorded {run['date']} by "
                  f"`{run['command']}`; Triton {run['triton']}, torch {run['torch']}, {run['rounds']} rounds, "
                  f"{run.get('sample', '?')} sampled configs; shipped file: {run.get('shipped_file') or 'none'}.")]
        if replaced:
            lines += ["", f"Imports of the engine's kernel files that were replaced (the kernel code was not): {replaced}."]
        lines += ["", ("| M | configs | builtin/engine median | worst | Spearman | tuned / shipped | tuned / default "
                      "| shipped / default |"), "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in run["per_batch_size"]:
            t = r.get("engine_time_ratios", {})
            timed = sum(c.get("ratio") is not None for c in r["configs"])
            lines.append(f"| {r['M']} | {timed} | {_num(r['median_ratio'])} | {_num(r['worst_ratio'])} | "
                         f"{_num(r['spearman'], '.2f')} | {_num(t.get('tuned0_vs_shipped'))} | "
                         f"{_num(t.get('tuned0_vs_default'))} | {_num(t.get('shipped_vs_default'))} |")
        skipped = {k: v for r in run["per_batch_size"] for k, v in r.get("skipped", {}).items()}
        failed = sum(len(r["errors"]) for r in run["per_batch_size"])
        notes = [f"{failed} config/side failures recorded"] if failed else []
        notes += [f"{k} entries skipped where moe_opt's Config cannot hold them ({v.split(': ', 1)[-1]})"
                  for k, v in skipped.items()]
        lines += [""] + ([f"Notes: {'; '.join(notes)}.", ""] if notes else [])
    return lines


def tuned_rows(rows: list[dict], engine: str) -> list[str]:
    """A table of per-batch-size rows of an e2e_tune record: the tuned config, its µs, the engine's default's µs,
    the speedup."""
    lines = [f"| M | tuned config | µs | {engine} default µs | speedup |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        d = r.get("default_us")
        lines.append(f"| {r['M']} | {short(r['config'])} | {r['us']:.1f} | {d:.1f} | {d / r['us']:.3f} |" if d
                     else f"| {r['M']} | {short(r['config'])} | {r['us']:.1f} | — | — |")
    return lines


def engine_tunes_section(runs: list[dict]) -> list[str]:
    """Tunes of an engine's own GEMM kernel (``--kernel sglang-kernel=DIR`` / ``vllm-kernel=DIR``): the tuned config
    against the engine's own default, both timed in the engine's kernel."""
    if not runs:
        return []
    lines = ["## Tuning the engines' own kernels", "",
             ("`benchmarks/e2e_tune.py --kernel ENGINE-kernel=.engines/ENGINE` (the engine's GEMM kernel and launch "
             "function from its wheel's files, in moe_opt's alignment, activation and sum: docs/engines.md), default "
             "trials, from a cold Triton cache. Speedups are over the engine's own default config (SGLang's "
             "`get_default_config` or vLLM's), both re-measured in the same pass in the engine's kernel. A vLLM tune "
             "searches one config for both GEMMs and writes vLLM's file only; an SGLang tune searches a config per "
             "GEMM."), ""]
    for run in sorted(runs, key=lambda r: r["kernel"]):
        engine = run["kernel"].split("-kernel", 1)[0]
        name = {"sglang": "SGLang", "vllm": "vLLM"}[engine]
        trials = sorted({r.get("trials") for r in run["per_batch_size"] if r.get("trials")})
        t = run["timings"]
        lines += [f"### {run['kernel'].split('=', 1)[0]} on {run['device']}: {run['model']} TP{run['tp_size']}", "",
                  (f"Recorded {run['date']} (commit {run.get('commit') or '?'}) by `{run['command']}`; Triton "
                   f"{run['triton']}, torch {run['torch']}; {'/'.join(map(str, trials))} trials per batch size. "
                   f"**{run['wall_s']:.1f} s** from the script's start: trial loop {t['search_s']:.1f} s (waiting "
                   f"{t['measuring_s']:.1f} s for the GPU, {t['compile_wait_s']:.1f} s for compiles; "
                   f"{t['measured']:.0f} measured, {t.get('compiled', 0):.0f} compiles of a (config, batch size): "
                   f"the engine's kernel is specialized per batch size), re-measuring {t['confirm_s']:.1f} s, guard "
                   f"{t['guard_s']:.1f} s."), "",
] + tuned_rows(run["per_batch_size"], name)
        speed = [r["default_us"] / r["us"] for r in run["per_batch_size"] if r.get("default_us")]
        split = sum(p["up"] != p["down"] for p in (run.get("pairs") or {}).values())
        lines += ["", (f"Speedup {min(speed):.3f}x to {max(speed):.3f}x, geometric mean "
                       f"**{run['geomean_speedup']:.3f}x** over {name}'s default"
                       + (f"; SGLang's up and `_down` files differ at {split} of {len(run['per_batch_size'])} batch "
                          "sizes." if run.get("pairs") else ".")), ""]
    return lines


def workers_section(runs: list[dict]) -> list[str]:
    """Issue 18's CPU part: tune(n_workers=N) in replay mode (benchmarks/workers_replay.py)."""
    if not runs:
        return []
    lines = ["## Several workers, in replay mode (issue 18's CPU part)", ""]
    for run in runs:
        k = run["kill"]
        lines += [(f"`{run['command']}` on a {run['machine']['cpu_cores']}-core CPU without a GPU, replaying "
                   f"`{Path(run['table']).name}` ({run['table_device']}), {run['n_trials']} trials per batch size at "
                   f"{len(run['batch_sizes'])} batch sizes, {len(run['seeds'])} seeds per worker count, a fresh journal "
                   f"each run; recorded {run['date']} (commit {run.get('commit') or '?'}). It measures "
                   f"{run['measures']}. No machine with several GPUs was lent, so the GPU run of issue 18 has not "
                   "run."), "",
                  ("| workers | wall s (median) | budget met | duplicates | same config as 1 worker | runs with all "
                   "within 1% of 1 worker | worst vs 1 worker |"), "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in run["summary"]:
            lines.append(f"| {r['workers']} | {r['wall_s_median']:.1f} | {'yes' if r['budget_met'] else 'no'} | "
                         f"{r['duplicates']} | {r['same_configs_as_1_worker']} of {r['configs']} | "
                         f"{r['runs_all_within_1pct_of_1_worker']} of {r['seeds']} | {r['worst_vs_1_worker']:.4f} |")
        lines += ["", (f"Beyond 1% of the 1-worker run: {'; '.join(run['beyond_1pct_of_1_worker']) or 'none'}. "
                       "Workers propose without the results still being measured elsewhere, so a parallel search "
                       "sees less per proposal than a serial one with the same budget.") , "",
                  (f"Kill run: {k['workers']} workers, {k['measure_s']} s per replayed measurement; "
                   f"{k['killed']['worker']} SIGKILLed at {k['killed']['at_s']:.1f} s holding a trial (after "
                   f"{k['killed']['counted_trials_before_kill']} counted); the others finished the budget "
                   f"({k['first']['wall_s']:.1f} s; {'; '.join(k['first']['worker_errors'])}); the same call again "
                   f"found every batch size at its budget ({k['rerun']['wall_s']:.1f} s). docs/operations.md has the "
                   "details."), ""]
    return lines


def formats_section(runs: list[dict]) -> list[str]:
    """18-batch-size tunes of the weight formats beyond fp8/bf16."""
    if not runs:
        return []
    lines = ["## Weight formats: int8_w8a16 and int4_w4a16", "",
             ("`benchmarks/e2e_tune.py --dtype FORMAT --down-config off` (one config for both GEMMs, to fit the "
             "session's GPU time), all 18 batch sizes x 48 trials from a cold Triton cache; speedups over SGLang's "
             "default config for the format, both re-measured in the same pass."), ""]
    for run in runs:
        spec = run["spec"]
        group = f", group {spec['block_shape'][1]}" if spec.get("block_shape") and not spec["block_shape"][0] else ""
        rows = run["per_batch_size"]
        speed = [r["default_us"] / r["us"] for r in rows if r.get("default_us")]
        lines += [f"### {run['device']}: {run['model']} TP{run['tp_size']}, {spec['dtype']}{group}", "",
                  (f"Recorded {run['date']} by `{run['command']}`; Triton {run['triton']}, torch {run['torch']}; "
                  f"E={spec['E']}, N={spec['N']}, K={spec['K']}, topk={spec['topk']}. **{run['wall_s']:.1f} s** from "
                  f"the script's start."), ""] + tuned_rows(rows, "SGLang")
        lines += ["", f"Speedup {min(speed):.3f}x to {max(speed):.3f}x, geometric mean **{run['geomean_speedup']:.3f}x**.",
                  ""]
    return lines


def routing_section(runs: list[dict]) -> list[str]:
    """What a skewed routing does to the tuned configs (benchmarks/compare_routing.py)."""
    if not runs:
        return []
    lines = ["## Skewed routing", "",
             "`benchmarks/compare_routing.py` after two `benchmarks/e2e_tune.py --down-config off` runs of the same "
             "model on the same card, one with uniform routing and one with a skewed routing (`--routing zipf<s>`: "
             "expert popularity 1/rank^s, docs/routing.md). Per batch size, the two tunes' configs and SGLang's "
             "default are timed under both routings, interleaved, and the medians compared: the first speedup column "
             "is how much faster the skewed tune's config runs than the uniform tune's when the served routing is "
             "skewed, the second the same under uniform routing, the last the uniform tune's config's time under the "
             "skewed routing over its time under uniform routing (< 1: the skewed call is faster, it touches fewer "
             "experts' weights).", ""]
    for run in runs:
        lines += [f"### {run['device']}: {run['model']} TP{run['tp_size']}, {run['routing']}", "",
                  f"Recorded {run['date']} by `{run['command']}`; Triton {run['triton']}, torch {run['torch']}, "
                  f"{run['rounds']} interleaved rounds. The two tunes picked the same config at {run['same_config']} "
                  f"of {run['batch_sizes']} batch sizes.", "",
                  f"| M | uniform-tuned µs ({run['routing']}) | skewed-tuned µs ({run['routing']}) | skewed / uniform "
                  f"tune, {run['routing']} | skewed / uniform tune, uniform | {run['routing']} / uniform, uniform-tuned "
                  "config |", "| --- | --- | --- | --- | --- | --- |"]
        for r in run["per_batch_size"]:
            lines.append(f"| {r['M']} | {r['uniform_tuned_us_skewed']:.1f} | {r['skewed_tuned_us_skewed']:.1f} | "
                         f"{r['skewed_vs_uniform_tuned_skewed']:.3f} | {r['skewed_vs_uniform_tuned_uniform']:.3f} | "
                         f"{r['skewed_slowdown']:.3f} |")
        lines += ["", f"Geometric means: under {run['routing']} the skewed tune's configs are "
                      f"**{run['geomean_skewed_vs_uniform_tuned_skewed']:.3f}x** the speed of the uniform tune's; under "
                      f"uniform routing {run['geomean_skewed_vs_uniform_tuned_uniform']:.3f}x; the uniform tune's "
                      f"configs take {run['geomean_skewed_slowdown']:.3f}x their uniform-routing time under the "
                      "skewed routing.", ""]
    return lines


def sweep_section(runs: list[dict]) -> list[str]:
    """A model's TP sweep in one command (benchmarks/e2e_sweep.py)."""
    if not runs:
        return []
    lines = ["## A TP sweep in one command (goal 3)", ""]
    for run in runs:
        lines += [f"### {run['device']}: {run['model']}, TP {', '.join(map(str, run['tp_sizes']))}", "",
                  f"Recorded {run['date']} by `{run['command']}` (commit {run.get('commit') or '?'}); Triton "
                  f"{run['triton']}, torch {run['torch']}; {bytecode_text(run)}; cold Triton cache, all 18 batch "
                  f"sizes per shape, tune()'s defaults. **{run['wall_s']:.1f} s** from the script's start for the "
                  "whole sweep.", "",
                  "| TP | E | N | K | tune wall s | trial loop s | re-measuring s | guard s | geometric-mean speedup "
                  "vs SGLang default |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for shape in run["shapes"]:
            spec, t, g = shape["spec"], shape["timings"], shape.get("geomean_speedup")
            lines.append(f"| {shape['tp_size']} | {spec['E']} | {spec['N']} | {spec['K']} | {shape['tune_wall_s']:.1f} "
                         f"| {t.get('search_s', float('nan')):.1f} | {t.get('confirm_s', float('nan')):.1f} | "
                         f"{t.get('guard_s', float('nan')):.1f} | {f'{g:.3f}' if g else '—'} |")
        if run.get("note"):
            lines += ["", run["note"]]
        lines.append("")
    return lines


def where_time_goes(e2e: dict[str, dict]) -> list[str]:
    run = json.loads((REPO / "benchmarks/results" / DEFAULT_E2E).read_text())
    t = run["timings"]
    host = t["search_s"] - t["measuring_s"] - t["compile_wait_s"]
    return ["## Where the time goes", "",
            ("Compiling a config (both GEMMs) costs about a second of one core and timing it 10–100 ms of GPU, so "
             "the tune keeps three kinds of work running at once (run/scheduler.py): a pool of compile processes "
             "compiles every batch size's claimed config and the search's likely next ones; the isolated measuring "
             "process times one config while the next waits queued behind it; and the tuning process records the "
             "last result and claims the next trial meanwhile. The builtin GEMM kernel does not specialize "
             "on batch-size-dependent arguments, so one binary serves all 18 batch sizes (an engine's own kernel "
             "does: its compiles are per batch size)."), "",
            (f"In the newest run with the defaults of its day (`{DEFAULT_E2E}`: {run['device']}, a config pair per "
             f"batch size, USE_TMA offered, {t['measured']:.0f} measurements, {t.get('compiled', 0):.0f} compiles) "
             f"the {run['wall_s']:.1f} s were: start-up {t['start_s']:.1f} s; the trial loop {t['search_s']:.1f} s, "
             f"of which it waited {t['measuring_s']:.1f} s for the GPU and {t['compile_wait_s']:.1f} s for compiles "
             f"and spent {host:.1f} s on its own work; re-measuring the close contenders {t['confirm_s']:.1f} s (with "
             f"each batch size's best pair in the same rounds); the correctness guard {t['guard_s']:.1f} s; export "
             f"{t['collect_export_s']:.1f} s; the rest is Python's imports before the tune starts"
             + (f" ({sum(run['imports'].values()):.1f} s in the script, {run['tune_call_s'] - run['tune_wall_s']:.1f} s "
                "in tune() before its own clock starts: its first imports of moe_opt's modules and optuna)"
                if "tune_call_s" in run else "")
             + (f". From the tune's start the measuring process was ready at {t['measurer_ready_s']:.1f} s (by its "
                f"own clock), got its first config at {t['first_submit_s']:.1f} s (when that one's compile had "
                f"finished) and was busy measuring {t['measurer_busy_s']:.1f} s in all; closing took "
                f"{t['close_s']:.1f} s" if "measurer_busy_s" in t else "") + "."), "",
            ("Where the loop's own work went, from a cProfile of a single-config tune (`--down-config off`) of the "
             "same model at 16 trials per batch size, two sessions ago "
             "(`benchmarks/results/profile/e2e_DeepSeek-V4-Flash_tp8_H200_16trials_cprofile.txt`, H200, 288 trials; "
             "cProfile slows Python down, so read shares, not seconds): of the profiled loop's 32.4 s, claiming "
             "trials took 16.3 s — creating each trial in SQLite 8.3 s, reading the study's running trials under the "
             "claim lock 2.9 s, the surrogate's proposals 2.5 s; compiling ahead 6.4 s (the surrogate's look-ahead "
             "3.4 s, reading every study's queued trials 2.6 s); recording results 3.5 s; waiting on the measuring "
             "process 9.5 s. Since then a trial is created in one SQLite transaction of plain INSERTs and finished in "
             "one (store/trial_writes.py; `benchmarks/trial_writes.py`: creating a trial 11.2 -> 1.2 ms, finishing "
             "one 5.8 -> 1.0 ms on the development machine)."), "",
            ("The default tune's cProfile (`python3 -m cProfile benchmarks/e2e_tune.py`, H200, 576 trials; "
             "`benchmarks/results/profile/e2e_DeepSeek-V4-Flash_tp8_H200_32trials_cprofile_5f7d1d8.txt`) then showed "
             "the loop waiting on the GPU for less than half its time: of 36.4 s, claims 16.7 s (reading the study "
             "under the lock 5.3 s, creating the trial 4.4 s of which 2.7 s was optuna.Trial reading it back, the "
             "surrogate's proposals 4.7 s), compiling ahead 9.8 s (look-ahead 5.1 s, reading every study's queued "
             "trials 4.4 s); the surrogate's predict() alone 7.3 s over 1,124 calls, its set-up 3.4 s (three search "
             "states of a pair tune, each building the same 2,496 x 2,496 similarity). Four changes followed, each "
             "measured: the search states share one geometry and predict from running sums per batch size "
             "(proposals bit-identical on 30 replayed tunes of the five tables; commit 3793395); the compile-ahead "
             "takes the queued configs from the claim's last read (3793395); a claimed trial is a small handle from "
             "the creating transaction, not an optuna.Trial (dadac4f). Profiled again at 3793395 "
             "(`..._cprofile_3793395.txt`): the loop's claims 14.7 s; predict() 0.5 s over 1,096 "
             "calls, the surrogate's whole proposal pool 2.3 s."), "",
            ("The steps to the newest run, each measured end to end on the H200 with the same command (32 trials, "
             "pair + TMA, cold cache; `benchmarks/results/pair/`): 87.1 s (commit 403f676); 86.6 s once the "
             "confirm step timed each contender as one whole call (`..._v2.json`); 71.6 s once the guard dequantized "
             "its reference experts once instead of once per checked config (`..._v3.json`); 74.2 s with the "
             "search's BLOCK_SIZE_M warm start and nearby incumbents (`..._v4.json`, 27249db; run-to-run noise of "
             "v3); 74.4 s with GEMM1's stage timed by events inside the whole call's graph (`..._v5.json`, 5f7d1d8: "
             "the loop's wait for measurements 16.2 -> 8.5 s, but the loop was then bound by its own Python, 37.8 "
             "s); 57.6 s with the CPU-side changes above (`..._v6.json`, 3793395: loop 28.7 s, re-measuring "
             "12.4 s, start-up 5.9 s); 66.1 and 58.8 s at dadac4f (`..._v7.json` on a freshly started machine, "
             "`..._v7b.json` right after on the same one: compile waits 8.9 vs 5.6 s, imports 10.6 vs 8.0 s, "
             "the rest alike); **43.5, 50.8 and 43.3 s** at bd5192a/72bbaa6 (the same code; `..._v8.json`, "
             "`..._v8b.json`, `..._v8c.json`, each on a freshly started machine): the early stop (11dafdf), the "
             "next graph captured during the running measurement, kept graphs for re-measuring, the pair re-measured "
             "in the same rounds as the single configs, and the wheels carried to the machine installed with their "
             "bytecode compiled, as pip does by default (they had been installed with --no-compile, and the profile "
             "showed 4.8 s of Python compiling their source). v8 against v7b: trial loop 30.8 -> 24.9 s (waits for "
             "the GPU 14.4 -> 9.0 s, for compiles 5.6 -> 7.5 s, the loop's own work 10.8 -> 8.4 s), re-measuring "
             "12.5 -> 7.6 s, before the tune (imports) 8.0 -> 6.0 s. v8b spent 3.6 s more in the loop (compile "
             "waits 8.9 s), 1.5 s more re-measuring and 1.5 s more before the tune; v8c's compile waits were 5.4 s, "
             "its loop 22.8 s. Geometric mean over SGLang's default 1.208x–1.218x in all of "
             "them; every guard passed."), "",
            ("The measuring process itself (`benchmarks/profile_measure.py --split-stages --configs 12 --batch-sizes "
             "1,64,1024,4096`, H200, DeepSeek-V4-Flash TP8, every config twice in the tune's order; "
             "`benchmarks/results/profile/profile_measure_prefetch_DeepSeek-V4-Flash_tp8_H200.json`, commit "
             "bd5192a): capturing the next measurement's graph while the running one's warm-up and first timed "
             "replay are on the GPU took a measurement from 43.9 to 31.7 ms (median of 48, the search's round), "
             "and a kept graph timed again from 34.0 to 25.9 ms (re-measuring's round); latency ratio new / old "
             "median 0.9997 (0.990–1.024, 96 measurements), GEMM1-stage ratio 0.9996. Earlier "
             "(`..._split_events_...json`, commit 5f7d1d8): timing GEMM1's stage by two events per call inside the "
             "whole call's graph instead of a second graph of its own took a pair tune's measurement from 64.4 to "
             "48.9 ms. The events add about 8 µs to every call (7.3 µs at M=1, where a call takes 50 µs: latency "
             "ratio 1.139; 9.8 µs at M=4096, ratio 1.008), the same for every config, so a pair tune's trial values "
             "shift and their order does not; the exported latencies and speedups come from re-measuring, which "
             "times whole calls without events."), "",
            ("2026-12-02: what the start of a tune waits for, and the lent machine's Python. A timeline in the "
             "tune's timings (from the tune's start: `measurer_ready_s`, when the measuring process had built its "
             "timer; `pool_ready_s`, the first compile worker; `first_result_s`) showed the trial loop waiting "
             "several seconds for the measuring process before its first measurement: 9.6–13.4 s after the tune "
             "started it was ready, its first result at 10.9–14.9 s, while the tune's own start-up took 4.4–5.7 s "
             "(`pair/as_lent/..._v9*.json`, commit b6bae62). The tuning process's cProfile "
             "(`profile/e2e_DeepSeek-V4-Flash_tp8_H200_32trials_cprofile_b6bae62.txt`) showed Python compiling "
             "1,724 modules from source (builtins.compile, 2.3 s): the lent machine sets PYTHONDONTWRITEBYTECODE=1 "
             "and its torch and Triton have no `__pycache__`, so each of a tune's 16 processes (the tuning process, "
             "the measuring process, 14 compile workers) compiles torch's source when it imports it. A pip-installed "
             "torch has its bytecode; the runs counted for goal 2 compile it once into PYTHONPYCACHEPREFIX before "
             "they start (`python3 -m compileall -j 16` over torch, Triton and the carried wheels, 3.7–5.7 s, outside "
             "the runs). `benchmarks/profile_start.py` (`profile/start_DeepSeek-V4-Flash_tp8_H200_*.json`, "
             "de1cd08) times the measuring process's steps from its spawn: as lent, torch imported at 3.7–3.9 s "
             "and the timer built at 4.3–4.4 s alone, 5.3 s beside the 14 compile workers starting; with the "
             "bytecode cached 2.1–2.4 and 2.4–2.7 s alone, 5.2 s beside the workers (torch at 3.4 s, then its CUDA "
             "context 0.5 s and the timer's build 1.2 s while 14 other processes make theirs). The same code with the "
             "bytecode cached: 37.1 and 39.0 s (de1cd08), then in two later device calls 54.6 s (the first run on a "
             "freshly started one: torch's files read from disk, the measuring process ready 12.5 s after the "
             "tune's start, compile waits 11.6 s), 42.0 and 43.3 s (e4dd411), 47.4, 42.3 and 45.8 s (64a3c6e); as "
             "lent 66.7 (freshly started), 51.1 and 47.6 s. In the bytecode-cached runs after the first on a "
             "machine the measuring process was ready 6.4–8.5 s after the tune's start, its first result back at "
             "7.4–9.7 s, the tune's own start-up 2.9–4.0 s; the loop then waited 4.5–7.5 s for compiles in all and "
             "re-measuring took 8.0–10.8 s. The same moe_opt code (de1cd08, e4dd411) took 37.1–39.0 s on one "
             "machine and 42.0–43.3 s on another after each one's first run, so each figure is one machine's."), "",
            ("Changes of this session measured there: the search's candidate geometry (every pair of 2,496 "
             "candidates) is built in blocks of int8 (13.5 -> 0.8 s on the 2-core development machine, the same "
             "values bit for bit); on the H200's host it had not been the start-up's bottleneck (start-up 4.0–4.3 s "
             "before, 4.4–4.7 s as lent after). The measuring process now starts before the tuning process reads "
             "the device's facts (its own CUDA context, about half a second); no change is visible within the "
             "spread above. Retiring the compile pool after the search (its workers exiting while the tune "
             "re-measures, instead of at the end) was tried at 64a3c6e and reverted: the tail after the result "
             "went about 2.5 -> 1.2 s and re-measuring 8.0–9.7 -> 8.9–10.8 s (runs on different machines; 14 processes "
             "tearing down their CUDA "
             "contexts while the contenders were timed), no gain and a disturbance of the latencies reported."), "",
            SESSION_9, "", NEXT_FOR_GOAL_2, ""]


SESSION_9 = (
    "2026-12-02, later: what the measuring process does with its time. New timings (TuneResult.timings): "
    "`measurer_ready_s` now by the measuring process's own clock (it had been when the tuning process first asked), "
    "`first_submit_s` (the first config handed to it: when that config's compile had finished), `measurer_busy_s` "
    "(its time in measurements) and `close_s`. At a3f025d (`pair/..._v12[a-d].json`, one machine) it was ready "
    "5.2–6.0 s after the tune's start, got its first config at 7.3–8.8 s and was busy 24.3–28.6 s of tunes of "
    "38.4–44.8 s: after its start it was the bottleneck. Closing no longer waits for the 14 compile workers and the "
    "measuring process to exit (their CUDA contexts' teardown; a compile not started is cancelled): `close_s` 0.0, "
    "where the script's wall clock had run about 2.6 s past the tune's own (`..._v10e.json`); what remains between "
    "them is the script's imports and tune()'s own first imports (`tune_call_s`). A cProfile of the measuring "
    "process through a whole tune (`e2e_tune.py --profile-measuring`, `benchmarks/measuring_profile.py`; "
    "`profile/measuring_process_DeepSeek-V4-Flash_tp8_H200_37edb8d.txt`): of 28.6 s profiled, 9.0 s waiting for the "
    "GPU (Event.synchronize), and 19 Triton compiles of its own (ptxas 1.6 s, code generation and LLVM about 2.6 s, "
    "on the path every measurement waits on). `benchmarks/measurer_compiles.py` named them "
    "(`profile/measurer_compiles_DeepSeek-V4-Flash_tp8_H200_fb125b3.json`): after the compile pool had compiled 13 "
    "configs, a process with the whole shape's inputs compiled `_count_kernel`, five `_offsets_kernel` (one per "
    "BLOCK_SIZE_M), `_scatter_kernel` and one `fused_moe_kernel`. The alignment's kernels specialize on the number "
    "of experts, and a compile worker, which holds the weights of topk experts only, had aligned as 6 experts where "
    "the tune aligns 256. The workers now align as the whole shape (fused_moe's `global_num_experts`, SGLang's and "
    "vLLM's name for it; KernelBackend.compile_inputs; 40d482a): the same benchmark then found one compile "
    "(`..._40d482a.json`), the pair, and the tune's profile 14 (`measuring_process_..._40d482a.txt`): re-measuring's "
    "best pairs, whose down config loads by TMA, so GEMM1 writes its output sorted, a binary neither config "
    "compiles alone. Those are now compiled in the pool while the single configs are re-measured (8cfb098). "
    "At 40d482a (`..._v14[a-c].json`, one machine): 40.4, 37.2, 38.8 s; the measuring process busy 21.2–23.2 s, its "
    "first config at 7.6–8.3 s, re-measuring 7.9–8.9 s; under the profile 41.1 s (`..._v14_profiled.json`). At "
    "5e19900 (the code of 8cfb098; `..._v15[a-c].json`, another machine, the next device call): 38.3, 32.5, 35.1 s; "
    "re-measuring 4.6–5.4 s, the measuring process busy 18.0–20.3 s, its first config at 7.6–8.1 s; under the "
    "profile (39.1 s, `profile/measuring_process_..._5e19900.txt`) no Triton compile of its own among its top "
    "functions (make_cubin had been 14 calls, 1.1 s) and re-measuring's 282 whole calls took 6.1 s (270 took 10.0 s "
    "at 40d482a). Geometric mean over SGLang's default 1.217x–1.223x in these runs; every guard passed.")

NEXT_FOR_GOAL_2 = (
    "What is left on the critical path: the first compiles (the first config reaches the measuring process 7–8 s "
    "after the tune's start, while it is ready at about 5.5 s: 14 workers importing torch and making CUDA contexts "
    "at once, then each compiling the shared kernels before its config); the measuring process's own work between "
    "GPU waits (about 60% of its busy time under the profile: capturing graphs, Triton's launch overhead, loading "
    "binaries); and, for the lent machine's Python, torch compiled from source in every process.")


if __name__ == "__main__":
    sys.exit(main())

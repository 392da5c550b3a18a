"""The engine's own fused-MoE kernel beside moe_opt's builtin at the same configs, per batch size (GPU).

    PYTHONPATH=. python benchmarks/engine_parity.py --model Qwen/Qwen3-30B-A3B --tp 1 --engine vllm \\
        --engine-source .engines/vllm --batch-sizes 1,8,64,256,1024,4096 --sample 16 --rounds 3 \\
        --json benchmarks/results/parity_vllm_Qwen3-30B-A3B_tp1_H200.json

Two engine paths, recorded in the JSON as ``path``:

- ``fused_experts``: the installed engine's whole ``fused_experts`` under its ``override_config``
  (kernel/engines.py). Taken with ``--path full``, or by ``--path auto`` (the default) when the engine imports.
- ``engine_kernel``: the engine's own Triton GEMM kernel and launch function (SGLang ``invoke_fused_moe_kernel``;
  vLLM ``invoke_fused_moe_triton_kernel`` with its tiny-batch and grid-trimming rules) for both GEMMs, loaded from
  the engine's files in ``--engine-source`` (benchmarks/carry_engines.py builds it from the wheel), inside
  moe_opt's alignment, activation and sum (kernel/engine_kernels.py). Taken with ``--path kernel``, or by ``auto``
  when the engine does not import (the import error is recorded). What the loader replaced is recorded too.
  docs/engines.md says why the full path cannot run without the engine's compiled ops.

For each batch size: the engine's default config, the engine's shipped tuned file's entry nearest M (found as the
engine finds it, run/lookup.py: in the source folder or the installed engine), the entry nearest M of each
``--tuned`` file, and ``--sample`` configs drawn once (seeded) from the candidate grid and used at every batch
size (one compile serves several batch sizes). Each is timed ``--rounds`` times, interleaved, with the tuner's
CUDA-graph timer, once through the engine and once through the builtin launched by the engine's rules
(``get_backend("builtin", target=ENGINE)``). Written per batch size: both medians of every config, the ratio
builtin/engine (median and worst), the Spearman rank correlation of the two orders, and the engine's time of the
tuned file against its shipped file and its default. A failed config is recorded with its reason, never averaged.

Compiling dominates: the engines' kernels specialize on batch-size-dependent ints, so each config compiles again
for several batch sizes. ``--warmup-only --shard I/N`` runs every call once without timing (shard I of N of the
configs), filling Triton's on-disk cache; run N shards in parallel first, then the timed run compiles nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else math.nan


def nearest_entry(path: str | Path, M: int):
    """The entry of a tuned file an engine runs at batch size M: the key nearest M (both engines' rule), as
    (Config, None), or (None, why) where moe_opt's Config cannot hold it (vLLM ships BLOCK_SIZE_M 8 for fp8)."""
    from moe_opt import Config

    data = json.loads(Path(path).read_text())
    if "per_batch_size" in data:  # a benchmarks/e2e_tune.py result: the tuned config per batch size
        table = {int(r["M"]): r["config"] for r in data["per_batch_size"]}
    else:
        table = {int(k): v for k, v in data.items() if k.isdigit()}
    entry = table[min(table, key=lambda m: abs(m - M))]
    try:
        return Config.from_dict(entry), None
    except ValueError as e:
        return None, f"{entry}: {e}"


def engine_backend(args):
    """(backend, path, why_not_full): the installed engine's fused_experts, or its kernel from --engine-source."""
    from moe_opt.errors import TuneError
    from moe_opt.kernel.backend import get_backend

    why_not_full = None
    if args.path in ("full", "auto"):
        try:
            return get_backend(args.engine), "fused_experts", None
        except TuneError as e:
            if args.path == "full":
                raise
            why_not_full = str(e)
    if not args.engine_source:
        raise TuneError(f"the {args.engine} engine does not import ({why_not_full}); give --engine-source (a folder "
                        "benchmarks/carry_engines.py built) to time its kernel inside moe_opt's pipeline")
    return get_backend(f"{args.engine}-kernel={args.engine_source}"), "engine_kernel", why_not_full


def shipped_file(engine, path, spec, device_name):
    """The tuned file the engine ships for spec on this device (run/lookup.py's search), or None."""
    import triton

    from moe_opt.run.lookup import engine_files

    if path == "engine_kernel":  # only the source folder: the engine is not installed
        root = engine.source.configs_dir
        found = [f for f in engine_files(spec, device_name, engine.target, config_dirs=[root],
                                         triton_version=triton.__version__) if root in f.path.parents]
        return (found[0].path, f"shipped in {engine.source.root.name} {engine.version}") if found else None
    found = engine_files(spec, device_name, engine.target, triton_version=triton.__version__)
    return (found[0].path, found[0].where) if found else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", default=None)
    p.add_argument("--engine", choices=("sglang", "vllm"), required=True)
    p.add_argument("--path", choices=("auto", "full", "kernel"), default="auto")
    p.add_argument("--engine-source", help="folder of the engine's files (benchmarks/carry_engines.py)")
    p.add_argument("--batch-sizes", default="1,8,64,256,1024,4096")
    p.add_argument("--sample", type=int, default=16, help="grid configs drawn once, timed at every batch size")
    p.add_argument("--tuned", action="append", default=[],
                   help="a tuned config file (SGLang/vLLM JSON, or a benchmarks/e2e_tune.py result)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-only", action="store_true", help="run each call once, untimed (fills Triton's cache)")
    p.add_argument("--shard", default="0/1", help="I/N: with --warmup-only, the I-th of N shares of the configs")
    p.add_argument("--json")
    args = p.parse_args()
    if not args.warmup_only and not args.json:
        p.error("--json is required unless --warmup-only")

    import torch
    import triton

    from moe_opt.kernel.backend import get_backend
    from moe_opt.measure.cuda_graph import CudaGraphTimer
    from moe_opt.model.resolve import resolve_model

    spec = resolve_model(args.model, tp_size=args.tp, dtype=args.dtype or "auto")
    engine, path, why_not_full = engine_backend(args)  # a missing engine and no source folder stops here
    builtin = get_backend("builtin", target=args.engine)
    why = engine.unsupported(spec) or builtin.unsupported(spec)
    if why:
        print(f"engine_parity: {why}", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name()
    timers = {"engine": CudaGraphTimer(spec, backend=engine), "builtin": CudaGraphTimer(spec, backend=builtin)}
    smem = timers["builtin"].info.shared_memory_bytes
    pool = [c for c in builtin.candidates(spec, smem) if builtin.screen(spec, c, smem) is None]
    grid = random.Random(args.seed).sample(pool, min(args.sample, len(pool)))
    shipped = shipped_file(engine, path, spec, device_name)
    batch_sizes = [int(m) for m in args.batch_sizes.split(",")]

    def configs_at(M):
        configs, skipped = {"default": engine.default_config(spec, M)}, {}
        named = ([("shipped", shipped[0])] if shipped else []) + [(f"tuned{i}", f) for i, f in enumerate(args.tuned)]
        for name, file in named:
            configs[name], why = nearest_entry(file, M)
            if why:
                del configs[name]
                skipped[name] = why
        configs.update({f"grid{i}": c for i, c in enumerate(grid)})
        return configs, skipped

    if args.warmup_only:
        shard, shards = (int(v) for v in args.shard.split("/"))
        t0, runs, failed = time.perf_counter(), 0, 0
        for M in batch_sizes:
            distinct = sorted(set(configs_at(M)[0].values()), key=str)
            for config in distinct[shard::shards]:
                for side, timer in timers.items():
                    try:
                        timer.backend.call(timer.inputs, config, M)
                        torch.cuda.synchronize()
                    except Exception as e:  # noqa: BLE001 - a failure is recorded where it is timed
                        failed += 1
                        print(f"warmup {side} {config} M={M}: {type(e).__name__}", file=sys.stderr)
                    runs += 1
        print(f"warmup {args.engine} {args.model} shard {args.shard}: {runs} calls ({failed} failed) in "
              f"{time.perf_counter() - t0:.0f} s")
        return 0

    t0 = time.perf_counter()
    rows = []
    for M in batch_sizes:
        configs, skipped = configs_at(M)
        times = {(k, side): [] for k in configs for side in timers}
        errors = {}
        for _ in range(args.rounds):
            for name, config in configs.items():
                for side, timer in timers.items():
                    m = timer.measure(config, M)
                    if m.ok:
                        times[name, side].append(m.latency_us)
                    else:
                        errors[f"{name}/{side}"] = m.error
        per_config, ratios, xs, ys = [], [], [], []
        for name, config in configs.items():
            e, b = times[name, "engine"], times[name, "builtin"]
            entry = {"name": name, "config": config.to_dict(),
                     "engine_us": statistics.median(e) if e else None,
                     "builtin_us": statistics.median(b) if b else None}
            if e and b:
                entry["ratio"] = entry["builtin_us"] / entry["engine_us"]
                ratios.append(entry["ratio"])
                xs.append(entry["engine_us"])
                ys.append(entry["builtin_us"])
            per_config.append(entry)
        worst = max(ratios, key=lambda r: abs(math.log(r))) if ratios else None
        engine_us = {c["name"]: c["engine_us"] for c in per_config}
        compare = {}
        for tuned in (n for n in engine_us if n.startswith("tuned")):
            for base in ("shipped", "default"):
                if engine_us.get(tuned) and engine_us.get(base):
                    compare[f"{tuned}_vs_{base}"] = engine_us[tuned] / engine_us[base]
        if engine_us.get("shipped") and engine_us.get("default"):
            compare["shipped_vs_default"] = engine_us["shipped"] / engine_us["default"]
        rows.append({"M": M, "configs": per_config, "errors": errors, "skipped": skipped,
                     "median_ratio": statistics.median(ratios) if ratios else None, "worst_ratio": worst,
                     "spearman": spearman(xs, ys) if len(xs) > 2 else None,
                     "engine_time_ratios": compare})
        print(f"M={M}: builtin/engine median {rows[-1]['median_ratio']}, worst {worst}, "
              f"Spearman {rows[-1]['spearman']}; {compare}", flush=True)

    record = {"command": " ".join([Path(sys.executable).name] + sys.argv), "model": args.model, "tp_size": args.tp,
              "spec": spec.to_dict(), "engine": args.engine, "engine_version": engine.version, "path": path,
              "why_not_fused_experts": why_not_full,
              "engine_source": engine.source.record() if path == "engine_kernel" else None,
              "shipped_file": f"{shipped[0]} ({shipped[1]})" if shipped else None, "tuned_files": args.tuned,
              "builtin": f"{builtin.name}@{builtin.version}", "device": device_name,
              "triton": triton.__version__, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "rounds": args.rounds, "seed": args.seed, "sample": args.sample, "wall_s": time.perf_counter() - t0,
              "per_batch_size": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

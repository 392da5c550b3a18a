"""What a skewed routing does to the tuned configs, timed in one process on one card.

    PYTHONPATH=. python benchmarks/compare_routing.py --uniform e2e_uniform.json --skewed e2e_zipf.json \\
        --json benchmarks/results/routing_DeepSeek-V4-Flash_tp8_H200.json

Reads two records of benchmarks/e2e_tune.py for one model, tuned with ``--routing uniform`` and with a skewed
routing (e.g. ``--routing zipf1.2``), and, per batch size, times SGLang's default, the uniform tune's config and
the skewed tune's config (each tune's single config for both GEMMs: what vLLM runs, and what SGLang runs without a
``_down`` file), under both routings, ``--rounds`` times interleaved with the tuner's CUDA-graph timer. Writes the
medians and, per routing, the skewed tune's speedup over the uniform tune's config: how much a tune on uniform
routing leaves on the table when the served routing is skewed (and the reverse), and how often the two tunes
picked the same config.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--uniform", required=True, help="e2e_tune.py record with --routing uniform")
    p.add_argument("--skewed", required=True, help="e2e_tune.py record with a skewed --routing (zipf<s>)")
    p.add_argument("--json", required=True)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    uniform, skewed = (json.loads(Path(f).read_text()) for f in (args.uniform, args.skewed))

    import torch
    import triton

    from moe_opt import Config
    from moe_opt.measure.cuda_graph import CudaGraphTimer
    from moe_opt.model.routing import RoutingSpec
    from moe_opt.model.spec import ModelSpec
    from moe_opt.space import default_config

    spec = ModelSpec.from_dict(skewed["spec"])
    routings = {"uniform": "uniform", "skewed": skewed["routing"]}
    timers = {name: CudaGraphTimer(spec, routing=RoutingSpec.parse(words)) for name, words in routings.items()}
    tuned = {name: {row["M"]: Config.from_dict(row["config"]) for row in record["per_batch_size"]}
             for name, record in (("uniform", uniform), ("skewed", skewed))}
    rows = []
    for M in sorted(set(tuned["uniform"]) & set(tuned["skewed"])):
        configs = {"default": default_config(M, spec.E, spec.dtype, spec.block_shape),
                   "uniform_tuned": tuned["uniform"][M], "skewed_tuned": tuned["skewed"][M]}
        times = {(c, r): [] for c in configs for r in timers}
        for _ in range(args.rounds):
            for c, config in configs.items():
                for r, timer in timers.items():
                    m = timer.measure(config, M)
                    if m.ok:
                        times[c, r].append(m.latency_us)
        med = {f"{c}_us_{r}": statistics.median(v) if v else math.nan for (c, r), v in times.items()}
        row = {"M": M, "uniform_tuned": str(configs["uniform_tuned"]), "skewed_tuned": str(configs["skewed_tuned"]),
               "same_config": configs["uniform_tuned"] == configs["skewed_tuned"], **med}
        for r in timers:  # >1: the skewed tune's config is faster under routing r
            row[f"skewed_vs_uniform_tuned_{r}"] = med[f"uniform_tuned_us_{r}"] / med[f"skewed_tuned_us_{r}"]
        row["skewed_slowdown"] = med["uniform_tuned_us_skewed"] / med["uniform_tuned_us_uniform"]
        rows.append(row)
        print(f"M={M}: under {routings['skewed']}: uniform-tuned {med['uniform_tuned_us_skewed']:.1f} us, "
              f"skewed-tuned {med['skewed_tuned_us_skewed']:.1f} us ({row['skewed_vs_uniform_tuned_skewed']:.3f}x)"
              f"{' (same config)' if row['same_config'] else ''}", flush=True)

    def geomean(key):
        values = [r[key] for r in rows if r[key] == r[key]]
        return math.exp(sum(map(math.log, values)) / len(values)) if values else None

    record = {"command": " ".join([Path(sys.executable).name] + sys.argv), "model": skewed["model"],
              "tp_size": skewed["tp_size"], "spec": skewed["spec"], "routing": routings["skewed"],
              "device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds,
              "uniform_wall_s": uniform["wall_s"], "skewed_wall_s": skewed["wall_s"],
              "same_config": sum(r["same_config"] for r in rows), "batch_sizes": len(rows),
              "geomean_skewed_vs_uniform_tuned_skewed": geomean("skewed_vs_uniform_tuned_skewed"),
              "geomean_skewed_vs_uniform_tuned_uniform": geomean("skewed_vs_uniform_tuned_uniform"),
              "geomean_skewed_slowdown": geomean("skewed_slowdown"), "per_batch_size": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"under {routings['skewed']}, the skewed tune's configs vs the uniform tune's: geometric mean "
          f"{record['geomean_skewed_vs_uniform_tuned_skewed']:.3f}x; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

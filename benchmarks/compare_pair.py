"""The config pair against the single config, timed in one process on one card: the issue's headline.

    PYTHONPATH=. python benchmarks/compare_pair.py --single e2e_single.json --pair e2e_pair.json \\
        --json benchmarks/results/pair_DeepSeek-V4-Flash_tp8_H200.json

Reads two records of benchmarks/e2e_tune.py for one model (``--down-config off`` and ``on``), optionally a third
(``--pair-tma``: ``--down-config on`` with USE_TMA offered, where the pair record was made with ``--tma off``), and,
per batch size, times SGLang's default, the single tune's config (for both GEMMs) and each pair tune's (up, down)
pair with the tuner's CUDA-graph timer, ``--rounds`` times interleaved (drift hits all alike); writes the medians,
each pair's speedup over the single config and over the default, their geometric means, and the tunes' wall
times.
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
    p.add_argument("--single", required=True, help="e2e_tune.py record with --down-config off")
    p.add_argument("--pair", required=True, help="e2e_tune.py record with --down-config on")
    p.add_argument("--pair-tma", default=None, help="e2e_tune.py record with --down-config on and USE_TMA offered")
    p.add_argument("--json", required=True)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    single, pair = (json.loads(Path(f).read_text()) for f in (args.single, args.pair))
    pair_tma = json.loads(Path(args.pair_tma).read_text()) if args.pair_tma else None

    import torch
    import triton

    from moe_opt import Config
    from moe_opt.measure.cuda_graph import CudaGraphTimer
    from moe_opt.model.spec import ModelSpec
    from moe_opt.space import ConfigPair, default_config

    spec = ModelSpec.from_dict(pair["spec"])
    timer = CudaGraphTimer(spec)
    single_best = {row["M"]: Config.from_dict(row["config"]) for row in single["per_batch_size"]}
    rows = []
    for M_text, p_entry in sorted(pair["pairs"].items(), key=lambda kv: int(kv[0])):
        M = int(M_text)
        candidates = {"default": default_config(M, spec.E, spec.dtype, spec.block_shape), "single": single_best[M],
                      "pair": ConfigPair(Config.from_dict(p_entry["up"]), Config.from_dict(p_entry["down"]))}
        t_entry = (pair_tma or {}).get("pairs", {}).get(M_text)
        if t_entry:
            candidates["pair_tma"] = ConfigPair(Config.from_dict(t_entry["up"]), Config.from_dict(t_entry["down"]))
        times: dict[str, list[float]] = {k: [] for k in candidates}
        for _ in range(args.rounds):
            for name, config in candidates.items():
                m = timer.measure(config, M)
                if m.ok:
                    times[name].append(m.latency_us)
        med = {k: statistics.median(v) if v else math.nan for k, v in times.items()}
        rows.append({"M": M, "default_us": med["default"], "single_us": med["single"], "pair_us": med["pair"],
                     "single": str(candidates["single"]), "pair": str(candidates["pair"]),
                     "pair_differs": candidates["pair"].up != candidates["pair"].down,
                     "pair_vs_single": med["single"] / med["pair"], "pair_vs_default": med["default"] / med["pair"]})
        if "pair_tma" in candidates:
            rows[-1].update(pair_tma_us=med["pair_tma"], pair_tma=str(candidates["pair_tma"]),
                            pair_tma_uses_tma=candidates["pair_tma"].up.USE_TMA or candidates["pair_tma"].down.USE_TMA,
                            pair_tma_vs_single=med["single"] / med["pair_tma"],
                            pair_tma_vs_pair=med["pair"] / med["pair_tma"])
        print(f"M={M}: default {med['default']:.1f} single {med['single']:.1f} pair {med['pair']:.1f} us "
              f"({rows[-1]['pair_vs_single']:.3f}x)", flush=True)

    def geomean(key):
        values = [r[key] for r in rows if key in r and r[key] == r[key]]
        return math.exp(sum(map(math.log, values)) / len(values)) if values else None

    record = {"command": " ".join([Path(sys.executable).name] + sys.argv), "model": pair["model"],
              "tp_size": pair["tp_size"], "spec": pair["spec"], "device": torch.cuda.get_device_name(),
              "triton": triton.__version__, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "rounds": args.rounds, "single_wall_s": single["wall_s"], "pair_wall_s": pair["wall_s"],
              "routing": pair.get("routing", "uniform"), "geomean_pair_vs_single": geomean("pair_vs_single"),
              "geomean_pair_vs_default": geomean("pair_vs_default"),
              "pair_tma_wall_s": pair_tma["wall_s"] if pair_tma else None,
              "geomean_pair_tma_vs_single": geomean("pair_tma_vs_single"),
              "geomean_pair_tma_vs_pair": geomean("pair_tma_vs_pair"), "per_batch_size": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"pair vs single: geometric mean {record['geomean_pair_vs_single']:.3f}x; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Goal 3 of the performance issue: a model's TP sweep in one command on one GPU, cold Triton cache.

    PYTHONPATH=. python benchmarks/e2e_sweep.py --model deepseek-ai/DeepSeek-V4-Flash --tp-sizes 1,2,4,8 \\
        --json benchmarks/results/sweep_DeepSeek-V4-Flash_H200.json

Points TRITON_CACHE_DIR at a new empty directory before Triton is imported, runs ``moe_opt.sweep`` (all 18 batch
sizes per shape, tune()'s defaults otherwise) with its studies and files in a new directory, and writes a JSON
record: the wall time from this script's start, and per shape its tune's wall time, timings, geometric-mean
speedup over SGLang's default and the tuned config and latencies per batch size; with card, versions and command.
"""

from __future__ import annotations

import time

STARTED = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deepseek-ai/DeepSeek-V4-Flash")
    p.add_argument("--tp-sizes", default="1,2,4,8")
    p.add_argument("--n-trials", type=int, default=None, help="tune()'s n_trials (default: its default)")
    p.add_argument("--down-config", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    from python_env import bytecode_state  # benchmarks/, beside this script

    bytecode = bytecode_state()
    work = Path(tempfile.mkdtemp(prefix="moe_opt_sweep_"))
    os.environ["TRITON_CACHE_DIR"] = str(work / "triton_cache")  # empty, before Triton is imported
    os.chdir(work)

    import torch
    import triton

    import moe_opt

    tps = [int(t) for t in args.tp_sizes.split(",")]
    down_config = {"auto": None, "on": True, "off": False}[args.down_config]
    out = moe_opt.sweep(args.model, tp_sizes=tps, n_trials=args.n_trials, down_config=down_config)
    wall_s = time.time() - STARTED
    shapes = []
    for (tp, dtype), r in out.results.items():
        shapes.append({"tp_size": tp, "dtype": dtype, "spec": r.spec.to_dict(), "tune_wall_s": round(r.wall_s, 1),
                       "timings": {k: round(v, 2) for k, v in r.timings.items()},
                       "geomean_speedup": r.geomean_speedup(), "trials": r.trials_used,
                       "per_batch_size": [{"M": M, "config": r.best[M], "us": r.latency_us[M],
                                           "default_us": r.default_latency_us.get(M)} for M in sorted(r.best)],
                       "pairs": r.pairs})
    record = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "model": args.model,
              "tp_sizes": tps, "device": torch.cuda.get_device_name(), "cpu_cores": os.cpu_count(),
              "triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
              "date": time.strftime("%Y-%m-%d"), "wall_s": round(wall_s, 1), "sweep_wall_s": round(out.wall_s, 1),
              "down_config": args.down_config, "commit": os.environ.get("MOE_OPT_COMMIT"), "python_bytecode": bytecode,
              "shapes": shapes}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"sweep wall {wall_s:.1f} s from the script's start; wrote {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

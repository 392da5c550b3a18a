"""Where a measurement's time goes in the measuring process, and what the timer's changes bought (GPU).

    PYTHONPATH=. python benchmarks/profile_measure.py --json $OUT/profile_measure.json --profile $OUT/measure.txt

A tune's measuring process times its configs round-robin over the batch sizes, each config once per batch size,
most of them for the first time in that process; re-measuring then times the close contenders again. This compiles
``--configs`` sampled candidates of the shape in a compile pool (cold Triton cache, as a tune), then measures them
in the tune's order, every config twice (round 0 as the search, round 1 as re-measuring), with two timers on the
same GPU, one after the other: the timer as it was (``WasTimer``: every measurement captures its graph, after the
last one's replays, up to commit 70e5ce7), then ``CudaGraphTimer`` as it is (each measurement told the next, whose
graph it captures while its own first replays run; graphs kept to be timed again). It records the wall time per
measurement of each round, the ratios of their latencies and of their GEMM1-stage times (the same GPU work should
time the same), and a cProfile of the current one. (Earlier records in benchmarks/results/profile/ compared older
baselines: ``torch.cuda.graph`` around each capture, or GEMM1's stage in a second graph; their JSON says which commit
ran; their "first"/"again" split the first measurement of a config in the process from the others.)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deepseek-ai/DeepSeek-V4-Flash")
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--batch-sizes", default="1,16,64,256,1024,4096")
    p.add_argument("--configs", type=int, default=24)
    p.add_argument("--split-stages", action="store_true", help="time GEMM1's stage too, as a pair tune does")
    p.add_argument("--json", required=True)
    p.add_argument("--profile", help="cProfile text of the current timer's measurements")
    args = p.parse_args()
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="moe_opt_profile_"))

    import torch
    import triton

    from moe_opt.kernel.backend import get_backend
    from moe_opt.measure.compile_pool import CompilePool
    from moe_opt.measure.cuda_graph import CudaGraphTimer, cuda_graph_info
    from moe_opt.model.resolve import resolve_model

    class WasTimer(CudaGraphTimer):
        """The timer before it captured the next measurement's graph during the running one and kept graphs (up to
        commit 70e5ce7): every measurement captures its own graph, with an eager call on the default stream and a
        device synchronize before the warm-up call on the capture stream, and nothing is kept."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._pool.kept = 0

        def _capture(self, config, M, split, after=None):
            self.backend.call(self.inputs, config, M)
            torch.cuda.synchronize()
            return super()._capture(config, M, split)

    spec = resolve_model(args.model, tp_size=args.tp)
    batch_sizes = [int(m) for m in args.batch_sizes.split(",")]
    info = cuda_graph_info()
    backend = get_backend("builtin")
    pool_configs = backend.candidates(spec, info.shared_memory_bytes, tma=info.tma)
    configs = random.Random(0).sample(pool_configs, args.configs)
    t0 = time.perf_counter()
    with CompilePool(spec) as pool:
        failures = pool.compile(configs)
    compile_s = time.perf_counter() - t0
    configs = [c for c in configs if failures[c] is None]
    print(f"{len(configs)} configs compiled in {compile_s:.1f} s", flush=True)

    # One timer after the other (the old one empties the allocator's cache, which would cost the other too), the
    # same measurements in the same order: round-robin over the batch sizes, every config twice.
    order = [(rnd, c, M) for rnd in range(2) for c in configs for M in batch_sizes]
    walls: dict[str, dict[str, list[float]]] = {}
    latencies: dict[str, list] = {}
    ups: dict[str, list] = {}
    profiler = cProfile.Profile()
    errors: dict[str, str] = {}
    for name, make in (("was", WasTimer), ("now", CudaGraphTimer)):
        timer = make(spec, split_stages=args.split_stages)
        walls[name], latencies[name], ups[name] = {"search": [], "again": []}, [], []
        for i, (rnd, c, M) in enumerate(order):
            upcoming = (lambda i=i: order[i + 1][1:] if i + 1 < len(order) else None) if name == "now" else None
            t = time.perf_counter()
            if name == "now":
                profiler.enable()
            m = timer.measure(c, M, upcoming=upcoming)
            if name == "now":
                profiler.disable()
            walls[name]["again" if rnd else "search"].append((time.perf_counter() - t) * 1e3)
            latencies[name].append(m.latency_us)
            ups[name].append(m.attrs.get("up_us"))
            if m.error and name not in errors:
                errors[name] = m.error
                print(f"{name}: {c} at M={M} failed: {m.error}", flush=True)
        del timer
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    def ratio_summary(now: list, was: list) -> dict:
        ratios = [a / b for a, b in zip(now, was) if a and b] or [float("nan")]
        return {"median": round(statistics.median(ratios), 4), "min": round(min(ratios), 4),
                "max": round(max(ratios), 4), "n": len(ratios)}

    rows = [{"round": rnd, "config": c.to_dict(), "M": M, "was_us": w, "now_us": n, "was_up_us": wu, "now_up_us": nu}
            for (rnd, c, M), w, n, wu, nu in zip(order, latencies["was"], latencies["now"], ups["was"], ups["now"])]
    summary = {name: {kind: {"n": len(v), "median_ms": round(statistics.median(v), 2),
                             "total_s": round(sum(v) / 1e3, 2)} for kind, v in w.items() if v}
               for name, w in walls.items()}
    record = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "spec": spec.to_dict(),
              "device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__,
              "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d"),
              "commit": os.environ.get("MOE_OPT_COMMIT"), "split_stages": args.split_stages,
              "configs": len(configs), "batch_sizes": batch_sizes, "compile_s": round(compile_s, 1),
              "wall_per_measurement": summary,
              "latency_ratio_now_over_was": ratio_summary(latencies["now"], latencies["was"]),
              "up_us_ratio_now_over_was": ratio_summary(ups["now"], ups["was"]),
              "first_errors": errors, "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 2), "rows": rows}
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k not in ("rows", "spec")}, indent=1), flush=True)
    if args.profile:
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(30)
        Path(args.profile).write_text(text.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())

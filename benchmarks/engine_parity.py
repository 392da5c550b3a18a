"""The engine's own fused-MoE kernel beside moe_opt's builtin at the same configs, per batch size (GPU; not yet run).

    PYTHONPATH=. python benchmarks/engine_parity.py --model Qwen/Qwen3-30B-A3B --tp 1 --engine vllm \\
        --batch-sizes 1,2,4,16,64,256,1024 --sample 24 --tuned moe_configs/configs/.../E=128,N=768,...json \\
        --json benchmarks/results/parity_vllm_Qwen3-30B-A3B_tp1_H200.json

For each batch size: the engine's default, every config of a tuned file given with ``--tuned`` (its entry nearest
M, as the engines pick it) and ``--sample`` configs drawn from the candidate grid (seeded), each timed ``--rounds``
times, interleaved, with the tuner's CUDA-graph timer (L2 flushed, ``calls_per_graph`` routing draws), once through
the engine backend (kernel/engines.py: the engine's ``fused_experts`` inside its ``override_config``) and once
through the builtin launched by the engine's rules (``get_backend("builtin", target=ENGINE)``). Written per batch
size: both medians of every config, the ratio builtin/engine (median and worst), and the Spearman rank correlation
of the two orders (what the tuner relies on: the builtin ranks configs as the engine would). A failed config
(an engine assertion, out of resources) is recorded with its reason, never averaged.

What the GPU machine needs besides moe_opt, torch and Triton: the engine itself, at a version of
kernel/engines.py's *_KNOWN_VERSIONS (SGLang 0.5.23; vLLM 0.33.0). Without network there, carry its wheel:
``pip download --no-deps sglang==0.5.23`` (or ``vllm==0.33.0``) here and ``pip install --no-deps`` it there, with the
few packages its import chain of fused_experts needs (sgl-kernel for SGLang's moe_align_block_size and silu_and_mul;
vLLM's compiled _C ops ship in its wheel, built for one torch release: install the torch it names). Nothing of the
engine's kernel code path may be replaced, stubbed or monkeypatched (a missing import is installed, never faked):
the point is to time the engine's own code. The engine runs its own Triton JIT against the same Triton; record
both versions (the JSON does).
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


def tuned_configs(path: str, M: int):
    from moe_opt import Config

    table = {int(k): v for k, v in json.loads(Path(path).read_text()).items() if k.isdigit()}
    return Config.from_dict(table[min(table, key=lambda m: abs(m - M))])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", default=None)
    p.add_argument("--engine", choices=("sglang", "vllm"), required=True)
    p.add_argument("--batch-sizes", default="1,2,4,8,16,64,256,1024")
    p.add_argument("--sample", type=int, default=24, help="grid configs drawn per batch size")
    p.add_argument("--tuned", action="append", default=[], help="a tuned config file (SGLang/vLLM JSON)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True)
    args = p.parse_args()

    import torch
    import triton

    from moe_opt.kernel.backend import get_backend
    from moe_opt.measure.cuda_graph import CudaGraphTimer
    from moe_opt.model.resolve import resolve_model

    spec = resolve_model(args.model, tp_size=args.tp, dtype=args.dtype or "auto")
    engine = get_backend(args.engine)  # a missing engine stops here, with the package and versions to install
    builtin = get_backend("builtin", target=args.engine)
    why = engine.unsupported(spec) or builtin.unsupported(spec)
    if why:
        print(f"engine_parity: {why}", file=sys.stderr)
        return 2
    timers = {"engine": CudaGraphTimer(spec, backend=engine), "builtin": CudaGraphTimer(spec, backend=builtin)}
    smem = timers["builtin"].info.shared_memory_bytes
    pool = [c for c in builtin.candidates(spec, smem) if builtin.screen(spec, c, smem) is None]
    rng = random.Random(args.seed)
    rows = []
    for M in (int(m) for m in args.batch_sizes.split(",")):
        configs = {"default": engine.default_config(spec, M)}
        configs.update({f"tuned{i}": tuned_configs(f, M) for i, f in enumerate(args.tuned)})
        configs.update({f"grid{i}": c for i, c in enumerate(rng.sample(pool, min(args.sample, len(pool))))})
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
        rows.append({"M": M, "configs": per_config, "errors": errors,
                     "median_ratio": statistics.median(ratios) if ratios else None, "worst_ratio": worst,
                     "spearman": spearman(xs, ys) if len(xs) > 2 else None})
        print(f"M={M}: builtin/engine median {rows[-1]['median_ratio']}, worst {worst}, "
              f"Spearman {rows[-1]['spearman']}", flush=True)

    record = {"command": " ".join([Path(sys.executable).name] + sys.argv), "model": args.model, "tp_size": args.tp,
              "spec": spec.to_dict(), "engine": args.engine, "engine_version": engine.version,
              "builtin": f"{builtin.name}@{builtin.version}", "device": torch.cuda.get_device_name(),
              "triton": triton.__version__, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "rounds": args.rounds, "seed": args.seed, "per_batch_size": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

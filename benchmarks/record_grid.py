"""Record a full-grid replay table on the GPU: every config of SGLang's space at several batch sizes.

    python benchmarks/record_grid.py --model deepseek-ai/DeepSeek-V4-Flash --tp 8 \
        --batch-sizes 1,16,64,256,1024,4096 --out moe_opt/data/DeepSeek-V4-Flash_tp8_H100.csv

Compiles the whole grid first in a process pool (nothing screened out: the table records which configs fail
and why, which calibrates the shared-memory estimate), then times every config that compiled with the
CUDA-graph timer. Writes the CSV table plus a JSON sidecar with the spec, device and versions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

from moe_opt import space
from moe_opt.compile import CompilePool
from moe_opt.measure import CudaGraphTimer
from moe_opt.spec import ModelSpec
from moe_opt.table import write_table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--shape", help="explicit E,topk,K,intermediate[,dtype[,block_n,block_k]] instead of --model")
    p.add_argument("--swiglu-limit", type=float, default=None)
    p.add_argument("--batch-sizes", default="1,16,64,256,1024,4096")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="only the first N grid configs (a pilot run)")
    args = p.parse_args()

    if args.model:
        from moe_opt.models import resolve_model

        spec = resolve_model(args.model, tp_size=args.tp)
    else:
        parts = args.shape.split(",")
        E, topk, K, inter = map(int, parts[:4])
        dtype = parts[4] if len(parts) > 4 and parts[4] not in ("", "bf16") else None
        block = [int(parts[5]), int(parts[6])] if len(parts) > 6 else None
        spec = ModelSpec.from_shape(num_experts=E, topk=topk, hidden_size=K, intermediate_size=inter,
                                    dtype=dtype, block_shape=block, tp_size=args.tp, swiglu_limit=args.swiglu_limit)
    batch_sizes = [int(m) for m in args.batch_sizes.split(",")]
    configs = space.grid(block_k=spec.block_shape[1] if spec.block_shape else None)[: args.limit]
    print(f"spec: {spec}; {len(configs)} configs x {len(batch_sizes)} batch sizes", flush=True)

    t0 = time.perf_counter()
    with CompilePool(spec, workers=args.workers, shared_memory_bytes=1 << 40) as pool:
        failures = pool.compile(configs)
    compile_s = time.perf_counter() - t0
    ok = [c for c in configs if failures[c] is None]
    print(f"compiled {len(configs)} configs in {compile_s:.1f} s with {pool.workers} workers: "
          f"{len(ok)} ok, {len(configs) - len(ok)} failed", flush=True)

    timer = CudaGraphTimer(spec)
    rows = []
    t1 = time.perf_counter()
    for M in batch_sizes:
        tm = time.perf_counter()
        defaults = {space.default_config(M, spec.E, spec.dtype, spec.block_shape)}
        for config in list(ok) + [d for d in defaults if d not in failures]:
            m = timer.measure(config, M)
            rows.append({"M": M, **config.to_dict(), "us": "" if m.latency_us is None else f"{m.latency_us:.3f}",
                         "error": m.error or "", "is_default": int(config in defaults),
                         "tflops": f"{m.attrs.get('tflops', float('nan')):.2f}",
                         "gbps": f"{m.attrs.get('gbps', float('nan')):.1f}"})
        for config in configs:
            if failures[config] is not None:
                rows.append({"M": M, **config.to_dict(), "us": "", "error": failures[config],
                             "is_default": int(config in defaults)})
        at_m = [float(r["us"]) for r in rows if r["M"] == M and r["us"]]
        print(f"M={M}: {len(at_m)} timed in {time.perf_counter() - tm:.1f} s, best {min(at_m):.2f} us, "
              f"median {statistics.median(at_m):.2f} us", flush=True)
        # Rewritten after every batch size, so a run cut short keeps what it measured.
        out = write_table(rows, args.out, extra_columns=("error", "is_default", "tflops", "gbps"))
    measure_s = time.perf_counter() - t1
    meta = {"spec": spec.to_dict(), "device": torch.cuda.get_device_name(), "triton": triton.__version__,
            "torch": torch.__version__, "timer": timer.description, "batch_sizes": batch_sizes,
            "configs": len(configs), "compiled_ok": len(ok), "compile_s": round(compile_s, 1),
            "compile_workers": pool.workers, "measure_s": round(measure_s, 1)}
    Path(str(out) + ".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

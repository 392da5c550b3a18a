"""Record a full-grid replay table on the GPU(s): every config of SGLang's space at several batch sizes.

    PYTHONPATH=. python benchmarks/record_grid.py --model deepseek-ai/DeepSeek-V4-Flash --tp 8 \
        --batch-sizes 1,16,64,256,1024,4096 --out moe_opt/data/DeepSeek-V4-Flash_tp8_H100.csv

Compiles the whole grid first in a process pool (nothing screened out: the table records which configs fail
and why, which calibrates the shared-memory estimate), then times every config that compiled with the
CUDA-graph timer the tuner uses. With several GPUs (``--gpus``, default all visible) each GPU times its share of
the configs at every batch size; a batch size enters the table once every GPU has timed its share, and the
table is rewritten after each, so a run cut short by ``--deadline-s`` keeps the batch sizes it finished. Writes
the CSV table plus a JSON sidecar with the spec, device, versions, timings and the card's measured copy
bandwidth.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

from moe_opt import space
from moe_opt.measure.compile_pool import CompilePool, usable_cores
from moe_opt.measure.cuda_graph import CudaGraphTimer, cuda_graph_description
from moe_opt.measure.replay import write_table
from moe_opt.measure.roofline import copy_bandwidth_gbps
from moe_opt.model.spec import ModelSpec


def _row(M: int, config: space.Config, m, is_default: bool) -> dict:
    return {"M": M, **config.to_dict(), "us": "" if m.latency_us is None else f"{m.latency_us:.3f}",
            "error": m.error or "", "is_default": int(is_default),
            "tflops": f"{m.attrs.get('tflops', float('nan')):.2f}", "gbps": f"{m.attrs.get('gbps', float('nan')):.1f}"}


def _time_share(spec_dict: dict, configs: list, batch_sizes: list[int], gpu: int, deadline: float, out) -> None:
    """One GPU's process: time ``configs`` at every batch size; send ("rows", gpu, M, rows) per finished M."""
    try:
        spec = ModelSpec.from_dict(spec_dict)
        timer = CudaGraphTimer(spec, f"cuda:{gpu}")
        for M in batch_sizes:
            defaults = {space.default_config(M, spec.E, spec.dtype, spec.block_shape)}
            rows, t0 = [], time.perf_counter()
            for config in configs:
                if time.time() > deadline:
                    out.put(("stopped", gpu, M, None))
                    return
                rows.append(_row(M, config, timer.measure(config, M), config in defaults))
            out.put(("rows", gpu, M, (rows, time.perf_counter() - t0)))
        out.put(("done", gpu, None, None))
    except BaseException as exc:
        out.put(("error", gpu, None, f"{type(exc).__name__}: {exc}"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--shape", help="explicit E,topk,K,intermediate[,dtype[,block_n,block_k]] instead of --model")
    p.add_argument("--swiglu-limit", type=float, default=None)
    p.add_argument("--batch-sizes", default="1,16,64,256,1024,4096", help="timed in this order")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU cores - 2)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs timing in parallel (default: all visible)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="stop timing after this many seconds from the start; finished batch sizes are kept")
    p.add_argument("--limit", type=int, default=None, help="only the first N grid configs (a pilot run)")
    args = p.parse_args()
    started = time.time()
    deadline = started + args.deadline_s if args.deadline_s else float("inf")

    if args.model:
        from moe_opt.model.resolve import resolve_model

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
    gpus = args.gpus or torch.cuda.device_count()
    print(f"spec: {spec}; {len(configs)} configs x {len(batch_sizes)} batch sizes on {gpus} GPU(s)", flush=True)

    t0 = time.perf_counter()
    workers = args.workers or max(1, usable_cores() - 2)
    with CompilePool(spec, workers=workers, shared_memory_bytes=1 << 40) as pool:
        failures = pool.compile(configs)
    compile_s = time.perf_counter() - t0
    ok = [c for c in configs if failures[c] is None]
    print(f"compiled {len(configs)} configs in {compile_s:.1f} s with {workers} workers: "
          f"{len(ok)} ok, {len(configs) - len(ok)} failed", flush=True)
    copy_gbps = copy_bandwidth_gbps()
    print(f"copy bandwidth (read + write): {copy_gbps:.0f} GB/s", flush=True)

    # Every GPU times every batch size over its share; the defaults (in the grid or not) go with GPU 0's share.
    extra_defaults = [d for d in {space.default_config(M, spec.E, spec.dtype, spec.block_shape) for M in batch_sizes}
                      if d not in failures]
    shares = [ok[g::gpus] + (extra_defaults if g == 0 else []) for g in range(gpus)]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_time_share, args=(spec.to_dict(), shares[g], batch_sizes, g, deadline, queue))
             for g in range(gpus)]
    for proc in procs:
        proc.start()
    t1 = time.perf_counter()
    parts: dict[int, dict[int, tuple]] = {M: {} for M in batch_sizes}
    rows, finished, timed_s, running = [], [], {}, set(range(gpus))
    while running:
        kind, gpu, M, payload = queue.get()
        if kind in ("done", "stopped", "error"):
            running.discard(gpu)
            if kind != "done":
                print(f"GPU {gpu}: {kind} {payload or f'at M={M} (deadline)'}", flush=True)
            continue
        parts[M][gpu] = payload
        if len(parts[M]) < gpus:
            continue
        defaults = {space.default_config(M, spec.E, spec.dtype, spec.block_shape)}
        rows += [r for g in range(gpus) for r in parts[M][g][0]]
        rows += [{"M": M, **c.to_dict(), "us": "", "error": failures[c], "is_default": int(c in defaults)}
                 for c in configs if failures[c] is not None]
        finished.append(M)
        timed_s[M] = round(max(part[1] for part in parts[M].values()), 1)
        at_m = [float(r["us"]) for r in rows if r["M"] == M and r["us"]]
        print(f"M={M}: {len(at_m)} timed in {timed_s[M]:.1f} s, best {min(at_m):.2f} us, "
              f"median {statistics.median(at_m):.2f} us ({time.time() - started:.0f} s since start)", flush=True)
        out = write_table(rows, args.out, extra_columns=("error", "is_default", "tflops", "gbps"))
        meta = {"spec": spec.to_dict(), "device": torch.cuda.get_device_name(), "gpus": gpus,
                "triton": triton.__version__, "torch": torch.__version__,
                "timer": cuda_graph_description(torch.cuda.get_device_name()),
                "batch_sizes": finished, "configs": len(configs), "compiled_ok": len(ok),
                "compile_s": round(compile_s, 1), "compile_workers": workers, "timing_s_per_batch_size": timed_s,
                "copy_gbps": round(copy_gbps, 1), "recorded": time.strftime("%Y-%m-%d")}
        Path(str(out) + ".json").write_text(json.dumps(meta, indent=2) + "\n")
    for proc in procs:
        proc.join(30)
    print(f"timing took {time.perf_counter() - t1:.1f} s; table has M = {finished}", flush=True)
    return 0 if finished == batch_sizes else 1


if __name__ == "__main__":
    sys.exit(main())

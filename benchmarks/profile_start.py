"""Where a GPU tune's start-up goes: the measuring process's phases, alone and with the compile pool starting
beside it (as a tune starts them), each in fresh processes.

    PYTHONPATH=. python benchmarks/profile_start.py --json benchmarks/results/profile/start_H200.json

A spawned process does what the measuring process does before its first measurement, timing each step from the
moment the parent spawned it: the interpreter and ``import torch``, CUDA's context (``torch.cuda.init`` and the
device's properties), moe_opt's timer module, and building the CUDA-graph timer (weights, flush buffer, graph
pool). Scenario "alone": nothing else runs; "with_pool": a CompilePool of ``--workers`` processes is started at
the same moment (its first worker's start is timed too). Also the parent's own ``import torch``.
"""

from __future__ import annotations

import time

STARTED = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def _measuring_steps(spec_dict: dict, queue) -> None:
    marks = {"main": time.time()}
    import torch

    marks["torch"] = time.time()
    torch.cuda.init()
    torch.cuda.get_device_properties(0)
    marks["cuda"] = time.time()
    from moe_opt.measure.cuda_graph import CudaGraphTimer
    from moe_opt.model.spec import ModelSpec

    marks["moe_opt"] = time.time()
    CudaGraphTimer(ModelSpec.from_dict(spec_dict), "cuda", split_stages=True)
    torch.cuda.synchronize()
    marks["timer"] = time.time()
    queue.put(marks)


def scenario(spec, with_pool: bool, workers: int) -> dict:
    from moe_opt.measure.compile_pool import CompilePool
    from moe_opt.space import HOPPER_SHARED_MEMORY_BYTES

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    spawned, spawned_perf = time.time(), time.perf_counter()
    proc = ctx.Process(target=_measuring_steps, args=(spec.to_dict(), queue))
    proc.start()
    pool = None
    if with_pool:
        pool = CompilePool(spec, workers=workers, shared_memory_bytes=HOPPER_SHARED_MEMORY_BYTES)
        pool.prestart()
    marks = queue.get(timeout=300)
    proc.join()
    out = {step: round(at - spawned, 2) for step, at in marks.items()}
    if pool is not None:
        while pool.ready_at is None:
            time.sleep(0.05)
        out["pool_first_worker"] = round(pool.ready_at - spawned_perf, 2)
        pool.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deepseek-ai/DeepSeek-V4-Flash")
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--workers", type=int, default=14, help="compile workers (a tune's default on 16 cores: 14)")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    t0 = time.time()
    import torch

    parent_torch_s = time.time() - t0
    from moe_opt.model.resolve import resolve_model

    spec = resolve_model(args.model, tp_size=args.tp)
    record = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "python": sys.version.split()[0], "cpu_cores": os.cpu_count(),
              "commit": os.environ.get("MOE_OPT_COMMIT"), "parent_import_torch_s": round(parent_torch_s, 2),
              "interpreter_to_torch_s": round(time.time() - STARTED, 2)}
    for name, with_pool in (("alone", False), ("with_pool", True), ("alone_again", False)):
        record[name] = scenario(spec, with_pool, args.workers)
        print(name, record[name], flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

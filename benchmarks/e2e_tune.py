"""Goal 2 of the performance issue, end to end: tune a model for all 18 batch sizes on one GPU, cold Triton cache.

    PYTHONPATH=. python benchmarks/e2e_tune.py --model deepseek-ai/DeepSeek-V4-Flash --tp 8 \
        --json benchmarks/results/e2e_DeepSeek-V4-Flash_tp8_H100.json

Points TRITON_CACHE_DIR at a new empty directory before Triton is imported, runs ``moe_opt.tune`` with its
studies and config files in a new directory (nothing reused), and writes a JSON record: the wall time from
this script's start (imports included), the tune's own timings, and per batch size the tuned config, its
latency, SGLang's default's latency (both the re-measured medians), speedup, achieved GB/s and TFLOP/s; with
the card, CPU cores, versions and the command. benchmarks/write_performance.py turns it into docs.
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
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--json", required=True, help="where the record goes")
    p.add_argument("--workdir", default=None, help="studies, config files and Triton cache (default: a new temp dir)")
    p.add_argument("--down-config", choices=["auto", "on", "off"], default="auto",
                   help="tune a config per GEMM (tune()'s down_config; auto: the default)")
    p.add_argument("--routing", default="uniform", help="tune()'s routing: uniform, zipf<s>, trace:PATH")
    p.add_argument("--dtype", default=None, help="tune()'s dtype (default: the model's)")
    p.add_argument("--tma", choices=["auto", "off"], default="auto",
                   help="tune()'s tma: auto (None: USE_TMA offered where the device has it) or off (False)")
    p.add_argument("--n-trials", type=int, default=None, help="tune()'s n_trials (default: its default)")
    p.add_argument("--storage", default=None, help="tune()'s storage, e.g. journal:studies/x.journal (default: its "
                                                   "default, SQLite)")
    p.add_argument("--kernel", default="builtin",
                   help="tune()'s kernel: builtin, or sglang-kernel=DIR / vllm-kernel=DIR (benchmarks/carry_engines.py)")
    p.add_argument("--batch-sizes", default=None, help="M,M,...: tune()'s batch_sizes (default: its 18)")
    p.add_argument("--compile-workers", type=int, default=None, help="tune()'s compile_workers (default: its own)")
    p.add_argument("--profile-measuring", default=None, metavar="PATH",
                   help="write a cProfile of the measuring process's measurements to PATH (measuring_profile.py)")
    args = p.parse_args()
    from python_env import bytecode_state  # benchmarks/, beside this script

    bytecode = bytecode_state()
    if "=" in args.kernel:  # the folder is read after the chdir below
        name, folder = args.kernel.split("=", 1)
        args.kernel = f"{name}={Path(folder).resolve()}"
    batch_sizes = [int(m) for m in args.batch_sizes.split(",")] if args.batch_sizes else None
    started_in = os.getcwd()  # paths given on the command line are relative to it
    work = Path(args.workdir or tempfile.mkdtemp(prefix="moe_opt_e2e_"))
    cache = work / "triton_cache"
    if cache.exists() and any(cache.iterdir()):
        sys.exit(f"{cache} is not empty: the run must start from a cold Triton cache")
    os.environ["TRITON_CACHE_DIR"] = str(cache)  # before Triton is imported
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)

    imports = {"before_s": time.time() - STARTED}  # the interpreter's start and the standard library
    t0 = time.time()
    import torch
    imports["torch_s"] = time.time() - t0
    t0 = time.time()
    import triton
    imports["triton_s"] = time.time() - t0
    t0 = time.time()
    import moe_opt
    from moe_opt.measure.roofline import copy_bandwidth_gbps
    from moe_opt.store.results import study_result
    from moe_opt.store.storage import open_storage
    imports["moe_opt_s"] = time.time() - t0

    if args.profile_measuring:
        from measuring_profile import ENV, ProfiledTimer  # benchmarks/, beside this script

        import moe_opt.measure.cuda_graph

        os.environ[ENV] = str(Path(started_in, args.profile_measuring).resolve())
        moe_opt.measure.cuda_graph.CudaGraphTimer = ProfiledTimer  # what the measuring process will build
    down_config = {"auto": None, "on": True, "off": False}[args.down_config]
    called = time.time()
    result = moe_opt.tune(model=args.model, tp_size=args.tp, dtype=args.dtype, down_config=down_config,
                          routing=args.routing, n_trials=args.n_trials, tma=None if args.tma == "auto" else False,
                          storage=args.storage, kernel=args.kernel, batch_sizes=batch_sizes,
                          compile_workers=args.compile_workers)
    wall_s = time.time() - STARTED
    tune_call_s = time.time() - called  # tune() as called: its imports and checks before its timer starts too

    import optuna

    store = open_storage(result.storage)
    rows = []
    for M in sorted(result.best):
        study = optuna.load_study(study_name=result.study_names[M], storage=store)
        number = study_result(study).best.trial_number
        best = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
        scale = best.value / result.latency_us[M]  # attrs were computed with the trial's own latency
        rows.append({"M": M, "config": result.best[M], "us": result.latency_us[M],
                     "default_us": result.default_latency_us.get(M), "trials": result.trials_used.get(M),
                     "gbps": best.user_attrs.get("gbps", float("nan")) * scale,
                     "tflops": best.user_attrs.get("tflops", float("nan")) * scale})
    record = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "model": args.model, "tp_size": args.tp, "spec": result.spec.to_dict(),
        "device": torch.cuda.get_device_name(), "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)), "triton": triton.__version__, "torch": torch.__version__,
        "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d"),
        "wall_s": round(wall_s, 1), "tune_wall_s": round(result.wall_s, 1), "tune_call_s": round(tune_call_s, 2),
        "imports": {k: round(v, 2) for k, v in imports.items()},
        "timings": {k: round(v, 2) for k, v in result.timings.items()},
        "geomean_speedup": result.geomean_speedup(), "guard": result.guard, "notes": result.notes,
        "files": {k: str(v) for k, v in result.files.items()}, "per_batch_size": rows,
        "down_config": args.down_config, "routing": args.routing, "pairs": result.pairs,
        "commit": os.environ.get("MOE_OPT_COMMIT"), "storage": str(result.storage), "tma": args.tma,
        "kernel": args.kernel, "batch_sizes": args.batch_sizes, "python_bytecode": bytecode,
        "copy_gbps": round(copy_bandwidth_gbps(), 1),  # measured after the tune, outside its wall time
    }
    if args.profile_measuring:  # written as the measuring process leaves, which close() does not wait for
        profile = Path(os.environ["MOE_OPT_PROFILE_MEASURING"])
        deadline = time.time() + 60
        while not profile.exists() and time.time() < deadline:
            time.sleep(0.2)
        record["profile_measuring"] = str(profile) if profile.exists() else None
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wall {wall_s:.1f} s from the script's start (imports included); wrote {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the measuring process still compiles itself once the compile pool has compiled a config (GPU).

    PYTHONPATH=. python benchmarks/measurer_compiles.py --json $OUT/measurer_compiles.json

A tune's compile pool compiles each config ahead so that the measuring process only loads binaries from Triton's
on-disk cache. This starts a CompilePool for the shape with a new, empty ``TRITON_CACHE_DIR``, compiles
``--configs`` configs (SGLang's default at every batch size, then random candidates, with and without USE_TMA), then,
in this process, with the whole shape's inputs as the measuring process builds them, launches each config at
each batch size, and lists the Triton kernels this process compiled (the cache entries it added), by kernel name
and by the batch size at which they appeared. None is the goal: any is a compile on the measuring critical path.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path


def cache_entries(cache: Path) -> dict[str, str]:
    """{cache entry: the kernel's name} of every compiled kernel in Triton's cache."""
    out = {}
    for entry in cache.iterdir():
        names = [p.stem for p in entry.glob("*.json") if not p.name.startswith("__grp__")]
        if names:
            out[entry.name] = names[0]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deepseek-ai/DeepSeek-V4-Flash")
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--configs", type=int, default=12, help="random candidates besides the defaults")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="moe_opt_compiles_"))
    os.environ["TRITON_CACHE_DIR"] = str(cache)  # before Triton is imported

    import torch

    from moe_opt import space
    from moe_opt.kernel.backend import get_backend
    from moe_opt.measure.compile_pool import CompilePool
    from moe_opt.measure.cuda_graph import cuda_graph_info
    from moe_opt.model.resolve import resolve_model
    from moe_opt.space import ConfigPair

    spec = resolve_model(args.model, tp_size=args.tp)
    backend = get_backend("builtin")
    smem = cuda_graph_info("cuda").shared_memory_bytes
    candidates = space.candidates_for(spec, smem, tma=True)
    configs = list(dict.fromkeys(space.default_config_for(spec, M) for M in space.DEFAULT_BATCH_SIZES))
    configs += random.Random(0).sample([c for c in candidates if c not in configs], args.configs)
    t0 = time.perf_counter()
    with CompilePool(spec, shared_memory_bytes=smem) as pool:
        failures = pool.compile(configs, M=4)
    compile_s = time.perf_counter() - t0
    configs = [c for c in configs if failures[c] is None]
    before = cache_entries(cache)

    inputs = backend.make_inputs(spec, "cuda", routing_sets=10)
    pair = next((ConfigPair(a, b) for a in configs for b in configs if a != b and a.BLOCK_SIZE_M == b.BLOCK_SIZE_M),
                None)
    added: dict[int, list[str]] = {}
    seen = dict(before)
    for M in space.DEFAULT_BATCH_SIZES:
        for c in configs:
            backend.call(inputs, c, M)
        if pair is not None:
            backend.call(inputs, pair, M)  # a config per GEMM, as re-measuring times the best pair
        torch.cuda.synchronize()
        now = cache_entries(cache)
        added[M] = sorted(name for entry, name in now.items() if entry not in seen)
        seen = now
    record = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "model": args.model, "tp": args.tp,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": __import__("triton").__version__, "commit": os.environ.get("MOE_OPT_COMMIT"),
        "date": time.strftime("%Y-%m-%d"), "configs": [c.to_dict() for c in configs], "pool_compile_s": round(compile_s, 1),
        "pool_entries": sorted(before.values()), "compiled_by_measuring_process": added,
        "compiled_by_measuring_process_total": sum(map(len, added.values())),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"pool compiled {len(configs)} configs in {compile_s:.1f} s; this process then compiled "
          f"{record['compiled_by_measuring_process_total']} kernels: "
          + "; ".join(f"M={M}: {', '.join(names)}" for M, names in added.items() if names), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `moe-opt` command: a thin shell over the Python API (each subcommand is one API call).

The engines' tuner flags are accepted where they mean the same (SGLang's
``benchmark/kernels/fused_moe_triton/tuning_fused_moe_triton.py``, vLLM's ``benchmarks/kernels/benchmark_moe.py``):
``--tp-size``/``-tp``, ``--ep-size``, vLLM's ``--enable-expert-parallel``, ``--dtype auto``, ``--batch-size 1 2 4``,
``--save-dir`` and ``--tune`` (``moe-opt tune`` tunes; ``moe-opt bench`` is those tuners without ``--tune``).
Abbreviated options are refused: ``--n`` is not ``--n-trials``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Sequence

from . import __version__
from .errors import MoeOptError, TuneError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as `yes | head` reports it

# What each command imports before it starts; a Ctrl-C meanwhile is deferred until they are loaded (torch swallows a
# KeyboardInterrupt raised while it imports numpy, and a Ctrl-C inside its C start-up code makes the interpreter
# die by SIGINT after our own message).
_START_UP = {
    "tune": ("moe_opt.kernel", "optuna", "moe_opt.run.tune"),
    "bench": ("moe_opt.kernel", "optuna", "moe_opt.run.bench"),
    "check": ("moe_opt.kernel", "optuna", "moe_opt.run.check"),
    "show": ("optuna", "pandas", "moe_opt.view.report_data"),
    "report": ("optuna", "pandas", "plotly", "moe_opt.view.report"),
    "export": ("optuna", "moe_opt.export.from_storage"),
    "record": ("optuna", "moe_opt.measure.replay"),
    "dashboard": ("optuna", "optuna_dashboard", "moe_opt.view.dashboard"),
    "resolve": ("moe_opt.model.resolve",),
}


# --- Arguments shared by several commands --------------------------------------------------------------------------

def _dtype(args: argparse.Namespace) -> str | None:
    """``--dtype auto`` (the engines' tuners) means: what the model holds."""
    return None if args.dtype in (None, "auto") else args.dtype


def _ep(args: argparse.Namespace) -> int:
    """vLLM's --enable-expert-parallel spreads the experts over all TP ranks: EP size = TP size."""
    return args.tp if getattr(args, "enable_expert_parallel", False) else args.ep


def _batch_sizes(args: argparse.Namespace) -> list[str] | None:
    """--batch-sizes 1,64,4096 and/or --batch-size 1 64 4096 (the engines' spelling), None where neither is given.

    Values are passed on as text; tune() says which one is not a positive integer.
    """
    values: list[str] = []
    given = []
    if args.batch_sizes is not None:
        given.append(f"--batch-sizes {args.batch_sizes!r}")
        values += [part.strip() for part in args.batch_sizes.split(",")]
    for item in args.batch_size or []:
        given.append(f"--batch-size {item!r}")
        values += [part.strip() for part in item.split(",")]
    if not given:
        return None
    values = [v for v in values if v]
    if not values:
        raise TuneError(f"{' '.join(given)} gives no batch size; give positive integers such as 1,16,64, or leave "
                        "the option out for the default batch sizes")
    return values


def _add_shape_args(group, *, replay: bool = True, sweep: bool = False) -> None:
    group.add_argument("--model", help="Hub id, catalogue name, local directory or config.json")
    group.add_argument("--shape", help="explicit shape instead of --model: E=..,topk=..,K=..,intermediate=.."
                                       "[,dtype=fp8_w8a8][,block=128x128]")
    if replay:
        group.add_argument("--replay", help="take measurements from a recorded CSV table instead of the GPU")
    _add_parallel_args(group, sweep=sweep)
    group.add_argument("--dtype", default=None,
                       help="fp8_w8a8, int8_w8a8, int8_w8a16, int4_w4a16, bf16 or fp16; auto (the default) = what "
                            "the model's config says (docs/models.md)" +
                            ("; several, comma-separated, tune one shape each (a sweep)" if sweep else ""))
    group.add_argument("--swiglu-limit", type=float, default=None, help="override the model's swiglu_limit")


def _int_list(text: str) -> list[int]:
    """``--tp-size 1,2,4,8``: comma-separated integers (argparse reports a value that is not)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers such as 1,2,4,8") \
            from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} gives no size; give integers such as 1,2,4,8")
    return values


def _add_parallel_args(group, *, sweep: bool = False) -> None:
    if sweep:
        group.add_argument("--tp", "--tp-size", "-tp", "--tensor-parallel-size", dest="tp", type=_int_list,
                           default=[1], metavar="TP[,TP...]",
                           help="tensor-parallel size (default 1); several, e.g. 1,2,4,8, tune one shape each in "
                                "turn, each warm-started from the others (a sweep)")
    else:
        group.add_argument("--tp", "--tp-size", "-tp", "--tensor-parallel-size", dest="tp", type=int, default=1,
                           help="tensor-parallel size (default 1)")
    group.add_argument("--ep", "--ep-size", dest="ep", type=int, default=1, help="expert-parallel size (default 1)")
    group.add_argument("--enable-expert-parallel", "-enable-ep", action="store_true",
                       help="vLLM's flag: experts spread over all TP ranks (EP size = TP size)")


def _add_batch_size_args(group, default: str) -> None:
    group.add_argument("--batch-sizes", default=None, metavar="M,M,...",
                       help=f"comma-separated, e.g. 1,64,4096 (default: {default})")
    group.add_argument("--batch-size", nargs="+", default=None, metavar="M",
                       help="the engines' spelling: --batch-size 1 64 4096")


def _shape_spec(args: argparse.Namespace):
    from .errors import SpecError
    from .model.spec import ModelSpec

    try:
        fields = dict(item.split("=", 1) for item in args.shape.split(","))
        ints = {k: int(fields.pop(k)) for k in ("E", "topk", "K", "intermediate")}
    except (ValueError, KeyError):
        raise SpecError(f"--shape {args.shape!r} must be E=..,topk=..,K=..,intermediate=..[,dtype=fp8_w8a8]"
                        "[,block=128x128]") from None
    block = fields.get("block")
    return ModelSpec.from_shape(num_experts=ints["E"], topk=ints["topk"], hidden_size=ints["K"],
                                intermediate_size=ints["intermediate"], dtype=fields.get("dtype") or _dtype(args),
                                block_shape=[int(v) for v in block.split("x")] if block else None,
                                tp_size=args.tp, ep_size=_ep(args), swiglu_limit=args.swiglu_limit)


def _spec(args: argparse.Namespace):
    """The spec of --shape or --model, or None (a replay table's own)."""
    if args.shape:
        return _shape_spec(args)
    if args.model:
        from .model.resolve import resolve_model

        return resolve_model(args.model, tp_size=args.tp, ep_size=_ep(args), dtype=_dtype(args),
                             swiglu_limit=args.swiglu_limit)
    return None


# --- Commands ------------------------------------------------------------------------------------------------------

def _cmd_resolve(args: argparse.Namespace) -> int:
    from .model.resolve import resolve_model

    spec = resolve_model(args.model, tp_size=args.tp, ep_size=_ep(args), dtype=_dtype(args),
                         swiglu_limit=args.swiglu_limit,
                         fuse_shared_experts=not args.no_shared_expert_fusion)
    if args.json:
        print(json.dumps(spec.to_dict(), indent=2, sort_keys=True))
    else:
        for key, value in spec.to_dict().items():
            if key == "dtype" and value is None:  # unquantized: the weights are in the activation dtype
                value = f"{spec.torch_dtype} (unquantized)"
            print(f"{key:26s} {value}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from .run.tune import tune

    dtypes = [d.strip() for d in args.dtype.split(",")] if args.dtype else [None]
    if len(args.tp) > 1 or len(dtypes) > 1:
        return _cmd_sweep(args, dtypes)
    args.tp, args.dtype = args.tp[0], dtypes[0]
    result = tune(args.model if not args.shape else None, spec=_shape_spec(args) if args.shape else None,
                  tp_size=args.tp, ep_size=_ep(args), dtype=_dtype(args), swiglu_limit=args.swiglu_limit,
                  replay=args.replay, **_how_to_tune(args))
    return _tune_exit_code(result, args)


def _how_to_tune(args: argparse.Namespace) -> dict:
    """tune()'s arguments from `moe-opt tune`'s "how" and "output" options (a tune and a sweep take the same)."""
    return dict(batch_sizes=_batch_sizes(args), n_trials=args.n_trials, timeout_s=args.timeout,
                storage=args.storage, sampler=args.sampler, seed=args.seed,
                output_dir=None if args.no_export else args.output_dir, warm_start=not args.no_warm_start,
                tuned_config_dirs=args.tuned_config_dir, device=args.device, compile_workers=args.compile_workers,
                progress=True, n_workers=args.workers, confirm=not args.no_confirm,
                down_config=False if args.no_down_config else None, routing=args.routing, kernel=args.kernel,
                target=args.target, tma=False if args.no_tma else None)


def _tune_exit_code(result, args: argparse.Namespace) -> int:
    """130 interrupted, 1 a worker failed or nothing to export (said in one line), else 0."""
    if result.interrupted:
        return EXIT_INTERRUPTED
    if result.worker_errors:
        return EXIT_FAILED
    why = _nothing_exported(result, exporting=not args.no_export)
    if why:
        print(f"moe-opt tune: error: {why}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _cmd_sweep(args: argparse.Namespace, dtypes: list[str | None]) -> int:
    from .run.sweep import sweep

    if args.shape or args.replay or not args.model:
        given = "--shape" if args.shape else "--replay" if args.replay else "no --model"
        raise TuneError(f"several --tp-size/--dtype values tune several shapes of one model; they need --model, got "
                        f"{given}")
    if args.enable_expert_parallel:
        raise TuneError("--enable-expert-parallel sets EP size = TP size; with several TP sizes give --ep instead")
    out = sweep(args.model, tp_sizes=args.tp, dtypes=dtypes, ep_size=args.ep, swiglu_limit=args.swiglu_limit,
                **_how_to_tune(args))
    print(f"moe-opt sweep: {len(out.results)} shape{'s' if len(out.results) != 1 else ''} in {out.wall_s:.1f} s")
    for (tp, dtype), result in out.results.items():
        g = result.geomean_speedup()
        print(f"  TP {tp:<2} {dtype or 'auto':10s} {len(result.best):2d} batch sizes"
              + (f", geometric mean {g:.3f}x vs the default" if g and result.is_performance else ""))
    codes = [_tune_exit_code(result, args) for result in out.results.values()]
    return max(codes, key=lambda c: (c == EXIT_INTERRUPTED, c))


def _nothing_exported(result, *, exporting: bool) -> str | None:
    """Why a finished tune has nothing to show for it, or None."""
    if not result.best:
        failed = sorted(result.guard)  # with no result, the guard's entries say it gave up there
        detail = f" (the correctness guard rejected the fastest configs at M={','.join(map(str, failed))})" \
            if failed else " (every measured config failed to compile or run; the summary above says why)"
        if not any(result.trials_used.values()):
            detail = " (no trial was measured: the time limit passed first, or the budget was already spent)"
        return f"no batch size has a result{detail}; nothing was exported"
    if exporting and not result.files:
        return ("nothing was exported: the replay table records no model spec to name the files by; give --model "
                "or --shape")
    return None


def _cmd_bench(args: argparse.Namespace) -> int:
    from .run.bench import bench, bench_text, save_bench

    if args.tune:
        raise TuneError("moe-opt bench measures config files; to tune, run moe-opt tune with the same arguments")
    result = bench(args.configs, spec=_spec(args), replay=args.replay, batch_sizes=_batch_sizes(args),
                   device=args.device, engine=args.engine)
    print(bench_text(result))
    for path in args.output or []:
        print(f"wrote {save_bench(result, path)}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from .run.check import check, check_text

    result = check(spec=_spec(args), replay=args.replay, batch_sizes=_batch_sizes(args), device=args.device,
                   engine=args.engine, config_dirs=args.config_dir, n_trials=args.n_trials,
                   tolerance=args.tolerance, progress=True, fix_command=_fix_command(args))
    print(check_text(result))
    return EXIT_FAILED if result.flagged else 0


def _fix_command(args: argparse.Namespace) -> str:
    """The `moe-opt tune` command that re-tunes what `moe-opt check` checked."""
    import shlex

    parts = ["moe-opt", "tune"]
    if args.shape:
        parts += ["--shape", args.shape]
    elif args.model:
        parts += ["--model", args.model]
    if args.replay:
        parts += ["--replay", args.replay]
    if args.tp != 1:
        parts += ["--tp", str(args.tp)]
    if _ep(args) != 1:
        parts += ["--ep", str(_ep(args))]
    if _dtype(args) and not args.shape:
        parts += ["--dtype", _dtype(args)]
    if args.swiglu_limit is not None:
        parts += ["--swiglu-limit", f"{args.swiglu_limit:g}"]
    return " ".join(shlex.quote(p) for p in parts)


def _cmd_record(args: argparse.Namespace) -> int:
    from .measure.replay import record_table

    print(f"wrote {record_table(args.storage, args.output)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export.from_storage import export_storage

    for path in export_storage(args.storage, args.output_dir):
        print(f"wrote {path}")
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from .view.dashboard import dashboard

    dashboard(args.storage, port=args.port, host=args.host)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .view.report import report

    path = report(args.storage, args.output, table=args.table, copy_bandwidth_gbps=args.copy_bandwidth_gbps)
    print(f"wrote {path}, {path.with_suffix('.csv')}, {path.with_suffix('.md')}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from .view.report_data import summary, summary_text

    print(summary_text(summary(args.storage, table=args.table)))
    return 0


# --- The parser ----------------------------------------------------------------------------------------------------

STORAGE_HELP = "the studies: a .db or .journal path (e.g. studies/DeepSeek-V4-Flash.db), or a storage URL " \
               "(sqlite:///..., journal:PATH, postgresql://...)"
CPU_NOTE = ("Without a GPU it runs Triton's CPU interpreter on a scaled-down shape (E <= 8, topk <= 2, K = 256, "
            "N = 128) at batch sizes 1, 8, 32 with 4 trials each unless --batch-sizes/--n-trials say otherwise; its "
            "timings are wall-clock interpreter times, not performance numbers, and its files are named "
            "device_name=cpu-interpreter.")
CPU_MEASURE_NOTE = ("Without a GPU it measures through Triton's CPU interpreter on a scaled-down shape (E <= 8, "
                    "topk <= 2, K = 256, N = 128) at batch sizes 1, 8, 32 unless --batch-sizes says otherwise, and "
                    "looks for files named device_name=cpu-interpreter (a CPU tune's); its timings are wall-clock "
                    "interpreter times, not performance numbers.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-opt", allow_abbrev=False,
        description="Tune the Triton fused-MoE kernel's launch configs with Optuna, resumably, and export "
                    "SGLang/vLLM config files.")
    parser.add_argument("--version", action="version", version=f"moe-opt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, allow_abbrev=False, **kwargs)

    p = command("resolve", help="print the MoE layer spec (E, N, K, topk, dtype, swiglu_limit) of a model",
                description="Resolve a model id, local directory or config.json into the MoE spec that tuning "
                            "uses. Works offline for the bundled catalogue.")
    p.add_argument("model", help="Hub id (e.g. deepseek-ai/DeepSeek-V4-Flash), local directory or config.json path")
    _add_parallel_args(p)
    p.add_argument("--dtype", default=None,
                   help="quantization to tune: fp8_w8a8, or bf16/fp16 for unquantized; auto (the default) = what "
                        "the model holds")
    p.add_argument("--swiglu-limit", type=float, default=None, help="override the model's swiglu_limit")
    p.add_argument("--no-shared-expert-fusion", "--disable-shared-experts-fusion", action="store_true",
                   help="do not fuse the shared expert into E/topk (SGLang fuses it for DeepSeek-V3-style models)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_resolve)

    p = command("tune", help="tune a model's fused-MoE configs and export SGLang/vLLM config files",
                description="Run one resumable Optuna study per batch size against the timed fused-MoE kernel, "
                            "then write config files. Re-running the same command resumes. Ctrl-C stops after the "
                            "running trial and keeps everything. " + CPU_NOTE)
    src = p.add_argument_group("what to tune")
    _add_shape_args(src, sweep=True)
    how = p.add_argument_group("how")
    _add_batch_size_args(how, "SGLang's 18; 1,8,32 on the CPU interpreter; the table's with --replay")
    how.add_argument("--n-trials", type=int, default=None,
                     help="configs measured per batch size, failures included, counted across resumed runs "
                          "(default 32; 4 on the CPU interpreter)")
    how.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    how.add_argument("--sampler", default="moe", choices=["moe", "tpe", "gp", "random", "grid"],
                     help="search strategy (default moe; gp = Optuna's GPSampler, needs scipy; grid = exhaustive)")
    how.add_argument("--seed", type=int, default=None, help="sampler seed")
    how.add_argument("--storage", default=None,
                     help="where the studies go: a .db path or sqlite:///PATH.db (default studies/<model>.db); "
                          "a .journal path or journal:PATH for a file journal; postgresql://... for many hosts")
    how.add_argument("--no-warm-start", action="store_true",
                     help="do not measure SGLang's default and existing tuned configs first")
    how.add_argument("--tuned-config-dir", action="append", default=[],
                     help="directory with existing SGLang/vLLM tuned files to warm-start from (repeatable)")
    how.add_argument("--no-confirm", action="store_true",
                     help="on the GPU, do not re-measure the close contenders and SGLang's default before export "
                          "(by default each batch size's best few are timed three more times and ranked by the medians)")
    how.add_argument("--no-down-config", action="store_true",
                     help="tune one config for both GEMMs; by default, where each GEMM can be timed (GPU, CPU "
                          "interpreter) and the target is SGLang, a config per GEMM is tuned and SGLang's "
                          "<name>_down.json written beside the up file (docs/tuning.md); vLLM runs one config for both")
    how.add_argument("--no-tma", action="store_true",
                     help="never offer USE_TMA; by default, on a GPU with tensor descriptors (Hopper) and for SGLang, "
                          "each GEMM's TMA loads are a tunable (docs/kernel.md)")
    how.add_argument("--routing", default="uniform",
                     help="routing of the timed calls: uniform (default), zipf<s> (skewed expert popularity, e.g. "
                          "zipf1.2) or trace:PATH (SGLang's topk_ids dumps, .pt or .npy; docs/routing.md)")
    how.add_argument("--kernel", default="builtin",
                     help="kernel to time: builtin (default), or sglang / vllm: the installed engine's own kernel "
                          "(docs/kernel.md), or sglang-kernel=DIR / vllm-kernel=DIR: the engine's own GEMM kernel "
                          "from a folder of its files (docs/engines.md)")
    how.add_argument("--target", default=None, choices=["sglang", "vllm"],
                     help="the engine the configs are for: its launch rules, its default config (the speedups' "
                          "baseline) and whose files are written: sglang writes SGLang's and vLLM's, vllm only vLLM's "
                          "(default sglang for the builtin kernel, the engine itself for an engine's kernel)")
    how.add_argument("--device", default=None, help="CUDA device, e.g. cuda:1")
    how.add_argument("--compile-workers", type=int, default=None,
                     help="processes compiling configs ahead of timing (default: usable CPU cores - 2, at most 15)")
    how.add_argument("--workers", type=int, default=1,
                     help="processes searching the studies together, one per GPU (default 1); they share a "
                          "journal:PATH or postgresql:// storage (default journal:studies/<model>.journal), not "
                          "SQLite; see docs/operations.md")
    how.add_argument("--tune", action="store_true",
                     help="accepted for the engines' tuner command lines (this command always tunes)")
    out = p.add_argument_group("output")
    out.add_argument("--output-dir", "--save-dir", dest="output_dir", default="moe_configs",
                     help="where config files go (default ./moe_configs): SGLang's configs/triton_X_Y_Z/ "
                          "layout (point SGLANG_MOE_CONFIG_DIR here) and vLLM files (VLLM_TUNED_CONFIG_FOLDER)")
    out.add_argument("--no-export", action="store_true", help="do not write config files")
    p.set_defaults(func=_cmd_tune)

    p = command("bench", help="measure config files against SGLang's default at each batch size",
                description="vLLM's benchmark_moe.py without --tune: time the config an engine would pick from "
                            "each given file (the nearest batch size's entry) and SGLang's default config, at each "
                            "batch size, on this GPU (or a replay table, or the CPU interpreter). Without CONFIG, "
                            "the file SGLang or vLLM would load for this shape (SGLANG_MOE_CONFIG_DIR, "
                            "VLLM_TUNED_CONFIG_FOLDER, or the files the installed engine ships). " + CPU_MEASURE_NOTE)
    p.add_argument("configs", nargs="*", metavar="CONFIG",
                   help="a tuned-config file, or a folder laid out for SGLang (configs/triton_X_Y_Z/) or vLLM")
    src = p.add_argument_group("what to measure")
    _add_shape_args(src)
    _add_batch_size_args(src, "the file's batch sizes (with --replay, those the table has); 1,8,32 on the CPU "
                              "interpreter")
    src.add_argument("--engine", choices=["sglang", "vllm"], default=None,
                     help="without CONFIG: only this engine's lookup (default: both)")
    src.add_argument("--device", default=None, help="CUDA device, e.g. cuda:1")
    src.add_argument("--tune", action="store_true", help=argparse.SUPPRESS)
    src.add_argument("-o", "--output", action="append", metavar="PATH",
                     help="also write the table as CSV or JSON (by the suffix; repeatable)")
    p.set_defaults(func=_cmd_bench)

    p = command("check", help="flag batch sizes where the config file the engine loads is slow here",
                description="Drift check: find the file SGLang (or vLLM) would load for this model on this GPU and "
                            "Triton version (SGLang: configs/triton_X_Y_Z/<name> for the running Triton, then the "
                            "other triton_* folders newest first; the name omits K and topk, so another model's "
                            "file can be loaded), re-measure it against SGLang's default and a short tune, and "
                            "flag the batch sizes where it is slower, with the command that fixes it. Exit code 1 "
                            "when a batch size is flagged. " + CPU_MEASURE_NOTE)
    src = p.add_argument_group("what to check")
    _add_shape_args(src)
    _add_batch_size_args(src, "the file's batch sizes, else SGLang's 18 (with --replay, those the table has); "
                              "1,8,32 on the CPU interpreter")
    src.add_argument("--engine", choices=["sglang", "vllm"], default="sglang",
                     help="whose lookup to follow (default sglang)")
    src.add_argument("--config-dir", action="append", default=[], metavar="DIR",
                     help="look here first, as SGLANG_MOE_CONFIG_DIR / VLLM_TUNED_CONFIG_FOLDER would make the "
                          "engine do (repeatable; default: those variables, then the installed engine's files)")
    src.add_argument("--n-trials", type=int, default=16,
                     help="trials of the short tune per batch size (default 16)")
    src.add_argument("--tolerance", type=float, default=0.03,
                     help="flag a batch size where the file is this much slower (default 0.03 = 3%%)")
    src.add_argument("--device", default=None, help="CUDA device, e.g. cuda:1")
    p.set_defaults(func=_cmd_check)

    p = command("export", help="rebuild SGLang/vLLM config files from a study storage alone",
                description="Write the best config of every batch size of every moe_opt study in "
                            "STORAGE as SGLang and vLLM config files.")
    p.add_argument("storage", metavar="STORAGE", help=STORAGE_HELP)
    p.add_argument("-o", "--output-dir", "--save-dir", dest="output_dir", default="moe_configs",
                   help="default ./moe_configs")
    p.set_defaults(func=_cmd_export)

    p = command("record", help="write a replay table (CSV) from the trials in a study storage",
                description="Turn the trials of moe_opt studies (typically an exhaustive --sampler grid "
                            "tune) into a replay table for `moe-opt tune --replay`.")
    p.add_argument("storage", metavar="STORAGE", help=STORAGE_HELP)
    p.add_argument("-o", "--output", required=True, help="CSV path to write")
    p.set_defaults(func=_cmd_record)

    p = command("dashboard", help="watch and explore the studies in optuna-dashboard (a local web page)",
                description="Start optuna-dashboard on a study storage and print its URL. Each study shows "
                            "its shape and device as user attributes and a note with the best config, its "
                            "latency, SGLang's default and the speedup. Ctrl-C stops.")
    p.add_argument("storage", metavar="STORAGE", nargs="?", default=None,
                   help=STORAGE_HELP + " (default: the most recently modified studies/*.db or studies/*.journal)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 = any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1, this machine only; 0.0.0.0 or '' for all)")
    p.set_defaults(func=_cmd_dashboard)

    p = command("report", help="write an offline HTML report with plots, plus the summary as CSV/Markdown",
                description="One self-contained HTML page per storage (plotly.js embedded): latency and "
                            "speedup by batch size, search progress, parameter importance and achieved "
                            "bandwidth, per shape. report.csv and report.md are written beside it.")
    p.add_argument("storage", metavar="STORAGE", help=STORAGE_HELP)
    p.add_argument("-o", "--output", default="report.html", help="HTML path (default ./report.html)")
    p.add_argument("--table", default=None, help="recorded grid table (CSV) whose optimum the report compares with")
    p.add_argument("--copy-bandwidth-gbps", type=float, default=None,
                   help="device copy bandwidth in GB/s for the bandwidth plot (default: measured ~3000 for H100, "
                        "~4300 for H200)")
    p.set_defaults(func=_cmd_report)

    p = command("show", help="print the summary table: best config, latency, default, speedup per M",
                description="Per shape and batch size M: best config, its latency, SGLang's default "
                            "latency, speedup, trials and failures.")
    p.add_argument("storage", metavar="STORAGE", help=STORAGE_HELP)
    p.add_argument("--table", default=None, help="recorded grid table (CSV) to add the grid optimum column")
    p.set_defaults(func=_cmd_show)
    return parser


# --- Running a command ---------------------------------------------------------------------------------------------

class _DeferredInterrupt:
    """While a command loads its modules, a first Ctrl-C is remembered, not raised, and raised once they are loaded:
    a KeyboardInterrupt inside an import may be swallowed (torch importing numpy) or leave the interpreter set to
    die by SIGINT. A second Ctrl-C raises at once."""

    def __init__(self) -> None:
        self.count = 0
        self._old = None

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt

    def __enter__(self) -> "_DeferredInterrupt":
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        if self.count and exc_type is None:
            raise KeyboardInterrupt("interrupted during start-up; nothing was done")


def _start_up(command: str) -> None:
    import importlib

    with _DeferredInterrupt():
        for module in _START_UP.get(command, ()):
            try:
                importlib.import_module(module)
            except ImportError:
                pass  # the command itself says what is missing


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``moe-opt`` with ``argv`` (default: the command line); returns the exit code."""
    command = "moe-opt"
    try:
        args = build_parser().parse_args(argv)
        command = f"moe-opt {args.command}"
        _start_up(args.command)
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except MoeOptError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:
        print(f"{command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`moe-opt show ... | head`): say nothing more, and keep Python's exit-time flush of
        # stdout from raising again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())

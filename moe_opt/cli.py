"""The `moe-opt` command: a thin shell over the Python API (each subcommand is one API call)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .errors import MoeOptError


def _cmd_resolve(args: argparse.Namespace) -> int:
    from .model.resolve import resolve_model

    spec = resolve_model(args.model, tp_size=args.tp, ep_size=args.ep, dtype=args.dtype,
                         swiglu_limit=args.swiglu_limit,
                         fuse_shared_experts=not args.no_shared_expert_fusion)
    if args.json:
        print(json.dumps(spec.to_dict(), indent=2, sort_keys=True))
    else:
        for key, value in spec.to_dict().items():
            print(f"{key:26s} {value}")
    return 0


def _batch_sizes(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()] if text else []


def _cmd_tune(args: argparse.Namespace) -> int:
    from .run.tune import tune

    spec = None
    if args.shape:
        spec = _shape_spec(args)
    result = tune(args.model, spec=spec, tp_size=args.tp, ep_size=args.ep, dtype=args.dtype,
                  swiglu_limit=args.swiglu_limit, batch_sizes=_batch_sizes(args.batch_sizes) or None,
                  n_trials=args.n_trials, timeout_s=args.timeout, storage=args.storage, sampler=args.sampler,
                  seed=args.seed, output_dir=None if args.no_export else args.output_dir,
                  warm_start=not args.no_warm_start, tuned_config_dirs=args.tuned_config_dir,
                  device=args.device, replay=args.replay, compile_workers=args.compile_workers,
                  progress=True, n_workers=args.workers, confirm=not args.no_confirm)
    return 130 if result.interrupted else 1 if result.worker_errors else 0


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
                                intermediate_size=ints["intermediate"], dtype=fields.get("dtype") or args.dtype,
                                block_shape=[int(v) for v in block.split("x")] if block else None,
                                tp_size=args.tp, ep_size=args.ep, swiglu_limit=args.swiglu_limit)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-opt",
        description="Tune the Triton fused-MoE kernel's launch configs with Optuna, resumably, and export "
                    "SGLang/vLLM config files.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("resolve", help="print the MoE layer spec (E, N, K, topk, dtype, swiglu_limit) of a model",
                       description="Resolve a model id, local directory or config.json into the MoE spec that "
                                   "tuning uses. Works offline for the bundled catalogue.")
    p.add_argument("model", help="Hub id (e.g. deepseek-ai/DeepSeek-V4-Flash), local directory or config.json path")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (default 1)")
    p.add_argument("--dtype", default=None,
                   help="quantization to tune: fp8_w8a8, or bf16/fp16 for unquantized (default: from the model)")
    p.add_argument("--swiglu-limit", type=float, default=None, help="override the model's swiglu_limit")
    p.add_argument("--no-shared-expert-fusion", action="store_true",
                   help="do not fuse the shared expert into E/topk (SGLang fuses it for DeepSeek-V3-style models)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_resolve)

    p = sub.add_parser("tune", help="tune a model's fused-MoE configs and export SGLang/vLLM config files",
                       description="Run one resumable Optuna study per batch size against the timed fused-MoE "
                                   "kernel, then write config files. Re-running the same command resumes. Ctrl-C "
                                   "stops after the running trial and keeps everything. Without a GPU it runs "
                                   "Triton's CPU interpreter on a scaled-down shape (timings are not performance "
                                   "numbers).")
    src = p.add_argument_group("what to tune")
    src.add_argument("--model", help="Hub id, catalogue name, local directory or config.json")
    src.add_argument("--shape", help="explicit shape instead of --model: E=..,topk=..,K=..,intermediate=.."
                                     "[,dtype=fp8_w8a8][,block=128x128]")
    src.add_argument("--replay", help="take measurements from a recorded CSV table instead of the GPU")
    src.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    src.add_argument("--ep", type=int, default=1, help="expert-parallel size (default 1)")
    src.add_argument("--dtype", default=None, help="fp8_w8a8, bf16 or fp16 (default: from the model)")
    src.add_argument("--swiglu-limit", type=float, default=None, help="override the model's swiglu_limit")
    how = p.add_argument_group("how")
    how.add_argument("--batch-sizes", default="",
                     help="comma-separated, e.g. 1,64,4096 (default: SGLang's 18; the table's with --replay)")
    how.add_argument("--n-trials", type=int, default=None,
                     help="configs measured per batch size, failures included, counted across resumed runs "
                          "(default 48)")
    how.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    how.add_argument("--sampler", default="moe", choices=["moe", "tpe", "random", "grid"],
                     help="search strategy (default moe; grid = exhaustive)")
    how.add_argument("--seed", type=int, default=None, help="sampler seed")
    how.add_argument("--storage", default=None,
                     help="Optuna storage URL (default sqlite:///studies/<model>.db); journal:PATH for a file "
                          "journal; postgresql://... for many hosts")
    how.add_argument("--no-warm-start", action="store_true",
                     help="do not measure SGLang's default and existing tuned configs first")
    how.add_argument("--tuned-config-dir", action="append", default=[],
                     help="directory with existing SGLang/vLLM tuned files to warm-start from (repeatable)")
    how.add_argument("--no-confirm", action="store_true",
                     help="on the GPU, do not re-measure the close contenders and SGLang's default before export "
                          "(by default each batch size's best few are timed three more times and ranked by the medians)")
    how.add_argument("--device", default=None, help="CUDA device, e.g. cuda:1")
    how.add_argument("--compile-workers", type=int, default=None,
                     help="processes compiling configs ahead of timing (default: usable CPU cores - 2, at most 15)")
    how.add_argument("--workers", type=int, default=1,
                     help="processes searching the studies together, one per GPU (default 1); they share a "
                          "journal:PATH or postgresql:// storage (default journal:studies/<model>.journal), not "
                          "SQLite; see docs/operations.md")
    out = p.add_argument_group("output")
    out.add_argument("--output-dir", default="moe_configs",
                     help="where config files go (default ./moe_configs): SGLang's configs/triton_X_Y_Z/ "
                          "layout (point SGLANG_MOE_CONFIG_DIR here) and vLLM files (VLLM_TUNED_CONFIG_FOLDER)")
    out.add_argument("--no-export", action="store_true", help="do not write config files")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("export", help="rebuild SGLang/vLLM config files from a study storage alone",
                       description="Write the best config of every batch size of every moe_opt study in "
                                   "STORAGE as SGLang and vLLM config files.")
    p.add_argument("storage", help="Optuna storage URL, e.g. sqlite:///studies/DeepSeek-V4-Flash.db")
    p.add_argument("-o", "--output-dir", default="moe_configs", help="default ./moe_configs")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("record", help="write a replay table (CSV) from the trials in a study storage",
                       description="Turn the trials of moe_opt studies (typically an exhaustive --sampler grid "
                                   "tune) into a replay table for `moe-opt tune --replay`.")
    p.add_argument("storage", help="Optuna storage URL")
    p.add_argument("-o", "--output", required=True, help="CSV path to write")
    p.set_defaults(func=_cmd_record)

    p = sub.add_parser("dashboard", help="watch and explore the studies in optuna-dashboard (a local web page)",
                       description="Start optuna-dashboard on a study storage and print its URL. Each study shows "
                                   "its shape and device as user attributes and a note with the best config, its "
                                   "latency, SGLang's default and the speedup. Ctrl-C stops.")
    p.add_argument("storage", nargs="?", default=None,
                   help="Optuna storage URL or .db path (default: the most recently modified studies/*.db or "
                        "studies/*.journal)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 = any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for all)")
    p.set_defaults(func=_cmd_dashboard)

    p = sub.add_parser("report", help="write an offline HTML report with plots, plus the summary as CSV/Markdown",
                       description="One self-contained HTML page per storage (plotly.js embedded): latency and "
                                   "speedup by batch size, search progress, parameter importance and achieved "
                                   "bandwidth, per shape. report.csv and report.md are written beside it.")
    p.add_argument("storage", help="Optuna storage URL or .db path")
    p.add_argument("-o", "--output", default="report.html", help="HTML path (default ./report.html)")
    p.add_argument("--table", default=None, help="recorded grid table (CSV) whose optimum the report compares with")
    p.add_argument("--copy-bandwidth-gbps", type=float, default=None,
                   help="device copy bandwidth in GB/s for the bandwidth plot (default: measured ~3000 for H100, "
                        "~4300 for H200)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("show", help="print the summary table: best config, latency, default, speedup per M",
                       description="Per shape and batch size M: best config, its latency, SGLang's default "
                                   "latency, speedup, trials and failures.")
    p.add_argument("storage", help="Optuna storage URL or .db path")
    p.add_argument("--table", default=None, help="recorded grid table (CSV) to add the grid optimum column")
    p.set_defaults(func=_cmd_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MoeOptError as exc:
        print(f"moe-opt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"moe-opt {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

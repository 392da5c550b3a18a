"""The `moe-opt` command: a thin shell over the Python API (each subcommand is one API call)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .errors import MoeOptError


def _cmd_resolve(args: argparse.Namespace) -> int:
    from .models import resolve_model

    spec = resolve_model(args.model, tp_size=args.tp, ep_size=args.ep, dtype=args.dtype,
                         swiglu_limit=args.swiglu_limit,
                         fuse_shared_experts=not args.no_shared_expert_fusion)
    if args.json:
        print(json.dumps(spec.to_dict(), indent=2, sort_keys=True))
    else:
        for key, value in spec.to_dict().items():
            print(f"{key:26s} {value}")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MoeOptError as exc:
        print(f"moe-opt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moe-opt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

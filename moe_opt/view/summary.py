"""The summary a tune prints at its end: per batch size the tuned config, its latency, SGLang's default and the
speedup, then what the user should know, where the studies are and what to do next."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from ..run.result import TuneResult
from ..space import Config

REPORT_PATH = "report.html"
ENGINE_NAMES = {"sglang": "SGLang", "vllm": "vLLM"}  # a target engine as its docs spell it


def storage_argument(storage: Any) -> str | None:
    """How to name a tune's storage on the command line of show/report/dashboard/export, or None for one that
    does not outlive the process (in memory, a storage object).

    Example:
        >>> storage_argument("sqlite:///studies/DeepSeek-V4-Flash.db")
        'studies/DeepSeek-V4-Flash.db'
        >>> storage_argument("journal:studies/x.journal"), storage_argument("sqlite:///:memory:")
        ('studies/x.journal', None)
    """
    from ..store.storage import StorageURL

    if not isinstance(storage, str):
        return None
    parsed = StorageURL.parse(storage)
    if parsed.kind == "memory":
        return None
    if parsed.path is not None:  # a bare .db/.journal path is what the commands accept most simply
        path = str(parsed.path)
        bare = path.endswith((".db", ".journal"))
        return path if bare else parsed.url
    return parsed.shown


def _output_dir(result: TuneResult) -> Path | None:
    """The folder to point SGLANG_MOE_CONFIG_DIR and VLLM_TUNED_CONFIG_FOLDER at (the vLLM file lies in it)."""
    vllm = result.files.get("vllm")
    return Path(vllm).parent if vllm is not None else None


def next_steps(result: TuneResult) -> list[str]:
    """Where the studies are and the commands that use them and the files, as lines to print.

    Example:
        >>> r = TuneResult({}, {}, {}, {}, "sqlite:///studies/x.db", {}, True, None)
        >>> print("\\n".join(next_steps(r)))  # doctest: +NORMALIZE_WHITESPACE
        studies: sqlite:///studies/x.db (run the same command again to resume or add trials)
        next:
          moe-opt show studies/x.db                   # the table again
          moe-opt report studies/x.db -o report.html  # plots as one offline HTML page
          moe-opt dashboard studies/x.db              # the studies in optuna-dashboard
    """
    from ..store.storage import StorageURL

    lines = []
    arg = storage_argument(result.storage)
    in_memory = type(result.storage).__name__ == "InMemoryStorage" or (
        isinstance(result.storage, str) and StorageURL.parse(result.storage).kind == "memory")
    if in_memory:  # tune() keeps sqlite:///:memory: as Optuna's InMemoryStorage object
        lines.append("studies: in memory: gone when this process ends (pass a storage such as studies/x.db to keep "
                     "them)")
    elif isinstance(result.storage, str):
        lines.append(f"studies: {StorageURL.parse(result.storage).shown} (run the same command again to resume or "
                     "add trials)")
    else:
        lines.append(f"studies: the {type(result.storage).__name__} given to tune(); moe_opt.summary(storage) and "
                     "moe_opt.report(storage) read it")
    steps: list[tuple[str, str]] = []
    if arg is not None:
        q = shlex.quote(arg)
        steps += [(f"moe-opt show {q}", "the table again"),
                  (f"moe-opt report {q} -o {REPORT_PATH}", "plots as one offline HTML page"),
                  (f"moe-opt dashboard {q}", "the studies in optuna-dashboard")]
    folder = _output_dir(result)
    engines: list[str] = []
    if folder is not None:
        where = shlex.quote(str(folder.resolve()))
        if result.is_performance:
            if "sglang" in result.files or not result.files:
                engines.append(f"SGLang: export SGLANG_MOE_CONFIG_DIR={where}   (it reads configs/triton_X_Y_Z/ "
                               "under it)")
            engines.append(f"vLLM:   export VLLM_TUNED_CONFIG_FOLDER={where}")
            spec = result.spec
            if spec is not None and spec.model:
                parallel = f" --tp {spec.tp_size}" + (f" --ep {spec.ep_size}" if spec.ep_size != 1 else "")
                steps.append((f"moe-opt check --model {shlex.quote(spec.model)}{parallel} --config-dir {where}",
                              "later: re-measure the file (new Triton, driver or engine)"))
        else:
            engines.append("no engine loads these files: they are named device_name=cpu-interpreter and hold "
                           "interpreter timings; run the same command on the GPU you serve on")
    if steps:
        width = max(len(cmd) for cmd, _ in steps if len(cmd) <= 60) if any(len(c) <= 60 for c, _ in steps) else 0
        lines.append("next:")
        lines += [f"  {cmd:{width}s}  # {what}" for cmd, what in steps]
    lines += engines
    return lines


def summary_text(result: TuneResult) -> str:
    """A short table: batch size, tuned config, latency, SGLang default latency, speedup; then what to know, the
    files, the studies and the next steps."""
    perf = result.is_performance
    mark = "" if perf else "*"
    lines = []
    if not perf:
        lines.append("* Triton CPU interpreter on a scaled-down shape: wall-clock times and their ratios, NOT "
                     "performance numbers")
    lines.append(f"{'M':>6}  {'best config':28s} {'us' + mark:>11} {'default us' + mark:>11} "
                 f"{'speedup' + mark:>8} {'trials':>6}")
    for M in sorted(result.best):
        d = result.default_latency_us.get(M)
        lines.append(f"{M:>6}  {str(Config.from_dict(result.best[M])):28s} {result.latency_us[M]:>11.2f} "
                     f"{d if d is not None else float('nan'):>11.2f} "
                     f"{(d / result.latency_us[M]) if d else float('nan'):>7.3f}x {result.trials_used.get(M, 0):>6}")
    missing = sorted(set(result.trials_used) - set(result.best))
    if missing:
        lines.append(f"no result at M={','.join(map(str, missing))}")
    g = result.geomean_speedup()
    if g and perf:
        lines.append(f"geometric-mean speedup over {ENGINE_NAMES[result.target]}'s default: "
                     f"{g:.3f}x")
    elif g:
        lines.append(f"geometric-mean ratio of interpreter times: {g:.3f}x (says nothing about a GPU)")
    else:
        lines.append("default config not measured")
    if not perf:
        spec = f" ({result.spec})" if result.spec is not None else ""
        lines.append(f"NOTE: no GPU: Triton's CPU interpreter ran a scaled-down shape{spec}; by default at batch "
                     "sizes 1, 8, 32 with 4 trials each. These timings exercise the tuner, they are not performance "
                     "numbers. On a GPU the same command tunes the real shape at SGLang's 18 batch sizes.")
    for M, reasons in sorted(result.excluded.items()):
        for reason in reasons:
            lines.append(f"correctness guard, M={M}: excluded {reason}")
    lines += result.notes + [f"moe-opt: {e}" for e in result.worker_errors]
    for kind, path in result.files.items():
        lines.append(f"wrote {kind}: {path}")
    lines.append(f"wall time {result.wall_s:.1f} s" + (" (interrupted)" if result.interrupted else ""))
    t = result.timings
    if t:
        compiled = f", {t['compiled']:.0f} configs compiled" if "compiled" in t else ""
        lines.append(f"time: start-up {t['start_s']:.1f} s, trials {t['search_s']:.1f} s (waiting for measurements "
                     f"{t['measuring_s']:.1f} s, for compiles {t['compile_wait_s']:.1f} s; {t['measured']:.0f} "
                     f"measured{compiled}), re-measuring contenders {t['confirm_s']:.1f} s, guard {t['guard_s']:.1f} s, "
                     f"results and export {t['collect_export_s']:.1f} s")
    lines += next_steps(result)
    return "\n".join(lines)

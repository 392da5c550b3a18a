"""check(): is the config file an engine loads for this model still good on this GPU and Triton version?

A tuned file goes stale: a new Triton compiles the same config into a different kernel, a new driver or GPU
changes the timings, and SGLang's lookup hands a model whatever file matches E, N and the quantization, tuned for
another model or on another Triton version (run/lookup.py). The drift check finds the file the engine would load,
re-measures the config it would run at each batch size against SGLang's default and against a short tune (warm
started from the file, so it is never worse than the file by more than noise), and flags the batch sizes where the
file is slower by more than a tolerance, with the ``moe-opt tune`` command that writes a better file.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..export.engines import load_tuned_configs
from ..model.spec import ModelSpec
from ..space import DEFAULT_BATCH_SIZES, Config
from .bench import Timed, measuring, nearest_entry
from .lookup import ENV_VARS, EngineFile, engine_files

DEFAULT_CHECK_TRIALS = 16
DEFAULT_TOLERANCE = 0.03


@dataclass
class CheckRow:
    """One batch size: what the engine runs (the file's nearest entry, or the default without a file), SGLang's
    default, the short tune's best, and why the batch size is flagged (empty: it is fine)."""

    M: int
    entry: int | None
    file: Timed | None
    default: Timed
    tuned_config: Config | None
    tuned_us: float | None
    flags: list[str] = field(default_factory=list)

    @property
    def engine_us(self) -> float | None:
        """The latency of what the engine runs at M."""
        return self.file.latency_us if self.file is not None else self.default.latency_us


@dataclass
class CheckResult:
    """What check() found. ``flagged`` lists the batch sizes where the engine's file (or its default, without a
    file) is slower than it could be; ``fix`` is the command that writes a better file."""

    engine: str
    file: EngineFile | None
    rows: list[CheckRow]
    spec: ModelSpec
    device_name: str
    description: str
    is_performance: bool
    triton_version: str
    n_trials: int
    tolerance: float
    fix: str
    notes: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> list[int]:
        return [r.M for r in self.rows if r.flags]


def tune_command(spec: ModelSpec) -> str:
    """The `moe-opt tune` command for a spec: by model where it has one, else by shape.

    Example:
        >>> tune_command(ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=4096, intermediate_size=14336,
        ...                                   tp_size=2))
        'moe-opt tune --shape E=8,topk=2,K=4096,intermediate=14336 --tp 2'
    """
    if spec.model:
        parts = ["moe-opt", "tune", "--model", spec.model]
    else:
        shape = f"E={spec.num_experts},topk={spec.topk},K={spec.hidden_size},intermediate={spec.intermediate_size}"
        shape += f",dtype={spec.dtype}" if spec.dtype else ""
        shape += f",block={spec.block_shape[0]}x{spec.block_shape[1]}" if spec.block_shape else ""
        parts = ["moe-opt", "tune", "--shape", shape]
    if spec.tp_size != 1:
        parts += ["--tp", str(spec.tp_size)]
    if spec.ep_size != 1:
        parts += ["--ep", str(spec.ep_size)]
    return " ".join(shlex.quote(p) for p in parts)


def _flags(row: CheckRow, tolerance: float, has_file: bool) -> list[str]:
    flags = []
    if has_file and row.file.latency_us is None:
        return [f"the file's config fails here: {row.file.error}"]
    us = row.engine_us
    if us is None:
        return flags
    d = row.default.latency_us
    if has_file and d is not None and us > d * (1 + tolerance):
        flags.append(f"{us / d:.2f}x slower than SGLang's default")
    if row.tuned_us is not None and us > row.tuned_us * (1 + tolerance):
        flags.append(f"{us / row.tuned_us:.2f}x slower than a short tune")
    return flags


def check(model: str | None = None, *, spec: ModelSpec | None = None, tp_size: int = 1, ep_size: int = 1,
          dtype: str | None = None, replay: str | os.PathLike | None = None, batch_sizes: Sequence[Any] | None = None,
          device: str | None = None, engine: str = "sglang", config_dirs: Sequence[str | os.PathLike] = (),
          n_trials: int = DEFAULT_CHECK_TRIALS, tolerance: float = DEFAULT_TOLERANCE, progress: bool = False,
          fix_command: str | None = None) -> CheckResult:
    """Re-measure the config file ``engine`` would load for this shape here, against SGLang's default and a short
    tune, and flag the batch sizes where it is slower by more than ``tolerance``.

    Args:
        model, spec, tp_size, ep_size, dtype: the shape (a replay table's own when neither is given).
        replay: take every latency from a recorded table instead of the GPU.
        batch_sizes: default the file's batch sizes (SGLang's 18 without a file; in replay mode those the table
            has, else the table's); 1, 8, 32 on the CPU interpreter.
        device: CUDA device, e.g. "cuda:1".
        engine: whose lookup to follow, "sglang" (default) or "vllm".
        config_dirs: folders to look in first, as SGLANG_MOE_CONFIG_DIR / VLLM_TUNED_CONFIG_FOLDER would.
        n_trials: trials of the short tune per batch size (in memory; nothing is written).
        tolerance: how much slower (0.03 = 3%) the engine's config may be before its batch size is flagged.
        progress: say on stderr what is being measured.
        fix_command: the command the result recommends (default: ``moe-opt tune`` for the spec).

    Returns:
        CheckResult; ``check_text(result)`` is what ``moe-opt check`` prints.

    Example:
        >>> r = check(replay="moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv",
        ...           config_dirs=["moe_configs"])  # doctest: +SKIP
        >>> r.flagged  # doctest: +SKIP
        [1024, 4096]
    """
    from .tune import _check_count, tune

    _check_count("n_trials", n_trials)
    if not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        from ..errors import TuneError

        raise TuneError(f"tolerance {tolerance!r} must be a fraction in [0, 1), e.g. 0.03 for 3%")
    if spec is None and model is not None:
        from ..model.resolve import resolve_model

        spec = resolve_model(model, tp_size=tp_size, ep_size=ep_size, dtype=dtype)
    with measuring(spec, replay=replay, device=device) as m:
        found = engine_files(m.spec, m.info.device_name, engine, config_dirs=config_dirs,
                             triton_version=m.triton_version)
        file = found[0] if found else None
        configs = load_tuned_configs(file.path) if file is not None else {}
        Ms = m.check_batch_sizes(batch_sizes if batch_sizes is not None else
                                 m.default_batch_sizes(sorted(configs), DEFAULT_BATCH_SIZES))
        say = (lambda text: print(f"moe-opt check: {text}", file=sys.stderr, flush=True)) if progress else \
            (lambda text: None)
        say(f"{engine} would load {file.label if file else 'no tuned file (its default config everywhere)'}")
        say(f"measuring it and SGLang's default at {len(Ms)} batch sizes, then a short tune ({n_trials} trials each)")
        rows = []
        for M in Ms:
            entry = nearest_entry(configs, M) if configs else None
            rows.append(CheckRow(M, entry, m.measure(configs[entry], M) if configs else None,
                                 m.measure(m.default_config(M), M), None, None))
        dirs = sorted({str(f.path.parent) for f in found})
        short = tune(spec=m.spec, measurer=m.session.measurer, compile_pool=m.session.pool, replay=replay,
                     batch_sizes=Ms, n_trials=n_trials, storage="sqlite:///:memory:", output_dir=None, progress=False,
                     tuned_config_dirs=dirs, guard=False, confirm=False)
        for row in rows:
            if row.M in short.best:
                row.tuned_config, row.tuned_us = Config.from_dict(short.best[row.M]), short.latency_us[row.M]
            row.flags = _flags(row, tolerance, file is not None)
        notes = []
        if file is not None:
            notes.append(f"the file's name holds E, N, the device and the quantization, not K or topk: {engine} "
                         f"loads it for every model with E={m.spec.E}, N={m.spec.N} here, whatever it was tuned for")
            folder = "triton_" + m.triton_version.replace(".", "_")
            if file.triton_folder and file.triton_folder != folder:
                notes.append(f"there is no {folder} file for this shape: SGLang falls back to {file.triton_folder} "
                             f"(tuned with another Triton than the running {m.triton_version})")
        if not m.info.is_performance:
            notes.append(f"no GPU: Triton's CPU interpreter timed a scaled-down shape ({m.spec}); its times are not "
                         "performance numbers and the flags below say nothing about a GPU")
        return CheckResult(engine, file, rows, m.spec, m.info.device_name, m.info.description, m.info.is_performance,
                           m.triton_version, n_trials, float(tolerance), fix_command or tune_command(spec or m.spec),
                           notes)


def check_text(result: CheckResult) -> str:
    """What ``moe-opt check`` prints: the file, a row per batch size, the flagged ones and the fix."""
    f = result.file
    star = "" if result.is_performance else "*"
    lines = [f"moe-opt check: {result.spec} on {result.device_name}, Triton {result.triton_version} "
             f"({result.description})"]
    if f is not None:
        lines.append(f"{result.engine} loads {f.path}")
        lines.append(f"  found through {f.where}")
    else:
        var = ENV_VARS[result.engine]
        lines.append(f"{result.engine} finds no tuned file for this shape here ({var} unset or without one, and no "
                     f"installed {result.engine} ships one): it runs SGLang's default config at every batch size")
    lines += [f"note: {n}" for n in result.notes]
    what = "file config" if f is not None else "default config"
    lines.append(f"{'M':>6}  {'entry':>5}  {what:26s} {'us' + star:>11} {'default us' + star:>11} "
                 f"{f'tuned us ({result.n_trials} trials)' + star:>24}  verdict")
    for r in result.rows:
        config = r.file.config if r.file is not None else r.default.config
        us = r.engine_us
        cells = [f"{us:.2f}" if us is not None else "failed",
                 f"{r.default.latency_us:.2f}" if r.default.latency_us is not None else "failed",
                 f"{r.tuned_us:.2f}" if r.tuned_us is not None else "-"]
        entry = str(r.entry) if r.entry is not None else "-"
        verdict = "SLOWER: " + "; ".join(r.flags) if r.flags else "ok"
        lines.append(f"{r.M:>6}  {entry:>5}  {str(config):26s} {cells[0]:>11} {cells[1]:>11} {cells[2]:>24}  {verdict}")
    flagged = result.flagged
    if flagged:
        lines.append(f"{len(flagged)} of {len(result.rows)} batch sizes are more than {result.tolerance:.0%} slower "
                     f"than they could be: M={','.join(map(str, flagged))}")
        lines.append(f"fix: {result.fix}")
        lines.append(f"     then point {ENV_VARS[result.engine]} at its output folder (moe_configs by default)")
    else:
        lines.append(f"every batch size is within {result.tolerance:.0%} of SGLang's default and of a short tune")
    return "\n".join(lines)

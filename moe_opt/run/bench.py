"""bench(): measure tuned-config files against SGLang's default config at each batch size (vLLM's
``benchmarks/kernels/benchmark_moe.py`` without ``--tune``).

At each batch size M the config an engine would run is timed: the file's entry for the batch size nearest M (SGLang
and vLLM both pick ``min(keys, key=lambda k: abs(k - M))``), and SGLang's default config beside it. Timing goes
through the tune's own measurers, built by :class:`~moe_opt.run.session.TuneSession`: the CUDA-graph timer in its
isolated process on a GPU, a replay table, or Triton's CPU interpreter (a scaled-down shape, not performance
numbers).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import TuneError
from ..export.engines import load_tuned_configs
from ..model.spec import ModelSpec
from ..space import Config
from .lookup import ENGINES, EngineFile, engine_files, files_in

BENCH_COLUMNS = ("file", "where", "M", "entry", "config", "latency_us", "default_config", "default_us", "speedup",
                 "error", "device", "measurement", "is_performance")


def nearest_entry(configs: dict[int, Config], M: int) -> int:
    """The batch size whose config an engine runs at M: the nearest key (ties to the smaller one, as ``min`` over
    the sorted keys gives).

    Example:
        >>> nearest_entry({1: None, 64: None, 256: None}, 100)
        64
    """
    return min(sorted(configs), key=lambda key: abs(key - M))


@dataclass(frozen=True)
class Timed:
    """One config timed at one batch size: its latency, or why it failed."""

    config: Config
    latency_us: float | None
    error: str | None = None


@dataclass
class Measuring:
    """What measures, opened through a TuneSession (run/session.py): the measurer, the compile pool, the spec it
    measures (scaled down on the interpreter), the device and the batch sizes it supports by default."""

    session: Any

    @property
    def spec(self) -> ModelSpec:
        return self.session.spec

    @property
    def info(self):
        return self.session.info

    @property
    def triton_version(self) -> str:
        return self.session.identity().triton_version

    def default_batch_sizes(self, in_files: Sequence[int], otherwise: Sequence[int] = ()) -> list[int]:
        """Where to measure when no batch size is given: the files' batch sizes (those a replay table has rows for;
        all of the table's where it has none of them), or ``otherwise`` without files; the interpreter's (1, 8, 32:
        it takes seconds a config)."""
        table = self.session.table
        if table is not None:
            return [M for M in in_files if M in table.entries] or list(table.batch_sizes)
        if self.info.kind == "interpreter":
            return list(self.session.plan.batch_sizes)
        return list(in_files) or list(otherwise)

    def default_config(self, M: int) -> Config:
        return self.session.backend.default_config(self.spec, M)

    def check_batch_sizes(self, batch_sizes: Sequence[Any]) -> list[int]:
        from .session import check_batch_sizes

        Ms = check_batch_sizes(batch_sizes)
        table = self.session.table
        if table is not None:
            missing = [M for M in Ms if M not in table.entries]
            if missing:
                raise TuneError(f"replay table {table.path.name} has no rows for batch size {missing[0]}; it has "
                                f"{', '.join(map(str, table.batch_sizes))}")
        return Ms

    def measure(self, config: Config, M: int) -> Timed:
        from .scheduler import measure_one

        m = measure_one(self.session.measurer, self.session.pool, config, M)
        return Timed(config, m.latency_us, m.error)


@contextlib.contextmanager
def measuring(spec: ModelSpec | None, *, replay: str | os.PathLike | None = None, device: str | None = None,
              kernel: str = "builtin") -> Iterator[Measuring]:
    """The tune's measurer for ``spec`` (a GPU's isolated CUDA-graph timer and compile pool, a replay table, or
    the CPU interpreter), closed on leaving."""
    from .session import TunePlan, TuneSession

    plan = TunePlan(spec=spec, replay=replay, device=device, progress=False, output_dir=None, kernel=kernel)
    with TuneSession(plan) as session:
        if spec is not None:
            why = session.backend.unsupported(spec)
            if why is not None:
                raise TuneError(why)
        session.open_measurer()  # the tune's own construction (TuneSession.prepare's first step)
        if session.spec is None:
            raise TuneError(f"replay table {Path(replay).name} records no model spec; give --model or --shape")
        yield Measuring(session)


@dataclass
class BenchRow:
    """One file at one batch size M, beside SGLang's default config."""

    file: str
    where: str
    M: int
    entry: int
    config: Config
    latency_us: float | None
    default_config: Config
    default_us: float | None
    error: str | None = None

    @property
    def speedup(self) -> float | None:
        """default latency / the file's latency, where both were measured."""
        if self.latency_us is None or self.default_us is None:
            return None
        return self.default_us / self.latency_us


@dataclass
class BenchResult:
    """What bench() measured: a row per file and batch size, and what measured it."""

    rows: list[BenchRow]
    files: list[EngineFile]
    spec: ModelSpec
    device_name: str
    description: str
    is_performance: bool
    notes: list[str] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        """The rows as plain dicts with BENCH_COLUMNS (configs as SGLang's JSON objects)."""
        out = []
        for r in self.rows:
            out.append({"file": r.file, "where": r.where, "M": r.M, "entry": r.entry, "config": r.config.to_dict(),
                        "latency_us": r.latency_us, "default_config": r.default_config.to_dict(),
                        "default_us": r.default_us, "speedup": r.speedup, "error": r.error,
                        "device": self.device_name, "measurement": self.description,
                        "is_performance": self.is_performance})
        return out


def find_files(spec: ModelSpec, device_name: str, engine: str | None, *, triton_version: str | None,
               config_dirs: Sequence[str | os.PathLike] = ()) -> list[EngineFile]:
    """The file each engine would load (its first hit), for the engines asked."""
    out = []
    for name in ([engine] if engine else ENGINES):
        hits = engine_files(spec, device_name, name, config_dirs=config_dirs, triton_version=triton_version)
        out += hits[:1]
    return out


def bench(configs: Sequence[str | os.PathLike] = (), *, spec: ModelSpec | None = None, model: str | None = None,
          tp_size: int = 1, ep_size: int = 1, dtype: str | None = None, replay: str | os.PathLike | None = None,
          batch_sizes: Sequence[Any] | None = None, device: str | None = None, engine: str | None = None) -> BenchResult:
    """Time the config an engine would run from each file, and SGLang's default, at each batch size.

    Args:
        configs: tuned-config files, or folders laid out for SGLang (``configs/triton_X_Y_Z/``) or vLLM; none: the
            file SGLang and vLLM would load for this shape (their variables, or the files an installed engine ships).
        spec, model, tp_size, ep_size, dtype: the shape (a replay table's own when neither spec nor model is given).
        replay: take every latency from a recorded table instead of the GPU.
        batch_sizes: default the files' batch sizes (in replay mode those the table has, else the table's); 1, 8,
            32 on the CPU interpreter.
        device: CUDA device, e.g. "cuda:1".
        engine: without ``configs``, only this engine's lookup ("sglang" or "vllm").

    Returns:
        BenchResult; ``bench_text(result)`` is the table ``moe-opt bench`` prints.

    Example:
        >>> r = bench(["moe_configs"], replay="moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv")  # doctest: +SKIP
        >>> [(row.M, round(row.speedup, 2)) for row in r.rows][:2]  # doctest: +SKIP
        [(1, 1.22), (16, 1.32)]
    """
    if spec is None and model is not None:
        from ..model.resolve import resolve_model

        spec = resolve_model(model, tp_size=tp_size, ep_size=ep_size, dtype=dtype)
    with measuring(spec, replay=replay, device=device) as m:
        files = files_in(configs, m.spec, m.info.device_name, triton_version=m.triton_version) if configs else \
            find_files(m.spec, m.info.device_name, engine, triton_version=m.triton_version)
        if not files:
            names = " or ".join(sorted({m.spec.config_file_name(m.info.device_name, engine=e) for e in ENGINES}))
            raise TuneError(f"no config file given, and neither SGLang nor vLLM would find one for this shape on "
                            f"{m.info.device_name} ({names}: not under SGLANG_MOE_CONFIG_DIR, "
                            "VLLM_TUNED_CONFIG_FOLDER or an installed engine); give a file or a folder")
        loaded = {f.path: load_tuned_configs(f.path) for f in files}
        notes = []
        unique: list[EngineFile] = []
        for f in files:  # a folder of both engines' files holds the same entries twice: measure them once
            same = next((u for u in unique if loaded[u.path] == loaded[f.path]), None)
            if same is None:
                unique.append(f)
            else:
                notes.append(f"{f.path} holds the same entries as {same.path}: measured once")
        files = unique
        Ms = m.check_batch_sizes(batch_sizes if batch_sizes is not None else
                                 m.default_batch_sizes(sorted({M for table in loaded.values() for M in table})))
        defaults = {M: m.measure(m.default_config(M), M) for M in Ms}
        rows = []
        for f in files:
            for M in Ms:
                entry = nearest_entry(loaded[f.path], M)
                timed = m.measure(loaded[f.path][entry], M)
                rows.append(BenchRow(str(f.path), f.where, M, entry, timed.config, timed.latency_us,
                                     defaults[M].config, defaults[M].latency_us,
                                     timed.error or (f"default: {defaults[M].error}" if defaults[M].error else None)))
        if not m.info.is_performance:
            notes.append(f"no GPU: Triton's CPU interpreter timed a scaled-down shape ({m.spec}); wall-clock "
                         "interpreter times, NOT performance numbers")
        return BenchResult(rows, files, m.spec, m.info.device_name, m.info.description, m.info.is_performance, notes)


def geomean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def bench_text(result: BenchResult) -> str:
    """The table ``moe-opt bench`` prints: per file, per batch size, the entry used, its config and latency,
    SGLang's default and the speedup."""
    star = "" if result.is_performance else "*"
    lines = [f"moe-opt bench: {result.spec} on {result.device_name} ({result.description})"]
    lines += [f"note: {n}" for n in result.notes]
    for f in result.files:
        rows = [r for r in result.rows if r.file == str(f.path)]
        lines += ["", f"{f.path}  ({f.where})",
                  f"{'M':>6}  {'entry':>5}  {'config':26s} {'us' + star:>11} {'default us' + star:>11} "
                  f"{'speedup' + star:>8}"]
        for r in rows:
            us = f"{r.latency_us:.2f}" if r.latency_us is not None else "failed"
            d = f"{r.default_us:.2f}" if r.default_us is not None else "failed"
            sp = f"{r.speedup:.3f}x" if r.speedup is not None else "-"
            lines.append(f"{r.M:>6}  {r.entry:>5}  {str(r.config):26s} {us:>11} {d:>11} {sp:>8}"
                         + (f"  {r.error}" if r.error else ""))
        g = geomean([r.speedup for r in rows])
        if g is not None:
            lines.append(f"geometric-mean speedup over SGLang's default: {g:.3f}x" if result.is_performance else
                         f"geometric-mean ratio of interpreter times: {g:.3f}x (not a speedup on any GPU)")
    return "\n".join(lines)


def save_bench(result: BenchResult, path: str | os.PathLike) -> Path:
    """Write the rows as CSV (``.csv``) or JSON (``.json``; the spec and device beside the rows)."""
    path = Path(path)
    records = result.records()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            doc = {"spec": result.spec.to_dict(), "device": result.device_name, "measurement": result.description,
                   "is_performance": result.is_performance, "rows": records}
            path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        elif path.suffix == ".csv":
            with open(path, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=list(BENCH_COLUMNS))
                writer.writeheader()
                for rec in records:
                    writer.writerow({**rec, "config": str(Config.from_dict(rec["config"])),
                                     "default_config": str(Config.from_dict(rec["default_config"]))})
        else:
            raise TuneError(f"bench output {path}: give a .csv or .json path")
    except OSError as exc:
        raise TuneError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path

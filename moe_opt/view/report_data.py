"""The report's data: what the search found per shape and batch size, read from the study storage alone.

Per shape (study base name) and batch size: the result of the one ranking (store/results.py), SGLang's default,
the grid optimum where known, trials and failures. ``summary()`` is the table ``moe-opt show`` prints and the HTML
report (report.py) draws; pandas is imported where the table is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TuneError
from ..space import Config
from ..store.identity import StudyInfo, list_moe_studies
from ..store.results import StudyResult, result_of
from ..store.schema import config_of, is_counted
from ..store.storage import StorageURL, open_storage

# Device-to-device copy bandwidth (bytes read + written) measured through PyTorch on the project's lent machines
# (device notes, KINDS.md, 2026-11): the practical ceiling of a memory-bound kernel, below the datasheets' 4.8 TB/s
# (H200) and 3.35 TB/s (H100 SXM). Keys are parts of the CUDA device name; "H100 80GB HBM3" is the SXM part.
MEASURED_COPY_GBPS = {"H200": (4300.0, "H200"), "H100 80GB HBM3": (3000.0, "H100 SXM")}
SUMMARY_COLUMNS = ("model", "shape", "device", "triton", "M", "best_config", "latency_us", "default_us",
                   "speedup", "grid_best_us", "trials", "failures", "gbps", "measurement", "is_performance",
                   "sglang_down", "pair_us")


def open_studies(storage: Any) -> tuple[Any, list[StudyInfo], str]:
    """Open an existing storage for its moe_opt studies: (storage, studies, URL as shown).

    Accepts a storage URL, a path to an existing .db (SQLite) or .journal file, or a storage object; never
    creates a file.

    Example:
        >>> store, infos, url = open_studies("studies/DeepSeek-V4-Flash.db")  # doctest: +SKIP
        >>> [i.M for i in infos][:3], url  # doctest: +SKIP
        ([1, 2, 4], 'sqlite:///studies/DeepSeek-V4-Flash.db')
    """
    import optuna

    if storage is None:
        raise TuneError("no storage given; give a storage URL such as sqlite:///studies/model.db or a .db path")
    url = StorageURL.parse(storage).shown if isinstance(storage, str) else type(storage).__name__
    store = open_storage(storage, create=False)
    infos = list_moe_studies(store)
    if not infos:
        others = len(optuna.get_all_study_summaries(store, include_best_trial=False))
        raise TuneError(f"storage {url} holds no moe_opt studies ({others} other studies); give a storage that "
                        "`moe-opt tune` wrote (studies named moe|<shape>|<source>|triton=...|M=<M>)")
    return store, infos, url


def copy_bandwidth(device_name: str) -> tuple[float | None, str]:
    """The measured device-to-device copy bandwidth (GB/s) for a device name and how to label it.

    Example:
        >>> copy_bandwidth("NVIDIA H200")
        (4300.0, 'H200 copy bandwidth, measured ~4300 GB/s')
        >>> copy_bandwidth("NVIDIA A100-SXM4-80GB")
        (None, '')
    """
    for key, (gbps, part) in MEASURED_COPY_GBPS.items():
        if key in device_name:
            return gbps, f"{part} copy bandwidth, measured ~{gbps:.0f} GB/s"
    return None, ""


@dataclass
class Shape:
    """One study base (shape, device, Triton version): its studies' trials per batch size."""

    base: str
    infos: dict[int, StudyInfo]
    trials: dict[int, list]  # finished trials (complete or failed, not interrupted), by number
    results: dict[int, StudyResult]  # the one ranking of each study
    grid_us: dict[int, float] = field(default_factory=dict)
    grid_source: str = ""

    @property
    def first(self) -> StudyInfo:
        return next(iter(self.infos.values()))

    def complete(self, M: int) -> list:
        from optuna.trial import TrialState

        return [t for t in self.trials[M] if t.state == TrialState.COMPLETE]

    def gbps(self, M: int, t) -> float | None:
        """Achieved bandwidth of a trial: its recorded ``gbps``, else estimated from the spec's minimum bytes."""
        if "gbps" in t.user_attrs:
            return float(t.user_attrs["gbps"])
        spec = self.infos[M].spec
        if spec is None or not self.infos[M].is_performance:
            return None
        from ..measure.roofline import moe_min_bytes

        return moe_min_bytes(spec, M) / float(t.value) / 1e3


def _exhaustive(info: StudyInfo, measured: set[Config]) -> bool:
    """Whether a study measured every candidate of the grid, so that its best is the grid optimum."""
    from .. import space

    spec = info.spec
    dtype, block = (spec.dtype, spec.block_shape) if spec is not None else (None, None)
    return all(c in measured for c in space.candidates(dtype, block))


def _bundled_table(info: StudyInfo) -> Path | None:
    """The recorded table a replay study was searched on, when it is one of moe_opt's bundled tables."""
    measurement = str(info.attrs.get("measurement", ""))
    if measurement.startswith("replay of "):
        path = Path(__file__).parents[1] / "data" / measurement[len("replay of "):]
        return path if path.is_file() else None
    return None


def load_shapes(storage: Any, table: str | Path | None) -> tuple[list[Shape], str]:
    import optuna

    from ..measure.replay import ReplayTable
    from ..store.identity import shape_key

    store, infos, url = open_studies(storage)
    given = ReplayTable(table) if table is not None else None
    shapes: dict[str, Shape] = {}
    for info in infos:
        study = optuna.load_study(study_name=info.name, storage=store)
        trials = study.get_trials(deepcopy=False)
        shape = shapes.setdefault(info.base, Shape(info.base, {}, {}, {}))
        shape.infos[info.M] = info
        shape.trials[info.M] = sorted((t for t in trials if is_counted(t)), key=lambda t: t.number)
        shape.results[info.M] = result_of(trials, study.user_attrs, info.M)
    for shape in shapes.values():
        tbl, source = given, str(table)
        if tbl is not None and tbl.metadata().get("spec") and shape.first.spec is not None:
            from ..model.spec import ModelSpec

            if shape_key(ModelSpec.from_dict(tbl.metadata()["spec"])) != shape_key(shape.first.spec):
                tbl = None  # the table was recorded for another shape
        if tbl is None and table is None and (bundled := _bundled_table(shape.first)) is not None:
            tbl, source = ReplayTable(bundled), f"recorded table {bundled.name}"
        for M, info in shape.infos.items():
            if tbl is not None and any(us is not None for us in tbl.configs(M).values()):
                shape.grid_us[M], shape.grid_source = tbl.best(M)[1], source
            elif _exhaustive(info, {config_of(t) for t in shape.trials[M]}) and shape.complete(M):
                shape.grid_us[M] = min(float(t.value) for t in shape.complete(M))
                shape.grid_source = "exhaustive (grid) study"
    return list(shapes.values()), url


def summary_rows(shapes: list[Shape]) -> list[dict]:
    rows = []
    for shape in shapes:
        for M in sorted(shape.infos):
            info, complete, result = shape.infos[M], shape.complete(M), shape.results[M]
            top = result.best
            top_us = top.latency_us if top else math.nan
            default = result.default_latency_us
            top_trial = next((t for t in complete if top is not None and t.number == top.trial_number), None)
            rows.append({
                "model": info.attrs.get("model") or "", "shape": shape.base.split("|")[1],
                "device": info.device_name,
                "triton": info.triton_version, "M": M, "best_config": str(top.config) if top else "",
                "latency_us": top_us,
                "default_us": default if default is not None else math.nan,
                "speedup": default / top_us if top and default else math.nan,
                "grid_best_us": shape.grid_us.get(M, math.nan), "trials": len(shape.trials[M]),
                "failures": len(shape.trials[M]) - len(complete),
                "gbps": (shape.gbps(M, top_trial) or math.nan) if top_trial else math.nan,
                "measurement": info.attrs.get("measurement", ""), "is_performance": info.is_performance,
                # A pair study: SGLang's down-projection config where it differs from best_config (its _down file).
                **_pair_columns(result),
            })
    return rows


def _pair_columns(result: StudyResult) -> dict:
    """``sglang_down`` and ``pair_us``: the pair SGLang's files hold where its up or down config differs from the
    best single config (store/results.py, StudyResult.engine_pair); empty otherwise."""
    engine = result.engine_pair
    if engine is None or (engine[0].up == engine[0].down == result.best.config):
        return {"sglang_down": "", "pair_us": math.nan}
    pair, us = engine
    up = "" if pair.up == result.best.config else f"up {pair.up} / "
    return {"sglang_down": f"{up}down {pair.down}", "pair_us": us}


def summary(storage: Any, *, table: str | Path | None = None):
    """One row per shape and batch size M: best config, latencies, speedup over SGLang's default, trials.

    Args:
        storage: Optuna storage URL, .db file path or storage object holding moe_opt studies.
        table: a recorded grid table (CSV) whose optimum fills ``grid_best_us``; default: an exhaustive study's
            best, or the bundled table a replay study was searched on.

    Returns:
        pandas DataFrame with columns ``SUMMARY_COLUMNS`` (latencies in microseconds, ``gbps`` in GB/s).

    Example:
        >>> from moe_opt import summary
        >>> summary("sqlite:///studies/DeepSeek-V4-Flash.db")[["M", "latency_us", "speedup"]]  # doctest: +SKIP
    """
    import pandas as pd

    shapes, _ = load_shapes(storage, table)
    return pd.DataFrame(summary_rows(shapes), columns=list(SUMMARY_COLUMNS))


def summary_text(df) -> str:
    """The summary as ``moe-opt show`` prints it: one block per shape, numbers rounded.

    Example:
        >>> print(summary_text(summary("studies/DeepSeek-V4-Flash.db")))  # doctest: +SKIP
    """
    blocks = []
    for (model, shape, device, triton, measurement), part in df.groupby(
            ["model", "shape", "device", "triton", "measurement"], sort=False):
        head = f"{model + ' ' if model else ''}{shape} on {device}, Triton {triton} ({measurement})"
        if not part["is_performance"].all():
            head += "\n  NOT performance numbers (Triton's CPU interpreter)"
        cols = ["M", "best_config", "latency_us", "default_us", "speedup", "trials", "failures"]
        if part["grid_best_us"].notna().any():
            cols.insert(4, "grid_best_us")
        if part["pair_us"].notna().any():
            cols += ["sglang_down", "pair_us"]
        body = _aligned(part[cols])
        speedups = [v for v in part["speedup"] if v == v]
        if speedups:
            g = math.exp(sum(map(math.log, speedups)) / len(speedups))
            body += (f"\ngeometric-mean speedup over SGLang's default: {g:.3f}x" if part["is_performance"].all()
                     else f"\ngeometric-mean ratio of interpreter times: {g:.3f}x (not a speedup on any GPU)")
        blocks.append(f"{head}\n{body}")
    return "\n\n".join(blocks)


def _aligned(df) -> str:
    """A plain-text table: text columns (the config) left-aligned, numbers right-aligned, two spaces between
    columns, whatever the widths (pandas right-aligns text, so a wide config touched the batch size beside it)."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.2f}"
        return str(v)

    columns = list(df.columns)
    cells = [[cell(v) for v in row] for row in df.itertuples(index=False)]
    left = [any(isinstance(v, str) for v in df[c]) for c in columns]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(values) -> str:
        return "  ".join(v.ljust(w) if lft else v.rjust(w) for v, w, lft in zip(values, widths, left)).rstrip()

    return "\n".join([line(columns)] + [line(row) for row in cells])


def markdown_table(df) -> str:
    """A GitHub Markdown table (pandas' to_markdown needs the optional tabulate package)."""
    def cell(v) -> str:
        return "" if isinstance(v, float) and math.isnan(v) else f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"

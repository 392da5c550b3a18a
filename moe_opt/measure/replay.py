"""Replay tables: recorded measurements of many configs at many batch sizes, as CSV.

Columns: M, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, GROUP_SIZE_M, num_warps, num_stages, us. An empty or NaN
``us`` means the config failed to compile or launch (an ``error`` column may say why); any other ``us`` is a
latency, a finite number of microseconds > 0; each (M, config) appears once. An optional USE_TMA column (true/false,
1/0; empty or absent: false) records SGLang's TMA key. Other extra columns are kept but ignored.
``ReplayTable`` is a :class:`~moe_opt.measure.base.Measurer`, so the tuner searches a table exactly as it searches
the GPU.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import tempfile
from pathlib import Path
from typing import Iterable

from ..errors import TuneError
from ..space import HOPPER_SHARED_MEMORY_BYTES, PARAM_NAMES, TMA_NAME, Config
from ..store.identity import REPLAY_SOURCE
from .base import Measurement, MeasurerInfo

TABLE_COLUMNS = ("M",) + PARAM_NAMES + ("us",)


def _parse_us(value: str | None) -> float | None:
    """A row's latency, or None for a failed config (empty or NaN); ValueError for anything else that is not a
    finite number > 0 (the search takes logs of latency ratios, the ranking the smallest)."""
    if value is None or value.strip() == "":
        return None
    try:
        us = float(value)
    except ValueError:
        raise ValueError(f"us {value!r} is not a number") from None
    if math.isnan(us):
        return None
    if not math.isfinite(us) or us <= 0:
        raise ValueError(f"us {value.strip()!r} is not a latency")
    return us


class ReplayTable:
    """Measurements looked up in a recorded table instead of taken on a GPU.

    Example:
        >>> table = ReplayTable("moe_opt/data/DeepSeek-V4-Flash_tp8_H100.csv")  # doctest: +SKIP
        >>> table.measure(Config(64, 128, 128, 32, 4, 3), 64).latency_us  # doctest: +SKIP
        52.4
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                missing = [c for c in TABLE_COLUMNS if c not in (reader.fieldnames or [])]
                if missing:
                    raise TuneError(f"replay table {self.path} lacks column(s) {', '.join(missing)}; "
                                    f"needed: {', '.join(TABLE_COLUMNS)}")
                rows = [(reader.line_num, row) for row in reader]  # line_num: the file's line the row ends on
        except OSError as exc:
            raise TuneError(f"cannot read replay table {self.path}: {exc.strerror or exc}") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise TuneError(f"replay table {self.path} is not a readable CSV file: {exc}") from None
        self.entries: dict[int, dict[Config, tuple[float | None, str | None]]] = {}
        first_line: dict[tuple[int, Config], int] = {}
        for line, row in rows:
            try:
                config = Config.from_dict({**{k: int(row[k]) for k in PARAM_NAMES},
                                           TMA_NAME: (row.get(TMA_NAME) or "").strip() or None})
                M = int(row["M"])
                if M < 1:
                    raise ValueError(f"M {M} is not a batch size")
                us = _parse_us(row["us"])
            except (ValueError, TypeError) as exc:
                raise TuneError(f"replay table {self.path}, line {line}: {exc}; accepted: positive integers M and "
                                "config values, us a finite latency in microseconds > 0 (empty or NaN: the config "
                                "failed)") from None
            if (M, config) in first_line:
                raise TuneError(f"replay table {self.path}, line {line}: M={M} {config} again (first on line "
                                f"{first_line[M, config]}); each (M, config) once")
            first_line[M, config] = line
            self.entries.setdefault(M, {})[config] = (us, row.get("error") or None)
        if not self.entries:
            raise TuneError(f"replay table {self.path} has no rows")
        meta = self.metadata()
        self.info = MeasurerInfo(
            device_name=meta.get("device") or f"replay:{self.path.stem}", source=REPLAY_SOURCE + self.path.name,
            description=f"replay of {self.path.name}", is_performance=True,
            shared_memory_bytes=int(meta.get("shared_memory_bytes") or HOPPER_SHARED_MEMORY_BYTES), kind="replay",
            tma=any(c.USE_TMA for configs in self.entries.values() for c in configs))

    def metadata(self) -> dict:
        """The JSON sidecar written by the recorder (``<table>.csv.json``: spec, device, versions), or {}."""
        import json

        sidecar = Path(str(self.path) + ".json")
        try:
            return json.loads(sidecar.read_text()) if sidecar.exists() else {}
        except (OSError, ValueError):
            return {}

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(self.entries)

    def configs(self, M: int) -> dict[Config, float | None]:
        """Every recorded config at batch size M with its latency (None for failures)."""
        return {c: us for c, (us, _) in self.entries.get(M, {}).items()}

    def failed_batch_sizes(self) -> list[int]:
        """Batch sizes at which every recorded config failed: nothing there to tune."""
        return [M for M in self.batch_sizes if all(us is None for us, _ in self.entries[M].values())]

    def best(self, M: int) -> tuple[Config, float]:
        """The grid optimum at batch size M."""
        ok = [(us, c) for c, us in self.configs(M).items() if us is not None]
        if not ok:
            why = "every config recorded there failed" if M in self.entries else "it has no rows for it"
            raise TuneError(f"replay table {self.path.name} has no measured config at batch size {M}: {why}")
        us, config = min(ok)
        return config, us

    def measure(self, config: Config, M: int) -> Measurement:
        if M not in self.entries:
            raise TuneError(f"replay table {self.path.name} has no rows for batch size {M}; it has "
                            f"{', '.join(map(str, self.batch_sizes))}")
        us, error = self.entries[M].get(config, (None, "NotRecorded: config not in the replay table"))
        if us is None:
            return Measurement(None, error or "Failed: recorded as failing (empty us)")
        return Measurement(us, None, {})


def write_table(rows: Iterable[dict], path: str | os.PathLike, extra_columns: Iterable[str] = ()) -> Path:
    """Write rows (dicts with TABLE_COLUMNS and any extra columns) atomically as CSV: the whole table or nothing
    (no temporary file, no folder this call made); a path that cannot be written is a one-line TuneError."""
    path = Path(path)
    if path.is_dir():
        raise TuneError(f"cannot write replay table {path}: it is a folder; give a file name such as "
                        f"{path / 'table.csv'}")
    columns = list(TABLE_COLUMNS) + [c for c in extra_columns if c not in TABLE_COLUMNS]
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # the folders this call creates
    tmp, written = None, False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        written = True
    except OSError as exc:
        raise TuneError(f"cannot write replay table {path}: {exc.strerror or exc}; choose a writable file "
                        "location") from None
    finally:
        if not written:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            for d in made:  # innermost first
                with contextlib.suppress(OSError):
                    d.rmdir()
    return path


def table_rows_from_storage(storage, *, base: str | None = None) -> list[dict]:
    """Rows of a replay table from the trials of moe_opt studies (e.g. an exhaustive ``sampler="grid"`` tune).

    A config measured more than once keeps its median. Failed trials become rows with an empty ``us``.
    """
    import statistics

    import optuna
    from optuna.trial import TrialState

    from ..search.surrogate import is_latency
    from ..store.identity import list_moe_studies
    from ..store.schema import config_of, error_of, is_interrupted
    from ..store.storage import open_storage

    store = open_storage(storage, create=False)
    rows = []
    for info in list_moe_studies(store):
        if base is not None and info.base != base:
            continue
        study = optuna.load_study(study_name=info.name, storage=store)
        values: dict[Config, list[float]] = {}
        errors: dict[Config, str] = {}
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            config = config_of(t)
            if config is None:
                continue
            if t.state == TrialState.COMPLETE and is_latency(t.value):
                values.setdefault(config, []).append(float(t.value))
            elif t.state == TrialState.COMPLETE:  # a study of before such values were refused: a failure here
                errors.setdefault(config, f"InvalidLatency: the study holds {t.value!r}, not a latency")
            elif not is_interrupted(t):
                errors.setdefault(config, error_of(t) or "failed")
        for config in sorted(set(values) | set(errors)):
            us = _format_us(statistics.median(values[config])) if config in values else ""
            rows.append({"M": info.M, **config.to_dict(), "us": us, "error": "" if us else errors[config]})
    return rows


def _format_us(us: float) -> str:
    """Three decimals, as recorded tables have them; more where those would round a latency to 0."""
    return f"{us:.3f}" if us >= 0.0005 else f"{us:.3e}"


def record_table(storage, path: str | os.PathLike, *, base: str | None = None) -> Path:
    """Write a replay table (CSV) from the studies in ``storage``: the recorder of exhaustive runs.

    Example:
        >>> import moe_opt
        >>> r = moe_opt.tune(model="deepseek-ai/DeepSeek-V4-Flash", tp_size=8, sampler="grid")  # doctest: +SKIP
        >>> record_table(r.storage, "grid.csv")  # doctest: +SKIP
    """
    rows = table_rows_from_storage(storage, base=base)
    if not rows:
        raise TuneError(f"storage {storage} holds no moe_opt trials to record")
    tma = (TMA_NAME,) if any(TMA_NAME in row for row in rows) else ()  # a table without TMA is as it always was
    return write_table(rows, path, extra_columns=("error",) + tma)

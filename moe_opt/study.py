"""Studies and storage: one Optuna study per batch size, named so that the same tune resumes the same studies.

A study's name is derived from everything that changes the measurement (shape, dtype, block shape,
swiglu_limit, device, Triton version, batch size); its user attributes repeat those facts so the study explains
itself in optuna-dashboard and so ``moe-opt export STORAGE`` can rebuild config files from storage alone.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from .errors import TuneError
from .spec import ModelSpec

STUDY_PREFIX = "moe"
CONNECT_TIMEOUT_S = 10  # PostgreSQL/MySQL connection attempts
SQLITE_BUSY_TIMEOUT_MS = 60_000
# A trial's user attribute "error" holds why a config failed; these prefixes mean it failed to compile, which
# does not depend on the batch size.
COMPILE_FAILURES = ("OutOfResources", "CompilationError", "Rejected", "CompileTimeAssertionFailure")
# The "error" of a trial that was asked but never measured (Ctrl-C, a killed worker, a duplicate that another
# worker took first): not counted against the budget, and its config is retried.
INTERRUPTED = "Interrupted"


def shape_key(spec: ModelSpec | None, table_name: str | None = None) -> str:
    """The shape part of a study name, e.g. ``E=256,N=256,K=4096,topk=6,fp8_w8a8,block=[128,128],swiglu_limit=10``."""
    if spec is None:
        return f"table={table_name}"
    parts = [f"E={spec.E}", f"N={spec.N}", f"K={spec.K}", f"topk={spec.topk}", spec.dtype or spec.torch_dtype]
    if spec.block_shape:
        parts.append(f"block=[{spec.block_shape[0]},{spec.block_shape[1]}]")
    if spec.swiglu_limit is not None:
        parts.append(f"swiglu_limit={spec.swiglu_limit:g}")
    return ",".join(parts)


def study_base_name(spec: ModelSpec | None, device_name: str, triton_version: str,
                    table_name: str | None = None) -> str:
    """Everything but the batch size: shape, device, Triton version."""
    return f"{STUDY_PREFIX}|{shape_key(spec, table_name)}|{device_name.replace(' ', '_')}|triton={triton_version}"


def study_name(base: str, M: int) -> str:
    """``<base>|M=<M>``: readable in the dashboard and sorted by shape, then device, then batch size."""
    return f"{base}|M={M}"


def default_storage(spec: ModelSpec | None, table_name: str | None = None, *, journal: bool = False) -> str:
    """``sqlite:///studies/<slug>.db``; ``journal:studies/<slug>.journal`` for several processes."""
    slug = spec.slug() if spec is not None else f"replay_{table_name}"
    return f"journal:studies/{slug}.journal" if journal else f"sqlite:///studies/{slug}.db"


def _check_writable_directory(url: str, directory: Path) -> None:
    """Create a probe file: os.access says yes to root even on a read-only mount."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".moe_opt_probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise TuneError(f"storage {url}: directory {directory} is read-only ({exc.strerror}); choose a writable "
                        "location") from None


def _prepare_parent(url: str, path: Path, example: str) -> None:
    """A storage file path must not be a directory; its directory is created if missing."""
    if path.is_dir():
        raise TuneError(f"storage {url}: {path} is a directory; give a file path such as {example}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TuneError(f"storage {url}: cannot create directory {path.parent}: {exc.strerror}") from None


def _check_sqlite_path(url: str) -> None:
    path = url[len("sqlite:///"):]
    if not path or path == ":memory:":
        return
    p = Path(path)
    _prepare_parent(url, p, "sqlite:///studies/x.db")
    if p.exists():
        try:
            with open(p, "rb") as f:
                head = f.read(16)
        except OSError as exc:
            raise TuneError(f"storage {url}: cannot read {p}: {exc.strerror}") from None
        if head and head != b"SQLite format 3\x00":
            raise TuneError(f"storage {url}: {p} is not an SQLite database; give a new or existing .db file")
        try:
            open(p, "r+b").close()
        except OSError as exc:
            raise TuneError(f"storage {url}: {p} is read-only ({exc.strerror}); studies need a writable "
                            "database") from None
    # SQLite also writes its -wal and -shm files next to the database.
    _check_writable_directory(url, p.parent)


def _check_journal_path(url: str, path: Path) -> None:
    _prepare_parent(url, path, "journal:studies/x.journal")
    if path.exists():
        try:
            with open(path, "rb") as f:
                first = f.readline()
            open(path, "ab").close()
        except OSError as exc:
            raise TuneError(f"storage {url}: cannot open {path} for appending: {exc.strerror}") from None
        try:
            ok = not first or isinstance(json.loads(first), dict)
        except (ValueError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise TuneError(f"storage {url}: {path} is not an Optuna journal file (a JSON line per operation); "
                            "give a new or existing journal file")
    # Optuna's file lock is a symlink created next to the journal.
    _check_writable_directory(url, path.parent)


def open_storage(storage: str | optuna.storages.BaseStorage | None) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL (sqlite:///..., postgresql://..., journal:PATH) or a storage object.

    ``journal:PATH`` (or a path ending in .journal/.log) is Optuna's JournalStorage on a file, the choice for
    several processes on one host; SQLite suits one process; an RDB URL such as PostgreSQL serves many hosts.
    """
    if storage is None:
        raise TuneError("no storage given; use e.g. sqlite:///studies/model.db")
    if not isinstance(storage, str):
        return storage
    url = storage
    if url.startswith("journal:") or url.endswith((".journal", ".log")):
        path = Path(url[len("journal:"):] if url.startswith("journal:") else url)
        _check_journal_path(url, path)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise TuneError(f"storage {url}: cannot open the journal file: {reason}") from None
    if "://" not in url:
        raise TuneError(f"storage {url!r} is not a storage URL; accepted: sqlite:///PATH.db, journal:PATH, "
                        "postgresql://user@host/db or any SQLAlchemy URL Optuna accepts")
    engine_kwargs = {}
    shown = _without_password(url)
    if url.startswith("sqlite:///"):
        _check_sqlite_path(url)
    elif url.startswith(("postgresql", "mysql")):
        # Fail in seconds, not after the operating system's TCP timeout, when the server is unreachable.
        engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True}
    try:
        rdb = optuna.storages.RDBStorage(_with_installed_driver(url), engine_kwargs=engine_kwargs)
        if url.startswith("sqlite:///"):
            _fast_sqlite(rdb)
        return rdb
    except (sqlite3.DatabaseError, Exception) as exc:  # SQLAlchemy raises many types; all mean "unusable"
        if isinstance(exc, ImportError):  # Optuna re-raises the driver's ModuleNotFoundError as ImportError
            hint = "psycopg2-binary" if url.startswith("postgresql") else "the driver its SQLAlchemy URL names"
            raise TuneError(f"storage {shown} needs its database driver, which is not installed: pip install "
                            f"{hint}") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TuneError(f"storage {shown} cannot be opened: {first[:300]}") from None


def _without_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _with_installed_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads a plain postgresql:// URL as psycopg 3; use psycopg2 (the ``test`` extra's
    psycopg2-binary) when only that one is installed."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def _fast_sqlite(rdb: optuna.storages.RDBStorage) -> None:
    """WAL journal with synchronous=NORMAL: a commit no longer waits for fsync, which made every trial cost
    ~100 ms. Committed trials still survive the tuning process being killed (kill -9); only a power loss or OS
    crash can lose the last few."""
    from sqlalchemy import event

    def on_connect(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        # Another process writing (a second tune on the same file) makes this one wait, not fail with
        # "database is locked"; several processes should still use journal:PATH (docs/operations.md).
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    event.listen(rdb.engine, "connect", on_connect)
    rdb.engine.dispose()  # connections made before the listener reconnect with the pragmas


@dataclass(frozen=True)
class StudyInfo:
    """What a moe_opt study says about itself (its user attributes)."""

    name: str
    base: str
    M: int
    spec: ModelSpec | None
    device_name: str
    triton_version: str
    is_performance: bool
    attrs: dict[str, Any]


def study_attrs(base: str, M: int, spec: ModelSpec | None, device_name: str, triton_version: str,
                torch_version: str, measurer_description: str, is_performance: bool) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "moe_opt_base": base, "M": M, "device_name": device_name, "triton_version": triton_version,
        "torch_version": torch_version, "measurement": measurer_description, "is_performance": is_performance,
    }
    if spec is not None:
        attrs["spec"] = spec.to_dict()
        attrs.update(model=spec.model, E=spec.E, N=spec.N, K=spec.K, topk=spec.topk,
                     dtype=spec.dtype or spec.torch_dtype,
                     block_shape=list(spec.block_shape) if spec.block_shape else None,
                     swiglu_limit=spec.swiglu_limit)
    return attrs


def confirmed_latencies(attrs: dict) -> dict[str, float]:
    """{trial number: re-measured median} that confirm.py stored in a study's user attributes ``attrs``."""
    return attrs.get("confirmed") or {}


def latency_of(trial: Any, confirmed: dict[str, float]) -> float:
    """A completed trial's latency: its re-measured median where confirm.py re-measured it, else its value.
    Everything that ranks or reports a study's configs (export, guard, notes, report) goes through this."""
    return float(confirmed.get(str(trial.number), trial.value))


def list_moe_studies(storage: optuna.storages.BaseStorage) -> list[StudyInfo]:
    """Every moe_opt study in a storage, sorted by base name then batch size."""
    infos = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        attrs = summary.user_attrs
        if "moe_opt_base" not in attrs:
            continue
        spec = ModelSpec.from_dict(attrs["spec"]) if attrs.get("spec") else None
        infos.append(StudyInfo(summary.study_name, attrs["moe_opt_base"], int(attrs["M"]), spec,
                               attrs.get("device_name", "unknown"), attrs.get("triton_version", "unknown"),
                               bool(attrs.get("is_performance", False)), dict(attrs)))
    return sorted(infos, key=lambda i: (i.base, i.M))

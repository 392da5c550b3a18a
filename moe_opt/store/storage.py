"""Storages: a storage URL is parsed once, here, into a :class:`StorageURL`; every command opens storages through
:func:`open_storage`.

Accepted: ``sqlite:///PATH.db`` (one process), ``journal:PATH`` (several processes on one host), any SQLAlchemy
URL Optuna accepts such as ``postgresql://user@host/db`` (many hosts), and a bare file path ending in ``.db``,
``.sqlite``, ``.sqlite3`` (SQLite) or ``.journal``/``.log`` (journal). ``sqlite:///:memory:`` is an in-memory
storage that lives as long as the process.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TuneError

CONNECT_TIMEOUT_S = 10  # PostgreSQL/MySQL connection attempts
SQLITE_BUSY_TIMEOUT_MS = 60_000
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
JOURNAL_SUFFIXES = (".journal", ".log")
ACCEPTED = "accepted: sqlite:///PATH.db, journal:PATH, postgresql://user@host/db or any SQLAlchemy URL Optuna accepts"


@dataclass(frozen=True)
class StorageURL:
    """A parsed storage URL.

    Attributes:
        kind: "sqlite", "journal", "memory" (sqlite:///:memory:) or "rdb" (a database server).
        url: the canonical URL (``sqlite:///PATH``, ``journal:PATH`` or the RDB URL).
        path: the file of a sqlite or journal storage, else None.

    Example:
        >>> StorageURL.parse("studies/x.db").url
        'sqlite:///studies/x.db'
        >>> StorageURL.parse("journal:studies/x.journal").kind
        'journal'
    """

    kind: str
    url: str
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> "StorageURL":
        if not isinstance(text, str) or not text.strip():
            raise TuneError(f"storage {text!r} is not a storage URL; {ACCEPTED}")
        if text.startswith("journal:"):
            return cls("journal", text, Path(text[len("journal:"):]))
        if "://" not in text:
            if text.endswith(JOURNAL_SUFFIXES):
                return cls("journal", f"journal:{text}", Path(text))
            if text.endswith(SQLITE_SUFFIXES):
                return cls("sqlite", f"sqlite:///{text}", Path(text))
            raise TuneError(f"storage {text!r} is not a storage URL; {ACCEPTED}")
        if text.startswith("sqlite:///"):
            path = text[len("sqlite:///"):]
            if path in ("", ":memory:"):
                return cls("memory", "sqlite:///:memory:")
            return cls("sqlite", text, Path(path))
        return cls("rdb", text)

    @property
    def shown(self) -> str:
        """The URL with any password hidden, for messages."""
        return _without_password(self.url) if self.kind == "rdb" else self.url

    @property
    def is_file(self) -> bool:
        return self.path is not None


def storage_url(storage: Any) -> StorageURL | None:
    """The parsed URL of a storage given as a string; None for a storage object."""
    return StorageURL.parse(storage) if isinstance(storage, str) else None


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


def _check_sqlite_path(url: str, p: Path) -> None:
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


def open_storage(storage: Any, *, create: bool = True):
    """An Optuna storage from a URL, a bare file path (see the module) or a storage object.

    Args:
        storage: the storage.
        create: False for commands that only read (show, report, export, dashboard): a storage file that does
            not exist is an error instead of a new empty database.

    Example:
        >>> store = open_storage("sqlite:///:memory:")  # doctest: +SKIP
    """
    import optuna

    if storage is None:
        raise TuneError("no storage given; use e.g. sqlite:///studies/model.db")
    if not isinstance(storage, str):
        return storage
    parsed = StorageURL.parse(storage)
    if parsed.kind == "memory":  # SQLAlchemy would give each thread (the heartbeat's too) its own empty database
        return optuna.storages.InMemoryStorage()
    if not create and parsed.path is not None and not parsed.path.is_file():
        if parsed.url != storage:  # given as a bare path
            raise TuneError(f"storage {storage!r}: no such file; give an existing .db file or a URL such as "
                            "sqlite:///studies/model.db, journal:PATH or postgresql://...")
        raise TuneError(f"storage {parsed.url}: file {parsed.path} does not exist; give the storage a tune wrote, "
                        "e.g. sqlite:///studies/model.db")
    if parsed.kind == "journal":
        _check_journal_path(parsed.url, parsed.path)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        try:
            return JournalStorage(JournalFileBackend(str(parsed.path)))
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise TuneError(f"storage {parsed.url}: cannot open the journal file: {reason}") from None
    engine_kwargs = {}
    if parsed.kind == "sqlite":
        _check_sqlite_path(parsed.url, parsed.path)
    elif parsed.url.startswith(("postgresql", "mysql")):
        # Fail in seconds, not after the operating system's TCP timeout, when the server is unreachable.
        engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True}
    try:
        rdb = optuna.storages.RDBStorage(_with_installed_driver(parsed.url), engine_kwargs=engine_kwargs)
        if parsed.kind == "sqlite":
            _fast_sqlite(rdb)
        return rdb
    except (sqlite3.DatabaseError, Exception) as exc:  # SQLAlchemy raises many types; all mean "unusable"
        if isinstance(exc, ImportError):  # Optuna re-raises the driver's ModuleNotFoundError as ImportError
            hint = "psycopg2-binary" if parsed.url.startswith("postgresql") else "the driver its SQLAlchemy URL names"
            raise TuneError(f"storage {parsed.shown} needs its database driver, which is not installed: pip install "
                            f"{hint}") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TuneError(f"storage {parsed.shown} cannot be opened: {first[:300]}") from None


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


def _fast_sqlite(rdb) -> None:
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

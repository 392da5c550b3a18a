"""Storages: a storage URL is parsed once, here, into a :class:`StorageURL`; every command opens storages through
:func:`open_storage`.

Accepted: ``sqlite:///PATH.db`` (one process; also ``sqlite+DRIVER:///PATH`` and SQLite's URI form
``sqlite:///file:PATH?mode=ro&uri=true``), ``journal:PATH`` (several processes on one host), any SQLAlchemy URL
Optuna accepts such as ``postgresql://user@host/db`` (many hosts), and a bare file path ending in ``.db``,
``.sqlite``, ``.sqlite3`` (SQLite) or ``.journal``/``.log`` (journal). ``sqlite:///:memory:`` is an in-memory
storage that lives as long as the process.

Writers (a tune) create what is missing; readers (``open_storage(create=False)``: show, report, export, record,
dashboard) change nothing they only read: no file, table or journal mode is created, and a read-only database
is opened read-only.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

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
        scheme, rest = text.split("://", 1)
        if (scheme == "sqlite" or scheme.startswith("sqlite+")) and rest.startswith("/"):
            path = _sqlite_file(rest[1:])
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


def _sqlite_file(database: str) -> str:
    """The file of the database part of a SQLite URL: a path, or SQLite's URI form ``file:PATH?mode=ro`` (with
    ``uri=true`` among SQLAlchemy's query arguments)."""
    path, _, query = database.partition("?")
    if path.startswith("file:") and "uri=true" in query.split("&"):
        path = unquote(path[len("file:"):])
        if path.startswith("//"):  # file://[host]/PATH
            path = "/" + path[2:].partition("/")[2]
    return path


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


def _check_sqlite_header(url: str, p: Path) -> None:
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise TuneError(f"storage {url}: cannot read {p}: {exc.strerror}") from None
    if head and head != b"SQLite format 3\x00":
        raise TuneError(f"storage {url}: {p} is not an SQLite database; give a new or existing .db file")


def _check_sqlite_path(url: str, p: Path) -> None:
    _prepare_parent(url, p, "sqlite:///studies/x.db")
    if p.exists():
        _check_sqlite_header(url, p)
        try:
            open(p, "r+b").close()
        except OSError as exc:
            raise TuneError(f"storage {url}: {p} is read-only ({exc.strerror}); studies need a writable "
                            "database") from None
    # SQLite also writes its -wal and -shm files next to the database.
    _check_writable_directory(url, p.parent)


JOURNAL_LINE_START = b'{"op_code":'  # how Optuna writes every journal line (json.dumps, compact separators)


def _check_journal_path(url: str, path: Path, create: bool = True) -> None:
    if create:
        _prepare_parent(url, path, "journal:studies/x.journal")
    if path.exists():
        try:
            with open(path, "rb") as f:
                first = f.readline()
            if create:
                open(path, "ab").close()
        except OSError as exc:
            doing = "open {} for appending" if create else "read {}"
            raise TuneError(f"storage {url}: cannot {doing.format(path)}: {exc.strerror}") from None
        if first.endswith(b"\n"):
            try:
                ok = isinstance(json.loads(first), dict)
            except (ValueError, UnicodeDecodeError):
                ok = False
        else:  # empty, or one line that a killed process cut short (cut away by the first write)
            ok = _could_be_journal_line(first)
        if not ok:
            raise TuneError(f"storage {url}: {path} is not an Optuna journal file (a JSON line per operation); "
                            "give a new or existing journal file")
    if create:  # the lock files (store/locks.py) are created next to the journal
        _check_writable_directory(url, path.parent)


def _could_be_journal_line(text: bytes) -> bool:
    """Whether ``text`` is the start of a line as Optuna writes them (or of nothing)."""
    n = min(len(text), len(JOURNAL_LINE_START))
    return text[:n] == JOURNAL_LINE_START[:n]


def cut_torn_tail(path: str | os.PathLike) -> int:
    """Cut a journal file back to the end of its last whole line; returns the bytes cut (said on stderr).

    Call it only while holding the journal's write lock (store/locks.py, JournalWriteLock does): then no write is
    in progress, and a last line without its newline can only be a write that a killed process cut short. Optuna
    skips such a line when reading, but its next write would be appended to it, leaving a line that is not JSON
    and a journal that no process can read again. One truncate, under the lock; a tail that is not the start of
    an Optuna line is left alone.
    """
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        keep, pos = 0, size
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            newline = f.read(step).rfind(b"\n")
            if newline >= 0:
                keep = pos + newline + 1
                break
        f.seek(keep)
        if not _could_be_journal_line(f.read(len(JOURNAL_LINE_START))):
            return 0
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    print(f"moe-opt: {os.fspath(path)}: cut away its torn last line ({size - keep} bytes), a write cut short by a "
          "killed process", file=sys.stderr, flush=True)
    return size - keep


def open_storage(storage: Any, *, create: bool = True):
    """An Optuna storage from a URL, a bare file path (see the module) or a storage object.

    Args:
        storage: the storage.
        create: False for commands that only read (show, report, export, record, dashboard): a storage file that
            does not exist is an error instead of a new empty database, a SQLite file without Optuna's tables is an
            error instead of getting them, the journal mode is left as it is, and a database that cannot be
            written is opened read-only.

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
        return _open_journal(parsed, create)
    engine_kwargs: dict[str, Any] = {}
    url, skip_table_creation = parsed.url, False
    if parsed.kind == "sqlite" and not create:
        url, skip_table_creation = _sqlite_reader_url(parsed), True
    elif parsed.kind == "sqlite":
        _check_sqlite_path(parsed.url, parsed.path)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}}
    elif parsed.url.startswith(("postgresql", "mysql")):
        # Fail in seconds, not after the operating system's TCP timeout, when the server is unreachable.
        engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True}
    try:
        if parsed.kind != "sqlite":
            return optuna.storages.RDBStorage(_with_installed_driver(url), engine_kwargs=engine_kwargs)
        from .locks import file_lock

        # Processes opening a new file at once would race on creating Optuna's tables ("UNIQUE constraint failed:
        # alembic_version.version_num"): one at a time, under the storage's claim-lock file. Readers create nothing.
        with file_lock(parsed.path) if create else contextlib.nullcontext():
            rdb = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                             skip_table_creation=skip_table_creation)
            _fast_sqlite(rdb, wal=create)
        return rdb
    except (sqlite3.DatabaseError, Exception) as exc:  # SQLAlchemy raises many types; all mean "unusable"
        if isinstance(exc, ImportError):  # Optuna re-raises the driver's ModuleNotFoundError as ImportError
            hint = "psycopg2-binary" if parsed.url.startswith("postgresql") else "the driver its SQLAlchemy URL names"
            raise TuneError(f"storage {parsed.shown} needs its database driver, which is not installed: pip install "
                            f"{hint}") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TuneError(f"storage {parsed.shown} cannot be opened: {first[:300]}") from None


def _open_journal(parsed: StorageURL, create: bool):
    """A JournalStorage whose writes take moe_opt's journal write lock (store/locks.py); a writer cuts a torn last
    line away before opening."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    from .locks import JournalWriteLock

    _check_journal_path(parsed.url, parsed.path, create)
    try:
        lock = JournalWriteLock(parsed.path)
        backend = JournalFileBackend(str(parsed.path), lock_obj=lock)
        if create:
            lock.acquire()  # cuts a torn last line
            lock.release()
        return JournalStorage(backend)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TuneError(f"storage {parsed.url}: cannot open the journal file: {reason}") from None


OPTUNA_TABLES = {"studies", "trials", "version_info", "alembic_version"}


def _sqlite_reader_url(parsed: StorageURL) -> str:
    """The SQLAlchemy URL a reader opens an existing SQLite file with, after checking, without writing anything,
    that it holds Optuna's tables: ``mode=rw`` where the file and its directory are writable (so the dashboard can
    write its notes; ``rw`` never creates a file), else ``mode=ro``; ``immutable=1`` for a WAL database in a
    directory where SQLite cannot make its shared-memory file and there is no -wal file (nobody can be writing it
    then)."""
    path = parsed.path
    _check_sqlite_header(parsed.url, path)
    writable = os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)
    uri = "file:" + quote(os.path.abspath(path))
    modes = ["mode=rw"] if writable else ["mode=ro"]
    if not writable and not os.access(path.parent, os.W_OK) and not os.path.exists(f"{path}-wal"):
        modes.append("immutable=1")  # no -wal file, none can be made: nobody writes it, nothing is in a WAL
    tables, opened = set(), None
    for mode in modes:
        try:
            con = sqlite3.connect(f"{uri}?{mode}", uri=True)
            try:
                tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                for table in ("version_info", "alembic_version"):  # Optuna would write them if empty
                    if table in tables and not con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]:
                        tables.discard(table)  # made by a process killed before it wrote the version
            finally:
                con.close()
            opened = mode
            break
        except sqlite3.OperationalError as exc:
            error = exc
        except sqlite3.DatabaseError:
            raise TuneError(f"storage {parsed.url}: {path} is not an SQLite database; give the storage a tune "
                            "wrote, e.g. sqlite:///studies/model.db") from None
    if opened is None:
        raise TuneError(f"storage {parsed.url}: cannot read {path}: {error}")
    if not OPTUNA_TABLES <= tables:
        raise TuneError(f"storage {parsed.url}: {path} holds no Optuna studies (it has no Optuna tables); give the "
                        "storage a tune wrote, e.g. sqlite:///studies/model.db")
    return f"sqlite:///{uri}?{opened}&uri=true"


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


def _fast_sqlite(rdb, wal: bool = True) -> None:
    """WAL journal with synchronous=NORMAL: a commit no longer waits for fsync, which made every trial cost
    ~100 ms. Committed trials still survive the tuning process being killed (kill -9); only a power loss or OS
    crash can lose the last few. Readers (``wal=False``) leave the file's journal mode as it is."""
    from sqlalchemy import event

    def on_connect(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        # Another process writing (a second tune on the same file) makes this one wait, not fail with
        # "database is locked"; several processes should still use journal:PATH (docs/operations.md).
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        if wal:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(rdb.engine, "connect", on_connect)
    rdb.engine.dispose()  # connections made before the listener reconnect with the pragmas
    if wal:
        with rdb.engine.connect():  # switch now, while the caller holds the creation lock
            pass

"""The lock under which trials are claimed, shared by every process that tunes the same studies."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

from .storage import storage_url

LOCK_SUFFIX = ".moe_opt.lock"  # the lock file beside a SQLite or journal file


class _FileLock:
    """flock on a file next to the storage: held by one process at a time, released by the kernel if the
    holder dies. (Never lock the SQLite file itself: closing any descriptor of it drops SQLite's own locks.)"""

    def __init__(self, path: Path):
        self.path = path
        self._thread_lock = threading.Lock()
        self._fd: int | None = None

    def __enter__(self) -> None:
        import fcntl

        self._thread_lock.acquire()
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc) -> None:
        import fcntl

        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


class _SqlLock:
    """A named server-side lock (PostgreSQL advisory lock, MySQL GET_LOCK) on a connection of its own; the
    server releases it when that connection closes, so a dead holder cannot keep it."""

    QUERIES = {"postgresql": ("SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)"),
               "mysql": ("SELECT GET_LOCK(:name, -1)", "SELECT RELEASE_LOCK(:name)")}

    def __init__(self, engine, name: str):
        self.engine = engine
        self.dialect = engine.dialect.name
        # PostgreSQL advisory locks take a signed 64-bit key; MySQL lock names are at most 64 characters.
        digest = hashlib.sha1(name.encode()).digest()
        self.params = {"key": int.from_bytes(digest[:8], "big", signed=True), "name": digest.hex()[:40]}
        self._thread_lock = threading.Lock()
        self._conn = None

    def _execute(self, query: str) -> None:
        from sqlalchemy import text

        if self._conn is None:
            self._conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self._conn.execute(text(query), self.params).fetchall()

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            try:
                self._execute(self.QUERIES[self.dialect][0])
            except Exception:  # a dropped connection: one new one, then give up
                self._conn = None
                self._execute(self.QUERIES[self.dialect][0])
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc) -> None:
        try:
            self._execute(self.QUERIES[self.dialect][1])
        except Exception:
            self._conn = None  # closing the connection releases the lock
        finally:
            self._thread_lock.release()


def claim_lock(storage: Any, store: Any, name: str):
    """The lock shared by every process that tunes the studies ``name`` in this storage: a file lock next to a
    journal or SQLite file, an advisory lock on PostgreSQL/MySQL, else a lock of this process only."""
    import optuna

    parsed = storage_url(storage)
    if parsed is not None and parsed.path is not None:
        return _FileLock(parsed.path.with_name(parsed.path.name + LOCK_SUFFIX))
    if isinstance(store, optuna.storages.RDBStorage):
        dialect = store.engine.dialect.name
        if dialect in _SqlLock.QUERIES:
            return _SqlLock(store.engine, name)
        database = store.engine.url.database
        if dialect == "sqlite" and database and database != ":memory:":
            return _FileLock(Path(database).with_name(Path(database).name + LOCK_SUFFIX))
    return _ThreadLock()


class _ThreadLock:
    """In-memory storages and unknown backends: one process only (documented in docs/operations.md)."""

    def __init__(self):
        self._lock = threading.RLock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc) -> None:
        self._lock.release()

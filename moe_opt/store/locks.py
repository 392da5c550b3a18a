"""The lock under which trials are claimed, shared by every process that tunes the same studies."""

from __future__ import annotations

import contextlib
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

    shared = True  # every process that opens the storage by its file takes this lock

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
        except BaseException:  # e.g. Ctrl-C right after the flock was granted: do not keep it
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
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

    shared = True
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
        return _FileLock(lock_path(parsed.path))
    journal = getattr(getattr(store, "_backend", None), "_file_path", None)  # a JournalStorage on a file
    if isinstance(store, optuna.storages.JournalStorage) and journal:
        return _FileLock(lock_path(Path(journal)))
    if isinstance(store, optuna.storages.RDBStorage):
        dialect = store.engine.dialect.name
        if dialect in _SqlLock.QUERIES:
            return _SqlLock(store.engine, name)
        database = store.engine.url.database
        if dialect == "sqlite" and database and database != ":memory:":
            return _FileLock(lock_path(Path(database)))
    return _ThreadLock(shared=isinstance(store, optuna.storages.InMemoryStorage))


def lock_path(storage_file: Path) -> Path:
    """The claim-lock file beside a SQLite or journal file."""
    return storage_file.with_name(storage_file.name + LOCK_SUFFIX)


class _ThreadLock:
    """In-memory storages and unknown backends: one process only (documented in docs/operations.md). ``shared``
    says whether it is still every process's lock: true of an in-memory storage, which no other process sees."""

    def __init__(self, shared: bool = False):
        self._lock = threading.RLock()
        self.shared = shared

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc) -> None:
        self._lock.release()

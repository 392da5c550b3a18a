"""Locks between processes on one storage: the claim lock, under which trials are claimed (shared by every
process that tunes the same studies), and the write lock of a journal file (:class:`JournalWriteLock`).

Every lock here is released when its holder dies (flock, a server-side lock), or, for the journal's lock file,
is known to be left by a dead holder the moment another writer looks at it; none waits out a grace period for a
holder moe_opt can tell is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any, Iterator

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


@contextlib.contextmanager
def file_lock(storage_file: Path) -> Iterator[None]:
    """The claim-lock file of a storage file, held for one block (e.g. creating a SQLite file's tables)."""
    import fcntl

    fd = os.open(lock_path(storage_file), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


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


# --- the write lock of a journal file ----------------------------------------------------------------------------

JOURNAL_LOCK_SUFFIX = ".lock"  # Optuna's JournalFileBackend lock file (optuna.storages.journal._file.LOCK_FILE_SUFFIX)
JOURNAL_LOCK_MARK = b"moe_opt journal writer"  # what a lock file moe_opt made starts with
FOREIGN_LOCK_GRACE_S = 30.0  # Optuna's grace period, for a lock file moe_opt did not make
_POLL_MAX_S = 0.05


class JournalWriteLock:
    """The lock around each append to a journal file; an Optuna ``BaseJournalFileLock`` (``acquire``/``release``).

    Optuna's own lock (JournalFileSymlinkLock) is a file ``PATH.lock`` that each writer creates exclusively and
    removes when done. A writer killed in between leaves it, and every later process waits 30 s (the grace period,
    counted from when that process first saw it) before taking it over: restarts closer than 30 s never get
    through. This lock keeps Optuna's file, so plain Optuna processes on the same journal still take turns with
    moe_opt's, and adds two things:

    - a writer first takes a flock on the journal file itself (the kernel drops it when the holder dies), then
      creates ``PATH.lock`` holding :data:`JOURNAL_LOCK_MARK`, written before the name appears;
    - so a marked ``PATH.lock`` found while holding the flock was left by a writer that no longer holds it (one
      still writing would hold the flock): it was killed mid-write, and the file is removed at once. A lock file without the mark (plain Optuna's, or an older moe_opt's)
      is removed once it is :data:`FOREIGN_LOCK_GRACE_S` old by its own time stamp, so waits add up across
      restarts instead of starting over.

    While the lock is held the journal ends at a whole line, as no write is in progress: :meth:`acquire` cuts a
    torn last line away (store/storage.py, ``cut_torn_tail``) before the holder appends after it.
    """

    def __init__(self, journal_path: str | os.PathLike):
        self.journal = os.fspath(journal_path)
        self.path = self.journal + JOURNAL_LOCK_SUFFIX
        self._thread_lock = threading.Lock()
        self._fd: int | None = None

    def acquire(self) -> bool:
        import fcntl

        from .storage import cut_torn_tail

        self._thread_lock.acquire()
        try:
            fd = os.open(self.journal, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._create_lock_file()
                cut_torn_tail(self.journal)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return True
        except BaseException:
            self._thread_lock.release()
            raise

    def release(self) -> None:
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        finally:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)  # drops the flock
            self._thread_lock.release()

    def _create_lock_file(self) -> None:
        mark = JOURNAL_LOCK_MARK + f" {socket.gethostname()} {os.getpid()}\n".encode()
        delay = 0.001
        while True:
            try:
                _create_exclusive(self.path, mark)
                return
            except FileExistsError:
                pass
            if self._left_behind():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                continue
            time.sleep(delay)  # a plain Optuna writer holds it (for a few milliseconds)
            delay = min(2 * delay, _POLL_MAX_S)

    def _left_behind(self) -> bool:
        """Whether the existing lock file is one nobody holds (called while holding the flock)."""
        try:
            st = os.lstat(self.path)
            if stat.S_ISREG(st.st_mode) and st.st_size:
                with open(self.path, "rb") as f:
                    if f.read(len(JOURNAL_LOCK_MARK)) == JOURNAL_LOCK_MARK:
                        return True  # made under the flock we hold now: its writer no longer holds it
        except FileNotFoundError:
            return False  # released meanwhile: create it again
        return time.time() - st.st_mtime > FOREIGN_LOCK_GRACE_S


def _create_exclusive(path: str, data: bytes) -> None:
    """Create ``path`` holding ``data`` (FileExistsError if it exists), its content there the moment its name is:
    written to an unnamed file (O_TMPFILE) that is then linked under the name. Where O_TMPFILE is missing, an
    exclusive create and a write."""
    try:
        fd = os.open(os.path.dirname(path) or ".", os.O_TMPFILE | os.O_WRONLY, 0o644)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            os.write(fd, data)
            os.link(f"/proc/self/fd/{fd}", path)
            return
        except FileExistsError:
            raise
        except OSError:
            pass  # no /proc: below
        finally:
            os.close(fd)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)

"""Stopping a tune: the first Ctrl-C stops after the running trial, keeping everything; a second Ctrl-C or a
SIGTERM stops at once, and the trials this process holds are released (failed as ``Interrupted``, their configs
retried first by the next run). Writes that must not stop halfway (claiming a trial, releasing held trials) run
with both signals held back until they are done (:func:`deferred_signals`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM in the tuning process: the same path as a second Ctrl-C (held trials released, exit code 130)."""


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class StopFlag:
    """Ctrl-C sets the flag; the running trial finishes and the tune stops with everything kept.

    ``external`` is another reason to stop (a worker's "the tuning process said stop"); without a handler
    installed (``install=False``, a worker, whose tuning process handles Ctrl-C) SIGINT is left as it is. SIGTERM
    always stops at once through the path of a second Ctrl-C: in the tuning process it raises
    :class:`Terminated`; in a worker (``install=False``) ``SystemExit(143)``, so the worker leaves quietly with
    the exit code a SIGTERM gives and its tuning process reports it.
    """

    def __init__(self, external: Callable[[], bool] | None = None, install: bool = True) -> None:
        self._stop = False
        self._external = external
        self._install = install
        self._old: dict[int, object] = {}

    @property
    def stop(self) -> bool:
        return self._stop or (self._external is not None and self._external())

    def __enter__(self) -> "StopFlag":
        if _main_thread():
            if self._install:
                self._old[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
            self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._terminate)
        return self

    def _handle(self, signum, frame) -> None:
        if self._stop:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop = True
        print("\nmoe-opt: stopping after the running trial (Ctrl-C again to abort now)", flush=True)

    def _terminate(self, signum, frame) -> None:
        if not self._install:
            raise SystemExit(128 + signal.SIGTERM)
        raise Terminated("terminated (SIGTERM); the trials it held are retried first by the next run")

    def __exit__(self, *exc) -> None:
        for signum, handler in self._old.items():
            signal.signal(signum, handler)
        self._old.clear()


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the duration of the block, then deliver them as their handlers would have.

    Python runs signal handlers in the main thread between bytecodes, so a Ctrl-C can otherwise raise in the middle
    of a sequence of storage writes (a trial asked but not yet stamped with its worker, half of the held trials
    released). Only the main thread can change handlers; elsewhere the block runs as it is.

    Example:
        >>> with deferred_signals():  # doctest: +SKIP
        ...     coord.release_held("stopped while it was measured")
    """
    if not _main_thread():
        yield
        return
    caught: list[tuple[int, object]] = []
    old: dict[int, object] = {}
    try:
        for signum in STOP_SIGNALS:
            old[signum] = signal.signal(signum, lambda n, frame: caught.append((n, frame)))
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
        for signum, frame in caught:
            handler = old[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)

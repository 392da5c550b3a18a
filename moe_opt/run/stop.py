"""Ctrl-C during a tune: the first stops after the running trial, keeping everything; the second stops at once."""

from __future__ import annotations

import signal
import threading
from typing import Callable


class StopFlag:
    """Ctrl-C sets the flag; the running trial finishes and the tune stops with everything kept.

    ``external`` is another reason to stop (a worker's "the tuning process said stop"); without a handler
    installed (``install=False``) SIGINT is left as it is.
    """

    def __init__(self, external: Callable[[], bool] | None = None, install: bool = True) -> None:
        self._stop = False
        self._external = external
        self._install = install
        self._old = None

    @property
    def stop(self) -> bool:
        return self._stop or (self._external is not None and self._external())

    def __enter__(self) -> "StopFlag":
        if self._install and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self._stop:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop = True
        print("\nmoe-opt: stopping after the running trial (Ctrl-C again to abort now)", flush=True)

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

"""The tune's progress: batch size, trials done, best latency so far, speedup over SGLang's default, and the time
left across all batch sizes.

On a terminal it is a tqdm bar. Anywhere else (a log file, CI, a pipe) a bar is one endless line of carriage
returns, so it prints plain lines instead: one when a batch size finishes its trials, and one at most every
``interval_s`` seconds in between.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

from ..measure.base import Measurement
from ..space import Config
from ..store.schema import is_counted

PLAIN_INTERVAL_S = 10.0  # between two progress lines in a log, unless a batch size finished meanwhile


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``.

    Example:
        >>> format_duration(185), format_duration(3725), format_duration(4.2)
        ('3 min 05 s', '1 h 02 min', '4 s')
    """
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """The progress of a tune over all its batch sizes.

    Args:
        studies: {M: study}, their trials so far counted as done (a resumed tune).
        n_trials: the budget per batch size.
        defaults: {M: SGLang's default config}, to show the speedup once the default is measured.
        enabled: False prints nothing.
        stream: where to write (default stderr); a terminal gets a bar, anything else plain lines.
        interval_s: at most one plain line per this many seconds, besides one per finished batch size.
        clock: seconds, for the estimate of the time left (default time.monotonic).
    """

    def __init__(self, studies, n_trials: int, defaults: dict[int, Config], *, enabled: bool = True,
                 stream: TextIO | None = None, interval_s: float = PLAIN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.enabled = enabled
        self.defaults = defaults
        self.best: dict[int, float] = {}
        self.default_us: dict[int, float] = {}
        self.done: dict[int, int] = {}
        self.n_trials = n_trials
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.clock = clock
        for M, study in studies.items():
            values = [t.value for t in study.trials if t.value is not None]
            if values:
                self.best[M] = min(values)
            self.done[M] = sum(1 for t in study.trials if is_counted(t))
        self.batch_sizes = list(studies)
        self.total = n_trials * len(studies)
        self.initial = self.trials_done()
        self.started = clock()
        self.last_line = self.started
        self.bar = None
        self.tty = _isatty(self.stream)
        if not enabled:
            return
        Ms = ", ".join(map(str, self.batch_sizes))
        head = f"moe-opt: {len(studies)} batch size{'s' * (len(studies) != 1)} (M = {Ms}), {n_trials} trials each"
        if self.initial:
            head += f"; {self.initial} of {self.total} done by earlier runs"
        print(head, file=self.stream, flush=True)
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.initial, unit="trial", file=self.stream,
                            dynamic_ncols=True)

    def trials_done(self) -> int:
        """Counted trials over all batch sizes, each batch size at most its budget."""
        return min(self.total, sum(min(n, self.n_trials) for n in self.done.values()))

    def batch_sizes_done(self) -> int:
        return sum(1 for M in self.batch_sizes if self.done.get(M, 0) >= self.n_trials)

    def seconds_left(self) -> float | None:
        """The time left for every batch size's remaining trials, at this run's pace so far; None before the first
        trial of this run."""
        measured = self.trials_done() - self.initial
        if measured <= 0:
            return None
        return (self.total - self.trials_done()) * (self.clock() - self.started) / measured

    def _state(self, M: int) -> str:
        best = self.best.get(M)
        text = f"M={M} {min(self.done.get(M, 0), self.n_trials)}/{self.n_trials}"
        text += f" best {best:.1f}us" if best is not None else " best -"
        if best is not None and M in self.default_us:
            text += f" {self.default_us[M] / best:.2f}x vs default"
        return text

    def _overall(self, time_left: bool = True) -> str:
        text = (f"{self.batch_sizes_done()}/{len(self.batch_sizes)} batch sizes done, "
                f"{self.trials_done()}/{self.total} trials")
        left = self.seconds_left() if time_left else None
        if left is not None and left >= 1 and self.trials_done() < self.total:
            text += f", about {format_duration(left)} left"
        return text

    def update(self, M: int, config: Config, m: Measurement) -> None:
        before = self.done.get(M, 0)
        self.done[M] = before + 1
        if m.ok:
            self.best[M] = min(self.best.get(M, float("inf")), m.latency_us)
            if config == self.defaults.get(M):
                self.default_us[M] = m.latency_us
        if not self.enabled:
            return
        finished = before < self.n_trials <= self.done[M]
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self._state(M)} | {self.batch_sizes_done()}/{len(self.batch_sizes)} "
                                     "batch sizes done", refresh=False)
            self.bar.update(1)
            return
        now = self.clock()
        if finished or now - self.last_line >= self.interval_s:
            self.last_line = now
            state = f"{self._state(M).replace(f'M={M} ', f'M={M} done: ', 1)}" if finished else self._state(M)
            print(f"moe-opt: {state}; {self._overall()}", file=self.stream, flush=True)

    def sync(self, studies) -> None:
        """Catch up with trials other processes told (a tune's worker processes): the counts and best latencies
        read from the studies, the bar moved or the lines printed as :meth:`update` does."""
        finished = []
        for M, study in studies.items():
            trials = study.get_trials(deepcopy=False)
            before = self.done.get(M, 0)
            self.done[M] = sum(1 for t in trials if is_counted(t))
            values = [t.value for t in trials if t.value is not None]
            if values:
                self.best[M] = min(values)
            if before < self.n_trials <= self.done[M]:
                finished.append(M)
        if not self.enabled:
            return
        if self.bar is None:
            for M in finished:
                self.last_line = self.clock()
                print(f"moe-opt: {self._state(M).replace(f'M={M} ', f'M={M} done: ', 1)}; {self._overall()}",
                      file=self.stream, flush=True)
        if self.bar is not None:
            self.bar.n = self.trials_done()
            self.bar.refresh()
        elif self.clock() - self.last_line >= self.interval_s and self.trials_done() < self.total:
            self.last_line = self.clock()
            print(f"moe-opt: {self._overall()}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.trials_done() > self.initial:
            print(f"moe-opt: {self._overall(time_left=False)} in {format_duration(self.clock() - self.started)}",
                  file=self.stream, flush=True)

"""The tune's progress line: batch size, trials done, best latency so far and speedup over SGLang's default."""

from __future__ import annotations

import sys

from ..measure.base import Measurement
from ..space import Config
from ..store.schema import is_counted


class Progress:
    """A tqdm bar over all trials of a tune, with the state of the batch size just measured."""

    def __init__(self, studies, n_trials: int, defaults: dict[int, Config], *, enabled: bool = True):
        self.enabled = enabled
        self.defaults = defaults
        self.best: dict[int, float] = {}
        self.default_us: dict[int, float] = {}
        self.done: dict[int, int] = {}
        self.n_trials = n_trials
        for M, study in studies.items():
            values = [t.value for t in study.trials if t.value is not None]
            if values:
                self.best[M] = min(values)
            self.done[M] = sum(1 for t in study.trials if is_counted(t))
        self.bar = None
        if enabled:
            from tqdm import tqdm

            total = n_trials * len(studies)
            initial = min(total, sum(min(n, n_trials) for n in self.done.values()))
            self.bar = tqdm(total=total, initial=initial, unit="trial", file=sys.stderr, dynamic_ncols=True)

    def update(self, M: int, config: Config, m: Measurement) -> None:
        self.done[M] = self.done.get(M, 0) + 1
        if m.ok:
            self.best[M] = min(self.best.get(M, float("inf")), m.latency_us)
            if config == self.defaults.get(M):
                self.default_us[M] = m.latency_us
        if self.bar is None:
            return
        best = self.best.get(M)
        text = f"M={M} {min(self.done[M], self.n_trials)}/{self.n_trials}"
        text += f" best {best:.1f}us" if best is not None else " best -"
        if best is not None and M in self.default_us:
            text += f" {self.default_us[M] / best:.2f}x vs default"
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

"""The strategies a tune can use: moe_opt's search (default), the exhaustive grid walk, and Optuna's samplers
(TPE, random, or any sampler object) as baselines. Each is a :class:`~moe_opt.search.base.Strategy`."""

from __future__ import annotations

import random
from typing import Any, Sequence

from ..errors import TuneError
from ..space import Config
from .base import ProposingStrategy, Strategy
from .surrogate import SearchState

STRATEGY_NAMES = ("moe", "tpe", "random", "grid")


class MoeStrategy(ProposingStrategy):
    """moe_opt's search (surrogate.py): surrogate-guided, order-aware, sharing what other batch sizes learned."""

    name = "moe"

    def propose(self, M: int, rng: random.Random) -> Config | None:
        return self.state.propose(M, rng, exclude=self._blocked(M))


class GridStrategy(ProposingStrategy):
    """Every candidate config once, in a fixed order: the exhaustive baseline and the replay-table recorder."""

    name = "grid"

    def propose(self, M: int, rng: random.Random) -> Config | None:
        tried = self.state.tried(M) | self._blocked(M)
        return next((c for c in self.state.candidates if c not in tried), None)


class OptunaStrategy(Strategy):
    """One of Optuna's samplers, proposing the six tunables of each batch size's study on its own."""

    def __init__(self, state: SearchState, choices: dict[str, Sequence[int]], seed: int | None = None, *,
                 sampler: Any = "tpe"):
        super().__init__(state, choices, seed)
        self.sampler_spec = sampler
        self.name = sampler if isinstance(sampler, str) else type(sampler).__name__

    def _make_sampler(self, M: int, seed: int | None) -> Any:
        import optuna

        if self.sampler_spec == "tpe":
            return optuna.samplers.TPESampler(seed=seed)
        if self.sampler_spec == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return self.sampler_spec


def make_strategy(strategy: Any, state: SearchState, choices: dict[str, Sequence[int]],
                  seed: int | None = None) -> Strategy:
    """A strategy by name ("moe", "tpe", "random", "grid"), from an Optuna sampler object, or as given."""
    if isinstance(strategy, Strategy):
        return strategy
    if strategy is None or strategy == "moe":
        return MoeStrategy(state, choices, seed)
    if strategy == "grid":
        return GridStrategy(state, choices, seed)
    if strategy in ("tpe", "random"):
        return OptunaStrategy(state, choices, seed, sampler=strategy)
    import optuna

    if isinstance(strategy, optuna.samplers.BaseSampler):
        return OptunaStrategy(state, choices, seed, sampler=strategy)
    raise TuneError(f"unknown sampler {strategy!r}; accepted: {', '.join(STRATEGY_NAMES)} or an optuna sampler")

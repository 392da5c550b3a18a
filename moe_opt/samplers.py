"""Samplers the tuner can use, behind one Optuna interface: moe_opt's search (default), Optuna's TPE and random
samplers as baselines, and an exhaustive grid.

Each sampler proposes the six tunables jointly for one batch size's study. The moe_opt and grid samplers share
a :class:`~moe_opt.search.SearchState` across the studies of one tune.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.trial import FrozenTrial

from .errors import TuneError
from .search import SearchState
from .space import PARAM_NAMES, Config

SAMPLER_NAMES = ("moe", "tpe", "random", "grid")


def distributions(choices: dict[str, Sequence[int]]) -> dict[str, CategoricalDistribution]:
    return {name: CategoricalDistribution(list(choices[name])) for name in PARAM_NAMES}


class _StateSampler(BaseSampler):
    """Proposes whole configs from a SearchState; Optuna's enqueued (warm-start) trials take precedence."""

    def __init__(self, state: SearchState, M: int, choices: dict[str, Sequence[int]], seed: int | None):
        self.state = state
        self.M = M
        self.choices = choices
        self._rng = random.Random(seed)
        self._fallback = RandomSampler(seed=seed)
        self.pending: set[Config] = set()  # asked by this process but not yet told
        # Configs other processes run or have queued at this batch size, learned from the storage before each
        # ask (coordination.py): they count as pending, so two workers never measure the same config.
        self.elsewhere: set[Config] = set()

    def reseed_rng(self) -> None:
        self._rng.seed()
        self._fallback.reseed_rng()

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return dict(distributions(self.choices))

    def _next(self) -> Config | None:
        raise NotImplementedError

    def exhausted(self, elsewhere: set[Config] = frozenset()) -> bool:
        """Whether every candidate has been tried or asked at this batch size (the study has nothing left)."""
        return not (set(self.state.open_candidates(self.M)) - self.pending - set(elsewhere))

    def sample_relative(self, study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if "fixed_params" in trial.system_attrs:  # an enqueued warm-start config
            return {}
        config = self._next()
        if config is None:
            return {}
        self.pending.add(config)
        return config.to_dict()

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)


class MoeSampler(_StateSampler):
    """moe_opt's search (search.py): surrogate-guided, order-aware, sharing what other batch sizes learned."""

    def _next(self) -> Config | None:
        return self.state.propose(self.M, self._rng, exclude=self.pending | self.elsewhere)


class GridWalkSampler(_StateSampler):
    """Every candidate config once, in a fixed order: the exhaustive baseline and the replay-table recorder."""

    def _next(self) -> Config | None:
        tried = self.state.tried(self.M) | self.pending | self.elsewhere
        for config in self.state.candidates:
            if config not in tried:
                return config
        return None


def make_sampler(sampler: str | BaseSampler | None, state: SearchState, M: int,
                 choices: dict[str, Sequence[int]], seed: int | None) -> BaseSampler:
    """The sampler for one batch size's study. Strings: 'moe' (default), 'tpe', 'random', 'grid'."""
    if sampler is None or sampler == "moe":
        return MoeSampler(state, M, choices, seed)
    if sampler == "grid":
        return GridWalkSampler(state, M, choices, seed)
    if sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if isinstance(sampler, BaseSampler):
        return sampler
    raise TuneError(f"unknown sampler {sampler!r}; accepted: {', '.join(SAMPLER_NAMES)} or an optuna sampler")

"""The strategy interface: what the tune's coordinator and compile-ahead ask of a search strategy.

A strategy serves every batch size of one tune. The coordinator (run/coordinator.py) creates each batch size's
Optuna study with ``strategy.sampler(M)``, tells it what other processes run (``exclude``), asks whether
anything is left (``exhausted``), says what a new trial runs (``asked``) and feeds back every counted trial
(``observe``); the scheduler compiles ``lookahead`` configs ahead and asks ``best_us`` (how far to time a config
that is clearly slower). Nothing else about a strategy is read.

Every strategy shares one :class:`~moe_opt.search.surrogate.SearchState` (what all batch sizes measured), which
also serves the warm start and the compile-ahead guesses.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from ..space import Config
from .surrogate import SearchState


def distributions(choices: dict[str, Sequence]) -> dict:
    """One categorical distribution per tunable of ``choices``: the six, and USE_TMA where the space offers it."""
    from optuna.distributions import CategoricalDistribution

    return {name: CategoricalDistribution(list(values)) for name, values in choices.items()}


class Strategy:
    """A search strategy over the configs of one tune (base class: the bookkeeping every strategy shares).

    Args:
        state: the shared search state (candidates, what was measured).
        choices: allowed values of each tunable (the trials' distributions).
        seed: seed of the strategy's random draws; batch size i uses ``seed * 1009 + i``.
    """

    name = "base"
    # Whether each result must reach the study's sampler through Optuna's study.tell (its after_trial hook); a
    # proposing strategy learns through observe() and its trials are finished in one storage write.
    optuna_tell = True

    def __init__(self, state: SearchState, choices: dict[str, Sequence[int]], seed: int | None = None):
        self.state = state
        self.choices = choices
        self.seed = seed
        self._pending: dict[int, set[Config]] = {}  # asked by this process at M, not yet observed
        self._elsewhere: dict[int, set[Config]] = {}  # running or queued in other processes at M
        self._samplers: dict[int, Any] = {}
        self._rngs: dict[int, random.Random] = {}  # a proposing strategy's random stream per batch size

    # What the coordinator calls.
    def sampler(self, M: int) -> Any:
        """The Optuna sampler of batch size M's study (one per M, made once)."""
        if M not in self._samplers:
            index = len(self._samplers)
            self._samplers[M] = self._make_sampler(M, None if self.seed is None else self.seed * 1009 + index)
        return self._samplers[M]

    def exclude(self, M: int, configs: set[Config]) -> None:
        """Configs other processes run or have queued at M: never proposed meanwhile."""
        self._elsewhere[M] = set(configs)

    def exhausted(self, M: int, running: set[Config] = frozenset()) -> bool:
        """Whether nothing is left to propose at M (the exhaustive strategies end there)."""
        return False

    def asked(self, M: int, config: Config) -> None:
        """A new trial of M runs ``config``."""
        self._pending.get(M, set()).discard(config)

    def observe(self, M: int, config: Config, latency_us: float | None, *, compile_failure: bool = False,
                stages: dict[str, float] | None = None) -> None:
        """A counted trial's outcome (idempotent); ``stages`` holds the GEMM stages' times of a pair tune
        ({"up_us": ..., "down_us": ...}), which strategies that search each GEMM on its own time use."""
        self.state.record(M, config, latency_us, compile_failure=compile_failure)

    def tried(self, M: int) -> set[Config]:
        return self.state.tried(M)

    def best_us(self, M: int) -> float | None:
        """The lowest latency measured at M so far (the whole call's), or None."""
        results = self.state.measured.get(M)
        return min(results.values()) if results else None

    def lookahead(self, M: int, k: int) -> list[Config]:
        """The k configs most likely to be asked next at M (compiled ahead while the GPU measures)."""
        return self.state.lookahead(M, k)

    def next_config(self, M: int) -> Config | None:
        """The next config to run at M, proposed without asking Optuna (so the coordinator can create the trial in
        one storage write), or None where the config comes from the study's Optuna sampler."""
        return None

    # What subclasses provide.
    def _make_sampler(self, M: int, seed: int | None) -> Any:
        raise NotImplementedError

    def _blocked(self, M: int) -> set[Config]:
        return self._pending.setdefault(M, set()) | self._elsewhere.get(M, set())


class ProposingStrategy(Strategy):
    """A strategy that proposes whole configs itself (moe_opt's search, the grid walk) through one Optuna
    sampler adapter per batch size; Optuna's enqueued (warm-start, retry) trials take precedence."""

    optuna_tell = False

    def propose(self, M: int, rng: random.Random) -> Config | None:
        raise NotImplementedError

    def next_config(self, M: int) -> Config | None:
        """The next proposal at M, from batch size M's seeded random stream (the same one whether the coordinator
        creates the trial itself or Optuna's ask reaches the sampler adapter), held as pending until asked."""
        if M not in self._rngs:
            self.sampler(M)  # numbers the batch sizes in the order their studies were made: M's seed
        config = self.propose(M, self._rngs[M])
        if config is not None:
            self._pending.setdefault(M, set()).add(config)
        return config

    def exhausted(self, M: int, running: set[Config] = frozenset()) -> bool:
        return not (set(self.state.open_candidates(M)) - self._blocked(M) - set(running))

    def _make_sampler(self, M: int, seed: int | None) -> Any:
        self._rngs[M] = random.Random(seed)
        return _ProposingSampler(self, M, seed)


def _ProposingSampler(strategy: ProposingStrategy, M: int, seed: int | None):
    """The Optuna adapter of a proposing strategy (a BaseSampler subclass, made when Optuna is loaded)."""
    from optuna.samplers import BaseSampler, RandomSampler

    class ProposingSampler(BaseSampler):
        def __init__(self) -> None:
            self._fallback = RandomSampler(seed=seed)

        def reseed_rng(self) -> None:
            strategy._rngs[M].seed()
            self._fallback.reseed_rng()

        def infer_relative_search_space(self, study, trial) -> dict:
            return dict(distributions(strategy.choices))

        def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
            if "fixed_params" in trial.system_attrs:  # an enqueued warm-start or retry config
                return {}
            config = strategy.next_config(M)
            # USE_TMA false included: a space offering it must not draw it at random
            return {} if config is None else config.params()

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    return ProposingSampler()

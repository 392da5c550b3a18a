"""The strategies a tune can use: moe_opt's search (default), the exhaustive grid walk, and Optuna's samplers
(TPE, random, GP, or any sampler object) as baselines. Each is a :class:`~moe_opt.search.base.Strategy`."""

from __future__ import annotations

import random
from typing import Any, Sequence

from ..errors import TuneError
from ..space import Config
from .base import ProposingStrategy, Strategy
from .surrogate import SearchState

STRATEGY_NAMES = ("moe", "tpe", "random", "gp", "grid")


class MoeStrategy(ProposingStrategy):
    """moe_opt's search (surrogate.py): surrogate-guided, order-aware, sharing what other batch sizes learned."""

    name = "moe"

    def propose(self, M: int, rng: random.Random) -> Config | None:
        return self.state.propose(M, rng, exclude=self._blocked(M))


class PairStrategy(MoeStrategy):
    """moe_opt's search for a config pair (one config per GEMM, sharing BLOCK_SIZE_M): every measurement times
    both GEMM stages, so one trial informs three searches over the same candidates, on the whole call's time,
    GEMM1's and GEMM2's; proposals take turns among them, so the trial budget does not double while each GEMM's
    config is searched on its own GEMM's time. The pair is assembled afterwards (store/results.py, best_pair):
    per BLOCK_SIZE_M the best up config and the best down config, the better BLOCK_SIZE_M shared."""

    name = "moe-pair"
    TURNS = ("total", "down", "total", "up")

    def __init__(self, state: SearchState, choices: dict[str, Sequence[int]], seed: int | None = None):
        super().__init__(state, choices, seed)
        self.stage_states = {"up": state.sibling(), "down": state.sibling()}
        self._turn: dict[int, int] = {}

    def observe(self, M: int, config: Config, latency_us: float | None, *, compile_failure: bool = False,
                stages: dict[str, float] | None = None) -> None:
        super().observe(M, config, latency_us, compile_failure=compile_failure)
        for stage, state in self.stage_states.items():
            us = (stages or {}).get(f"{stage}_us") if latency_us is not None else None
            if latency_us is None or us is not None:
                state.record(M, config, us, compile_failure=compile_failure)

    def propose(self, M: int, rng: random.Random) -> Config | None:
        turn = self._turn.get(M, 0)
        self._turn[M] = turn + 1
        which = self.TURNS[turn % len(self.TURNS)]
        state = self.state if which == "total" else self.stage_states[which]
        blocked = self._blocked(M) | self.state.tried(M)  # a config measured once gave every stage's time
        config = state.propose(M, rng, exclude=blocked) if state.measured.get(M) else None
        return config if config is not None else self.state.propose(M, rng, exclude=self._blocked(M))


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
        if self.sampler_spec == "gp":  # one per study: its search space is computed over one study
            return optuna.samplers.GPSampler(seed=seed)  # needs scipy, which moe_opt does not depend on
        return self.sampler_spec


def require_gp() -> None:
    """sampler='gp' needs scipy: Optuna's GPSampler imports it at its first model fit, trials into a tune."""
    import importlib.util

    if importlib.util.find_spec("scipy") is None:
        raise TuneError("sampler='gp' (Optuna's GPSampler) needs scipy, which is not installed; pip install scipy, or "
                        "use sampler='moe'")


def make_strategy(strategy: Any, state: SearchState, choices: dict[str, Sequence[int]],
                  seed: int | None = None, *, pair: bool = False) -> Strategy:
    """A strategy by name ("moe", "tpe", "random", "gp", "grid"), from an Optuna sampler object, or as given; with
    ``pair``, moe_opt's search runs as :class:`PairStrategy`."""
    if isinstance(strategy, Strategy):
        return strategy
    if strategy is None or strategy == "moe":
        return PairStrategy(state, choices, seed) if pair else MoeStrategy(state, choices, seed)
    if strategy == "grid":
        return GridStrategy(state, choices, seed)
    if strategy == "gp":
        require_gp()
    if strategy in ("tpe", "random", "gp"):
        return OptunaStrategy(state, choices, seed, sampler=strategy)
    import optuna

    if isinstance(strategy, optuna.samplers.BaseSampler):
        return OptunaStrategy(state, choices, seed, sampler=strategy)
    raise TuneError(f"unknown sampler {strategy!r}; accepted: {', '.join(STRATEGY_NAMES)} or an optuna sampler")

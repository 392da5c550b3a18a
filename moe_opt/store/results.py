"""The one ranking: which config is the result of a study, its latency, and the default's latency.

Every reader asks here: the tune's result and export, ``moe-opt export STORAGE``, the dashboard notes, the
report and ``moe-opt show``. A completed trial's latency is its re-measured median where the tune re-measured it
(study attribute ``confirmed``, run/confirm.py), else its value; configs the correctness guard rejected (study
attribute ``guard``, run/guard.py) are never ranked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..space import Config, ConfigPair
from .schema import config_of

GUARD_ATTR = "guard"  # {trial number: "passed: ..." | "failed: ..."}
GUARD_GAVE_UP_ATTR = "guard_gave_up"  # the guard rejected the fastest few: this study has no result
# Trial user attributes of a study tuned for a config pair: each GEMM stage's time in the measured call (GEMM1 with
# the alignment and the activation; GEMM2 with the sum over topk), in µs.
UP_ATTR, DOWN_ATTR = "up_us", "down_us"
# {"up": trial, "down": trial, "us": the pair's whole call, "single_us": the best single config's, both re-measured
# in the same interleaved rounds (run/confirm.py)}
CONFIRMED_PAIR_ATTR = "confirmed_pair"
CONFIRMED_ATTR = "confirmed"  # {trial number: re-measured median latency_us}


@dataclass(frozen=True)
class Ranked:
    """One config of a study with its latency (re-measured median where there is one) and its best trial."""

    config: Config
    latency_us: float
    trial_number: int


@dataclass(frozen=True)
class StudyResult:
    """What a study found, as every reader reports it.

    Attributes:
        M: the batch size.
        ranked: the measured configs the guard did not reject, fastest first, each once.
        rejected: {config: the guard's outcome} of configs the guard rejected.
        guard: {config: the guard's stored outcome} of every config it checked.
        default: SGLang's default config of this batch size, where the tune recorded it.
        default_latency_us: its latency (a trial's, re-measured where it was, or timed apart), or None.
        gave_up: why the study has no result though it has measured configs (the guard rejected the fastest
            few), or None.
    """

    M: int
    ranked: tuple[Ranked, ...]
    rejected: dict[Config, str] = field(default_factory=dict)
    guard: dict[Config, str] = field(default_factory=dict)
    default: Config | None = None
    default_latency_us: float | None = None
    gave_up: str | None = None
    pair: "PairResult | None" = None

    @property
    def best(self) -> Ranked | None:
        """The result of the study: the fastest config the guard did not reject."""
        return self.ranked[0] if self.ranked and self.gave_up is None else None

    @property
    def engine_pair(self) -> tuple[ConfigPair, float] | None:
        """What SGLang should run, one config per GEMM, and its latency: the tuned pair where its whole call was
        timed faster than the best single config, else the best single config for both GEMMs (what SGLang runs
        without a ``_down`` file)."""
        if self.best is None:
            return None
        pair = self.pair
        if pair is not None and pair.confirmed_us is not None and pair.confirmed_us < pair.confirmed_single_us \
                and (pair.guard is None or pair.guard.startswith("passed")):
            return ConfigPair(pair.up, pair.down), pair.confirmed_us
        return ConfigPair(self.best.config, self.best.config), self.best.latency_us

    @property
    def speedup(self) -> float | None:
        """default latency / best latency, where both are known."""
        if self.best is None or not self.default_latency_us:
            return None
        return self.default_latency_us / self.best.latency_us


@dataclass(frozen=True)
class PairResult:
    """The best config pair of a study tuned for pairs.

    Attributes:
        up, down: GEMM1's config (fastest by its stage time) and GEMM2's (fastest by its), sharing BLOCK_SIZE_M.
        up_trial, down_trial: the trials that timed them.
        estimated_us: the sum of the two stage times, each from its own trial.
        confirmed_us, confirmed_single_us: the pair's whole fused-MoE call and the best single config's, timed
            interleaved in the same rounds (run/confirm.py), or None.
    """

    up: Config
    down: Config
    up_trial: int
    down_trial: int
    estimated_us: float
    confirmed_us: float | None = None
    confirmed_single_us: float | None = None
    guard: str | None = None

    @property
    def guard_key(self) -> str:
        """The pair's key in the study's ``guard`` attribute."""
        return pair_guard_key(self.up_trial, self.down_trial)


def pair_guard_key(up_trial: int, down_trial: int) -> str:
    return f"pair:{up_trial}:{down_trial}"


def best_pair(complete: list, rejected: dict[Config, str], attrs: dict[str, Any]) -> PairResult | None:
    """The pair of configs, one per GEMM, with the least summed stage time under one BLOCK_SIZE_M; None when
    the trials have no stage times (a single-config study, a replay table)."""
    stages: dict[int, dict[str, tuple[float, Config, int]]] = {}
    for t, c in complete:
        if c in rejected or UP_ATTR not in t.user_attrs or DOWN_ATTR not in t.user_attrs:
            continue
        best_m = stages.setdefault(c.BLOCK_SIZE_M, {})
        for stage, key in (("up", UP_ATTR), ("down", DOWN_ATTR)):
            us = float(t.user_attrs[key])
            if math.isfinite(us) and (stage not in best_m or us < best_m[stage][0]):
                best_m[stage] = (us, c, t.number)
    sums = [(m["up"][0] + m["down"][0], m["up"], m["down"]) for m in stages.values() if len(m) == 2]
    if not sums:
        return None
    estimated, (_, up, up_trial), (_, down, down_trial) = min(sums, key=lambda s: s[0])
    verdict = (attrs.get(GUARD_ATTR) or {}).get(pair_guard_key(up_trial, down_trial))
    confirmed = attrs.get(CONFIRMED_PAIR_ATTR) or {}
    if confirmed.get("up") == up_trial and confirmed.get("down") == down_trial:
        return PairResult(up, down, up_trial, down_trial, estimated, float(confirmed["us"]),
                          float(confirmed["single_us"]), verdict)
    return PairResult(up, down, up_trial, down_trial, estimated, guard=verdict)


def latency_of(trial: Any, confirmed: dict[str, float]) -> float:
    """A completed trial's latency: its re-measured median where there is one, else its value."""
    return float(confirmed.get(str(trial.number), trial.value))


def result_of(trials: list, attrs: dict[str, Any], M: int | None = None) -> StudyResult:
    """The ranking of one study from its trials and user attributes (no storage access).

    Example:
        >>> import optuna
        >>> from moe_opt.space import PARAM_NAMES
        >>> study = optuna.create_study()
        >>> study.add_trial(optuna.trial.create_trial(params=Config(64, 128, 128, 32, 4, 3).to_dict(),
        ...     distributions={k: optuna.distributions.IntDistribution(1, 512) for k in PARAM_NAMES},
        ...     value=41.5))
        >>> result_of(study.get_trials(), {}).best.latency_us
        41.5
    """
    from optuna.trial import TrialState

    confirmed = attrs.get(CONFIRMED_ATTR) or {}
    complete = [(t, c) for t in trials if t.state == TrialState.COMPLETE and (c := config_of(t)) is not None]
    by_number = {t.number: c for t, c in complete}
    guard: dict[Config, str] = {}
    for number, outcome in (attrs.get(GUARD_ATTR) or {}).items():
        config = by_number.get(int(number)) if str(number).isdigit() else None
        if config is not None:
            guard[config] = str(outcome)
    rejected = {c: o for c, o in guard.items() if o.startswith("failed")}
    best: dict[Config, Ranked] = {}
    for t, c in complete:
        us = latency_of(t, confirmed)
        # A latency that is no latency (an older version stored a replay table's -1 or inf) never ranks.
        if math.isfinite(us) and us > 0 and c not in rejected and (c not in best or us < best[c].latency_us):
            best[c] = Ranked(c, us, t.number)
    ranked = tuple(sorted(best.values(), key=lambda r: (r.latency_us, r.trial_number)))
    default = Config.from_dict(attrs["default_config"]) if attrs.get("default_config") else None
    default_us = attrs.get("default_latency_us")
    default_runs = [latency_of(t, confirmed) for t, c in complete if c == default]
    if default_runs:
        default_us = min(default_runs)
    return StudyResult(int(attrs.get("M", M if M is not None else 0)), ranked, rejected, guard, default,
                       float(default_us) if default_us is not None else None, attrs.get(GUARD_GAVE_UP_ATTR),
                       best_pair(complete, rejected, attrs))


def study_result(study: Any) -> StudyResult:
    """The ranking of one Optuna study (one read of its trials and attributes)."""
    return result_of(study.get_trials(deepcopy=False), study.user_attrs)

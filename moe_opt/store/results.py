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

from ..space import Config
from .schema import config_of

GUARD_ATTR = "guard"  # {trial number: "passed: ..." | "failed: ..."}
GUARD_GAVE_UP_ATTR = "guard_gave_up"  # the guard rejected the fastest few: this study has no result
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

    @property
    def best(self) -> Ranked | None:
        """The result of the study: the fastest config the guard did not reject."""
        return self.ranked[0] if self.ranked and self.gave_up is None else None

    @property
    def speedup(self) -> float | None:
        """default latency / best latency, where both are known."""
        if self.best is None or not self.default_latency_us:
            return None
        return self.default_latency_us / self.best.latency_us


def latency_of(trial: Any, confirmed: dict[str, float]) -> float:
    """A completed trial's latency: its re-measured median where there is one, else its value."""
    return float(confirmed.get(str(trial.number), trial.value))


def result_of(trials: list, attrs: dict[str, Any], M: int | None = None) -> StudyResult:
    """The ranking of one study from its trials and user attributes (no storage access).

    Example:
        >>> import optuna
        >>> study = optuna.create_study()
        >>> study.add_trial(optuna.trial.create_trial(params=Config(64, 128, 128, 32, 4, 3).to_dict(),
        ...     distributions={k: optuna.distributions.IntDistribution(1, 512) for k in Config.__dataclass_fields__},
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
        config = by_number.get(int(number))
        if config is not None:
            guard[config] = str(outcome)
    rejected = {c: o for c, o in guard.items() if o.startswith("failed")}
    best: dict[Config, Ranked] = {}
    for t, c in complete:
        us = latency_of(t, confirmed)
        if math.isfinite(us) and c not in rejected and (c not in best or us < best[c].latency_us):
            best[c] = Ranked(c, us, t.number)
    ranked = tuple(sorted(best.values(), key=lambda r: (r.latency_us, r.trial_number)))
    default = Config.from_dict(attrs["default_config"]) if attrs.get("default_config") else None
    default_us = attrs.get("default_latency_us")
    default_runs = [latency_of(t, confirmed) for t, c in complete if c == default]
    if default_runs:
        default_us = min(default_runs)
    return StudyResult(int(attrs.get("M", M if M is not None else 0)), ranked, rejected, guard, default,
                       float(default_us) if default_us is not None else None, attrs.get(GUARD_GAVE_UP_ATTR))


def study_result(study: Any) -> StudyResult:
    """The ranking of one Optuna study (one read of its trials and attributes)."""
    return result_of(study.get_trials(deepcopy=False), study.user_attrs)

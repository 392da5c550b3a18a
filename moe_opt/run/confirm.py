"""Re-measure the close contenders before export, so the exported config and its speedup are not a lucky draw.

The best of 48 noisy measurements is biased low (the winner's curse): at ~30 us a config that was lucky once
looks a few percent faster than it is, and its ratio to SGLang's default, measured once, inherits the luck. So
after the search, per batch size, the few configs within ``CONFIRM_WITHIN`` of the best and SGLang's default are
measured again ``CONFIRM_ROUNDS`` times, interleaved (drift of clocks and temperature hits all alike); the
median of these fresh measurements ranks them and is the latency reported. The study keeps them in its user
attribute ``"confirmed"`` ({trial number: us}); Optuna cannot change a finished trial's value.
"""

from __future__ import annotations

import statistics
from typing import Any

import optuna
from optuna.trial import TrialState

from ..space import Config, ConfigPair
from ..store.results import CONFIRMED_ATTR
from ..store.schema import config_of
from .scheduler import MeasureQueue

CONFIRM_TOP = 3  # contenders per batch size, besides SGLang's default
CONFIRM_WITHIN = 0.02  # a contender's trial value is within this fraction of the best's
CONFIRM_ROUNDS = 3  # fresh measurements of each


def contenders(study: optuna.Study, confirmed: dict[Config, float], default: Config | None,
               top: int = CONFIRM_TOP, within: float = CONFIRM_WITHIN) -> dict[Config, list[int]]:
    """{config: its completed trial numbers} to measure again: of the configs not confirmed yet, the best ``top``
    whose latency (confirmed median, else trial value) is within ``within`` of the best one's, and the default
    config if it was measured."""
    latency: dict[Config, float] = {}
    numbers: dict[Config, list[int]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        config = config_of(t)
        if config is not None:
            latency[config] = min(latency.get(config, float("inf")), t.value)
            numbers.setdefault(config, []).append(t.number)
    latency.update({c: us for c, us in confirmed.items() if c in latency and us == us})  # NaN: re-measure failed
    if not latency:
        return {}
    best = min(latency.values())
    near = sorted((c for c in latency if c not in confirmed and latency[c] <= best * (1 + within)),
                  key=latency.get)[:top]
    if default in latency and default not in confirmed:
        near.append(default)
    return {c: numbers[c] for c in dict.fromkeys(near)}


def confirm(studies: dict[int, optuna.Study], measurer: Any, defaults: dict[int, Config], *,
            rounds: int = CONFIRM_ROUNDS, top: int = CONFIRM_TOP, within: float = CONFIRM_WITHIN,
            max_passes: int = 3, whole_call: bool = False) -> dict[int, dict[Config, float]]:
    """Measure each batch size's contenders ``rounds`` more times; store and return {M: {config: median us}}.

    When a contender's fresh median falls behind configs it had beaten, those are measured again in a next
    pass (at most ``max_passes``), so the one exported is the best by fresh measurements among all that could be.
    A contender that fails on re-measurement (a flaky launch) gets no confirmed latency and keeps its trial value.

    ``whole_call``: the measurer times GEMM1's stage apart for every Config (a pair tune's measurer); contenders are
    then submitted as ``ConfigPair(c, c)``, the same call, which such a measurer times as a whole only: the
    latencies compared and exported here are whole calls, without the stage's timing events (about 8 µs a call on
    the H200, docs/tuning.md).

    Example:
        >>> confirm(studies, measurer, defaults)  # after the search; tune() does this  # doctest: +SKIP
        {64: {Config(16, 64, 128, 32, 4, 3): 251.0, Config(64, 128, 128, 32, 4, 3): 291.8}, ...}
    """
    queue = MeasureQueue(measurer)
    confirmed: dict[int, dict[Config, float]] = {M: {} for M in studies}
    numbers: dict[int, dict[Config, list[int]]] = {M: {} for M in studies}
    for _ in range(max_passes):
        plan = {M: contenders(study, confirmed[M], defaults.get(M), top, within) for M, study in studies.items()}
        order = [(M, c) for M, configs in plan.items() for c in configs]  # all measured before: compiled
        if not order:
            break
        fresh: dict[tuple[int, Config], list[float]] = {}
        for _ in range(rounds):  # interleaved: drift hits every contender alike
            for M, c in order:
                queue.submit(ConfigPair(c, c) if whole_call else c, M)
            for M, c in order:
                m = queue.collect()
                if m.ok:
                    fresh.setdefault((M, c), []).append(m.latency_us)
        for M, c in order:
            numbers[M][c] = plan[M][c]
            runs = fresh.get((M, c), [])
            # A failed re-measurement: no confirmed latency; marked as confirmed at its trial value so that it is
            # not planned again.
            confirmed[M][c] = statistics.median(runs) if len(runs) == rounds else float("nan")
    out: dict[int, dict[Config, float]] = {}
    for M, medians in confirmed.items():
        medians = {c: us for c, us in medians.items() if us == us}
        if medians:
            out[M] = medians
            studies[M].set_user_attr(CONFIRMED_ATTR, {str(n): us for c, us in medians.items() for n in numbers[M][c]})
    return out


def confirm_pairs(studies: dict[int, optuna.Study], measurer: Any, *, rounds: int = CONFIRM_ROUNDS) -> dict[int, dict]:
    """Time each batch size's best config pair (one config per GEMM, from the stage times) on the whole fused-MoE
    call, interleaved with the best single config, ``rounds`` times; store and return {M: {"up": trial,
    "down": trial, "us": pair median, "single_us": single median}}. The pair is exported for SGLang only where it
    was faster in this pass (store/results.py, StudyResult.engine_pair).

    Example:
        >>> confirm_pairs(studies, measurer)  # after confirm(); the session does this  # doctest: +SKIP
        {64: {'up': 12, 'down': 30, 'us': 187.2, 'single_us': 193.1}, ...}
    """
    from ..store.results import CONFIRMED_PAIR_ATTR, study_result

    queue = MeasureQueue(measurer)
    plan = {}
    for M, study in studies.items():
        result = study_result(study)
        pair, best = result.pair, result.best
        if pair is None or best is None or pair.up == pair.down == best.config:
            continue
        # The single config as ConfigPair(c, c): the same call, timed as one whole call (confirm's whole_call).
        plan[M] = (pair, ConfigPair(pair.up, pair.down), ConfigPair(best.config, best.config))
    fresh: dict[tuple[int, str], list[float]] = {}
    for _ in range(rounds):
        order = [(M, kind, c) for M, (_, both, single) in plan.items() for kind, c in (("pair", both), ("single", single))]
        for M, _, c in order:
            queue.submit(c, M)
        for M, kind, _ in order:
            m = queue.collect()
            if m.ok:
                fresh.setdefault((M, kind), []).append(m.latency_us)
    out = {}
    for M, (pair, _, _) in plan.items():
        runs, single = fresh.get((M, "pair"), []), fresh.get((M, "single"), [])
        if len(runs) == rounds and len(single) == rounds:
            out[M] = {"up": pair.up_trial, "down": pair.down_trial, "us": statistics.median(runs),
                      "single_us": statistics.median(single)}
            studies[M].set_user_attr(CONFIRMED_PAIR_ATTR, out[M])
    return out

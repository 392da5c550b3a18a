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
            max_passes: int = 3, whole_call: bool = False,
            compile_pool: Any = None) -> dict[int, dict[Config, float]]:
    """Measure each batch size's contenders ``rounds`` more times; store and return {M: {config: median us}}.

    When a contender's fresh median falls behind configs it had beaten, those are measured again in a next
    pass (at most ``max_passes``), so the one exported is the best by fresh measurements among all that could be.
    A contender that fails on re-measurement (a flaky launch) gets no confirmed latency and keeps its trial value.

    ``whole_call``: the measurer times GEMM1's stage apart for every Config (a pair tune's measurer); contenders are
    then submitted as ``ConfigPair(c, c)``, the same call, which such a measurer times as a whole only: the
    latencies compared and exported here are whole calls, without the stage's timing events (about 8 µs a call on
    the H200, docs/tuning.md). Each batch size's best config pair (one config per GEMM, from the stage times) is
    then a contender of the first pass too, timed on the whole call in the same interleaved rounds; the study keeps
    its median beside the best single config's (``"confirmed_pair"``), and the pair is exported for SGLang only
    where it was the faster (store/results.py, StudyResult.engine_pair).

    ``compile_pool``: where the pairs are compiled first (measure/compile_pool.py), while the single configs are
    timed: a pair whose GEMM2 loads its input by TMA has GEMM1 write its output sorted, a binary of GEMM1 that
    neither config of the pair compiled alone (the measuring process compiled 14 of them itself, DeepSeek-V4-Flash
    TP8 on the H200).

    Example:
        >>> confirm(studies, measurer, defaults)  # after the search; tune() does this  # doctest: +SKIP
        {64: {Config(16, 64, 128, 32, 4, 3): 251.0, Config(64, 128, 128, 32, 4, 3): 291.8}, ...}
    """
    queue = MeasureQueue(measurer)
    confirmed: dict[int, dict[Config, float]] = {M: {} for M in studies}
    numbers: dict[int, dict[Config, list[int]]] = {M: {} for M in studies}
    pairs = _pairs(studies) if whole_call else {}  # {M: the best pair}, in the first pass only
    pair_runs: dict[int, list[float]] = {M: [] for M in pairs}
    if compile_pool is not None:
        compile_pool.ensure((ConfigPair(p.up, p.down), M) for M, p in pairs.items())
    for _ in range(max_passes):
        plan = {M: contenders(study, confirmed[M], defaults.get(M), top, within) for M, study in studies.items()}
        # All measured before (compiled): each contender as a whole call, then the pairs of this pass.
        order: list[tuple[int, Config | ConfigPair]] = [(M, c) for M, configs in plan.items() for c in configs]
        order += [(M, ConfigPair(p.up, p.down)) for M, p in pairs.items()]
        if not order:
            break
        fresh: dict[tuple[int, Config], list[float]] = {}
        for _ in range(rounds):  # interleaved: drift hits every contender alike
            for M, c in order:
                if compile_pool is not None and isinstance(c, ConfigPair):
                    compile_pool.result(c, M)  # the singles before it are being timed meanwhile
                queue.submit(ConfigPair(c, c) if whole_call and isinstance(c, Config) else c, M)
            for M, c in order:
                m = queue.collect()
                if m.ok:
                    (fresh.setdefault((M, c), []) if isinstance(c, Config) else pair_runs[M]).append(m.latency_us)
        for M, configs in plan.items():
            for c in configs:
                numbers[M][c] = configs[c]
                runs = fresh.get((M, c), [])
                # A failed re-measurement: no confirmed latency; marked as confirmed at its trial value so that it
                # is not planned again.
                confirmed[M][c] = statistics.median(runs) if len(runs) == rounds else float("nan")
        pairs = {}
    out: dict[int, dict[Config, float]] = {}
    for M, medians in confirmed.items():
        medians = {c: us for c, us in medians.items() if us == us}
        if medians:
            out[M] = medians
            studies[M].set_user_attr(CONFIRMED_ATTR, {str(n): us for c, us in medians.items() for n in numbers[M][c]})
    for M, runs in pair_runs.items():
        _store_pair(studies[M], runs, rounds)
    return out


def _pairs(studies: dict[int, optuna.Study]) -> dict:
    """{M: PairResult} of the batch sizes whose best pair is two configs (one config for both GEMMs is a single
    config: a contender of its own, or slower than those)."""
    from ..store.results import study_result

    pairs = {}
    for M, study in studies.items():
        pair = study_result(study).pair
        if pair is not None and pair.up != pair.down:
            pairs[M] = pair
    return pairs


def _store_pair(study: optuna.Study, runs: list[float], rounds: int) -> None:
    """Keep the pair's median beside the best single config's, as ranked after re-measuring (both from the same
    rounds, the single config's from a later pass where it was planned again)."""
    from ..store.results import CONFIRMED_PAIR_ATTR, study_result

    result = study_result(study)
    pair, best = result.pair, result.best
    if len(runs) == rounds and pair is not None and best is not None:
        study.set_user_attr(CONFIRMED_PAIR_ATTR, {"up": pair.up_trial, "down": pair.down_trial,
                                                  "us": statistics.median(runs), "single_us": best.latency_us})

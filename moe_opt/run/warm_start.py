"""Warm start: configs worth measuring first, enqueued into each batch size's study before the sampler runs.

In order: SGLang's default config for the batch size (also the baseline of the speedup), the configs of existing
tuned files for the same shape and device (SGLang or vLLM JSON), the configs the caller gives per batch size
(``warm_start_configs``: a sweep passes what the other shapes found), the default with the BLOCK_SIZE_M that holds
one expert's tokens and with the next one up, where they differ (:func:`~moe_opt.space.block_m_for_tokens`), and
the best configs already measured at the nearest batch sizes (from earlier, resumed runs).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

import optuna

from ..model.spec import ModelSpec
from ..search.surrogate import SearchState
from ..space import PARAM_NAMES, Config, block_m_for_tokens
from ..store.schema import is_counted, trial_params

NEAREST_BEST = 2  # best configs taken from each of the nearest already-tuned batch sizes


def snap_to_space(config: Config, candidates: Sequence[Config]) -> Config | None:
    """The candidate nearest to ``config`` (fewest steps in log2 terms), e.g. SGLang's bf16 default with
    BLOCK_SIZE_K 32 and GROUP_SIZE_M 8, which lie outside the search space, becomes K64 G16."""
    import math

    def distance(c: Config) -> float:
        return sum(abs(math.log2(getattr(c, p)) - math.log2(getattr(config, p))) for p in PARAM_NAMES)

    return min(candidates, key=distance) if candidates else None


def _nearest(M: int, tuned: Sequence[int]) -> list[int]:
    return sorted((m for m in tuned if m != M), key=lambda m: abs((m / M) - 1) if m > M else abs((M / m) - 1))[:2]


def enqueue_warm_start(studies: dict[int, optuna.Study], state: SearchState, defaults: dict[int, Config],
                       spec: ModelSpec | None, device_name: str, config_dirs: Sequence[str | Path], *,
                       n_trials: int, given: Mapping[int, Sequence[Config]] | None = None) -> None:
    """Enqueue warm-start configs into studies that have not measured them yet, within their trial budget."""
    existing: dict[int, Config] = {}
    if spec is not None and config_dirs:
        from ..errors import TuneError
        from ..export.engines import find_tuned_config_files, load_tuned_configs

        for path in find_tuned_config_files(spec, device_name, [Path(d) for d in config_dirs]):
            try:
                for M, config in load_tuned_configs(path).items():
                    existing.setdefault(M, config)
            except TuneError as exc:
                print(f"moe-opt: ignoring tuned config file {path}: {exc}")
    tuned = [m for m, results in state.measured.items() if results]
    allowed = set(state.candidates)
    for M, study in studies.items():
        # The default starts the search; where it lies outside the space, its nearest neighbour inside does.
        seeds = [defaults[M] if defaults[M] in allowed else snap_to_space(defaults[M], state.candidates)]
        if existing:
            nearest_file_m = min(existing, key=lambda m: abs(m - M))
            seeds.append(existing[nearest_file_m])
        if given:
            seeds += given[M] if M in given else given[min(given, key=lambda m: abs(m - M))]
        if spec is not None and seeds[0] is not None:
            # SGLang's default keeps one BLOCK_SIZE_M over wide ranges of M (64 for every M in fp8 block); the optimum
            # follows the tokens per expert, and reaching it one step at a time costs most of a 32-trial budget. The
            # next BLOCK_SIZE_M up too: the tokens per expert vary even under uniform routing (binomial: at a mean of
            # 16, 43% of the experts get more); on the recorded Qwen3-235B-A22B table, M=256, the walk stopped 1.5%
            # off in 19 of 20 seeds without it, in none with it.
            block_m = block_m_for_tokens(M, spec.topk, spec.E)
            for size in dict.fromkeys((block_m, min(2 * block_m, 128))):
                if size != seeds[0].BLOCK_SIZE_M:
                    seeds.append(snap_to_space(dataclasses.replace(seeds[0], BLOCK_SIZE_M=size), state.candidates))
        for m in _nearest(M, tuned):
            seeds += sorted(state.measured[m], key=state.measured[m].get)[:NEAREST_BEST]
        tried = state.tried(M)
        finished = [t for t in study.get_trials(deepcopy=False) if is_counted(t)]
        waiting = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.WAITING]
        room = n_trials - len(finished) - len(waiting)
        queued = set()
        for config in seeds:
            if len(queued) >= room:
                break
            # Configs outside the search space (SGLang's bf16 default has BLOCK_SIZE_K 32) can't be trials.
            if config in tried or config in queued or config not in allowed:
                continue
            study.enqueue_trial(trial_params(config), user_attrs={"warm_start": True}, skip_if_exists=True)
            queued.add(config)

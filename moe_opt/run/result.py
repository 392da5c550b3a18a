"""TuneResult: what a tune found per batch size."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model.spec import ModelSpec


@dataclass
class TuneResult:
    """What a tune found, per batch size M.

    Attributes:
        best: {M: config dict with the six keys} of the fastest measured config that passed the correctness guard.
        latency_us: {M: its latency}.
        default_latency_us: {M: latency of the target engine's default config}, None where it was not measured.
        files: {"sglang": path, "vllm": path[, "sglang_down": path]} of the exported config files (empty if none
            were written); a tune whose target is vLLM writes vLLM's file only.
        storage: the Optuna storage (URL or object) holding the studies.
        study_names: {M: study name}.
        is_performance: False when the timings came from Triton's CPU interpreter.
        spec: the (possibly scaled-down) spec that was tuned; None in replay mode without one.
        trials_used: {M: counted trials}.
        guard: {M: the correctness guard's outcome for the config in ``best``}.
        pairs: {M: {"up": config dict, "down": config dict, "latency_us": us}} of a pair tune: what SGLang's up and
            ``_down`` files hold (the tuned pair where its whole call was faster than ``best``, else ``best`` for
            both GEMMs). Empty for a single-config tune; vLLM's file holds ``best``.
        excluded: {M: faster configs the guard excluded, with the reason}.
        notes: things the summary should say (kept entries of an older file, workers that failed, ...).
        target: the engine the tune was for ("sglang", "vllm"): its launch rules, its default config.
        timings: where the wall time went, in seconds: start_s (to the first trial: studies, warm start, the
            measuring process), search_s (the trial loop), of which measuring_s (waiting for measurements) and
            compile_wait_s (every claimed config still compiling), confirm_s (re-measuring the close contenders),
            guard_s, collect_export_s; with counts measured and compiled; from the tune's start, when the
            measuring process had built its measurer (measurer_ready_s, by its own clock), the first compile worker
            had started (pool_ready_s), the first config was handed to the measurer (first_submit_s: its compile
            had finished) and its measurement came back (first_result_s), where there were those; the seconds the
            measuring process spent measuring (measurer_busy_s); and close_s, stopping the processes the tune
            started (after wall_s: it does not wait for their exit). Empty for a tune with several workers.
    """

    best: dict[int, dict[str, int]]
    latency_us: dict[int, float]
    default_latency_us: dict[int, float | None]
    files: dict[str, Path]
    storage: Any
    study_names: dict[int, str]
    is_performance: bool
    spec: ModelSpec | None
    trials_used: dict[int, int] = field(default_factory=dict)
    wall_s: float = 0.0
    interrupted: bool = False
    guard: dict[int, str] = field(default_factory=dict)
    excluded: dict[int, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    worker_errors: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    pairs: dict[int, dict] = field(default_factory=dict)
    target: str = "sglang"  # the engine whose launch rules were timed and whose default the speedups are over

    def speedup(self) -> dict[int, float]:
        """{M: default latency / tuned latency} where the default was measured."""
        return {M: d / self.latency_us[M] for M, d in self.default_latency_us.items()
                if d is not None and M in self.latency_us}

    def geomean_speedup(self) -> float | None:
        s = list(self.speedup().values())
        return math.exp(sum(map(math.log, s)) / len(s)) if s else None

    def trials_dataframe(self):
        """All trials of all batch sizes as one pandas DataFrame, with a column M.

        The latency is in ``value`` (Optuna's own column name) and, as optuna-dashboard names the objective,
        ``value_latency_us``; both in microseconds.
        """
        import optuna
        import pandas as pd

        from ..store.storage import open_storage

        storage = open_storage(self.storage, create=False)
        frames = []
        for M, name in sorted(self.study_names.items()):
            df = optuna.load_study(study_name=name, storage=storage).trials_dataframe()
            df.insert(0, "M", M)
            if "value" not in df.columns and "value_latency_us" in df.columns:  # the study names its objective
                df.insert(df.columns.get_loc("value_latency_us"), "value", df["value_latency_us"])
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

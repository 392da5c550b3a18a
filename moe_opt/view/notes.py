"""The Markdown note of a study in optuna-dashboard: best config, its latency, SGLang's default and the speedup.

Written or refreshed when a batch size finishes its trials and at the end of a tune, and filled in by
``moe-opt dashboard`` for studies that have none (tuned where optuna-dashboard was not installed).
"""

from __future__ import annotations

import json
import math
from collections import Counter

import optuna
from optuna.trial import TrialState

from ..space import PARAM_NAMES, Config
from ..store.results import result_of
from ..store.schema import config_of, error_of, is_interrupted

METRIC_NAME = "latency_us"  # the objective's name in optuna-dashboard (instead of "Objective 0")
TOP_CONFIGS = 3
# optuna-dashboard keeps a study note in study system attributes: the version under NOTE_VER_KEY and the text in
# chunks of at most 2045 characters under NOTE_STR_PREFIX + index (optuna_dashboard/_note.py, save_note).
NOTE_VER_KEY = "dashboard:note_ver"
NOTE_STR_PREFIX = "dashboard:note_str:"
NOTE_CHUNK = 2045


def _row(label: str, config: Config | dict, us: float | None, default_us: float | None) -> str:
    values = Config.from_dict(config).to_dict() if isinstance(config, dict) else config.to_dict()
    speedup = f"{default_us / us:.2f}×" if us and default_us else ""
    latency = f"{us:.2f}" if us is not None else "not measured"
    return f"| {label} | " + " | ".join(str(values[p]) for p in PARAM_NAMES) + f" | {latency} | {speedup} |"


def study_note(study: optuna.Study) -> str | None:
    """The note's Markdown text, or None while the study has no completed trial.

    Example:
        >>> import optuna, moe_opt
        >>> r = moe_opt.tune(replay="moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv", n_trials=8,
        ...                  storage="sqlite:///demo.db", output_dir=None, progress=False)  # doctest: +SKIP
        >>> study = optuna.load_study(study_name=r.study_names[16], storage="sqlite:///demo.db")  # doctest: +SKIP
        >>> print(study_note(study))  # doctest: +SKIP
        # M = 16: 1.33× faster than SGLang's default
        ...
    """
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
    attrs = study.user_attrs
    result = result_of(trials, attrs)
    if not result.ranked:
        return None
    M = result.M
    top = result.best
    default, default_us = result.default, result.default_latency_us
    default_trial = next((r for r in result.ranked if r.config == default), None)

    performance = attrs.get("is_performance", True)
    if top is None:
        title = f"# M = {M}: no result: {result.gave_up}"
    elif not performance:  # a ratio of interpreter times is no speedup: do not headline it as one
        title = f"# M = {M}: best {top.latency_us:.2f} µs (CPU interpreter time, not a performance number)"
    elif default_us:
        title = f"# M = {M}: {default_us / top.latency_us:.2f}× faster than SGLang's default"
    else:
        title = f"# M = {M}: best {top.latency_us:.2f} µs"
    lines = [title, ""]
    if not performance:
        lines += ["> **Timings from Triton's CPU interpreter on a scaled-down shape: not performance numbers.**", ""]
    elif str(attrs.get("measurement", "")).startswith("replay of "):
        lines += [f"> **Replayed search**: latencies looked up in a table recorded on {attrs.get('device_name')}.",
                  ""]
    if top is not None:
        summary = f"Best config **{top.latency_us:.2f} µs** (trial {top.trial_number})"
        if default_us:
            summary += f"; SGLang's default config **{default_us:.2f} µs**"
        lines += [summary + ".", ""]

    columns = " | latency (µs) | speedup |" if performance else " | interpreter time (µs) | ratio |"
    header = "| | " + " | ".join(PARAM_NAMES) + columns
    lines += [header, "|---|" + "--:|" * (len(PARAM_NAMES) + 2)]
    for i, r in enumerate(result.ranked[:TOP_CONFIGS]):
        label = f"**best** (trial {r.trial_number})" if i == 0 and top is not None else f"#{i + 1} (trial {r.trial_number})"
        lines.append(_row(label, r.config, r.latency_us, default_us))
    if default is not None:
        where = f"trial {default_trial.trial_number}" if default_trial is not None else "timed apart"
        lines.append(_row(f"SGLang default ({where})", default, default_us, default_us))
    engine = result.engine_pair
    if engine is not None and not engine[0].up == engine[0].down == top.config:
        pair, pair_us = engine
        lines.append(_row("SGLang pair: up", pair.up, pair_us, default_us))
        lines.append(_row("SGLang pair: down (`_down.json`)", pair.down, pair_us, default_us))
    for config, verdict in result.rejected.items():
        lines.append(f"\nRejected by the correctness guard: {config} ({verdict}).")

    if top is not None:
        entry = json.dumps({str(M): top.config.to_dict()})[1:-1]
        lines += ["", "Entry of the SGLang / vLLM config file:", "", "```json", entry, "```"]
    lines += ["", "## Shape", ""]
    if attrs.get("E") is not None:
        keys = ("model", "E", "N", "K", "topk", "dtype", "block_shape", "swiglu_limit")
        lines += ["| " + " | ".join(keys) + " | M |", "|" + "---|" * (len(keys) + 1),
                  "| " + " | ".join(str(attrs.get(k)) for k in keys) + f" | {M} |", ""]
    lines.append(f"Device **{attrs.get('device_name')}**, Triton {attrs.get('triton_version')}, "
                 f"torch {attrs.get('torch_version')}. Measurement: {attrs.get('measurement')}.")

    failed = [t for t in trials if t.state == TrialState.FAIL and not is_interrupted(t)]
    complete = [t for t in trials if t.state == TrialState.COMPLETE and config_of(t) is not None]
    lines += ["", f"{len(complete)} configs measured, {len(failed)} failed to compile or run."]
    if failed:
        reasons = Counter((error_of(t) or "failed").split(":")[0] for t in failed)
        lines[-1] += " Failures: " + ", ".join(f"{r} ({n})" for r, n in reasons.most_common()) + "."
    gbps = next((t.user_attrs.get("gbps") for t in complete if top is not None and t.number == top.trial_number), None)
    if gbps is not None and not math.isnan(float(gbps)):
        lines += ["", f"The best config moves {float(gbps):.0f} GB/s (fewest bytes a call must move / latency)."]
    return "\n".join(lines)


def _save_note(study: optuna.Study, text: str) -> None:
    """Save the note as optuna_dashboard.save_note does, without needing optuna-dashboard installed."""
    try:
        from optuna_dashboard import save_note
    except ImportError:
        storage, study_id = study._storage, study._study_id
        chunks = [text[i:i + NOTE_CHUNK] for i in range(0, len(text), NOTE_CHUNK)]
        old = storage.get_study_system_attrs(study_id)
        storage.set_study_system_attr(study_id, NOTE_VER_KEY, int(old.get(NOTE_VER_KEY, 0)) + 1)
        for i, chunk in enumerate(chunks):
            storage.set_study_system_attr(study_id, f"{NOTE_STR_PREFIX}{i}", chunk)
        for i in range(len(chunks), sum(k.startswith(NOTE_STR_PREFIX) for k in old)):
            storage.set_study_system_attr(study_id, f"{NOTE_STR_PREFIX}{i}", "")
        return
    save_note(study, text)


def has_note(study: optuna.Study) -> bool:
    """Whether optuna-dashboard will show a note for this study.

    Example:
        >>> has_note(optuna.create_study())
        False
    """
    return NOTE_VER_KEY in study._storage.get_study_system_attrs(study._study_id)


def refresh_study_note(study: optuna.Study) -> None:
    """Write the study's note for optuna-dashboard and name its objective ``latency_us``.

    Example:
        >>> import moe_opt
        >>> r = moe_opt.tune(replay="moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv", n_trials=8,
        ...                  storage="sqlite:///demo.db", output_dir=None, progress=False)  # doctest: +SKIP
        >>> study = optuna.load_study(study_name=r.study_names[16], storage="sqlite:///demo.db")  # doctest: +SKIP
        >>> refresh_study_note(study); has_note(study)  # doctest: +SKIP
        True
    """
    if study.metric_names is None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRIC_NAME])
    text = study_note(study)
    if text is not None:
        _save_note(study, text)

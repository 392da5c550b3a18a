"""The Markdown note of a study in optuna-dashboard: best config, its latency, SGLang's default and the speedup.

Written or refreshed when a batch size finishes its trials and at the end of a tune.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from .space import PARAM_NAMES, Config


def study_note(study: optuna.Study) -> str | None:
    """The note's Markdown text, or None while the study has no completed trial."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    attrs = study.user_attrs
    top = min(complete, key=lambda t: t.value)
    best = Config(*(int(top.params[p]) for p in PARAM_NAMES))
    default = attrs.get("default_config")
    default_us = attrs.get("default_latency_us")
    if default is not None:
        for t in complete:
            if all(int(t.params.get(k, -1)) == v for k, v in default.items()):
                default_us = t.value
    lines = [f"# Batch size M = {attrs.get('M')}", ""]
    if attrs.get("model"):
        lines.append(f"Model **{attrs['model']}**, E={attrs.get('E')}, N={attrs.get('N')}, K={attrs.get('K')}, "
                     f"topk={attrs.get('topk')}, {attrs.get('dtype')}, block_shape={attrs.get('block_shape')}, "
                     f"swiglu_limit={attrs.get('swiglu_limit')}")
    lines.append(f"Device {attrs.get('device_name')}, Triton {attrs.get('triton_version')}, "
                 f"torch {attrs.get('torch_version')}; {attrs.get('measurement')}")
    if not attrs.get("is_performance", True):
        lines.append("")
        lines.append("**Timings from Triton's CPU interpreter: not performance numbers.**")
    lines += ["", "| | config | latency (us) |", "| --- | --- | --- |",
              f"| best (trial {top.number}) | `{best.to_dict()}` | {top.value:.2f} |"]
    if default is not None:
        lines.append(f"| SGLang default | `{default}` | "
                     f"{'%.2f' % default_us if default_us is not None else 'not measured'} |")
    if default_us:
        lines += ["", f"Speedup over SGLang's default: **{default_us / top.value:.3f}x**"]
    failed = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
    lines += ["", f"{len(complete)} configs measured, {failed} failed to compile or run."]
    return "\n".join(lines)


def refresh_study_note(study: optuna.Study) -> None:
    """Write the study's note for optuna-dashboard (no-op if optuna-dashboard is not installed)."""
    text = study_note(study)
    if text is None:
        return
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return
    save_note(study, text)

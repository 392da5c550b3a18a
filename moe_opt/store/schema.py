"""The trial schema: how a Config travels in an Optuna trial, and what a trial's state and ``error`` mean.

Every reader and writer of trials goes through these functions, so a trial is parsed one way everywhere.
"""

from __future__ import annotations

from typing import Any

from ..space import PARAM_NAMES, TMA_NAME, Config

# A trial's user attribute "error" holds why a config failed; these prefixes mean it failed to compile (or was
# screened out before compiling), which does not depend on the batch size.
COMPILE_FAILURES = ("OutOfResources", "CompilationError", "Rejected", "CompileTimeAssertionFailure")
# The "error" of a trial that was asked but never measured (Ctrl-C, a killed worker, a duplicate that another
# worker took first): not counted against the budget, and its config is retried.
INTERRUPTED = "Interrupted"


def config_of(trial: Any) -> Config | None:
    """The Config a trial ran (its params, or the fixed params of an enqueued trial not yet asked), or None.

    Example:
        >>> import optuna
        >>> study = optuna.create_study()
        >>> study.enqueue_trial(trial_params(Config(64, 128, 128, 32, 4, 3)))
        >>> str(config_of(study.get_trials()[0]))
        'M64 N128 K128 G32 w4 s3'
    """
    params = trial.params or trial.system_attrs.get("fixed_params") or {}
    try:
        values = {p: int(params[p]) for p in PARAM_NAMES}
        if TMA_NAME in params:  # a study whose space offers USE_TMA; absent in every other (false)
            values[TMA_NAME] = params[TMA_NAME]
        return Config.from_dict(values)
    except (KeyError, TypeError, ValueError):
        return None


def trial_params(config: Config) -> dict[str, int | bool]:
    """The params of a trial that runs ``config`` (for ``study.enqueue_trial``): the six and USE_TMA, false
    included, so an enqueued trial of a space offering TMA fixes it too (a space without it never suggests it)."""
    return config.params()


def error_of(trial: Any) -> str:
    """Why a failed trial failed ("" when it did not)."""
    return str(trial.user_attrs.get("error", ""))


def is_interrupted(trial: Any) -> bool:
    """Failed before it was measured (Ctrl-C, a killed worker, a duplicate): not counted, retried."""
    from optuna.trial import TrialState

    return trial.state == TrialState.FAIL and error_of(trial).startswith(INTERRUPTED)


def is_compile_failure(error: str | None) -> bool:
    return bool(error) and error.startswith(COMPILE_FAILURES)


def is_counted(trial: Any) -> bool:
    """Measured, or failed for a reason of its own; not interrupted before measuring. A COMPLETE trial always
    counts, even if a reaper wrote an "Interrupted" error on it just before its owner told the result."""
    from optuna.trial import TrialState

    return trial.state == TrialState.COMPLETE or (trial.state == TrialState.FAIL and not is_interrupted(trial))


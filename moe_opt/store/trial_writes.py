"""A trial's two writes, each one transaction: created RUNNING with its params and worker stamp, and finished with
its user attributes, state and value.

Through Optuna's API on an RDB storage (SQLite, PostgreSQL, MySQL) they cost ~11 ms, and ~2 ms plus ~1.2 ms per
user attribute, on SQLite (benchmarks/trial_writes.py, 2 CPU cores): the ORM queries the trial again for every
param and attribute, and once per param looks up the study's previous distribution of that name. Here the same
rows go into Optuna's own tables with a few plain statements of SQLAlchemy Core (~1.2 ms and ~1 ms), encoded by
Optuna's own functions and table definitions, so a trial reads back through Optuna's API
(``load_study(...).get_trials()``, the dashboard) exactly as one that Optuna wrote.

This is done only for a storage whose schema is the one checked here: an ``RDBStorage`` (or Optuna's
``_CachedStorage`` around one) at alembic revision ``v3.2.0.a``, the tables of Optuna 4.x and 5.0
(optuna/storages/_rdb/models.py). Any other storage (a journal file, in memory, another schema) goes through
Optuna's API as before. To Optuna's ``_CachedStorage`` a trial written here is one written by another process,
which it is built to see: each ``get_trials`` re-reads the trials it holds unfinished and every trial with a
newer id than its last finished one.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import weakref
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

# Alembic revisions whose tables were checked against the statements below (Optuna 4.x and 5.0's head).
KNOWN_REVISIONS = frozenset({"v3.2.0.a"})

_writers: weakref.WeakKeyDictionary[Any, _Writer | None] = weakref.WeakKeyDictionary()


def create_running_trial(study: optuna.Study, params: dict[str, Any], distributions: dict[str, BaseDistribution],
                         system_attrs: dict[str, Any]) -> tuple[int, int]:
    """Create a RUNNING trial of ``params`` (external values, one distribution each) with ``system_attrs``, in one
    transaction (through Optuna's template ``create_new_trial`` where the storage is not one checked here); its
    number is assigned as Optuna does. Returns (trial id, trial number).

    Example:
        >>> from optuna.distributions import CategoricalDistribution
        >>> study = optuna.create_study(storage="sqlite:///:memory:")
        >>> create_running_trial(study, {"num_warps": 4}, {"num_warps": CategoricalDistribution([4, 8])},
        ...                      {"moe_opt:worker": {"pid": 1}})
        (1, 0)
        >>> study.get_trials()[0].params, study.get_trials()[0].state.name
        ({'num_warps': 4}, 'RUNNING')
    """
    writer = _writer(study._storage)
    if writer is not None:
        return writer.create(study._study_id, params, distributions, system_attrs)
    template = FrozenTrial(number=-1, state=TrialState.RUNNING, value=None,
                           datetime_start=datetime.datetime.now(), datetime_complete=None,
                           params=dict(params), distributions=dict(distributions), user_attrs={},
                           system_attrs=dict(system_attrs), intermediate_values={}, trial_id=-1)
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    return trial_id, study._storage.get_trial(trial_id).number


def finish_trial(study: optuna.Study, trial_id: int, state: TrialState, value: float | None,
                 user_attrs: dict[str, Any]) -> bool:
    """Set a RUNNING trial's ``user_attrs`` (replacing those of the same key), its finished ``state`` and its value
    (None for none), in one transaction. False when the trial is no longer RUNNING (another process failed it
    meanwhile): then nothing was written (through Optuna's API, on the other storages: the attributes set before
    it was found failed stay, as they did before this module).

    Example:
        >>> study = optuna.create_study(storage="sqlite:///:memory:")
        >>> trial = study.ask()
        >>> finish_trial(study, trial._trial_id, TrialState.COMPLETE, 12.5, {"up_us": 8.0})
        True
        >>> study.best_trial.value, study.best_trial.user_attrs
        (12.5, {'up_us': 8.0})
        >>> finish_trial(study, trial._trial_id, TrialState.FAIL, None, {})
        False
    """
    assert state.is_finished(), state
    writer = _writer(study._storage)
    if writer is not None:
        return writer.finish(trial_id, state, value, user_attrs)
    storage = study._storage
    try:
        for key, attr in user_attrs.items():
            storage.set_trial_user_attr(trial_id, key, attr)
        return storage.set_trial_state_values(trial_id, state, None if value is None else [value])
    except UpdateFinishedTrialError:
        return False


def _writer(storage: Any) -> _Writer | None:
    """The writer of an RDB storage whose schema is known, made once per storage object; None for the others."""
    from optuna.storages import RDBStorage
    from sqlalchemy.exc import SQLAlchemyError

    backend = getattr(storage, "_backend", storage)  # Optuna wraps an RDBStorage in a _CachedStorage
    if not isinstance(backend, RDBStorage):
        return None
    try:
        return _writers[backend]
    except KeyError:
        pass
    try:
        writer = _Writer(backend) if backend.get_current_version() in KNOWN_REVISIONS else None
    except (SQLAlchemyError, AssertionError):  # no alembic revision (Optuna asserts one): Optuna's API decides
        writer = None
    _writers[backend] = writer
    return writer


class _Writer:
    """SQLAlchemy Core statements on Optuna's tables (the installed Optuna's own Table objects) of one RDBStorage."""

    def __init__(self, rdb: Any):
        from optuna.storages._rdb import models

        self.engine = rdb.engine
        self.models = models
        self.studies = models.StudyModel.__table__
        self.trials = models.TrialModel.__table__
        self.params = models.TrialParamModel.__table__
        self.system_attrs = models.TrialSystemAttributeModel.__table__
        self.user_attrs = models.TrialUserAttributeModel.__table__
        self.values = models.TrialValueModel.__table__
        # The study's distribution of each param name found compatible with one of this process's: Optuna checks
        # each new param against the first of its name in the study, which does not change once it exists.
        self._checked: dict[tuple[int, str], str] = {}

    def now(self) -> datetime.datetime:
        """The stored form of the current time, as the installed Optuna stores it (Optuna 5.0: naive UTC; 4.x:
        naive local time): through its TrialModel's own conversion."""
        row = self.models.TrialModel(datetime_start=datetime.datetime.now())
        column = self.models.TrialModel.__mapper__.get_property_by_column(self.trials.c.datetime_start)
        return getattr(row, column.key)

    def create(self, study_id: int, params: dict[str, Any], distributions: dict[str, BaseDistribution],
               system_attrs: dict[str, Any]) -> tuple[int, int]:
        from optuna.distributions import distribution_to_json
        from sqlalchemy import func, select

        trials = self.trials
        dists = {name: distribution_to_json(distributions[name]) for name in params}
        with _storage_errors(), self.engine.begin() as conn:
            # Optuna's own lock against two creators numbering a trial alike (SQLite: its write lock, taken by the
            # INSERT, before the count reads).
            found = conn.execute(select(self.studies.c.study_id).where(self.studies.c.study_id == study_id)
                                 .with_for_update()).first()
            if found is None:
                raise KeyError(f"no study with study_id {study_id}")
            trial_id = conn.execute(trials.insert().values(
                number=None, study_id=study_id, state=TrialState.RUNNING, datetime_start=self.now(),
                datetime_complete=None)).inserted_primary_key[0]
            self._check_distributions(conn, study_id, distributions, dists)  # after the INSERT, as Optuna does
            number = conn.execute(select(func.count(trials.c.trial_id))
                                  .where(trials.c.study_id == study_id, trials.c.trial_id < trial_id)).scalar_one()
            conn.execute(trials.update().where(trials.c.trial_id == trial_id).values(number=number))
            if params:  # in the template's order: Optuna lists a trial's params by param_id
                conn.execute(self.params.insert(), [
                    {"trial_id": trial_id, "param_name": name,
                     "param_value": distributions[name].to_internal_repr(value), "distribution_json": dists[name]}
                    for name, value in params.items()])
            if system_attrs:
                conn.execute(self.system_attrs.insert(), [
                    {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
                    for key, value in system_attrs.items()])
        return trial_id, number

    def _check_distributions(self, conn: Any, study_id: int, distributions: dict[str, BaseDistribution],
                             dists: dict[str, str]) -> None:
        """Optuna's check of each param against the study's first distribution of that name (ValueError when they
        differ in kind or, for a categorical, in choices); a query only until each name was checked once."""
        from optuna.distributions import check_distribution_compatibility, json_to_distribution
        from sqlalchemy import func, select

        unchecked = [name for name, js in dists.items() if self._checked.get((study_id, name)) != js]
        if not unchecked:
            return
        params, trials = self.params, self.trials
        first = (select(func.min(params.c.param_id)).join(trials, trials.c.trial_id == params.c.trial_id)
                 .where(trials.c.study_id == study_id, params.c.param_name.in_(unchecked))
                 .group_by(params.c.param_name))
        rows = conn.execute(select(params.c.param_name, params.c.distribution_json)
                            .where(params.c.param_id.in_(first.scalar_subquery()))).all()
        for name, js in rows:
            check_distribution_compatibility(json_to_distribution(js), distributions[name])
        for name in unchecked:
            self._checked[(study_id, name)] = dists[name]

    def finish(self, trial_id: int, state: TrialState, value: float | None, user_attrs: dict[str, Any]) -> bool:
        trials = self.trials
        with _storage_errors(), self.engine.begin() as conn:
            # The conditional UPDATE is the check and the row lock at once (SQLite: the write lock): nobody can fail
            # the trial between our check and our writes.
            updated = conn.execute(trials.update()
                                   .where(trials.c.trial_id == trial_id, trials.c.state == TrialState.RUNNING)
                                   .values(state=state, datetime_complete=self.now())).rowcount
            if updated != 1:
                return False  # nothing was written
            if user_attrs:  # replaced, as Optuna's upsert does (a reaper may have written "error" just before)
                attrs = self.user_attrs
                conn.execute(attrs.delete().where(attrs.c.trial_id == trial_id, attrs.c.key.in_(list(user_attrs))))
                conn.execute(attrs.insert(), [{"trial_id": trial_id, "key": key, "value_json": json.dumps(attr)}
                                              for key, attr in user_attrs.items()])
            if value is not None:
                values = self.values
                stored, value_type = self.models.TrialValueModel.value_to_stored_repr(value)
                conn.execute(values.delete().where(values.c.trial_id == trial_id))
                conn.execute(values.insert().values(trial_id=trial_id, objective=0, value=stored,
                                                    value_type=value_type))
        return True


@contextlib.contextmanager
def _storage_errors() -> Iterator[None]:
    """A database error as Optuna's RDBStorage raises it (StorageInternalError), after its transaction rolled back."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except SQLAlchemyError as exc:
        raise optuna.exceptions.StorageInternalError(f"a trial write failed: {exc}") from exc

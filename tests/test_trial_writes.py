"""A trial written in one transaction (store/trial_writes.py) is, to every reader of Optuna's API, a trial written by
Optuna: same fields on a fresh storage object and in a fresh process, samplers and best_trial work on a study of
both kinds, the same Study object sees it at once, and a trial another process failed stays failed. Storages
whose schema is not the checked one go through Optuna's API with the same result.

Real SQLite files, journal files and (where MOE_OPT_TEST_POSTGRES_URL is set, as in CI) PostgreSQL; no mocks.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from moe_opt.store import trial_writes
from moe_opt.store.storage import open_storage
from moe_opt.store.trial_writes import create_running_trial, finish_trial

POSTGRES_URL = os.environ.get("MOE_OPT_TEST_POSTGRES_URL")

DISTRIBUTIONS = {"BLOCK_SIZE_M": CategoricalDistribution([16, 32, 64]), "num_warps": CategoricalDistribution([4, 8]),
                 "USE_TMA": CategoricalDistribution([False, True]), "ratio": FloatDistribution(0.0, 1.0),
                 "depth": IntDistribution(1, 9, log=True)}
PARAMS = {"BLOCK_SIZE_M": 32, "num_warps": 8, "USE_TMA": True, "ratio": 0.25, "depth": 3}
SYSTEM_ATTRS = {"moe_opt:worker": {"host": "h", "pid": 7, "time": 1.5}}


def written_by_optuna(study, state, value, user_attrs) -> int:
    """What the coordinator and the scheduler did before: a template trial, then one write per attribute and the
    state."""
    template = optuna.trial.FrozenTrial(
        number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(), datetime_complete=None,
        params=PARAMS, distributions=DISTRIBUTIONS, user_attrs={}, system_attrs=SYSTEM_ATTRS,
        intermediate_values={}, trial_id=-1)
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    for key, attr in user_attrs.items():
        study._storage.set_trial_user_attr(trial_id, key, attr)
    assert study._storage.set_trial_state_values(trial_id, state, None if value is None else [value])
    return trial_id


def written_here(study, state, value, user_attrs) -> int:
    trial_id, number = create_running_trial(study, PARAMS, DISTRIBUTIONS, SYSTEM_ATTRS)
    assert study._storage.get_trial(trial_id).number == number  # numbered as Optuna numbers its own
    assert finish_trial(study, trial_id, state, value, user_attrs)
    return trial_id


OUTCOMES = [(TrialState.COMPLETE, 12.5, {"up_us": 8.0, "down_us": 4.5, "note": [1, "a", None]}),
            (TrialState.COMPLETE, math.inf, {}),
            (TrialState.FAIL, None, {"error": "OutOfResources: shared memory"})]


def fields(trial) -> dict:
    """Everything Optuna exposes of a trial except its ids and the values of its datetimes."""
    return {"state": trial.state, "value": trial.value, "values": trial.values, "params": trial.params,
            "param_types": {k: type(v) for k, v in trial.params.items()}, "distributions": trial.distributions,
            "params_order": list(trial.params), "user_attrs": trial.user_attrs, "system_attrs": trial.system_attrs,
            "intermediate_values": trial.intermediate_values,
            "datetimes_set": (trial.datetime_start is not None, trial.datetime_complete is not None)}


@pytest.fixture
def far_timezone():
    """A local time far from UTC: Optuna 5.0 stores naive UTC, and a write in local time would show 5.5 h off."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Kolkata"
    time.tzset()
    yield
    if old is None:
        os.environ.pop("TZ")
    else:
        os.environ["TZ"] = old
    time.tzset()


def unknown_revision(path):
    """A SQLite storage whose alembic revision is not one trial_writes checked (opened without Optuna's check)."""
    optuna.storages.RDBStorage(f"sqlite:///{path}")
    with sqlite3.connect(path) as con:
        con.execute("UPDATE alembic_version SET version_num = 'v9.9.9.z'")
    return optuna.storages.RDBStorage(f"sqlite:///{path}", skip_compatibility_check=True)


@pytest.fixture(params=["sqlite", "unknown-revision", "journal", "memory", "postgresql"])
def storage(request, tmp_path):
    """(storage, fast): a storage of each kind, and whether trial_writes writes it itself."""
    kind = request.param
    if kind == "sqlite":
        yield open_storage(f"sqlite:///{tmp_path}/s.db"), True
    elif kind == "unknown-revision":
        yield unknown_revision(tmp_path / "s.db"), False
    elif kind == "journal":
        yield open_storage(f"journal:{tmp_path}/s.journal"), False
    elif kind == "memory":
        yield open_storage("sqlite:///:memory:"), False
    else:
        if not POSTGRES_URL:
            pytest.skip("MOE_OPT_TEST_POSTGRES_URL is not set (CI sets it and starts PostgreSQL)")
        store = open_storage(POSTGRES_URL)
        names = []
        request.node.study_names = names
        yield store, True
        for name in names:
            optuna.delete_study(study_name=name, storage=store)


def new_study(storage, request):
    name = f"trial-writes-{uuid.uuid4().hex[:8]}"
    getattr(request.node, "study_names", []).append(name)
    return optuna.create_study(study_name=name, storage=storage)


def reopened(storage, tmp_path):
    """A new storage object on the same data (the in-memory storage has only itself)."""
    if isinstance(storage, optuna.storages.InMemoryStorage):
        return storage
    if isinstance(storage, optuna.storages.JournalStorage):
        return open_storage(f"journal:{tmp_path}/s.journal")
    return optuna.storages.RDBStorage(storage.url, skip_compatibility_check=True)


@pytest.mark.parametrize("outcome", OUTCOMES, ids=["complete", "inf", "fail"])
def test_a_trial_written_in_one_transaction_reads_back_as_one_written_through_optunas_api(storage, outcome, tmp_path,
                                                                                         request, far_timezone):
    store, fast = storage
    assert (trial_writes._writer(store) is not None) == fast
    study = new_study(store, request)
    before = datetime.now() - timedelta(seconds=1)
    ours = written_here(study, *outcome)
    theirs = written_by_optuna(study, *outcome)
    after = datetime.now() + timedelta(seconds=1)
    for reader in (study, optuna.load_study(study_name=study.study_name, storage=reopened(store, tmp_path))):
        trials = {t._trial_id: t for t in reader.get_trials()}
        assert fields(trials[ours]) == fields(trials[theirs])
        assert [trials[ours].number, trials[theirs].number] == [0, 1]
        for t in (trials[ours], trials[theirs]):
            assert before <= t.datetime_start <= t.datetime_complete <= after  # local time, as Optuna shows it
        assert reader._storage.get_trial(ours).params == PARAMS


READER = """
import json, sys, optuna
study = optuna.load_study(study_name="s", storage=sys.argv[1])
print(json.dumps([dict(id=t._trial_id, number=t.number, state=t.state.name, values=t.values, params=t.params,
                       distributions={k: optuna.distributions.distribution_to_json(d) for k, d in t.distributions.items()},
                       user_attrs=t.user_attrs, system_attrs=t.system_attrs, start=t.datetime_start.isoformat(),
                       complete=t.datetime_complete.isoformat()) for t in study.get_trials()]))
"""


def test_a_fresh_process_reads_the_same_trial_from_sqlite(tmp_path, far_timezone):
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    ours, theirs = written_here(study, *OUTCOMES[0]), written_by_optuna(study, *OUTCOMES[0])
    out = subprocess.run([sys.executable, "-c", READER, url], capture_output=True, text=True, check=True,
                         env={**os.environ, "TZ": "UTC"}).stdout
    read = {t.pop("id"): t for t in json.loads(out)}
    for t in read.values():
        t.pop("number")
        assert abs(datetime.fromisoformat(t.pop("start")) - datetime.now(timezone.utc).replace(tzinfo=None)) < timedelta(minutes=1)
        assert abs(datetime.fromisoformat(t.pop("complete")) - datetime.now(timezone.utc).replace(tzinfo=None)) < timedelta(minutes=1)
    assert read[ours] == read[theirs]


def test_the_dashboard_shows_both_kinds_alike(tmp_path):
    from optuna_dashboard._serializer import serialize_frozen_trial

    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/s.db"))
    ours, theirs = written_here(study, *OUTCOMES[0]), written_by_optuna(study, *OUTCOMES[0])
    shown = {t._trial_id: serialize_frozen_trial(study._study_id, t, {}) for t in study.get_trials()}
    for row in shown.values():
        for key in ("trial_id", "number", "datetime_start", "datetime_complete"):
            assert row.pop(key) is not None
    assert shown[ours] == shown[theirs] and shown[ours]["params"]


def test_optunas_samplers_best_trial_and_dataframe_work_on_a_study_of_both_kinds(tmp_path):
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/s.db"),
                                sampler=optuna.samplers.TPESampler(seed=1, n_startup_trials=2))
    written_here(study, TrialState.COMPLETE, 30.0, {})
    written_by_optuna(study, TrialState.COMPLETE, 20.0, {})
    written_here(study, TrialState.COMPLETE, 10.0, {"up_us": 1.0})

    def objective(trial):
        return sum(float(trial.suggest_categorical(k, d.choices)) for k, d in DISTRIBUTIONS.items()
                   if isinstance(d, CategoricalDistribution)) + trial.suggest_float("ratio", 0, 1) + 100

    study.optimize(objective, n_trials=4)
    assert study.best_trial.value == 10.0 and study.best_trial.number == 2
    frame = study.trials_dataframe()
    assert list(frame["value"][:3]) == [30.0, 20.0, 10.0] and len(frame) == 7
    assert list(frame["params_num_warps"][:3]) == [8, 8, 8] and frame["user_attrs_up_us"][2] == 1.0


def test_the_same_study_object_sees_a_trial_created_and_finished_behind_its_cache(tmp_path):
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/s.db"))
    assert isinstance(study._storage, optuna.storages._CachedStorage)
    written_by_optuna(study, TrialState.COMPLETE, 5.0, {})
    assert len(study.get_trials()) == 1  # the cache now holds trial 0 as finished
    ours, _ = create_running_trial(study, PARAMS, DISTRIBUTIONS, SYSTEM_ATTRS)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.RUNNING]
    later = written_by_optuna(study, TrialState.COMPLETE, 4.0, {})  # a newer finished trial than ours
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.RUNNING, TrialState.COMPLETE]
    assert finish_trial(study, ours, TrialState.COMPLETE, 3.0, {"up_us": 2.0})
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 and trials[1].value == 3.0
    assert trials[1].user_attrs == {"up_us": 2.0} and trials[2]._trial_id == later
    assert study.best_trial._trial_id == ours


def test_finishing_a_trial_another_process_failed_returns_false_and_keeps_the_failure(storage, request):
    store, _ = storage
    study = new_study(store, request)
    trial_id, _ = create_running_trial(study, PARAMS, DISTRIBUTIONS, SYSTEM_ATTRS)
    study.get_trials()  # cached while RUNNING
    study._storage.set_trial_user_attr(trial_id, "error", "Interrupted: worker h:7 is gone")
    study._storage.set_trial_state_values(trial_id, TrialState.FAIL)
    assert not finish_trial(study, trial_id, TrialState.COMPLETE, 9.0, {"up_us": 1.0, "error": None})
    (trial,) = study.get_trials()
    assert trial.state == TrialState.FAIL and trial.value is None
    assert trial.user_attrs == {"error": "Interrupted: worker h:7 is gone"}


def test_a_param_whose_distribution_differs_from_the_studys_is_refused_as_optuna_refuses_it(tmp_path):
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/s.db"))
    written_by_optuna(study, TrialState.COMPLETE, 5.0, {})
    changed = {**DISTRIBUTIONS, "num_warps": CategoricalDistribution([4, 8, 16])}
    with pytest.raises(ValueError):
        create_running_trial(study, PARAMS, changed, SYSTEM_ATTRS)
    assert len(study.get_trials()) == 1  # nothing was written
    create_running_trial(study, PARAMS, DISTRIBUTIONS, SYSTEM_ATTRS)
    assert len(study.get_trials()) == 2


WRITER = """
import sys, optuna
from optuna.trial import TrialState
from moe_opt.store.storage import open_storage
from moe_opt.store.trial_writes import create_running_trial, finish_trial
from optuna.distributions import CategoricalDistribution
study = optuna.load_study(study_name="s", storage=open_storage(sys.argv[1]))
dists = {"x": CategoricalDistribution([0, 1])}
for i in range(int(sys.argv[2])):
    if i % 3:
        trial_id, _ = create_running_trial(study, {"x": i % 2}, dists, {"writer": sys.argv[3]})
        assert finish_trial(study, trial_id, TrialState.COMPLETE, float(i), {})
    else:  # Optuna's own writes, interleaved
        trial = study.ask({"x": dists["x"]})
        study.tell(trial, float(i))
"""


def test_processes_writing_one_sqlite_study_at_once_number_its_trials_without_gaps_or_repeats(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(study_name="s", storage=open_storage(url))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, url, "15", str(i)], env=env) for i in range(4)]
    assert [w.wait(timeout=120) for w in writers] == [0] * 4
    trials = optuna.load_study(study_name="s", storage=open_storage(url)).get_trials()
    assert sorted(t.number for t in trials) == list(range(60))
    assert all(t.state == TrialState.COMPLETE for t in trials)

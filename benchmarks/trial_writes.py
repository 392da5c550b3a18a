"""Per-trial storage cost on one SQLite file: creating a RUNNING trial of seven params with its worker stamp, and
finishing it with N user attributes, through Optuna's API (what moe_opt did before) and store/trial_writes.py.

    python benchmarks/trial_writes.py --trials 200 --user-attrs 3
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from moe_opt.store.storage import open_storage
from moe_opt.store.trial_writes import create_running_trial, finish_trial

DISTRIBUTIONS = {name: CategoricalDistribution(values) for name, values in {
    "BLOCK_SIZE_M": [16, 32, 64, 128], "BLOCK_SIZE_N": [32, 64, 128, 256], "BLOCK_SIZE_K": [64, 128, 256],
    "GROUP_SIZE_M": [1, 16, 32, 64], "num_warps": [4, 8], "num_stages": [2, 3, 4, 5], "USE_TMA": [False, True]}.items()}
PARAMS = {name: d.choices[0] for name, d in DISTRIBUTIONS.items()}
STAMP = {"moe_opt:worker": {"host": "h", "boot": "b", "pidns": "p", "pid": 1, "start": "1", "time": 0.0}}


def optuna_api(study, user_attrs):
    template = FrozenTrial(number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.datetime.now(),
                           datetime_complete=None, params=PARAMS, distributions=DISTRIBUTIONS, user_attrs={},
                           system_attrs=STAMP, intermediate_values={}, trial_id=-1)
    t0 = time.perf_counter()
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    t1 = time.perf_counter()
    for key, value in user_attrs.items():
        study._storage.set_trial_user_attr(trial_id, key, value)
    study._storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [1.0])
    return t1 - t0, time.perf_counter() - t1


def one_transaction(study, user_attrs):
    t0 = time.perf_counter()
    trial_id, _ = create_running_trial(study, PARAMS, DISTRIBUTIONS, STAMP)
    t1 = time.perf_counter()
    finish_trial(study, trial_id, TrialState.COMPLETE, 1.0, user_attrs)
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--user-attrs", type=int, default=3)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    user_attrs = {f"attr{i}": float(i) for i in range(args.user_attrs)}
    with tempfile.TemporaryDirectory() as folder:
        for name, write in (("optuna api", optuna_api), ("trial_writes", one_transaction)):
            study = optuna.create_study(study_name=name, storage=open_storage(f"sqlite:///{folder}/{name[0]}.db"))
            times = [write(study, user_attrs) for _ in range(args.trials)]
            create_ms = 1000 * sum(t[0] for t in times) / len(times)
            finish_ms = 1000 * sum(t[1] for t in times) / len(times)
            print(f"{name:13s} create {create_ms:5.1f} ms  finish ({args.user_attrs} user attrs) {finish_ms:5.1f} ms")


if __name__ == "__main__":
    main()

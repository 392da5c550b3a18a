"""Crash safety: a tune killed mid-trial loses nothing and retries the interrupted config; a config that crashes or
hangs the measuring process fails alone; a config that computes the wrong thing is not exported.

Measurements come from the recorded DeepSeek-V4-Flash table (replay mode), so kills and crashes are real
(SIGKILL of a subprocess, SIGSEGV of the measuring process) while the tests stay fast and deterministic.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import moe_opt
from moe_opt import Config, space
from moe_opt.measure.base import Measurement
from moe_opt.measure.isolated import IsolatedMeasurer
from moe_opt.measure.replay import ReplayTable
from moe_opt.run.coordinator import HEARTBEAT_KEY, WORKER_KEY, Coordinator, WorkerId
from moe_opt.run.guard import TOLERANCE, Guard
from moe_opt.store.schema import config_of, is_counted
from moe_opt.store.storage import open_storage

REPO = Path(__file__).resolve().parents[1]
TABLE = str(REPO / "moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv")
SPEC = moe_opt.ModelSpec.from_dict(ReplayTable(TABLE).metadata()["spec"])


def default(M: int) -> Config:
    return space.default_config(M, SPEC.E, SPEC.dtype, SPEC.block_shape)


def trials(storage: str, result) -> dict[int, list]:
    store = open_storage(storage)
    return {M: optuna.load_study(study_name=name, storage=store).get_trials()
            for M, name in result.study_names.items()}


def exported(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): p.read_text() for p in sorted(out.rglob("*")) if p.is_file()}


# --- kill -9 in the middle of a trial ---------------------------------------------------------------------

STALLING_RUN = """
import sys, time
sys.path.insert(0, {repo!r})
import moe_opt
from moe_opt.measure.replay import ReplayTable

class StallingReplay(ReplayTable):
    calls = 0

    def measure(self, config, M):
        StallingReplay.calls += 1
        if StallingReplay.calls == {stall_at}:  # mid-trial: the test kills this process here
            with open("stalled", "w") as f:
                f.write(f"{{M}} {{config.BLOCK_SIZE_M}} {{config.BLOCK_SIZE_N}} {{config.BLOCK_SIZE_K}} "
                        f"{{config.GROUP_SIZE_M}} {{config.num_warps}} {{config.num_stages}}")
            time.sleep(600)
        return super().measure(config, M)

moe_opt.tune(replay={table!r}, measurer=StallingReplay({table!r}), n_trials=5, storage="sqlite:///s.db",
             output_dir="out", progress=False)
"""


def test_kill_9_mid_trial_keeps_every_trial_retries_the_interrupted_config_and_exports_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kwargs = dict(replay=TABLE, storage="sqlite:///s.db", output_dir="out", progress=False)
    first = moe_opt.tune(n_trials=2, **kwargs)
    files_before = exported(tmp_path / "out")
    assert len(files_before) == 2

    # A second run with a bigger budget, killed with SIGKILL while its 7th measurement runs.
    script = STALLING_RUN.format(repo=str(REPO), table=TABLE, stall_at=7)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (tmp_path / "stalled").exists():
        assert proc.poll() is None, "the tune ended before it stalled"
        assert time.monotonic() < deadline, "the tune never reached its 7th measurement"
        time.sleep(0.1)
    time.sleep(0.5)  # well inside the stalled measurement
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL

    M_killed, *values = (int(v) for v in (tmp_path / "stalled").read_text().split())
    config_killed = Config(*values)
    after_kill = trials("sqlite:///s.db", first)
    running = [t for t in after_kill[M_killed] if t.state == TrialState.RUNNING]
    assert [config_of(t) for t in running] == [config_killed]
    finished = {(M, t.number): (t.state, t.params, t.value)
                for M, ts in after_kill.items() for t in ts if t.state.is_finished()}
    assert len(finished) == 6 * 2 + 6  # the first run's 12 and the 6 measured before the kill
    assert exported(tmp_path / "out") == files_before  # untouched, whole, no temp files beside them

    # The same command again: continues from where it was.
    again = moe_opt.tune(n_trials=5, **kwargs)
    assert again.trials_used == {M: 5 for M in first.study_names}
    final = trials("sqlite:///s.db", again)
    for (M, number), (state, params, value) in finished.items():
        t = final[M][number]
        assert (t.state, t.params, t.value) == (state, params, value)  # every completed trial still there
    killed = final[M_killed][running[0].number]
    assert killed.state == TrialState.FAIL and not is_counted(killed)
    assert killed.user_attrs["error"].startswith("Interrupted: worker ") and "is gone" in killed.user_attrs["error"]
    retried = [t for t in final[M_killed] if t.user_attrs.get("retry_of") == killed.number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE and config_of(retried[0]) == config_killed
    # Retried first: the earliest trial the second run measured at that batch size.
    assert retried[0].number == min(t.number for t in final[M_killed] if t.number > killed.number)

    files_after = exported(tmp_path / "out")
    assert files_after.keys() == files_before.keys()
    sglang = next(v for k, v in files_after.items() if k.startswith("configs/"))
    assert {int(M): Config.from_dict(c) for M, c in json.loads(sglang).items()} == {
        M: Config.from_dict(c) for M, c in again.best.items()}


def test_stale_trials_are_failed_by_pid_on_this_machine_and_by_heartbeat_from_others(tmp_path):
    storage = f"sqlite:///{tmp_path}/c.db"
    store = open_storage(storage)
    study = optuna.create_study(study_name="s", storage=store)
    me = WorkerId.current()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    who = {
        "dead here": dict(vars(me), pid=dead_pid, start="1"),
        "alive here": dict(vars(me), pid=os.getppid(), start=""),
        "silent elsewhere": dict(vars(me), host="gpu-node-7", pid=4242),
        "beating elsewhere": dict(vars(me), host="gpu-node-8", pid=4242),
    }
    ids = {}
    distributions = {p: optuna.distributions.CategoricalDistribution([16, 32, 64]) for p in space.PARAM_NAMES}
    for name, worker in who.items():
        trial = study.ask(distributions)
        store.set_trial_system_attr(trial._trial_id, WORKER_KEY, worker)
        beat = time.time() - (1000 if name == "silent elsewhere" else 0)
        store.set_trial_system_attr(trial._trial_id, HEARTBEAT_KEY, beat)
        ids[name] = trial.number

    Coordinator(store, storage, "s", stale_after_s=60).reap(study)
    by_number = {t.number: t for t in study.get_trials()}
    for name in ("dead here", "silent elsewhere"):
        t = by_number[ids[name]]
        assert t.state == TrialState.FAIL and t.user_attrs["error"].startswith("Interrupted:")
    assert "is gone" in by_number[ids["dead here"]].user_attrs["error"]
    assert "no heartbeat from worker gpu-node-7:4242" in by_number[ids["silent elsewhere"]].user_attrs["error"]
    for name in ("alive here", "beating elsewhere"):
        assert by_number[ids[name]].state == TrialState.RUNNING
    queued = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs["retry_of"] for t in queued) == sorted([ids["dead here"], ids["silent elsewhere"]])


# --- a config that crashes or hangs the measuring process ----------------------------------------------------

ILLEGAL_ACCESS = "RuntimeError: CUDA error: an illegal memory access was encountered"


class FaultyReplay(ReplayTable):
    """The recorded table, except that one config at one batch size kills the process, never returns, or breaks
    the process for good as an illegal memory access breaks a CUDA context (every later call fails too)."""

    def __init__(self, path, M, config, how):
        super().__init__(path)
        self.bad = (M, config)
        self.how = how
        self.broken = False

    def measure(self, config, M):
        if (M, config) == self.bad:
            if self.how == "segfault":
                os.kill(os.getpid(), signal.SIGSEGV)
            if self.how == "hang":
                time.sleep(600)
            self.broken = True
        if self.broken:
            return Measurement(None, ILLEGAL_ACCESS)
        return super().measure(config, M)

    def healthy(self) -> bool:  # CudaGraphTimer.healthy() runs a tiny CUDA op to find out
        return not self.broken


@pytest.mark.parametrize("how,reason,crashes", [("segfault", "WorkerCrashed: exit code -11", 1),
                                                ("hang", "Timeout: no result after 3 s", 1),
                                                ("sticky error", ILLEGAL_ACCESS, 0)])
def test_a_config_that_kills_the_measuring_process_fails_alone(tmp_path, how, reason, crashes):
    bad = default(16)  # warm start measures it first at M=16
    with IsolatedMeasurer(partial(FaultyReplay, TABLE, 16, bad, how), timeout_s=3) as measurer:
        result = moe_opt.tune(replay=TABLE, measurer=measurer, n_trials=3, storage=f"sqlite:///{tmp_path}/i.db",
                              output_dir=None, progress=False)
        assert measurer.crashes == crashes  # only the bad config; the default is not re-timed outside the budget
    assert result.trials_used == {1: 3, 16: 3, 64: 3, 256: 3, 1024: 3, 4096: 3}
    at_16 = sorted(trials(f"sqlite:///{tmp_path}/i.db", result)[16], key=lambda t: t.number)
    assert config_of(at_16[0]) == bad
    assert at_16[0].state == TrialState.FAIL and at_16[0].user_attrs["error"] == reason
    assert all(t.state == TrialState.COMPLETE for t in at_16[1:]) and len(at_16) == 3  # the study went on
    assert 16 in result.best and Config.from_dict(result.best[16]) != bad


class TellingReplay(ReplayTable):
    """A table in the measuring process that declares stops_early, takes ``stop_above_us`` by name only, and
    writes down what each measurement was told."""

    def __init__(self, path: str, log: str):
        super().__init__(path)
        self.info = dataclasses.replace(self.info, stops_early=True)
        self.log = log

    def measure(self, config: Config, M: int, *, stop_above_us: float | None = None) -> Measurement:
        with open(self.log, "a") as f:
            f.write(f"{M} {stop_above_us}\n")
        return super().measure(config, M)


def test_the_isolated_process_passes_the_stop_margin_on_to_a_measurer_that_stops_early(tmp_path):
    log = tmp_path / "told.txt"
    with IsolatedMeasurer(partial(TellingReplay, TABLE, str(log)), timeout_s=30) as measurer:
        result = moe_opt.tune(replay=TABLE, measurer=measurer, batch_sizes=[16], n_trials=4,
                              storage=f"sqlite:///{tmp_path}/s.db", output_dir=None, progress=False)
    assert measurer.info.stops_early and result.trials_used == {16: 4}
    told = [line.split()[1] for line in log.read_text().splitlines()]
    assert told[0] == "None" and all(stop != "None" for stop in told[1:4])  # the trials after the first


class SlowReplay(ReplayTable):
    """A table that takes a second to build, then says so in a file; a tenth of a second per measurement; and a
    process that takes a minute to exit once told to stop."""

    def __init__(self, path: str, ready_file: str):
        time.sleep(1.0)
        super().__init__(path)
        Path(ready_file).write_text("ready")
        from multiprocessing import util

        util.Finalize(self, time.sleep, args=(60,), exitpriority=0)  # run as the child leaves

    def measure(self, config: Config, M: int) -> Measurement:
        time.sleep(0.1)
        return super().measure(config, M)


def test_the_isolated_process_says_when_it_was_ready_and_how_long_it_worked_and_its_exit_is_not_waited_for(tmp_path):
    ready_file = tmp_path / "ready"
    measurer = IsolatedMeasurer(partial(SlowReplay, TABLE, str(ready_file)), timeout_s=30)
    spawned = time.perf_counter()
    measurer.start()
    while not ready_file.exists():
        time.sleep(0.05)
    time.sleep(1.0)
    asked = time.perf_counter()
    results = [measurer.measure(default(M), M) for M in (1, 16, 64)]
    assert all(m.ok for m in results)
    # When the child was ready by its own clock, not when this process first asked: a second before.
    assert spawned + 1.0 < measurer.ready_at < asked - 0.5
    assert 0.3 <= measurer.busy_s < time.perf_counter() - asked
    child = measurer._proc
    measurer.close()  # told to stop; its minute-long exit goes on without this process waiting for it
    try:
        assert child.is_alive() and measurer._proc is None
    finally:
        child.kill()
        child.join(10)


class PrefetchingFaultyReplay(FaultyReplay):
    """FaultyReplay whose measurer prepares the next measurement during the running one, as the CUDA-graph timer
    captures the next graph (MeasurerInfo.prefetches): preparing the bad config breaks the process as running it
    does (its eager call runs on the device), so the running measurement fails too, or never returns."""

    def __init__(self, path, M, config, how, log):
        super().__init__(path, M, config, how)
        self.info = dataclasses.replace(self.info, prefetches=True)
        self.prefetched = False
        self.log = log

    def measure(self, config, M, upcoming=None):
        self.prefetched = False
        time.sleep(0.05)  # the device's first replays, meanwhile the tuning process sends the next measurement
        nxt = upcoming() if upcoming is not None and not self.broken else None
        with open(self.log, "a") as f:
            f.write(f"{M} {config} next {nxt}\n")
        if nxt is not None and (nxt[1], nxt[0]) == self.bad:
            self.prefetched = True
            if self.how == "hang":
                time.sleep(600)
            self.broken = True
        return super().measure(config, M)


@pytest.mark.parametrize("how,reason", [("sticky error", ILLEGAL_ACCESS), ("hang", "Timeout: no result after 3 s")])
def test_a_config_that_breaks_the_process_while_it_is_prepared_fails_alone(tmp_path, how, reason):
    """The measurement running while the bad config was prepared is measured again alone in a fresh process,
    and counts as measured; the bad config fails with its own reason."""
    bad = default(16)
    log = tmp_path / "asked.txt"
    storage = f"sqlite:///{tmp_path}/p.db"
    with IsolatedMeasurer(partial(PrefetchingFaultyReplay, TABLE, 16, bad, how, str(log)), timeout_s=3) as measurer:
        result = moe_opt.tune(replay=TABLE, measurer=measurer, n_trials=3, storage=storage, output_dir=None,
                              progress=False)
    asked = log.read_text().splitlines()
    assert any(f"next ({bad!r}, 16)" in line for line in asked)  # the bad one was prepared during another
    assert sum("next (" in line for line in asked) >= 6  # the child told its measurer what came next
    assert result.trials_used == {1: 3, 16: 3, 64: 3, 256: 3, 1024: 3, 4096: 3}
    by_m = trials(storage, result)
    failed = [(M, t) for M, ts in by_m.items() for t in ts if t.state != TrialState.COMPLETE]
    assert [(M, config_of(t), t.user_attrs["error"]) for M, t in failed] == [(16, bad, reason)]


# --- the correctness guard ---------------------------------------------------------------------------------

def test_a_config_that_fails_the_guard_is_not_exported_the_next_best_is(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/g.db"
    kwargs = dict(replay=TABLE, n_trials=6, storage=storage, progress=False)
    fastest = moe_opt.tune(output_dir=None, guard=False, **kwargs)
    wrong = Config.from_dict(fastest.best[64])

    def guard(config: Config) -> float:  # stands in for a config the kernel computes wrongly with
        return 0.31 if config == wrong else 0.002

    result = moe_opt.tune(output_dir=tmp_path / "out", guard=guard, **dict(kwargs, progress=True))
    complete = sorted((t for t in trials(storage, result)[64] if t.state == TrialState.COMPLETE),
                      key=lambda t: t.value)
    assert config_of(complete[0]) == wrong
    assert Config.from_dict(result.best[64]) == config_of(complete[1]) != wrong  # the next-best that passes
    assert result.latency_us[64] == complete[1].value
    assert result.guard[64] == "passed: error 0.002 <= 0.06"
    study = optuna.load_study(study_name=result.study_names[64], storage=storage)
    assert study.user_attrs["guard"][str(complete[0].number)] == "failed: error 0.31 > 0.06"
    assert study.user_attrs["guard"][str(complete[1].number)] == "passed: error 0.002 <= 0.06"
    out = capsys.readouterr().out
    assert f"correctness guard, M=64: excluded trial {complete[0].number} {wrong}: failed: error 0.31 > 0.06" in out
    sglang = json.loads(result.files["sglang"].read_text())
    assert Config.from_dict(sglang["64"]) == config_of(complete[1])
    for M in (1, 16, 256, 1024, 4096):  # the others pass and keep their fastest config
        assert result.best[M] == fastest.best[M] or Config.from_dict(fastest.best[M]) == wrong


def test_replay_mode_says_the_guard_is_skipped(tmp_path, capsys):
    result = moe_opt.tune(replay=TABLE, n_trials=2, storage=f"sqlite:///{tmp_path}/r.db", output_dir=None)
    assert set(result.guard.values()) == {"skipped: replay mode, no kernel to check"}
    assert "correctness guard skipped: replay mode, no kernel to check" in capsys.readouterr().out


def test_the_guard_dequantizes_its_reference_experts_once_and_the_reference_is_unchanged(device):
    """The guard checks many configs against the same experts; their float64 weights are dequantized once per
    inputs, and the reference computed from them equals the one that dequantizes the weights itself."""
    import torch

    from moe_opt.kernel.backend import get_backend
    from moe_opt.kernel.reference import fused_moe_reference
    from moe_opt.model.spec import ModelSpec
    from moe_opt.run import guard as guard_module

    spec = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=256, intermediate_size=256, dtype="fp8_w8a8",
                                block_shape=[128, 128])
    backend = get_backend("builtin")
    inputs = backend.make_inputs(spec, device, routing_sets=1)
    first = guard_module.kernel_error(backend, inputs, Config(16, 64, 128, 1, 4, 2), seed=1)
    experts, W1, W2 = guard_module._REFERENCE_EXPERTS[inputs]
    second = guard_module.kernel_error(backend, inputs, Config(32, 64, 128, 1, 4, 2), seed=2)
    assert guard_module._REFERENCE_EXPERTS[inputs][1] is W1  # not dequantized again
    assert experts == [0, 1, 7] and 0 < first < 0.02 and 0 < second < 0.02  # the low experts and the last
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 256, generator=gen).to(torch.bfloat16)
    ids = torch.tensor([[7, 0], [7, 1], [0, 1], [7, -1], [1, 0]], dtype=torch.int32)
    weights = torch.rand(5, 2, generator=gen).softmax(-1)
    index = torch.tensor(experts, device=device)
    per_expert = {k: v.index_select(0, index) for k, v in inputs.kwargs.items() if k in ("w1_scale", "w2_scale")}
    rest = {k: v for k, v in inputs.kwargs.items() if k not in per_expert}
    local = torch.tensor([[experts.index(int(e)) if e >= 0 else -1 for e in row] for row in ids], dtype=torch.int32)
    itself = fused_moe_reference(x, inputs.w1.index_select(0, index), inputs.w2.index_select(0, index), weights,
                                 local, **per_expert, **rest)
    given = fused_moe_reference(x, inputs.w1, inputs.w2, weights, local, dequantized=(W1, W2), **rest)
    assert torch.equal(itself, given)


def test_guard_runs_the_kernel_against_the_reference_with_the_kernel_tests_bounds(device):
    from test_kernel import TOLERANCE as KERNEL_TEST_TOLERANCE
    from test_kernel_quant import FAMILY_TOLERANCE

    from moe_opt.measure.cuda_graph import CudaGraphTimer
    from moe_opt.measure.interpreter import InterpreterTimer, interpreter_spec

    # The kernel tests' bounds: test_kernel.py's per path, test_kernel_quant.py's for the per-channel fp8 and the
    # int8 w8a8 paths (weight-only formats keep their activation dtype's bound).
    assert TOLERANCE == {**KERNEL_TEST_TOLERANCE, "fp8_channel": FAMILY_TOLERANCE["fp8"],
                         "int8": FAMILY_TOLERANCE["int8"]}
    spec = interpreter_spec(SPEC)  # fp8 block [128, 128], swiglu_limit 10, scaled down for the interpreter
    # The kernel where it runs: the interpreter here and in CI, the CUDA-graph timer's inputs on a GPU.
    guard = Guard(spec, InterpreterTimer(spec) if device == "cpu" else CudaGraphTimer(spec, device))
    outcome = guard.check(Config(32, 128, 128, 32, 4, 3))
    assert outcome.startswith("passed: error ") and outcome.endswith(" <= 0.06")
    assert float(outcome.split()[2]) < 0.02

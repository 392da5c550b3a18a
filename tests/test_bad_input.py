"""Bad input that used to crash a tune, or to end it with exit 0 and nothing said: replay tables with latencies
that are not latencies or with duplicated rows, a measurer that returns such latencies, a replay table written
into a folder or a read-only place, arguments of the wrong type or range, a tune with nothing to export, and an
explicit small shape on the CPU interpreter (tuned as given, not silently scaled).

Everything is real: CSV tables written here and the bundled H200 table, SQLite studies, the tune itself; the
measurers that misbehave are what a user could pass as ``tune(measurer=...)``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from pathlib import Path

import optuna
import pytest

import moe_opt
from moe_opt import Config, ModelSpec, TuneError, space
from moe_opt.cli import main
from moe_opt.measure.base import Measurement
from moe_opt.measure.interpreter import interpreter_spec
from moe_opt.measure.replay import ReplayTable, record_table, write_table
from moe_opt.search.surrogate import SearchState

REPO = Path(__file__).resolve().parents[1]
TABLE = str(REPO / "moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv")
SPEC = ModelSpec.from_dict(ReplayTable(TABLE).metadata()["spec"])


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def small_table(path: Path, batch_sizes=(1, 16)) -> list[dict]:
    """Rows of a small table: 40 configs (SGLang's bf16 default among them) at each batch size."""
    configs = space.grid(64)[:40]
    return [{"M": M, **c.to_dict(), "us": f"{10 + i + M / 100:.3f}"} for M in batch_sizes
            for i, c in enumerate(configs)]


def nothing_written(root: Path) -> None:
    left = [p for p in root.rglob("*") if p.is_file() and p.suffix != ".csv"]
    assert not left, left


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


# --- Replay tables: what a row's us may be, each (M, config) once --------------------------------------------

@pytest.mark.parametrize("us", ["-1", "0", "inf", "-inf", "1e999", "fast"])
def test_a_table_row_whose_us_is_not_a_latency_is_refused_naming_the_file_and_line(tmp_path, us):
    rows = small_table(tmp_path)
    rows[2]["us"] = us  # the file's line 4: the header is line 1
    write_csv(tmp_path / "t.csv", rows)
    with pytest.raises(TuneError) as info:
        moe_opt.tune(replay="t.csv", n_trials=4, storage="sqlite:///s.db", output_dir="out", progress=False)
    text = one_line(info)
    assert text.startswith("replay table t.csv, line 4: us ")
    assert "us a finite latency in microseconds > 0 (empty or NaN: the config failed)" in text
    nothing_written(tmp_path)  # no study database, no config file


def test_a_table_that_gives_one_config_twice_is_refused_naming_both_lines(tmp_path):
    rows = small_table(tmp_path)
    rows.append(dict(rows[5], us="0.5"))  # the same (M, config) again, faster: it used to win silently
    write_csv(tmp_path / "t.csv", rows)
    with pytest.raises(TuneError) as info:
        ReplayTable(tmp_path / "t.csv")
    assert one_line(info) == (f"replay table {tmp_path / 't.csv'}, line {len(rows) + 1}: M=1 "
                              f"{Config.from_dict(rows[5])} again (first on line 7); each (M, config) once")


def test_a_batch_size_where_every_config_failed_is_an_error_not_a_silent_exit(tmp_path):
    rows = small_table(tmp_path)
    for row in rows:
        if row["M"] == 16:
            row["us"] = "nan"
    write_csv(tmp_path / "t.csv", rows)
    with pytest.raises(TuneError) as info:
        moe_opt.tune(replay="t.csv", n_trials=4, storage="sqlite:///s.db", output_dir="out", progress=False)
    assert one_line(info) == ("replay table t.csv: every config at batch size 16 failed (us empty or NaN), nothing "
                              "to tune there; give batch_sizes without it, or a table with latencies > 0 at it")
    result = moe_opt.tune(replay="t.csv", batch_sizes=[1], n_trials=4, storage="sqlite:///s.db", output_dir=None,
                          progress=False)
    assert list(result.best) == [1]  # the batch size that has latencies is tuned


# --- A user's measurer that returns a latency that is not one -----------------------------------------------

class Miscounting(ReplayTable):
    """The bundled table, except that SGLang's default config (measured first, by the warm start) comes back
    with ``bad`` as its latency at every batch size."""

    def __init__(self, path: str, bad: float):
        super().__init__(path)
        self.bad = bad

    def measure(self, config: Config, M: int) -> Measurement:
        m = super().measure(config, M)
        return Measurement(self.bad, None, m.attrs) if config == SPEC_DEFAULT else m


SPEC_DEFAULT = space.default_config(1, SPEC.E, SPEC.dtype, SPEC.block_shape)  # the same at every M (block fp8)


@pytest.mark.parametrize("bad", [-1.0, 0.0, math.inf, math.nan])
def test_a_measurer_latency_that_is_not_one_fails_its_trial_with_the_reason(tmp_path, bad):
    storage = "sqlite:///s.db"
    kwargs = dict(replay=TABLE, measurer=Miscounting(TABLE, bad), batch_sizes=[1, 16], n_trials=6, storage=storage,
                  output_dir="out", progress=True)
    result = moe_opt.tune(**kwargs)
    for M, name in result.study_names.items():
        trials = optuna.load_study(study_name=name, storage=storage).get_trials()
        assert len(trials) == 6 and all(t.state != optuna.trial.TrialState.RUNNING for t in trials)
        failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
        assert [Config.from_dict(t.params) for t in failed] == [SPEC_DEFAULT]
        assert failed[0].user_attrs["error"] == (f"InvalidLatency: the measurer returned latency_us={bad!r}; a "
                                                 "latency is a finite number of microseconds > 0")
        assert Config.from_dict(result.best[M]) != SPEC_DEFAULT and result.latency_us[M] > 0
    exported = json.loads(result.files["sglang"].read_text())
    assert {Config.from_dict(c) for c in exported.values()}.isdisjoint({SPEC_DEFAULT})
    again = moe_opt.tune(**{**kwargs, "n_trials": 8})  # resumes the same studies without crashing
    assert again.trials_used == {1: 8, 16: 8}


def test_a_measurer_that_returns_no_measurement_is_a_one_line_error(tmp_path):
    class Floats(ReplayTable):
        def measure(self, config, M):
            return 12.5

    with pytest.raises(TuneError) as info:
        moe_opt.tune(replay=TABLE, measurer=Floats(TABLE), batch_sizes=[1], n_trials=2, storage="sqlite:///s.db",
                     output_dir="out", progress=False)
    assert one_line(info) == ("measurer Floats returned float '12.5', not a Measurement; measure(config, M) must "
                              "return moe_opt.measure.base.Measurement")
    assert not Path("out").exists()


@pytest.mark.parametrize("bad", [-1.0, 0.0, math.inf, math.nan])
def test_the_search_takes_a_stored_latency_that_is_not_one_as_a_failure(bad):
    """A study written before such values were refused holds them; resuming it must not crash the model."""
    state = SearchState(space.candidates(SPEC.dtype, SPEC.block_shape, space.HOPPER_SHARED_MEMORY_BYTES))
    good, wrong = state.candidates[:3], state.candidates[3]
    for i, c in enumerate(good):
        state.record(16, c, 20.0 + i)
    state.record(16, wrong, bad)
    state.record(1, wrong, bad)
    assert wrong in state.failed_at[16] and wrong in state.failed_at[1]
    assert set(state.measured[16]) == set(good) and 1 not in state.measured
    rng = random.Random(0)
    assert state.propose(16, rng) not in [*good, wrong]
    assert state.propose(1, rng) != wrong
    assert isinstance(state.propose(64, rng), Config) and len(state.lookahead(64, 3)) == 3


# --- Writing a replay table ----------------------------------------------------------------------------------

def read_only_directory(tmp_path: Path) -> Path:
    """A folder nobody can create files in; root ignores permission bits, but not sysfs."""
    if os.geteuid() == 0:
        return Path("/sys")
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o555)
    return d


def test_a_replay_table_written_to_a_folder_or_a_read_only_place_is_a_one_line_error(tmp_path, capsys):
    rows = small_table(tmp_path)
    with pytest.raises(TuneError) as info:
        write_table(rows, tmp_path)
    assert one_line(info) == (f"cannot write replay table {tmp_path}: it is a folder; give a file name such as "
                              f"{tmp_path / 'table.csv'}")
    read_only = read_only_directory(tmp_path)
    for target in (read_only / "t.csv", read_only / "new" / "deeper" / "t.csv"):
        with pytest.raises(TuneError) as info:
            write_table(rows, target)
        assert one_line(info).startswith(f"cannot write replay table {target}: ")
        assert one_line(info).endswith("; choose a writable file location")
    assert not (read_only / "new").exists() and not list(read_only.glob(".t.csv.*"))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing half-written

    made = write_table(rows, tmp_path / "a" / "b" / "t.csv")  # folders that do not exist yet are made
    assert len(ReplayTable(made).entries[1]) == 40

    moe_opt.tune(replay=TABLE, batch_sizes=[1], n_trials=2, storage="sqlite:///s.db", output_dir=None,
                 progress=False)
    capsys.readouterr()
    for target in (str(tmp_path), str(read_only / "t.csv")):
        assert main(["record", "sqlite:///s.db", "-o", target]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert err.startswith("moe-opt record: error: cannot write replay table ") and "\n" not in err, err
        assert "Traceback" not in captured.out + captured.err
    assert record_table("sqlite:///s.db", "ok.csv").exists()


# --- tune()'s arguments --------------------------------------------------------------------------------------

REPLAY = dict(replay=TABLE, batch_sizes=[1], n_trials=2, storage="sqlite:///s.db", output_dir="out", progress=False)
# (tune() keyword argument and value, the start of the error's text)
BAD_ARGUMENTS = [
    ({"timeout_s": -1}, "timeout_s must be a finite number of seconds > 0 or None, got -1"),
    ({"timeout_s": 0}, "timeout_s must be a finite number of seconds > 0 or None, got 0"),
    ({"timeout_s": math.nan}, "timeout_s must be a finite number of seconds > 0 or None, got nan"),
    ({"timeout_s": "60"}, "timeout_s must be a finite number of seconds > 0 or None, got '60'"),
    ({"measure_timeout_s": math.inf}, "measure_timeout_s must be a finite number of seconds > 0, got inf"),
    ({"compile_workers": -3}, "compile_workers must be an integer >= 1, got -3"),
    ({"compile_workers": 2.5}, "compile_workers must be an integer >= 1, got 2.5"),
    ({"n_trials": "4"}, "n_trials must be an integer >= 1, got '4'"),
    ({"tp_size": 0}, "tp_size must be an integer >= 1, got 0"),
    ({"seed": "x"}, "seed must be an integer from 0 to 4256656, or None, got 'x'"),
    ({"seed": -1}, "seed must be an integer from 0 to 4256656, or None, got -1"),
    ({"seed": 2**40}, "seed must be an integer from 0 to 4256656, or None, got 1099511627776"),
    ({"seed": True}, "seed must be an integer from 0 to 4256656, or None, got True"),
    ({"dtype": "fp7"}, "unknown dtype 'fp7'; accepted: fp8_w8a8, bf16/bfloat16, fp16/float16"),
    ({"swiglu_limit": -1.0}, "swiglu_limit must be a finite number > 0 or None, got -1.0"),
    ({"tuned_config_dirs": "moe_configs"}, "tuned_config_dirs must be a list of folders, e.g. ['moe_configs'], got "
                                           "'moe_configs'"),
    ({"tuned_config_dirs": Path("moe_configs")}, "tuned_config_dirs must be a list of folders"),
    ({"kernel": "triton"}, "unknown kernel 'triton'; accepted: builtin or a KernelBackend"),
    ({"kernel": 3}, "unknown kernel 3; accepted: builtin or a KernelBackend"),
    ({"storage": 3}, "storage must be a storage URL such as sqlite:///studies/model.db, a path or an Optuna storage, "
                     "got int 3"),
    ({"sampler": "annealing"}, "unknown sampler 'annealing'; accepted: moe, tpe, random, gp, grid or an optuna sampler"),
    ({"batch_sizes": 16}, "batch_sizes must be a list of positive integers such as [1, 16, 64], got 16"),
    ({"batch_sizes": "1,16"}, "batch_sizes must be a list of positive integers such as [1, 16, 64], got '1,16'"),
    ({"warm_start": "no"}, "warm_start must be True or False, got 'no'"),
    ({"guard": "yes"}, "guard must be True, False or a function config -> relative error, got 'yes'"),
    ({"output_dir": 3}, "output_dir must be a path or a string, or None, got int 3"),
    ({"measurer": "table.csv"}, "measurer str has no measure(config, M) method"),
    ({"warm_start_configs": [{"BLOCK_SIZE_M": 16}]}, "warm_start_configs must be a mapping {batch size: [configs]}, "
                                                     "got list"),
    ({"warm_start_configs": {0: []}}, "warm_start_configs: batch size 0 is not an integer >= 1"),
    ({"warm_start_configs": {16: [{"BLOCK_SIZE_M": 16}]}}, "warm_start_configs[16]: config {'BLOCK_SIZE_M': 16} lacks "
                                                          "BLOCK_SIZE_N"),
]


@pytest.mark.parametrize("argument,message", BAD_ARGUMENTS, ids=[str(a) for a, _ in BAD_ARGUMENTS])
def test_a_bad_argument_is_a_one_line_error_before_anything_is_written(tmp_path, argument, message):
    with pytest.raises(TuneError) as info:
        moe_opt.tune(**{**REPLAY, **argument})
    assert one_line(info).startswith(message), str(info.value)
    nothing_written(tmp_path)


def test_a_path_is_a_storage_too(tmp_path):
    result = moe_opt.tune(**{**REPLAY, "storage": tmp_path / "p.db", "output_dir": None})
    assert (tmp_path / "p.db").is_file() and result.trials_used == {1: 2}


# --- A tune with nothing to export says so -------------------------------------------------------------------

class OutOfResources(ReplayTable):
    """Every config fails, as on a device too small for any of them (at batch size ``at``, or everywhere)."""

    def __init__(self, path: str, at: int | None = None):
        super().__init__(path)
        self.at = at

    def measure(self, config: Config, M: int) -> Measurement:
        if self.at is None or M == self.at:
            return Measurement(None, "OutOfResources: out of resource: shared memory, Required: 262144")
        return super().measure(config, M)


def test_a_tune_where_every_config_fails_says_there_is_nothing_to_export(tmp_path, capsys):
    result = moe_opt.tune(**{**REPLAY, "measurer": OutOfResources(TABLE), "batch_sizes": [1, 16], "n_trials": 3,
                             "progress": True})
    assert result.best == {} and result.files == {} and not Path("out").exists()
    note = ("nothing to export: no result at any batch size: every config tried failed (6 trials; most often "
            "OutOfResources: out of resource: shared memory, Required: 262144)")
    assert note in result.notes
    assert note in capsys.readouterr().out  # the summary prints it

    result = moe_opt.tune(**{**REPLAY, "measurer": OutOfResources(TABLE, at=16), "batch_sizes": [1, 16],
                             "n_trials": 3, "storage": "sqlite:///partial.db"})
    assert list(result.best) == [1]
    assert ("M=16: no result, nothing exported for it: every config tried failed (3 trials; most often "
            "OutOfResources: out of resource: shared memory, Required: 262144)") in result.notes
    assert set(json.loads(result.files["sglang"].read_text())) == {"1"}


def test_a_timeout_that_passes_before_any_measurement_says_there_is_nothing_to_export(tmp_path):
    result = moe_opt.tune(**{**REPLAY, "timeout_s": 1e-9})
    assert result.best == {} and not Path("out").exists()
    assert ("nothing to export: no result at any batch size: timeout_s=1e-09 passed before any config was measured"
            in result.notes)


# --- The CPU interpreter: an explicit shape small enough is tuned as given ----------------------------------

def test_a_small_explicit_shape_is_tuned_and_exported_as_given_on_the_interpreter(tmp_path, capsys):
    spec = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=64, intermediate_size=32)
    result = moe_opt.tune(spec=spec, batch_sizes=[1], n_trials=1, storage="sqlite:///s.db", output_dir="out")
    assert not result.is_performance and result.spec == spec and list(result.best) == [1]
    assert result.files["sglang"].name == "E=8,N=32,device_name=cpu-interpreter.json"
    assert "running Triton's CPU interpreter on the shape as given (" in capsys.readouterr().out


def test_only_shapes_too_large_for_the_interpreter_are_scaled_keeping_the_dimensions_already_small():
    small = {"num_experts": 8, "topk": 2, "hidden_size": 64, "intermediate_size": 32}
    for fields in (small, {**small, "num_experts": 64}, {**small, "hidden_size": 512}, {**small, "topk": 8}):
        spec = ModelSpec.from_shape(**fields)
        assert interpreter_spec(spec) == spec  # E*N*K and topk*N*K within the bounds' products
    wide = interpreter_spec(ModelSpec.from_shape(**{**small, "num_experts": 256}))
    assert (wide.E, wide.topk, wide.N, wide.K) == (8, 2, 32, 64)  # only E was too large
    deepseek = interpreter_spec(SPEC)
    assert (deepseek.E, deepseek.topk, deepseek.N, deepseek.K, deepseek.block_shape) == (8, 2, 128, 256, (128, 128))
    assert deepseek.swiglu_limit == SPEC.swiglu_limit and deepseek.dtype == SPEC.dtype
    big_blocks = interpreter_spec(ModelSpec.from_shape(num_experts=16, topk=4, hidden_size=1024,
                                                       intermediate_size=1024, dtype="fp8_w8a8",
                                                       block_shape=[256, 256]))
    assert (big_blocks.N, big_blocks.K) == (256, 256)  # the smallest multiple of the blocks, not 128


def test_a_batch_size_too_large_for_the_interpreter_is_refused_and_the_scaled_dimensions_are_named(capsys):
    with pytest.raises(TuneError) as info:  # the measurer is made (the scaled-down print), nothing is measured
        moe_opt.tune(model="deepseek-ai/DeepSeek-V4-Flash", tp_size=8, batch_sizes=[1, 8192], storage="sqlite:///s.db",
                     output_dir="out")
    assert one_line(info).startswith("batch size 8192 is too large for Triton's CPU interpreter (at most 4096 there")
    out = capsys.readouterr().out
    assert "running Triton's CPU interpreter on a scaled-down shape (E 256->8, topk 6->2, N 256->128, K 4096->256;" \
        in out


def test_a_study_holding_a_latency_that_is_not_one_records_it_as_a_failure_and_tiny_latencies_whole(tmp_path):
    """Studies written before such values were refused: moe-opt record writes a table the loader takes."""
    result = moe_opt.tune(replay=TABLE, batch_sizes=[1], n_trials=2, seed=0, storage="sqlite:///s.db",
                          output_dir=None, progress=False)
    study = optuna.load_study(study_name=result.study_names[1], storage="sqlite:///s.db")
    distributions = study.trials[0].distributions
    for config, value in ((Config(16, 32, 64, 1, 4, 2), -1.0), (Config(16, 32, 64, 1, 4, 3), 0.0002)):
        study.add_trial(optuna.trial.create_trial(params=config.to_dict(), distributions=distributions, value=value))
    table = ReplayTable(record_table("sqlite:///s.db", "t.csv"))
    assert table.configs(1)[Config(16, 32, 64, 1, 4, 2)] is None
    assert table.entries[1][Config(16, 32, 64, 1, 4, 2)][1] == "InvalidLatency: the study holds -1.0, not a latency"
    assert table.configs(1)[Config(16, 32, 64, 1, 4, 3)] == pytest.approx(0.0002)


def test_the_gp_sampler_without_scipy_is_a_one_line_error_before_anything_is_written(tmp_path):
    import importlib.util

    if importlib.util.find_spec("scipy") is not None:  # where scipy is installed, gp tunes
        assert moe_opt.tune(**{**REPLAY, "sampler": "gp", "n_trials": 12}).best
        return
    with pytest.raises(TuneError) as info:
        moe_opt.tune(**{**REPLAY, "sampler": "gp"})
    assert one_line(info).startswith("sampler='gp' (Optuna's GPSampler) needs scipy, which is not installed")
    nothing_written(tmp_path)

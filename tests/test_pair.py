"""A config per GEMM (SGLang's up file and its ``_down`` file): tuned together, sharing BLOCK_SIZE_M, exported as
SGLang reads them. The tunes run through Triton's CPU interpreter, with its stage timings; the ranking and the
export are checked on studies built from real trials."""

from __future__ import annotations

import json

import optuna
import pytest

import moe_opt
from moe_opt import Config, space
from moe_opt.errors import TuneError
from moe_opt.export.engines import export_paths, load_tuned_configs, write_engine_files
from moe_opt.space import ConfigPair
from moe_opt.store.results import CONFIRMED_PAIR_ATTR, GUARD_ATTR, pair_guard_key, result_of

SPEC = moe_opt.ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=256, intermediate_size=128)
FP8 = moe_opt.ModelSpec.from_shape(num_experts=256, topk=8, hidden_size=7168, intermediate_size=2048,
                                   dtype="fp8_w8a8", block_shape=[128, 128], tp_size=8)


def test_an_interpreter_tune_writes_the_down_file_beside_the_up_file_sharing_block_size_m(tmp_path):
    out = tmp_path / "configs"
    r = moe_opt.tune(spec=SPEC, batch_sizes=[1, 8], n_trials=6, storage=f"sqlite:///{tmp_path}/p.db",
                     output_dir=out, progress=False)
    assert r.study_names[8].endswith("|pair|M=8")
    paths = export_paths(r.spec, out, device_name="cpu-interpreter", down=True,
                         triton_version=r.files["sglang"].parent.name[len("triton_"):].replace("_", "."))
    assert r.files["sglang_down"] == paths["sglang_down"] and paths["sglang_down"].is_file()
    assert paths["sglang_down"].name == paths["sglang"].name[:-len(".json")] + "_down.json"
    up, down = load_tuned_configs(paths["sglang"]), load_tuned_configs(paths["sglang_down"])
    assert sorted(up) == sorted(down) == [1, 8]
    assert all(up[M].BLOCK_SIZE_M == down[M].BLOCK_SIZE_M for M in up)
    assert {M: Config.from_dict(p["up"]) for M, p in r.pairs.items()} == up
    assert load_tuned_configs(r.files["vllm"]) == {M: Config.from_dict(c) for M, c in r.best.items()}
    study = optuna.load_study(study_name=r.study_names[8], storage=f"sqlite:///{tmp_path}/p.db")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert complete and all(0 < t.user_attrs["up_us"] < t.value and t.user_attrs["down_us"] > 0 for t in complete)
    assert r.trials_used[8] == 6  # one trial gives both GEMMs' times: the budget does not double


def test_the_down_config_can_be_turned_off_and_is_a_study_of_its_own(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    kwargs = dict(spec=SPEC, batch_sizes=[8], n_trials=2, storage=storage, output_dir=tmp_path / "o", progress=False)
    single = moe_opt.tune(down_config=False, **kwargs)
    pair = moe_opt.tune(**kwargs)
    assert "|pair" not in single.study_names[8] and single.study_names[8] != pair.study_names[8]
    assert "sglang_down" not in single.files and not single.pairs
    assert pair.trials_used[8] == 2  # nothing resumed from the single-config study


def test_a_replay_table_cannot_tune_a_pair(tmp_path):
    table = moe_opt.__path__[0] + "/data/DeepSeek-V4-Flash_tp8_H200.csv"
    r = moe_opt.tune(replay=table, batch_sizes=[64], n_trials=2, storage=f"sqlite:///{tmp_path}/r.db",
                     output_dir=tmp_path / "o", progress=False)
    assert "sglang_down" not in r.files and "|pair" not in r.study_names[64]  # whole calls only: one config
    with pytest.raises(TuneError, match="down_config=True needs a measurer that times each GEMM on its own"):
        moe_opt.tune(replay=table, batch_sizes=[64], n_trials=2, storage=f"sqlite:///{tmp_path}/r.db",
                     output_dir=None, progress=False, down_config=True)


def test_file_names_are_the_ones_sglang_ships():
    # Shipped in sglang 0.5.23 under srt/layers/moe/moe_runner/triton_utils/configs/triton_3_4_0 and triton_3_5_1.
    assert FP8.replace(num_experts=257, topk=9).config_file_name("NVIDIA H20", down=True) == \
        "E=257,N=256,device_name=NVIDIA_H20,dtype=fp8_w8a8,block_shape=[128, 128]_down.json"
    qwen = moe_opt.ModelSpec.from_shape(num_experts=128, topk=8, hidden_size=2048, intermediate_size=1024,
                                        dtype="fp8_w8a8", block_shape=None)
    assert qwen.config_file_name("NVIDIA H100 80GB HBM3", down=True) == \
        "E=128,N=1024,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8_down.json"


def _study(trials: list[tuple[Config, float, float, float]]) -> optuna.Study:
    """A study of completed trials (config, whole call µs, up_us, down_us), as a pair tune records them."""
    study = optuna.create_study()
    dist = {p: optuna.distributions.CategoricalDistribution(list(c)) for p, c in space.iter_choices()}
    for config, us, up, down in trials:
        study.add_trial(optuna.trial.create_trial(params=config.to_dict(), distributions=dist, value=us,
                                                  user_attrs={"up_us": up, "down_us": down}))
    study.set_user_attr("M", 64)
    return study


A = Config(16, 64, 128, 32, 4, 3)   # best single: 100 = 60 + 40
B = Config(16, 128, 128, 16, 4, 4)  # faster GEMM2: 105 = 70 + 35
C = Config(32, 64, 128, 32, 4, 3)   # another BLOCK_SIZE_M: its stages never pair with A's or B's
D = Config(32, 128, 128, 1, 8, 3)


def test_the_pair_takes_each_gemms_best_under_one_block_size_m():
    study = _study([(A, 100.0, 60.0, 40.0), (B, 105.0, 70.0, 35.0), (C, 101.0, 50.0, 51.0), (D, 120.0, 90.0, 30.0)])
    pair = result_of(study.get_trials(), study.user_attrs).pair
    # M16: 60 + 35 = 95; M32: 50 + 30 = 80 would mix... both of BLOCK_SIZE_M 32: C up, D down.
    assert (pair.up, pair.down, pair.estimated_us) == (C, D, 80.0)
    assert ConfigPair(pair.up, pair.down).up.BLOCK_SIZE_M == 32


def test_a_pair_is_exported_only_where_its_whole_call_was_timed_faster_and_passed_the_guard():
    study = _study([(A, 100.0, 60.0, 40.0), (B, 105.0, 70.0, 35.0)])
    trials = study.get_trials()
    unconfirmed = result_of(trials, study.user_attrs).engine_pair
    assert unconfirmed == (ConfigPair(A, A), 100.0)  # estimated only: the best single config for both GEMMs
    faster = {CONFIRMED_PAIR_ATTR: {"up": 0, "down": 1, "us": 96.0, "single_us": 100.5}, "M": 64}
    assert result_of(trials, faster).engine_pair == (ConfigPair(A, B), 96.0)
    slower = {CONFIRMED_PAIR_ATTR: {"up": 0, "down": 1, "us": 101.0, "single_us": 100.5}, "M": 64}
    assert result_of(trials, slower).engine_pair[0] == ConfigPair(A, A)
    rejected = dict(faster, **{GUARD_ATTR: {pair_guard_key(0, 1): "failed: error 0.3 > 0.06"}})
    assert result_of(trials, rejected).engine_pair[0] == ConfigPair(A, A)


def test_pairs_merge_into_existing_up_and_down_files(tmp_path):
    kw = dict(device_name="NVIDIA H200", triton_version="3.6.0")
    write_engine_files(FP8, {1: A}, tmp_path, sglang_pairs={1: ConfigPair(A, B)}, **kw)
    files, kept = write_engine_files(FP8, {64: C}, tmp_path, sglang_pairs={64: ConfigPair(C, D)}, **kw)
    assert kept == [1]
    assert load_tuned_configs(files["sglang"]) == {1: A, 64: C}
    assert load_tuned_configs(files["sglang_down"]) == {1: B, 64: D}
    assert load_tuned_configs(files["vllm"]) == {1: A, 64: C}
    assert list(json.loads(files["sglang_down"].read_text())) == ["1", "64"]  # batch sizes only, as SGLang parses


def test_the_cli_writes_the_down_file_unless_told_not_to(tmp_path):
    from moe_opt.cli import main

    shape = ["--shape", "E=8,topk=2,K=256,intermediate=128", "--batch-sizes", "8", "--n-trials", "2"]
    assert main(["tune", *shape, "--storage", str(tmp_path / "a.db"), "--output-dir", str(tmp_path / "a")]) == 0
    assert len(list((tmp_path / "a").rglob("*_down.json"))) == 1
    assert main(["tune", *shape, "--no-down-config", "--routing", "zipf0.8", "--storage", str(tmp_path / "b.db"),
                 "--output-dir", str(tmp_path / "b")]) == 0
    assert not list((tmp_path / "b").rglob("*_down.json")) and list((tmp_path / "b").rglob("*.json"))


def test_the_note_and_the_summary_name_both_configs_of_an_exported_pair():
    from moe_opt.view.notes import study_note
    from moe_opt.view.report_data import _pair_columns

    study = _study([(A, 100.0, 60.0, 40.0), (B, 105.0, 70.0, 35.0)])
    study.set_user_attr(CONFIRMED_PAIR_ATTR, {"up": 0, "down": 1, "us": 96.0, "single_us": 100.5})
    note = study_note(study)
    down_row = next(line for line in note.splitlines() if "SGLang pair: down" in line)
    assert "| " + " | ".join(str(v) for v in B.to_dict().values()) + " | 96.00 |" in down_row
    columns = _pair_columns(result_of(study.get_trials(), study.user_attrs))
    assert columns == {"sglang_down": f"down {B}", "pair_us": 96.0}


def test_a_pair_tunes_confirm_step_times_each_contender_as_one_whole_call(tmp_path):
    """A pair tune's measurer times GEMM1's stage apart for every Config, a second CUDA graph per measurement; the
    confirm step compares whole calls only, so it submits each contender as ConfigPair(c, c), the same call."""
    from pathlib import Path

    from moe_opt.measure.replay import ReplayTable
    from moe_opt.run.confirm import confirm

    table_path = str(Path(__file__).resolve().parent.parent / "moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv")
    storage = f"sqlite:///{tmp_path}/c.db"
    r = moe_opt.tune(replay=table_path, n_trials=6, seed=1, storage=storage, output_dir=None,
                     progress=False, warm_start=False)
    studies = {M: optuna.load_study(study_name=name, storage=storage) for M, name in r.study_names.items()}
    defaults = {M: Config.from_dict(s.user_attrs["default_config"]) for M, s in studies.items()}
    table = ReplayTable(table_path)

    class Recording:
        info = table.info
        asked: list = []

        def measure(self, config, M):
            self.asked.append(config)
            return table.measure(config.up if isinstance(config, ConfigPair) else config, M)

    for whole_call in (False, True):
        Recording.asked = []
        medians = confirm(studies, Recording(), defaults, whole_call=whole_call)
        asked = Recording.asked
        assert asked and all(isinstance(c, ConfigPair) and c.up == c.down for c in asked) == whole_call
        assert all(isinstance(c, Config) for M in medians for c in medians[M])  # keyed by the contender
        expected = {M: {c: table.measure(c, M).latency_us for c in medians[M]} for M in medians}
        assert medians == expected


def test_re_measuring_times_the_pair_in_the_same_rounds_as_the_single_configs_and_the_single_once():
    """The best pair is one more contender of the first pass: each round submits the single contenders (as whole
    calls) and the pair together, and the best single config is not timed again for the pair afterwards."""
    from moe_opt.measure.base import Measurement, MeasurerInfo
    from moe_opt.run.confirm import CONFIRM_ROUNDS, confirm

    study = _study([(A, 100.0, 60.0, 40.0), (B, 101.0, 70.0, 35.0)])  # the pair: A's GEMM1, B's GEMM2
    fresh = {ConfigPair(A, A): [99.0, 98.0, 100.0], ConfigPair(B, B): [103.0, 104.0, 102.0],
             ConfigPair(A, B): [96.0, 97.0, 95.0]}

    class Timer:
        info = MeasurerInfo("GPU", "GPU", "test timer")
        asked: list = []

        def measure(self, config, M):
            self.asked.append(config)
            return Measurement(fresh[config][sum(c == config for c in self.asked) - 1])

    timer = Timer()
    medians = confirm({64: study}, timer, {64: A}, whole_call=True)
    assert medians == {64: {A: 99.0, B: 103.0}}
    one_round = [ConfigPair(A, A), ConfigPair(B, B), ConfigPair(A, B)]
    assert timer.asked == one_round * CONFIRM_ROUNDS  # interleaved, and nothing after the rounds
    assert study.user_attrs[CONFIRMED_PAIR_ATTR] == {"up": 0, "down": 1, "us": 96.0, "single_us": 99.0}
    assert result_of(study.get_trials(), study.user_attrs).engine_pair == (ConfigPair(A, B), 96.0)

"""sweep(): several TP sizes of one model in one call, each shape warm-started from what the shapes before found."""

from __future__ import annotations

import json

import optuna
import pytest

import moe_opt
from moe_opt.cli import main
from moe_opt.errors import TuneError
from moe_opt.space import Config

# A Mixtral-style config small enough for the CPU interpreter at its real shape (TP 1: N=64; TP 2: N=32).
TINY_MIXTRAL = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 8,
                "num_experts_per_tok": 2, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
                "torch_dtype": "float16"}


@pytest.fixture
def model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_MIXTRAL))
    return str(path)


def test_a_sweep_tunes_every_tp_size_and_starts_each_later_shape_from_the_earlier_shapes_best(model, tmp_path):
    r = moe_opt.sweep(model, tp_sizes=(1, 2), batch_sizes=[1, 8], n_trials=3, storage="sqlite:///s.db",
                      output_dir=tmp_path / "out", down_config=False, progress=False)
    assert list(r.results) == [(1, None), (2, None)]
    assert [res.spec.N for res in r.results.values()] == [64, 32]
    names = sorted(p.name for p in (tmp_path / "out").rglob("*.json"))
    assert names == sorted(["E=8,N=64,device_name=cpu-interpreter.json"] * 2 +
                           ["E=8,N=32,device_name=cpu-interpreter.json"] * 2)
    first, second = r.results[1, None], r.results[2, None]
    storage = optuna.storages.RDBStorage("sqlite:///s.db")
    for M in (1, 8):
        study = optuna.load_study(study_name=second.study_names[M], storage=storage)
        warm = [Config.from_dict(t.params) for t in study.trials if t.user_attrs.get("warm_start")]
        # The first shape's best at M is measured at the second shape, right after the default.
        assert Config.from_dict(first.best[M]) in warm[:3]


def test_a_sweep_resumes_like_a_tune(model, tmp_path):
    kwargs = dict(tp_sizes=(1, 2), batch_sizes=[1], n_trials=2, storage="sqlite:///s.db", output_dir=None,
                  down_config=False, progress=False)
    moe_opt.sweep(model, **kwargs)
    again = moe_opt.sweep(model, **{**kwargs, "n_trials": 3})
    storage = optuna.storages.RDBStorage("sqlite:///s.db")
    for res in again.results.values():
        study = optuna.load_study(study_name=res.study_names[1], storage=storage)
        assert len([t for t in study.trials if t.state.is_finished()]) == 3  # two kept, one added


@pytest.mark.parametrize("kwargs, message", [
    ({"tp_sizes": ()}, "tp_sizes is empty"),
    ({"tp_sizes": (2, 2)}, "tp_sizes repeats 2"),
    ({"tp_sizes": (1, "2")}, "tp_sizes: '2' is not an integer"),
    ({"tp_sizes": (1, 3)}, "3"),  # 64 is not divisible by 3: refused by the resolver before anything is tuned
    ({"tp_sizes": (1,), "tp_size": 2}, "sweep() takes no tp_size="),
])
def test_a_bad_sweep_is_one_line_and_creates_nothing(model, tmp_path, kwargs, message):
    with pytest.raises((TuneError, moe_opt.SpecError)) as err:
        moe_opt.sweep(model, storage="sqlite:///s.db", output_dir=tmp_path / "out", progress=False, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "s.db").exists() and not (tmp_path / "out").exists()


def test_the_cli_sweeps_on_a_list_of_tp_sizes_and_refuses_lists_it_cannot_sweep(model, tmp_path, capsys):
    code = main(["tune", "--model", model, "--tp-size", "1,2", "--batch-sizes", "1", "--n-trials", "2",
                 "--storage", "s.db", "--no-export", "--no-down-config"])
    out = capsys.readouterr().out
    assert code == 0 and "moe-opt sweep: 2 shapes in" in out and "TP 2 " in out
    assert main(["tune", "--shape", "E=8,topk=2,K=64,intermediate=64", "--tp-size", "1,2"]) == 2
    assert "they need --model, got --shape" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "--model", model, "--tp-size", "1,x"])
    assert exit_.value.code == 2 and "not a comma-separated list of integers" in capsys.readouterr().err

"""Every weight format through a whole tune on the CPU interpreter: studies named for the format, a resumed run
adding to them, the correctness guard's bound for the format, and the engines' files named as SGLang and vLLM
name them. Also the warm start from the file an installed engine ships for the shape."""

from __future__ import annotations

import optuna
import pytest

import moe_opt
from moe_opt import Config, space
from moe_opt.export.engines import write_sglang
from moe_opt.measure.replay import ReplayTable
from moe_opt.model.spec import ModelSpec

SHAPE = dict(num_experts=8, topk=2, hidden_size=256, intermediate_size=128)  # small enough: tuned as given
FORMATS = {  # ModelSpec fields, SGLang's file name, vLLM's (vLLM names no per_channel_quant, no int8_w8a8)
    "int4_w4a16_g128_zp": (dict(dtype="int4_w4a16", group_size=128, has_zero_point=True),
                           "E=8,N=128,device_name=cpu-interpreter,dtype=int4_w4a16.json",
                           "E=8,N=128,device_name=cpu-interpreter,dtype=int4_w4a16.json"),
    "int8_w8a16": (dict(dtype="int8_w8a16"), "E=8,N=128,device_name=cpu-interpreter,dtype=int8_w8a16.json",
                   "E=8,N=128,device_name=cpu-interpreter,dtype=int8_w8a16.json"),
    "int8_w8a8_channel": (dict(dtype="int8_w8a8", per_channel_quant=True),
                          "E=8,N=128,device_name=cpu-interpreter,dtype=int8_w8a8,per_channel_quant=True.json",
                          "E=8,N=128,device_name=cpu-interpreter.json"),
    "fp8_w8a8_channel": (dict(dtype="fp8_w8a8", per_channel_quant=True),
                         "E=8,N=128,device_name=cpu-interpreter,dtype=fp8_w8a8,per_channel_quant=True.json",
                         "E=8,N=128,device_name=cpu-interpreter,dtype=fp8_w8a8.json"),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_tunes_resumes_and_exports_under_the_engines_names(tmp_path, name):
    fields, sglang_name, vllm_name = FORMATS[name]
    spec = ModelSpec.from_shape(**SHAPE, **fields)
    kwargs = dict(spec=spec, batch_sizes=[4], storage=f"sqlite:///{tmp_path}/f.db", output_dir=tmp_path / "out",
                  progress=False, down_config=False)
    first = moe_opt.tune(n_trials=1, **kwargs)
    again = moe_opt.tune(n_trials=2, **kwargs)  # resumes the same study: one trial more
    assert again.study_names == first.study_names and again.trials_used[4] == 2
    assert again.guard[4].startswith("passed")
    assert again.files["sglang"].name == sglang_name and again.files["vllm"].name == vllm_name
    study = optuna.load_study(study_name=again.study_names[4], storage=f"sqlite:///{tmp_path}/f.db")
    assert study.user_attrs["spec"]["dtype"] == fields["dtype"] and len(study.trials) == 2
    for c in (Config(**t.params) for t in study.trials):
        assert c.BLOCK_SIZE_K in space.block_size_k_choices(spec.dtype, spec.block_shape)


def test_the_warm_start_measures_the_file_an_installed_engine_ships(tmp_path, monkeypatch):
    table = moe_opt.__path__[0] + "/data/DeepSeek-V4-Flash_tp8_H200.csv"
    spec = ModelSpec.from_dict(ReplayTable(table).metadata()["spec"])
    shipped = Config(32, 64, 128, 64, 8, 4)
    # sglang 0.5.23's layout: srt/layers/moe/moe_runner/triton_utils/configs/triton_X_Y_Z/<name>
    package = tmp_path / "site" / "sglang"
    (package / "srt").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    write_sglang(spec, {64: shipped}, package / "srt/layers/moe/moe_runner/triton_utils", device_name="NVIDIA H200",
                 triton_version="3.4.0")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv("SGLANG_MOE_CONFIG_DIR", raising=False)
    r = moe_opt.tune(replay=table, batch_sizes=[64], n_trials=3, storage=f"sqlite:///{tmp_path}/w.db",
                     output_dir=None, progress=False)
    first_two = r.trials_dataframe().sort_values("number").head(2)
    configs = [Config(*(int(row[f"params_{p}"]) for p in space.PARAM_NAMES)) for _, row in first_two.iterrows()]
    assert configs == [space.default_config(64, 256, "fp8_w8a8", [128, 128]), shipped]

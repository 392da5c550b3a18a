"""moe-opt bench (config files against SGLang's default) and moe-opt check (is the file the engine loads still
good here?), on the recorded H200 table and through Triton's CPU interpreter; the engines' own lookups, on folders
laid out as the engines lay them out."""

from __future__ import annotations

import csv
import importlib.metadata
import json
from pathlib import Path

import pytest

import moe_opt
from moe_opt import TuneError
from moe_opt.cli import main
from moe_opt.export.engines import write_sglang, write_vllm
from moe_opt.measure.replay import ReplayTable
from moe_opt.model.spec import ModelSpec
from moe_opt.run.bench import bench, nearest_entry
from moe_opt.run.check import check, check_text
from moe_opt.run.lookup import engine_files
from moe_opt.space import Config, default_config

REPO = Path(__file__).resolve().parents[1]
TABLE = str(REPO / "moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv")
SPEC = ModelSpec.from_dict(json.loads(Path(TABLE + ".json").read_text())["spec"])
H200 = "NVIDIA H200"


@pytest.fixture(scope="module")
def table() -> ReplayTable:
    return ReplayTable(TABLE)


def worst(table: ReplayTable, M: int) -> Config:
    return max((us, c) for c, us in table.configs(M).items() if us is not None)[1]


def sglang_file(root: Path, configs: dict[int, Config], triton: str = "3.6.0", spec: ModelSpec = SPEC,
                device: str = H200) -> Path:
    return write_sglang(spec, configs, root, device_name=device, triton_version=triton)


# --- bench ----------------------------------------------------------------------------------------------------------

def test_bench_times_the_nearest_entry_against_sglangs_default(tmp_path, table):
    best = {M: table.best(M)[0] for M in (1, 256)}
    path = sglang_file(tmp_path / "cfg", best)
    result = bench([path], replay=TABLE, batch_sizes=[1, 16, 256, 1024])
    assert [r.M for r in result.rows] == [1, 16, 256, 1024]
    assert [r.entry for r in result.rows] == [1, 1, 256, 256]  # the engines run the nearest batch size's entry
    for r in result.rows:
        assert r.config == best[r.entry] and r.latency_us == table.configs(r.M)[r.config]
        assert r.default_config == default_config(r.M, SPEC.E, SPEC.dtype, SPEC.block_shape)
        assert r.default_us == table.configs(r.M)[r.default_config]
        assert r.speedup == pytest.approx(r.default_us / r.latency_us)
    assert result.rows[0].speedup > 1 and result.is_performance and result.device_name == H200


def test_nearest_entry_is_the_engines_choice():
    configs = dict.fromkeys([1, 16, 64, 256])
    assert [nearest_entry(configs, M) for M in (1, 8, 9, 40, 41, 100, 4096)] == [1, 1, 16, 16, 64, 64, 256]


def test_cli_bench_of_a_folder_prints_and_saves_the_table(tmp_path, table, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "--replay", TABLE, "--batch-size", "1", "16", "--n-trials", "3", "--save-dir", "tuned",
                 "--storage", "s.db"]) == 0
    capsys.readouterr()
    assert main(["bench", "tuned", "--replay", TABLE, "-o", "b.csv", "-o", "out/b.json"]) == 0
    out = capsys.readouterr().out
    assert "holds the same entries as" in out  # the folder's SGLang and vLLM files: measured once
    assert "geometric-mean speedup over SGLang's default" in out
    rows = list(csv.DictReader(open("b.csv")))
    assert [r["M"] for r in rows] == ["1", "16"] and all(r["device"] == H200 for r in rows)
    doc = json.loads(Path("out/b.json").read_text())
    assert doc["device"] == H200 and [r["M"] for r in doc["rows"]] == [1, 16]
    for csv_row, json_row in zip(rows, doc["rows"]):
        assert float(csv_row["latency_us"]) == json_row["latency_us"]
        assert Config.from_dict(json_row["config"]) == Config.from_dict(json.loads(
            next(Path("tuned").glob("*.json")).read_text())[str(json_row["entry"])])


def test_bench_bad_input_is_one_line(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nothing.json"), "--replay", TABLE]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["bench", str(tmp_path / "empty"), "--replay", TABLE]) == 2
    assert "holds no tuned-config file for this shape on NVIDIA H200" in capsys.readouterr().err
    assert main(["bench", "--replay", TABLE, "--tune"]) == 2
    assert "to tune, run moe-opt tune" in capsys.readouterr().err
    path = sglang_file(tmp_path / "cfg", {1: Config(16, 64, 128, 1, 4, 3)})
    assert main(["bench", str(path), "--replay", TABLE, "--batch-size", "7"]) == 2
    assert "has no rows for batch size 7" in capsys.readouterr().err
    with pytest.raises(TuneError, match="give a .csv or .json path"):
        from moe_opt.run.bench import save_bench

        save_bench(bench([path], replay=TABLE, batch_sizes=[1]), tmp_path / "b.txt")


# --- which file an engine loads ---------------------------------------------------------------------------------------

def test_without_a_file_bench_takes_what_the_engines_would_load(tmp_path, monkeypatch, table):
    """An installed engine's shipped files, then the folders its variables name (a package laid out as SGLang's and
    vLLM's are, found on sys.path as Python finds the real ones)."""
    site = tmp_path / "site"
    shipped = Config(32, 64, 128, 16, 4, 3)
    for package in ("sglang", "vllm"):
        (site / package).mkdir(parents=True)
        (site / package / "__init__.py").write_text("raise ImportError('located, never imported')\n")
    sglang_file(site / "sglang/srt/layers/moe/fused_moe_triton", {1: shipped}, triton="3.4.0")
    write_vllm(SPEC, {1: shipped}, site / "vllm/model_executor/layers/fused_moe/configs", device_name=H200,
               triton_version="3.4.0")
    monkeypatch.syspath_prepend(str(site))
    for var in ("SGLANG_MOE_CONFIG_DIR", "VLLM_TUNED_CONFIG_FOLDER"):
        monkeypatch.delenv(var, raising=False)

    result = bench(replay=TABLE, batch_sizes=[1])
    assert [(f.engine, f.where, f.triton_folder) for f in result.files] == [("sglang", "the installed sglang",
                                                                              "triton_3_4_0")]
    assert "vllm" in result.notes[0]  # the vLLM file holds the same entries: measured once
    assert result.rows[0].config == shipped

    mine = Config(16, 64, 128, 1, 4, 3)
    sglang_file(tmp_path / "sglang_dir", {1: mine})  # SGLANG_MOE_CONFIG_DIR replaces SGLang's own folder
    monkeypatch.setenv("SGLANG_MOE_CONFIG_DIR", str(tmp_path / "sglang_dir"))
    write_vllm(SPEC, {1: mine}, tmp_path / "vllm_dir", device_name=H200, triton_version="3.6.0")
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path / "vllm_dir"))  # vLLM looks here first
    sglang = engine_files(SPEC, H200, "sglang", triton_version="3.6.0")
    assert [f.where for f in sglang] == [f"SGLANG_MOE_CONFIG_DIR={tmp_path / 'sglang_dir'}"]
    vllm = engine_files(SPEC, H200, "vllm", triton_version="3.6.0")
    assert [f.where for f in vllm] == [f"VLLM_TUNED_CONFIG_FOLDER={tmp_path / 'vllm_dir'}", "the installed vllm"]
    assert [r.config for r in bench(replay=TABLE, batch_sizes=[1], engine="vllm").rows] == [mine]


def test_sglangs_lookup_takes_the_running_triton_then_the_newest(tmp_path):
    for version in ("3.4.0", "3.5.1", "3.10.0"):
        sglang_file(tmp_path, {1: Config(16, 64, 128, 1, 4, 3)}, triton=version)
    folders = lambda running: [f.triton_folder for f in engine_files(SPEC, H200, "sglang", config_dirs=[tmp_path],
                                                                      triton_version=running)]
    assert folders("3.5.1") == ["triton_3_5_1", "triton_3_10_0", "triton_3_4_0"]
    assert folders("3.6.0")[0] == "triton_3_10_0"  # no folder of its own: newest first, by number not by text


def test_deepseek_v4_flash_tp8_gets_deepseek_v3s_file(tmp_path):
    """SGLang's file name omits K and topk: V3 without shared-expert fusion and V4-Flash share E=256, N=256."""
    v4 = moe_opt.resolve_model("deepseek-ai/DeepSeek-V4-Flash", tp_size=8)
    v3 = moe_opt.resolve_model("deepseek-ai/DeepSeek-V3", tp_size=8, fuse_shared_experts=False)
    assert (v3.K, v3.topk) != (v4.K, v4.topk)
    path = sglang_file(tmp_path, {1: Config(16, 64, 128, 1, 4, 3)}, spec=v3)
    assert [f.path for f in engine_files(v4, H200, "sglang", config_dirs=[tmp_path], triton_version="3.6.0")] == [path]


# --- check ----------------------------------------------------------------------------------------------------------

def test_check_flags_the_batch_sizes_where_the_file_is_slow_and_says_how_to_fix(tmp_path, table, capsys):
    sglang_file(tmp_path / "cfg", {1: table.best(1)[0], 16: worst(table, 16)}, triton="3.5.1")
    result = check(replay=TABLE, config_dirs=[tmp_path / "cfg"], batch_sizes=[1, 16], n_trials=6)
    assert result.file.triton_folder == "triton_3_5_1" and result.flagged == [16]
    row = {r.M: r for r in result.rows}
    assert row[16].file.config == worst(table, 16) and row[16].engine_us > row[16].default.latency_us
    assert any("slower than SGLang's default" in f for f in row[16].flags)
    assert any("slower than a short tune" in f for f in row[16].flags)
    assert row[1].tuned_us <= row[1].engine_us * 1.03 and not row[1].flags
    text = check_text(result)
    assert "there is no triton_3_6_0 file for this shape: SGLang falls back to triton_3_5_1" in text
    assert "not K or topk" in text and "fix: moe-opt tune" in text

    assert main(["check", "--replay", TABLE, "--config-dir", str(tmp_path / "cfg"), "--batch-sizes", "1,16",
                 "--n-trials", "6"]) == 1
    out = capsys.readouterr().out
    assert f"fix: moe-opt tune --replay {TABLE}" in out and "M=16" in out.splitlines()[-3]


def test_check_passes_a_good_file_and_flags_a_missing_one(tmp_path, table, capsys):
    sglang_file(tmp_path / "good", {M: table.best(M)[0] for M in (1, 16)})
    assert main(["check", "--replay", TABLE, "--config-dir", str(tmp_path / "good"), "--batch-sizes", "1,16",
                 "--n-trials", "6"]) == 0
    assert "every batch size is within 3% of SGLang's default and of a short tune" in capsys.readouterr().out
    result = check(replay=TABLE, config_dirs=[tmp_path / "nothing-here"], batch_sizes=[16], n_trials=6)
    assert result.file is None and result.rows[0].file is None and result.rows[0].entry is None
    assert result.flagged == [16]  # the default everywhere, and a short tune beats it here
    assert "it runs SGLang's default config at every batch size" in check_text(result)


# --- On the CPU interpreter ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """A file for the interpreter's scaled-down DeepSeek-V4-Flash TP8, as a CPU tune names it."""
    from moe_opt.run.session import interpreter_spec

    spec = interpreter_spec(moe_opt.resolve_model("deepseek-ai/DeepSeek-V4-Flash", tp_size=8))
    root = tmp_path_factory.mktemp("interpreted")
    sglang_file(root, {1: Config(16, 64, 128, 1, 4, 3)}, triton=importlib.metadata.version("triton"), spec=spec,
                device="cpu-interpreter")
    return root


def test_bench_on_the_interpreter_says_it_is_no_performance_number(interpreted):
    result = bench([interpreted], model="deepseek-ai/DeepSeek-V4-Flash", tp_size=8, batch_sizes=[1])
    assert not result.is_performance and result.device_name == "cpu-interpreter"
    assert result.spec.K == 256 and result.rows[0].latency_us > 0 and result.rows[0].default_us > 0
    assert "NOT performance numbers" in result.notes[-1]


def test_check_on_the_interpreter_finds_the_cpu_tunes_file(interpreted):
    result = check("deepseek-ai/DeepSeek-V4-Flash", tp_size=8, config_dirs=[interpreted], batch_sizes=[1],
                   n_trials=2)
    assert result.file is not None and "device_name=cpu-interpreter" in result.file.path.name
    assert not result.is_performance and result.rows[0].engine_us > 0 and result.rows[0].tuned_us > 0
    assert result.fix == "moe-opt tune --model deepseek-ai/DeepSeek-V4-Flash --tp 8"  # the real shape, not the CPU's
    assert "the flags below say nothing about a GPU" in check_text(result)

"""export: tuned-config files that SGLang's and vLLM's own loaders read unchanged, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from moe_opt.errors import TuneError
from moe_opt.export.engines import export_paths, find_tuned_config_files, load_tuned_configs, write_sglang, write_vllm
from moe_opt.model.spec import ModelSpec
from moe_opt.space import Config

H100 = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"

# DeepSeek-style: fp8 weights with [128, 128] block scales, tp 8 -> N = 2048 / 8.
FP8_BLOCK = ModelSpec.from_shape(num_experts=256, topk=6, hidden_size=4096, intermediate_size=2048,
                                 dtype="fp8_w8a8", block_shape=[128, 128], tp_size=8)
BF16 = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=4096, intermediate_size=14336, tp_size=2)

CONFIGS = {
    1: Config(16, 64, 128, 1, 4, 4),
    16: Config(16, 128, 128, 16, 4, 3),
    256: Config(64, 128, 128, 32, 4, 3),
    4096: Config(128, 128, 128, 64, 8, 2),
}


# --- Faithful re-implementations of the engines' loaders (only the parts that find and parse the file) ---

def sglang_get_moe_configs(config_dir: Path, triton_version: str, E: int, N: int, dtype: str | None,
                           block_n: int, block_k: int, device_name: str) -> dict | None:
    """SGLang python/sglang/srt/layers/moe/fused_moe_triton/fused_moe_triton_config.py, get_moe_configs."""
    block_shape = [block_n, block_k]
    dtype_selector = "" if not dtype else f",dtype={dtype}"
    block_shape_selector = "" if not block_shape or not all(block_shape) else f",block_shape={block_shape}"
    json_file_name = (f"E={E},N={N},device_name={device_name.replace(' ', '_')}"
                      f"{dtype_selector}{block_shape_selector}.json")
    version_dir = f"triton_{triton_version.replace('.', '_')}"
    config_file_path = os.path.join(config_dir, "configs", version_dir, json_file_name)
    if os.path.exists(config_file_path):
        with open(config_file_path) as f:
            return {int(key): val for key, val in json.load(f).items()}
    configs_root = os.path.join(config_dir, "configs")
    available_versions = sorted(
        (d.removeprefix("triton_").replace("_", ".") for d in os.listdir(configs_root) if d.startswith("triton_")),
        key=lambda v: tuple(int(x) for x in v.split(".")), reverse=True)
    for try_triton_version in available_versions:
        if try_triton_version == triton_version:
            continue
        try_path = os.path.join(configs_root, f"triton_{try_triton_version.replace('.', '_')}", json_file_name)
        if os.path.exists(try_path):
            with open(try_path) as f:
                return {int(key): val for key, val in json.load(f).items()}
    return None


def vllm_get_moe_configs(tuned_config_folder: Path, E: int, N: int, dtype: str | None,
                         block_n: int | None, block_k: int | None, device_name: str) -> dict | None:
    """vLLM vllm/model_executor/layers/fused_moe/fused_moe.py, get_config_file_name + get_moe_configs."""
    block_shape = [block_n, block_k] if block_n and block_k else None
    device_name = device_name.replace(" ", "_")
    if "H200" in device_name.split("_"):
        device_name = "NVIDIA_H200"
    dtype_selector = "" if not dtype else f",dtype={dtype}"
    block_shape_selector = ("" if not block_shape or not all(block_shape)
                            else f",block_shape={block_shape}").replace(" ", "")
    json_file_name = f"E={E},N={N},device_name={device_name}{dtype_selector}{block_shape_selector}.json"
    config_file_path = os.path.join(tuned_config_folder, json_file_name)
    if os.path.exists(config_file_path):
        with open(config_file_path) as f:
            tuned_config = json.load(f)
            tuned_config.pop("triton_version", None)
            return {int(key): val for key, val in tuned_config.items()}
    return None


def block(spec: ModelSpec) -> tuple[int, int]:
    return spec.block_shape or (0, 0)


def as_dicts(configs: dict[int, Config]) -> dict[int, dict[str, int]]:
    return {m: c.to_dict() for m, c in configs.items()}


# --- Names and layout ---

@pytest.mark.parametrize("spec, device, sglang, vllm", [
    (FP8_BLOCK, H100,
     "configs/triton_3_6_0/E=256,N=256,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128, 128].json",
     "E=256,N=256,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128,128].json"),
    (FP8_BLOCK, H200,
     "configs/triton_3_6_0/E=256,N=256,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128, 128].json",
     "E=256,N=256,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"),
    (FP8_BLOCK, "NVIDIA H200 NVL",
     "configs/triton_3_6_0/E=256,N=256,device_name=NVIDIA_H200_NVL,dtype=fp8_w8a8,block_shape=[128, 128].json",
     "E=256,N=256,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"),
    (BF16, H100, "configs/triton_3_6_0/E=8,N=7168,device_name=NVIDIA_H100_80GB_HBM3.json",
     "E=8,N=7168,device_name=NVIDIA_H100_80GB_HBM3.json"),
    (BF16, H200, "configs/triton_3_6_0/E=8,N=7168,device_name=NVIDIA_H200.json",
     "E=8,N=7168,device_name=NVIDIA_H200.json"),
])
def test_files_land_where_each_engine_looks(tmp_path, spec, device, sglang, vllm):
    sglang_path = write_sglang(spec, CONFIGS, tmp_path, device_name=device, triton_version="3.6.0")
    vllm_path = write_vllm(spec, CONFIGS, tmp_path, device_name=device, triton_version="3.6.0")
    assert sglang_path.relative_to(tmp_path).as_posix() == sglang
    assert vllm_path.relative_to(tmp_path).as_posix() == vllm
    assert export_paths(spec, tmp_path, device_name=device, triton_version="3.6.0") == {
        "sglang": sglang_path, "vllm": vllm_path}


def test_down_projection_file_gets_the_down_suffix(tmp_path):
    path = write_sglang(FP8_BLOCK, CONFIGS, tmp_path, device_name=H100, triton_version="3.6.0", down=True)
    assert path.name.endswith(",block_shape=[128, 128]_down.json")


def test_a_non_release_triton_version_is_refused_for_sglang(tmp_path):
    with pytest.raises(TuneError, match=r"triton_version '3\.5\.0\+git1a2b' is not a release version.*'3\.6\.0'"):
        write_sglang(BF16, CONFIGS, tmp_path, device_name=H100, triton_version="3.5.0+git1a2b")
    assert list(tmp_path.iterdir()) == []


# --- The engines' own loaders read the files ---

@pytest.mark.parametrize("spec", [FP8_BLOCK, BF16], ids=["fp8_block", "bf16"])
@pytest.mark.parametrize("device", [H100, H200, "NVIDIA H200 NVL"])
def test_sglang_loader_reads_the_sglang_file(tmp_path, spec, device):
    write_sglang(spec, CONFIGS, tmp_path, device_name=device, triton_version="3.6.0")
    loaded = sglang_get_moe_configs(tmp_path, "3.6.0", spec.E, spec.N, spec.dtype, *block(spec), device)
    assert loaded == as_dicts(CONFIGS)


def test_sglang_loader_falls_back_to_the_file_of_another_triton_version(tmp_path):
    write_sglang(FP8_BLOCK, CONFIGS, tmp_path, device_name=H100, triton_version="3.6.0")
    loaded = sglang_get_moe_configs(tmp_path, "3.7.1", FP8_BLOCK.E, FP8_BLOCK.N, "fp8_w8a8", 128, 128, H100)
    assert loaded == as_dicts(CONFIGS)


@pytest.mark.parametrize("spec", [FP8_BLOCK, BF16], ids=["fp8_block", "bf16"])
@pytest.mark.parametrize("device", [H100, H200, "NVIDIA H200 NVL"])
def test_vllm_loader_reads_the_vllm_file(tmp_path, spec, device):
    path = write_vllm(spec, CONFIGS, tmp_path, device_name=device, triton_version="3.6.0")
    assert json.loads(path.read_text())["triton_version"] == "3.6.0"
    loaded = vllm_get_moe_configs(tmp_path, spec.E, spec.N, spec.dtype, *block(spec), device)
    assert loaded == as_dicts(CONFIGS)


def test_files_are_written_as_the_engines_tuners_write_them_keys_sorted_numerically(tmp_path):
    shuffled = {4096: CONFIGS[4096], 16: CONFIGS[16], 1: CONFIGS[1], 256: CONFIGS[256]}
    sglang_path = write_sglang(BF16, shuffled, tmp_path, device_name=H100, triton_version="3.6.0")
    vllm_path = write_vllm(BF16, shuffled, tmp_path, device_name=H100, triton_version="3.6.0")
    entries = {str(m): c.to_dict() for m, c in CONFIGS.items()}
    assert list(json.loads(sglang_path.read_text())) == ["1", "16", "256", "4096"]
    assert sglang_path.read_text() == json.dumps(entries, indent=4) + "\n"
    assert vllm_path.read_text() == json.dumps({"triton_version": "3.6.0", **entries}, indent=4) + "\n"


@pytest.mark.parametrize("write", [write_sglang, write_vllm])
def test_round_trip_write_then_load(tmp_path, write):
    path = write(FP8_BLOCK, CONFIGS, tmp_path, device_name=H100, triton_version="3.6.0")
    loaded = load_tuned_configs(path)
    assert loaded == CONFIGS and list(loaded) == sorted(CONFIGS)


# --- Atomic writes and refusals ---

class UnserializableConfig(Config):
    """A config whose JSON form cannot be encoded: json.dump fails part-way through the file."""

    def to_dict(self):
        return {**super().to_dict(), "num_stages": object()}


@pytest.mark.parametrize("write", [write_sglang, write_vllm])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, write):
    path = write(FP8_BLOCK, CONFIGS, tmp_path, device_name=H100, triton_version="3.6.0")
    before = path.read_bytes()
    broken = {**CONFIGS, 8192: UnserializableConfig(128, 256, 128, 16, 8, 3)}
    with pytest.raises(TypeError, match="not JSON serializable"):
        write(FP8_BLOCK, broken, tmp_path, device_name=H100, triton_version="3.6.0")
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize("write", [write_sglang, write_vllm])
def test_a_failed_first_write_leaves_no_file_at_all(tmp_path, write):
    broken = {1: UnserializableConfig(16, 64, 128, 1, 4, 4)}
    with pytest.raises(TypeError):
        write(BF16, broken, tmp_path, device_name=H100, triton_version="3.6.0")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_destination_that_cannot_be_replaced_gives_a_tune_error_and_no_temp_file(tmp_path):
    target = export_paths(BF16, tmp_path, device_name=H100, triton_version="3.6.0")["vllm"]
    (target / "occupied").mkdir(parents=True)  # a non-empty directory where the file should go
    with pytest.raises(TuneError, match=r"cannot write .*the previous file, if any, is unchanged"):
        write_vllm(BF16, CONFIGS, tmp_path, device_name=H100, triton_version="3.6.0")
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


@pytest.mark.parametrize("write", [write_sglang, write_vllm])
def test_empty_configs_are_refused_and_nothing_is_written(tmp_path, write):
    with pytest.raises(TuneError, match="configs is empty; a tuned-config file needs at least one batch size"):
        write(BF16, {}, tmp_path, device_name=H100, triton_version="3.6.0")
    assert list(tmp_path.iterdir()) == []


def test_batch_sizes_must_be_positive_integers(tmp_path):
    with pytest.raises(TuneError, match=r"batch size '64' is not a positive integer"):
        write_sglang(BF16, {"64": CONFIGS[1]}, tmp_path, device_name=H100, triton_version="3.6.0")


# --- Loading files written by anyone ---

def test_loading_malformed_json_names_the_file_and_the_problem(tmp_path):
    path = tmp_path / "E=8,N=7168,device_name=NVIDIA_H100_80GB_HBM3.json"
    path.write_text('{"1": {"BLOCK_SIZE_M": 16,')
    with pytest.raises(TuneError, match=r"E=8,N=7168.*\.json is not valid JSON \(.* at line 1 column \d+\); "
                                        r"a tuned-config file is a JSON object of batch sizes"):
        load_tuned_configs(path)


def test_loading_an_entry_without_a_launch_parameter_names_it(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"triton_version": "3.6.0", "64": {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_K": 128}}))
    with pytest.raises(TuneError, match="the entry for batch size 64 lacks BLOCK_SIZE_N, GROUP_SIZE_M; "
                                        "each entry needs BLOCK_SIZE_M"):
        load_tuned_configs(path)


@pytest.mark.parametrize("content, message", [
    (None, "cannot read tuned-config file"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ('{"triton_version": "3.6.0"}', "has no batch-size entries"),
    ('{"64": [64, 128]}', "the entry for batch size 64 is a JSON list"),
    ('{"64": {"BLOCK_SIZE_M": 48, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1}}',
     "the entry for batch size 64 is not a valid config: Config.BLOCK_SIZE_M must be a power of two"),
])
def test_loading_unusable_files_gives_one_line_tune_errors(tmp_path, content, message):
    path = tmp_path / "tuned.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TuneError, match=message) as info:
        load_tuned_configs(path)
    assert "\n" not in str(info.value)


def test_loading_an_engine_file_ignores_metadata_and_extra_keys_and_defaults_warps_and_stages(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({
        "triton_version": "3.4.0",
        "2": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1},
        "1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 8,
              "num_stages": 2, "waves_per_eu": 0},
    }))
    assert load_tuned_configs(path) == {1: Config(16, 64, 128, 1, 8, 2), 2: Config(16, 32, 64, 1, 4, 3)}


# --- Finding existing tuned files to warm-start from ---

def test_find_tuned_config_files_finds_both_layouts_current_triton_version_first(tmp_path):
    sglang_dir, vllm_dir = tmp_path / "sglang", tmp_path / "vllm"
    old = write_sglang(FP8_BLOCK, CONFIGS, sglang_dir, device_name=H200, triton_version="3.4.0")
    newer = write_sglang(FP8_BLOCK, CONFIGS, sglang_dir, device_name=H200, triton_version="3.5.1")
    current = write_sglang(FP8_BLOCK, CONFIGS, sglang_dir, device_name=H200, triton_version="3.6.0")
    flat = write_vllm(FP8_BLOCK, CONFIGS, vllm_dir, device_name=H200, triton_version="3.6.0")
    # Not matches: the down-projection file, another shape, another device.
    write_sglang(FP8_BLOCK, CONFIGS, sglang_dir, device_name=H200, triton_version="3.6.0", down=True)
    write_sglang(BF16, CONFIGS, sglang_dir, device_name=H200, triton_version="3.6.0")
    write_vllm(FP8_BLOCK, CONFIGS, vllm_dir, device_name=H100, triton_version="3.6.0")

    found = find_tuned_config_files(FP8_BLOCK, H200, [sglang_dir, tmp_path / "missing", vllm_dir],
                                    triton_version="3.6.0")
    assert found == [current, newer, old, flat]


def test_find_tuned_config_files_finds_the_vllm_name_of_an_h200_variant(tmp_path):
    flat = write_vllm(BF16, CONFIGS, tmp_path, device_name=H200, triton_version="3.6.0")
    assert find_tuned_config_files(BF16, "NVIDIA H200 NVL", tmp_path) == [flat]
    assert find_tuned_config_files(BF16, H100, [tmp_path]) == []

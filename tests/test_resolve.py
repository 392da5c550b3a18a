"""resolve_model: model id / config.json -> ModelSpec, offline, with SGLang's per-architecture rules."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest

from moe_opt.cli import main
from moe_opt.errors import SpecError
from moe_opt.model import catalogue
from moe_opt.model.parity import models_doc, parity_table
from moe_opt.model.resolve import resolve_model, spec_from_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test may reach the network: the Hub is offline and its cache is an empty directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def write_config(directory: Path, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


def bundled(model_id: str) -> dict:
    config = catalogue.lookup(model_id)[1]
    return {k: v for k, v in config.items() if not k.startswith("_")}


# --- bundled models resolve offline with the right shapes ---

@pytest.mark.parametrize("model", catalogue.model_ids())
def test_every_bundled_model_resolves_offline_and_names_its_source(model):
    spec = resolve_model(model)
    assert spec.model == model and spec.architecture
    assert spec.E >= spec.topk >= 1 and spec.num_moe_layers
    assert catalogue.lookup(model)[1]["_source"].strip()


@pytest.mark.parametrize("model, tp, E, N, K, topk, dtype, block, limit", [
    ("deepseek-ai/DeepSeek-V3", 8, 257, 256, 7168, 9, "fp8_w8a8", (128, 128), None),
    ("deepseek-ai/DeepSeek-R1-0528", 8, 257, 256, 7168, 9, "fp8_w8a8", (128, 128), None),
    ("deepseek-ai/DeepSeek-V3.2-Exp", 4, 257, 512, 7168, 9, "fp8_w8a8", (128, 128), None),
    ("deepseek-ai/DeepSeek-V2", 8, 160, 192, 5120, 6, None, None, None),
    ("DeepSeek-V2-Lite-Chat", 1, 64, 1408, 2048, 6, None, None, None),
    ("deepseek-ai/DeepSeek-V4-Flash", 8, 256, 256, 4096, 6, "fp8_w8a8", (128, 128), 10.0),
    ("deepseek-ai/DeepSeek-V4-Pro", 8, 384, 384, 7168, 6, "fp8_w8a8", (128, 128), 10.0),
    ("moonshotai/Kimi-K2-Instruct", 8, 385, 256, 7168, 9, "fp8_w8a8", (128, 128), None),
    ("zai-org/GLM-4.5", 8, 161, 192, 5120, 9, None, None, None),
    ("zai-org/GLM-4.5-Air", 4, 129, 352, 4096, 9, None, None, None),
    ("Qwen/Qwen2-57B-A14B-Instruct", 1, 64, 2560, 3584, 8, None, None, None),
    ("Qwen/Qwen3-30B-A3B-FP8", 1, 128, 768, 2048, 8, "fp8_w8a8", (128, 128), None),
    ("qwen3-235b-a22b", 4, 128, 384, 4096, 8, None, None, None),
    ("Qwen/Qwen3-Next-80B-A3B-Instruct", 4, 512, 128, 2048, 10, None, None, None),
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", 2, 8, 7168, 4096, 2, None, None, None),
    ("mistral-community/Mixtral-8x22B-v0.1", 8, 8, 2048, 6144, 2, None, None, None),
    ("openai/gpt-oss-120b", 1, 128, 2880, 2880, 4, None, None, 7.0),
    ("meta-llama/Llama-4-Scout-17B-16E-Instruct", 8, 16, 1024, 5120, 1, None, None, None),
    ("databricks/dbrx-instruct", 8, 16, 1344, 6144, 4, None, None, None),
    ("xai-org/grok-1", 8, 8, 4096, 6144, 2, None, None, None),
])
def test_bundled_model_shapes(model, tp, E, N, K, topk, dtype, block, limit):
    spec = resolve_model(model, tp_size=tp)
    assert (spec.E, spec.N, spec.K, spec.topk) == (E, N, K, topk)
    assert (spec.dtype, spec.block_shape, spec.swiglu_limit) == (dtype, block, limit)


@pytest.mark.parametrize("model, layers", [
    ("deepseek-ai/DeepSeek-V3", 58), ("deepseek-ai/DeepSeek-V4-Flash", 43), ("zai-org/GLM-4.5", 89),
    ("meta-llama/Llama-4-Scout-17B-16E", 48), ("meta-llama/Llama-4-Maverick-17B-128E", 24), ("openai/gpt-oss-20b", 24),
])
def test_number_of_moe_layers_skips_dense_layers(model, layers):
    assert resolve_model(model).num_moe_layers == layers


@pytest.mark.parametrize("alias, model_id", [
    ("DeepSeek-V3-0324", "deepseek-ai/DeepSeek-V3"),
    ("DEEPSEEK-AI/deepseek-v3-base", "deepseek-ai/DeepSeek-V3"),
    ("deepseek-ai/DeepSeek-V3.2", "deepseek-ai/DeepSeek-V3.2-Exp"),
    ("moonshotai/Kimi-K2-Instruct-0905", "moonshotai/Kimi-K2-Instruct"),
    ("Kimi-K2", "moonshotai/Kimi-K2-Instruct"),
    ("Qwen/Qwen3-30B-A3B-Instruct-2507-FP8", "Qwen/Qwen3-30B-A3B-FP8"),
    ("Qwen3-Next-80B-A3B", "Qwen/Qwen3-Next-80B-A3B-Instruct"),
    ("databricks/dbrx", "databricks/dbrx-instruct"),
    ("hpcai-tech/grok-1", "xai-org/grok-1"),
])
def test_lookups_accept_common_aliases(alias, model_id):
    assert catalogue.lookup(alias)[0] == model_id
    assert resolve_model(alias).model == alias


def test_another_orgs_model_of_the_same_name_is_not_taken_from_the_catalogue():
    with pytest.raises(SpecError, match="not found offline"):
        resolve_model("someone/DeepSeek-V3")


# --- file names SGLang ships (python/sglang/srt/layers/moe/fused_moe_triton/configs/) ---

@pytest.mark.parametrize("model, tp, dtype, device, file_name", [
    ("deepseek-ai/DeepSeek-V3", 8, None, "NVIDIA H200",  # triton_3_3_1/
     "E=257,N=256,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128, 128].json"),
    ("deepseek-ai/DeepSeek-V3", 16, None, "NVIDIA H100 80GB HBM3",  # triton_3_4_0/
     "E=257,N=128,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128, 128].json"),
    ("moonshotai/Kimi-K2-Instruct", 16, None, "NVIDIA H200",  # triton_3_3_1/
     "E=385,N=128,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128, 128].json"),
    ("Qwen/Qwen3-30B-A3B-FP8", 1, None, "NVIDIA H100 80GB HBM3",
     "E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128, 128].json"),
    ("Qwen/Qwen3-235B-A22B-FP8", 4, None, "NVIDIA H100 80GB HBM3",
     "E=128,N=384,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128, 128].json"),
    ("Qwen/Qwen3-235B-A22B", 8, None, "NVIDIA A800-SXM4-80GB",  # triton_3_2_0/
     "E=128,N=192,device_name=NVIDIA_A800-SXM4-80GB.json"),
    ("Qwen/Qwen3-Next-80B-A3B-Instruct", 4, None, "NVIDIA H100 80GB HBM3",  # triton_3_4_0/
     "E=512,N=128,device_name=NVIDIA_H100_80GB_HBM3.json"),
    ("mistralai/Mixtral-8x7B-v0.1", 2, None, "NVIDIA H100 80GB HBM3",  # triton_3_3_1/
     "E=8,N=7168,device_name=NVIDIA_H100_80GB_HBM3.json"),
    ("zai-org/GLM-4.5", 8, "fp8_w8a8", "NVIDIA H200",  # triton_3_4_0/, from GLM-4.5-FP8 (per-channel FP8)
     "E=161,N=192,device_name=NVIDIA_H200,dtype=fp8_w8a8.json"),
])
def test_config_file_names_match_ones_sglang_ships(model, tp, dtype, device, file_name):
    assert resolve_model(model, tp_size=tp, dtype=dtype).config_file_name(device) == file_name


def test_models_doc_is_the_generated_parity_table():
    assert DOC.read_text() == models_doc(), "regenerate with: python -m moe_opt.model.parity > docs/models.md"


def test_parity_table_covers_every_bundled_model_at_tp_1_2_4_8():
    rows = parity_table()
    assert {(r.model, r.tp_size) for r in rows} == {(m, tp) for m in catalogue.model_ids() for tp in (1, 2, 4, 8)}
    assert all((r.config_file is None) == bool(r.skipped) for r in rows)


# --- local directories and config.json paths ---

def test_local_directory_and_config_path_resolve(tmp_path):
    path = write_config(tmp_path / "my-mixtral", bundled("mistralai/Mixtral-8x7B-v0.1"))
    by_dir = resolve_model(tmp_path / "my-mixtral", tp_size=2)
    by_file = resolve_model(str(path), tp_size=2)
    assert (by_dir.E, by_dir.N) == (by_file.E, by_file.N) == (8, 7168)
    assert by_file.model == str(path)


def test_local_config_wins_over_the_catalogue(tmp_path):
    config = bundled("deepseek-ai/DeepSeek-V3") | {"n_routed_experts": 128}
    write_config(tmp_path / "DeepSeek-V3", config)
    assert resolve_model(tmp_path / "DeepSeek-V3").E == 129


def test_hub_config_in_the_local_cache_resolves_offline(tmp_path):
    snapshot = tmp_path / "hub-cache" / "models--acme--tiny-moe" / "snapshots" / ("0" * 40)
    write_config(snapshot, {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 256, "num_experts": 16,
                            "num_experts_per_tok": 4, "moe_intermediate_size": 128, "num_hidden_layers": 2})
    (tmp_path / "hub-cache" / "models--acme--tiny-moe" / "refs").mkdir()
    (tmp_path / "hub-cache" / "models--acme--tiny-moe" / "refs" / "main").write_text("0" * 40)
    spec = resolve_model("acme/tiny-moe", tp_size=2)
    assert (spec.E, spec.N, spec.topk, spec.num_moe_layers) == (16, 64, 4, 2)


# --- quantization, dtype overrides, swiglu_limit, activation, fusion ---

@pytest.mark.parametrize("model, dtype, expected", [
    ("deepseek-ai/DeepSeek-V3", "bf16", (None, None, "bfloat16")),
    ("deepseek-ai/DeepSeek-V3", "fp16", (None, None, "float16")),
    ("deepseek-ai/DeepSeek-V2-Lite", "fp8_w8a8", ("fp8_w8a8", (128, 128), "bfloat16")),
    ("mistralai/Mixtral-8x7B-v0.1", "FP8_W8A8", ("fp8_w8a8", None, "bfloat16")),
    ("Qwen/Qwen3-30B-A3B-FP8", "bfloat16", (None, None, "bfloat16")),
])
def test_dtype_argument_overrides_the_checkpoint(model, dtype, expected):
    spec = resolve_model(model, dtype=dtype)
    assert (spec.dtype, spec.block_shape, spec.torch_dtype) == expected


def test_unquantized_config_takes_its_activation_dtype(tmp_path):
    config = bundled("mistralai/Mixtral-8x7B-v0.1") | {"torch_dtype": "float16"}
    spec = resolve_model(write_config(tmp_path, config))
    assert (spec.dtype, spec.torch_dtype, spec.checkpoint_expert_dtype) == (None, "float16", "fp16")


def test_per_tensor_fp8_checkpoint_has_no_block_shape(tmp_path):
    config = bundled("xai-org/grok-1") | {"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}}
    spec = resolve_model(write_config(tmp_path, config), tp_size=8)
    # a name SGLang ships (fused_moe_triton/configs/), e.g. for per-tensor FP8 Grok-1 such as amd/grok-1-FP8-KV
    expected = "E=8,N=4096,device_name=AMD_Instinct_MI300X,dtype=fp8_w8a8.json"
    assert (spec.dtype, spec.block_shape, spec.config_file_name("AMD Instinct MI300X")) == ("fp8_w8a8", None, expected)


def test_unsupported_checkpoint_quantization_needs_an_explicit_dtype(tmp_path):
    int2 = {"quant_method": "compressed-tensors",
            "config_groups": {"group_0": {"weights": {"num_bits": 2, "type": "int", "group_size": 32}}}}
    path = write_config(tmp_path, bundled("moonshotai/Kimi-K2-Instruct") | {"quantization_config": int2})
    with pytest.raises(SpecError, match="quantization compressed-tensors int2 group is not supported; supported: "
                                        ".*or pass dtype= one of auto, fp8_w8a8"):
        resolve_model(path)
    spec = resolve_model(path, tp_size=8, dtype="bf16")
    assert (spec.E, spec.N, spec.dtype, spec.checkpoint_expert_dtype) == (385, 256, None, "int2")


def test_deepseek_v4_tunes_its_fp4_experts_as_block_fp8_with_swiglu_limit():
    spec = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    assert (spec.checkpoint_expert_dtype, spec.dtype, spec.block_shape) == ("fp4", "fp8_w8a8", (128, 128))
    assert spec.swiglu_limit == 10.0 and spec.num_fused_shared_experts == 0


def test_deepseek_v4_without_swiglu_limit_falls_back_to_10_and_an_override_wins(tmp_path):
    config = bundled("deepseek-ai/DeepSeek-V4-Flash")
    del config["swiglu_limit"]
    path = write_config(tmp_path, config)
    assert resolve_model(path).swiglu_limit == 10.0
    assert resolve_model(path, swiglu_limit=7.5).swiglu_limit == 7.5
    assert resolve_model("deepseek-ai/DeepSeek-V4-Pro", swiglu_limit=6).swiglu_limit == 6.0


def test_gpt_oss_records_its_clamped_activation_and_mxfp4_experts():
    spec = resolve_model("openai/gpt-oss-20b")
    assert (spec.activation, spec.dtype, spec.checkpoint_expert_dtype) == ("swigluoai", None, "mxfp4")
    assert (spec.E, spec.topk, spec.swiglu_limit) == (32, 4, 7.0)


@pytest.mark.parametrize("model, fused, unfused", [
    ("deepseek-ai/DeepSeek-V3", (257, 9), (256, 8)),
    ("zai-org/GLM-4.6", (161, 9), (160, 8)),
    ("deepseek-ai/DeepSeek-V2", (160, 6), (160, 6)),  # SGLang does not fuse V2's two shared experts
    ("deepseek-ai/DeepSeek-V4-Flash", (256, 6), (256, 6)),  # SGLang turns fusion off for V4
    ("meta-llama/Llama-4-Scout-17B-16E", (16, 1), (16, 1)),
])
def test_shared_expert_fusion_follows_sglang_and_can_be_turned_off(model, fused, unfused):
    on, off = resolve_model(model), resolve_model(model, fuse_shared_experts=False)
    assert ((on.E, on.topk), (off.E, off.topk)) == (fused, unfused)
    assert off.num_fused_shared_experts == 0


def test_expert_parallel_splits_experts_and_keeps_the_fused_shared_expert():
    spec = resolve_model("deepseek-ai/DeepSeek-V3", tp_size=8, ep_size=8)
    assert (spec.E, spec.N) == (33, 2048)


# --- bad input: one-line SpecError naming what is wrong and what is accepted ---

@pytest.mark.parametrize("kwargs, message", [
    ({"tp_size": 3}, "not divisible by tp_size/ep_size = 3"),
    ({"tp_size": 8, "ep_size": 3}, "256 experts are not divisible by ep_size 3"),
    ({"tp_size": 4, "ep_size": 8}, "must be a multiple of ep_size"),
    ({"tp_size": 0}, "tp_size must be a positive integer"),
    ({"dtype": "int4"}, ("unknown dtype 'int4'; accepted: auto, fp8_w8a8, int8_w8a8, int8_w8a16, int4_w4a16, "
                         "bf16/bfloat16, fp16/float16")),
])
def test_bad_parallel_split_or_dtype(kwargs, message):
    with pytest.raises(SpecError, match=message) as info:
        resolve_model("deepseek-ai/DeepSeek-V3", **kwargs)
    assert "\n" not in str(info.value)


def test_unknown_model_offline_says_how_to_proceed():
    with pytest.raises(SpecError) as info:
        resolve_model("acme/NoSuchModel-1T")
    assert str(info.value) == ("model acme/NoSuchModel-1T not found offline: give a local config.json path or explicit "
                               "shapes with ModelSpec.from_shape(num_experts=..., topk=..., hidden_size=..., "
                               "intermediate_size=...)")


def test_unknown_architecture_lists_the_supported_ones_and_from_shape(tmp_path):
    config = {"architectures": ["FooMoeForCausalLM"], "num_experts": 8, "hidden_size": 64}
    with pytest.raises(SpecError, match="unsupported architecture FooMoeForCausalLM; supported: .*MixtralForCausalLM"
                                        ".*ModelSpec.from_shape"):
        resolve_model(write_config(tmp_path, config))


def test_dense_model_is_refused_as_not_moe(tmp_path):
    llama3 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 14336, "num_hidden_layers": 32, "torch_dtype": "bfloat16"}
    with pytest.raises(SpecError, match="LlamaForCausalLM is not a mixture-of-experts model"):
        resolve_model(write_config(tmp_path, llama3))


def test_missing_field_is_named(tmp_path):
    config = bundled("Qwen/Qwen3-30B-A3B")
    del config["moe_intermediate_size"]
    with pytest.raises(SpecError, match="missing 'moe_intermediate_size', which Qwen3MoeForCausalLM needs"):
        resolve_model(write_config(tmp_path, config))


@pytest.mark.parametrize("text, message", [
    ('{"architectures": ["MixtralForCausalLM"],', "is not valid JSON"),
    ("[1, 2]", "holds a JSON list, not a config object"),
    ("{}", "config has no 'architectures' list"),
])
def test_malformed_config_file(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(SpecError, match=message) as info:
        resolve_model(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("model, message", [
    ("./no/such/config.json", "no such file or directory"),
    ("", "has no config.json"),  # the current directory
])
def test_missing_local_path(model, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match=message):
        resolve_model(model)


def test_spec_from_config_reads_a_dict_directly():
    spec = spec_from_config(bundled("databricks/dbrx-instruct"), tp_size=4, model="dbrx")
    assert (spec.E, spec.N, spec.K, spec.topk, spec.model) == (16, 2688, 6144, 4, "dbrx")


# --- the CLI: `moe-opt resolve` ---

def test_cli_resolve_prints_the_spec_as_json(capsys):
    assert main(["resolve", "DeepSeek-V3-0324", "--tp", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["E"], out["N"], out["topk"], out["block_shape"]) == (257, 256, 9, [128, 128])


def test_cli_resolve_table_and_options(capsys):
    assert main(["resolve", "deepseek-ai/DeepSeek-V4-Flash", "--tp", "4", "--swiglu-limit", "8",
                 "--no-shared-expert-fusion", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "swiglu_limit" in out and "8.0" in out and "\nN " in out


@pytest.mark.parametrize("argv, message", [
    (["resolve", "deepseek-ai/DeepSeek-V3", "--tp", "3"], "not divisible by tp_size/ep_size = 3"),
    (["resolve", "acme/NoSuchModel-1T"], "not found offline"),
    (["resolve", "Mixtral-8x7B", "--dtype", "int8"], "unknown dtype 'int8'"),
])
def test_cli_bad_input_exits_2_with_one_line(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("moe-opt resolve: error: ") and message in captured.err
    assert captured.err.count("\n") == 1

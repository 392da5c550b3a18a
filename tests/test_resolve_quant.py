"""Quantized weight formats: checkpoint quantization_config -> ModelSpec, dtype auto vs explicit, the names SGLang and
vLLM look up per format, operand bytes, the BLOCK_SIZE_K rule and SGLang's default configs; and config fields of the
wrong type or size, which are one-line errors naming the field and the file."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest

from moe_opt import space
from moe_opt.cli import main
from moe_opt.errors import SpecError
from moe_opt.model import catalogue
from moe_opt.model.quantization import checkpoint_format
from moe_opt.model.resolve import resolve_model
from moe_opt.model.spec import ModelSpec
from moe_opt.space import Config


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test may reach the network: the Hub is offline and its cache is an empty directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def write_config(directory: Path, config: dict | str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return path


def bundled(model_id: str, **quantization_config) -> dict:
    config = {k: v for k, v in catalogue.lookup(model_id)[1].items() if not k.startswith("_")}
    if quantization_config:
        config["quantization_config"] = quantization_config
    return config


def ct_group(weights: dict, input_activations: dict | None = None, fmt: str = "pack-quantized") -> dict:
    """A compressed-tensors quantization_config with one config group targeting Linear, as llm-compressor writes."""
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "format": fmt, "weights": weights,
                                          "input_activations": input_activations}},
            "ignore": ["lm_head", "re:.*mlp.gate$"]}


def int_weights(bits: int, strategy: str, group_size: int | None = None, symmetric: bool = True) -> dict:
    return {"num_bits": bits, "type": "int", "strategy": strategy, "group_size": group_size, "symmetric": symmetric,
            "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax"}


def fp8_weights(strategy: str, block_structure: list | None = None) -> dict:
    return {"num_bits": 8, "type": "float", "strategy": strategy, "group_size": None, "symmetric": True,
            "dynamic": False, "block_structure": block_structure, "observer": "minmax"}


TOKEN_FP8 = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
TOKEN_INT8 = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True}
GROUP_FP8 = {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128, "dynamic": True}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True, "damp_percent": 0.01,
        "true_sequential": True}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
       "modules_to_not_convert": ["gate"]}


def spec_of(tmp_path, config: dict, **kwargs) -> ModelSpec:
    return resolve_model(write_config(tmp_path / "model", config), **kwargs)


def quant_of(spec: ModelSpec) -> tuple:
    return spec.dtype, spec.block_shape, spec.per_channel_quant, spec.has_zero_point, spec.checkpoint_expert_dtype


# --- every quantization_config flavour maps to SGLang's dtype, group size, per-channel flag and zero points ---

@pytest.mark.parametrize("qc, expected", [
    # GPTQ (SGLang moe_wna16): bits 4/8, group size as block_shape [0, g], zero points when sym is false
    (GPTQ, ("int4_w4a16", (0, 128), False, False, "int4")),
    (GPTQ | {"sym": False}, ("int4_w4a16", (0, 128), False, True, "int4")),
    (GPTQ | {"bits": 8, "group_size": 64}, ("int8_w8a16", (0, 64), False, False, "int8")),
    # AWQ: config.json's bits/group_size, or AutoAWQ's quant_config.json w_bit/q_group_size
    (AWQ, ("int4_w4a16", (0, 128), False, True, "int4")),
    ({"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": False, "version": "GEMM"},
     ("int4_w4a16", (0, 64), False, False, "int4")),
    # compressed-tensors weight-only: pack-quantized int4 groups, int-quantized int8 groups or channels
    (ct_group(int_weights(4, "group", 128)), ("int4_w4a16", (0, 128), False, False, "int4")),
    (ct_group(int_weights(4, "group", 32, symmetric=False)), ("int4_w4a16", (0, 32), False, True, "int4")),
    (ct_group({"num_bits": 4, "type": "int", "group_size": 64}), ("int4_w4a16", (0, 64), False, False, "int4")),
    (ct_group(int_weights(8, "group", 128), fmt="int-quantized"), ("int8_w8a16", (0, 128), False, False, "int8")),
    (ct_group(int_weights(8, "channel"), fmt="int-quantized"), ("int8_w8a16", None, False, False, "int8")),
    # compressed-tensors w8a8: int8 per channel (per-token activations) or per block; fp8 per channel/tensor/block
    (ct_group(int_weights(8, "channel"), TOKEN_INT8, fmt="int-quantized"), ("int8_w8a8", None, True, False, "int8")),
    (ct_group(int_weights(8, "block") | {"block_structure": [128, 128]}, GROUP_FP8 | {"type": "int"},
              fmt="int-quantized"), ("int8_w8a8", (128, 128), False, False, "int8")),
    (ct_group(fp8_weights("channel"), TOKEN_FP8, fmt="float-quantized"), ("fp8_w8a8", None, True, False, "fp8")),
    (ct_group(fp8_weights("tensor"), TOKEN_FP8 | {"strategy": "tensor"}, fmt="float-quantized"),
     ("fp8_w8a8", None, False, False, "fp8")),
    (ct_group(fp8_weights("block", [128, 128]), GROUP_FP8, fmt="float-quantized"),
     ("fp8_w8a8", (128, 128), False, False, "fp8")),
    # fp8 without weight_block_size: SGLang's Fp8MoEMethod keeps one weight scale per expert (per-tensor)
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, ("fp8_w8a8", None, False, False, "fp8")),
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
     ("fp8_w8a8", (128, 128), False, False, "fp8")),
])
def test_quantization_config_flavours_map_to_sglang_formats(tmp_path, qc, expected):
    spec = spec_of(tmp_path, bundled("Qwen/Qwen3-30B-A3B", **qc))  # E=128, N=768, K=2048
    assert quant_of(spec) == expected


def test_the_first_config_group_decides_as_sglangs_tuner_reads_it():
    qc = ct_group(int_weights(4, "group", 128))
    qc["config_groups"]["group_1"] = {"targets": ["re:.*attn.*"], "weights": fp8_weights("channel"),
                                      "input_activations": TOKEN_FP8}
    assert checkpoint_format({"quantization_config": qc}, "config.json").dtype == "int4_w4a16"


def test_bundled_awq_mixtral_is_int4_groups_of_128_with_zero_points():
    spec = resolve_model("hugging-quants/Mixtral-8x7B-Instruct-v0.1-AWQ-INT4", tp_size=2)
    assert (spec.E, spec.N, spec.K, spec.topk, spec.torch_dtype) == (8, 7168, 4096, 2, "float16")
    assert quant_of(spec) == ("int4_w4a16", (0, 128), False, True, "int4")
    assert spec.group_size == 128
    # other AWQ Mixtral-Instruct repos with the same quant_config.json resolve to it
    for alias in ("TheBloke/Mixtral-8x7B-Instruct-v0.1-AWQ", "casperhansen/mixtral-instruct-awq"):
        assert resolve_model(alias, tp_size=2).replace(model=None) == spec.replace(model=None)


@pytest.mark.parametrize("tp, N, group", [(1, 2560, 128), (2, 1280, 128), (4, 640, 128), (8, 320, 64)])
def test_bundled_gptq_qwen2_moe_halves_its_group_where_sglangs_moe_wna16_does(tp, N, group):
    spec = resolve_model("shuyuej/Qwen2-57B-A14B-Instruct-GPTQ", tp_size=tp)
    assert (spec.E, spec.N, spec.K, spec.dtype, spec.group_size, spec.has_zero_point) == (
        64, N, 3584, "int4_w4a16", group, False)


def test_a_group_that_cannot_be_halved_to_fit_the_shape_is_refused(tmp_path):
    # DeepSeek-V2-Lite at TP 8: N = 1408 / 8 = 176 = 16 * 11; 128 -> 64 -> 32 do not divide it
    with pytest.raises(SpecError, match="group size 128 cannot be halved to a group size >= 32 dividing N 176") as info:
        spec_of(tmp_path, bundled("deepseek-ai/DeepSeek-V2-Lite", **GPTQ), tp_size=8)
    assert "\n" not in str(info.value)


def test_compressed_tensors_groups_are_not_halved_and_must_divide(tmp_path):
    config = bundled("deepseek-ai/DeepSeek-V2-Lite", **ct_group(int_weights(4, "group", 128)))
    with pytest.raises(SpecError, match="group size 128 must divide hidden_size 2048 and N 176"):
        spec_of(tmp_path, config, tp_size=8)


# --- dtype "auto" (the default, also None) reads the checkpoint; an explicit dtype overrides it ---

def test_dtype_auto_none_and_the_default_agree():
    model = "hugging-quants/Mixtral-8x7B-Instruct-v0.1-AWQ-INT4"
    assert resolve_model(model) == resolve_model(model, dtype="auto") == resolve_model(model, dtype=None)
    assert resolve_model(model, dtype="AUTO").dtype == "int4_w4a16"


@pytest.mark.parametrize("model, dtype, expected", [
    # unquantized overrides drop the checkpoint's format
    ("hugging-quants/Mixtral-8x7B-Instruct-v0.1-AWQ-INT4", "bf16", (None, None, False, False, "int4")),
    # a w*a16 override keeps the checkpoint's groups and zero points
    ("hugging-quants/Mixtral-8x7B-Instruct-v0.1-AWQ-INT4", "int8_w8a16", ("int8_w8a16", (0, 128), False, True, "int4")),
    # int4 on a checkpoint without groups: group 128; int8_w8a16 without groups: one scale per channel
    ("mistralai/Mixtral-8x7B-v0.1", "int4_w4a16", ("int4_w4a16", (0, 128), False, False, "bf16")),
    ("mistralai/Mixtral-8x7B-v0.1", "int8_w8a16", ("int8_w8a16", None, False, False, "bf16")),
    # int8_w8a8: per channel, or the checkpoint's (or DeepSeek's) block
    ("mistralai/Mixtral-8x7B-v0.1", "int8_w8a8", ("int8_w8a8", None, True, False, "bf16")),
    ("deepseek-ai/DeepSeek-V3", "int8_w8a8", ("int8_w8a8", (128, 128), False, False, "fp8")),
    ("deepseek-ai/DeepSeek-V2-Lite", "int8_w8a8", ("int8_w8a8", (128, 128), False, False, "bf16")),
    # fp8 on a group-quantized checkpoint: per-tensor (Mixtral) as before
    ("hugging-quants/Mixtral-8x7B-Instruct-v0.1-AWQ-INT4", "fp8_w8a8", ("fp8_w8a8", None, False, False, "int4")),
])
def test_explicit_dtype_overrides_the_checkpoint(model, dtype, expected):
    assert quant_of(resolve_model(model, dtype=dtype)) == expected


def test_explicit_w8a8_keeps_a_per_channel_checkpoint_per_channel(tmp_path):
    config = bundled("zai-org/GLM-4.5", **ct_group(fp8_weights("channel"), TOKEN_FP8, fmt="float-quantized"))
    assert quant_of(spec_of(tmp_path, config, dtype="fp8_w8a8"))[:3] == ("fp8_w8a8", None, True)
    assert quant_of(spec_of(tmp_path, config, dtype="int8_w8a8"))[:3] == ("int8_w8a8", None, True)


# --- schemes moe-opt cannot tune: one line, naming the scheme and what is supported ---

NVFP4 = ct_group({"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
                  "dynamic": False, "observer": "memoryless_minmax"},
                 {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "dynamic": "local"},
                 fmt="nvfp4-pack-quantized")  # RedHatAI/GLM-4.6-NVFP4's config group


@pytest.mark.parametrize("qc, scheme", [
    (NVFP4, "compressed-tensors nvfp4"),
    (ct_group({"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32}, fmt="mxfp4-pack-quantized"),
     "compressed-tensors mxfp4"),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "'modelopt'"),
    # TheBloke's 3-bit Mixtral GPTQ branch; orion-penner/Mixtral-8x7B-Instruct-v0.1-GPTQ (act-order, per channel)
    (GPTQ | {"bits": 3}, "gptq int3"),
    ({"quant_method": "gptq", "bits": 4, "damp_percent": 0.1, "dataset": "wikitext2", "desc_act": True,
      "group_size": -1, "sym": True}, "gptq int4 with desc_act"),
    (GPTQ | {"group_size": -1}, "gptq int4 per channel"),
    (AWQ | {"bits": 8}, "awq int8"),
    (ct_group(int_weights(2, "group", 128)), "compressed-tensors int2 group"),
    (ct_group(int_weights(4, "channel")), "compressed-tensors int4 channel"),
    (ct_group(int_weights(4, "group", 128), TOKEN_INT8), "compressed-tensors int4 group with int8 activations"),
    (ct_group(int_weights(8, "tensor"), TOKEN_INT8 | {"strategy": "tensor"}), "compressed-tensors int8 tensor"),
    (ct_group(fp8_weights("channel")), "compressed-tensors fp8 channel weight-only"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "'bitsandbytes'"),
])
def test_unsupported_schemes_are_one_line_errors_naming_what_is_supported(tmp_path, qc, scheme):
    config = bundled("Qwen/Qwen3-30B-A3B", **qc)
    with pytest.raises(SpecError) as info:
        spec_of(tmp_path, config)
    message = str(info.value)
    assert f"checkpoint quantization {scheme}" in message and "is not supported; supported: fp8 (block" in message
    assert "or pass dtype= one of auto, fp8_w8a8, int8_w8a8, int8_w8a16, int4_w4a16" in message
    assert "\n" not in message
    assert spec_of(tmp_path, config, dtype="bf16").dtype is None  # an explicit dtype still tunes it


def test_gpt_oss_mxfp4_keeps_resolving_as_its_unquantized_shape():
    spec = resolve_model("openai/gpt-oss-120b")
    assert (spec.dtype, spec.checkpoint_expert_dtype) == (None, "mxfp4")


# --- wrong-typed or absurd config fields: a one-line SpecError naming the field, the file and what is accepted ---

class RawJson(str):
    pass


@pytest.mark.parametrize("model, changes, field, accepted", [
    ("deepseek-ai/DeepSeek-V4-Flash", {"swiglu_limit": "abc"}, "swiglu_limit", "a positive finite number"),
    ("deepseek-ai/DeepSeek-V4-Flash", {"swiglu_limit": [1, 2]}, "swiglu_limit", "a positive finite number"),
    ("deepseek-ai/DeepSeek-V4-Flash", {"swiglu_limit": RawJson("1e999")}, "swiglu_limit", "a positive finite number"),
    ("deepseek-ai/DeepSeek-V4-Flash", {"swiglu_limit": RawJson("Infinity")}, "swiglu_limit", "a positive finite"),
    ("deepseek-ai/DeepSeek-V4-Flash", {"swiglu_limit": -1}, "swiglu_limit", "a positive finite number"),
    ("deepseek-ai/DeepSeek-V3", {"n_shared_experts": "one"}, "n_shared_experts", "an integer from 0 to"),
    ("mistralai/Mixtral-8x7B-v0.1", {"hidden_size": "4096"}, "hidden_size", "an integer from 1 to 65536"),
    ("mistralai/Mixtral-8x7B-v0.1", {"hidden_size": 10**9}, "hidden_size", "an integer from 1 to 65536"),
    ("mistralai/Mixtral-8x7B-v0.1", {"intermediate_size": 10**9}, "intermediate_size", "an integer from 1 to"),
    ("mistralai/Mixtral-8x7B-v0.1", {"num_local_experts": 10**6}, "num_local_experts", "an integer from 1 to 16384"),
    ("mistralai/Mixtral-8x7B-v0.1", {"num_experts_per_tok": 2.0}, "num_experts_per_tok", "an integer from 1"),
    ("mistralai/Mixtral-8x7B-v0.1", {"num_hidden_layers": "32"}, "num_hidden_layers", "an integer from 1"),
    ("Qwen/Qwen3-30B-A3B", {"decoder_sparse_step": "1"}, "decoder_sparse_step", "an integer from 1"),
    ("Qwen/Qwen3-30B-A3B", {"mlp_only_layers": 3}, "mlp_only_layers", "a list of layer indices"),
    ("deepseek-ai/DeepSeek-V3", {"first_k_dense_replace": [3]}, "first_k_dense_replace", "an integer from 0"),
    ("deepseek-ai/DeepSeek-V4-Flash", {"expert_dtype": 4}, "expert_dtype", "a string"),
    ("Qwen/Qwen3-30B-A3B", {"quantization_config": GPTQ | {"bits": "4"}}, "quantization_config.bits", "an integer"),
    ("Qwen/Qwen3-30B-A3B", {"quantization_config": AWQ | {"zero_point": "yes"}}, "quantization_config.zero_point",
     "true or false"),
    ("Qwen/Qwen3-30B-A3B", {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}},
     "quantization_config.weight_block_size", "two positive integers"),
    ("Qwen/Qwen3-30B-A3B", {"quantization_config": {"quant_method": "compressed-tensors", "config_groups": []}},
     "quantization_config.config_groups", "an object of config groups"),
    ("Qwen/Qwen3-30B-A3B", {"quantization_config": ct_group(int_weights(4, "group", "128"))},
     "quantization_config.config_groups.group_0.weights.group_size", "an integer"),
])
def test_wrong_typed_or_absurd_fields_are_one_line_errors(tmp_path, model, changes, field, accepted):
    config = bundled(model)
    text = json.dumps(config | {k: v for k, v in changes.items() if not isinstance(v, RawJson)})
    for key, value in changes.items():
        if isinstance(value, RawJson):  # JSON number literals Python would not write: 1e999, Infinity
            text = text[:-1] + f', "{key}": {value}}}'
    path = write_config(tmp_path / "model", text)
    with pytest.raises(SpecError) as info:
        resolve_model(path)
    message = str(info.value)
    assert "\n" not in message
    assert repr(field.split(".")[-1]) in message or field in message
    assert str(path) in message and accepted in message


def test_the_cli_prints_a_wrong_typed_field_as_one_line_not_a_traceback(tmp_path, capsys):
    path = write_config(tmp_path / "model", bundled("deepseek-ai/DeepSeek-V4-Flash") | {"swiglu_limit": "abc"})
    assert main(["resolve", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config field 'swiglu_limit'" in err and str(path) in err


@pytest.mark.parametrize("kwargs, message", [
    ({"swiglu_limit": "abc"}, "swiglu_limit must be a positive finite number or None, got 'abc'"),
    ({"swiglu_limit": float("inf")}, "swiglu_limit must be a positive finite number"),
    ({"swiglu_limit": True}, "swiglu_limit must be a positive finite number"),
    ({"hidden_size": 10**9}, "hidden_size must be an integer from 1 to 65536, got 1000000000"),
    ({"num_experts": 10**6}, "num_experts must be an integer from 1 to 16384"),
])
def test_from_shape_refuses_wrong_types_and_absurd_sizes(kwargs, message):
    shape = dict(num_experts=8, topk=2, hidden_size=4096, intermediate_size=14336) | kwargs
    with pytest.raises(SpecError, match=message):
        ModelSpec.from_shape(**shape)


def test_an_override_swiglu_limit_is_checked_too():
    with pytest.raises(SpecError, match="swiglu_limit must be a positive finite number or None, got nan"):
        resolve_model("deepseek-ai/DeepSeek-V4-Flash", swiglu_limit=float("nan"))


# --- ModelSpec accepts the combinations SGLang's kernel runs, and says what is accepted otherwise ---

def shape(**kwargs) -> ModelSpec:
    return ModelSpec.from_shape(**(dict(num_experts=8, topk=2, hidden_size=4096, intermediate_size=14336) | kwargs))


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "int8_w8a8"}, "int8_w8a8 needs per_channel_quant=True or a block_shape"),
    ({"dtype": "int4_w4a16"}, "int4_w4a16 needs a group size: block_shape \\[0, group_size\\]"),
    ({"dtype": "int4_w4a16", "block_shape": [128, 128]}, "int4_w4a16 takes block_shape \\[0, group_size\\]"),
    ({"dtype": "int4_w4a16", "group_size": 48}, "group size 48 must be a multiple of 32"),
    ({"dtype": "int4_w4a16", "group_size": 96, "tp_size": 1}, "group size 96 must divide hidden_size 4096"),
    ({"dtype": "int8_w8a16", "per_channel_quant": True}, "per_channel_quant is for fp8_w8a8/int8_w8a8"),
    ({"dtype": "int8_w8a16", "has_zero_point": True}, "has_zero_point needs a group size"),
    ({"dtype": "fp8_w8a8", "has_zero_point": True}, "has_zero_point is for group-quantized"),
    ({"dtype": "fp8_w8a8", "block_shape": [0, 128]}, "block_shape must be two positive integers"),
    ({"dtype": "fp8_w8a8", "block_shape": [128, 128], "per_channel_quant": True}, "exclude each other"),
    ({"per_channel_quant": True}, "per_channel_quant needs a quantized dtype"),
    ({"block_shape": [128, 128]}, "block_shape needs a quantized dtype"),
    ({"dtype": "int4_w4a16", "group_size": 128, "block_shape": [0, 128]}, "give group_size or block_shape"),
    ({"dtype": "fp8_w8a8", "per_channel_quant": 1}, "per_channel_quant must be True or False"),
    ({"dtype": "int4"}, "unsupported dtype 'int4'; accepted: None .* fp8_w8a8, int8_w8a8, int8_w8a16, int4_w4a16"),
])
def test_spec_refuses_combinations_the_kernel_does_not_run(kwargs, message):
    with pytest.raises(SpecError, match=message) as info:
        shape(**kwargs)
    assert "\n" not in str(info.value)


def test_group_size_and_zero_points_round_trip_through_the_spec_dict():
    spec = shape(dtype="int4_w4a16", group_size=64, has_zero_point=True, tp_size=2)
    assert (spec.block_shape, spec.group_size, spec.N) == ((0, 64), 64, 7168)
    assert ModelSpec.from_dict(json.loads(spec.to_json())) == spec
    assert str(spec) == "E=8 N=7168 K=4096 topk=2 int4_w4a16 group64 zero-point"
    assert shape(dtype="fp8_w8a8", block_shape=[128, 128]).group_size is None
    assert str(shape(dtype="int8_w8a8", per_channel_quant=True)) == "E=8 N=14336 K=4096 topk=2 int8_w8a8 per-channel"


# --- config file names per format, for both engines (names the engines ship, where one was found) ---

@pytest.mark.parametrize("kwargs, device, sglang, vllm", [
    # SGLang ships E=161,N=192,...,per_channel_quant=True (triton_3_4_0, triton_3_5_1): GLM-4.5-FP8 per channel at TP 8
    (dict(num_experts=161, topk=9, hidden_size=5120, intermediate_size=1536, tp_size=8, dtype="fp8_w8a8",
          per_channel_quant=True), "NVIDIA H200",
     "E=161,N=192,device_name=NVIDIA_H200,dtype=fp8_w8a8,per_channel_quant=True.json",
     "E=161,N=192,device_name=NVIDIA_H200,dtype=fp8_w8a8.json"),
    # SGLang ships E=16,N=7168,device_name=NVIDIA_H100_80GB_HBM3,dtype=int8_w8a16.json (triton_3_1_0), per channel
    (dict(num_experts=16, topk=2, hidden_size=6144, intermediate_size=14336, tp_size=2, dtype="int8_w8a16"),
     "NVIDIA H100 80GB HBM3", "E=16,N=7168,device_name=NVIDIA_H100_80GB_HBM3,dtype=int8_w8a16.json",
     "E=16,N=7168,device_name=NVIDIA_H100_80GB_HBM3,dtype=int8_w8a16.json"),
    # vLLM ships E=1,N=14336,device_name=NVIDIA_A100-SXM4-80GB,dtype=int8_w8a16.json
    (dict(num_experts=1, topk=1, hidden_size=4096, intermediate_size=14336, dtype="int8_w8a16"),
     "NVIDIA A100-SXM4-80GB", "E=1,N=14336,device_name=NVIDIA_A100-SXM4-80GB,dtype=int8_w8a16.json",
     "E=1,N=14336,device_name=NVIDIA_A100-SXM4-80GB,dtype=int8_w8a16.json"),
    # SGLang ships E=384,N=128,device_name=,dtype=int4_w4a16.json (triton_3_4_0; Kimi-K2 int4 group 32 at TP 16, its
    # device name came out empty): the group size never shows in the name
    (dict(num_experts=384, topk=8, hidden_size=7168, intermediate_size=2048, tp_size=16, dtype="int4_w4a16",
          group_size=32), "", "E=384,N=128,device_name=,dtype=int4_w4a16.json",
     "E=384,N=128,device_name=,dtype=int4_w4a16.json"),
    # vLLM ships E=128,N=1536,device_name=AMD_Instinct_MI308X,dtype=int4_w4a16.json (Qwen3-235B-A22B int4, TP 1)
    (dict(num_experts=128, topk=8, hidden_size=4096, intermediate_size=1536, dtype="int4_w4a16", group_size=128,
          has_zero_point=True), "AMD Instinct MI308X",
     "E=128,N=1536,device_name=AMD_Instinct_MI308X,dtype=int4_w4a16.json",
     "E=128,N=1536,device_name=AMD_Instinct_MI308X,dtype=int4_w4a16.json"),
    # int8_w8a8 per channel: SGLang appends per_channel_quant=True (its int8 MoE passes per_channel_quant=True; the
    # A800 files it ships, E=129,N=352,...,dtype=int8_w8a8.json, were tuned without --per-channel-quant); vLLM's
    # _get_config_dtype_str has no int8_w8a8, so vLLM looks the unquantized name up
    (dict(num_experts=129, topk=9, hidden_size=4096, intermediate_size=1408, tp_size=4, dtype="int8_w8a8",
          per_channel_quant=True), "NVIDIA A800-SXM4-80GB",
     "E=129,N=352,device_name=NVIDIA_A800-SXM4-80GB,dtype=int8_w8a8,per_channel_quant=True.json",
     "E=129,N=352,device_name=NVIDIA_A800-SXM4-80GB.json"),
    # int8_w8a8 block: vLLM ships E=128,N=384,device_name=NVIDIA_H100_PCIe,block_shape=[128,128].json (no dtype)
    (dict(num_experts=128, topk=8, hidden_size=4096, intermediate_size=1536, tp_size=4, dtype="int8_w8a8",
          block_shape=[128, 128]), "NVIDIA H100 PCIe",
     "E=128,N=384,device_name=NVIDIA_H100_PCIe,dtype=int8_w8a8,block_shape=[128, 128].json",
     "E=128,N=384,device_name=NVIDIA_H100_PCIe,block_shape=[128,128].json"),
])
def test_config_file_names_per_format_for_both_engines(kwargs, device, sglang, vllm):
    spec = ModelSpec.from_shape(**kwargs)
    assert spec.config_file_name(device) == sglang
    assert spec.config_file_name(device, engine="vllm") == vllm


def test_a_gptq_qwen3_moe_names_the_file_vllm_ships_for_qwen3_30b_a3b_gptq_int4(tmp_path):
    # vLLM PR #57558 ships E=128,N=768,device_name=Intel(R)_Arc(TM)_Pro_B60_Graphics,dtype=int4_w4a16.json for
    # Qwen/Qwen3-30B-A3B-GPTQ-Int4 at TP 1 (group_size 128, fp16 activations)
    spec = spec_of(tmp_path, bundled("Qwen/Qwen3-30B-A3B", **GPTQ) | {"torch_dtype": "float16"})
    assert spec.config_file_name("Intel(R) Arc(TM) Pro B60 Graphics", engine="vllm") == (
        "E=128,N=768,device_name=Intel(R)_Arc(TM)_Pro_B60_Graphics,dtype=int4_w4a16.json")
    # SGLang ships E=128,N=192,device_name=K100_AI,dtype=int4_w4a16_down.json (triton_3_5_1): the same model at TP 4
    spec4 = spec_of(tmp_path, bundled("Qwen/Qwen3-30B-A3B", **GPTQ), tp_size=4)
    assert spec4.config_file_name("K100_AI", down=True) == "E=128,N=192,device_name=K100_AI,dtype=int4_w4a16_down.json"


# --- operand bytes, the BLOCK_SIZE_K rule and the candidates ---

def test_operand_bytes_per_format():
    assert space.operand_bytes(None) == (2, 2)
    assert space.operand_bytes("fp8_w8a8") == space.operand_bytes("int8_w8a8") == (1, 1)
    assert space.operand_bytes("int8_w8a16") == (2, 1)
    assert space.operand_bytes("int4_w4a16") == (2, 0.5)
    with pytest.raises(ValueError, match="unknown quantization dtype 'bfloat16'; accepted: None, fp8_w8a8"):
        space.operand_bytes("bfloat16")


def test_int4_tiles_take_half_a_byte_per_weight_in_the_shared_memory_estimate():
    c = Config(64, 128, 128, 1, 4, 4)
    a, b = space.operand_bytes("int4_w4a16")
    assert space.shared_memory_bytes(c, a, b) == 4 * (64 * 128 * 2 + 128 * 128 * 0.5)


@pytest.mark.parametrize("dtype, block_shape, ks", [
    (None, None, (64, 128, 256)),
    ("fp8_w8a8", None, (64, 128, 256)),
    ("fp8_w8a8", [128, 128], (64, 128)),
    ("int8_w8a8", [128, 128], (64, 128)),
    ("int8_w8a16", None, (64, 128, 256)),      # per channel: no group to respect
    ("int8_w8a16", [0, 128], (32, 64, 128)),
    ("int4_w4a16", [0, 128], (32, 64, 128)),
    ("int4_w4a16", [0, 64], (32, 64)),
    ("int4_w4a16", [0, 32], (32,)),            # SGLang's own grid (64, 128, 256) would leave nothing
])
def test_block_size_k_divides_the_block_or_group_size(dtype, block_shape, ks):
    assert space.block_size_k_choices(dtype, block_shape) == ks


def test_candidates_follow_the_group_rule_and_the_smaller_int4_operand():
    spec = shape(dtype="int4_w4a16", group_size=64, tp_size=2)
    cands = space.candidates_for(spec)
    assert cands == space.candidates("int4_w4a16", (0, 64))
    assert {c.BLOCK_SIZE_K for c in cands} == {32, 64}
    assert set(cands) <= set(space.grid_for(spec))
    assert space.choices_for(spec)["BLOCK_SIZE_K"] == (32, 64)
    # the biggest tiles: bf16 B does not fit Hopper's shared memory, int4 B does
    big = Config(256, 256, 64, 1, 8, 5)
    assert big in cands and big not in space.candidates(None, None)


# --- SGLang's default config per format (get_default_config) ---

@pytest.mark.parametrize("kwargs, M, expected", [
    (dict(dtype="fp8_w8a8"), 4, Config(64, 128, 128, 1, 4, 4)),
    (dict(dtype="fp8_w8a8"), 64, Config(128, 256, 128, 32, 8, 4)),
    (dict(dtype="fp8_w8a8", per_channel_quant=True), 4, Config(64, 128, 128, 1, 4, 4)),
    (dict(dtype="fp8_w8a8", per_channel_quant=True), 64, Config(128, 256, 128, 32, 8, 4)),
    (dict(dtype="fp8_w8a8", block_shape=[128, 128]), 64, Config(64, 128, 128, 32, 4, 3)),
    # int8_w8a8, int8_w8a16 and int4_w4a16 take SGLang's unquantized defaults, block or group size regardless
    (dict(dtype="int8_w8a8", per_channel_quant=True), 4, Config(16, 32, 64, 1, 4, 3)),
    (dict(dtype="int8_w8a8", block_shape=[128, 128]), 64, Config(64, 64, 32, 8, 4, 3)),
    (dict(dtype="int8_w8a16"), 64, Config(64, 64, 32, 8, 4, 3)),
    (dict(dtype="int4_w4a16", group_size=128), 4, Config(16, 32, 64, 1, 4, 3)),
    (dict(dtype="int4_w4a16", group_size=128), 64, Config(64, 64, 32, 8, 4, 3)),
    (dict(), 64, Config(64, 64, 32, 8, 4, 3)),
])
def test_default_config_per_format_is_sglangs(kwargs, M, expected):
    spec = shape(**kwargs)
    assert space.default_config_for(spec, M) == expected
    assert space.default_config(M, spec.E, spec.dtype, spec.block_shape) == expected

"""Model id -> ModelSpec: find the model's config.json, then apply SGLang's per-architecture rules.

The rules follow SGLang's tuner, ``benchmark/kernels/fused_moe_triton/common_utils.py`` (``get_model_config``): which
config fields give E, topk and the expert intermediate size, and which architectures fuse their shared expert into the
routed ones. A config is read as a plain dict (no remote code runs), from a local path, the bundled catalogue
(:mod:`moe_opt.catalogue`) or the Hub, in that order.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import SpecError
from ..model import catalogue
from .quantization import SUPPORTED_SCHEMES, WeightFormat, checkpoint_format, fit_group_size
from .spec import (
    ACTIVATION_DTYPES,
    MAX_HIDDEN_SIZE,
    MAX_INTERMEDIATE_SIZE,
    MAX_NUM_EXPERTS,
    SUPPORTED_QUANT_DTYPES,
    ModelSpec,
)

_FROM_SHAPE = "ModelSpec.from_shape(num_experts=..., topk=..., hidden_size=..., intermediate_size=...)"

# Architecture families, grouped as SGLang's get_model_config groups them.
_DEEPSEEK = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "DeepseekV32ForCausalLM", "DeepseekV4ForCausalLM",
             "Glm4MoeForCausalLM", "Glm4MoeLiteForCausalLM", "GlmMoeDsaForCausalLM", "MistralLarge3ForCausalLM")
_QWEN = ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "Qwen3NextForCausalLM")
_MIXTRAL = ("MixtralForCausalLM",)
_LLAMA4 = ("Llama4ForConditionalGeneration",)
# hpcai-tech/grok-1 (the Hub port of xai-org/grok-1) says Grok1ModelForCausalLM and num_experts; xai-org/grok-2 says
# Grok1ForCausalLM with num_local_experts and moe_intermediate_size (SGLang's Grok1ForCausalLM branch).
_GROK = ("Grok1ForCausalLM", "Grok1ModelForCausalLM")
_DBRX = ("DbrxForCausalLM",)
_GPT_OSS = ("GptOssForCausalLM",)

# SGLang fuses the shared expert into E (and topk) only for these. DeepSeek-V2 is not listed, Llama-4's fusion was
# dropped (sgl-project/sglang#5101: no speedup), and DeepSeek-V4 turns it off at load: "DeepSeek V4 requires
# different clamping for shared and routed experts" (python/sglang/srt/models/deepseek_v4.py).
_FUSES_SHARED = ("DeepseekV3ForCausalLM", "DeepseekV32ForCausalLM", "Glm4MoeForCausalLM", "Glm4MoeLiteForCausalLM",
                 "GlmMoeDsaForCausalLM", "MistralLarge3ForCausalLM")
# DeepSeek's own FP8 checkpoints are block [128, 128]; an fp8_w8a8 override on them defaults to that block.
_FP8_BLOCK_DEFAULT = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "DeepseekV32ForCausalLM",
                      "DeepseekV4ForCausalLM")
# DeepSeek-V4's released configs carry swiglu_limit 10.0; configs that leave it out get the same clamp.
_V4_SWIGLU_LIMIT = 10.0


@dataclass(frozen=True)
class _Rule:
    """Config keys for E, topk and the per-expert intermediate size; the first key present wins."""

    experts: tuple[str, ...]
    topk: tuple[str, ...]
    intermediate: tuple[str, ...]


_RULES: dict[str, _Rule] = {
    **dict.fromkeys(_DEEPSEEK, _Rule(("n_routed_experts",), ("num_experts_per_tok",), ("moe_intermediate_size",))),
    **dict.fromkeys(_QWEN, _Rule(("num_experts",), ("num_experts_per_tok",), ("moe_intermediate_size",))),
    **dict.fromkeys(_MIXTRAL + _LLAMA4, _Rule(("num_local_experts",), ("num_experts_per_tok",),
                                              ("intermediate_size",))),
    **dict.fromkeys(_GROK, _Rule(("num_local_experts", "num_experts"), ("num_experts_per_tok",),
                                 ("moe_intermediate_size", "intermediate_size"))),
    **dict.fromkeys(_DBRX, _Rule(("moe_num_experts",), ("moe_top_k",), ("ffn_hidden_size",))),
    **dict.fromkeys(_GPT_OSS, _Rule(("num_local_experts",), ("num_experts_per_tok", "experts_per_token"),
                                    ("intermediate_size",))),
}
SUPPORTED_ARCHITECTURES = tuple(sorted(_RULES))
_EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")

# The dtype argument: "auto" (the checkpoint's), a quantization to tune, or the activation dtype of an unquantized
# tune.
_DTYPE_ARGS = {"auto": "auto", **{q: q for q in SUPPORTED_QUANT_DTYPES}, "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16"}
_DTYPE_HELP = f"auto, {', '.join(SUPPORTED_QUANT_DTYPES)}, bf16/bfloat16, fp16/float16"
# An explicit int4_w4a16 on a checkpoint without groups: 128, the usual GPTQ/AWQ/compressed-tensors W4A16 group.
_DEFAULT_GROUP_SIZE = 128
# More layers than any model has (DeepSeek-V3: 61, GLM-4.5: 92).
_MAX_LAYERS = 100_000


def load_config(model: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """The config.json of ``model`` as a dict, and where it came from.

    Looks, in order, at a local directory holding config.json or a config.json path, the bundled catalogue, and the
    Hub (config.json only, through the huggingface_hub cache; ``HF_HUB_OFFLINE=1`` keeps it off the network).

    Example:
        >>> config, source = load_config("DeepSeek-V3-0324")
        >>> config["architectures"], source
        (['DeepseekV3ForCausalLM'], 'catalogue:deepseek-ai/DeepSeek-V3')
    """
    name = os.fspath(model).strip()
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise SpecError(f"directory {path.parent} has no config.json; give a model directory, a config.json path "
                            "or a Hub id")
    if path.is_file():
        return _read_json(path), str(path)
    if name.endswith(".json") or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise SpecError(f"no such file or directory: {name}; give a model directory, a config.json path or a Hub id")
    hit = catalogue.lookup(name)
    if hit is not None:
        return hit[1], f"catalogue:{hit[0]}"
    path = _download_config(name)
    return _read_json(path), f"hub:{name}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                        "give a config.json as the Hub ships it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise SpecError(f"{path} holds a JSON {type(config).__name__}, not a config object")
    return config


def _download_config(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
    )

    # huggingface_hub reads HF_HUB_OFFLINE once, at import; honour it as it is now.
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    hint = f"give a local config.json path or explicit shapes with {_FROM_SHAPE}"
    try:
        return Path(hf_hub_download(repo_id, "config.json", local_files_only=True))  # the cache first
    except HFValidationError:
        raise SpecError(f"{repo_id!r} is not a local path, a bundled model (moe_opt.catalogue.model_ids()) or a valid "
                        f"Hub id; {hint}") from None
    except (OSError, EntryNotFoundError, ValueError):
        if offline:
            raise SpecError(f"model {repo_id} not found offline: {hint}") from None
    # hf_hub_download retries a failed connection five times with sleeps (half a minute without a network):
    # ask the Hub once first, so no network fails in seconds.
    try:
        _probe_hub(repo_id)
        return Path(hf_hub_download(repo_id, "config.json"))
    except HfHubHTTPError as exc:  # no such repo or file, gated, or a server error
        raise SpecError(f"model {repo_id} not found on the Hub ({str(exc).splitlines()[0]}): {hint}") from None
    except (OSError, EntryNotFoundError):
        raise SpecError(f"model {repo_id} not found offline: {hint}") from None
    except Exception as exc:  # the HTTP client's connection errors: no network, DNS, proxy, timeout
        raise SpecError(f"model {repo_id} not found offline (cannot reach the Hub: {type(exc).__name__}): "
                        f"{hint}") from None


def _probe_hub(repo_id: str) -> None:
    """One metadata request for config.json, without retries; raises what hf_hub_download would."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), retry_on_errors=False, timeout=10)
    except TypeError:  # huggingface_hub before retry_on_errors: its download fails as fast
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=10)


def resolve_model(model: str | os.PathLike[str], tp_size: int = 1, ep_size: int = 1, dtype: str | None = "auto", *,
                  swiglu_limit: float | None = None, fuse_shared_experts: bool = True,
                  torch_dtype: str | None = None) -> ModelSpec:
    """The MoE layer spec of a model, per rank, as SGLang's tuner would build it.

    Args:
        model: a Hub id (bundled ones resolve offline), a model directory or a config.json path.
        tp_size, ep_size: tensor / expert parallel sizes. E is split ep_size ways, the intermediate size
            tp_size // ep_size ways.
        dtype: what to tune. "auto" (or None): what the checkpoint's quantization_config says (fp8 block, per-channel
            or per-tensor; int8 w8a8; GPTQ/AWQ/compressed-tensors int4 and int8 weight-only with their group size and
            zero points; DeepSeek-V4's FP4 experts as fp8_w8a8 block [128, 128], as served on Hopper). Or one of
            SGLang's tuner formats, "fp8_w8a8", "int8_w8a8", "int8_w8a16", "int4_w4a16" (keeping the checkpoint's
            block, group size and per-channel scales where it has them of that kind), or "bf16"/"bfloat16",
            "fp16"/"float16" for unquantized weights.
        swiglu_limit: overrides the config's clamp (DeepSeek-V4 defaults to 10.0 when its config has none).
        fuse_shared_experts: fuse the shared expert into E and topk where SGLang does (DeepSeek-V3/V3.2, Kimi-K2,
            GLM-4.5+); False tunes the routed experts alone.
        torch_dtype: activation dtype ("bfloat16"/"float16"), overriding the config's.

    Raises:
        SpecError: unknown or non-MoE architecture, bad tp/ep split, missing, malformed or wrong-typed config fields,
            a quantization scheme moe-opt cannot tune (with dtype "auto"), model not found.

    Example:
        >>> spec = resolve_model("deepseek-ai/DeepSeek-V3", tp_size=8)
        >>> spec.E, spec.N, spec.topk, spec.block_shape
        (257, 256, 9, (128, 128))
        >>> spec.config_file_name("NVIDIA H200")
        'E=257,N=256,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128, 128].json'
        >>> spec = resolve_model("hugging-quants/Mixtral-8x7B-Instruct-v0.1-AWQ-INT4", tp_size=2)
        >>> spec.dtype, spec.group_size, spec.has_zero_point, spec.config_file_name("NVIDIA H200")
        ('int4_w4a16', 128, True, 'E=8,N=7168,device_name=NVIDIA_H200,dtype=int4_w4a16.json')
    """
    config, source = load_config(model)
    return spec_from_config(config, tp_size, ep_size, dtype, model=os.fspath(model).strip(),
                            swiglu_limit=swiglu_limit, fuse_shared_experts=fuse_shared_experts,
                            torch_dtype=torch_dtype, source=source)


def spec_from_config(config: Mapping[str, Any], tp_size: int = 1, ep_size: int = 1, dtype: str | None = "auto", *,
                     model: str | None = None, swiglu_limit: float | None = None, fuse_shared_experts: bool = True,
                     torch_dtype: str | None = None, source: str | None = None) -> ModelSpec:
    """The spec of a config.json already loaded as a dict; arguments as :func:`resolve_model`.

    ``source`` names where the config came from (a file, ``catalogue:<id>``) in error messages.

    Example:
        >>> config = {"architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        ...           "num_local_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 32}
        >>> str(spec_from_config(config, tp_size=2))
        'E=8 N=7168 K=4096 topk=2 bfloat16'
    """
    name = model or "config"
    where = name if source in (None, name) else f"{name} ({source})"
    for label, value in (("tp_size", tp_size), ("ep_size", ep_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"{label} must be a positive integer, got {value!r}")
    fields = _fields(config)
    architecture = _architecture(config, name)
    rule = _RULES[architecture]
    experts = _int(fields, rule.experts, where, architecture, MAX_NUM_EXPERTS)
    topk = _int(fields, rule.topk, where, architecture, MAX_NUM_EXPERTS)
    intermediate = _int(fields, rule.intermediate, where, architecture, MAX_INTERMEDIATE_SIZE)
    hidden_size = _int(fields, ("hidden_size",), where, architecture, MAX_HIDDEN_SIZE)
    if experts % ep_size:
        raise SpecError(f"{name}: {experts} experts are not divisible by ep_size {ep_size}; use an ep_size that "
                        f"divides {experts}")
    fused = 0
    if fuse_shared_experts and architecture in _FUSES_SHARED:
        fused = _optional_int(fields, "n_shared_experts", where, minimum=0, maximum=MAX_NUM_EXPERTS) or 0
    # fp32 or no dtype falls back to bf16, as SGLang's tuner does when a config has none.
    act_dtype = fields.get("torch_dtype") or fields.get("dtype")
    act_dtype = act_dtype if isinstance(act_dtype, str) and act_dtype in ACTIVATION_DTYPES else "bfloat16"
    checkpoint = checkpoint_format(fields, where)
    moe_tp = tp_size // ep_size if tp_size % ep_size == 0 else 0
    n = intermediate // moe_tp if moe_tp and intermediate % moe_tp == 0 else None
    choice = _dtype_choice(dtype)
    if choice == "auto":
        if checkpoint.unsupported:
            raise SpecError(f"{where}: checkpoint quantization {checkpoint.unsupported} is not supported; supported: "
                            f"{SUPPORTED_SCHEMES}; or pass dtype= one of {_DTYPE_HELP} to choose what to tune")
        weights = checkpoint
    elif choice in ACTIVATION_DTYPES:
        weights, act_dtype = WeightFormat(), choice
    else:
        weights = _override(choice, checkpoint, architecture)
    block_shape = weights.block_shape
    if weights.group_size is not None and weights.fits_group_to_shape and n is not None:
        block_shape = (0, fit_group_size(weights.group_size, n, hidden_size, where))
    if torch_dtype is not None:
        act_dtype = _DTYPE_ARGS.get(str(torch_dtype).lower(), str(torch_dtype))
    limit = swiglu_limit
    if limit is None:
        limit = _optional_number(fields, "swiglu_limit", where)
    if limit is None and architecture == "DeepseekV4ForCausalLM":
        limit = _V4_SWIGLU_LIMIT
    try:
        return ModelSpec(
            num_experts=experts // ep_size + fused, topk=topk + fused, hidden_size=hidden_size,
            intermediate_size=intermediate, tp_size=tp_size, ep_size=ep_size, dtype=weights.dtype,
            torch_dtype=act_dtype, block_shape=block_shape, per_channel_quant=weights.per_channel_quant,
            has_zero_point=weights.has_zero_point, swiglu_limit=limit, model=model, architecture=architecture,
            # GPT-OSS clamps, scales and biases its SwiGLU differently ("swigluoai"); tuning refuses it. Grok-1's
            # experts use GELU (SGLang grok.py), which ModelSpec lacks: "silu" stands in, the timed GEMMs are the same.
            activation="swigluoai" if architecture in _GPT_OSS else "silu",
            num_moe_layers=_num_moe_layers(fields, architecture, where), num_fused_shared_experts=fused,
            checkpoint_expert_dtype=checkpoint.expert_dtype or {"bfloat16": "bf16", "float16": "fp16"}.get(act_dtype))
    except SpecError as exc:
        raise SpecError(f"{name}: {exc}") from None


def _dtype_choice(dtype: str | None) -> str:
    """"auto", a quantization string of SGLang's tuner, or an activation dtype ("bfloat16", "float16")."""
    if dtype is None:
        return "auto"
    choice = _DTYPE_ARGS.get(dtype.lower()) if isinstance(dtype, str) else None
    if choice is None:
        raise SpecError(f"unknown dtype {dtype!r}; accepted: {_DTYPE_HELP}")
    return choice


def _override(choice: str, checkpoint: WeightFormat, architecture: str) -> WeightFormat:
    """The weight format of an explicit dtype: the checkpoint's block, group size, per-channel scales and zero points
    where it has them of that kind, else SGLang-like defaults."""
    if choice in ("fp8_w8a8", "int8_w8a8"):
        w8a8 = checkpoint.dtype in ("fp8_w8a8", "int8_w8a8")
        if checkpoint.dtype == choice or (w8a8 and (checkpoint.block_shape or checkpoint.per_channel_quant)):
            return WeightFormat(choice, checkpoint.block_shape, per_channel_quant=checkpoint.per_channel_quant)
        # DeepSeek's own FP8 checkpoints are block [128, 128]; SGLang's int8 runs per channel or per block only.
        block = (128, 128) if architecture in _FP8_BLOCK_DEFAULT else None
        return WeightFormat(choice, block, per_channel_quant=block is None and choice == "int8_w8a8")
    group = checkpoint.group_size
    if group is None and choice == "int4_w4a16":
        group = _DEFAULT_GROUP_SIZE
    has_zp = checkpoint.has_zero_point and checkpoint.group_size is not None
    return WeightFormat(choice, (0, group) if group else None, has_zero_point=has_zp,
                        fits_group_to_shape=group is not None)


def _fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """One flat dict of fields: a multimodal text_config and DBRX's ffn_config lifted to the top, DBRX's own names
    (d_model, n_layers) mapped as transformers' DbrxConfig.attribute_map maps them."""
    fields = dict(config)
    for nested in ("text_config", "ffn_config"):
        if isinstance(config.get(nested), Mapping):
            fields.update(config[nested])
    for own, common in (("d_model", "hidden_size"), ("n_layers", "num_hidden_layers")):
        if own in fields and common not in fields:
            fields[common] = fields[own]
    return fields


def _architecture(config: Mapping[str, Any], name: str) -> str:
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise SpecError(f"{name}: config has no 'architectures' list; give a model's config.json or explicit shapes "
                        f"with {_FROM_SHAPE}")
    architecture = archs[0]
    if architecture in _RULES:
        return architecture
    fields = _fields(config)
    if not any(fields.get(key) for key in _EXPERT_COUNT_KEYS):
        raise SpecError(f"{name}: {architecture} is not a mixture-of-experts model (its config has no expert count); "
                        f"moe-opt tunes MoE layers only")
    raise SpecError(f"{name}: unsupported architecture {architecture}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
                    f"; or give the shapes explicitly with {_FROM_SHAPE}")


def _int(fields: Mapping[str, Any], keys: Sequence[str], where: str, architecture: str, maximum: int) -> int:
    for key in keys:
        if fields.get(key) is not None:
            return _optional_int(fields, key, where, minimum=1, maximum=maximum)
    raise SpecError(f"{where}: config is missing {' or '.join(repr(k) for k in keys)}, which {architecture} needs; "
                    f"give a complete config.json or explicit shapes with {_FROM_SHAPE}")


def _optional_int(fields: Mapping[str, Any], key: str, where: str, *, minimum: int, maximum: int) -> int | None:
    """A config field that must be an integer in [minimum, maximum] when present."""
    value = fields.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise SpecError(f"{where}: config field {key!r} must be an integer from {minimum} to {maximum}, "
                        f"got {value!r}")
    return value


def _optional_number(fields: Mapping[str, Any], key: str, where: str) -> float | None:
    """A config field that must be a positive finite number when present (JSON's 1e999 reads as infinity)."""
    value = fields.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise SpecError(f"{where}: config field {key!r} must be a positive finite number, got {value!r}")
    return float(value)


def _num_moe_layers(fields: Mapping[str, Any], architecture: str, where: str) -> int | None:
    layers = _optional_int(fields, "num_hidden_layers", where, minimum=1, maximum=_MAX_LAYERS)
    if layers is None:
        return None

    def step(key: str, default: int, minimum: int = 1) -> int:
        value = _optional_int(fields, key, where, minimum=minimum, maximum=_MAX_LAYERS)
        return default if value is None else value

    if architecture in _LLAMA4:  # SGLang llama4._is_moe_layer: every interleave_moe_layer_step-th layer
        every = step("interleave_moe_layer_step", 1)
        return sum((i + 1) % every == 0 for i in range(layers))
    if architecture in _QWEN:  # transformers' Qwen MoE: sparse every decoder_sparse_step, except mlp_only_layers
        every, dense = step("decoder_sparse_step", 1), fields.get("mlp_only_layers") or []
        if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
            raise SpecError(f"{where}: config field 'mlp_only_layers' must be a list of layer indices, got {dense!r}")
        return sum(i not in set(dense) and (i + 1) % every == 0 for i in range(layers))
    if architecture in _DEEPSEEK:  # DeepSeek: dense first_k_dense_replace layers, then every moe_layer_freq-th
        first, freq = step("first_k_dense_replace", 0, minimum=0), step("moe_layer_freq", 1)
        return sum(i >= first and i % freq == 0 for i in range(layers))
    return layers

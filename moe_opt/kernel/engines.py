"""Engine backends: the installed engine's own fused-MoE path, timed with moe_opt's inputs, timer and studies.

``tune(kernel="sglang")`` or ``tune(kernel="vllm")`` times the engine's ``fused_experts`` inside its public
``override_config`` context (the config every call of the engine's Triton path then launches with), on
MoeInputs' weights and scales (w1 (E, 2N, K) gate then up, w2 (E, K, N), as both engines store them). The search
space, screen and inputs are the builtin kernel's; the default config is the engine's own function; the version is
the engine package's (importlib.metadata), so a new engine release starts new studies.

The engine is imported when the backend is built (get_backend), never by ``import moe_opt``. A missing engine, or a
release whose entry points moved, is a one-line TuneError naming the package, what is missing and the versions known
to work. Neither engine runs without CUDA; this module was written against SGLang 0.5.23's files and vLLM's
fused_moe.py, and is not yet run on a GPU (benchmarks/engine_parity.py is the check).
"""

from __future__ import annotations

import importlib
from typing import Any

from ..model.spec import ModelSpec
from ..space import Config, ConfigPair
from .backend import COMPILE_M, BuiltinBackend, few_experts

# Releases whose entry points this module was written against.
SGLANG_KNOWN_VERSIONS = ("0.5.23",)
VLLM_KNOWN_VERSIONS = ("0.33.0",)


def _engine_error(package: str, what: str, known: tuple[str, ...], cause: BaseException | None = None):
    from ..errors import TuneError

    why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return TuneError(f"kernel={package!r} needs the {package} package: {what}{why}; known to work: "
                     f"{package} {', '.join(known)} (or use kernel='builtin' with target={package!r})")


def _import(package: str, known: tuple[str, ...], names: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """The package's version and the named attributes ``{key: "module:attr"}``, or the TuneError."""
    from importlib import metadata

    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError as e:
        raise _engine_error(package, "it is not installed", known) from e
    found = {}
    for key, where in names.items():
        module, attr = where.split(":")
        try:
            found[key] = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise _engine_error(package, f"{package} {version} has no {module}.{attr}", known, e) from e
    return version, found


class EngineBackend(BuiltinBackend):
    """What both engines share: the builtin space, screen and inputs; the engine's call and default."""

    package = ""
    # No USE_TMA: an engine's override_config sets one config for both GEMMs, and SGLang reads USE_TMA for GEMM2
    # (and its sorted GEMM1 output) from a _down file only.
    offers_tma = False
    known_versions: tuple[str, ...] = ()
    times_stages = False  # the engine's call cannot stop after GEMM1, nor take a config per GEMM (pair tunes)
    specializes_on_m = False

    def __init__(self):
        super().__init__("sglang")
        self.target = self.package
        self.version, self.api = _import(self.package, self.known_versions, self.entry_points())

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.package

    @property
    def ref(self) -> str:
        return self.package

    def entry_points(self) -> dict[str, str]:
        raise NotImplementedError

    def make_inputs(self, spec: ModelSpec, device: Any, *, routing_sets: int = 10, seed: int = 0,
                    routing: Any = None) -> Any:
        from .inputs import MoeInputs

        return MoeInputs(spec, device, routing_sets=routing_sets, seed=seed, routing=routing)

    def compile_inputs(self, spec: ModelSpec, device: Any) -> Any:
        """Weights of ``topk`` experts, routed among them; the engine's own alignment counts w1's experts (its
        fused_experts is given no global count)."""
        return self.make_inputs(few_experts(spec), device, routing_sets=1, seed=0)

    def compile_batch_sizes(self, spec: ModelSpec) -> tuple[int, ...]:
        return (COMPILE_M,)

    def call(self, inputs: Any, config: Config | ConfigPair, M: int, routing_index: int = 0,
             after_up: Any = None) -> Any:
        if after_up is not None:
            raise NotImplementedError(f"{self.package}'s fused_experts times the whole call only (no pair tune)")
        x, routing, out = inputs.for_batch(M)
        weights, ids = routing[routing_index % len(routing)]
        return self.forward(inputs, x, weights, ids, config, out)

    def forward(self, inputs: Any, x: Any, topk_weights: Any, topk_ids: Any, config: Config | ConfigPair,
                out: Any) -> Any:
        if isinstance(config, ConfigPair):
            raise NotImplementedError(f"{self.package}'s override_config sets one config for both GEMMs")
        with self.api["override_config"](config.to_dict()):
            y = self._fused_experts(inputs, x, topk_weights, topk_ids)
        if out is not None:
            out.copy_(y)
            return out
        return y

    def _quant_kwargs(self, inputs: Any) -> dict[str, Any]:
        """MoeInputs' format as the engines' use_* flags and scales (SGLang's and vLLM's names)."""
        spec, kw = inputs.spec, inputs.kwargs
        dtype = spec.dtype
        return dict(use_fp8_w8a8=dtype == "fp8_w8a8", use_int8_w8a8=dtype == "int8_w8a8",
                    use_int8_w8a16=dtype == "int8_w8a16", use_int4_w4a16=dtype == "int4_w4a16",
                    per_channel_quant=bool(spec.per_channel_quant), w1_scale=kw.get("w1_scale"),
                    w2_scale=kw.get("w2_scale"), w1_zp=kw.get("w1_zp"), w2_zp=kw.get("w2_zp"),
                    block_shape=list(spec.block_shape) if spec.block_shape else None)

    def _fused_experts(self, inputs, x, topk_weights, topk_ids):
        raise NotImplementedError


class SGLangBackend(EngineBackend):
    """SGLang's Triton fused MoE (sglang.srt.layers.moe.moe_runner.triton_utils, 0.5.23): ``fused_experts(
    hidden_states, w1, w2, topk_output, moe_runner_config, ..., use_fp8_w8a8=..., w1_scale=..., block_shape=...)``
    under ``override_config``; the default is its fused_moe_triton_config.get_default_config."""

    package = "sglang"
    known_versions = SGLANG_KNOWN_VERSIONS

    def entry_points(self) -> dict[str, str]:
        base = "sglang.srt.layers.moe.moe_runner"
        return {"fused_experts": f"{base}.triton_utils:fused_experts",
                "override_config": f"{base}.triton_utils:override_config",
                "get_default_config": f"{base}.triton_utils.fused_moe_triton_config:get_default_config",
                "MoeRunnerConfig": f"{base}.base:MoeRunnerConfig",
                "StandardTopKOutput": "sglang.srt.layers.moe.topk:StandardTopKOutput"}

    def unsupported(self, spec: ModelSpec) -> str | None:
        return super().unsupported(spec)

    def default_config(self, spec: ModelSpec, M: int) -> Config:
        d = self.api["get_default_config"](M, spec.E, spec.N, spec.K, spec.topk, spec.dtype, False,
                                           list(spec.block_shape) if spec.block_shape else None)
        return Config.from_dict(d)

    def _fused_experts(self, inputs, x, topk_weights, topk_ids):
        api = self.api
        runner = api["MoeRunnerConfig"](num_experts=inputs.spec.E, num_local_experts=inputs.spec.E,
                                        top_k=inputs.spec.topk, inplace=False,
                                        swiglu_limit=inputs.spec.swiglu_limit)
        topk_output = api["StandardTopKOutput"](topk_weights, topk_ids, None)
        return api["fused_experts"](x, inputs.w1, inputs.w2, topk_output, runner, **self._quant_kwargs(inputs))


class VLLMBackend(EngineBackend):
    """vLLM's Triton fused MoE (vllm.model_executor.layers.fused_moe): ``fused_experts(hidden_states, w1, w2,
    topk_weights, topk_ids, quant_config=...)`` under ``override_config``, the quant config from its
    fused_moe.config builders; the default is fused_moe.get_default_config."""

    package = "vllm"
    known_versions = VLLM_KNOWN_VERSIONS

    def entry_points(self) -> dict[str, str]:
        base = "vllm.model_executor.layers.fused_moe"
        return {"fused_experts": f"{base}:fused_experts", "override_config": f"{base}:override_config",
                "get_default_config": f"{base}.fused_moe:get_default_config",
                "fp8_w8a8": f"{base}.config:fp8_w8a8_moe_quant_config",
                "int8_w8a8": f"{base}.config:int8_w8a8_moe_quant_config",
                "int8_w8a16": f"{base}.config:int8_w8a16_moe_quant_config",
                "int4_w4a16": f"{base}.config:int4_w4a16_moe_quant_config"}

    def unsupported(self, spec: ModelSpec) -> str | None:
        if spec.swiglu_limit is not None:  # vLLM's fused_experts takes no clamp (its swigluoai clamps at 7)
            return (f"vLLM's fused_experts has no swiglu_limit; {spec.model or 'this model'} clamps at "
                    f"{spec.swiglu_limit:g}; timing it would time the wrong computation")
        return super().unsupported(spec)

    def default_config(self, spec: ModelSpec, M: int) -> Config:
        from .. import space

        d = dict(self.api["get_default_config"](M, spec.E, spec.N, spec.K, spec.topk, spec.dtype,
                                                list(spec.block_shape) if spec.block_shape else None))
        # Group-quantized formats: vLLM sets BLOCK_SIZE_M only and get_moe_wna16_block_config adds N and K later.
        fill = space.vllm_default_config(M, spec.E, spec.N, spec.K, spec.topk, spec.dtype, spec.block_shape)
        for key, value in fill.to_dict().items():
            d.setdefault(key, value)
        return Config.from_dict(d)

    def _quant_config(self, inputs):
        q = self._quant_kwargs(inputs)
        spec = inputs.spec
        if spec.dtype is None:
            return None
        if spec.dtype == "fp8_w8a8":
            return self.api["fp8_w8a8"](w1_scale=q["w1_scale"], w2_scale=q["w2_scale"],
                                        per_act_token_quant=q["per_channel_quant"],
                                        per_out_ch_quant=q["per_channel_quant"], block_shape=q["block_shape"])
        if spec.dtype == "int8_w8a8":
            return self.api["int8_w8a8"](w1_scale=q["w1_scale"], w2_scale=q["w2_scale"],
                                         per_act_token_quant=q["per_channel_quant"])
        return self.api[spec.dtype](w1_scale=q["w1_scale"], w2_scale=q["w2_scale"], w1_zp=q["w1_zp"],
                                    w2_zp=q["w2_zp"], block_shape=q["block_shape"])

    def _fused_experts(self, inputs, x, topk_weights, topk_ids):
        if not hasattr(inputs, "_vllm_quant_config"):
            inputs._vllm_quant_config = self._quant_config(inputs)
        return self.api["fused_experts"](x, inputs.w1, inputs.w2, topk_weights, topk_ids,
                                         quant_config=inputs._vllm_quant_config)

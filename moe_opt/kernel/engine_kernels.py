"""An engine's own Triton GEMM kernel and launch function, for both GEMMs, inside moe_opt's fused-MoE pipeline.

``EngineKernelBackend("sglang", ".engines/sglang")`` runs SGLang's ``invoke_fused_moe_kernel`` (and so its
``fused_moe_kernel``) for GEMM1 and GEMM2; ``EngineKernelBackend("vllm", ".engines/vllm")`` runs vLLM's
``invoke_fused_moe_triton_kernel`` (its ``fused_moe_kernel``), given vLLM's inputs: ``sorted_token_ids=None`` on the
tiny-batch path (``M * topk * 4 <= E``) and otherwise a sorted_token_ids of vLLM's length, from which vLLM's
function trims the grid itself. Around them: moe_opt's alignment (align.py), activation and activation
quantization (activation.py) and sum over topk, exactly the builtin's (fused_moe's ``invoke=`` seam). The files
come from a source folder (kernel/engine_source.py says what is loaded and what stands in for the rest), not an
installed engine: this is how an engine's kernel is timed where its compiled ops are missing.

The backend is explicit and says what it is: its name is ``sglang-kernel``/``vllm-kernel`` (a study key
``sglang-kernel@0.5.23``, never ``sglang@...``, which is the installed engine's full fused_experts), its target
is the engine (launch rules, default config), and its ref names the folder, so worker processes load the same
files. The engines' GEMM kernels specialize on batch-size-dependent arguments (EM, num_valid_tokens), so a config
compiles again per batch size class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..model.spec import ModelSpec
from ..space import Config, ConfigPair
from .backend import BuiltinBackend

SUFFIX = "-kernel"


def _triton_dtype(dtype):
    import torch
    import triton.language as tl

    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def sglang_invoke(launch, topk_weights, topk_ids):
    """fused_moe's ``invoke`` for SGLang's ``invoke_fused_moe_kernel`` (0.5.23's signature), as its
    ``_fused_moe_kernel_sequence`` calls it for one GEMM without LoRA, TMA, bias or fused all-reduce. fp8
    activations arrive quantized (its ``A.dtype == float8_e4m3fn`` branch: SGLANG_OPT_MOE_QUANT_ONCE's)."""
    from .gemm import QUANT_BLOCK, QUANT_NONE
    from .quant import FP8_DTYPE

    def invoke(a, w, c, a_scale, w_scale, routed_weights, aligned, top_k, cfg, *, compute_type, quant,
               block_shape, mul_routed_weight, em, naive):
        if quant not in (QUANT_NONE, QUANT_BLOCK) or naive:
            raise NotImplementedError("the SGLang kernel mode runs unquantized and block-fp8 formats, SGLang's launch")
        sorted_token_ids, expert_ids, num_tokens_post_padded = aligned
        launch(a, w, None, c, a_scale if quant else None, w_scale if quant else None, None,
               topk_weights if routed_weights is None else routed_weights, topk_ids, sorted_token_ids, expert_ids,
               num_tokens_post_padded, mul_routed_weight, top_k, cfg.to_dict(),
               compute_type=_triton_dtype(compute_type), use_fp8_w8a8=a.dtype == FP8_DTYPE, use_int8_w8a8=False,
               use_int8_w8a16=False, use_int4_w4a16=False, per_channel_quant=False,
               block_shape=list(block_shape) if block_shape else None, filter_expert=False)

    return invoke


def vllm_invoke(launch, topk_weights):
    """fused_moe's ``invoke`` for vLLM's ``invoke_fused_moe_triton_kernel`` (0.33.0's signature), given what its
    ``fused_experts_impl`` gives it: C as (rows, topk, N) (vLLM reads C.stride(1), C.stride(2)),
    ``sorted_token_ids=None`` on the tiny-batch path, else one of vLLM's length (``moe_align_block_size``'s
    max_num_tokens_padded: its function sets EM to it, trimmed where A has fewer rows than BLOCK_SIZE_M)."""
    from .align import vllm_max_num_tokens_padded
    from .gemm import QUANT_BLOCK, QUANT_NONE, QUANT_PER_TENSOR
    from .quant import FP8_DTYPE

    def invoke(a, w, c, a_scale, w_scale, routed_weights, aligned, top_k, cfg, *, compute_type, quant,
               block_shape, mul_routed_weight, em, naive):
        if quant not in (QUANT_NONE, QUANT_BLOCK, QUANT_PER_TENSOR):
            raise NotImplementedError("the vLLM kernel mode runs unquantized and fp8 (tensor, block) formats")
        sorted_token_ids, expert_ids, num_tokens_post_padded = aligned
        if naive:
            sorted_token_ids = None
        else:
            # moe_opt's sorted_token_ids has room for an E+1-th (EP) bucket; vLLM's length is numel + E *
            # (BLOCK_SIZE_M - 1) (or numel * BLOCK_SIZE_M below E), and its used prefix fits in it.
            numel = a.shape[0] * top_k
            sorted_token_ids = sorted_token_ids[:vllm_max_num_tokens_padded(numel, w.shape[0], cfg.BLOCK_SIZE_M)]
        launch(a, w, c.view(c.shape[0], 1, c.shape[1]), a_scale if quant else None, w_scale if quant else None,
               topk_weights if routed_weights is None else routed_weights, sorted_token_ids, expert_ids,
               num_tokens_post_padded, mul_routed_weight, top_k, cfg.to_dict(),
               compute_type=_triton_dtype(compute_type), use_fp8_w8a8=a.dtype == FP8_DTYPE, use_int8_w8a8=False,
               use_int8_w8a16=False, use_int4_w4a16=False, per_channel_quant=False,
               block_shape=list(block_shape) if block_shape else None)

    return invoke


class EngineKernelBackend(BuiltinBackend):
    """The engine's own GEMM kernel and launch inside moe_opt's pipeline (see the module docstring).

    Example:
        >>> b = EngineKernelBackend("vllm", ".engines/vllm")  # doctest: +SKIP
        >>> b.name, b.version, b.target  # doctest: +SKIP
        ('vllm-kernel', '0.33.0', 'vllm')
    """

    specializes_on_m = True  # neither engine's fused_moe_kernel declares do_not_specialize for EM/num_valid_tokens
    times_stages = True  # fused_moe(after_up=...) marks the end of GEMM1's stage, as for the builtin

    def __init__(self, engine: str, source: str | Path):
        from .engine_source import load_engine_source

        super().__init__(engine)  # the target engine: its launch rules (align.py) and default config
        self.engine = engine
        self.source = load_engine_source(engine, str(Path(source).resolve()))
        self.version = self.source.version

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.engine + SUFFIX

    @property
    def ref(self) -> str:
        return f"{self.name}={self.source.root}"

    @property
    def offers_tma(self) -> bool:  # type: ignore[override]
        """No: the engine's GEMM is launched here without TMA (SGLang makes its descriptors in its fused_experts,
        which cannot run without its compiled ops: docs/engines.md; fused_moe refuses USE_TMA with ``invoke=``)."""
        return False

    def unsupported(self, spec: ModelSpec) -> str | None:
        formats = (None, "fp8_w8a8")
        block = spec.dtype != "fp8_w8a8" or spec.block_shape is not None or self.engine == "vllm"
        if spec.dtype not in formats or spec.per_channel_quant or not block:
            return (f"the {self.name} mode runs bf16/fp16 and block fp8 (vLLM: also per-tensor fp8); "
                    f"{spec.model or 'this model'} is {spec.dtype}")
        return super().unsupported(spec)

    def default_config(self, spec: ModelSpec, M: int) -> Config:
        from .. import space

        block_shape = list(spec.block_shape) if spec.block_shape else None
        if self.engine == "sglang":
            d = dict(self.source.default_config(M, spec.E, spec.N, spec.K, spec.topk, spec.dtype, False, block_shape))
        else:
            d = dict(self.source.default_config(M, spec.E, spec.N, spec.K, spec.topk, spec.dtype, block_shape))
        # Keys an engine leaves out are Triton's launch defaults (num_warps 4, num_stages 3), as space's.
        fill = space.vllm_default_config(M, spec.E, spec.N, spec.K, spec.topk, spec.dtype, spec.block_shape)
        for key, value in fill.to_dict().items():
            d.setdefault(key, value)
        return Config.from_dict(d)

    def call(self, inputs: Any, config: Config | ConfigPair, M: int, routing_index: int = 0,
             after_up: Any = None) -> Any:
        x, routing, out = inputs.for_batch(M)
        weights, ids = routing[routing_index % len(routing)]
        return self.forward(inputs, x, weights, ids, config, out, after_up=after_up)

    def forward(self, inputs: Any, x: Any, topk_weights: Any, topk_ids: Any, config: Config | ConfigPair,
                out: Any, after_up: Any = None) -> Any:
        from .fused_moe import fused_moe

        launch = self.source.launch
        invoke = (sglang_invoke(launch, topk_weights, topk_ids) if self.engine == "sglang"
                  else vllm_invoke(launch, topk_weights))
        up, down = (config.up, config.down) if isinstance(config, ConfigPair) else (config, None)
        return fused_moe(x, inputs.w1, inputs.w2, topk_weights, topk_ids, up, config_down=down, out=out,
                         after_up=after_up, launch=self.target, invoke=invoke, **inputs.kwargs)


def engine_kernel_backend(ref: str) -> EngineKernelBackend:
    """The backend of a ref ``sglang-kernel=<folder>`` or ``vllm-kernel=<folder>`` (get_backend's)."""
    from ..errors import TuneError

    name, _, source = ref.partition("=")
    engine = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else ""
    if engine not in ("sglang", "vllm") or not source:
        raise TuneError(f"unknown kernel {ref!r}; an engine's kernel files are named sglang-kernel=<folder> or "
                        "vllm-kernel=<folder> (benchmarks/carry_engines.py builds the folders)")
    try:
        return EngineKernelBackend(engine, source)
    except ImportError as e:
        raise TuneError(f"kernel {ref!r}: {e}") from e

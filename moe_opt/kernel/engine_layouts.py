"""What SGLang's and vLLM's kernel files need, and what stands in for it (kernel/engine_source.py loads them).

Each engine's layout names the real files loaded (the GEMM kernel's module and stdlib-only helpers) and the
modules replaced: platform probes answered as the engine answers them on a CUDA device with default settings,
logging, env and server-flag lookups, custom-op registration, and placeholders (raising if called) for what only
the full ``fused_experts`` uses. Written against SGLang 0.5.23's and vLLM 0.33.0's files; each probe's docstring
cites the function it stands for.
"""

from __future__ import annotations

import functools
import logging
import os
import types

from .engine_source import EngineLayout, Replacement, not_carried


class _OnceLogger(logging.LoggerAdapter):
    """vLLM's logger: a logging.Logger with ``*_once`` methods."""

    @functools.cache  # noqa: B019 - one logger per module, kept for the process
    def _once(self, level: int, msg: str) -> None:
        self.log(level, msg)

    def warning_once(self, msg, *args, **kwargs):
        self._once(logging.WARNING, msg % args if args else msg)

    def info_once(self, msg, *args, **kwargs):
        self._once(logging.INFO, msg % args if args else msg)

    def debug_once(self, msg, *args, **kwargs):
        self._once(logging.DEBUG, msg % args if args else msg)


# --- Probes, as each engine answers them on a CUDA device with default settings ------------------------------------

def _is_cuda() -> bool:  # sglang.srt.utils.common.is_cuda
    import torch

    return torch.cuda.is_available() and torch.version.cuda is not None


def _is_hip() -> bool:  # both engines: torch.version.hip is not None
    import torch

    return torch.version.hip is not None


@functools.lru_cache(maxsize=1)
def _capability() -> tuple[int, int]:
    import torch

    return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else (0, 0)


@functools.lru_cache(maxsize=1)
def _sglang_is_sm90_supported() -> bool:
    """sglang.srt.utils.common: _check_cuda_device_version(device_capability_majors=[9], cuda_version=(12, 3))."""
    import torch

    if not _is_cuda():
        return False
    return _capability()[0] == 9 and tuple(map(int, torch.version.cuda.split(".")[:2])) >= (12, 3)


@functools.lru_cache(maxsize=1)
def _sglang_is_arch_support_pdl() -> bool:
    """sglang.kernels.jit.utils.arch.is_arch_support_pdl: not HIP/MUSA and the device's major capability >= 9."""
    import torch

    if _is_hip() or getattr(torch.version, "musa", None):
        return False
    return _capability()[0] >= 9


def _env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


def _sglang_get_moe_padding_size(is_aiter_moe: bool) -> int:
    """sglang.srt.layers.moe.utils.get_moe_padding_size: 0 unless SGLANG_MOE_PADDING (or aiter, ROCm only)."""
    if is_aiter_moe or _env_bool("SGLANG_MOE_PADDING"):
        raise RuntimeError("SGLANG_MOE_PADDING / aiter padding is not carried (engine_source)")
    return 0


class _VllmCudaPlatform:
    """vllm.platforms.current_platform on a CUDA device, for the methods the loaded files call."""

    @staticmethod
    def is_rocm() -> bool:
        return _is_hip()

    @staticmethod
    def is_cuda() -> bool:
        return _is_cuda()

    @staticmethod
    def is_cuda_alike() -> bool:
        return _is_cuda() or _is_hip()

    @staticmethod
    def is_xpu() -> bool:
        return False

    @staticmethod
    def fp8_dtype():
        import torch

        return torch.float8_e4m3fnuz if _is_hip() else torch.float8_e4m3fn

    @staticmethod
    def get_device_capability(device_id: int = 0):
        return _capability()

    @staticmethod
    def is_device_capability(capability, device_id: int = 0) -> bool:
        """Exactly this capability: (major, minor) or major * 10 + minor (vLLM's DeviceCapability.to_int)."""
        major, minor = _capability()
        if isinstance(capability, tuple):
            return (major, minor) == tuple(capability)
        return major * 10 + minor == capability

    @staticmethod
    def has_device_capability(capability, device_id: int = 0) -> bool:
        major, minor = _capability()
        if isinstance(capability, tuple):
            return (major, minor) >= tuple(capability)
        return major * 10 + minor >= capability


def _vllm_resolve_moe_use_td() -> bool:
    """vllm fused_moe.utils.resolve_moe_use_td: VLLM_TRITON_USE_TD if set, else current_platform.is_xpu() (False)."""
    value = os.environ.get("VLLM_TRITON_USE_TD")
    return False if value is None else value.strip().lower() in ("1", "true")


def _vllm_warn_if_moe_use_td_ineffective(active_backend: str, is_quantized: bool = False) -> None:
    """vllm fused_moe.utils.warn_if_moe_use_td_ineffective: a one-shot warning only when VLLM_TRITON_USE_TD is set."""


def _vllm_direct_register_custom_op(*args, **kwargs) -> None:
    """vllm.utils.torch_utils.direct_register_custom_op: registers torch.ops.vllm.<name> (for the full
    fused_experts, which is not run here); not registered."""


def _vllm_enable_swap_ab(BLOCK_SIZE_M: int, BLOCK_SIZE_N: int) -> bool:
    """vllm fused_moe.utils.enable_swap_ab: is_device_capability(90) and BLOCK_SIZE_M < 64 and BLOCK_SIZE_N >= 64."""
    return _VllmCudaPlatform.is_device_capability(90) and BLOCK_SIZE_M < 64 and BLOCK_SIZE_N >= 64


class _SGLangExec:
    """sglang.srt.runtime_context.get_exec(): the server's settings; SGLang's defaults for what the loaded files
    read (deterministic inference off, fused MoE sum all-reduce off)."""

    deterministic = types.SimpleNamespace(enable_deterministic_inference=False)
    moe = types.SimpleNamespace(enable_fused_moe_sum_all_reduce=False)


SGLANG = EngineLayout(
    engine="sglang",
    files=("sglang.kernels.ops.moe.fused_moe_triton_kernels",
           "sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config",
           "sglang.srt.environ"),
    replaced=(
        Replacement("sglang.kernels.jit.utils", {"is_arch_support_pdl": _sglang_is_arch_support_pdl},
                    "platform probe (PDL: capability major >= 9, as arch.py); the JIT package builds CUDA "
                    "extensions with tvm_ffi"),
        Replacement("sglang.srt.utils", {"is_cuda": _is_cuda, "is_hip": _is_hip,
                                         "is_cpu": lambda: False, "cpu_has_amx_support": lambda: False,
                                         "is_sm90_supported": _sglang_is_sm90_supported,
                                         "get_device_name": lambda device_id=0: __import__("torch").cuda
                                         .get_device_name(device_id)},
                    "platform probes of sglang.srt.utils.common (is_cpu: SGLANG_USE_CPU_ENGINE unset); the "
                    "module imports the serving stack"),
        Replacement("sglang.srt.batch_invariant_ops", {"is_batch_invariant_mode_enabled": lambda: False},
                    "server flag (deterministic inference off, SGLang's default)"),
        Replacement("sglang.srt.layers.moe.utils", {"get_moe_padding_size": _sglang_get_moe_padding_size},
                    "env lookup (SGLANG_MOE_PADDING unset: 0)"),
        Replacement("sglang.srt.runtime_context", {"get_exec": lambda: _SGLangExec},
                    "server settings (SGLang's defaults)"),
        Replacement("sglang.kernels.ops.quantization.fp8_kernel",
                    {n: not_carried(f"sglang fp8_kernel.{n}") for n in
                     ("per_token_group_quant_fp8", "scaled_fp8_quant", "sglang_per_token_group_quant_fp8")},
                    "activation quantization inside the launch, skipped: fp8 activations come quantized "
                    "(SGLang's pre-quantized branch, A.dtype == float8_e4m3fn); per-token ops need sgl_kernel"),
        Replacement("sglang.kernels.ops.quantization.int8_kernel",
                    {n: not_carried(f"sglang int8_kernel.{n}") for n in
                     ("per_token_group_quant_int8", "per_token_quant_int8", "sglang_per_token_group_quant_int8")},
                    "int8 activation quantization: not used by the formats run here"),
    ),
    launch="sglang.kernels.ops.moe.fused_moe_triton_kernels:invoke_fused_moe_kernel",
    default_config="sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config:get_default_config",
    configs_dir="sglang/srt/layers/moe/moe_runner/triton_utils",
)

_FUSED_MOE = "vllm.model_executor.layers.fused_moe"
VLLM = EngineLayout(
    engine="vllm",
    files=(f"{_FUSED_MOE}.fused_moe", "vllm.envs", "vllm.utils.math_utils"),
    replaced=(
        Replacement("vllm.logger", {"init_logger": lambda name: _OnceLogger(logging.getLogger(name), {})},
                    "logging"),
        Replacement("vllm.platforms", {"current_platform": _VllmCudaPlatform},
                    "platform probes (CUDA: is_rocm/is_xpu False, fp8_dtype float8_e4m3fn, device capability)"),
        Replacement("vllm.triton_utils", {"triton": "triton", "tl": "triton.language"},
                    "the installed triton and triton.language (what vllm.triton_utils re-exports when Triton "
                    "is installed)"),
        Replacement("vllm.triton_utils.allocation", {"set_triton_allocator": not_carried("set_triton_allocator")},
                    "tensor-descriptor path only (VLLM_TRITON_USE_TD, off on CUDA)"),
        Replacement("vllm.utils.platform_utils",
                    {"get_device_name_as_file_name": not_carried("get_device_name_as_file_name")},
                    "vLLM's own config-file lookup, not used (moe_opt.run.lookup finds the shipped file)"),
        Replacement("vllm.utils.torch_utils", {"direct_register_custom_op": _vllm_direct_register_custom_op},
                    "custom-op registration of the full fused_experts (torch.ops.vllm.fused_experts), not run"),
        Replacement(f"{_FUSED_MOE}.utils",
                    {"enable_swap_ab": _vllm_enable_swap_ab, "resolve_moe_use_td": _vllm_resolve_moe_use_td,
                     "warn_if_moe_use_td_ineffective": _vllm_warn_if_moe_use_td_ineffective,
                     "moe_kernel_quantize_input": not_carried("moe_kernel_quantize_input")},
                    "platform probe (SWAP_AB: capability exactly 9.0, BLOCK_SIZE_M < 64, BLOCK_SIZE_N >= 64), env "
                    "lookup (VLLM_TRITON_USE_TD), a warning; activation quantization is moe_opt's"),
        Replacement("vllm._custom_ops", {}, "compiled ops (vllm._C, _moe_C): used by fused_experts_impl only"),
        Replacement(f"{_FUSED_MOE}.modular_kernel", {}, "used by fused_experts_impl only"),
        Replacement(f"{_FUSED_MOE}.activation", {"MoEActivation": not_carried("MoEActivation"),
                                                 "apply_moe_activation": not_carried("apply_moe_activation")},
                    "the activation (torch.ops._C.silu_and_mul) is moe_opt's"),
        Replacement(f"{_FUSED_MOE}.config", {n: not_carried(n) for n in
                                             ("FUSED_MOE_UNQUANTIZED_CONFIG", "FusedMoEQuantConfig",
                                              "_get_config_dtype_str")},
                    "quant-config classes of the full fused_experts, not run"),
        Replacement(f"{_FUSED_MOE}.moe_align_block_size", {"moe_align_block_size": not_carried("moe_align_block_size")},
                    "the alignment (torch.ops._moe_C.moe_align_block_size) is moe_opt's"),
    ),
    launch=f"{_FUSED_MOE}.fused_moe:invoke_fused_moe_triton_kernel",
    default_config=f"{_FUSED_MOE}.fused_moe:get_default_config",
    configs_dir="vllm/model_executor/layers/fused_moe/configs",
)

LAYOUTS = {"sglang": SGLANG, "vllm": VLLM}

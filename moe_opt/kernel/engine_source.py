"""Load an engine's own Triton fused-MoE kernel and launch function from its source files, without the engine.

SGLang's and vLLM's full ``fused_experts`` cannot run where the engine is not installed with its compiled ops
(docs/engines.md: the import errors and the ops each path needs), but the GEMM kernel and the Python function
that launches it are plain ``@triton.jit`` code. This module loads exactly those files from a source folder (the
engine's wheel, unpacked: benchmarks/carry_engines.py) under their own module names, so Triton compiles the
engine's own code. What those files import is satisfied in one of three declared ways, and nothing else of the
engine is imported (an import not declared here is an ImportError naming it):

- ``files``: further real files of the engine, loaded as they are (stdlib-only helpers: env lookups, math).
- ``packages``: packages whose ``__init__.py`` is not run (it imports the whole serving stack); an empty package
  module stands for it, so its listed submodules can load.
- ``replaced``: modules that stand in for platform probes, logging, env/server-flag lookups and custom-op
  registration (each answers as the engine does on a CUDA device with default settings), or for functions on
  paths these launches never take (each raises if called, naming what was not carried).

The kernel code itself is never replaced or edited; ``EngineSource.record()`` says what was loaded and what was
replaced, and benchmarks write it into their results.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENGINES = ("sglang", "vllm")


class _NotCarried:
    """Stands for a function or value on a path the engine-kernel launches never take: calling it, or anything
    reached from it, raises. A class (not an instance) so that annotations such as ``X | None`` still evaluate."""


def not_carried(name: str) -> type:
    """A placeholder for ``name``: attribute access gives further placeholders; calling raises RuntimeError."""

    class Meta(type):
        def __getattr__(cls, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return not_carried(f"{name}.{attr}")

        def __call__(cls, *args, **kwargs):
            raise RuntimeError(f"{name} is not carried (engine_source replaced it: only the engine's Triton GEMM "
                               "launch runs here)")

    return Meta(name.rsplit(".", 1)[-1], (_NotCarried,), {"__qualname__": name})


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


# --- What each engine's kernel files need -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Replacement:
    """A module that stands in for one the engine's files import: its attributes and why that is safe."""

    module: str
    attrs: dict[str, Any]
    why: str


@dataclass(frozen=True)
class EngineLayout:
    """What to load of one engine: real files (module names), replaced modules, the module holding the GEMM
    launch and the one holding the default config, where the shipped configs live. The packages above them are
    not initialized (all_packages)."""

    engine: str
    files: tuple[str, ...]
    replaced: tuple[Replacement, ...]
    launch: str  # "module:function"
    default_config: str  # "module:function"
    configs_dir: str  # relative to the source folder (the shipped tuned files)

    def all_packages(self) -> tuple[str, ...]:
        """Every package above a loaded file or a replaced module: their ``__init__.py`` is not run."""
        names = set()
        for module in self.files + tuple(r.module for r in self.replaced):
            parts = module.split(".")
            names.update(".".join(parts[:i]) for i in range(1, len(parts)))
        return tuple(sorted(names))


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


def _attr(value: Any) -> Any:
    """Replacement values given as "module" strings are that installed module (triton)."""
    return importlib.import_module(value) if isinstance(value, str) else value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the layout's modules from ``root`` (files), empty packages and replacement modules; refuses every
    other module of the engine."""

    def __init__(self, layout: EngineLayout, root: Path):
        self.layout, self.root = layout, root
        self.replaced = {r.module: r for r in layout.replaced}
        self.packages = layout.all_packages()
        self.loaded: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        top = self.layout.engine
        if fullname != top and not fullname.startswith(top + "."):
            return None
        if fullname in self.layout.files:
            file = self.root / (fullname.replace(".", "/") + ".py")
            if not file.is_file():
                raise ImportError(f"{file} is missing (the source folder lacks a file the kernel needs: rebuild it "
                                  "with benchmarks/carry_engines.py)", name=fullname)
            self.loaded.append(str(file.relative_to(self.root)))
            return importlib.util.spec_from_file_location(fullname, file)
        if fullname in self.packages or fullname in self.replaced:
            spec = importlib.machinery.ModuleSpec(fullname, self, is_package=fullname in self.packages)
            if spec.submodule_search_locations is not None and fullname not in self.replaced:
                spec.submodule_search_locations.append(str(self.root / fullname.replace(".", "/")))
            return spec
        raise ImportError(f"{fullname} is imported by the {top} kernel files but neither carried nor replaced "
                          "(moe_opt/kernel/engine_source.py declares both)", name=fullname)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        r = self.replaced.get(module.__name__)
        if r is not None:
            module.__dict__.update({k: _attr(v) for k, v in r.attrs.items()})
            if not r.attrs:  # a module only used on paths not run: any name is a placeholder that raises if used
                module.__getattr__ = lambda attr, _m=module.__name__: not_carried(f"{_m}.{attr}")


@dataclass
class EngineSource:
    """An engine's kernel files, loaded: the launch function, the default-config function, the version.

    Attributes:
        engine: "sglang" or "vllm".
        root: the source folder.
        version: from the folder's ``<engine>-<version>.dist-info`` (the wheel's METADATA).
        launch: the engine's GEMM launch (SGLang ``invoke_fused_moe_kernel``, vLLM
            ``invoke_fused_moe_triton_kernel``).
        default_config: the engine's ``get_default_config``.
        loaded: the real files loaded, relative to root.
    """

    engine: str
    root: Path
    version: str
    launch: Callable
    default_config: Callable
    loaded: list[str] = field(default_factory=list)

    @property
    def layout(self) -> EngineLayout:
        return LAYOUTS[self.engine]

    @property
    def configs_dir(self) -> Path:
        return self.root / self.layout.configs_dir

    def record(self) -> dict:
        """What ran and what stood in for what: for results files."""
        lay = self.layout
        return {"engine": self.engine, "version": self.version, "source": str(self.root),
                "launch": lay.launch, "default_config": lay.default_config, "files_loaded": self.loaded,
                "packages_not_initialized": list(lay.all_packages()),
                "replaced_imports": {r.module: {"names": sorted(r.attrs) or ["(any: raises if used)"],
                                                "why": r.why} for r in lay.replaced}}


def source_version(engine: str, root: Path) -> str:
    """The engine's version, from ``<engine>-<version>.dist-info`` in ``root``."""
    found = [m.group(1) for p in root.glob(f"{engine}-*.dist-info") if (m := re.match(rf"{engine}-(.+)\.dist-info$",
                                                                                       p.name))]
    if len(found) != 1:
        raise ImportError(f"{root} must hold exactly one {engine}-<version>.dist-info (the wheel's metadata), "
                          f"found {len(found)}")
    return found[0]


@functools.cache
def load_engine_source(engine: str, source: str | os.PathLike) -> EngineSource:
    """Load ``engine``'s kernel files from ``source`` (a folder holding ``<engine>/...`` and its dist-info).

    Raises ImportError (one line) when a file is missing, the folder is not such a folder, or the engine is
    already imported in this process (its own modules would be mixed with these).

    Example:
        >>> src = load_engine_source("sglang", ".engines/sglang")  # doctest: +SKIP
        >>> src.version, src.launch.__name__  # doctest: +SKIP
        ('0.5.23', 'invoke_fused_moe_kernel')
    """
    if engine not in LAYOUTS:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    layout = LAYOUTS[engine]
    root = Path(source).resolve()
    if not (root / engine).is_dir():
        raise ImportError(f"{root} has no {engine}/ folder (build it with benchmarks/carry_engines.py)")
    version = source_version(engine, root)
    clash = [m for m in sys.modules if m == engine or m.startswith(engine + ".")]
    if clash:
        raise ImportError(f"{engine} is already imported here ({clash[0]}): load its kernel files in a process "
                          "without it")
    finder = _Finder(layout, root)
    sys.meta_path.insert(0, finder)
    try:
        found = {}
        for key in ("launch", "default_config"):
            module, attr = getattr(layout, key).split(":")
            found[key] = getattr(importlib.import_module(module), attr)
    except BaseException:
        for m in [m for m in sys.modules if m == engine or m.startswith(engine + ".")]:
            del sys.modules[m]
        raise
    finally:
        sys.meta_path.remove(finder)
    return EngineSource(engine, root, version, found["launch"], found["default_config"], finder.loaded)

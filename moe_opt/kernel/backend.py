"""The kernel-backend seam: what the tune needs of a kernel it can time, and the registry of backends.

A backend says what it is (name and version: part of the study identity), which configs it can run (candidate
space and constraints) and its engine's default config, builds its inputs for a spec, and runs one call. The
measurers (measure/) time ``backend.call``; the compile pool compiles through it; the correctness guard runs
``backend.forward`` and compares with the float64 reference, which stays independent of every backend.

Adding a backend (an engine's own kernel, say) is a class with these members registered in BACKENDS; nothing
outside kernel/ changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from .. import space
from ..model.spec import ModelSpec
from ..space import Config, ConfigPair

COMPILE_M = 4  # the batch size a compile worker launches a config at, where one binary serves every batch size


def few_experts(spec: ModelSpec) -> ModelSpec:
    """``spec`` with its topk experts only, no shared ones: a compile worker's weights (compile_inputs)."""
    return spec.replace(num_experts=spec.topk, num_fused_shared_experts=0)


# Activations the builtin kernel implements. GPT-OSS's "swigluoai" resolves but is refused for tuning.
SUPPORTED_ACTIVATIONS = ("silu",)


@runtime_checkable
class KernelBackend(Protocol):
    """A fused-MoE kernel that can be tuned and timed.

    Attributes:
        name: "builtin", or an engine's name.
        version: changes whenever what is timed changes (a study measured with one version is not resumed by
            another).
        specializes_on_m: whether a config compiled at one batch size must compile again at another (then the
            compile pool compiles each config per batch size, on the whole shape: measure/compile_pool.py).
        target: the engine whose launch rules and default config it follows ("sglang", "vllm").
        ref: the string that rebuilds it in another process (``get_backend(ref)``): the measuring process and the
            compile workers build the same backend.
        times_stages: whether ``call`` runs ``after_up`` between the GEMM stages, so that GEMM1's stage can be
            timed inside the whole call (a config pair per GEMM needs it).
    """

    name: str
    version: str
    specializes_on_m: bool
    target: str
    ref: str
    times_stages: bool

    def unsupported(self, spec: ModelSpec) -> str | None:
        """Why this backend cannot time ``spec`` correctly, or None."""

    def candidates(self, spec: ModelSpec, shared_memory_bytes: int, tma: bool = False) -> list[Config]:
        """The configs worth proposing for ``spec`` on a device with this per-block shared memory; ``tma``: the
        device has tensor descriptors (MeasurerInfo.tma), so USE_TMA may be offered."""

    def grid(self, spec: ModelSpec, tma: bool = False) -> list[Config]:
        """Every config of the space for ``spec`` (the exhaustive baseline), fitting or not."""

    def choices(self, spec: ModelSpec, tma: bool = False) -> dict[str, Sequence]:
        """Allowed values of each tunable (the trial's distributions); "USE_TMA" only where it is offered."""

    def screen(self, spec: ModelSpec, config: Config, shared_memory_bytes: int) -> str | None:
        """Why ``config`` need not be compiled at all ("Rejected: ..."), or None."""

    def default_config(self, spec: ModelSpec, M: int) -> Config:
        """The engine's config when no tuned file exists (the baseline of every speedup)."""

    def compile_inputs(self, spec: ModelSpec, device: Any) -> Any:
        """The inputs a compile worker launches a config with (measure/compile_pool.py): as small as launches the
        same kernels, with the same specializations, as the whole shape's."""

    def compile_batch_sizes(self, spec: ModelSpec) -> tuple[int, ...]:
        """Where ``specializes_on_m`` is False: the batch sizes one compile launches at so that its binaries
        serve every batch size (one, unless the launch rules change with the batch size)."""

    def make_inputs(self, spec: ModelSpec, device: Any, *, routing_sets: int = 10, seed: int = 0,
                    routing: Any = None) -> Any:
        """Weights once, activations and routing (a model.routing.RoutingSpec; None: uniform) per batch size, on
        ``device``."""

    def call(self, inputs: Any, config: Config | ConfigPair, M: int, routing_index: int = 0,
             after_up: Any = None) -> Any:
        """One timed fused-MoE call at batch size M with the ``routing_index``-th routing draw; a ConfigPair
        runs each GEMM with its own config. ``after_up`` (where ``times_stages``) is called between GEMM1's stage
        (alignment, GEMM1, activation) and GEMM2: a pair tune's timer records an event there."""

    def forward(self, inputs: Any, x: Any, topk_weights: Any, topk_ids: Any, config: Config, out: Any) -> Any:
        """The fused-MoE function on given activations and routing with ``inputs``' weights (the guard's call)."""


# The engines whose launch rules and default configs the builtin kernel can follow (tune(target=...)).
TARGETS = ("sglang", "vllm")


def _check_target(target: str) -> str:
    from ..errors import TuneError

    if target not in TARGETS:
        raise TuneError(f"unknown target {target!r}; accepted: {', '.join(TARGETS)}")
    return target


class BuiltinBackend:
    """moe_opt's own Triton kernel (kernel/): SGLang's algorithm and tunables, launched by the target engine's rules
    (SGLang's, or vLLM's tiny-batch path and grid trimming: fused_moe's ``launch``), its speedups over that engine's
    default config.

    Example:
        >>> BuiltinBackend("vllm").ref, BuiltinBackend().ref
        ('builtin:vllm', 'builtin')
    """

    name = "builtin"
    version = "1"  # bump when the kernel's code changes what is timed
    specializes_on_m = False  # kernel/gemm.py: no batch-size-dependent argument is specialized on
    times_stages = True  # fused_moe(after_up=...) marks the end of GEMM1's stage

    def __init__(self, target: str = "sglang"):
        self.target = _check_target(target)

    @property
    def ref(self) -> str:
        """The string get_backend() rebuilds this backend from (what the measuring processes are given)."""
        return self.name if self.target == "sglang" else f"{self.name}:{self.target}"

    def unsupported(self, spec: ModelSpec) -> str | None:
        if spec.activation not in SUPPORTED_ACTIVATIONS:
            return (f"{spec.model or 'this model'} uses activation {spec.activation!r}, which the kernel does not "
                    f"implement (supported: {', '.join(SUPPORTED_ACTIVATIONS)}); tuning it would time the wrong "
                    "computation")
        return None

    @property
    def offers_tma(self) -> bool:
        """USE_TMA is SGLang's (its fused_moe.py reads it; vLLM's kernel has no TMA path)."""
        return self.target == "sglang"

    def candidates(self, spec: ModelSpec, shared_memory_bytes: int, tma: bool = False) -> list[Config]:
        return space.candidates_for(spec, shared_memory_bytes, tma=tma and self.offers_tma)

    def grid(self, spec: ModelSpec, tma: bool = False) -> list[Config]:
        return space.grid_for(spec, tma=tma and self.offers_tma)

    def choices(self, spec: ModelSpec, tma: bool = False) -> dict[str, Sequence]:
        return space.choices_for(spec, tma=tma and self.offers_tma)

    def screen(self, spec: ModelSpec, config: Config, shared_memory_bytes: int) -> str | None:
        if config.USE_TMA:
            why = space.tma_refusal(spec) if self.offers_tma else \
                f"USE_TMA: kernel {self.name} for {self.target} has no TMA path"
            if why is not None:
                return f"Rejected: {why}"
        a_bytes, b_bytes = space.operand_bytes(spec.dtype)
        if not space.fits_shared_memory(config, a_bytes, b_bytes, shared_memory_bytes):
            return f"Rejected: shared-memory estimate exceeds the device's {shared_memory_bytes} bytes per block"
        block_k = space.block_k_of(spec.block_shape)  # block_k of block quantization, or the group size
        if block_k and block_k % config.BLOCK_SIZE_K:  # one scale per K step: outside the grid is fine
            return f"Rejected: BLOCK_SIZE_K {config.BLOCK_SIZE_K} does not divide block_k {block_k}"
        return None

    def default_config(self, spec: ModelSpec, M: int) -> Config:
        if self.target == "vllm":
            return space.vllm_default_config(M, spec.E, spec.N, spec.K, spec.topk, spec.dtype, spec.block_shape)
        return space.default_config_for(spec, M)

    def make_inputs(self, spec: ModelSpec, device: Any, *, routing_sets: int = 10, seed: int = 0,
                    routing: Any = None) -> Any:
        from .inputs import MoeInputs

        return MoeInputs(spec, device, routing_sets=routing_sets, seed=seed, routing=routing, launch=self.target)

    def compile_inputs(self, spec: ModelSpec, device: Any) -> Any:
        """Weights of ``topk`` experts only (the GEMM's strides, hence its binary, depend on N and K, and a whole
        shape's weights in every worker would not fit on the GPU: DeepSeek-V3 bf16 at TP 1 is 22 GB), routed among
        them, aligned as the whole shape's E experts (global_num_experts): the alignment's kernels specialize on
        E, and vLLM's tiny-batch rule compares with it."""
        from .inputs import MoeInputs

        if self.specializes_on_m:  # compiled per batch size, at the whole shape
            return self.make_inputs(spec, device, routing_sets=1, seed=0)
        return MoeInputs(few_experts(spec), device, routing_sets=1, seed=0, launch=self.target,
                         global_num_experts=spec.E)

    def compile_batch_sizes(self, spec: ModelSpec) -> tuple[int, ...]:
        """A small batch; for vLLM's launch rules also one on the other side of its tiny-batch rule
        (``M * topk * 4 <= E``, align.py), whose path launches other kernels."""
        from .align import vllm_uses_naive_block_assignment

        if self.target != "vllm":
            return (COMPILE_M,)

        def naive(M: int) -> bool:
            return vllm_uses_naive_block_assignment(M, spec.topk, spec.E, spec.group_size is not None)

        other = 4096 if naive(COMPILE_M) else 1
        return (COMPILE_M, other) if naive(other) != naive(COMPILE_M) else (COMPILE_M,)

    def call(self, inputs: Any, config: Config | ConfigPair, M: int, routing_index: int = 0,
             after_up: Any = None) -> Any:
        return inputs.call(config, M, routing_index, after_up=after_up)

    def forward(self, inputs: Any, x: Any, topk_weights: Any, topk_ids: Any, config: Config | ConfigPair,
                out: Any) -> Any:
        from .fused_moe import fused_moe

        up, down = (config.up, config.down) if isinstance(config, ConfigPair) else (config, None)
        return fused_moe(x, inputs.w1, inputs.w2, topk_weights, topk_ids, up, config_down=down, out=out,
                         launch=inputs.launch, **inputs.kwargs)


def _engine_backends() -> dict[str, type]:
    from .engines import SGLangBackend, VLLMBackend  # no engine is imported here: each imports it when built

    return {"sglang": SGLangBackend, "vllm": VLLMBackend}


BACKENDS: dict[str, Any] = {"builtin": BuiltinBackend, "sglang": None, "vllm": None}  # engines: kernel/engines.py


def get_backend(backend: str | KernelBackend = "builtin", target: str | None = None) -> KernelBackend:
    """A backend by name (or the backend object given): "builtin" (its target engine ``target``, default SGLang;
    also written "builtin:vllm"), or an engine's own kernel, "sglang" or "vllm" (kernel/engines.py; the engine is
    imported here, and a missing one is a TuneError), or an engine's GEMM kernel loaded from a folder of its
    files, "sglang-kernel=<folder>" or "vllm-kernel=<folder>" (kernel/engine_kernels.py).

    Example:
        >>> get_backend("builtin").name, get_backend("builtin", target="vllm").target
        ('builtin', 'vllm')
    """
    from ..errors import TuneError

    if not isinstance(backend, str):
        return backend
    if "=" in backend:  # an engine's kernel files from a folder: "sglang-kernel=<folder>" (kernel/engine_kernels.py)
        from .engine_kernels import engine_kernel_backend

        built = engine_kernel_backend(backend)
        if target is not None and target != built.target:
            raise TuneError(f"kernel {backend!r} follows {built.target}'s launch rules; got target {target!r}")
        return built
    name, _, ref_target = backend.partition(":")
    if name not in BACKENDS:
        engines = ", ".join(n for n in BACKENDS if n != "builtin")
        raise TuneError(f"unknown kernel {backend!r}; accepted: builtin (or builtin:<target>), or an installed "
                        f"engine's own kernel: {engines}")
    target = target or ref_target or None
    if name == "builtin":
        return BuiltinBackend(target or "sglang")
    if target is not None and target != name:
        raise TuneError(f"kernel {name!r} times {name}'s own kernel, so its target is {name}; got target {target!r}")
    return _engine_backends()[name]()


def backend_key(backend: KernelBackend) -> str:
    """The kernel part of a study identity: ``<name>@<version>``."""
    return f"{backend.name}@{backend.version}"

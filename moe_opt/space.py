"""The search space: the six launch parameters of the fused-MoE kernel (and SGLang's USE_TMA), their ranges and
constraints.

A :class:`Config` is one point of the space. Its field names are the exact JSON keys that SGLang and vLLM
read from their tuned-config files, so ``config.to_dict()`` can be written into such a file unchanged.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields, replace
from typing import Iterator, Mapping, Sequence

# SGLang's tuning space (benchmark/kernels/fused_moe_triton/common_utils.py, get_configs_compute_bound):
# 5 * 4 * 3 * 4 * 2 * 4 = 1,920 points. vLLM's benchmark_moe.py uses the same lists on CUDA.
BLOCK_SIZE_M_CHOICES = (16, 32, 64, 128, 256)
BLOCK_SIZE_N_CHOICES = (32, 64, 128, 256)
BLOCK_SIZE_K_CHOICES = (64, 128, 256)
GROUP_SIZE_M_CHOICES = (1, 16, 32, 64)
NUM_WARPS_CHOICES = (4, 8)
NUM_STAGES_CHOICES = (2, 3, 4, 5)

PARAM_NAMES = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")
# SGLang's seventh key (fused_moe.py, _prepare_fused_moe_run): "USE_TMA": true in an up config loads GEMM1's weights
# through Hopper's tensor memory accelerator; in a _down config GEMM2's A and B, GEMM1 then writing its output in
# expert-sorted order. Written only when true, read as false when absent (docs/kernel.md, "TMA").
TMA_NAME = "USE_TMA"
TMA_CHOICES = (False, True)

# SGLang's default batch sizes for tuning (tuning_fused_moe_triton.py).
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096)

# Hopper (sm_90) allows 227 KiB of shared memory per block (CUDA C Programming Guide, compute capabilities).
HOPPER_SHARED_MEMORY_BYTES = 232_448


@dataclass(frozen=True, order=True)
class Config:
    """One launch configuration of the fused-MoE kernel (both GEMMs use it, as in SGLang's tuner).

    Example:
        >>> c = Config(64, 128, 128, 32, 4, 3)
        >>> c.to_dict()["BLOCK_SIZE_N"]
        128
        >>> Config.from_dict(c.to_dict()) == c
        True
    """

    BLOCK_SIZE_M: int
    BLOCK_SIZE_N: int
    BLOCK_SIZE_K: int
    GROUP_SIZE_M: int
    num_warps: int = 4
    num_stages: int = 3
    USE_TMA: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == TMA_NAME:
                if not isinstance(value, bool):
                    raise ValueError(f"Config.USE_TMA must be True or False, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Config.{f.name} must be a positive integer, got {value!r}")
        for name in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"Config.{name} must be a power of two >= 16 (tl.dot needs it), got {value}")
        # Hashed once: a search hashes its ~1,300 candidates into sets on every proposal (the dataclass's own
        # __hash__ builds a tuple of the seven fields each time; a tune spent seconds there).
        object.__setattr__(self, "_hash", hash(tuple(getattr(self, f.name) for f in fields(self))))

    def __hash__(self) -> int:
        return self._hash

    def to_dict(self) -> dict[str, int | bool]:
        """The config as SGLang/vLLM store it: the six keys, in their order, and ``"USE_TMA": true`` only where it is
        true (SGLang reads an absent key as false, vLLM ignores it), so a file without TMA is what it always was.

        Example:
            >>> list(Config(64, 128, 128, 32, 4, 3, USE_TMA=True).to_dict())[-1], len(Config(64, 128, 128, 32).to_dict())
            ('USE_TMA', 6)
        """
        d = asdict(self)
        if not self.USE_TMA:
            del d[TMA_NAME]
        return d

    def params(self) -> dict[str, int | bool]:
        """All seven values, USE_TMA included even when false: what a trial of a space offering TMA suggests."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "Config":
        """Build a Config from a tuned-config entry; keys beyond the seven are ignored, missing ones are an error.

        SGLang's defaults omit num_warps/num_stages for bf16 (its kernel launch falls back to Triton's 4 and 3),
        so those two are optional here with the same fallback; USE_TMA is optional too (false when absent).
        """
        missing = [k for k in PARAM_NAMES[:4] if k not in d]
        if missing:
            raise ValueError(f"config {dict(d)!r} lacks {', '.join(missing)}; a config needs {', '.join(PARAM_NAMES)}")
        values: dict = {k: int(d[k]) for k in PARAM_NAMES if k in d}  # type: ignore[call-overload]
        if d.get(TMA_NAME) is not None:
            tma = d[TMA_NAME]
            if tma not in (True, False, 0, 1, "true", "false", "True", "False"):
                raise ValueError(f"config {dict(d)!r}: USE_TMA must be true or false, got {tma!r}")
            values[TMA_NAME] = tma in (True, 1, "true", "True")
        return cls(**values)

    def __repr__(self) -> str:  # USE_TMA only where true, like to_dict: reprs of configs without TMA are unchanged
        return f"Config({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def __str__(self) -> str:
        return (f"M{self.BLOCK_SIZE_M} N{self.BLOCK_SIZE_N} K{self.BLOCK_SIZE_K} "
                f"G{self.GROUP_SIZE_M} w{self.num_warps} s{self.num_stages}" + (" tma" if self.USE_TMA else ""))


@dataclass(frozen=True, order=True)
class ConfigPair:
    """A config for each GEMM of one fused-MoE call: ``up`` for GEMM1 (gate/up projection), ``down`` for GEMM2.

    SGLang reads them from two files (``<name>.json`` and ``<name>_down.json``); both GEMMs walk one
    ``moe_align_block_size`` result, so they must share BLOCK_SIZE_M.

    Example:
        >>> p = ConfigPair(Config(16, 64, 128, 1, 4, 3), Config(16, 128, 128, 16, 4, 4))
        >>> str(p)
        'up M16 N64 K128 G1 w4 s3 / down M16 N128 K128 G16 w4 s4'
    """

    up: Config
    down: Config

    def __post_init__(self) -> None:
        if self.up.BLOCK_SIZE_M != self.down.BLOCK_SIZE_M:
            raise ValueError(f"a config pair shares BLOCK_SIZE_M (one alignment for both GEMMs); got up "
                             f"{self.up.BLOCK_SIZE_M} and down {self.down.BLOCK_SIZE_M}")

    def __str__(self) -> str:
        return f"up {self.up} / down {self.down}"


def as_config(config: Config | Mapping[str, object]) -> Config:
    """Accept a Config or a dict with the six keys."""
    return config if isinstance(config, Config) else Config.from_dict(config)


def grid(block_k: int | None = None) -> list[Config]:
    """Every config of SGLang's space, in a fixed order; with ``block_k`` only BLOCK_SIZE_K dividing it.

    SGLang and vLLM keep, for block-quantized weights, only BLOCK_SIZE_K with ``block_k % BLOCK_SIZE_K == 0``,
    because the kernel reads one weight scale per K step.

    Example:
        >>> len(grid()), len(grid(block_k=128))
        (1920, 1280)
    """
    ks = [k for k in BLOCK_SIZE_K_CHOICES if block_k is None or block_k % k == 0]
    return [Config(*p) for p in itertools.product(
        BLOCK_SIZE_M_CHOICES, BLOCK_SIZE_N_CHOICES, ks, GROUP_SIZE_M_CHOICES, NUM_WARPS_CHOICES,
        NUM_STAGES_CHOICES)]


def iter_choices(block_k: int | None = None) -> Iterator[tuple[str, Sequence[int]]]:
    """(name, allowed values) for each tunable, with the block-quantization rule applied to BLOCK_SIZE_K."""
    yield "BLOCK_SIZE_M", BLOCK_SIZE_M_CHOICES
    yield "BLOCK_SIZE_N", BLOCK_SIZE_N_CHOICES
    yield "BLOCK_SIZE_K", tuple(k for k in BLOCK_SIZE_K_CHOICES if block_k is None or block_k % k == 0)
    yield "GROUP_SIZE_M", GROUP_SIZE_M_CHOICES
    yield "num_warps", NUM_WARPS_CHOICES
    yield "num_stages", NUM_STAGES_CHOICES


def shared_memory_bytes(config: Config, a_bytes: int, b_bytes: int) -> int:
    """A lower bound of the shared memory a config's GEMM needs: one A and one B tile per pipeline stage.

    Triton's software pipeliner keeps ``num_stages`` copies of the A (BLOCK_SIZE_M x BLOCK_SIZE_K) and
    B (BLOCK_SIZE_K x BLOCK_SIZE_N) tiles in flight. The real figure can be higher (epilogue layout
    conversions), never lower, so rejecting on this estimate never drops a config that would have fit.
    """
    c = config
    return c.num_stages * (c.BLOCK_SIZE_M * c.BLOCK_SIZE_K * a_bytes + c.BLOCK_SIZE_K * c.BLOCK_SIZE_N * b_bytes)


def fits_shared_memory(config: Config, a_bytes: int, b_bytes: int,
                       limit_bytes: int = HOPPER_SHARED_MEMORY_BYTES) -> bool:
    """Whether the config's tiles can fit the device's per-block shared memory (see shared_memory_bytes)."""
    return shared_memory_bytes(config, a_bytes, b_bytes) <= limit_bytes


# Bytes per element of the A (activation) and B (weight) tiles each format's GEMM stages in shared memory
# (SGLang's fused_moe_kernel / fused_moe_kernel_gptq_awq): w8a8 quantizes the activations to 8 bits before the dot;
# w8a16 keeps them 16-bit and loads int8 (uint8 with groups) weights; int4 loads two weights per byte and
# dequantizes in registers, after shared memory. Group scales and zero points are loaded per tile too; they are
# left out, so the estimate stays a lower bound.
OPERAND_BYTES: dict[str | None, tuple[float, float]] = {
    None: (2, 2),
    "fp8_w8a8": (1, 1),
    "int8_w8a8": (1, 1),
    "int8_w8a16": (2, 1),
    "int4_w4a16": (2, 0.5),
}

# BLOCK_SIZE_K of group-quantized weights before the group rule: SGLang's grid (64, 128, 256) plus 32, the
# BLOCK_SIZE_K of SGLang's own default for these formats (get_default_config, M > E). SGLang's tuner keeps only
# BLOCK_SIZE_K dividing the group size (tuning_fused_moe_triton.py: ``block_k % config["BLOCK_SIZE_K"] == 0`` with
# block_k = block_shape[1]), which leaves nothing of its grid for group size 32.
GROUP_BLOCK_SIZE_K_CHOICES = (32, 64, 128, 256)


def operand_bytes(dtype: str | None) -> tuple[float, float]:
    """Bytes per element of the GEMMs' A (activations) and B (weights) operands for a quantization string.

    Example:
        >>> operand_bytes("fp8_w8a8"), operand_bytes(None), operand_bytes("int8_w8a16"), operand_bytes("int4_w4a16")
        ((1, 1), (2, 2), (2, 1), (2, 0.5))
    """
    if dtype not in OPERAND_BYTES:
        raise ValueError(f"unknown quantization dtype {dtype!r}; accepted: None, "
                         f"{', '.join(k for k in OPERAND_BYTES if k)}")
    return OPERAND_BYTES[dtype]


def block_size_k_choices(dtype: str | None, block_shape: Sequence[int] | None = None) -> tuple[int, ...]:
    """The BLOCK_SIZE_K values a weight format allows.

    Block-quantized w8a8 (block_shape [block_n, block_k]) and group-quantized int4_w4a16/int8_w8a16
    (block_shape [0, group_size]) keep the BLOCK_SIZE_K that divide block_k or the group size, SGLang's tuner rule
    for any block_shape, so each K step reads one scale (one group) per row. Group-quantized formats also get 32
    (GROUP_BLOCK_SIZE_K_CHOICES). vLLM's int4 tuner (benchmarks/kernels/tune_moe_wna16_triton.py) keeps the
    opposite, BLOCK_SIZE_K a multiple of the group size, for its CUDA moe_wna16 kernel; the Triton kernel both
    engines share (fused_moe_kernel_gptq_awq) indexes a scale per element and runs either.

    Example:
        >>> block_size_k_choices(None), block_size_k_choices("fp8_w8a8", [128, 128])
        ((64, 128, 256), (64, 128))
        >>> block_size_k_choices("int4_w4a16", [0, 128]), block_size_k_choices("int4_w4a16", [0, 32])
        ((32, 64, 128), (32,))
    """
    group = dtype in ("int8_w8a16", "int4_w4a16") and block_shape is not None and block_shape[0] == 0
    ks = GROUP_BLOCK_SIZE_K_CHOICES if group else BLOCK_SIZE_K_CHOICES
    block_k = block_k_of(block_shape)
    return tuple(k for k in ks if not block_k or block_k % k == 0)


def _grid(ks: Sequence[int]) -> list[Config]:
    return [Config(*p) for p in itertools.product(
        BLOCK_SIZE_M_CHOICES, BLOCK_SIZE_N_CHOICES, ks, GROUP_SIZE_M_CHOICES, NUM_WARPS_CHOICES, NUM_STAGES_CHOICES)]


def block_k_of(block_shape: Sequence[int] | None) -> int | None:
    """The block_k of block-wise quantization (BLOCK_SIZE_K must divide it), or None."""
    return int(block_shape[1]) if block_shape else None


def candidates(dtype: str | None, block_shape: Sequence[int] | None,
               shared_memory_bytes: int = HOPPER_SHARED_MEMORY_BYTES) -> list[Config]:
    """The configs worth proposing: the grid under the format's BLOCK_SIZE_K rule (block_size_k_choices), without
    those whose tiles cannot fit the device's shared memory (operand_bytes).

    Example:
        >>> len(candidates(None, None)), len(candidates("int4_w4a16", [0, 128]))
        (1248, 1840)
    """
    a_bytes, b_bytes = operand_bytes(dtype)
    return [c for c in _grid(block_size_k_choices(dtype, block_shape))
            if fits_shared_memory(c, a_bytes, b_bytes, shared_memory_bytes)]


def tma_refusal(spec) -> str | None:
    """Why a ModelSpec's format or shape cannot take USE_TMA, or None (the device is asked apart: kernel/tma.py).

    SGLang's TMA paths run in its ``fused_moe_kernel`` only (fused_moe_triton_kernels.py: the gptq/awq kernel of
    group-quantized weights takes no descriptor), and its down path reads per-token activation scales of the
    expert-sorted A at the unsorted slot index (``offs_token // top_k``), so per-channel w8a8 is left out. A tensor
    descriptor needs every stride but the last a multiple of 16 bytes: rows of w1 (K), of w2 and of GEMM2's A (N).

    Example:
        >>> from moe_opt.model.spec import ModelSpec
        >>> tma_refusal(ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=4096, intermediate_size=14336)) is None
        True
        >>> tma_refusal(ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=4100, intermediate_size=14336))
        'USE_TMA: rows of K 4100 bf16/fp16 weights are 8200 bytes, not a multiple of 16 (a tensor descriptor needs it)'
    """
    if spec.dtype == "int4_w4a16" or spec.group_size is not None:
        return "USE_TMA: group-quantized weights run SGLang's gptq/awq kernel, which has no TMA path"
    if spec.per_channel_quant and spec.dtype in ("fp8_w8a8", "int8_w8a8"):
        return ("USE_TMA: per-channel w8a8 is left out (SGLang's down path reads the sorted activations' per-token "
                "scales at the unsorted slot index)")
    a_bytes, w_bytes = (1, 1) if spec.dtype in ("fp8_w8a8", "int8_w8a8") else (2, 1) if spec.dtype else (2, 2)
    what = "bf16/fp16" if w_bytes == 2 else "8-bit"
    for name, cols, nbytes in (("K", spec.K, w_bytes), ("N", spec.N, w_bytes), ("N", spec.N, a_bytes)):
        if cols * nbytes % 16:
            kind = f"{what} weights" if nbytes == w_bytes else "activations"
            return (f"USE_TMA: rows of {name} {cols} {kind} are {cols * nbytes} bytes, not a multiple of 16 (a tensor "
                    "descriptor needs it)")
    return None


def _with_tma(configs: list[Config], spec, tma: bool) -> list[Config]:
    """The configs, then (where ``tma`` and the spec allow it) each again with USE_TMA."""
    if not tma or tma_refusal(spec) is not None:
        return configs
    return configs + [replace(c, USE_TMA=True) for c in configs]


def grid_for(spec, tma: bool = False) -> list[Config]:
    """Every config of the space for a ModelSpec's weight format, fitting or not (the exhaustive baseline); with
    ``tma`` (a device with tensor descriptors) each also with USE_TMA where the format allows it (tma_refusal).

    Example:
        >>> from moe_opt.model.spec import ModelSpec
        >>> s = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=4096, intermediate_size=14336,
        ...                          dtype="int4_w4a16", group_size=64)
        >>> sorted({c.BLOCK_SIZE_K for c in grid_for(s)})
        [32, 64]
    """
    return _with_tma(_grid(block_size_k_choices(spec.dtype, spec.block_shape)), spec, tma)


def choices_for(spec, tma: bool = False) -> dict[str, Sequence]:
    """Allowed values of each tunable for a ModelSpec's weight format (the trials' distributions); USE_TMA is one of
    them only where ``tma`` and the format allow it, so a study without TMA has the six params it always had."""
    ks = block_size_k_choices(spec.dtype, spec.block_shape)
    choices: dict[str, Sequence] = {name: ks if name == "BLOCK_SIZE_K" else values for name, values in iter_choices()}
    if tma and tma_refusal(spec) is None:
        choices[TMA_NAME] = TMA_CHOICES
    return choices


def candidates_for(spec, shared_memory_bytes: int = HOPPER_SHARED_MEMORY_BYTES, tma: bool = False) -> list[Config]:
    """candidates() for a ModelSpec: its dtype and block_shape (or group size); with ``tma``, the USE_TMA twins too.

    A TMA config stages the same A and B tiles per pipeline stage (the descriptor copies them into shared memory
    instead of the threads), so the shared-memory estimate is the same.
    """
    return _with_tma(candidates(spec.dtype, spec.block_shape, shared_memory_bytes), spec, tma)


def default_config_for(spec, M: int) -> Config:
    """default_config() for a ModelSpec at batch size M."""
    return default_config(M, spec.E, spec.dtype, spec.block_shape)


def default_config(M: int, E: int, dtype: str | None, block_shape: Sequence[int] | None = None) -> Config:
    """SGLang's fallback config when no tuned file exists (moe_runner/triton_utils/fused_moe_triton_config.py,
    get_default_config).

    Only fp8_w8a8 has configs of its own there (per-tensor and per-channel alike, per block shape); int8_w8a8,
    int8_w8a16 and int4_w4a16 take the unquantized ones, whatever their block_shape or group size. (vLLM's default
    for group-quantized int4/int8 differs: it sets BLOCK_SIZE_M only and lets get_moe_wna16_block_config pick N and
    K.) With group size 32 the M <= E default's BLOCK_SIZE_K 64 spans two groups; SGLang's gptq/awq kernel indexes
    scales per element and runs it.

    Example:
        >>> str(default_config(64, 256, "fp8_w8a8", [128, 128]))
        'M64 N128 K128 G32 w4 s3'
        >>> str(default_config(1, 8, "int4_w4a16", [0, 128])), str(default_config(64, 8, "int8_w8a8"))
        ('M16 N32 K64 G1 w4 s3', 'M64 N64 K32 G8 w4 s3')
    """
    if dtype == "fp8_w8a8":
        if block_shape is None:
            if M <= E:
                return Config(64, 128, 128, 1, 4, 4)
            return Config(128, 256, 128, 32, 8, 4)
        # SGLang: BLOCK_SIZE_N = block_n and BLOCK_SIZE_K = block_k, so the kernel reads one scale per tile.
        return Config(64, int(block_shape[0]), int(block_shape[1]), 32, 4, 3)
    if M <= E:
        return Config(16, 32, 64, 1, 4, 3)
    # SGLang gives BLOCK_SIZE_K 32 and GROUP_SIZE_M 8 here; both lie outside the tuning grid but are valid.
    return Config(64, 64, 32, 8, 4, 3)


def block_m_for_tokens(M: int, topk: int, E: int) -> int:
    """The BLOCK_SIZE_M that holds one expert's share of a batch: the smallest power of two >= M * topk / E (the
    routed tokens per expert when routing is even), from 16 to 128.

    A smaller block re-reads the expert's weights for each block of its tokens; a larger one pads them. On the five
    recorded full-grid tables (moe_opt/data) the optimum's BLOCK_SIZE_M is this value at 22 of 26 batch sizes, one
    step from it at 3 and two steps at one (Mixtral-8x7B TP8, M=64: 16 here, 64 there).

    Example:
        >>> block_m_for_tokens(1024, 6, 256), block_m_for_tokens(1, 8, 128), block_m_for_tokens(4096, 2, 8)
        (32, 16, 128)
    """
    tokens = M * topk / E
    block_m = 16
    while block_m < tokens and block_m < 128:
        block_m *= 2
    return block_m


def vllm_default_config(M: int, E: int, N: int, K: int, topk: int, dtype: str | None,
                        block_shape: Sequence[int] | None = None) -> Config:
    """vLLM's fallback config when no tuned file exists (vllm/model_executor/layers/fused_moe/fused_moe.py,
    get_default_config; its keys without num_warps/num_stages launch with Triton's 4 and 3).

    Unlike SGLang's, per-tensor and per-channel fp8 get no configs of their own (only block-wise fp8 does), and
    group-quantized int4_w4a16/int8_w8a16 (block_shape [0, group]) set BLOCK_SIZE_M by M (16 up to M 20, 32 up to
    40, else 64) with GROUP_SIZE_M 1, and get_moe_wna16_block_config adds BLOCK_SIZE_N/BLOCK_SIZE_K for the Triton
    kernel: 32/64 at one token (``num_valid_tokens // top_k == 1``), else 64/32. (Where vLLM would run its CUDA
    moe_wna16 kernel instead, int4 with group 32/64/128 and M * topk / E <= 6, no Triton config applies; the
    Triton kernel's is returned.) N, K and topk are vLLM's arguments; only the wna16 rule reads topk.

    Example:
        >>> str(vllm_default_config(1, 8, 14336, 4096, 2, None)), str(vllm_default_config(64, 8, 14336, 4096, 2, None))
        ('M16 N32 K64 G1 w4 s3', 'M64 N64 K32 G8 w4 s3')
        >>> str(vllm_default_config(64, 256, 256, 4096, 6, "fp8_w8a8", [128, 128]))
        'M64 N128 K128 G32 w4 s3'
        >>> str(vllm_default_config(1, 128, 768, 2048, 8, "fp8_w8a8")), str(vllm_default_config(30, 128, 768, 2048, 8, "int4_w4a16", [0, 128]))
        ('M16 N32 K64 G1 w4 s3', 'M32 N64 K32 G1 w4 s3')
    """
    if dtype == "fp8_w8a8" and block_shape is not None:
        return Config(64, int(block_shape[0]), int(block_shape[1]), 32, 4, 3)
    if dtype in ("int4_w4a16", "int8_w8a16") and block_shape is not None:
        block_m = 16 if M <= 20 else 32 if M <= 40 else 64
        block_n, block_k = (32, 64) if M == 1 else (64, 32)  # num_valid_tokens // real_top_k == 1: one token
        return Config(block_m, block_n, block_k, 1, 4, 3)
    if M <= E:
        return Config(16, 32, 64, 1, 4, 3)
    return Config(64, 64, 32, 8, 4, 3)


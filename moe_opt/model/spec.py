"""ModelSpec: everything about one MoE layer shape that the tuner builds, times and names.

A spec is made by :func:`moe_opt.resolve_model` from a model id or config file, or directly with
:meth:`ModelSpec.from_shape`. It is immutable and hashable; the study names and config file names derive from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import SpecError

# The quantization strings of SGLang's tuner (`--dtype`, tuning_fused_moe_triton.py) as its config file names spell
# them (`dtype=` part), or None for bf16/fp16 weights.
SUPPORTED_QUANT_DTYPES = ("fp8_w8a8", "int8_w8a8", "int8_w8a16", "int4_w4a16")
# Weight-only formats whose weights can come in groups along K. Their group size travels as block_shape
# [0, group_size], as SGLang passes it to fused_experts (quantization/moe_wna16.py) and its tuner builds it from a
# compressed-tensors group_size (benchmark/kernels/fused_moe_triton/common_utils.py, get_model_config).
GROUP_QUANT_DTYPES = ("int8_w8a16", "int4_w4a16")
# The smallest group size: SGLang's moe_wna16 asserts group_size >= 32 while fitting it to the shapes, and the
# smallest BLOCK_SIZE_K moe_opt proposes for group-quantized weights is 32 (space.block_size_k_choices).
MIN_GROUP_SIZE = 32
# Upper bounds well past every released MoE (hidden sizes up to 16384, expert intermediate sizes up to 32768, at most
# 512 experts): a config beyond them is a typo or a unit mix-up and would ask for weights no GPU holds.
MAX_HIDDEN_SIZE = 65_536
MAX_INTERMEDIATE_SIZE = 1_048_576
MAX_NUM_EXPERTS = 16_384
MAX_PARALLEL_SIZE = 4_096
# Activation dtypes by name; torch.dtype objects are looked up when used (``import moe_opt`` stays light).
ACTIVATION_DTYPES = ("bfloat16", "float16")
# "silu": SwiGLU with gate = first half of w1's output (optionally clamped by swiglu_limit).
# "swigluoai": GPT-OSS's clamped SwiGLU (alpha 1.702, limit 7, interleaved gate/up, +1 on up, biases). The spec
# records it so such models resolve, but the kernel does not implement it: tuning refuses it (kernel.SUPPORTED_ACTIVATIONS).
ACTIVATIONS = ("silu", "swigluoai")


@dataclass(frozen=True)
class ModelSpec:
    """The shape and numerics of one fused-MoE layer, per rank.

    Attributes:
        num_experts: E, experts on one EP rank, plus a fused shared expert where one is fused in.
        topk: experts per token, counting a fused shared expert.
        hidden_size: K, the model width (input and output of the MoE layer).
        intermediate_size: the model's moe_intermediate_size, before tensor parallelism.
        tp_size, ep_size: tensor / expert parallel sizes; the intermediate is split tp_size // ep_size ways.
        dtype: the quantization string of the config file names ("fp8_w8a8", "int8_w8a8", "int8_w8a16",
            "int4_w4a16"), or None for bf16/fp16 weights.
        torch_dtype: activation dtype, "bfloat16" or "float16".
        block_shape: [block_n, block_k] of block-wise w8a8 quantization; [0, group_size] for group-quantized
            int8_w8a16/int4_w4a16 (GPTQ, AWQ, compressed-tensors groups); None otherwise.
        per_channel_quant: w8a8 with one weight scale per output channel and per-token activation scales (SGLang's
            per_channel_quant; int8_w8a8 needs it or a block_shape).
        activation: "silu" (SwiGLU: silu(gate) * up, gate = first half of w1's output) or "swigluoai"
            (GPT-OSS; recorded, not tunable).
        swiglu_limit: DeepSeek-V4's clamp L: silu(min(gate, L)) * clamp(up, -L, L); None for none.
        model, architecture: where the spec came from (informational).
        num_moe_layers: MoE layers in the model (informational).
        num_fused_shared_experts: shared experts fused into E and topk (SGLang's shared-expert fusion).
        checkpoint_expert_dtype: how the checkpoint stores routed experts ("fp8", "fp4", "int4", "bf16", ...).
        has_zero_point: group-quantized weights carry zero points (GPTQ sym false, AWQ zero_point true,
            compressed-tensors symmetric false); without them the kernel subtracts 8 (int4) or 128 (uint8).

    Example:
        >>> s = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=4096, intermediate_size=14336, tp_size=2)
        >>> s.N, s.shard_intermediate_size
        (7168, 14336)
    """

    num_experts: int
    topk: int
    hidden_size: int
    intermediate_size: int
    tp_size: int = 1
    ep_size: int = 1
    dtype: str | None = None
    torch_dtype: str = "bfloat16"
    block_shape: tuple[int, int] | None = None
    per_channel_quant: bool = False
    activation: str = "silu"
    swiglu_limit: float | None = None
    model: str | None = None
    architecture: str | None = None
    num_moe_layers: int | None = None
    num_fused_shared_experts: int = 0
    checkpoint_expert_dtype: str | None = None
    has_zero_point: bool = False

    def __post_init__(self) -> None:
        limits = {"num_experts": MAX_NUM_EXPERTS, "topk": MAX_NUM_EXPERTS, "hidden_size": MAX_HIDDEN_SIZE,
                  "intermediate_size": MAX_INTERMEDIATE_SIZE, "tp_size": MAX_PARALLEL_SIZE,
                  "ep_size": MAX_PARALLEL_SIZE}
        for name, limit in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise SpecError(f"{name} must be an integer from 1 to {limit}, got {value!r}")
        if self.tp_size % self.ep_size:
            raise SpecError(f"tp_size {self.tp_size} must be a multiple of ep_size {self.ep_size} "
                            "(SGLang splits the intermediate size tp_size // ep_size ways)")
        moe_tp = self.tp_size // self.ep_size
        if self.intermediate_size % moe_tp:
            raise SpecError(f"intermediate_size {self.intermediate_size} is not divisible by tp_size/ep_size = "
                            f"{moe_tp}; use a tp_size/ep_size that divides it")
        if self.topk > self.num_experts:
            raise SpecError(f"topk {self.topk} exceeds num_experts {self.num_experts}")
        if self.dtype is not None and self.dtype not in SUPPORTED_QUANT_DTYPES:
            raise SpecError(f"unsupported dtype {self.dtype!r}; accepted: None (bf16/fp16 weights) or "
                            f"{', '.join(SUPPORTED_QUANT_DTYPES)}")
        if self.torch_dtype not in ACTIVATION_DTYPES:
            raise SpecError(f"unsupported torch_dtype {self.torch_dtype!r}; accepted: {', '.join(ACTIVATION_DTYPES)}")
        if self.activation not in ACTIVATIONS:
            raise SpecError(f"unsupported activation {self.activation!r}; accepted: {', '.join(ACTIVATIONS)}")
        for name in ("per_channel_quant", "has_zero_point"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.block_shape is not None:
            bs = tuple(self.block_shape)
            if len(bs) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in bs):
                raise SpecError(f"block_shape must be two integers [block_n, block_k] (or [0, group_size]), got "
                                f"{self.block_shape!r}")
            object.__setattr__(self, "block_shape", bs)
        self._check_quantization()
        if self.swiglu_limit is not None:
            limit = self.swiglu_limit
            if (isinstance(limit, bool) or not isinstance(limit, numbers.Real) or not math.isfinite(limit)
                    or not limit > 0):
                raise SpecError(f"swiglu_limit must be a positive finite number or None, got {limit!r}")
            object.__setattr__(self, "swiglu_limit", float(limit))

    def _check_quantization(self) -> None:
        """The combinations of dtype, block_shape, per_channel_quant and has_zero_point SGLang's kernel runs."""
        dtype, bs = self.dtype, self.block_shape
        if dtype is None:
            given = {"block_shape": bs is not None, "per_channel_quant": self.per_channel_quant,
                     "has_zero_point": self.has_zero_point}
            extra = [name for name, on in given.items() if on]
            if extra:
                raise SpecError(f"{', '.join(extra)} needs a quantized dtype ({', '.join(SUPPORTED_QUANT_DTYPES)}); "
                                "bf16/fp16 weights (dtype None) take none")
            return
        if dtype in GROUP_QUANT_DTYPES:
            if self.per_channel_quant:
                raise SpecError(f"per_channel_quant is for fp8_w8a8/int8_w8a8 (per-token activations); {dtype} takes "
                                "block_shape [0, group_size] or, int8_w8a16 only, none (one scale per channel)")
            if bs is None:
                if dtype == "int4_w4a16":
                    raise SpecError("int4_w4a16 needs a group size: block_shape [0, group_size] (SGLang runs int4 "
                                    "weights only group-quantized)")
                if self.has_zero_point:
                    raise SpecError("has_zero_point needs a group size: block_shape [0, group_size] (per-channel "
                                    "int8_w8a16 has no zero points)")
                return
            if bs[0] != 0 or bs[1] < 1:
                raise SpecError(f"{dtype} takes block_shape [0, group_size] (the group size along K), got {list(bs)}")
            group = bs[1]
            if group % MIN_GROUP_SIZE:
                raise SpecError(f"group size {group} must be a multiple of {MIN_GROUP_SIZE} (BLOCK_SIZE_K must divide "
                                "it; SGLang's moe_wna16 needs >= 32)")
            if self.hidden_size % group or self.N % group:
                raise SpecError(f"group size {group} must divide hidden_size {self.hidden_size} and N {self.N}")
            return
        # fp8_w8a8, int8_w8a8
        if self.has_zero_point:
            raise SpecError(f"has_zero_point is for group-quantized int8_w8a16/int4_w4a16, not {dtype}")
        if bs is not None and self.per_channel_quant:
            raise SpecError(f"{dtype}: block_shape {list(bs)} and per_channel_quant exclude each other (block scales "
                            "or per-channel scales)")
        if bs is None:
            if dtype == "int8_w8a8" and not self.per_channel_quant:
                raise SpecError("int8_w8a8 needs per_channel_quant=True or a block_shape: SGLang's kernel has no "
                                "per-tensor int8 (\"int8 quantization only supports channel-wise quantization except "
                                "for block-wise quantization\")")
            return
        block_n, block_k = bs
        if not block_n or not block_k:
            raise SpecError(f"{dtype} block_shape must be two positive integers [block_n, block_k], got {list(bs)}")
        if self.hidden_size % block_k or self.N % block_k:
            raise SpecError(f"block_shape {list(bs)}: block_k {block_k} must divide hidden_size "
                            f"{self.hidden_size} and N {self.N}")
        if (2 * self.N) % block_n or self.hidden_size % block_n:
            raise SpecError(f"block_shape {list(bs)}: block_n {block_n} must divide 2N {2 * self.N} "
                            f"and hidden_size {self.hidden_size}")

    @classmethod
    def from_shape(cls, *, num_experts: int, topk: int, hidden_size: int, intermediate_size: int,
                   dtype: str | None = None, torch_dtype: str = "bfloat16",
                   block_shape: Sequence[int] | None = None, tp_size: int = 1, ep_size: int = 1,
                   swiglu_limit: float | None = None, group_size: int | None = None,
                   **extra: Any) -> "ModelSpec":
        """A spec from explicit shapes, no model needed.

        ``num_experts`` is the model's expert count; with ``ep_size`` > 1 it is split across EP ranks
        (it must divide), as the spec holds the per-rank E. ``group_size`` is the K group of int4_w4a16/int8_w8a16
        weights, the same as ``block_shape=[0, group_size]``. ``per_channel_quant`` and ``has_zero_point`` pass
        through ``extra``.

        Example:
            >>> s = ModelSpec.from_shape(num_experts=256, topk=8, hidden_size=7168, intermediate_size=2048,
            ...                          dtype="fp8_w8a8", block_shape=[128, 128], tp_size=8)
            >>> s.config_file_name("NVIDIA H100 80GB HBM3")
            'E=256,N=256,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128, 128].json'
            >>> s = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=4096, intermediate_size=14336,
            ...                          dtype="int4_w4a16", group_size=128, has_zero_point=True, tp_size=2)
            >>> s.block_shape, s.group_size, s.config_file_name("NVIDIA H100 80GB HBM3")
            ((0, 128), 128, 'E=8,N=7168,device_name=NVIDIA_H100_80GB_HBM3,dtype=int4_w4a16.json')
        """
        if (isinstance(num_experts, bool) or not isinstance(num_experts, int) or isinstance(ep_size, bool)
                or not isinstance(ep_size, int) or ep_size < 1):
            raise SpecError(f"num_experts and ep_size must be positive integers, got {num_experts!r}, {ep_size!r}")
        if num_experts % ep_size:
            raise SpecError(f"num_experts {num_experts} is not divisible by ep_size {ep_size}")
        if group_size is not None:
            if block_shape is not None:
                raise SpecError(f"give group_size or block_shape, not both (group_size {group_size} is block_shape "
                                f"[0, {group_size}])")
            if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
                raise SpecError(f"group_size must be a positive integer, got {group_size!r}")
            block_shape = (0, group_size)
        return cls(num_experts=num_experts // ep_size, topk=topk, hidden_size=hidden_size,
                   intermediate_size=intermediate_size, tp_size=tp_size, ep_size=ep_size, dtype=dtype,
                   torch_dtype=torch_dtype, block_shape=tuple(block_shape) if block_shape is not None else None,
                   swiglu_limit=swiglu_limit, **extra)

    # Derived sizes, named as SGLang's tuner names them.
    @property
    def E(self) -> int:
        return self.num_experts

    @property
    def N(self) -> int:
        """Per-rank intermediate size: the N of config file names."""
        return self.intermediate_size // (self.tp_size // self.ep_size)

    @property
    def K(self) -> int:
        return self.hidden_size

    @property
    def shard_intermediate_size(self) -> int:
        """Rows of w1 per expert on one rank (gate and up stacked): 2N."""
        return 2 * self.N

    @property
    def group_size(self) -> int | None:
        """The K group size of group-quantized int4_w4a16/int8_w8a16 weights (block_shape [0, group_size]), else
        None."""
        if self.dtype in GROUP_QUANT_DTYPES and self.block_shape is not None:
            return self.block_shape[1]
        return None

    @property
    def activation_dtype(self):
        """The activation dtype as a torch.dtype."""
        import torch

        return getattr(torch, self.torch_dtype)

    def replace(self, **changes: Any) -> "ModelSpec":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def config_file_name(self, device_name: str, *, engine: str = "sglang", down: bool = False) -> str:
        """The tuned-config file name SGLang or vLLM looks up for this shape on ``device_name``.

        Both engines name a file ``E=..,N=..,device_name=..[,dtype=..][,block_shape=..]``, N being the per-rank
        intermediate size for every format (int4 included); the block shape appears only when ``all(block_shape)``,
        so a group size ([0, group_size]) never does. SGLang (``get_config_file_name`` in
        moe_runner/triton_utils/fused_moe_triton_config.py) writes the block shape as a Python list (``[128, 128]``,
        with a space) and appends ``,per_channel_quant=True`` and ``_down``. vLLM (``get_config_file_name`` in
        vllm/model_executor/layers/fused_moe/fused_moe.py) removes the space, names every H200 variant
        ``NVIDIA_H200``, has no per_channel_quant part, and has no dtype for int8_w8a8: its ``_get_config_dtype_str``
        (fused_moe/config.py) knows fp8_w8a8, int8_w8a16 and int4_w4a16 only.

        Example:
            >>> s = ModelSpec.from_shape(num_experts=160, topk=8, hidden_size=5120, intermediate_size=1536, tp_size=8,
            ...                          dtype="fp8_w8a8", per_channel_quant=True)
            >>> s.config_file_name("NVIDIA H200"), s.config_file_name("NVIDIA H200", engine="vllm")
            ('E=160,N=192,device_name=NVIDIA_H200,dtype=fp8_w8a8,per_channel_quant=True.json', \
'E=160,N=192,device_name=NVIDIA_H200,dtype=fp8_w8a8.json')
        """
        if engine not in ("sglang", "vllm"):
            raise ValueError(f"engine must be 'sglang' or 'vllm', got {engine!r}")
        device = device_name.replace(" ", "_")
        dtype = self.dtype
        block = ""
        if self.block_shape and all(self.block_shape):
            block = f",block_shape={list(self.block_shape)}"
        if engine == "vllm":
            if "H200" in device.split("_"):
                device = "NVIDIA_H200"
            block = block.replace(" ", "")
            dtype = None if dtype == "int8_w8a8" else dtype
        name = f"E={self.E},N={self.N},device_name={device}"
        name += f",dtype={dtype}" if dtype else ""
        name += block
        if engine == "sglang":
            name += ",per_channel_quant=True" if self.per_channel_quant else ""
            name += "_down" if down else ""
        return name + ".json"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus the derived E, N, K (for study attributes and `moe-opt resolve --json`)."""
        d = dataclasses.asdict(self)
        d["block_shape"] = list(self.block_shape) if self.block_shape else None
        d.update(E=self.E, N=self.N, K=self.K, shard_intermediate_size=self.shard_intermediate_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        """Inverse of :meth:`to_dict` (derived keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("block_shape") is not None:
            kwargs["block_shape"] = tuple(kwargs["block_shape"])
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def slug(self) -> str:
        """A file-system-safe short name: the model's name if known, else the shape."""
        if self.model:
            base = self.model.rstrip("/").split("/")[-1]
        else:
            base = f"E{self.E}_N{self.N}_K{self.K}_top{self.topk}"
        return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in base)

    def __str__(self) -> str:
        quant = self.dtype or self.torch_dtype
        if self.group_size is not None:
            quant += f" group{self.group_size}" + (" zero-point" if self.has_zero_point else "")
        elif self.block_shape:
            quant += f" block{list(self.block_shape)}"
        if self.per_channel_quant:
            quant += " per-channel"
        limit = f" swiglu_limit={self.swiglu_limit:g}" if self.swiglu_limit is not None else ""
        return f"E={self.E} N={self.N} K={self.K} topk={self.topk} {quant}{limit}"

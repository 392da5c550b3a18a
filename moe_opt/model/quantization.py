"""A checkpoint's quantization_config -> the weight format SGLang's fused-MoE Triton kernel runs its experts in.

The formats are those of SGLang's tuner (``--dtype`` in benchmark/kernels/fused_moe_triton/tuning_fused_moe_triton.py):
``fp8_w8a8`` (block, per-channel or per-tensor scales), ``int8_w8a8`` (per-channel or block), ``int8_w8a16`` and
``int4_w4a16`` (group size as block_shape [0, group_size], optional zero points; int8 also per channel). What maps to
what follows the engines' quantization methods:

- ``fp8``: block fp8 with ``weight_block_size``, else per-tensor (SGLang's Fp8MoEMethod keeps one weight scale per
  expert without a block size, whatever the activation scheme).
- ``gptq`` / ``awq``: SGLang's moe_wna16 (quantization/moe_wna16.py): GPTQ with bits 4 or 8 and ``desc_act`` false,
  zero points when ``sym`` is false; AWQ with bits 4, zero points per ``zero_point``; block_shape [0, group_size],
  the group size halved until it divides the shapes (fit_group_size).
- ``compressed-tensors``: the first config group, as SGLang's tuner reads it (common_utils.py); weights ``float`` 8
  with input activations -> fp8_w8a8 by ``strategy`` (block, channel = per_channel_quant, tensor); ``int`` 8 with
  input activations -> int8_w8a8 (channel, block); ``int`` 8 or 4 without -> int8_w8a16 / int4_w4a16 (group;
  int8 also channel); zero points when ``symmetric`` is false.

Anything else (NVFP4, MXFP4 in compressed-tensors, 2- or 3-bit, W4A8, per-tensor int8, ...) is recorded as
unsupported; the resolver refuses it unless a dtype is chosen explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import SpecError
from .spec import MIN_GROUP_SIZE

# What the resolver accepts from a checkpoint, for error messages.
SUPPORTED_SCHEMES = ("fp8 (block, per-channel or per-tensor), int8 w8a8 (per-channel or block), int4/int8 "
                     "weight-only with a group size (GPTQ, AWQ, compressed-tensors; int8 also per channel)")


@dataclass(frozen=True)
class WeightFormat:
    """How a checkpoint's routed experts are quantized, in ModelSpec's terms.

    Attributes:
        dtype, block_shape, per_channel_quant, has_zero_point: as ModelSpec's (dtype None: bf16/fp16 weights).
        expert_dtype: how the checkpoint stores the experts ("fp8", "int4", "mxfp4", ...), for
            ModelSpec.checkpoint_expert_dtype; None when unquantized.
        unsupported: the scheme when moe-opt cannot tune it ("compressed-tensors nvfp4", ...), else None.
        fits_group_to_shape: the engine halves the group size until it divides N and the hidden size (SGLang's and
            vLLM's moe_wna16 for GPTQ/AWQ).
    """

    dtype: str | None = None
    block_shape: tuple[int, int] | None = None
    per_channel_quant: bool = False
    has_zero_point: bool = False
    expert_dtype: str | None = None
    unsupported: str | None = None
    fits_group_to_shape: bool = False

    @property
    def group_size(self) -> int | None:
        """The K group size of group-quantized weights, else None."""
        return self.block_shape[1] if self.block_shape is not None and self.block_shape[0] == 0 else None


def checkpoint_format(fields: Mapping[str, Any], where: str) -> WeightFormat:
    """The weight format a config's ``quantization_config`` (and DeepSeek-V4's ``expert_dtype``) describes.

    Args:
        fields: the config's fields (text_config lifted to the top).
        where: the config's name in error messages (model id, file).

    Raises:
        SpecError: a malformed quantization_config (wrong types, missing keys). A well-formed scheme moe-opt cannot
            tune is not an error here: it comes back with ``unsupported`` set.

    Example:
        >>> qc = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
        >>> checkpoint_format({"quantization_config": qc}, "config.json")
        WeightFormat(dtype='int4_w4a16', block_shape=(0, 128), per_channel_quant=False, has_zero_point=True, \
expert_dtype='int4', unsupported=None, fits_group_to_shape=True)
    """
    expert_dtype = fields.get("expert_dtype")  # DeepSeek-V4: "fp4" routed experts inside an fp8 checkpoint
    if expert_dtype is not None and not isinstance(expert_dtype, str):
        raise SpecError(f"{where}: config field 'expert_dtype' must be a string such as 'fp4', got {expert_dtype!r}")
    qc = fields.get("quantization_config")
    if not qc:
        return WeightFormat(expert_dtype=expert_dtype)
    if not isinstance(qc, Mapping):
        raise SpecError(f"{where}: quantization_config must be an object, got {qc!r}")
    method = qc.get("quant_method", "")
    if not isinstance(method, str):
        raise SpecError(f"{where}: quantization_config.quant_method must be a string, got {method!r}")
    method = method.lower()
    parse = _METHODS.get(method)
    if parse is None:
        return WeightFormat(expert_dtype=expert_dtype or method or None, unsupported=repr(method or dict(qc)))
    return parse(_Reader(qc, where, "quantization_config"), expert_dtype)


def fit_group_size(group_size: int, n: int, hidden_size: int, where: str) -> int:
    """The group size SGLang's moe_wna16 runs: halved until it divides N and the hidden size, staying >= 32.

    MoeWNA16Method.create_weights (SGLang quantization/moe_wna16.py, adapted from vLLM's) shrinks the group and
    repeats the loaded scales, so e.g. group 128 at N 320 (Qwen2-57B-A14B at TP 8) runs as group 64.

    Example:
        >>> fit_group_size(128, 320, 3584, "config.json")
        64
    """
    group = group_size
    while n % group or hidden_size % group:
        group //= 2
        if group < MIN_GROUP_SIZE:
            raise SpecError(f"{where}: group size {group_size} cannot be halved to a group size >= {MIN_GROUP_SIZE} "
                            f"dividing N {n} and hidden_size {hidden_size} (SGLang's moe_wna16 rule); use another "
                            "tp_size")
    return group


class _Reader:
    """Typed reads from one object of a quantization_config; a wrong type is a one-line SpecError naming the key."""

    def __init__(self, obj: Mapping[str, Any], where: str, path: str) -> None:
        self.obj, self.where, self.path = obj, where, path

    def _fail(self, key: str, accepted: str, value: Any) -> SpecError:
        return SpecError(f"{self.where}: {self.path}.{key} must be {accepted}, got {value!r}")

    def integer(self, *keys: str, default: Any = ..., accepted: str = "an integer") -> Any:
        for key in keys:
            if key in self.obj and self.obj[key] is not None:
                value = self.obj[key]
                if isinstance(value, bool) or not isinstance(value, int):
                    raise self._fail(key, accepted, value)
                return value
        if default is ...:
            raise SpecError(f"{self.where}: {self.path} has no {' or '.join(repr(k) for k in keys)} ({accepted})")
        return default

    def flag(self, key: str, default: bool) -> bool:
        value = self.obj.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self.obj.get(key, default)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._fail(key, "a string", value)
        return value.lower()

    def block(self, key: str) -> tuple[int, int] | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            raise self._fail(key, "two positive integers [block_n, block_k]", value)
        return int(value[0]), int(value[1])

    def object(self, key: str, required: bool = True) -> _Reader | None:
        value = self.obj.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, Mapping):
            raise self._fail(key, "an object", value)
        return _Reader(value, self.where, f"{self.path}.{key}")


def _fp8(qc: _Reader, expert_dtype: str | None) -> WeightFormat:
    return WeightFormat("fp8_w8a8", qc.block("weight_block_size"), expert_dtype=expert_dtype or "fp8")


def _mxfp4(qc: _Reader, expert_dtype: str | None) -> WeightFormat:
    # GPT-OSS: MXFP4 experts run by other kernels; the spec records them and tunes unquantized (docs/models.md).
    return WeightFormat(expert_dtype="mxfp4")


def _gptq(qc: _Reader, expert_dtype: str | None) -> WeightFormat:
    bits = qc.integer("bits")
    group = qc.integer("group_size", accepted="an integer (-1 for per channel)")
    label = f"gptq int{bits}"
    # SGLang's MoeWNA16Config.is_moe_wna16_compatible: GPTQ with bits 4 or 8 and desc_act false.
    if bits not in (4, 8):
        return WeightFormat(expert_dtype=f"int{bits}", unsupported=label)
    if qc.flag("desc_act", False):
        return WeightFormat(expert_dtype=f"int{bits}", unsupported=f"{label} with desc_act (act-order runs on "
                                                                   "Marlin only)")
    if group < 1:
        return WeightFormat(expert_dtype=f"int{bits}", unsupported=f"{label} per channel (group_size {group})")
    return WeightFormat("int4_w4a16" if bits == 4 else "int8_w8a16", (0, group),
                        has_zero_point=not qc.flag("sym", True), expert_dtype=f"int{bits}", fits_group_to_shape=True)


def _awq(qc: _Reader, expert_dtype: str | None) -> WeightFormat:
    # config.json spells them bits/group_size; AutoAWQ's quant_config.json w_bit/q_group_size.
    bits = qc.integer("bits", "w_bit")
    group = qc.integer("group_size", "q_group_size")
    if bits != 4:  # MoeWNA16Config.is_moe_wna16_compatible: AWQ with 4 bits
        return WeightFormat(expert_dtype=f"int{bits}", unsupported=f"awq int{bits}")
    if group < 1:
        return WeightFormat(expert_dtype="int4", unsupported=f"awq int4 per channel (group_size {group})")
    return WeightFormat("int4_w4a16", (0, group), has_zero_point=qc.flag("zero_point", True), expert_dtype="int4",
                        fits_group_to_shape=True)


def _compressed_tensors(qc: _Reader, expert_dtype: str | None) -> WeightFormat:
    groups = qc.obj.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise qc._fail("config_groups", "an object of config groups ({name: {weights: ...}})", groups)
    name = next(iter(groups))
    group = _Reader(groups, qc.where, f"{qc.path}.config_groups").object(name)
    weights = group.object("weights")
    acts = group.object("input_activations", required=False)
    fmt = group.text("format") or qc.text("format") or ""
    kind, bits = weights.text("type", "int"), weights.integer("num_bits")
    group_size = weights.integer("group_size", default=None)
    # compressed-tensors' QuantizationArgs infers a missing strategy from group_size: none -> tensor, > 0 -> group,
    # -1 -> channel.
    strategy = weights.text("strategy") or ("tensor" if group_size is None else "group" if group_size > 0 else
                                            "channel")
    symmetric = weights.flag("symmetric", True)
    label = f"compressed-tensors {'fp' if kind == 'float' else kind}{bits} {strategy}"
    stored = "fp8" if (kind, bits) == ("float", 8) else f"{kind}{bits}" if kind == "int" else None

    def unsupported(scheme: str = label) -> WeightFormat:
        return WeightFormat(expert_dtype=stored or scheme.split()[-1], unsupported=scheme)

    if "nvfp4" in fmt or (kind, bits, group_size) == ("float", 4, 16):
        return WeightFormat(expert_dtype="nvfp4", unsupported="compressed-tensors nvfp4")
    if "mxfp4" in fmt or (kind, bits) == ("float", 4):
        return WeightFormat(expert_dtype="mxfp4", unsupported="compressed-tensors mxfp4")
    if (kind, bits) == ("float", 8):
        if acts is None:
            return unsupported(f"{label} weight-only (fp8_w8a16 is not one of SGLang's tuner formats)")
        if strategy == "block":
            return WeightFormat("fp8_w8a8", weights.block("block_structure") or _missing(weights, "block_structure"),
                                expert_dtype="fp8")
        if strategy in ("channel", "tensor"):
            # SGLang's CompressedTensorsW8A8Fp8MoEMethod: per_channel_quant = (weight strategy == CHANNEL).
            return WeightFormat("fp8_w8a8", per_channel_quant=strategy == "channel", expert_dtype="fp8")
        return unsupported()
    if kind != "int" or bits not in (4, 8):
        return unsupported()
    if acts is not None:  # int8_w8a8; int4 weights with int8 activations (W4A8) are not a tuner format
        if bits != 8:
            return unsupported(f"{label} with {acts.text('type', 'int')}{acts.integer('num_bits', default='?')} "
                               "activations (W4A8)")
        if strategy == "block":
            return WeightFormat("int8_w8a8", weights.block("block_structure") or _missing(weights, "block_structure"),
                                expert_dtype="int8")
        if strategy == "channel":  # SGLang's int8 fused MoE: per-channel weights, per-token activations
            return WeightFormat("int8_w8a8", per_channel_quant=True, expert_dtype="int8")
        return unsupported(f"{label} (SGLang's int8_w8a8 runs per-channel or block scales only)")
    if strategy == "group":
        if group_size is None or group_size < 1:
            raise weights._fail("group_size", "a positive integer with strategy 'group'", group_size)
        return WeightFormat("int4_w4a16" if bits == 4 else "int8_w8a16", (0, group_size),
                            has_zero_point=not symmetric, expert_dtype=stored)
    if bits == 4:
        return unsupported(f"{label} (int4 weights need a group size)")
    if strategy == "channel":
        if not symmetric:
            return unsupported(f"{label} asymmetric (per-channel int8_w8a16 has no zero points)")
        return WeightFormat("int8_w8a16", expert_dtype="int8")  # one scale per output channel
    return unsupported()


def _missing(reader: _Reader, key: str) -> Any:
    raise SpecError(f"{reader.where}: {reader.path} has no {key!r} (two integers [block_n, block_k] for strategy "
                    "'block')")


_METHODS = {"fp8": _fp8, "mxfp4": _mxfp4, "gptq": _gptq, "awq": _awq, "compressed-tensors": _compressed_tensors}

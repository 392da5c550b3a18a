"""Study identity: one Optuna study per batch size, named from everything that changes what is measured, so the
same tune resumes the same studies and different measurements never share one.

A study's name holds the shape, the measurement source (a GPU by name, the CPU interpreter, or a replay of a
named table), the Triton version, the kernel backend and its version, and the batch size. Its user attributes
repeat those facts so the study explains itself in optuna-dashboard and ``moe-opt export STORAGE`` can rebuild
config files from storage alone.

Studies written before the source and kernel were part of the name (moe_opt 0.1, ``schema`` attribute absent)
are read as before: their source is their device name and their kernel the builtin one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..model.spec import ModelSpec

STUDY_PREFIX = "moe"
SCHEMA_VERSION = 2  # user attribute "schema"; studies of moe_opt 0.1 have none
REPLAY_SOURCE = "replay:"  # a source naming a recorded table: "replay:<table file name>"
INTERPRETER_SOURCE = "cpu-interpreter"
LEGACY_KERNEL = "builtin@0.1"


def shape_key(spec: ModelSpec | None, table_name: str | None = None) -> str:
    """The shape part of a study name, e.g. ``E=256,N=256,K=4096,topk=6,fp8_w8a8,block=[128,128],swiglu_limit=10``
    (group-quantized formats: ``int4_w4a16,group=128,zp``; per-channel w8a8: ``...,per_channel``)."""
    if spec is None:
        return f"table={table_name}"
    parts = [f"E={spec.E}", f"N={spec.N}", f"K={spec.K}", f"topk={spec.topk}", spec.dtype or spec.torch_dtype]
    if spec.group_size is not None:
        parts.append(f"group={spec.group_size}" + (",zp" if spec.has_zero_point else ""))
    elif spec.block_shape:
        parts.append(f"block=[{spec.block_shape[0]},{spec.block_shape[1]}]")
    if spec.per_channel_quant:
        parts.append("per_channel")
    if spec.dtype is not None and spec.torch_dtype != "bfloat16":
        parts.append(spec.torch_dtype)  # the activation dtype of a quantized format
    if spec.swiglu_limit is not None:
        parts.append(f"swiglu_limit={spec.swiglu_limit:g}")
    return ",".join(parts)


@dataclass(frozen=True)
class StudyIdentity:
    """What makes two tunes' measurements comparable: same identity, same studies.

    Attributes:
        spec: the tuned shape (None for a replay table without a recorded spec).
        source: where measurements come from: a GPU's name ("NVIDIA H200"), "cpu-interpreter", or
            "replay:<table file name>".
        triton_version: the Triton release the kernels were compiled with (a replay: the table's).
        kernel: the kernel backend and its version, "builtin@1".
        table_name: the replay table's file stem (names the shape when the table records no spec).
        routing: the routing of the timed calls (model.routing.RoutingSpec.key()): "uniform" (left out of the
            name, as in every study before routing could be chosen), "zipf1.2", "trace:<file>@<sha1>".
        pair: whether the tune searches a config per GEMM (its trials carry each GEMM stage's time: "|pair").
        target: the engine whose launch rules and default config the timed calls follow ("sglang", left out of the
            name as in every study before targets; "vllm": "|target=vllm").
        tma: whether the space offers USE_TMA (a Hopper GPU, tune(tma=None)): "|tma", so a tune with tma=False never
            resumes a study whose best may be a TMA config.

    Example:
        >>> spec = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=4096, intermediate_size=14336)
        >>> StudyIdentity(spec, "NVIDIA H200", "3.6.0", "builtin@1").name(64)
        'moe|E=8,N=14336,K=4096,topk=2,bfloat16|NVIDIA_H200|triton=3.6.0|kernel=builtin@1|M=64'
    """

    spec: ModelSpec | None
    source: str
    triton_version: str
    kernel: str
    table_name: str | None = None
    routing: str = "uniform"
    pair: bool = False
    target: str = "sglang"
    tma: bool = False

    @property
    def base(self) -> str:
        """Everything but the batch size."""
        target = f"|target={self.target}" if self.target != "sglang" else ""
        routing = f"|routing={self.routing}" if self.routing != "uniform" else ""
        pair = "|pair" if self.pair else ""
        tma = "|tma" if self.tma else ""
        return (f"{STUDY_PREFIX}|{shape_key(self.spec, self.table_name)}|{self.source.replace(' ', '_')}"
                f"|triton={self.triton_version}|kernel={self.kernel}{target}{routing}{pair}{tma}")

    def name(self, M: int) -> str:
        """``<base>|M=<M>``: readable in the dashboard and sorted by shape, then source, then batch size."""
        return f"{self.base}|M={M}"

    @property
    def is_replay(self) -> bool:
        return self.source.startswith(REPLAY_SOURCE)

    def attrs(self, M: int, *, device_name: str, torch_version: str, description: str,
              is_performance: bool) -> dict[str, Any]:
        """The study's user attributes (device_name names the engines' files; for a replay, the table's GPU)."""
        attrs: dict[str, Any] = {
            "schema": SCHEMA_VERSION, "moe_opt_base": self.base, "M": M, "source": self.source,
            "kernel": self.kernel, "target": self.target, "routing": self.routing, "pair": self.pair, "tma": self.tma,
            "device_name": device_name, "triton_version": self.triton_version,
            "torch_version": torch_version, "measurement": description, "is_performance": is_performance,
        }
        spec = self.spec
        if spec is not None:
            attrs["spec"] = spec.to_dict()
            attrs.update(model=spec.model, E=spec.E, N=spec.N, K=spec.K, topk=spec.topk,
                         dtype=spec.dtype or spec.torch_dtype,
                         block_shape=list(spec.block_shape) if spec.block_shape else None,
                         swiglu_limit=spec.swiglu_limit)
        return attrs


def default_storage(spec: ModelSpec | None, table_name: str | None = None, *, journal: bool = False) -> str:
    """``sqlite:///studies/<model>.db`` (a replay: ``studies/replay_<table>.db``); ``journal:studies/....journal``
    for several processes. Replayed and measured studies differ by name anyway; separate files keep a replay
    from crowding the measured studies' dashboard."""
    slug = f"replay_{table_name}" if table_name is not None else spec.slug()
    return f"journal:studies/{slug}.journal" if journal else f"sqlite:///studies/{slug}.db"


@dataclass(frozen=True)
class StudyInfo:
    """What a moe_opt study says about itself (its user attributes)."""

    name: str
    base: str
    M: int
    spec: ModelSpec | None
    device_name: str
    triton_version: str
    is_performance: bool
    attrs: dict[str, Any]

    @property
    def source(self) -> str:
        return str(self.attrs.get("source") or self.device_name)

    @property
    def kernel(self) -> str:
        return str(self.attrs.get("kernel") or LEGACY_KERNEL)

    @property
    def is_replay(self) -> bool:
        return self.source.startswith(REPLAY_SOURCE) or str(self.attrs.get("measurement", "")).startswith("replay of ")


def list_moe_studies(storage: Any) -> list[StudyInfo]:
    """Every moe_opt study in a storage, sorted by base name then batch size."""
    import optuna

    infos = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        attrs = summary.user_attrs
        if "moe_opt_base" not in attrs:
            continue
        spec = ModelSpec.from_dict(attrs["spec"]) if attrs.get("spec") else None
        infos.append(StudyInfo(summary.study_name, attrs["moe_opt_base"], int(attrs["M"]), spec,
                               attrs.get("device_name", "unknown"), attrs.get("triton_version", "unknown"),
                               bool(attrs.get("is_performance", False)), dict(attrs)))
    return sorted(infos, key=lambda i: (i.base, i.M))

"""Recorded routing traces: SGLang's topk_ids dumps (and directories of them), SGLang's per-token expert
distribution recorder dump, plain .pt and .npy arrays of topk_ids (tokens, topk); replayed as slices of M tokens.
docs/routing.md says how to record one.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import TuneError
from .draws import _check_counts, _on_device, _random_weights

if TYPE_CHECKING:
    import torch

# SGLang's benchmark/kernels/fused_moe_triton/tuning_fused_moe_triton_sep.py (load_topk_ids) reads
# f"{topk_ids_dir}/topk_ids_layer{layer}_idx{idx}.pt", each a torch.save'd (tokens, topk) topk_ids tensor.
SGLANG_DUMP = re.compile(r"topk_ids_layer(\d+)_idx(\d+)\.pt")
TORCH_SUFFIXES = (".pt", ".pth")
ACCEPTED = ("accepted: a .pt or .npy file of topk_ids (tokens, topk), a directory of SGLang's "
            "topk_ids_layer<L>_idx<I>.pt dumps, or SGLang's per_token expert_distribution_recorder_*.pt")



@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """Expert ids recorded from a model run, to route timed calls as that run routed its tokens.

    Attributes:
        topk_ids: (tokens, topk) int32 CPU tensor. -1 marks a slot with no expert here (SGLang's padded tokens,
            or an expert on another EP rank): the kernel skips it, as in serving.
        path: the file or directory it was read from.
        layer: the model layer, where the source says it (SGLang's dump names, a recorder dump's layer), else None.
        segments: (label, tokens) of each run of consecutive tokens in ``topk_ids``, in order: one per dump file of
            a directory, one per layer of a recorder dump. A draw never crosses from one segment into another.
        sha1: hex SHA-1 of the content (see :func:`trace_digest`).
    """

    topk_ids: torch.Tensor
    path: str
    layer: int | None
    segments: tuple[tuple[str, int], ...]
    sha1: str

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def topk(self) -> int:
        return self.topk_ids.shape[1]

    def draw(self, M: int, generator: torch.Generator,
             device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """M consecutive tokens of the trace from a random offset, with random weights.

        The offset is uniform over every start that keeps the M tokens inside one segment. A segment shorter than
        M tokens is repeated cyclically (token offset, offset + 1, ... wrapping to the segment's start): the batch
        keeps the recorded expert frequencies, which is what the kernel's speed depends on, and a trace of prefill
        tokens is often shorter than the largest batch sizes tuned. The weights are a softmax of random logits
        over the slots, sorted descending (a trace holds ids only).

        Example:
            >>> import torch
            >>> trace = RoutingTrace(torch.tensor([[0, 1], [2, 3], [1, 0]], dtype=torch.int32), "t.pt", None,
            ...                      (("t.pt", 3),), "")
            >>> _, ids = trace.draw(2, torch.Generator().manual_seed(0), "cpu")
            >>> ids.tolist() in ([[0, 1], [2, 3]], [[2, 3], [1, 0]])
            True
        """
        import torch

        _check_counts(M=M)
        device = _on_device(generator, device)
        lengths = [n for _, n in self.segments]
        starts = [max(n - M + 1, 0) for n in lengths]
        if not any(starts):  # every segment is shorter than M: start anywhere, wrap around
            starts = lengths
        r = int(torch.randint(sum(starts), (1,), generator=generator, device=device))
        ends = list(accumulate(starts))
        seg = bisect_right(ends, r)
        offset = r - (ends[seg - 1] if seg else 0)
        rows = sum(lengths[:seg]) + (offset + torch.arange(M)) % lengths[seg]
        ids = self.topk_ids.index_select(0, rows).to(device).contiguous()
        return _random_weights(M, self.topk, generator, device), ids

    def expert_histogram(self, num_experts: int | None = None) -> torch.Tensor:
        """Slots routed to each expert, an int64 tensor of length ``num_experts`` (default: the largest id + 1);
        -1 slots are not counted. ``hist.max() / hist.float().mean()`` says how skewed the trace is.

        Example:
            >>> import torch
            >>> trace = RoutingTrace(torch.tensor([[0, 1], [0, -1]], dtype=torch.int32), "t.pt", None,
            ...                      (("t.pt", 2),), "")
            >>> trace.expert_histogram(4).tolist()
            [2, 1, 0, 0]
        """
        import torch

        ids = self.topk_ids[self.topk_ids >= 0].long()
        return torch.bincount(ids, minlength=num_experts or 0)

    def describe(self) -> str:
        """One line for study attributes: ``trace topk_ids_layer3_idx0.pt layer 3 (8192 tokens, topk 9)``."""
        name = Path(self.path).name
        # a directory's segments are its dump files; a recorder dump's are its layers ("layer3")
        from_dir = self.segments[0][0] != name and self.segments[0][0].endswith(".pt")
        layer = f" layer {self.layer}" if self.layer is not None else ""
        parts = f" in {len(self.segments)} {'files' if from_dir else 'layers'}" if len(self.segments) > 1 else ""
        name += "/" if from_dir else ""
        return f"trace {name}{layer} ({self.num_tokens} tokens{parts}, topk {self.topk})"


def _sources(path: Path, layer: int | None) -> list[Path]:
    """The files a trace reads: the file itself, or a directory's SGLang dumps by (layer, idx)."""
    if not path.exists():
        raise TuneError(f"routing trace {path} not found ({ACCEPTED})")
    if not path.is_dir():
        if path.suffix.lower() not in TORCH_SUFFIXES + (".npy",):
            raise TuneError(f"routing trace {path}: unknown file type {path.suffix or '(no extension)'!r} "
                            f"({ACCEPTED})")
        return [path]
    dumps = sorted((int(m[1]), int(m[2]), p) for p in path.iterdir() if (m := SGLANG_DUMP.fullmatch(p.name)))
    if not dumps:
        raise TuneError(f"routing trace {path}: the directory holds no topk_ids_layer<L>_idx<I>.pt files "
                        f"({ACCEPTED})")
    chosen = [p for lay, _, p in dumps if layer is None or lay == layer]
    if not chosen:
        layers = sorted({lay for lay, _, _ in dumps})
        raise TuneError(f"routing trace {path} has no dumps of layer {layer} (its layers: {layers[0]} to "
                        f"{layers[-1]})")
    return chosen


def _digest(contents: list[tuple[Path, bytes]]) -> str:
    if len(contents) == 1:
        return hashlib.sha1(contents[0][1]).hexdigest()  # what `sha1sum FILE` prints
    h = hashlib.sha1()
    for p, data in contents:
        h.update(p.name.encode() + b"\0" + hashlib.sha1(data).digest())
    return h.hexdigest()


def trace_digest(path: str | os.PathLike, layer: int | None = None) -> str:
    """Hex SHA-1 of a trace's content: the file's bytes, or for a directory, the names and bytes of the dumps it
    reads (those of ``layer`` only, if given)."""
    files = _sources(Path(path), layer)
    return _digest([(p, p.read_bytes()) for p in files])


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200]


def _read(path: Path, data: bytes) -> Any:
    """The object stored in one file: a tensor (or a recorder dump's dict) for .pt, an integer tensor for .npy."""
    import torch

    if path.suffix.lower() == ".npy":
        import numpy as np

        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:
            raise TuneError(f"routing trace {path} could not be read by numpy.load ({_first_line(exc)}; "
                            f"{ACCEPTED})") from None
        if not np.issubdtype(array.dtype, np.integer):
            raise TuneError(f"routing trace {path}: topk_ids must be integers, got {array.dtype}")
        return torch.from_numpy(array.astype(np.int64))
    try:
        # SGLang's dumps are tensors saved on the GPU; map_location reads them on a machine without one.
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        if not data.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or its legacy pickle
            reason = "not a file torch.save wrote"
        elif "Weights only load failed" in str(exc):
            reason = "it holds objects other than tensors, lists and dicts"
        else:
            reason = _first_line(exc)
        raise TuneError(f"routing trace {path} could not be read by torch.load ({reason}; {ACCEPTED})") from None


def _checked(where: str, ids: Any, num_experts: int | None, topk: int | None) -> torch.Tensor:
    """ids as an int32 (tokens, topk) tensor, or a one-line TuneError naming what is wrong."""
    import torch

    if not isinstance(ids, torch.Tensor):
        raise TuneError(f"routing trace {where} holds a {type(ids).__name__}, not a tensor of topk_ids ({ACCEPTED})")
    if ids.dim() != 2:
        raise TuneError(f"routing trace {where}: topk_ids must have 2 dimensions (tokens, topk), got shape "
                        f"{tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TuneError(f"routing trace {where}: topk_ids must be integers, got {ids.dtype}")
    tokens, k = ids.shape
    if tokens == 0:
        raise TuneError(f"routing trace {where} holds no tokens (shape {tuple(ids.shape)})")
    if topk is not None and k != topk:
        raise TuneError(f"routing trace {where} has {k} experts per token, the model's topk is {topk} (SGLang "
                        "counts a fused shared expert as one more: tune with the shared-expert fusion the server ran)")
    if k == 0:
        raise TuneError(f"routing trace {where} has no experts per token (shape {tuple(ids.shape)})")
    ids = ids.long()
    low, high = int(ids.min()), int(ids.max())
    if low < -1:
        raise TuneError(f"routing trace {where} has expert id {low}: ids are 0..E-1, or -1 for none")
    if num_experts is not None and high >= num_experts:
        raise TuneError(f"routing trace {where} has expert id {high}, out of range for E={num_experts} (ids are "
                        "0..E-1, or -1 for none; an expert-parallel server records global ids)")
    if high >= 2**31:
        raise TuneError(f"routing trace {where} has expert id {high}: ids are 0..E-1, or -1 for none")
    return ids.to(torch.int32).contiguous()


def _recorder_layers(where: str, dump: dict, layer: int | None) -> list[tuple[str, int, Any]]:
    """(label, layer, ids) per layer of SGLang's per_token recorder dump (python/sglang/srt/eplb/
    expert_distribution.py, _DetailAccumulator.dump): ``records`` holds one dict per forward pass whose
    ``topk_ids_of_layer`` is (num_layers, tokens, 8), -1 where nothing was routed (dense layers, and the columns
    past a topk below 8)."""
    import torch

    records = dump.get("records")
    if not isinstance(records, list) or not records or not all(
            isinstance(r, dict) and isinstance(r.get("topk_ids_of_layer"), torch.Tensor) for r in records):
        raise TuneError(f"routing trace {where}: SGLang's recorder dump holds no per-token topk_ids (record with "
                        "--expert-distribution-recorder-mode per_token)")
    try:
        ids = torch.cat([r["topk_ids_of_layer"] for r in records], dim=1)  # (num_layers, tokens, 8)
    except RuntimeError as exc:
        raise TuneError(f"routing trace {where}: the recorder's topk_ids_of_layer do not join "
                        f"({_first_line(exc)})") from None
    if ids.dim() != 3:
        raise TuneError(f"routing trace {where}: topk_ids_of_layer must have 3 dimensions (layers, tokens, topk), "
                        f"got shape {tuple(ids.shape)}")
    routed = [i for i in range(ids.shape[0]) if bool((ids[i] != -1).any())]
    if not routed:
        raise TuneError(f"routing trace {where}: the recorder dump holds no routed tokens")
    if layer is not None and layer not in routed:
        raise TuneError(f"routing trace {where} has no routed tokens in layer {layer} (routed layers: {routed[0]} "
                        f"to {routed[-1]})")
    chosen = [layer] if layer is not None else routed
    k = ids.shape[2]
    while k > 1 and bool((ids[chosen, :, k - 1] == -1).all()):  # columns past the model's topk
        k -= 1
    return [(f"layer{i}", i, ids[i, :, :k]) for i in chosen]


def load_trace(path: str | os.PathLike, *, num_experts: int | None = None, topk: int | None = None,
               layer: int | None = None) -> RoutingTrace:
    """Read recorded expert ids, checked against the model's E and topk where given.

    Accepted (docs/routing.md says how to record them from SGLang):

    - a ``.pt`` file holding a (tokens, topk) integer tensor (``torch.save``), such as one of SGLang's
      ``topk_ids_layer{L}_idx{I}.pt`` dumps (its layer read from the name);
    - a ``.npy`` file holding a (tokens, topk) integer array (``numpy.save``);
    - a directory of SGLang's ``topk_ids_layer{L}_idx{I}.pt`` dumps (what ``tuning_fused_moe_triton_sep.py
      --topk-ids-dir`` reads), each file one segment; other files there are ignored;
    - SGLang's ``expert_distribution_recorder_*.pt`` written in ``per_token`` mode, each layer one segment.

    Args:
        num_experts: E of the spec tuned (experts per EP rank, counting a fused shared expert); ids must be below.
        topk: the spec's topk (counting a fused shared expert); the trace must have as many ids per token.
        layer: the one model layer to keep, for a directory of dumps or a recorder dump.

    Expert id -1 is accepted anywhere: SGLang writes it for padded tokens, and the kernel skips such slots, as it
    does an expert on another EP rank.

    Example:
        >>> import torch, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "topk_ids_layer3_idx0.pt")
        >>> torch.save(torch.randint(0, 8, (100, 2), dtype=torch.int32), path)
        >>> load_trace(path, num_experts=8, topk=2).describe()
        'trace topk_ids_layer3_idx0.pt layer 3 (100 tokens, topk 2)'
    """
    import torch

    for name, value in (("num_experts", num_experts), ("topk", topk)):
        if value is not None:
            _check_counts(**{name: value})
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise TuneError(f"layer must be an integer >= 0, got {layer!r}")
    root = Path(path)
    contents = [(p, p.read_bytes()) for p in _sources(root, layer)]
    segments: list[tuple[str, Any]] = []
    layers: set[int] = set()
    for p, data in contents:
        obj = _read(p, data)
        named = SGLANG_DUMP.fullmatch(p.name)
        if isinstance(obj, dict) and "records" in obj:
            for label, i, ids in _recorder_layers(str(p), obj, layer):
                segments.append((label, _checked(f"{p} {label}", ids, num_experts, topk)))
                layers.add(i)
            continue
        if layer is not None and not (named and int(named[1]) == layer):
            raise TuneError(f"routing trace {p} is not a dump of layer {layer}: layer= picks one layer of a "
                            "directory of SGLang's dumps or of a recorder dump")
        if named:
            layers.add(int(named[1]))
        segments.append((p.name, _checked(str(p), obj, num_experts, topk)))
    widths = {ids.shape[1] for _, ids in segments}
    if len(widths) > 1:
        raise TuneError(f"routing trace {path}: its files disagree on topk ({sorted(widths)}); give one model's dumps")
    return RoutingTrace(topk_ids=torch.cat([ids for _, ids in segments]), path=str(root),
                        layer=layers.pop() if len(layers) == 1 else None,
                        segments=tuple((label, ids.shape[0]) for label, ids in segments), sha1=_digest(contents))

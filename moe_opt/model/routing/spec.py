"""RoutingSpec: which routing a measurer draws for its timed calls, a small value that names itself."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ...errors import TuneError
from .draws import _check_counts, _check_shape, check_exponent, uniform_routing, zipf_routing
from .trace import load_trace, trace_digest

if TYPE_CHECKING:
    import torch

KINDS = ("uniform", "zipf", "trace")
Router = Callable[[int, "torch.Generator", "str | torch.device"], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class RoutingSpec:
    """Which routing a measurer draws for its timed calls; a small hashable value that names itself (:meth:`key`).

    Attributes:
        kind: "uniform", "zipf" or "trace".
        exponent: the Zipf exponent s (zipf only): finite, >= 0; 0 is uniform popularity.
        trace_path: the trace file or directory (trace only), as :func:`load_trace` reads it.
        layer: the one layer of a directory of dumps or of a recorder dump to use (trace only), or None for all.

    Example:
        >>> RoutingSpec().key(), RoutingSpec("zipf", exponent=1.2).key()
        ('uniform', 'zipf1.2')
        >>> RoutingSpec.parse("zipf1.2") == RoutingSpec("zipf", exponent=1.2)
        True
        >>> sets = RoutingSpec("zipf", exponent=1.2).draw_sets(E=64, topk=8, M=16, n_sets=10, seed=0, device="cpu")
        >>> len(sets), sets[0][1].shape
        (10, torch.Size([16, 8]))
    """

    kind: str = "uniform"
    exponent: float | None = None
    trace_path: str | None = None
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TuneError(f"routing kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "zipf":
            object.__setattr__(self, "exponent", check_exponent(self.exponent))
        elif self.exponent is not None:
            raise TuneError(f"exponent applies to zipf routing, not {self.kind}")
        if self.kind == "trace":
            if self.trace_path is None or not isinstance(self.trace_path, (str, os.PathLike)):
                raise TuneError(f"trace routing needs trace_path, a file or directory, got {self.trace_path!r}")
            object.__setattr__(self, "trace_path", os.fspath(self.trace_path))
            if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                           or self.layer < 0):
                raise TuneError(f"layer must be an integer >= 0, got {self.layer!r}")
        elif self.trace_path is not None or self.layer is not None:
            raise TuneError(f"trace_path and layer apply to trace routing, not {self.kind}")

    @classmethod
    def parse(cls, text: str) -> RoutingSpec:
        """From the words a user types: ``uniform``, ``zipf<s>`` (``zipf1.2``), ``trace:<path>[:layer<L>]``."""
        if text == "uniform":
            return cls()
        if text.startswith("zipf"):
            try:
                exponent = float(text[4:])
            except ValueError:
                raise TuneError(f"routing {text!r}: zipf takes its exponent right after it, as in zipf1.2") from None
            return cls("zipf", exponent=exponent)
        if text.startswith("trace:") and len(text) > 6:
            m = re.fullmatch(r"(.+):layer(\d+)", text[6:])
            return cls("trace", trace_path=m[1], layer=int(m[2])) if m else cls("trace", trace_path=text[6:])
        raise TuneError(f"routing {text!r} is not one of: uniform, zipf<s> (as zipf1.2), trace:<path>[:layer<L>]")

    def key(self) -> str:
        """A short name for study identity: ``uniform``, ``zipf1.2``, ``trace:<name>@<sha1, 12 hex>[:layer<L>]``
        (the trace's content is read for its digest, so an edited trace gets a new name)."""
        if self.kind == "uniform":
            return "uniform"
        if self.kind == "zipf":
            short = f"{self.exponent:g}"  # "1.2", "0"; repr where %g would round two exponents together
            return f"zipf{short if float(short) == self.exponent else repr(self.exponent)}"
        layer = f":layer{self.layer}" if self.layer is not None else ""
        return f"trace:{Path(self.trace_path).name}@{trace_digest(self.trace_path, self.layer)[:12]}{layer}"

    def router(self, E: int, topk: int) -> Router:
        """A function ``(M, generator, device) -> (topk_weights, topk_ids)`` for a spec's E and topk; a trace is
        read and checked here, once, so a bad one fails before anything is timed."""
        _check_shape(1, E, topk)
        if self.kind == "uniform":
            return lambda M, generator, device: uniform_routing(M, E, topk, generator, device)
        if self.kind == "zipf":
            return lambda M, generator, device: zipf_routing(M, E, topk, self.exponent, generator, device)
        return load_trace(self.trace_path, num_experts=E, topk=topk, layer=self.layer).draw

    def draw_sets(self, E: int, topk: int, M: int, n_sets: int, seed: int,
                  device: str | torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n_sets`` routing draws for batch size M, one per call the timer captures, from a generator seeded
        with ``seed`` on ``device`` (the same seed gives the same draws; mix M into it for draws independent
        across batch sizes)."""
        import torch

        _check_counts(n_sets=n_sets)
        route = self.router(E, topk)
        generator = torch.Generator(device=device).manual_seed(seed)
        return [route(M, generator, device) for _ in range(n_sets)]

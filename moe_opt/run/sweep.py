"""sweep(): several shapes of one model (TP sizes x dtypes) tuned in one call, each warm-started from the others.

The shapes are tuned one after another with :func:`moe_opt.tune`, in the order given; every shape after the first
measures first, at each batch size, the best configs the shapes before it found there (``warm_start_configs``).
The optimum moves little between TP sizes of one model (N halves, E, topk and K stay), so a later shape starts
near its own optimum. All shapes share the storage (one study per shape and batch size, named by the shape) and
the output folder (one file per shape, named as the engines name it), so a sweep resumes like a tune.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import TuneError
from ..space import Config
from .result import TuneResult

WARM_START_PER_SHAPE = 2  # configs passed on per batch size from each tuned shape: its best and its runner-up


@dataclass
class SweepResult:
    """What a sweep found: one TuneResult per shape, in the order tuned.

    Attributes:
        results: {(tp_size, dtype): TuneResult}; dtype None is the model's own format.
        wall_s: seconds for the whole sweep.
    """

    results: dict[tuple[int, str | None], TuneResult] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def files(self) -> list[Any]:
        """Every exported file, shape by shape."""
        return [path for r in self.results.values() for path in r.files.values()]


def sweep(model: str, *, tp_sizes: Sequence[int] = (1,), dtypes: Sequence[str | None] = (None,), ep_size: int = 1,
          **tune_kwargs: Any) -> SweepResult:
    """Tune ``model`` at every TP size and dtype given, each shape warm-started from the shapes tuned before it.

    Args:
        model: Hub id, catalogue name, local directory or config.json (see resolve_model).
        tp_sizes: tensor-parallel sizes, e.g. (1, 2, 4, 8).
        dtypes: formats to tune, None (or "auto") for what the model holds; e.g. (None, "int8_w8a16").
        ep_size: expert-parallel size of every shape.
        **tune_kwargs: passed to every :func:`moe_opt.tune` call (batch_sizes, n_trials, storage, output_dir, ...).

    Returns:
        SweepResult with one TuneResult per shape.

    Raises:
        TuneError: an empty or repeated list, or any argument tune() refuses; a shape the model cannot take (a TP
            size that does not divide the intermediate size) is refused before anything is tuned.

    Example:
        >>> import moe_opt
        >>> r = moe_opt.sweep("deepseek-ai/DeepSeek-V4-Flash", tp_sizes=(4, 8))  # doctest: +SKIP
        >>> sorted(r.results)  # doctest: +SKIP
        [(4, None), (8, None)]
    """
    from ..model.resolve import resolve_model

    for name in ("model", "spec", "tp_size", "dtype", "warm_start_configs"):
        if name in tune_kwargs:
            raise TuneError(f"sweep() takes no {name}= (it sets it per shape); give tp_sizes= and dtypes=")
    tps = _distinct("tp_sizes", tp_sizes)
    kinds = _distinct("dtypes", [None if d in (None, "auto") else d for d in dtypes])
    for tp in tps:
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise TuneError(f"tp_sizes: {tp!r} is not an integer >= 1")
    # Every shape resolved first: a TP size or dtype the model cannot take stops the sweep before any GPU work.
    specs = {(tp, d): resolve_model(model, tp_size=tp, ep_size=ep_size, dtype=d,
                                    swiglu_limit=tune_kwargs.get("swiglu_limit"))
             for d in kinds for tp in tps}
    tune_kwargs.pop("swiglu_limit", None)
    from .tune import tune

    started = time.perf_counter()
    out = SweepResult()
    found: dict[int, list[Config]] = {}
    progress = tune_kwargs.get("progress", True)
    for i, ((tp, d), spec) in enumerate(specs.items()):
        if progress:
            print(f"moe-opt sweep: shape {i + 1} of {len(specs)}: TP {tp}, {spec.dtype or spec.torch_dtype} "
                  f"(E={spec.E}, N={spec.N}, K={spec.K})"
                  + (f", warm-started from {i} tuned shape{'s' if i > 1 else ''}" if found else ""), flush=True)
        result = tune(spec=spec, warm_start_configs=found or None, **tune_kwargs)
        out.results[tp, d] = result
        if result.interrupted:
            break
        for M, ranked in _ranked(result).items():
            found.setdefault(M, [])
            found[M] += [c for c in ranked if c not in found[M]]
    out.wall_s = time.perf_counter() - started
    return out


def _ranked(result: TuneResult) -> dict[int, list[Config]]:
    """{M: the shape's best configs, fastest first} from the one ranking (store/results.py)."""
    import optuna

    from ..store.results import study_result
    from ..store.storage import open_storage

    store = result.storage if isinstance(result.storage, optuna.storages.BaseStorage) else \
        open_storage(result.storage, create=False)
    ranked: dict[int, list[Config]] = {}
    for M, name in result.study_names.items():
        r = study_result(optuna.load_study(study_name=name, storage=store))
        if r.best is not None:
            ranked[M] = [entry.config for entry in r.ranked[:WARM_START_PER_SHAPE]]
    return ranked


def _distinct(name: str, values: Sequence[Any]) -> list[Any]:
    values = list(values)
    if not values:
        raise TuneError(f"{name} is empty; give at least one")
    repeated = sorted({repr(v) for v in values if values.count(v) > 1})
    if repeated:
        raise TuneError(f"{name} repeats {', '.join(repeated)}; give each once")
    return values

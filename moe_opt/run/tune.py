"""tune(): the Python API of one tune, a short function over :class:`~moe_opt.run.session.TuneSession`."""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import TuneError
from ..model.spec import ModelSpec
from ..space import Config
from .result import TuneResult
from .session import MEASURE_TIMEOUT_S, TunePlan, TuneSession


def tune(model: str | None = None, *, spec: ModelSpec | None = None, tp_size: int = 1, ep_size: int = 1,
         dtype: str | None = None, swiglu_limit: float | None = None, batch_sizes: Sequence[int] | None = None,
         n_trials: int | None = None, timeout_s: float | None = None, storage: Any = None,
         sampler: Any = None, seed: int | None = None, output_dir: str | Path | None = "moe_configs",
         warm_start: bool = True, tuned_config_dirs: Sequence[str | Path] = (), device: str | None = None,
         replay: str | Path | None = None, measurer: Any = None, compile_workers: int | None = None,
         progress: bool = True, n_workers: int = 1, guard: bool | Callable[[Config], Any] = True,
         measure_timeout_s: float = MEASURE_TIMEOUT_S, compile_pool: Any = None, confirm: bool = True,
         kernel: str = "builtin", routing: Any = "uniform", down_config: bool | None = None) -> TuneResult:
    """Tune the fused-MoE launch config of a model for each batch size and export SGLang/vLLM config files.

    One Optuna study per batch size is searched (moe_opt's search by default), every trial claimed so that any
    number of processes can share the studies, and measured on the GPU in an isolated process while the next
    configs compile; then the close contenders are re-measured, each result checked against the float64
    reference, and the engines' files written. Calling tune() again with the same arguments resumes the same
    studies: completed trials are reused and the trial budget counts across runs.

    Args:
        model: Hub id, catalogue name, local directory or config.json (see resolve_model).
        spec: an explicit ModelSpec instead of ``model``.
        tp_size, ep_size, dtype, swiglu_limit: passed to resolve_model with ``model``.
        batch_sizes: default SGLang's 18 (1 ... 4096); on the CPU interpreter (1, 8, 32); in replay mode the
            table's batch sizes.
        n_trials: configurations measured per batch size, failures included, counted across resumed runs and
            shared by all workers (default 48; 4 on the interpreter; the whole grid with sampler="grid").
        timeout_s: stop after this many seconds, keeping everything.
        storage: Optuna storage URL, .db/.journal path or storage object; default ``sqlite:///studies/<model>.db``
            (a replay: ``studies/replay_<table>.db``), or ``journal:studies/<model>.journal`` with n_workers > 1.
        sampler: "moe" (default), "tpe", "random", "grid" (exhaustive), or an Optuna sampler.
        seed: seed of the sampler.
        output_dir: where config files go (SGLang layout ``configs/triton_X_Y_Z/`` and vLLM files side by
            side); None to skip export. Batch sizes an existing file holds and this run has no result for are kept.
        warm_start: first measure SGLang's default config, existing tuned configs for the shape (found in
            ``tuned_config_dirs`` and output_dir) and the best configs of already-tuned batch sizes.
        device: CUDA device ("cuda:0"); default the current one, or the interpreter when no GPU exists.
        replay: a recorded table (CSV) to take every measurement from instead of the GPU.
        measurer: a :class:`~moe_opt.measure.base.Measurer` (advanced; overrides the above).
        compile_workers: processes compiling configs ahead of timing on the GPU (default: CPU cores - 2,
            shared out among the workers).
        progress: show a progress bar and the summary.
        n_workers: processes searching the studies together, one per GPU (docs/operations.md).
        guard: check each config against the float64 reference before export (run/guard.py); False to skip; or
            a function ``config -> relative error`` used instead of running the kernel.
        measure_timeout_s: on the GPU, a measurement that takes longer fails as "Timeout: ..." (isolated.py).
        compile_pool: compiles configs ahead of measuring them (advanced; default on the GPU: a
            :class:`~moe_opt.measure.compile_pool.CompilePool` of ``compile_workers`` processes).
        confirm: after the search, re-measure each batch size's close contenders and SGLang's default three more
            times and rank and report them by those medians (not in replay mode or on the interpreter).
        kernel: the kernel backend to time ("builtin"; kernel/backend.py).
        routing: the routing of the timed calls (docs/routing.md): "uniform" (default: a real top-k over random
            logits), "zipf<s>" (expert popularity 1/rank^s, e.g. "zipf1.2"), "trace:PATH" (slices of a recorded
            trace: SGLang's topk_ids dumps, .pt or .npy), or a model.routing.RoutingSpec. Part of the study identity.
        down_config: tune a config per GEMM for SGLang (its ``<name>_down.json`` beside the up file; both share
            BLOCK_SIZE_M): each trial times GEMM1's stage apart, the search takes turns on the whole call's time and
            each GEMM's, and the best pair is timed on the whole call against the best single config. None (default):
            on where the measurer times each GEMM (the GPU, the interpreter), off for replay tables; False: one
            config for both GEMMs. vLLM's file always holds the best single config (vLLM reads no down file).

    Returns:
        TuneResult.

    Example:
        >>> import moe_opt
        >>> r = moe_opt.tune(replay="moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv", n_trials=8,
        ...                  storage="sqlite:///:memory:", output_dir=None, progress=False)  # doctest: +SKIP
        >>> sorted(r.best)  # doctest: +SKIP
        [1, 16, 64, 256, 1024, 4096]
    """
    if n_trials is not None:
        _check_count("n_trials", n_trials)
    _check_count("n_workers", n_workers)
    if spec is None and model is not None:
        from ..model.resolve import resolve_model

        spec = resolve_model(model, tp_size=tp_size, ep_size=ep_size, dtype=dtype, swiglu_limit=swiglu_limit)
    plan = TunePlan(spec=spec, batch_sizes=batch_sizes, n_trials=n_trials, timeout_s=timeout_s, storage=storage,
                    sampler=sampler, seed=seed, output_dir=output_dir, warm_start=warm_start,
                    tuned_config_dirs=list(tuned_config_dirs), device=device, replay=replay, measurer=measurer,
                    compile_workers=compile_workers, progress=progress, n_workers=n_workers, guard=guard,
                    measure_timeout_s=measure_timeout_s, compile_pool=compile_pool, confirm=confirm, kernel=kernel,
                    routing=routing, down_config=down_config)
    with TuneSession(plan) as session:
        session.prepare()
        session.search()
        return session.finalize()


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise TuneError(f"{name} must be an integer >= 1, got {value!r}")

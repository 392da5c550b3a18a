"""tune(): resolve the model, open one Optuna study per batch size, search, and export SGLang/vLLM config files.

The studies are searched in rounds, one trial per batch size per round, so what one batch size learns informs
the others (search.py). Every trial is claimed through coordination.py, so any number of processes (``n_workers``,
or tunes on several hosts sharing a PostgreSQL storage) can search the same studies without duplicating configs
or overrunning the budget, and the trials of a killed process are retried. On a GPU, configs compile ahead in a
worker pool (compile.py) and are timed in an isolated process (isolation.py) that a crashing config cannot take
down. Before export, the correctness guard (guard.py) runs each chosen config against the float64 reference.
Calling tune() again with the same arguments resumes the same studies: completed trials are reused and the trial
budget counts across runs.
"""

from __future__ import annotations

import numbers
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import optuna
from optuna.trial import TrialState

from . import space
from .compile import usable_cores
from .coordination import Coordinator, config_of, is_counted, record
from .errors import TuneError
from .guard import apply_guard
from .loop import LoopTimes, measure_one, run_trials
from .notes import refresh_study_note
from .result import TuneResult, summary_text
from .samplers import make_sampler
from .search import SearchState
from .space import Config
from .spec import ModelSpec
from .study import default_storage, open_storage, study_attrs, study_base_name, study_name
from .workers import run_workers, worker_devices, workers_storage

DEFAULT_N_TRIALS = 48
INTERPRETER_BATCH_SIZES = (1, 8, 32)
INTERPRETER_N_TRIALS = 4
MEASURE_TIMEOUT_S = 60.0  # one measurement in the isolated process, compile included


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise TuneError(f"{name} must be an integer >= 1, got {value!r}")


def _check_batch_sizes(batch_sizes: Iterable[Any]) -> list[int]:
    values = list(batch_sizes)
    if not values:
        raise TuneError("batch_sizes is empty; give positive integers such as 1,16,64")
    out = []
    for v in values:
        text = v.strip() if isinstance(v, str) else None
        if isinstance(v, bool) or not (isinstance(v, numbers.Integral) or text and re.fullmatch(r"[+-]?\d+", text)):
            raise TuneError(f"batch size {v!r} is not an integer; batch sizes are positive integers such as 1,16,64")
        m = int(v)
        if m < 1:
            raise TuneError(f"batch size {m} must be positive; batch sizes are integers >= 1")
        out.append(m)
    dups = sorted({m for m in out if out.count(m) > 1})
    if dups:
        raise TuneError(f"batch size(s) {', '.join(map(str, dups))} given twice; each batch size once")
    return out


def interpreter_spec(spec: ModelSpec) -> ModelSpec:
    """A scaled-down copy of ``spec`` that the CPU interpreter runs in seconds; numerics are kept."""
    moe_tp = spec.tp_size // spec.ep_size
    return spec.replace(num_experts=min(spec.E, 8), topk=min(spec.topk, 2), hidden_size=256,
                        intermediate_size=128 * moe_tp, num_fused_shared_experts=0)


def tune(model: str | None = None, *, spec: ModelSpec | None = None, tp_size: int = 1, ep_size: int = 1,
         dtype: str | None = None, swiglu_limit: float | None = None, batch_sizes: Sequence[int] | None = None,
         n_trials: int | None = None, timeout_s: float | None = None, storage: Any = None,
         sampler: Any = None, seed: int | None = None, output_dir: str | Path | None = "moe_configs",
         warm_start: bool = True, tuned_config_dirs: Sequence[str | Path] = (), device: str | None = None,
         replay: str | Path | None = None, measurer: Any = None, compile_workers: int | None = None,
         progress: bool = True, n_workers: int = 1, guard: bool | Callable[[Config], Any] = True,
         measure_timeout_s: float = MEASURE_TIMEOUT_S, compile_pool: Any = None, confirm: bool = True,
         _worker: Any = None) -> TuneResult:
    """Tune the fused-MoE launch config of a model for each batch size and export SGLang/vLLM config files.

    Args:
        model: Hub id, catalogue name, local directory or config.json (see resolve_model).
        spec: an explicit ModelSpec instead of ``model``.
        tp_size, ep_size, dtype, swiglu_limit: passed to resolve_model with ``model``.
        batch_sizes: default SGLang's 18 (1 ... 4096); on the CPU interpreter (1, 8, 32); in replay mode the
            table's batch sizes.
        n_trials: configurations measured per batch size, failures included, counted across resumed runs and
            shared by all workers (default 48; 4 on the interpreter; the whole grid with sampler="grid").
        timeout_s: stop after this many seconds, keeping everything.
        storage: Optuna storage URL or object; default ``sqlite:///studies/<model-slug>.db``, or
            ``journal:studies/<model-slug>.journal`` with n_workers > 1 (docs/operations.md).
        sampler: "moe" (default), "tpe", "random", "grid" (exhaustive), or an Optuna sampler.
        seed: seed of the sampler.
        output_dir: where config files go (SGLang layout ``configs/triton_X_Y_Z/`` and vLLM files side by
            side); None to skip export. Batch sizes an existing file holds and this run has no result for are kept.
        warm_start: first measure SGLang's default config, existing tuned configs for the shape (found in
            ``tuned_config_dirs`` and output_dir) and the best configs of already-tuned batch sizes.
        device: CUDA device ("cuda:0"); default the current one, or the interpreter when no GPU exists.
        replay: a recorded table (CSV) to take every measurement from instead of the GPU.
        measurer: any object with ``measure(config, M) -> Measurement`` (advanced; overrides the above).
        compile_workers: processes compiling configs ahead of timing on the GPU (default: CPU cores - 2,
            shared out among the workers).
        progress: show a progress bar and the summary.
        n_workers: processes searching the studies together, one per GPU (docs/operations.md).
        guard: check each config against the float64 reference before export (guard.py); False to skip; or a
            function ``config -> relative error`` used instead of running the kernel.
        measure_timeout_s: on the GPU, a measurement that takes longer fails as "Timeout: ..." (isolation.py).
        compile_pool: compiles configs ahead of measuring them (advanced; default on the GPU: a
            :class:`~moe_opt.compile.CompilePool` of ``compile_workers`` processes). With one, every batch size
            holds a claimed trial whose config compiles while others are measured (loop.py).
        confirm: after the search, re-measure each batch size's close contenders and SGLang's default three more
            times and rank and report them by those medians (confirm.py; not in replay mode or on the interpreter).

    Returns:
        TuneResult.

    Example:
        >>> import moe_opt
        >>> r = moe_opt.tune(replay="moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv", n_trials=8,
        ...                  storage="sqlite:///:memory:", output_dir=None, progress=False)  # doctest: +SKIP
        >>> sorted(r.best)  # doctest: +SKIP
        [1, 16, 64, 256, 1024, 4096]
    """
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and summary say what matters
    if n_trials is not None:
        _check_count("n_trials", n_trials)
    _check_count("n_workers", n_workers)
    parallel = n_workers > 1 and _worker is None
    progress = progress and _worker is None
    if spec is None and model is not None:
        from .models import resolve_model

        spec = resolve_model(model, tp_size=tp_size, ep_size=ep_size, dtype=dtype, swiglu_limit=swiglu_limit)
    if spec is not None:
        from .kernel import SUPPORTED_ACTIVATIONS

        if spec.activation not in SUPPORTED_ACTIVATIONS:
            raise TuneError(f"{spec.model or 'this model'} uses activation {spec.activation!r}, which the kernel "
                            f"does not implement (supported: {', '.join(SUPPORTED_ACTIVATIONS)}); tuning it would "
                            "time the wrong computation")

    # The measurer: a recorded table, the GPU (in an isolated process), or the interpreter.
    import torch
    import triton

    triton_version = triton.__version__
    table, table_name, table_meta, owned, pool = None, None, {}, None, compile_pool
    devices: list[str | None] = [None] * n_workers  # the CUDA_VISIBLE_DEVICES entry of each worker
    if replay is not None:
        from .table import ReplayTable

        table = ReplayTable(replay)
        table_name, table_meta = Path(replay).stem, table.metadata()
        if spec is None and table_meta.get("spec"):
            spec = ModelSpec.from_dict(table_meta["spec"])
        triton_version = table_meta.get("triton", triton_version)
        if batch_sizes is None:
            batch_sizes = table.batch_sizes
        measurer = table if measurer is None else measurer
    elif measurer is None:
        if spec is None:
            raise TuneError("give a model, a spec, or a replay table")
        if torch.cuda.is_available():
            if parallel:
                devices = worker_devices(n_workers, device)
            from .isolation import isolated_cuda_graph_timer

            measurer = owned = isolated_cuda_graph_timer(spec, "cuda:0" if parallel else device, measure_timeout_s)
            if not parallel:  # start both now: their seconds of start-up overlap the study set-up
                owned.start()
                try:
                    pool = pool or _compile_pool(spec, compile_workers, device)
                except BaseException:
                    owned.close()
                    raise
        else:
            from .measure import InterpreterTimer

            spec = interpreter_spec(spec)
            measurer = InterpreterTimer(spec)
            if batch_sizes is None:
                batch_sizes = INTERPRETER_BATCH_SIZES
            if n_trials is None and sampler != "grid":
                n_trials = INTERPRETER_N_TRIALS
            if progress:
                print(f"moe-opt: no GPU found; running Triton's CPU interpreter on a scaled-down shape ({spec}). "
                      "Timings are wall-clock interpreter times, NOT performance numbers.", flush=True)
    try:
        batch_sizes = _check_batch_sizes(batch_sizes if batch_sizes is not None else space.DEFAULT_BATCH_SIZES)
        if table is not None:
            missing = [M for M in batch_sizes if M not in table.entries]
            if missing:
                raise TuneError(f"replay table {Path(replay).name} has no rows for batch size {missing[0]}; it has "
                                f"{', '.join(map(str, table.batch_sizes))}")
        device_name = table_meta.get("device") or getattr(measurer, "device_name", "unknown")
        is_performance = bool(getattr(measurer, "is_performance", True))

        # Candidates: the grid, with block quantization's BLOCK_SIZE_K rule and the shared-memory estimate.
        block_k = spec.block_shape[1] if spec is not None and spec.block_shape else None
        if spec is None and table is not None:
            block_k = max(c.BLOCK_SIZE_K for M in batch_sizes for c in table.configs(M))
        operand_bytes = 1 if spec is not None and spec.dtype == "fp8_w8a8" else 2
        smem = getattr(measurer, "shared_memory_bytes", space.H100_SHARED_MEMORY_BYTES)
        # The exhaustive grid keeps every config (rejected ones are recorded as failures, so a recorded table is whole).
        candidates = [c for c in space.grid(block_k)
                      if sampler == "grid" or space.fits_shared_memory(c, operand_bytes, operand_bytes, smem)]
        choices = dict(space.iter_choices(block_k))
        if n_trials is None:
            n_trials = len(space.grid(block_k)) if sampler == "grid" else DEFAULT_N_TRIALS

        # Storage and studies.
        if parallel:
            storage = workers_storage(storage, default_storage(spec, table_name, journal=True), n_workers, progress)
        storage_arg = storage if storage is not None else default_storage(spec, table_name)
        store = open_storage(storage_arg)
        base = study_base_name(spec, device_name, triton_version, table_name)
        coord = Coordinator(store, storage_arg, base, device=device)
        state = SearchState(candidates)
        studies: dict[int, optuna.Study] = {}
        samplers = {}
        for i, M in enumerate(batch_sizes):
            name = study_name(base, M)
            samplers[M] = make_sampler(sampler, state, M, choices, None if seed is None else seed * 1009 + i)
            try:
                study = optuna.create_study(study_name=name, storage=store, direction="minimize",
                                            sampler=samplers[M], load_if_exists=True)
            except Exception as exc:
                raise TuneError(f"cannot create study {name} in {storage_arg}: {str(exc).splitlines()[0][:300]}") from None
            for key, value in study_attrs(base, M, spec, device_name, triton_version,
                                          table_meta.get("torch", torch.__version__),
                                          getattr(measurer, "description", type(measurer).__name__),
                                          is_performance).items():
                if study.user_attrs.get(key) != value:
                    study.set_user_attr(key, value)
            studies[M] = study
            coord.reap(study)  # trials of killed processes: failed and re-enqueued before the warm start
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
                if is_counted(t):
                    record(state, M, t)

        defaults = {M: space.default_config(M, spec.E if spec else 256, spec.dtype if spec else None,
                                            spec.block_shape if spec else None) for M in batch_sizes}
        if warm_start and _worker is None:
            from .warm_start import enqueue_warm_start

            try:
                enqueue_warm_start(studies, state, defaults, spec, device_name, list(tuned_config_dirs) + (
                    [output_dir] if output_dir is not None else []), n_trials=n_trials)
            except KeyboardInterrupt:
                raise KeyboardInterrupt("interrupted during the warm start; nothing was measured or exported; run the "
                                        "same command again to resume") from None

        worker_errors: list[str] = []
        times = LoopTimes()
        if parallel:
            if compile_workers is None:
                compile_workers = max(1, (usable_cores() - n_workers) // n_workers - 1)
            own = measurer is table or measurer is owned  # workers build their own
            kwargs = dict(spec=spec, replay=replay, measurer=None if own else measurer, batch_sizes=batch_sizes,
                          n_trials=n_trials, timeout_s=timeout_s, storage=storage_arg, sampler=sampler, seed=seed,
                          compile_workers=compile_workers, measure_timeout_s=measure_timeout_s, warm_start=False,
                          output_dir=None, progress=False)
            interrupted, worker_errors = run_workers(kwargs, n_workers, devices, studies, n_trials, progress)
        else:
            if pool is None and getattr(measurer, "kind", type(measurer).__name__) == "CudaGraphTimer":
                pool = _compile_pool(spec, compile_workers, device)  # a CudaGraphTimer given as measurer=
            start_s = time.perf_counter() - started
            interrupted = run_trials(studies, samplers, state, measurer, pool, n_trials, coord=coord, choices=choices,
                                     defaults=defaults, deadline=None if timeout_s is None else started + timeout_s,
                                     progress=progress, stop=_worker.stop if _worker is not None else None,
                                     times=times)
            search_s = time.perf_counter() - started - start_s
        if _worker is not None:
            return None  # the tuning process that started this worker collects, checks and exports
        result = _collect(studies, defaults, measurer, pool, storage_arg, spec, is_performance, started, interrupted)
        result.worker_errors = worker_errors
        t0 = time.perf_counter()
        if confirm and is_performance and measurer is not table and not interrupted:
            _confirm(result, studies, measurer, defaults)
        t1 = time.perf_counter()
        apply_guard(result, studies, measurer, spec, guard, replay_mode=replay is not None)
        t2 = time.perf_counter()
        _export(result, spec, output_dir, device_name, triton_version)
        result.wall_s = time.perf_counter() - started
        if not parallel:
            result.timings = _timings(times, pool, start_s, search_s, t1 - t0, t2 - t1, result.wall_s - (t2 - started))
    finally:
        if pool is not None and pool is not compile_pool:
            pool.close()
        if owned is not None:
            owned.close()
    if progress:
        print(summary_text(result), flush=True)
    return result


def _compile_pool(spec: ModelSpec, workers: int | None, device: str | None):
    """The compile pool of a GPU tune, its workers started at once (their imports overlap the study set-up)."""
    from .compile import CompilePool

    pool = CompilePool(spec, workers=workers, device=device or "cuda")
    pool.prestart()
    return pool


def _confirm(result: TuneResult, studies, measurer, defaults) -> None:
    """Re-measure the close contenders and the defaults (confirm.py); the defaults' latencies become the fresh
    medians, so each speedup compares two measurements of the same pass. The dashboard notes are rewritten with
    them."""
    from .confirm import confirm

    for M, medians in confirm(studies, measurer, defaults).items():
        if defaults[M] in medians:
            result.default_latency_us[M] = medians[defaults[M]]
            studies[M].set_user_attr("default_latency_us", medians[defaults[M]])
        refresh_study_note(studies[M])


def _timings(times: LoopTimes, pool, start_s: float, search_s: float, confirm_s: float, guard_s: float,
             after_guard_s: float) -> dict[str, float]:
    """Where a tune's wall-clock time went, in seconds (TuneResult.timings)."""
    out = {"start_s": start_s, "search_s": search_s,
           "measuring_s": times.measuring_s, "compile_wait_s": times.compile_wait_s, "confirm_s": confirm_s,
           "guard_s": guard_s, "collect_export_s": after_guard_s, "measured": float(times.measured)}
    if pool is not None:
        out["compiled"] = float(pool.compiled)
    return out


def _collect(studies, defaults, measurer, pool, storage_arg, spec, is_performance, started, interrupted) -> TuneResult:
    best, latency, default_latency, used, names = {}, {}, {}, {}, {}
    for M, study in studies.items():
        names[M] = study.study_name
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        used[M] = sum(map(is_counted, trials))
        default_latency[M] = study.user_attrs.get("default_latency_us")
        for t in complete:
            if config_of(t) == defaults[M]:
                default_latency[M] = float(t.value)
        tried = any(config_of(t) == defaults[M] for t in trials if is_counted(t))
        if default_latency[M] is None and measurer is not None and not tried:
            # The default lies outside the search space (or warm start was off): time it apart from the budget.
            # (A default that failed as a trial is not tried again: it may crash or hang the measurer.)
            m = measure_one(measurer, pool, defaults[M], M)
            if m.ok:
                default_latency[M] = m.latency_us
                study.set_user_attr("default_latency_us", m.latency_us)
        study.set_user_attr("default_config", defaults[M].to_dict())
        refresh_study_note(study)
        if complete:
            top = min(complete, key=lambda t: t.value)
            best[M] = config_of(top).to_dict()
            latency[M] = float(top.value)
    return TuneResult(best, latency, default_latency, {}, storage_arg, names, is_performance, spec, used,
                      time.perf_counter() - started, interrupted)


def _export(result: TuneResult, spec, output_dir, device_name: str, triton_version: str) -> None:
    """Write the files of result.best; batch sizes an older file holds and this run has no result for are kept,
    so a file is only ever replaced by a whole one (atomically: export.py)."""
    if output_dir is None or spec is None or not result.best:
        return
    from .export import export_paths, load_tuned_configs, write_sglang, write_vllm

    configs = {M: Config.from_dict(c) for M, c in result.best.items()}
    older_path = export_paths(spec, output_dir, device_name=device_name, triton_version=triton_version)["sglang"]
    if older_path.exists():
        # A file is replaced only by a whole one: batch sizes this run has no result for keep their entries.
        try:
            kept = {M: c for M, c in load_tuned_configs(older_path).items() if M not in configs}
        except TuneError:
            kept = {}
        if kept:
            result.notes.append(f"kept M={','.join(map(str, sorted(kept)))} from the existing {older_path.name} "
                                "(no result for them in this run)")
            configs = {**kept, **configs}
    kwargs = dict(device_name=device_name, triton_version=triton_version)
    result.files["sglang"] = write_sglang(spec, configs, output_dir, **kwargs)
    result.files["vllm"] = write_vllm(spec, configs, output_dir, **kwargs)

"""A tune session: the stages of one tune, each readable at once.

    prepare   the measurer (GPU in an isolated process, interpreter, or a replay table) and compile pool, the
              kernel backend's candidates, the storage and one study per batch size named by its identity,
              the strategy, stale trials reaped, the warm start enqueued
    search    trials claimed, compiled, measured and told until the budget is spent (scheduler.py), in this
              process or in N worker processes that each run a session's search (workers.py)
    finalize  SGLang's default timed where no trial measured it, the close contenders re-measured (confirm.py),
              the correctness guard (guard.py), the result read from the one ranking (store/results.py), the
              engines' files written (export/), the dashboard notes refreshed

:func:`moe_opt.tune` is a short function over this class; everything it does is a method here.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import space
from ..errors import TuneError
from ..kernel.backend import backend_key, get_backend
from ..measure.base import MeasurerInfo, custom_info
from ..measure.checked import check_measurer
from ..measure.interpreter import interpreter_spec
from ..model.routing import RoutingSpec
from ..model.spec import ModelSpec
from ..space import Config, ConfigPair
from ..store.identity import StudyIdentity, default_storage
from ..store.results import study_result
from ..store.schema import is_counted
from ..store.storage import open_storage, storage_url
from ..view.notes import refresh_study_note
from .arguments import check_batch_sizes
from .result import TuneResult
from .scheduler import LoopTimes

DEFAULT_N_TRIALS = 32
INTERPRETER_BATCH_SIZES = (1, 8, 32)
INTERPRETER_N_TRIALS = 4
INTERPRETER_MAX_BATCH_SIZE = 4096  # SGLang's largest; the interpreter needs minutes per config there
# Whose files a tune writes, by its target: SGLang's tune writes vLLM's file too (the kernels are the same at equal
# configs where vLLM's launch rules do not differ, docs/engines.md); a tune of vLLM's launch rules is for vLLM only.
EXPORTED = {"sglang": ("sglang", "vllm"), "vllm": ("vllm",)}
MEASURE_TIMEOUT_S = 60.0  # one measurement in the isolated process, compile included


@dataclass
class TunePlan:
    """Everything one tune was asked to do (tune()'s arguments, checked). Worker processes get a copy."""

    spec: ModelSpec | None = None
    batch_sizes: Sequence[int] | None = None
    n_trials: int | None = None
    timeout_s: float | None = None
    storage: Any = None
    sampler: Any = None
    seed: int | None = None
    output_dir: str | Path | None = "moe_configs"
    warm_start: bool = True
    warm_start_configs: dict[int, list[Config]] | None = None  # measured first per batch size (tune()'s argument)
    tuned_config_dirs: Sequence[str | Path] = ()
    device: str | None = None
    replay: str | Path | None = None
    measurer: Any = None
    compile_workers: int | None = None
    progress: bool = True
    n_workers: int = 1
    guard: bool | Callable[[Config], Any] = True
    measure_timeout_s: float = MEASURE_TIMEOUT_S
    compile_pool: Any = None
    confirm: bool = True
    kernel: str = "builtin"
    target: str | None = None  # the engine whose launch rules and default the builtin follows (None: SGLang)
    routing: Any = "uniform"  # a model.routing.RoutingSpec or its words: "uniform", "zipf1.2", "trace:PATH"
    tma: bool | None = None  # USE_TMA offered where the device has it (None), never (False), or required (True)
    down_config: bool | None = None  # a config per GEMM (SGLang's _down file); None: where each GEMM can be timed


@dataclass
class WorkerContext:
    """What a worker's session needs beyond its plan: its index and when to stop."""

    index: int
    stop: Callable[[], bool]


@dataclass
class _Space:
    """The candidate space of one tune: what is proposed, the trials' distributions, the defaults."""

    candidates: list[Config]
    choices: dict[str, Sequence[int]]
    grid_size: int
    defaults: dict[int, Config] = field(default_factory=dict)


class TuneSession:
    """One tune, stage by stage. ``with TuneSession(plan) as s: s.prepare(); s.search(); r = s.finalize()``.

    Example:
        >>> plan = TunePlan(replay="moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv", n_trials=8,
        ...                 storage="sqlite:///:memory:", output_dir=None, progress=False)  # doctest: +SKIP
        >>> with TuneSession(plan) as session:  # doctest: +SKIP
        ...     session.prepare(); session.search(); result = session.finalize()
    """

    def __init__(self, plan: TunePlan, worker: WorkerContext | None = None):
        self.plan = plan
        self.worker = worker
        self.started = time.perf_counter()
        self.backend = get_backend(plan.kernel, target=plan.target)
        self.routing = plan.routing if isinstance(plan.routing, RoutingSpec) else RoutingSpec.parse(plan.routing)
        self.spec = plan.spec
        self.table = None  # the replay table, in replay mode
        self.measurer: Any = None
        self.info: MeasurerInfo | None = None
        self.pool: Any = plan.compile_pool
        self._owned: list[Any] = []  # what this session started and closes: measuring process, compile pool
        self.devices: list[str | None] = [None] * plan.n_workers  # CUDA_VISIBLE_DEVICES entry of each worker
        self.studies: dict[int, Any] = {}
        self.times = LoopTimes()
        self.interrupted = False
        self.pair = False  # searching a config per GEMM (decided with the measurer)
        self.offers_tma = False  # the candidate space offers USE_TMA (decided with the space)
        self.worker_errors: list[str] = []
        self.idle_note: str | None = None  # why no worker process was started (a search with nothing left)
        self._marks: dict[str, float] = {}
        self._result_made: TuneResult | None = None  # finalize()'s, which close() adds its own time to

    @property
    def parallel(self) -> bool:
        """Whether this session's search runs in worker processes."""
        return self.plan.n_workers > 1 and self.worker is None

    # --- prepare ------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Measurer, candidates, storage, studies, strategy, warm start."""
        if self.spec is not None:
            why = self.backend.unsupported(self.spec)
            if why is not None:
                raise TuneError(why)
        self.open_measurer()
        plan = self.plan
        self.batch_sizes = check_batch_sizes(plan.batch_sizes if plan.batch_sizes is not None
                                             else space.DEFAULT_BATCH_SIZES)
        if self.table is not None:
            missing = [M for M in self.batch_sizes if M not in self.table.entries]
            if missing:
                raise TuneError(f"replay table {Path(plan.replay).name} has no rows for batch size {missing[0]}; it "
                                f"has {', '.join(map(str, self.table.batch_sizes))}")
            failed = [M for M in self.table.failed_batch_sizes() if M in self.batch_sizes]
            if failed:
                raise TuneError(f"replay table {Path(plan.replay).name}: every config at batch size "
                                f"{', '.join(map(str, failed))} failed (us empty or NaN), nothing to tune there; give "
                                "batch_sizes without it, or a table with latencies > 0 at it")
        if self.info.kind == "interpreter":
            too_large = [M for M in self.batch_sizes if M > INTERPRETER_MAX_BATCH_SIZE]
            if too_large:
                raise TuneError(f"batch size {too_large[0]} is too large for Triton's CPU interpreter (at most "
                                f"{INTERPRETER_MAX_BATCH_SIZE} there, where one config of M=1024 takes about a "
                                "minute); give smaller batch sizes, or tune on a GPU")
        self.space = self._candidate_space()
        if self.n_trials is None:
            self.n_trials = self.space.grid_size if plan.sampler == "grid" else DEFAULT_N_TRIALS
        self._open_studies()
        if plan.warm_start and self.worker is None:
            self._warm_start()

    def open_measurer(self) -> None:
        """A recorded table, the GPU (in an isolated process, its compile pool beside it), or the interpreter."""
        plan = self.plan
        self.n_trials = plan.n_trials
        self.batch_sizes_default = None
        self.measurer = check_measurer(plan.measurer) if plan.measurer is not None else None
        if plan.replay is not None:
            from ..measure.replay import ReplayTable

            if self.routing.kind != "uniform":
                raise TuneError(f"routing {self.routing.key()} needs a measurer that times the kernel; a replay "
                                "table was recorded with uniform routing")

            self.table = ReplayTable(plan.replay)
            meta = self.table.metadata()
            if self.spec is None and meta.get("spec"):
                self.spec = ModelSpec.from_dict(meta["spec"])
            if plan.batch_sizes is None:
                plan.batch_sizes = self.table.batch_sizes
            if self.measurer is None:
                self.measurer = self.table
        elif self.measurer is None:
            self._open_own_measurer()
        self.info = custom_info(self.measurer)
        if plan.down_config and not self.pair:
            raise TuneError("down_config=True needs a measurer that times each GEMM on its own (the GPU's CUDA-graph "
                            "timer or the interpreter); a replay table or a measurer of your own times whole calls")
        if self.pool is None and self.info.kind == "cuda_graph" and not self.parallel:
            self.pool = self._start_compile_pool()  # a CudaGraphTimer given as measurer=

    def _open_own_measurer(self) -> None:
        import torch

        from ..measure.isolated import isolated_cuda_graph_timer

        plan = self.plan
        if self.spec is None:
            raise TuneError("give a model, a spec, or a replay table")
        if not torch.cuda.is_available():
            self._open_interpreter()
            return
        if self.parallel:
            from .workers import worker_devices

            self.devices = worker_devices(plan.n_workers, plan.device)
        device = "cuda:0" if self.parallel else plan.device
        self.pair = self._pair()
        # Started now where this process measures: the seconds of start-up of both overlap the study set-up.
        self.measurer = isolated_cuda_graph_timer(self.spec, device, plan.measure_timeout_s, self.backend.ref,
                                                  routing=self.routing, split_stages=self.pair,
                                                  start=not self.parallel)
        self._owned.append(self.measurer)
        if not self.parallel and self.pool is None:
            self.pool = self._start_compile_pool()

    def _open_interpreter(self) -> None:
        from ..measure.interpreter import InterpreterTimer

        plan = self.plan
        given, self.spec = self.spec, interpreter_spec(self.spec)
        self.pair = self._pair()
        self.measurer = InterpreterTimer(self.spec, backend=self.backend, routing=self.routing, split_stages=self.pair)
        if plan.batch_sizes is None:
            plan.batch_sizes = INTERPRETER_BATCH_SIZES
        if self.n_trials is None and plan.sampler != "grid":
            self.n_trials = INTERPRETER_N_TRIALS
        if plan.progress and self.worker is None:
            changed = [f"{d} {getattr(given, d)}->{getattr(self.spec, d)}" for d in ("E", "topk", "N", "K")
                       if getattr(given, d) != getattr(self.spec, d)]
            shape = (f"a scaled-down shape ({', '.join(changed)}; too large for the interpreter: {self.spec})"
                     if changed else f"the shape as given ({self.spec})")
            print(f"moe-opt: no GPU found; running Triton's CPU interpreter on {shape}. Timings are wall-clock "
                  "interpreter times, NOT performance numbers.", flush=True)

    def _pair(self) -> bool:
        """Whether to search a config per GEMM: where asked (None: wherever the backend times GEMM1 apart, an
        engine's fused_experts cannot, and the target engine reads a config per GEMM: SGLang's ``_down`` file;
        vLLM runs one config for both)."""
        stages = self.backend.times_stages
        if self.plan.down_config and not stages:
            raise TuneError(f"down_config=True needs a kernel that times each GEMM on its own; kernel "
                            f"{self.backend.name!r} runs the engine's whole fused_experts call")
        if self.plan.down_config and self.backend.target != "sglang":
            raise TuneError(f"down_config=True tunes SGLang's _down file; the target {self.backend.target!r} runs "
                            "one config for both GEMMs (accepted with it: down_config=None or False)")
        return self.plan.down_config is not False and stages and self.backend.target == "sglang"

    def _start_compile_pool(self):
        """The compile pool of a GPU tune, its workers started at once (their imports overlap the study set-up)."""
        from ..measure.compile_pool import CompilePool

        pool = CompilePool(self.spec, workers=self.plan.compile_workers, device=self.plan.device or "cuda",
                           shared_memory_bytes=self.info.shared_memory_bytes if self.info else None,
                           backend=self.backend.ref)
        self._owned.append(pool)
        pool.prestart()
        return pool

    def _candidate_space(self) -> _Space:
        """The backend's candidates for the spec on this device (the exhaustive grid keeps every config: rejected
        ones are recorded as failures, so a recorded table is whole)."""
        smem = self.info.shared_memory_bytes
        spec = self.spec
        if spec is None:  # a replay table that records no spec: its configs give block_k; unquantized sizes
            block_k = max(c.BLOCK_SIZE_K for M in self.batch_sizes for c in self.table.configs(M))
            grid = space.grid(block_k)
            fitting = [c for c in grid if space.fits_shared_memory(c, 2, 2, smem)]
            choices = dict(space.iter_choices(block_k))
            defaults = {M: space.default_config(M, 256, None) for M in self.batch_sizes}
        else:
            # The device has tensor descriptors and the caller did not turn them off: the backend may offer USE_TMA.
            tma = self.info.tma and self.plan.tma is not False
            if self.plan.tma and not self.info.tma:
                raise TuneError(f"tma=True needs a measurer that can time USE_TMA: a GPU with tensor descriptors (Hopper "
                                f"or newer, with a Triton that has them) or a replay table with a USE_TMA column; "
                                f"{self.info.description} has neither; give tma=None")
            grid = self.backend.grid(spec, tma=tma)
            fitting = self.backend.candidates(spec, smem, tma=tma)
            choices = self.backend.choices(spec, tma=tma)
            defaults = {M: self.backend.default_config(spec, M) for M in self.batch_sizes}
        candidates = grid if self.plan.sampler == "grid" else fitting
        self.offers_tma = space.TMA_NAME in choices
        return _Space(candidates, choices, len(grid), defaults)

    def identity(self) -> StudyIdentity:
        """What the studies of this tune are named by (store/identity.py)."""
        meta = self.table.metadata() if self.table is not None else {}
        triton = meta.get("triton") if self.table is not None else None
        return StudyIdentity(self.spec, self.info.source, triton or _installed("triton"), backend_key(self.backend),
                             table_name=Path(self.plan.replay).stem if self.table is not None else None,
                             routing=self.routing.key(), pair=self.pair, target=self.backend.target,
                             tma=self.offers_tma)

    def _open_studies(self) -> None:
        import optuna
        from optuna.trial import TrialState

        from ..search.strategies import make_strategy
        from ..search.surrogate import SearchState
        from .coordinator import Coordinator, observe

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and summary say what matters
        plan = self.plan
        table_name = Path(plan.replay).stem if plan.replay is not None else None
        storage = plan.storage
        if self.parallel:
            from .workers import workers_storage

            storage = workers_storage(storage, default_storage(self.spec, table_name, journal=True), plan.n_workers,
                                      plan.progress)
        self.storage = storage if storage is not None else default_storage(self.spec, table_name)
        store = open_storage(self.storage)
        if getattr(storage_url(self.storage), "kind", None) == "memory":
            self.storage = store  # lives as long as this process: the result and its readers get the object
        ident = self.identity()
        self.coord = Coordinator(store, self.storage, ident.base, device=plan.device)
        self.strategy = make_strategy(plan.sampler, SearchState(self.space.candidates), self.space.choices, plan.seed,
                                      pair=self.pair)
        meta = self.table.metadata() if self.table is not None else {}
        for M in self.batch_sizes:
            name = ident.name(M)
            try:
                study = optuna.create_study(study_name=name, storage=store, direction="minimize",
                                            sampler=self.strategy.sampler(M), load_if_exists=True)
            except Exception as exc:
                raise TuneError(f"cannot create study {name} in {self.storage}: "
                                f"{str(exc).splitlines()[0][:300]}") from None
            attrs = ident.attrs(M, device_name=self.info.device_name, torch_version=meta.get("torch") or
                                _installed("torch"), description=self.info.description,
                                is_performance=self.info.is_performance)
            stored = study.user_attrs  # one read (each .user_attrs is a query of the storage)
            for key, value in attrs.items():
                if stored.get(key) != value:
                    study.set_user_attr(key, value)
            self.studies[M] = study
            self.coord.reap(study)  # trials of killed processes: failed and re-enqueued before the warm start
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
                if is_counted(t):
                    observe(self.strategy, M, t)

    def _warm_start(self) -> None:
        from .lookup import ENGINES, engine_package_dir
        from .warm_start import enqueue_warm_start

        # The user's folders, the output folder, then the files an installed engine ships for this shape. A replay
        # skips its output folder: that holds what earlier replays of the same table exported (the table's own
        # answers). An installed engine's shipped files are prior knowledge a GPU tune has too, so a replay reads
        # them as well (the search-quality figures are measured where no engine is installed).
        dirs = list(self.plan.tuned_config_dirs)
        if self.table is None and self.plan.output_dir is not None:
            dirs.append(self.plan.output_dir)
        dirs += [d for d in map(engine_package_dir, ENGINES) if d is not None]
        try:
            enqueue_warm_start(self.studies, self.strategy.state, self.space.defaults, self.spec,
                               self.info.device_name, dirs, n_trials=self.n_trials,
                               given=self.plan.warm_start_configs)
        except KeyboardInterrupt:
            raise KeyboardInterrupt("interrupted during the warm start; nothing was measured or exported; run the "
                                    "same command again to resume") from None

    # --- search -------------------------------------------------------------------------------------------------
    def search(self) -> bool:
        """Run trials until every study has its budget, the timeout, or Ctrl-C; returns whether interrupted."""
        from .scheduler import run_trials

        plan = self.plan
        self._marks["search"] = time.perf_counter()
        if self.parallel and not self._budget_left():
            self.idle_note = f"every batch size already has its {self.n_trials} trials: no worker was started"
        elif self.parallel:
            from .workers import run_workers

            self.interrupted, self.worker_errors = run_workers(run_worker, self._worker_plan(), self.devices,
                                                               self.studies, self.n_trials, plan.progress)
        else:
            deadline = None if plan.timeout_s is None else self.started + plan.timeout_s
            self.interrupted = run_trials(
                self.studies, self.strategy, self.measurer, self.pool, self.n_trials, coord=self.coord,
                defaults=self.space.defaults, deadline=deadline, progress=plan.progress and self.worker is None,
                stop=self.worker.stop if self.worker is not None else None, times=self.times)
        self._marks["searched"] = time.perf_counter()
        return self.interrupted

    def _budget_left(self) -> bool:
        """Whether some batch size has fewer than n_trials counted trials (N workers take seconds to start)."""
        return any(sum(map(is_counted, study.get_trials(deepcopy=False))) < self.n_trials
                   for study in self.studies.values())

    def _worker_plan(self) -> TunePlan:
        """The plan each worker process runs a session's search with (it builds its own measurer)."""
        plan = self.plan
        compile_workers = plan.compile_workers
        if compile_workers is None:
            from ..measure.compile_pool import usable_cores

            compile_workers = max(1, (usable_cores() - plan.n_workers) // plan.n_workers - 1)
        # A measurer of the caller's goes as given (each worker checks its results); one made here is made again.
        return dataclasses.replace(plan, spec=self.spec, measurer=plan.measurer,
                                   batch_sizes=list(self.batch_sizes), n_trials=self.n_trials, storage=self.storage,
                                   compile_workers=compile_workers, warm_start=False, output_dir=None,
                                   progress=False, compile_pool=None)

    # --- finalize -----------------------------------------------------------------------------------------------
    def finalize(self) -> TuneResult:
        """Default latencies, re-measuring, the guard, the result from the ranking, export, notes."""
        from .guard import make_guard

        plan = self.plan
        for M, study in self.studies.items():
            self._time_default_apart(M, study)
        t0 = time.perf_counter()
        if plan.confirm and self.info.is_performance and self.measurer is not self.table and not self.interrupted:
            self._confirm()
        t1 = time.perf_counter()
        guard, skipped = make_guard(self.spec, self.measurer, plan.guard, replay_mode=self.table is not None)
        result = self._result(guard, skipped)
        t2 = time.perf_counter()
        for study in self.studies.values():
            refresh_study_note(study)
        self._export(result)
        result.wall_s = time.perf_counter() - self.started
        if not self.parallel:
            result.timings = self._timings(t1 - t0, t2 - t1, result.wall_s - (t2 - self.started))
            self._result_made = result
        if plan.progress:
            from ..view.summary import summary_text

            print(summary_text(result), flush=True)
        return result

    def _time_default_apart(self, M: int, study: Any) -> None:
        """Record SGLang's default config in the study; where no trial measured it (it lies outside the search
        space, or the warm start was off), time it apart from the budget. A default that failed as a trial is
        not tried again: it may crash or hang the measurer."""
        from ..store.schema import config_of
        from .scheduler import measure_one

        default = self.space.defaults[M]
        study.set_user_attr("default_config", default.to_dict())
        trials = study.get_trials(deepcopy=False)
        if study_result(study).default_latency_us is not None or self.measurer is None:
            return
        if any(config_of(t) == default for t in trials if is_counted(t)):
            return
        m = measure_one(self.measurer, self.pool, default, M)
        if m.ok:
            study.set_user_attr("default_latency_us", m.latency_us)

    def _confirm(self) -> None:
        """Re-measure the close contenders and the defaults (confirm.py); the default's fresh median becomes its
        latency, so each speedup compares two measurements of the same pass. In a pair tune each batch size's best
        pair is timed on the whole call in the same rounds, against the best single config."""
        from .confirm import confirm

        for M, medians in confirm(self.studies, self.measurer, self.space.defaults, whole_call=self.pair,
                                  compile_pool=self.pool).items():
            if self.space.defaults[M] in medians:
                self.studies[M].set_user_attr("default_latency_us", medians[self.space.defaults[M]])

    def _result(self, guard: Any, skipped: str) -> TuneResult:
        """The guard's checks, then each study's result as the one ranking says."""
        from .guard import guard_study

        result = TuneResult({}, {}, {}, {}, self.storage, {}, self.info.is_performance, self.spec,
                            interrupted=self.interrupted, worker_errors=self.worker_errors, target=self.backend.target)
        if self.idle_note:
            result.notes.append(self.idle_note)
        if guard is None and self.plan.guard is not False:
            result.notes.append(f"correctness guard {skipped}")
        empty: dict[int, Any] = {}  # batch sizes without a result and without the guard's reason
        for M, study in self.studies.items():
            result.study_names[M] = study.study_name
            result.trials_used[M] = sum(map(is_counted, study.get_trials(deepcopy=False)))
            if guard is not None:
                outcome, excluded = guard_study(study, guard)
                if excluded:
                    result.excluded[M] = excluded
            ranked = study_result(study)
            result.default_latency_us[M] = ranked.default_latency_us
            if ranked.best is not None:
                result.best[M] = ranked.best.config.to_dict()
                result.latency_us[M] = ranked.best.latency_us
                result.guard[M] = outcome if guard is not None else skipped
                if self.pair:
                    pair, us = ranked.engine_pair
                    result.pairs[M] = {"up": pair.up.to_dict(), "down": pair.down.to_dict(), "latency_us": us}
            elif guard is not None and ranked.gave_up:
                result.guard[M] = ranked.gave_up
                result.notes.append(f"M={M}: {ranked.gave_up}")
            else:
                empty[M] = study
        if empty:
            result.notes += self._no_result_notes(empty, all_empty=len(empty) == len(self.studies))
        return result

    def _no_result_notes(self, empty: dict[int, Any], *, all_empty: bool) -> list[str]:
        """One line saying why batch sizes have nothing to export: every config tried failed (with the most
        frequent reason), or the search stopped before measuring any (Ctrl-C, the timeout)."""
        from collections import Counter

        from optuna.trial import TrialState

        from ..store.schema import error_of

        def why(studies: list) -> str:
            trials = [t for study in studies for t in study.get_trials(deepcopy=False) if is_counted(t)]
            failed = [t for t in trials if t.state == TrialState.FAIL]
            if len(failed) < len(trials):
                return "no measured config passed the correctness guard"
            if failed:
                reason, _ = Counter(error_of(t) or "no reason recorded" for t in failed).most_common(1)[0]
                return f"every config tried failed ({len(failed)} trials; most often {reason})"
            if self.interrupted:
                return "interrupted before any config was measured; run the same command again to resume"
            if self.plan.timeout_s is not None:
                return f"timeout_s={self.plan.timeout_s:g} passed before any config was measured"
            return "no config was measured"

        if all_empty:
            return [f"nothing to export: no result at any batch size: {why(list(empty.values()))}"]
        return [f"M={M}: no result, nothing exported for it: {why([study])}" for M, study in empty.items()]

    def _export(self, result: TuneResult) -> None:
        """Write the engines' files of result.best, merged with what an older file holds (export/engines.py)."""
        if self.plan.output_dir is None or self.spec is None or not result.best:
            return
        from ..export.engines import write_engine_files

        configs = {M: Config.from_dict(c) for M, c in result.best.items()}
        pairs = {M: ConfigPair(Config.from_dict(p["up"]), Config.from_dict(p["down"])) for M, p in result.pairs.items()}
        result.files, kept = write_engine_files(self.spec, configs, self.plan.output_dir,
                                                device_name=self.info.device_name,
                                                triton_version=self.identity().triton_version,
                                                sglang_pairs=pairs or None, engines=EXPORTED[self.backend.target])
        if kept:
            result.notes.append(f"kept M={','.join(map(str, kept))} from the existing "
                                f"{next(iter(result.files.values())).name} (no result for them in this run)")

    def _timings(self, confirm_s: float, guard_s: float, after_guard_s: float) -> dict[str, float]:
        """Where a tune's wall-clock time went, in seconds (TuneResult.timings)."""
        start_s = self._marks.get("search", self.started) - self.started
        search_s = self._marks.get("searched", self.started) - self._marks.get("search", self.started)
        out = {"start_s": start_s, "search_s": search_s, "measuring_s": self.times.measuring_s,
               "compile_wait_s": self.times.compile_wait_s, "confirm_s": confirm_s, "guard_s": guard_s,
               "collect_export_s": after_guard_s, "measured": float(self.times.measured)}
        if self.pool is not None:
            out["compiled"] = float(self.pool.compiled)
        # When the GPU could first work, from the session's start: the measuring process built its measurer, the
        # first compile worker started, the first measurement came back (docs/performance.md's start-up figures).
        from ..measure.compile_pool import CompilePool
        from ..measure.isolated import IsolatedMeasurer

        from ..measure.checked import CheckedMeasurer

        measurer = self.measurer.inner if isinstance(self.measurer, CheckedMeasurer) else self.measurer
        isolated = isinstance(measurer, IsolatedMeasurer)
        for key, at in (("measurer_ready_s", measurer.ready_at if isolated else None),
                        ("pool_ready_s", self.pool.ready_at if isinstance(self.pool, CompilePool) else None),
                        ("first_submit_s", self.times.first_submit_at),
                        ("first_result_s", self.times.first_result_at)):
            if at is not None:
                out[key] = at - self.started
        if isolated:
            out["measurer_busy_s"] = measurer.busy_s  # the measuring process at work: the GPU's share
        return out

    # --- closing ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop what this session started (the measuring process, the compile pool); the result's ``close_s`` says
        how long that took."""
        t0 = time.perf_counter()
        for thing in reversed(self._owned):
            thing.close()
        self._owned.clear()
        if self._result_made is not None and self._result_made.timings:
            self._result_made.timings["close_s"] = time.perf_counter() - t0

    def __enter__(self) -> "TuneSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_worker(index: int, plan_path: str, stop_event: Any, parent_pid: int) -> None:
    """A worker process of a tune with n_workers > 1: a session's prepare and search with the tune's plan
    (the tuning process created the studies; it re-measures, checks and exports when every worker is done)."""
    import os
    import pickle
    import signal
    import sys

    from ..errors import MoeOptError

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the tuning process handles Ctrl-C and tells us
    with open(plan_path, "rb") as f:
        plan = pickle.load(f)

    def should_stop() -> bool:
        return stop_event.is_set() or os.getppid() != parent_pid

    try:
        with TuneSession(plan, worker=WorkerContext(index, should_stop)) as session:
            session.prepare()
            session.search()
    except MoeOptError as exc:
        print(f"moe-opt worker {index}: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def _installed(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"

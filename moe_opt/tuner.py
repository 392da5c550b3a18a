"""tune(): resolve the model, open one Optuna study per batch size, search, and export SGLang/vLLM config files.

The studies are searched in rounds, one trial per batch size per round, so what one batch size learns informs
the others (search.py). On a GPU, the configs of a round compile in a worker pool (compile.py) while earlier
ones are timed. Calling tune() again with the same arguments resumes the same studies: completed trials are
reused and the trial budget counts across runs.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import optuna
from optuna.trial import TrialState

from . import space
from .errors import TuneError
from .measure import Measurement
from .samplers import make_sampler
from .search import SearchState
from .space import PARAM_NAMES, Config
from .spec import ModelSpec
from .notes import refresh_study_note
from .study import (COMPILE_FAILURES, default_storage, open_storage, study_attrs, study_base_name,
                    study_name)

DEFAULT_N_TRIALS = 48
INTERPRETER_BATCH_SIZES = (1, 8, 32)
INTERPRETER_N_TRIALS = 4
LOOKAHEAD = 3  # configs per batch size compiled ahead of being asked for
# The "error" of a trial that was asked but never measured (Ctrl-C, a crash): not counted, its config retried.
INTERRUPTED = "Interrupted"


@dataclass
class TuneResult:
    """What a tune found, per batch size M.

    Attributes:
        best: {M: config dict with the six keys} of the fastest measured config.
        latency_us: {M: its latency}.
        default_latency_us: {M: latency of SGLang's default config}, None where it was not measured.
        files: {"sglang": path, "vllm": path} of the exported config files (empty if none were written).
        storage: the Optuna storage (URL or object) holding the studies.
        study_names: {M: study name}.
        is_performance: False when the timings came from Triton's CPU interpreter.
        spec: the (possibly scaled-down) spec that was tuned; None in replay mode without one.
    """

    best: dict[int, dict[str, int]]
    latency_us: dict[int, float]
    default_latency_us: dict[int, float | None]
    files: dict[str, Path]
    storage: Any
    study_names: dict[int, str]
    is_performance: bool
    spec: ModelSpec | None
    trials_used: dict[int, int] = field(default_factory=dict)
    wall_s: float = 0.0
    interrupted: bool = False

    def speedup(self) -> dict[int, float]:
        """{M: default latency / tuned latency} where the default was measured."""
        return {M: d / self.latency_us[M] for M, d in self.default_latency_us.items()
                if d is not None and M in self.latency_us}

    def geomean_speedup(self) -> float | None:
        s = list(self.speedup().values())
        return math.exp(sum(map(math.log, s)) / len(s)) if s else None

    def trials_dataframe(self):
        """All trials of all batch sizes as one pandas DataFrame, with a column M."""
        import pandas as pd

        storage = open_storage(self.storage) if isinstance(self.storage, str) else self.storage
        frames = []
        for M, name in sorted(self.study_names.items()):
            df = optuna.load_study(study_name=name, storage=storage).trials_dataframe()
            df.insert(0, "M", M)
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _check_batch_sizes(batch_sizes: Iterable[Any]) -> list[int]:
    values = list(batch_sizes)
    if not values:
        raise TuneError("batch_sizes is empty; give positive integers such as 1,16,64")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, str) and v.strip().isdigit()):
            raise TuneError(f"batch size {v!r} is not an integer; batch sizes are positive integers")
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


def _is_compile_failure(error: str) -> bool:
    return error.startswith(COMPILE_FAILURES)


class _StopFlag:
    """Ctrl-C sets the flag; the running trial finishes and the tune stops with everything kept."""

    def __init__(self) -> None:
        self.stop = False
        self._old = None

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.stop:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.stop = True
        print("\nmoe-opt: stopping after the running trial (Ctrl-C again to abort now)", flush=True)

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def tune(model: str | None = None, *, spec: ModelSpec | None = None, tp_size: int = 1, ep_size: int = 1,
         dtype: str | None = None, swiglu_limit: float | None = None, batch_sizes: Sequence[int] | None = None,
         n_trials: int | None = None, timeout_s: float | None = None, storage: Any = None,
         sampler: Any = None, seed: int | None = None, output_dir: str | Path | None = "moe_configs",
         warm_start: bool = True, tuned_config_dirs: Sequence[str | Path] = (), device: str | None = None,
         replay: str | Path | None = None, measurer: Any = None, compile_workers: int | None = None,
         progress: bool = True) -> TuneResult:
    """Tune the fused-MoE launch config of a model for each batch size and export SGLang/vLLM config files.

    Args:
        model: Hub id, catalogue name, local directory or config.json (see resolve_model).
        spec: an explicit ModelSpec instead of ``model``.
        tp_size, ep_size, dtype, swiglu_limit: passed to resolve_model with ``model``.
        batch_sizes: default SGLang's 18 (1 ... 4096); on the CPU interpreter (1, 8, 32); in replay mode the
            table's batch sizes.
        n_trials: configurations measured per batch size, failures included, counted across resumed runs
            (default 48; 4 on the interpreter; the whole grid with sampler="grid").
        timeout_s: stop after this many seconds, keeping everything.
        storage: Optuna storage URL or object; default ``sqlite:///studies/<model-slug>.db``.
        sampler: "moe" (default), "tpe", "random", "grid" (exhaustive), or an Optuna sampler.
        seed: seed of the sampler.
        output_dir: where config files go (SGLang layout ``configs/triton_X_Y_Z/`` and vLLM files side by
            side); None to skip export.
        warm_start: first measure SGLang's default config, existing tuned configs for the shape (found in
            ``tuned_config_dirs`` and output_dir) and the best configs of already-tuned batch sizes.
        device: CUDA device ("cuda:0"); default the current one, or the interpreter when no GPU exists.
        replay: a recorded table (CSV) to take every measurement from instead of the GPU.
        measurer: any object with ``measure(config, M) -> Measurement`` (advanced; overrides the above).
        compile_workers: processes compiling configs ahead of timing on the GPU (default: CPU cores - 1).
        progress: show a progress bar.

    Returns:
        TuneResult.

    Example:
        >>> import moe_opt
        >>> r = moe_opt.tune(replay="moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv", n_trials=8,
        ...                  storage="sqlite:///:memory:", output_dir=None, progress=False)  # doctest: +SKIP
        >>> sorted(r.best)  # doctest: +SKIP
        [1, 16, 64, 1024]
    """
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and summary say what matters
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        raise TuneError(f"n_trials must be an integer >= 1, got {n_trials!r}")
    table_name = None
    table_meta: dict[str, Any] = {}
    if spec is None and model is not None:
        from .models import resolve_model

        spec = resolve_model(model, tp_size=tp_size, ep_size=ep_size, dtype=dtype, swiglu_limit=swiglu_limit)
    if spec is not None:
        from .kernel import SUPPORTED_ACTIVATIONS

        if spec.activation not in SUPPORTED_ACTIVATIONS:
            raise TuneError(f"{spec.model or 'this model'} uses activation {spec.activation!r}, which the kernel "
                            f"does not implement (supported: {', '.join(SUPPORTED_ACTIVATIONS)}); tuning it would "
                            "time the wrong computation")

    # The measurer: a recorded table, the GPU, or the interpreter.
    import torch
    import triton

    triton_version = triton.__version__
    pool = None
    if measurer is None and replay is not None:
        from .table import ReplayTable

        measurer = ReplayTable(replay)
        table_name = Path(replay).stem
        table_meta = measurer.metadata()
        if spec is None and table_meta.get("spec"):
            spec = ModelSpec.from_dict(table_meta["spec"])
        triton_version = table_meta.get("triton", triton_version)
        if batch_sizes is None:
            batch_sizes = measurer.batch_sizes
    elif measurer is None:
        if spec is None:
            raise TuneError("give a model, a spec, or a replay table")
        if torch.cuda.is_available():
            from .measure import CudaGraphTimer

            measurer = CudaGraphTimer(spec, device or "cuda")
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
    batch_sizes = _check_batch_sizes(batch_sizes if batch_sizes is not None else space.DEFAULT_BATCH_SIZES)
    device_name = getattr(measurer, "device_name", "unknown")
    if table_meta.get("device"):
        device_name = table_meta["device"]
    is_performance = bool(getattr(measurer, "is_performance", True))

    # Candidates: the grid, with block quantization's BLOCK_SIZE_K rule and the shared-memory estimate.
    block_k = spec.block_shape[1] if spec is not None and spec.block_shape else None
    if spec is None and replay is not None:
        block_k = max(c.BLOCK_SIZE_K for M in batch_sizes for c in measurer.configs(M)) if all(
            M in measurer.entries for M in batch_sizes) else None
    operand_bytes = 1 if spec is not None and spec.dtype == "fp8_w8a8" else 2
    smem = getattr(measurer, "shared_memory_bytes", space.H100_SHARED_MEMORY_BYTES)
    candidates = [c for c in space.grid(block_k) if space.fits_shared_memory(c, operand_bytes, operand_bytes, smem)]
    choices = dict(space.iter_choices(block_k))
    if n_trials is None:
        n_trials = len(space.grid(block_k)) if sampler == "grid" else DEFAULT_N_TRIALS

    # Storage and studies.
    storage_arg = storage if storage is not None else default_storage(spec, table_name)
    store = open_storage(storage_arg)
    base = study_base_name(spec, device_name, triton_version, table_name)
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
        _load_history(study, M, state)

    defaults = {M: space.default_config(M, spec.E if spec else 256, spec.dtype if spec else None,
                                        spec.block_shape if spec else None) for M in batch_sizes}
    if warm_start:
        from .warm_start import enqueue_warm_start

        enqueue_warm_start(studies, state, defaults, spec, device_name, list(tuned_config_dirs) + (
            [output_dir] if output_dir is not None else []))

    if pool is None and type(measurer).__name__ == "CudaGraphTimer":
        from .compile import CompilePool

        pool = CompilePool(spec, workers=compile_workers, device=str(measurer.device))
    try:
        interrupted = _search(studies, samplers, state, measurer, pool, n_trials, timeout_s, started, progress,
                              defaults)
    finally:
        if pool is not None:
            pool.close()

    result = _collect(studies, defaults, measurer, storage_arg, spec, is_performance, started, interrupted)
    if output_dir is not None and spec is not None and result.best:
        from .export import write_sglang, write_vllm

        configs = {M: Config.from_dict(c) for M, c in result.best.items()}
        result.files["sglang"] = write_sglang(spec, configs, output_dir, device_name=device_name,
                                              triton_version=triton_version)
        result.files["vllm"] = write_vllm(spec, configs, output_dir, device_name=device_name,
                                          triton_version=triton_version)
    if progress:
        print(summary_text(result), flush=True)
    return result


def _config_of(trial: optuna.trial.FrozenTrial) -> Config | None:
    try:
        return Config(*(int(trial.params[p]) for p in PARAM_NAMES))
    except (KeyError, ValueError):
        return None


def _counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Finished trials that count against the budget: measured or failed, not interrupted before measuring."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
            if not str(t.user_attrs.get("error", "")).startswith(INTERRUPTED)]


def _load_history(study: optuna.Study, M: int, state: SearchState) -> None:
    """Feed a resumed study's finished trials into the shared search state."""
    for t in _counted(study):
        config = _config_of(t)
        if config is None:
            continue
        if t.state == TrialState.COMPLETE:
            state.record(M, config, float(t.value))
        else:
            error = str(t.user_attrs.get("error", ""))
            state.record(M, config, None, compile_failure=_is_compile_failure(error))


def _finished(study: optuna.Study) -> int:
    return len(_counted(study))


def _search(studies, samplers, state, measurer, pool, n_trials, timeout_s, started, progress, defaults) -> bool:
    """Round-robin over batch sizes until every study has n_trials finished trials, time runs out, or Ctrl-C.

    Returns whether the search was interrupted.
    """
    from .progress import Progress

    choices = dict(space.iter_choices())
    total = {M: _finished(s) for M, s in studies.items()}
    bar = Progress(studies, n_trials, defaults, enabled=progress)
    with _StopFlag() as flag:
        while not flag.stop:
            if timeout_s is not None and time.perf_counter() - started > timeout_s:
                break
            asked = []
            for M, study in studies.items():
                if total[M] >= n_trials:
                    continue
                trial = study.ask()
                config = Config(*(int(trial.suggest_categorical(p, getattr(samplers[M], "choices", choices)[p]))
                                  for p in PARAM_NAMES))
                asked.append((M, study, trial, config))
            if not asked:
                break
            if pool is not None:
                # Compile the round's configs in parallel, then what the search will likely ask next, while
                # the GPU times this round.
                pool.ensure(c for _, _, _, c in asked)
                pool.ensure((c for M in studies for c in state.lookahead(M, LOOKAHEAD)), speculative=True)
            for i, (M, study, trial, config) in enumerate(asked):
                if flag.stop:
                    # Asked but never measured: closed as failed, marked so they are retried, not counted.
                    for _, study2, trial2, _ in asked[i:]:
                        trial2.set_user_attr("error", f"{INTERRUPTED}: stopped before it was measured")
                        study2.tell(trial2, state=TrialState.FAIL)
                    break
                m = _measure(measurer, pool, config, M)
                _tell(study, trial, config, m, state, M)
                pending = getattr(samplers[M], "pending", None)
                if pending is not None:
                    pending.discard(config)
                total[M] += 1
                bar.update(M, config, m)
                if total[M] == n_trials:
                    refresh_study_note(study)  # this batch size is done: its dashboard note is final
    bar.close()
    return flag.stop


def _measure(measurer, pool, config: Config, M: int) -> Measurement:
    if pool is not None:
        failure = pool.result(config)
        if failure is not None:
            return Measurement(None, failure)
    try:
        return measurer.measure(config, M)
    except TuneError:
        raise
    except Exception as exc:  # failure is a value: never let one config end the study
        from .measure import describe_failure

        return Measurement(None, describe_failure(exc))


def _tell(study: optuna.Study, trial: optuna.Trial, config: Config, m: Measurement, state: SearchState,
          M: int) -> None:
    for key, value in m.attrs.items():
        trial.set_user_attr(key, value)
    if m.ok:
        study.tell(trial, m.latency_us)
        state.record(M, config, m.latency_us)
    else:
        trial.set_user_attr("error", m.error)
        study.tell(trial, state=TrialState.FAIL)
        state.record(M, config, None, compile_failure=_is_compile_failure(m.error or ""))


def _collect(studies, defaults, measurer, storage_arg, spec, is_performance, started, interrupted) -> TuneResult:
    best, latency, default_latency, used, names = {}, {}, {}, {}, {}
    for M, study in studies.items():
        names[M] = study.study_name
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        used[M] = _finished(study)
        default_latency[M] = study.user_attrs.get("default_latency_us")
        for t in complete:
            if _config_of(t) == defaults[M]:
                default_latency[M] = float(t.value)
        if default_latency[M] is None:
            # The default lies outside the search space (or warm start was off): time it apart from the budget.
            m = _measure(measurer, None, defaults[M], M)
            if m.ok:
                default_latency[M] = m.latency_us
                study.set_user_attr("default_latency_us", m.latency_us)
        study.set_user_attr("default_config", defaults[M].to_dict())
        refresh_study_note(study)
        if complete:
            top = min(complete, key=lambda t: t.value)
            best[M] = _config_of(top).to_dict()
            latency[M] = float(top.value)
    return TuneResult(best, latency, default_latency, {}, storage_arg, names, is_performance, spec, used,
                      time.perf_counter() - started, interrupted)


def summary_text(result: TuneResult) -> str:
    """A short table: batch size, tuned config, latency, SGLang default latency, speedup."""
    lines = [f"{'M':>6}  {'best config':28s} {'us':>10} {'default us':>11} {'speedup':>8} {'trials':>6}"]
    for M in sorted(result.best):
        d = result.default_latency_us.get(M)
        lines.append(f"{M:>6}  {str(Config.from_dict(result.best[M])):28s} {result.latency_us[M]:>10.2f} "
                     f"{d if d is not None else float('nan'):>11.2f} "
                     f"{(d / result.latency_us[M]) if d else float('nan'):>7.3f}x {result.trials_used.get(M, 0):>6}")
    g = result.geomean_speedup()
    lines.append(f"geometric-mean speedup over SGLang's default: {g:.3f}x" if g else "default config not measured")
    if not result.is_performance:
        lines.append("NOTE: timings from Triton's CPU interpreter; they are not performance numbers.")
    for kind, path in result.files.items():
        lines.append(f"wrote {kind}: {path}")
    lines.append(f"wall time {result.wall_s:.1f} s" + (" (interrupted)" if result.interrupted else ""))
    return "\n".join(lines)

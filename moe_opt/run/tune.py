"""tune(): the Python API of one tune, a short function over :class:`~moe_opt.run.session.TuneSession`."""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import TuneError
from ..model.spec import ModelSpec
from ..space import Config
from .result import TuneResult
from .session import MEASURE_TIMEOUT_S, TunePlan, TuneSession


def tune(model: str | None = None, *, spec: ModelSpec | None = None, tp_size: int = 1, ep_size: int = 1,
         dtype: str | None = None, swiglu_limit: float | None = None, batch_sizes: Sequence[int] | None = None,
         n_trials: int | None = None, timeout_s: float | None = None, storage: Any = None,
         sampler: Any = None, seed: int | None = None, output_dir: str | Path | None = "moe_configs",
         warm_start: bool = True, warm_start_configs: Mapping[int, Sequence[Any]] | None = None,
         tuned_config_dirs: Sequence[str | Path] = (), device: str | None = None,
         replay: str | Path | None = None, measurer: Any = None, compile_workers: int | None = None,
         progress: bool = True, n_workers: int = 1, guard: bool | Callable[[Config], Any] = True,
         measure_timeout_s: float = MEASURE_TIMEOUT_S, compile_pool: Any = None, confirm: bool = True,
         kernel: str = "builtin", routing: Any = "uniform", down_config: bool | None = None,
         target: str | None = None, tma: bool | None = None) -> TuneResult:
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
            shared by all workers (default 32; 4 on the interpreter; the whole grid with sampler="grid").
        timeout_s: stop after this many seconds (> 0), keeping everything.
        storage: Optuna storage URL, .db/.journal path or storage object; default ``sqlite:///studies/<model>.db``
            (a replay: ``studies/replay_<table>.db``), or ``journal:studies/<model>.journal`` with n_workers > 1.
        sampler: "moe" (default), "tpe", "random", "gp" (Optuna's GPSampler, needs scipy), "grid"
            (exhaustive), or an Optuna sampler.
        seed: seed of the sampler, 0 to MAX_SEED (about 4.26 million).
        output_dir: where config files go (SGLang layout ``configs/triton_X_Y_Z/`` and vLLM files side by
            side); None to skip export. Batch sizes an existing file holds and this run has no result for are kept.
        warm_start: first measure SGLang's default config, existing tuned configs for the shape (found in
            ``tuned_config_dirs`` and output_dir) and the best configs of already-tuned batch sizes.
        warm_start_configs: {M: configs (Config or dicts with the six keys)} measured first at each batch size
            (batch sizes not listed take the nearest listed one's), after the default and existing files; what
            :func:`moe_opt.sweep` passes from one shape to the next. Configs outside the search space are skipped.
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
        kernel: the kernel backend to time: "builtin" (moe_opt's Triton kernel), or an installed engine's own
            fused-MoE path, "sglang" or "vllm" (kernel/engines.py; needs the engine and a GPU), or an engine's own
            GEMM kernel and launch function loaded from a folder of its files inside moe_opt's align, activation and
            sum, "sglang-kernel=<folder>" or "vllm-kernel=<folder>" (docs/engines.md; benchmarks/carry_engines.py
            builds the folders).
        target: the engine the builtin kernel tunes for, "sglang" (None, the default) or "vllm": its launch rules
            (vLLM's tiny-batch path and grid trimming) and its default config, the baseline of every speedup. Part
            of the study identity. An engine kernel's target is that engine.
        routing: the routing of the timed calls (docs/routing.md): "uniform" (default: a real top-k over random
            logits), "zipf<s>" (expert popularity 1/rank^s, e.g. "zipf1.2"), "trace:PATH" (slices of a recorded
            trace: SGLang's topk_ids dumps, .pt or .npy), or a model.routing.RoutingSpec. Part of the study identity.
        down_config: tune a config per GEMM for SGLang (its ``<name>_down.json`` beside the up file; both share
            BLOCK_SIZE_M): each trial times GEMM1's stage apart, the search takes turns on the whole call's time and
            each GEMM's, and the best pair is timed on the whole call against the best single config. None (default):
            on where the measurer times each GEMM (the GPU, the interpreter), off for replay tables; False: one
            config for both GEMMs. vLLM's file always holds the best single config (vLLM reads no down file).
        tma: offer USE_TMA (SGLang's tensor-memory-accelerator loads, docs/kernel.md) as a tunable: None (default)
            where the device has tensor descriptors (Hopper) and the target is SGLang; False never; True: the same
            as None, but a device without them is an error. Part of the study identity ("|tma").

    Returns:
        TuneResult. Where a batch size has nothing to export (every config failed, or the search stopped before
        measuring one) it is missing from ``best`` and ``notes`` says why; ``best`` is empty when no batch size
        has a result.

    Raises:
        TuneError: an argument of the wrong type or out of range, named with what is accepted.

    Example:
        >>> import moe_opt
        >>> r = moe_opt.tune(replay="moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv", n_trials=8,
        ...                  storage="sqlite:///:memory:", output_dir=None, progress=False)  # doctest: +SKIP
        >>> sorted(r.best)  # doctest: +SKIP
        [1, 16, 64, 256, 1024, 4096]
    """
    _check_arguments(locals())
    warm_configs = _warm_start_configs(warm_start_configs)
    if isinstance(storage, os.PathLike):
        storage = os.fspath(storage)
    if spec is None and model is not None:
        from ..model.resolve import resolve_model

        spec = resolve_model(model, tp_size=tp_size, ep_size=ep_size, dtype=dtype, swiglu_limit=swiglu_limit)
    plan = TunePlan(spec=spec, batch_sizes=batch_sizes, n_trials=n_trials, timeout_s=timeout_s, storage=storage,
                    sampler=sampler, seed=seed, output_dir=output_dir, warm_start=warm_start,
                    warm_start_configs=warm_configs,
                    tuned_config_dirs=list(tuned_config_dirs), device=device, replay=replay, measurer=measurer,
                    compile_workers=compile_workers, progress=progress, n_workers=n_workers, guard=guard,
                    measure_timeout_s=measure_timeout_s, compile_pool=compile_pool, confirm=confirm, kernel=kernel,
                    routing=routing, down_config=down_config, target=target, tma=tma)
    with TuneSession(plan) as session:
        session.prepare()
        session.search()
        return session.finalize()


# Strategy.sampler seeds batch size i's sampler with seed * 1009 + i; numpy (Optuna's samplers) takes < 2**32.
MAX_SEED = 2**32 // 1009 - 1


def _check_arguments(args: dict[str, Any]) -> None:
    """Every argument of tune() of the wrong type or out of range is a one-line TuneError, before anything is
    resolved, opened or written (batch sizes, the storage URL and the replay table are checked where they are
    read: run/session.py, store/storage.py, measure/replay.py)."""
    from ..kernel.backend import BACKENDS, TARGETS, KernelBackend
    from ..model.resolve import _DTYPE_ARGS

    for name in ("n_trials", "compile_workers"):
        if args[name] is not None:
            _check_count(name, args[name])
    for name in ("n_workers", "tp_size", "ep_size"):
        _check_count(name, args[name])
    for name in ("timeout_s", "swiglu_limit"):
        if args[name] is not None:
            _check_positive(name, args[name], "or None")
    _check_positive("measure_timeout_s", args["measure_timeout_s"])
    seed = args["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not 0 <= seed <= MAX_SEED):
        raise TuneError(f"seed must be an integer from 0 to {MAX_SEED}, or None, got {seed!r}")
    dtype = args["dtype"]
    if dtype is not None and (not isinstance(dtype, str) or dtype.lower() not in _DTYPE_ARGS):
        raise TuneError(f"unknown dtype {dtype!r}; accepted: fp8_w8a8, bf16/bfloat16, fp16/float16")
    if args["tma"] not in (None, True, False):
        raise TuneError(f"tma must be None, True or False, got {args['tma']!r}")
    for name in ("warm_start", "progress", "confirm"):
        if not isinstance(args[name], bool):
            raise TuneError(f"{name} must be True or False, got {args[name]!r}")
    if not (isinstance(args["guard"], bool) or callable(args["guard"])):
        raise TuneError(f"guard must be True, False or a function config -> relative error, got {args['guard']!r}")
    for name in ("model", "output_dir", "replay"):
        if args[name] is not None and not isinstance(args[name], (str, os.PathLike)):
            raise TuneError(f"{name} must be a path or a string, or None, got {type(args[name]).__name__} "
                            f"{args[name]!r}")
    dirs = args["tuned_config_dirs"]
    if isinstance(dirs, (str, bytes, os.PathLike)) or not isinstance(dirs, (list, tuple)) or \
            not all(isinstance(d, (str, os.PathLike)) for d in dirs):
        raise TuneError(f"tuned_config_dirs must be a list of folders, e.g. ['moe_configs'], got {dirs!r}")
    if args["spec"] is not None and not isinstance(args["spec"], ModelSpec):
        raise TuneError(f"spec must be a ModelSpec (ModelSpec.from_shape(...)), got {type(args['spec']).__name__}")
    if args["device"] is not None and not isinstance(args["device"], str):
        raise TuneError(f"device must be a string such as 'cuda:0', or None, got {args['device']!r}")
    if args["measurer"] is not None and not callable(getattr(args["measurer"], "measure", None)):
        raise TuneError(f"measurer {type(args['measurer']).__name__} has no measure(config, M) method; give a "
                        "moe_opt.measure.base.Measurer")
    kernel = args["kernel"]
    if isinstance(kernel, str) and "=" in kernel:  # an engine's kernel files from a folder: checked where built
        from ..kernel.backend import get_backend

        get_backend(kernel)
    elif kernel not in BACKENDS if isinstance(kernel, str) else not isinstance(kernel, KernelBackend):
        engines = ", ".join(name for name in BACKENDS if name != "builtin")
        raise TuneError(f"unknown kernel {kernel!r}; accepted: builtin or a KernelBackend, or an installed engine's "
                        f"own kernel: {engines}")
    target = args["target"]
    if target is not None and target not in TARGETS:
        raise TuneError(f"unknown target {target!r}; accepted: {', '.join(TARGETS)}, or None")
    if target is not None and isinstance(kernel, str) and kernel != "builtin" and target != kernel:
        raise TuneError(f"kernel {kernel!r} times {kernel}'s own kernel, so its target is {kernel}; got target "
                        f"{target!r}")
    _check_storage(args["storage"])
    _check_sampler(args["sampler"])


def _warm_start_configs(given: Mapping[int, Sequence[Any]] | None) -> dict[int, list[Config]] | None:
    """``warm_start_configs`` as {M: [Config]}, or a one-line TuneError naming the entry that is not one."""
    if given is None:
        return None
    if not isinstance(given, Mapping):
        raise TuneError(f"warm_start_configs must be a mapping {{batch size: [configs]}}, got {type(given).__name__}")
    out: dict[int, list[Config]] = {}
    for M, configs in given.items():
        if isinstance(M, bool) or not isinstance(M, numbers.Integral) or M < 1:
            raise TuneError(f"warm_start_configs: batch size {M!r} is not an integer >= 1")
        if isinstance(configs, (Config, Mapping)):
            configs = [configs]
        out[int(M)] = []
        for c in configs:
            try:
                out[int(M)].append(c if isinstance(c, Config) else Config.from_dict(c))
            except (TypeError, ValueError) as exc:
                raise TuneError(f"warm_start_configs[{M}]: {exc}") from None
    return out or None


def _check_storage(storage: Any) -> None:
    if storage is None or isinstance(storage, (str, os.PathLike)):
        return
    import optuna

    if not isinstance(storage, optuna.storages.BaseStorage):
        raise TuneError(f"storage must be a storage URL such as sqlite:///studies/model.db, a path or an Optuna "
                        f"storage, got {type(storage).__name__} {storage!r}")


def _check_sampler(sampler: Any) -> None:
    from ..search.base import Strategy
    from ..search.strategies import STRATEGY_NAMES, require_gp

    if sampler == "gp":
        require_gp()
    if sampler is None or isinstance(sampler, str) and sampler in STRATEGY_NAMES or isinstance(sampler, Strategy):
        return
    import optuna

    if not isinstance(sampler, optuna.samplers.BaseSampler):
        raise TuneError(f"unknown sampler {sampler!r}; accepted: {', '.join(STRATEGY_NAMES)} or an optuna sampler")


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise TuneError(f"{name} must be an integer >= 1, got {value!r}")


def _check_positive(name: str, value: Any, alternative: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        what = "a finite number of seconds > 0" if name.endswith("_s") else "a finite number > 0"
        raise TuneError(f"{name} must be {what}{' ' + alternative if alternative else ''}, got {value!r}")

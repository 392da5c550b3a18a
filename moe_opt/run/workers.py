"""``tune(..., n_workers=N)``: N processes search one set of studies, one per GPU on a multi-GPU host.

The tuning process creates the studies and enqueues the warm start, then starts N worker processes (spawned,
so no CUDA state is inherited). Worker i sees one GPU (``CUDA_VISIBLE_DEVICES`` set to the i-th visible one)
and runs a session's search step with the tune's plan (session.py, run_worker); coordinator.py keeps the
workers from measuring a config twice or running past the shared budget. The tuning process shows the progress, then checks, exports and
summarizes once every worker is done.

Ctrl-C reaches the tuning process only (workers ignore SIGINT): the first asks every worker to stop after its
running trial, the second ends them at once (their running trials are retried by the next run).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import tempfile
from typing import Any, Callable

from ..errors import TuneError
from ..store.storage import StorageURL
from .stop import StopFlag

POLL_S = 1.0


def worker_devices(n_workers: int, device: str | None) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES entry of each worker (None each on a machine without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        return [None] * n_workers
    if device is not None:
        raise TuneError(f"device={device!r} picks one GPU, but n_workers={n_workers} takes one GPU per worker in "
                        "order; choose the GPUs with CUDA_VISIBLE_DEVICES instead")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s.strip() for s in visible.split(",") if s.strip()] if visible else []
    ids = ids[:torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]
    if n_workers > len(ids):
        raise TuneError(f"n_workers={n_workers} needs {n_workers} GPUs (one worker per GPU); {len(ids)} visible")
    names = {torch.cuda.get_device_name(i) for i in range(n_workers)}
    if len(names) > 1:
        raise TuneError(f"the workers' GPUs differ ({', '.join(sorted(names))}); configs are tuned per device: "
                        "run one tune per GPU type, choosing the GPUs with CUDA_VISIBLE_DEVICES")
    return ids[:n_workers]


def workers_storage(storage: Any, default_journal: str, n_workers: int, progress: bool) -> str:
    """The storage URL several processes share: journal:PATH by default; SQLite and in-memory are refused."""
    if storage is None:
        if progress:
            print(f"moe-opt: {n_workers} workers share {default_journal} (SQLite, the single-process default, takes "
                  "one writer at a time)", flush=True)
        return default_journal
    if not isinstance(storage, str):
        raise TuneError("with n_workers > 1 give the storage as a URL (journal:PATH on one host, postgresql://... "
                        "across hosts); a storage object cannot be shared with worker processes")
    if StorageURL.parse(storage).kind in ("sqlite", "memory"):
        raise TuneError(f"storage {storage} is SQLite, which takes one writing process; with n_workers={n_workers} "
                        "use journal:PATH (one host) or postgresql://user@host/db (many hosts)")
    return storage


def run_workers(target: Callable, plan: Any, devices: list[str | None], studies: dict, n_trials: int,
                progress: bool) -> tuple[bool, list[str]]:
    """Run ``target(index, plan_path, stop_event, parent_pid)`` (a session's search) in one process per device
    until they finish; each gets a copy of ``plan`` with its own seed and device. Returns (interrupted, worker
    errors)."""
    import dataclasses

    with tempfile.TemporaryDirectory(prefix="moe_opt_workers_") as tmp:
        paths = []
        for i, dev in enumerate(devices):
            seed = plan.seed
            worker_plan = dataclasses.replace(plan, seed=None if seed is None else seed * 7919 + i,
                                              device="cuda:0" if dev is not None else None, n_workers=1)
            # Through a file, not the process's arguments: a large measurer (a replay table) in the start pipe
            # would make each start wait for the previous worker to import torch.
            paths.append(os.path.join(tmp, f"worker{i}.pickle"))
            try:
                with open(paths[-1], "wb") as f:
                    pickle.dump(worker_plan, f)
            except Exception as exc:
                raise TuneError(f"with n_workers > 1 the measurer and sampler are sent to each worker process and "
                                f"must be picklable: {exc}") from None
        return _run(target, paths, devices, studies, n_trials, progress)


def _run(target: Callable, paths: list[str], devices: list[str | None], studies: dict, n_trials: int,
         progress: bool) -> tuple[bool, list[str]]:
    ctx = multiprocessing.get_context("spawn")
    stop_event = ctx.Event()
    procs = []
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        for i, (path, dev) in enumerate(zip(paths, devices)):
            if dev is not None:
                os.environ["CUDA_VISIBLE_DEVICES"] = dev  # a spawned process inherits the environment at start
            proc = ctx.Process(target=target, args=(i, path, stop_event, os.getpid()),
                               name=f"moe-opt-worker-{i}")
            proc.start()
            procs.append(proc)
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved

    from ..view.progress import Progress

    bar = Progress(studies, n_trials, {}, enabled=progress)  # a bar on a terminal, plain lines in a log
    try:
        with StopFlag() as flag:
            while any(p.is_alive() for p in procs):
                if flag.stop:
                    stop_event.set()
                for p in procs:
                    p.join(POLL_S / len(procs))
                bar.sync(studies)
            interrupted = flag.stop
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(10)
        raise
    finally:
        bar.close()
    errors = [f"worker {i} exited with code {p.exitcode}" for i, p in enumerate(procs) if p.exitcode]
    return interrupted, errors

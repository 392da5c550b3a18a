"""The measuring process's own profile during a whole tune: ``benchmarks/e2e_tune.py --profile-measuring PATH``.

A CudaGraphTimer that runs each of its measurements under cProfile and, as its process leaves, writes the profile
to ``$MOE_OPT_PROFILE_MEASURING``: how many measurements of each kind (a Config with GEMM1's stage timed apart, as the
search's; a whole call, as re-measuring's), the wall seconds they took, and the functions by internal and cumulative
time (``Event.synchronize`` is the process waiting for the GPU). e2e_tune.py puts this class in the place of
moe_opt's CudaGraphTimer before the tune, so the measuring process the tune starts builds this one.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import time
from multiprocessing import util
from pathlib import Path

from moe_opt.measure.cuda_graph import CudaGraphTimer
from moe_opt.space import Config

ENV = "MOE_OPT_PROFILE_MEASURING"


def _write(profiler: cProfile.Profile, calls: dict, path: str) -> None:
    text = io.StringIO()
    text.write("measurements: " + ", ".join(f"{kind} {n} in {s:.2f} s" for kind, (n, s) in calls.items()) + "\n\n")
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    tmp = f"{path}.tmp"
    Path(tmp).write_text(text.getvalue())
    os.replace(tmp, path)


class ProfiledTimer(CudaGraphTimer):
    """CudaGraphTimer, each measure() profiled; the profile written as the process leaves (or the timer goes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._profiler = cProfile.Profile()
        self._calls = {"split": [0, 0.0], "whole": [0, 0.0]}
        util.Finalize(self, _write, args=(self._profiler, self._calls, os.environ[ENV]), exitpriority=10)

    def measure(self, config, M, stop_above_us=None, upcoming=None):
        kind = "split" if self.split_stages and isinstance(config, Config) else "whole"
        t0 = time.perf_counter()
        self._profiler.enable()
        try:
            return super().measure(config, M, stop_above_us, upcoming)
        finally:
            self._profiler.disable()
            self._calls[kind][0] += 1
            self._calls[kind][1] += time.perf_counter() - t0

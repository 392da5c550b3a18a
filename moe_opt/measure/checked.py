"""A measurer of the user's, its results checked where they come out (``tune(measurer=...)``)."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import TuneError
from ..space import Config
from .base import AsyncMeasurer, HealthReporting, KernelRunner, Measurement, custom_info


class CheckedMeasurer:
    """A measurer given to ``tune(measurer=...)``, its results checked where they come out: a latency that is not
    a finite number of microseconds > 0 becomes a failed trial with the reason (the search takes logs of latency
    ratios, the ranking the smallest: a -1 would crash the one and win the other). A result that is not a
    :class:`~moe_opt.measure.base.Measurement` is a TuneError: the measurer itself does not work. Made by
    :func:`check_measurer`, which keeps the measurer's optional capabilities (measure/base.py)."""

    def __init__(self, measurer: Any):
        self.inner = measurer
        self.info = custom_info(measurer)

    def measure(self, config: Config, M: int, **options) -> Measurement:
        """The inner measurer's result, checked; ``options`` (``stop_above_us``, ``upcoming``: where its info
        declares stops_early, prefetches) passed on."""
        return checked_measurement(self.inner.measure(config, M, **options), self.inner)


def check_measurer(measurer: Any) -> CheckedMeasurer:
    """``measurer`` behind a :class:`CheckedMeasurer` that is an AsyncMeasurer, KernelRunner or HealthReporting
    where ``measurer`` is one (the scheduler and the guard ask with isinstance)."""
    methods: dict[str, Callable] = {}
    if isinstance(measurer, AsyncMeasurer):
        methods["submit"] = lambda self, config, M, **options: self.inner.submit(config, M, **options)
        methods["collect"] = lambda self: checked_measurement(self.inner.collect(), self.inner)
    if isinstance(measurer, KernelRunner):
        methods["run_with_inputs"] = lambda self, fn, *args: self.inner.run_with_inputs(fn, *args)
    if isinstance(measurer, HealthReporting):
        methods["healthy"] = lambda self: self.inner.healthy()
    cls = type(f"Checked{type(measurer).__name__}", (CheckedMeasurer,), methods) if methods else CheckedMeasurer
    return cls(measurer)


def checked_measurement(m: Any, measurer: Any) -> Measurement:
    """``m`` if it is a usable Measurement; a failure with the reason if its latency is not one."""
    from ..search.surrogate import is_latency

    if not isinstance(m, Measurement):
        raise TuneError(f"measurer {type(measurer).__name__} returned {type(m).__name__} {str(m)[:80]!r}, not a "
                        "Measurement; measure(config, M) must return moe_opt.measure.base.Measurement")
    if m.latency_us is None:
        return m if m.error else Measurement(None, "Failed: the measurer gave no latency and no reason", m.attrs)
    if not is_latency(m.latency_us):
        return Measurement(None, f"InvalidLatency: the measurer returned latency_us={m.latency_us!r}; a latency is "
                           "a finite number of microseconds > 0", m.attrs)
    return m

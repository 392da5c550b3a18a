"""The summary a tune prints at its end: per batch size the tuned config, its latency, SGLang's default and the
speedup, then what the user should know."""

from __future__ import annotations

from ..run.result import TuneResult
from ..space import Config


def summary_text(result: TuneResult) -> str:
    """A short table: batch size, tuned config, latency, SGLang default latency, speedup; then what to know."""
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
    for M, reasons in sorted(result.excluded.items()):
        for reason in reasons:
            lines.append(f"correctness guard, M={M}: excluded {reason}")
    lines += result.notes + [f"moe-opt: {e}" for e in result.worker_errors]
    for kind, path in result.files.items():
        lines.append(f"wrote {kind}: {path}")
    lines.append(f"wall time {result.wall_s:.1f} s" + (" (interrupted)" if result.interrupted else ""))
    t = result.timings
    if t:
        compiled = f", {t['compiled']:.0f} configs compiled" if "compiled" in t else ""
        lines.append(f"time: start-up {t['start_s']:.1f} s, trials {t['search_s']:.1f} s (waiting for measurements "
                     f"{t['measuring_s']:.1f} s, for compiles {t['compile_wait_s']:.1f} s; {t['measured']:.0f} "
                     f"measured{compiled}), re-measuring contenders {t['confirm_s']:.1f} s, guard {t['guard_s']:.1f} s, "
                     f"results and export {t['collect_export_s']:.1f} s")
    return "\n".join(lines)

"""report(): one offline HTML page of what the search found, plus the summary as CSV and Markdown.

Per shape: latency against batch size (tuned, SGLang's default, the grid optimum where known), speedup, how fast
each batch size's search converged, which parameters mattered, and the achieved bandwidth against the device's
copy bandwidth. The data come from report_data.py; plotly and pandas are imported where the page is built.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ..errors import TuneError
from ..space import PARAM_NAMES
from .report_data import (
    SUMMARY_COLUMNS,
    Shape,
    copy_bandwidth,
    load_shapes,
    markdown_table,
    summary_rows,
)

# --- The HTML page ----------------------------------------------------------------------------------------------
TUNED, DEFAULT, GRID = "#1f5fbf", "#8c8c8c", "#2ca02c"


def _m_axis(Ms: list[int]) -> dict:
    """A log-scale batch-size axis ticked at powers of two (SGLang's batch sizes crowd a linear one)."""
    ticks = [2 ** i for i in range(0, max(Ms).bit_length() + 1) if min(Ms) <= 2 ** i <= 2 * max(Ms)]
    return dict(type="log", title="batch size M (tokens)", tickvals=ticks, ticktext=[str(t) for t in ticks])


def _log_ticks(values) -> list[float]:
    """1-2-5 ticks covering the values, for a log latency axis (plotly's own label only some of them)."""
    vals = [v for v in values if v == v and v > 0]
    lo, hi = min(vals), max(vals)
    ticks = [m * 10 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5)]
    inside = [t for t in ticks if lo / 1.5 <= t <= hi * 1.5]
    return inside if len(inside) >= 2 else ticks


def _eta_squared(trials: list, param: str) -> float:
    """Share of the variance of log latency explained by one parameter alone (correlation ratio, first order)."""
    y = [math.log(t.value) for t in trials]
    if len(y) < 3:
        return math.nan
    mean = sum(y) / len(y)
    total = sum((v - mean) ** 2 for v in y)
    groups: dict[int, list[float]] = {}
    for t, v in zip(trials, y):
        groups.setdefault(int(t.params[param]), []).append(v)
    if total == 0 or len(groups) < 2:
        return 0.0 if total == 0 else math.nan
    return sum(len(g) * (sum(g) / len(g) - mean) ** 2 for g in groups.values()) / total


def _trial_step(n: int) -> int:
    """The tick step of a trial-number axis: 1, 2, 5, 10, 20, ..., the smallest giving at most ten ticks (a trial
    number is never 2.5).

    Example:
        >>> _trial_step(4), _trial_step(48), _trial_step(200)
        (1, 5, 20)
    """
    steps = [m * 10 ** e for e in range(7) for m in (1, 2, 5)]
    return next((step for step in steps if n / step <= 10), steps[-1])


def _figures(shape: Shape, df, copy_gbps: float | None) -> list:
    import plotly.graph_objects as go

    Ms = sorted(shape.infos)
    rows = df.set_index("M")
    perf = shape.first.is_performance
    layout = dict(template="plotly_white", height=420, margin=dict(l=70, r=30, t=110, b=60),
                  legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0), hovermode="x unified")

    def fig(title: str, subtitle: str, **axes) -> "go.Figure":
        if not perf:
            title += " (CPU interpreter)"
        figure = go.Figure(layout=dict(layout, title=dict(text=title, subtitle=dict(text=subtitle)), **axes))
        if not perf:  # across the plot, so that a cropped screenshot still says it
            figure.add_annotation(text="CPU interpreter: NOT performance numbers", xref="paper", yref="paper",
                                  x=0.5, y=0.5, showarrow=False, textangle=-12,
                                  font=dict(size=24, color="rgba(214, 39, 40, 0.35)"))
        return figure

    ticks = _log_ticks(list(rows["latency_us"]) + list(rows["default_us"]) + list(shape.grid_us.values()))
    lat = fig("Latency by batch size", "lower is better; hover for the configs", xaxis=_m_axis(Ms), yaxis=dict(
        type="log", title="latency per call (µs)" if perf else "interpreter wall-clock time per call (µs)",
        tickvals=ticks, ticktext=[f"{t:g}" for t in ticks]))
    lat.add_scatter(x=Ms, y=rows["latency_us"], name="tuned (best found)", mode="lines+markers",
                    line=dict(color=TUNED, width=3), customdata=rows["best_config"],
                    hovertemplate="%{y:.2f} µs  %{customdata}")
    lat.add_scatter(x=Ms, y=rows["default_us"], name="SGLang default", mode="lines+markers",
                    line=dict(color=DEFAULT, dash="dash"), hovertemplate="%{y:.2f} µs")
    grid_Ms = [M for M in Ms if M in shape.grid_us]
    if grid_Ms:
        lat.add_scatter(x=grid_Ms, y=[shape.grid_us[M] for M in grid_Ms], name="grid optimum",
                        mode="markers", marker=dict(color=GRID, symbol="x", size=10),
                        hovertemplate=f"%{{y:.2f}} µs ({shape.grid_source})")

    if perf:
        sp = fig("Speedup over SGLang's default config", "default latency / tuned latency; above 1 = tuned is faster",
                 xaxis=_m_axis(Ms), yaxis=dict(title="speedup (×)", rangemode="tozero"))
    else:
        sp = fig("Ratio of interpreter times", "default / tuned interpreter time: not a speedup on any GPU",
                 xaxis=_m_axis(Ms), yaxis=dict(title="ratio of interpreter times (×)", rangemode="tozero"))
    sp.add_hline(y=1, line=dict(color=DEFAULT, dash="dot"))
    sp.add_scatter(x=Ms, y=rows["speedup"], name="tuned", mode="lines+markers", line=dict(color=TUNED, width=3),
                   hovertemplate="%{y:.3f}×")
    if grid_Ms:
        sp.add_scatter(x=grid_Ms, y=[rows.at[M, "default_us"] / shape.grid_us[M] for M in grid_Ms],
                       name="grid optimum", mode="markers", marker=dict(color=GRID, symbol="x", size=10),
                       hovertemplate="%{y:.3f}×")

    ref = "the grid optimum" if len(grid_Ms) == len(Ms) else "the final best"
    n_trials = max([len(shape.trials[M]) for M in Ms] + [1])
    hist = fig("Search progress per batch size", f"best latency so far, in % above {ref}; flat at 0 = converged",
               xaxis=dict(title="trial number (failed trials included)", tick0=0, dtick=_trial_step(n_trials),
                          tickformat="d"),
               yaxis=dict(title=f"best so far: % above {ref}", rangemode="tozero"))
    hist.update_layout(hovermode="closest", height=480, margin=dict(b=120),
                       legend=dict(orientation="h", y=-0.2, yanchor="top", x=0, entrywidth=70, title="M"))
    import plotly.colors

    colors = plotly.colors.sample_colorscale("Viridis", [i / max(1, len(Ms) - 1) * 0.9 for i in range(len(Ms))])
    for color, M in zip(colors, Ms):
        best_so_far, xs, ys, us = math.inf, [], [], []
        target = shape.grid_us.get(M) if ref == "the grid optimum" else rows.at[M, "latency_us"]
        for t in shape.trials[M]:
            if t.value is not None:
                best_so_far = min(best_so_far, float(t.value))
            if best_so_far < math.inf:
                xs.append(t.number + 1), ys.append(100 * (best_so_far / target - 1)), us.append(best_so_far)
        hist.add_scatter(x=xs, y=ys, name=f"M={M}", mode="lines", line=dict(color=color, shape="hv", width=2),
                         customdata=us, hovertemplate=f"M={M}, trial %{{x}}: %{{customdata:.2f}} µs (+%{{y:.1f}}%)"
                                                      "<extra></extra>")

    z = [[_eta_squared(shape.complete(M), p) for M in Ms] for p in PARAM_NAMES]
    # η² from the sampled trials, which are not uniform samples of the grid: a hint at what matters, not a measure.
    imp = fig("Parameter importance (η²)",
              "share of log-latency variance each parameter explains alone (– = not varied); "
              "optuna-dashboard's differs, see below",
              xaxis=dict(title="batch size M (tokens)", type="category"), yaxis=dict(autorange="reversed"))
    imp.add_heatmap(x=[str(M) for M in Ms], y=list(PARAM_NAMES), z=z, zmin=0, zmax=1, colorscale="Blues",
                    text=[[f"{v:.2f}" if v == v else "–" for v in row] for row in z], texttemplate="%{text}",
                    textfont=dict(size=10), colorbar=dict(title="η²"),
                    hovertemplate="M=%{x}, %{y}: η² = %{z:.2f}<extra></extra>")
    imp.update_layout(hovermode="closest", height=480)

    bw = fig("Achieved memory bandwidth", "fewest bytes a call must move (touched experts' weights + activations) "
             "/ latency", xaxis=_m_axis(Ms), yaxis=dict(title="achieved bandwidth (GB/s)", rangemode="tozero"))
    bw.update_layout(hovermode="closest")
    estimated = any("gbps" not in t.user_attrs for M in Ms for t in shape.complete(M))
    xs, ys = zip(*[(M, shape.gbps(M, t)) for M in Ms for t in shape.complete(M)]) if df["gbps"].notna().any() \
        else ((), ())
    bw.add_scatter(x=xs, y=ys, name="every measured config", mode="markers",
                   marker=dict(color=DEFAULT, size=5, opacity=0.35), hovertemplate="M=%{x}: %{y:.0f} GB/s")
    bw.add_scatter(x=Ms, y=rows["gbps"], name="tuned" + (" (bytes estimated for uniform routing)" if estimated
                                                          else ""),
                   mode="lines+markers", line=dict(color=TUNED, width=3), hovertemplate="M=%{x}: %{y:.0f} GB/s")
    gbps, label = (copy_gbps, f"copy bandwidth {copy_gbps:.0f} GB/s (given)") if copy_gbps else \
        copy_bandwidth(shape.first.device_name)
    top = max([v for v in list(ys) + list(rows["gbps"]) if v == v] + [1.0])
    if gbps and shape.first.is_performance:
        top = max(top, gbps)
        bw.add_hline(y=gbps, line=dict(color="#d62728", dash="dash"), annotation_position="bottom right",
                     annotation_text=label + " (device-to-device, read + write)")
    bw.update_yaxes(range=[0, top * 1.15])
    if not df["gbps"].notna().any():
        why = ("no bandwidth: interpreter times are CPU wall-clock times, not GPU kernel times" if not perf else
               "no bandwidth: the studies record no shape to count the bytes of a call")
        bw.add_annotation(text=why, xref="paper", yref="paper", x=0.5, y=0.8, showarrow=False,
                          font=dict(size=14, color="#444"))
    return [lat, sp, hist, imp, bw]


def _banner(shape: Shape) -> str:
    info = shape.first
    if not info.is_performance:
        return ("<p class='warn'>Timings from Triton's CPU interpreter on a scaled-down shape: "
                "<b>not performance numbers</b>. They exercise the search, nothing more.</p>")
    if str(info.attrs.get("measurement", "")).startswith("replay of "):
        return (f"<p class='note'>Replayed search: every latency was looked up in a table recorded earlier on "
                f"{info.device_name} ({info.attrs['measurement']}); the search itself ran without a GPU.</p>")
    return ""


IMPORTANCE_NOTE = (
    "<p class='note'><b>Two importances.</b> The heatmap above is η², the share of the variance of log latency that "
    "a parameter explains on its own, over the trials the search chose (not uniform samples of the grid, so a hint "
    "of what mattered). optuna-dashboard's <i>Hyperparameter Importance</i> is Optuna's PED-ANOVA: which parameters "
    "set the best 10% of trials apart from the rest. They answer different questions from the same trials, so they "
    "can rank the parameters differently; neither is wrong.</p>")


def _heading(shape: Shape) -> str:
    """The shape as a heading that wraps between its fields, never inside one (``block=[128,128]`` stays whole)."""
    import html

    model = shape.first.attrs.get("model") or ""
    fields = re.split(r",(?![^\[]*\])", shape.base.split("|")[1])  # not inside block=[128,128]
    tokens = "".join(f"<span class='tok'>{html.escape(f)}{',' if i < len(fields) - 1 else ''}</span> "
                     for i, f in enumerate(fields))
    return f"<h2>{f'<span class=tok>{html.escape(model)}</span> ' if model else ''}{tokens.strip()}</h2>"


def _study_names(shape: Shape) -> str:
    """The full study name pattern, breakable after each ``|`` and ``,`` so a narrow window wraps it, never cuts it."""
    import html

    name = html.escape(f"{shape.base}|M=<M>")
    return f"<code class='names'>{name.replace('|', '|<wbr>').replace(',', ',<wbr>')}</code>"


NOT_PERF_COLUMNS = {"latency (µs)": "interpreter time (µs) *", "SGLang default (µs)": "SGLang default, interpreter (µs) *",
                    "speedup": "ratio *"}


def _page(shapes: list[Shape], df, url: str, copy_gbps: float | None) -> str:
    import html
    import time

    import pandas as pd

    css = ("body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1500px;color:#222;padding:0 16px}"
           ".grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(620px,1fr));gap:12px}"
           ".warn{background:#fde2e1;border-left:5px solid #d62728;padding:8px 12px}"
           ".note{background:#eef3fb;border-left:5px solid #1f5fbf;padding:8px 12px}"
           "table.summary{border-collapse:collapse;font-size:13px}table.summary td,table.summary th"
           "{border:1px solid #ddd;padding:3px 8px;text-align:right}table.summary td:nth-child(2){text-align:left}"
           "table.notperf td{color:#777;font-style:italic}.foot{font-size:13px;color:#a11}"
           ".tok{white-space:nowrap}code{font-size:13px}code.names{overflow-wrap:anywhere}h2{margin-top:40px}")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>moe_opt report</title><style>{css}</style>"
             f"</head><body><h1>moe_opt tuning report</h1><p>Storage <code>{html.escape(url)}</code>, "
             f"{len(df)} batch sizes in {len(shapes)} shape(s); written {time.strftime('%Y-%m-%d %H:%M')}.</p>"]
    first = True
    for shape in shapes:
        info, part = shape.first, pd.DataFrame(summary_rows([shape]), columns=list(SUMMARY_COLUMNS))
        shown = part[["M", "best_config", "latency_us", "default_us", "speedup", "grid_best_us", "trials",
                      "failures", "gbps"]].dropna(axis=1, how="all").rename(columns={
                          "latency_us": "latency (µs)", "default_us": "SGLang default (µs)", "gbps": "GB/s",
                          "grid_best_us": "grid optimum (µs)", "best_config": "best config"})
        if not info.is_performance:
            shown = shown.rename(columns=NOT_PERF_COLUMNS)
        parts.append(f"{_heading(shape)}<p>{html.escape(info.device_name)}, Triton "
                     f"{html.escape(info.triton_version)}; {html.escape(str(info.attrs.get('measurement', '')))}. "
                     f"Study names: {_study_names(shape)}</p>{_banner(shape)}")
        parts.append(shown.to_html(index=False, classes="summary" + ("" if info.is_performance else " notperf"),
                                   border=0, na_rep="–", float_format=lambda v: f"{v:.2f}"))
        if not info.is_performance:
            parts.append("<p class='foot'>* wall-clock times of Triton's CPU interpreter on a scaled-down shape, and "
                         "their ratios: not performance numbers, and not a speedup on any GPU.</p>")
        parts.append("<div class='grid'>")
        for figure in _figures(shape, part, copy_gbps):
            parts.append(figure.to_html(full_html=False, include_plotlyjs=first,
                                         config={"displaylogo": False, "responsive": True}))
            first = False
        parts.append("</div>")
        parts.append(IMPORTANCE_NOTE)
    # Plots drawn while the page still loads can take a stale width; redraw them once the grid is laid out.
    parts.append("<script>window.addEventListener('load',()=>document.querySelectorAll('.js-plotly-plot')"
                 ".forEach(p=>Plotly.Plots.resize(p)));</script></body></html>")
    return "\n".join(parts)


def report(storage: Any, path: str | Path = "report.html", *, table: str | Path | None = None,
           copy_bandwidth_gbps: float | None = None) -> Path:
    """Write one self-contained HTML page (plotly.js embedded, works offline) and the summary as CSV and Markdown.

    Args:
        storage: Optuna storage URL, .db file path or storage object holding moe_opt studies.
        path: the HTML file; ``report.csv`` and ``report.md`` (same stem) are written beside it.
        table: a recorded grid table (CSV) to compare with the grid optimum (see :func:`summary`).
        copy_bandwidth_gbps: the device's copy bandwidth drawn on the bandwidth plot; default the measured
            figure for H100 (~3000 GB/s) or H200 (~4300 GB/s), none for other devices.

    Returns:
        The HTML path.

    Example:
        >>> import moe_opt
        >>> r = moe_opt.tune(replay="moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv", n_trials=8,
        ...                  storage="sqlite:///demo.db", output_dir=None, progress=False)  # doctest: +SKIP
        >>> moe_opt.report("sqlite:///demo.db", "report.html")  # doctest: +SKIP
        PosixPath('report.html')
    """
    import pandas as pd

    if copy_bandwidth_gbps is not None and not (isinstance(copy_bandwidth_gbps, (int, float)) and
                                                copy_bandwidth_gbps > 0):
        raise TuneError(f"copy_bandwidth_gbps {copy_bandwidth_gbps!r} must be a positive number of GB/s")
    path = Path(path)
    if path.is_dir():
        raise TuneError(f"report path {path} is a directory; give an .html file path such as report.html")
    shapes, url = load_shapes(storage, table)
    df = pd.DataFrame(summary_rows(shapes), columns=list(SUMMARY_COLUMNS))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_page(shapes, df, url, copy_bandwidth_gbps), encoding="utf-8")
        df.to_csv(path.with_suffix(".csv"), index=False)
        path.with_suffix(".md").write_text(markdown_table(df), encoding="utf-8")
    except OSError as exc:
        raise TuneError(f"cannot write the report to {path}: {exc.strerror or exc}") from None
    return path

"""report(): what the search found, read from the study storage alone: a summary table and one offline HTML page.

Per shape (study base name): latency against batch size (tuned, SGLang's default, the grid optimum where known),
speedup, how fast each batch size's search converged, which parameters mattered, and the achieved bandwidth
against the device's copy bandwidth. plotly and pandas are imported where the page and table are built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .errors import TuneError
from .space import PARAM_NAMES, Config
from .study import StudyInfo, confirmed_latencies, latency_of, list_moe_studies, open_storage

# Device-to-device copy bandwidth (bytes read + written) measured through PyTorch on the project's lent machines
# (device notes, KINDS.md, 2026-11): the practical ceiling of a memory-bound kernel, below the datasheets' 4.8 TB/s
# (H200) and 3.35 TB/s (H100 SXM). Keys are parts of the CUDA device name; "H100 80GB HBM3" is the SXM part.
MEASURED_COPY_GBPS = {"H200": (4300.0, "H200"), "H100 80GB HBM3": (3000.0, "H100 SXM")}
SUMMARY_COLUMNS = ("model", "shape", "device", "triton", "M", "best_config", "latency_us", "default_us",
                   "speedup", "grid_best_us", "trials", "failures", "gbps", "measurement", "is_performance")


def open_studies(storage: Any) -> tuple[optuna.storages.BaseStorage, list[StudyInfo], str]:
    """Open an existing storage for its moe_opt studies: (storage, studies, URL as shown).

    Accepts a storage URL, a path to an existing .db (SQLite) file, or a storage object; never creates a file.

    Example:
        >>> store, infos, url = open_studies("studies/DeepSeek-V4-Flash_tp8.db")  # doctest: +SKIP
        >>> [i.M for i in infos][:3], url  # doctest: +SKIP
        ([1, 2, 4], 'sqlite:///studies/DeepSeek-V4-Flash_tp8.db')
    """
    if storage is None:
        raise TuneError("no storage given; give a storage URL such as sqlite:///studies/model.db or a .db path")
    url = storage if isinstance(storage, str) else type(storage).__name__
    if isinstance(storage, str):
        if "://" not in storage and not storage.startswith("journal:") and not storage.endswith((".journal", ".log")):
            if not Path(storage).is_file():
                raise TuneError(f"storage {storage!r}: no such file; give an existing .db file or a URL such as "
                                "sqlite:///studies/model.db, journal:PATH or postgresql://...")
            url = f"sqlite:///{storage}"
        path = None
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            path = url[len("sqlite:///"):]
        elif url.startswith("journal:") or url.endswith((".journal", ".log")):
            path = url[len("journal:"):] if url.startswith("journal:") else url
        if path is not None and not Path(path).is_file():
            raise TuneError(f"storage {url}: file {path} does not exist; give the storage a tune wrote, "
                            "e.g. sqlite:///studies/model.db")
    store = open_storage(url if isinstance(storage, str) else storage)
    infos = list_moe_studies(store)
    if not infos:
        others = len(optuna.get_all_study_summaries(store, include_best_trial=False))
        raise TuneError(f"storage {url} holds no moe_opt studies ({others} other studies); give a storage that "
                        "`moe-opt tune` wrote (studies named moe|<shape>|<device>|triton=...|M=<M>)")
    return store, infos, url


def copy_bandwidth(device_name: str) -> tuple[float | None, str]:
    """The measured device-to-device copy bandwidth (GB/s) for a device name and how to label it.

    Example:
        >>> copy_bandwidth("NVIDIA H200")
        (4300.0, 'H200 copy bandwidth, measured ~4300 GB/s')
        >>> copy_bandwidth("NVIDIA A100-SXM4-80GB")
        (None, '')
    """
    for key, (gbps, part) in MEASURED_COPY_GBPS.items():
        if key in device_name:
            return gbps, f"{part} copy bandwidth, measured ~{gbps:.0f} GB/s"
    return None, ""


def _config(t: FrozenTrial) -> Config | None:
    try:
        return Config(*(int(t.params[p]) for p in PARAM_NAMES))
    except (KeyError, ValueError):
        return None


@dataclass
class _Shape:
    """One study base (shape, device, Triton version): its studies' trials per batch size."""

    base: str
    infos: dict[int, StudyInfo]
    trials: dict[int, list[FrozenTrial]]  # finished trials (complete or failed, not interrupted), by number
    grid_us: dict[int, float] = field(default_factory=dict)
    grid_source: str = ""

    @property
    def first(self) -> StudyInfo:
        return next(iter(self.infos.values()))

    def complete(self, M: int) -> list[FrozenTrial]:
        return [t for t in self.trials[M] if t.state == TrialState.COMPLETE]

    def default_us(self, M: int) -> float | None:
        attrs = self.infos[M].attrs
        default = attrs.get("default_config")
        for t in self.complete(M):
            if default and _config(t) == Config.from_dict(default):
                return latency_of(t, confirmed_latencies(attrs))
        return attrs.get("default_latency_us")

    def gbps(self, M: int, t: FrozenTrial) -> float | None:
        """Achieved bandwidth of a trial: its recorded ``gbps``, else estimated from the spec's minimum bytes."""
        if "gbps" in t.user_attrs:
            return float(t.user_attrs["gbps"])
        spec = self.infos[M].spec
        if spec is None or not self.infos[M].is_performance:
            return None
        from .measure import moe_min_bytes

        return moe_min_bytes(spec, M) / float(t.value) / 1e3


def _exhaustive(info: StudyInfo, measured: set[Config]) -> bool:
    """Whether a study measured every candidate of the grid, so that its best is the grid optimum."""
    from . import space

    spec = info.spec
    block_k = spec.block_shape[1] if spec is not None and spec.block_shape else None
    nbytes = 1 if spec is not None and spec.dtype == "fp8_w8a8" else 2
    return all(c in measured for c in space.grid(block_k)
               if space.fits_shared_memory(c, nbytes, nbytes, space.H100_SHARED_MEMORY_BYTES))


def _bundled_table(info: StudyInfo) -> Path | None:
    """The recorded table a replay study was searched on, when it is one of moe_opt's bundled tables."""
    measurement = str(info.attrs.get("measurement", ""))
    if measurement.startswith("replay of "):
        path = Path(__file__).parent / "data" / measurement[len("replay of "):]
        return path if path.is_file() else None
    return None


def _load(storage: Any, table: str | Path | None) -> tuple[list[_Shape], str]:
    from .study import shape_key
    from .table import ReplayTable

    store, infos, url = open_studies(storage)
    given = ReplayTable(table) if table is not None else None
    shapes: dict[str, _Shape] = {}
    for info in infos:
        study = optuna.load_study(study_name=info.name, storage=store)
        finished = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
                    if not str(t.user_attrs.get("error", "")).startswith("Interrupted")]
        shape = shapes.setdefault(info.base, _Shape(info.base, {}, {}))
        shape.infos[info.M] = info
        shape.trials[info.M] = sorted(finished, key=lambda t: t.number)
    for shape in shapes.values():
        tbl, source = given, str(table)
        if tbl is not None and tbl.metadata().get("spec") and shape.first.spec is not None:
            from .spec import ModelSpec

            if shape_key(ModelSpec.from_dict(tbl.metadata()["spec"])) != shape_key(shape.first.spec):
                tbl = None  # the table was recorded for another shape
        if tbl is None and table is None and (bundled := _bundled_table(shape.first)) is not None:
            tbl, source = ReplayTable(bundled), f"recorded table {bundled.name}"
        for M, info in shape.infos.items():
            if tbl is not None and any(us is not None for us in tbl.configs(M).values()):
                shape.grid_us[M], shape.grid_source = tbl.best(M)[1], source
            elif _exhaustive(info, {_config(t) for t in shape.trials[M]}) and shape.complete(M):
                shape.grid_us[M] = min(float(t.value) for t in shape.complete(M))
                shape.grid_source = "exhaustive (grid) study"
    return list(shapes.values()), url


def _rows(shapes: list[_Shape]) -> list[dict]:
    rows = []
    for shape in shapes:
        for M in sorted(shape.infos):
            info, complete = shape.infos[M], shape.complete(M)
            confirmed = confirmed_latencies(info.attrs)
            top = min(complete, key=lambda t: latency_of(t, confirmed)) if complete else None
            top_us = latency_of(top, confirmed) if top else math.nan
            default = shape.default_us(M)
            rows.append({
                "model": info.attrs.get("model") or "", "shape": shape.base.split("|")[1],
                "device": info.device_name,
                "triton": info.triton_version, "M": M, "best_config": str(_config(top)) if top else "",
                "latency_us": top_us,
                "default_us": default if default is not None else math.nan,
                "speedup": default / top_us if top and default else math.nan,
                "grid_best_us": shape.grid_us.get(M, math.nan), "trials": len(shape.trials[M]),
                "failures": len(shape.trials[M]) - len(complete),
                "gbps": (shape.gbps(M, top) or math.nan) if top else math.nan,
                "measurement": info.attrs.get("measurement", ""), "is_performance": info.is_performance,
            })
    return rows


def summary(storage: Any, *, table: str | Path | None = None):
    """One row per shape and batch size M: best config, latencies, speedup over SGLang's default, trials.

    Args:
        storage: Optuna storage URL, .db file path or storage object holding moe_opt studies.
        table: a recorded grid table (CSV) whose optimum fills ``grid_best_us``; default: an exhaustive study's
            best, or the bundled table a replay study was searched on.

    Returns:
        pandas DataFrame with columns ``SUMMARY_COLUMNS`` (latencies in microseconds, ``gbps`` in GB/s).

    Example:
        >>> from moe_opt.report import summary
        >>> summary("sqlite:///studies/DeepSeek-V4-Flash_tp8.db")[["M", "latency_us", "speedup"]]  # doctest: +SKIP
    """
    import pandas as pd

    shapes, _ = _load(storage, table)
    return pd.DataFrame(_rows(shapes), columns=list(SUMMARY_COLUMNS))


def summary_text(df) -> str:
    """The summary as ``moe-opt show`` prints it: one block per shape, numbers rounded.

    Example:
        >>> print(summary_text(summary("studies/DeepSeek-V4-Flash_tp8.db")))  # doctest: +SKIP
    """
    blocks = []
    for (model, shape, device, triton, measurement), part in df.groupby(
            ["model", "shape", "device", "triton", "measurement"], sort=False):
        head = f"{model + ' ' if model else ''}{shape} on {device}, Triton {triton} ({measurement})"
        if not part["is_performance"].all():
            head += "\n  NOT performance numbers (Triton's CPU interpreter)"
        cols = ["M", "best_config", "latency_us", "default_us", "speedup", "trials", "failures"]
        if part["grid_best_us"].notna().any():
            cols.insert(4, "grid_best_us")
        body = part[cols].to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="-")
        speedups = [v for v in part["speedup"] if v == v]
        if speedups:
            body += (f"\ngeometric-mean speedup over SGLang's default: "
                     f"{math.exp(sum(map(math.log, speedups)) / len(speedups)):.3f}x")
        blocks.append(f"{head}\n{body}")
    return "\n\n".join(blocks)


def _markdown(df) -> str:
    """A GitHub Markdown table (pandas' to_markdown needs the optional tabulate package)."""
    def cell(v) -> str:
        return "" if isinstance(v, float) and math.isnan(v) else f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


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


def _eta_squared(trials: list[FrozenTrial], param: str) -> float:
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


def _figures(shape: _Shape, df, copy_gbps: float | None) -> list:
    import plotly.graph_objects as go

    Ms = sorted(shape.infos)
    rows = df.set_index("M")
    layout = dict(template="plotly_white", height=420, margin=dict(l=70, r=30, t=90, b=60),
                  legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="left", x=0), hovermode="x unified")

    def fig(title: str, subtitle: str, **axes) -> "go.Figure":
        return go.Figure(layout=dict(layout, title=dict(text=title, subtitle=dict(text=subtitle)), **axes))

    ticks = _log_ticks(list(rows["latency_us"]) + list(rows["default_us"]) + list(shape.grid_us.values()))
    lat = fig("Latency by batch size", "lower is better; hover for the configs", xaxis=_m_axis(Ms), yaxis=dict(
        type="log", title="latency per call (µs)", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks]))
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

    sp = fig("Speedup over SGLang's default config", "default latency / tuned latency; above 1 = tuned is faster",
             xaxis=_m_axis(Ms), yaxis=dict(title="speedup (×)", rangemode="tozero"))
    sp.add_hline(y=1, line=dict(color=DEFAULT, dash="dot"))
    sp.add_scatter(x=Ms, y=rows["speedup"], name="tuned", mode="lines+markers", line=dict(color=TUNED, width=3),
                   hovertemplate="%{y:.3f}×")
    if grid_Ms:
        sp.add_scatter(x=grid_Ms, y=[rows.at[M, "default_us"] / shape.grid_us[M] for M in grid_Ms],
                       name="grid optimum", mode="markers", marker=dict(color=GRID, symbol="x", size=10),
                       hovertemplate="%{y:.3f}×")

    ref = "the grid optimum" if len(grid_Ms) == len(Ms) else "the final best"
    hist = fig("Search progress per batch size", f"best latency so far, in % above {ref}; flat at 0 = converged",
               xaxis=dict(title="trial number (failed trials included)"),
               yaxis=dict(title=f"best so far: % above {ref}", rangemode="tozero"))
    hist.update_layout(hovermode="closest", height=480, margin=dict(b=120),
                       legend=dict(orientation="h", y=-0.2, yanchor="top", x=0, entrywidth=70, title="M"))
    import plotly.colors

    colors = plotly.colors.sample_colorscale("Viridis", [i / max(1, len(Ms) - 1) * 0.9 for i in range(len(Ms))])
    for color, M in zip(colors, Ms):
        best_so_far, xs, ys, us = math.inf, [], [], []
        target = shape.grid_us.get(M) if ref == "the grid optimum" else rows.at[M, "latency_us"]
        for t in shape.trials[M]:
            if t.state == TrialState.COMPLETE:
                best_so_far = min(best_so_far, float(t.value))
            if best_so_far < math.inf:
                xs.append(t.number + 1), ys.append(100 * (best_so_far / target - 1)), us.append(best_so_far)
        hist.add_scatter(x=xs, y=ys, name=f"M={M}", mode="lines", line=dict(color=color, shape="hv", width=2),
                         customdata=us, hovertemplate=f"M={M}, trial %{{x}}: %{{customdata:.2f}} µs (+%{{y:.1f}}%)"
                                                      "<extra></extra>")

    z = [[_eta_squared(shape.complete(M), p) for M in Ms] for p in PARAM_NAMES]
    # η² from the sampled trials, which are not uniform samples of the grid: a hint at what matters, not a measure.
    imp = fig("Parameter importance (η²)",
              "share of log-latency variance each parameter explains alone (– = not varied)",
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
    return [lat, sp, hist, imp, bw]


def _banner(shape: _Shape) -> str:
    info = shape.first
    if not info.is_performance:
        return ("<p class='warn'>Timings from Triton's CPU interpreter on a scaled-down shape: "
                "<b>not performance numbers</b>. They exercise the search, nothing more.</p>")
    if str(info.attrs.get("measurement", "")).startswith("replay of "):
        return (f"<p class='note'>Replayed search: every latency was looked up in a table recorded earlier on "
                f"{info.device_name} ({info.attrs['measurement']}); the search itself ran without a GPU.</p>")
    return ""


def _page(shapes: list[_Shape], df, url: str, copy_gbps: float | None) -> str:
    import html
    import time

    import pandas as pd

    css = ("body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1500px;color:#222;padding:0 16px}"
           ".grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(620px,1fr));gap:12px}"
           ".warn{background:#fde2e1;border-left:5px solid #d62728;padding:8px 12px}"
           ".note{background:#eef3fb;border-left:5px solid #1f5fbf;padding:8px 12px}"
           "table.summary{border-collapse:collapse;font-size:13px}table.summary td,table.summary th"
           "{border:1px solid #ddd;padding:3px 8px;text-align:right}table.summary td:nth-child(2){text-align:left}"
           "code{font-size:13px}h2{margin-top:40px}")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>moe_opt report</title><style>{css}</style>"
             f"</head><body><h1>moe_opt tuning report</h1><p>Storage <code>{html.escape(url)}</code>, "
             f"{len(df)} batch sizes in {len(shapes)} shape(s); written {time.strftime('%Y-%m-%d %H:%M')}.</p>"]
    first = True
    for shape in shapes:
        info, part = shape.first, pd.DataFrame(_rows([shape]), columns=list(SUMMARY_COLUMNS))
        shown = part[["M", "best_config", "latency_us", "default_us", "speedup", "grid_best_us", "trials",
                      "failures", "gbps"]].dropna(axis=1, how="all").rename(columns={
                          "latency_us": "latency (µs)", "default_us": "SGLang default (µs)", "gbps": "GB/s",
                          "grid_best_us": "grid optimum (µs)", "best_config": "best config"})
        parts.append(f"<h2>{html.escape(info.attrs.get('model') or '')} {html.escape(shape.base.split('|')[1])}</h2>"
                     f"<p>{html.escape(info.device_name)}, Triton {html.escape(info.triton_version)}; "
                     f"{html.escape(str(info.attrs.get('measurement', '')))}. Study names: "
                     f"<code>{html.escape(shape.base)}|M=…</code></p>{_banner(shape)}")
        parts.append(shown.to_html(index=False, classes="summary", border=0, na_rep="–",
                                   float_format=lambda v: f"{v:.2f}"))
        parts.append("<div class='grid'>")
        for figure in _figures(shape, part, copy_gbps):
            parts.append(figure.to_html(full_html=False, include_plotlyjs=first,
                                         config={"displaylogo": False, "responsive": True}))
            first = False
        parts.append("</div>")
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
    shapes, url = _load(storage, table)
    df = pd.DataFrame(_rows(shapes), columns=list(SUMMARY_COLUMNS))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_page(shapes, df, url, copy_bandwidth_gbps), encoding="utf-8")
        df.to_csv(path.with_suffix(".csv"), index=False)
        path.with_suffix(".md").write_text(_markdown(df), encoding="utf-8")
    except OSError as exc:
        raise TuneError(f"cannot write the report to {path}: {exc.strerror or exc}") from None
    return path

"""report / show: the summary table and the offline HTML page, checked in a real headless Chromium."""

from __future__ import annotations

import re
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

import moe_opt
from moe_opt.cli import main
from moe_opt.errors import TuneError
from moe_opt.measure.base import Measurement, MeasurerInfo
from moe_opt.model.spec import ModelSpec
from moe_opt.view.report_data import summary

TABLE = Path(moe_opt.__file__).parent / "data" / "DeepSeek-V4-Flash_tp8_H200.csv"


@pytest.fixture(scope="module")
def replay_db(tmp_path_factory) -> str:
    """A study storage as a replay tune of the recorded H200 table writes it (4 batch sizes)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('replay') / 'studies.db'}"
    moe_opt.tune(replay=TABLE, n_trials=10, storage=url, output_dir=None, progress=False)
    return url


class InterpreterLike:
    """A measurer that says what the CPU interpreter says of itself: its timings are not performance numbers."""

    info = MeasurerInfo(device_name="cpu-interpreter", source="cpu-interpreter",
                        description="Triton CPU interpreter, wall clock (not a performance measurement)",
                        is_performance=False, kind="interpreter")

    def measure(self, config, M):
        return Measurement(50.0 + config.BLOCK_SIZE_M / 8 + abs(config.BLOCK_SIZE_N - 64) / 16 + M / 100, None, {})


SMALL = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=256, intermediate_size=128, dtype="fp8_w8a8",
                             block_shape=[128, 128])


def _wait(driver, script: str, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"page did not reach: {script}")


# --- The summary (moe-opt show) ------------------------------------------------------------------------------------

def test_summary_has_one_row_per_batch_size_with_speedup_and_grid_optimum(replay_db):
    df = summary(replay_db)
    assert list(df["M"]) == [1, 16, 64, 256, 1024, 4096]
    assert (df["trials"] == 10).all() and (df["failures"] == 0).all()
    assert df["speedup"].round(6).tolist() == (df["default_us"] / df["latency_us"]).round(6).tolist()
    # The bundled table the replay searched gives the grid optimum; nothing beats it.
    assert df["grid_best_us"].notna().all()
    assert (df["grid_best_us"] <= df["latency_us"] + 1e-9).all()
    assert df["best_config"].str.match(r"M\d+ N\d+ K\d+ G\d+ w\d s\d").all()
    assert df["gbps"].gt(0).all()


def test_show_prints_the_table(replay_db, capsys):
    assert main(["show", replay_db]) == 0
    out = capsys.readouterr().out
    assert "deepseek-ai/DeepSeek-V4-Flash" in out and "NVIDIA H200" in out
    for column in ("best_config", "latency_us", "default_us", "speedup", "trials", "failures"):
        assert column in out
    assert "geometric-mean speedup" in out


def test_interpreter_studies_are_labelled_not_performance(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'interp.db'}"
    moe_opt.tune(spec=SMALL, measurer=InterpreterLike(), batch_sizes=[1, 8], n_trials=6, storage=url,
                 output_dir=None, progress=False)
    assert main(["show", url]) == 0
    assert "NOT performance numbers" in capsys.readouterr().out
    html = moe_opt.report(url, tmp_path / "report.html").read_text()
    assert "not performance numbers" in html


def test_an_exhaustive_study_gives_the_grid_optimum(tmp_path):
    storage = optuna.storages.InMemoryStorage()
    moe_opt.tune(spec=SMALL, measurer=InterpreterLike(), batch_sizes=[4], sampler="grid", storage=storage,
                 output_dir=None, progress=False)
    df = summary(storage)
    assert df.loc[0, "grid_best_us"] == df.loc[0, "latency_us"]


# --- The HTML report ------------------------------------------------------------------------------------------------

def test_report_writes_offline_html_and_the_summary_as_csv_and_markdown(replay_db, tmp_path, capsys):
    out = tmp_path / "out" / "report.html"
    assert main(["report", replay_db, "-o", str(out), "--table", str(TABLE)]) == 0
    assert str(out) in capsys.readouterr().out
    html = out.read_text()
    # plotly.js is embedded (a few MB), nothing is fetched: the page works offline.
    assert not re.search(r"<script[^>]*\bsrc=|<link[^>]*\bhref=", html) and len(html) > 3_000_000
    assert "H200 copy bandwidth, measured ~4300 GB" in html  # (plotly writes "/" as \\u002f)
    assert "Replayed search" in html
    csv = pd.read_csv(out.with_suffix(".csv"))
    assert list(csv["M"]) == [1, 16, 64, 256, 1024, 4096] and csv["speedup"].gt(1).all()
    md = out.with_suffix(".md").read_text().splitlines()
    assert md[0].startswith("| model | shape |") and len(md) == 2 + 6


def test_report_plots_render_in_chromium(replay_db, tmp_path, browser, screenshot):
    path = moe_opt.report(replay_db, tmp_path / "report.html", copy_bandwidth_gbps=4800)
    browser.get(path.resolve().as_uri())
    plots = _wait(browser, """
        const plots = [...document.querySelectorAll('.js-plotly-plot')];
        if (plots.length < 5 || plots.some(p => !p.data || !p._fullLayout)) return null;
        // _fullData holds the decoded arrays (plotly.py ships them base64-encoded in `data`).
        return plots.map(p => ({title: p.layout.title.text, traces: p.data.length,
                                points: p._fullData.reduce((n, t) => n + ((t.y || t.z || []).length), 0),
                                xlog: p._fullLayout.xaxis.type === 'log'}));""")
    titles = [p["title"] for p in plots]
    assert titles == ["Latency by batch size", "Speedup over SGLang's default config", "Search progress per batch size",
                      "Parameter importance (η²)", "Achieved memory bandwidth"]
    assert all(p["traces"] >= 1 and p["points"] > 0 for p in plots), plots
    assert [p["xlog"] for p in plots] == [True, True, False, False, True]  # batch size on a log axis
    # Drawn, not only declared: every plot has SVG marks in it.
    assert browser.execute_script("return [...document.querySelectorAll('.js-plotly-plot')]"
                                  ".every(p => p.querySelectorAll('.scatterlayer .trace, .heatmaplayer image, "
                                  ".hm').length > 0)")
    assert "copy bandwidth 4800 GB/s (given)" in browser.page_source
    assert screenshot(browser, "report.png").stat().st_size > 10_000


# --- Bad input --------------------------------------------------------------------------------------------------------

def test_bad_input_gives_one_line_errors(tmp_path, replay_db):
    with pytest.raises(TuneError, match=r"no such file; give an existing \.db file or a URL"):
        summary(str(tmp_path / "missing.db"))
    with pytest.raises(TuneError, match=r"does not exist; give the storage a tune wrote"):
        summary(f"sqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()  # looking never creates a database
    other = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(study_name="not-moe", storage=other)
    with pytest.raises(TuneError, match=r"holds no moe_opt studies \(1 other studies\); give a storage that "
                                        r"`moe-opt tune` wrote"):
        summary(other)
    with pytest.raises(TuneError, match=r"cannot read replay table .*nope\.csv"):
        summary(replay_db, table=tmp_path / "nope.csv")
    with pytest.raises(TuneError, match=r"is a directory; give an \.html file path"):
        moe_opt.report(replay_db, tmp_path)
    with pytest.raises(TuneError, match=r"must be a positive number of GB/s"):
        moe_opt.report(replay_db, tmp_path / "r.html", copy_bandwidth_gbps=-1)
    for error in (TuneError,):
        try:
            summary(other)
        except error as exc:
            assert "\n" not in str(exc)


def test_cli_reports_bad_input_on_one_line(tmp_path, capsys):
    assert main(["show", str(tmp_path / "missing.db")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-opt show: error: storage") and "\n" not in err


def test_an_interpreter_report_marks_every_plot_and_reads_without_cut_names(tmp_path, browser, screenshot):
    url = f"sqlite:///{tmp_path / 'interp.db'}"
    spec = SMALL.replace(model="deepseek-ai/DeepSeek-V4-Flash", swiglu_limit=10.0)
    moe_opt.tune(spec=spec, measurer=InterpreterLike(), batch_sizes=[1, 8, 32], n_trials=4, storage=url,
                 output_dir=None, progress=False)
    path = moe_opt.report(url, tmp_path / "report.html")
    browser.get(path.resolve().as_uri())
    plots = _wait(browser, """
        const plots = [...document.querySelectorAll('.js-plotly-plot')];
        if (plots.length < 5 || plots.some(p => !p._fullLayout)) return null;
        return plots.map(p => ({title: p.layout.title.text, notes: (p.layout.annotations || []).map(a => a.text),
                                dtick: p._fullLayout.xaxis.dtick}));""")
    assert all(p["title"].endswith("(CPU interpreter)") for p in plots), plots
    assert all("CPU interpreter: NOT performance numbers" in p["notes"] for p in plots)
    assert plots[1]["title"].startswith("Ratio of interpreter times")  # not a "speedup"
    assert any("no bandwidth: interpreter times are CPU wall-clock times" in n for n in plots[4]["notes"])
    assert plots[2]["dtick"] == 1  # trial numbers 1, 2, 3, 4: no 1.5
    headers = browser.execute_script("return [...document.querySelectorAll('table.summary th')].map(t => t.textContent)")
    assert "interpreter time (µs) *" in headers and "ratio *" in headers and "speedup" not in headers
    # The heading wraps between fields, never inside one; the study names wrap instead of running off the page.
    tokens = browser.execute_script("return [...document.querySelectorAll('h2 .tok')].map(t => t.textContent)")
    assert "block=[128,128]," in tokens and "swiglu_limit=10" in tokens
    browser.set_window_size(700, 1000)
    assert browser.execute_script("const c = document.querySelector('code.names');"
                                  "return c.getBoundingClientRect().right <= document.documentElement.clientWidth")
    assert "PED-ANOVA" in browser.page_source
    browser.set_window_size(1400, 1000)
    screenshot(browser, "report_interpreter.png")

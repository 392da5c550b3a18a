"""dashboard: optuna-dashboard on a real study storage, checked in a real headless Chromium; the study notes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

import moe_opt
from moe_opt.errors import TuneError
from moe_opt.view.dashboard import latest_storage, start_dashboard
from moe_opt.view.notes import study_note

TABLE = Path(moe_opt.__file__).parent / "data" / "DeepSeek-V4-Flash_tp8_H200.csv"
SHAPE_ATTRS = ("model", "E", "N", "K", "topk", "dtype", "block_shape", "swiglu_limit", "M", "device_name",
               "triton_version")


def _replay_tune(url: str) -> None:
    moe_opt.tune(replay=TABLE, n_trials=8, storage=url, output_dir=None, progress=False)


@pytest.fixture(scope="module")
def replay_db(tmp_path_factory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('replay') / 'studies.db'}"
    _replay_tune(url)
    return url


def _wait_for_text(driver, texts: list[str], timeout_s: float = 30.0) -> str:
    """Wait until the single-page app has rendered every text; return the page's visible text."""
    deadline = time.monotonic() + timeout_s
    body = ""
    while time.monotonic() < deadline:
        body = driver.execute_script("return document.body ? document.body.innerText : ''")
        if all(t in body for t in texts):
            return body
        time.sleep(0.25)
    missing = [t for t in texts if t not in body]
    raise AssertionError(f"the dashboard never showed {missing}; it showed: {body[:500]!r}")


def _study_names(url: str) -> list[str]:
    return sorted(s.study_name for s in optuna.get_all_study_summaries(url, include_best_trial=False))


# --- The dashboard in a browser ----------------------------------------------------------------------------------

def test_dashboard_lists_the_studies(replay_db, browser, screenshot):
    names = _study_names(replay_db)
    with start_dashboard(replay_db, port=0) as handle:
        assert handle.url.startswith("http://127.0.0.1:") and handle.url.endswith("/dashboard")
        browser.get(handle.url)
        # The names wrap inside the study cards, so look for the parts a user reads: shape and each batch size.
        body = _wait_for_text(browser, ["E=256,N=256,K=4096", "M=1024", "M=64", "M=16", "M=1\n"])
        assert body.count("triton=3.6.0") == len(names) == 6
        assert screenshot(browser, "dashboard_studies.png").stat().st_size > 10_000


def test_each_study_shows_its_note_and_attributes(replay_db, browser, screenshot):
    with start_dashboard(replay_db, port=0) as handle:
        api = handle.url.replace("/dashboard", "/api/studies")
        summaries = json.load(urllib.request.urlopen(api, timeout=10))["study_summaries"]
        by_M = {}
        for s in summaries:
            attrs = {a["key"]: a["value"] for a in s["user_attrs"]}
            assert set(SHAPE_ATTRS) <= set(attrs), sorted(attrs)
            by_M[int(attrs["M"])] = s["study_id"]
        assert sorted(by_M) == [1, 16, 64, 256, 1024, 4096]
        browser.get(f"{handle.url}/studies/{by_M[64]}/note")
        body = _wait_for_text(browser, ["M = 64:", "faster than SGLang's default", "BLOCK_SIZE_M", "SGLang default"])
        assert "Replayed search" in body and "deepseek-ai/DeepSeek-V4-Flash" in body
        screenshot(browser, "dashboard_note.png")
        browser.get(f"{handle.url}/studies/{by_M[64]}")
        _wait_for_text(browser, ["latency_us", "Study User Attributes"])  # the objective is named, not "Objective 0"
        screenshot(browser, "dashboard_study.png")


# --- Starting and stopping -----------------------------------------------------------------------------------------

def test_stop_frees_the_port(replay_db):
    handle = start_dashboard(replay_db, port=0)
    port = int(handle.url.split(":")[2].split("/")[0])
    assert urllib.request.urlopen(handle.url, timeout=10).status == 200
    handle.stop()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # would raise if the dashboard still held it


@pytest.mark.timeout(60)  # readline() would wait forever on a server that never prints
def test_cli_prints_the_storage_and_url_and_serves(replay_db):
    proc = subprocess.Popen([sys.executable, "-m", "moe_opt", "dashboard", replay_db, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert f"6 studies (1 shape) in {replay_db}" in lines[0], lines
        url = lines[1].split("open ", 1)[1].split(" ")[0]
        assert urllib.request.urlopen(url, timeout=10).status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_default_storage_is_the_most_recently_modified_studies_db(replay_db, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TuneError, match=r"no storage given and no studies/\*\.db or \*\.journal found; give a "):
        latest_storage()
    Path("studies").mkdir()
    src = replay_db[len("sqlite:///"):]
    for name, mtime in (("older.db", 1_000_000), ("newer.db", 2_000_000)):
        shutil.copy(src, f"studies/{name}")
        os.utime(f"studies/{name}", (mtime, mtime))
    assert latest_storage() == "sqlite:///studies/newer.db"
    with start_dashboard(port=0) as handle:
        assert handle.storage == "sqlite:///studies/newer.db"
    Path("studies/parallel.journal").write_text("")  # tune(..., journal storage) writes here; newest now
    assert latest_storage() == "journal:studies/parallel.journal"


# --- Notes ------------------------------------------------------------------------------------------------------------

def test_notes_are_written_without_optuna_dashboard_and_filled_in_when_missing(tmp_path, monkeypatch):
    from optuna_dashboard import get_note

    url = f"sqlite:///{tmp_path / 'no_dashboard.db'}"
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # as on a GPU host without optuna-dashboard
    _replay_tune(url)
    monkeypatch.undo()
    study = optuna.load_study(study_name=_study_names(url)[0], storage=url)
    assert get_note(study) == study_note(study) and "faster than SGLang's default" in get_note(study)

    bare = f"sqlite:///{tmp_path / 'bare.db'}"  # as an older moe_opt left it: no notes at all
    for module in ("moe_opt.run.session", "moe_opt.run.scheduler"):  # where a tune writes notes
        monkeypatch.setattr(f"{module}.refresh_study_note", lambda study: None)
    _replay_tune(bare)
    assert all(get_note(optuna.load_study(study_name=n, storage=bare)) == "" for n in _study_names(bare))
    with start_dashboard(bare, port=0):
        pass
    assert all("M = " in get_note(optuna.load_study(study_name=n, storage=bare)) for n in _study_names(bare))


def test_note_says_interpreter_timings_are_not_performance_numbers():
    study = optuna.create_study()
    study.set_user_attr("M", 8)
    study.set_user_attr("is_performance", False)
    study.add_trial(optuna.trial.create_trial(
        params=dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=4, num_stages=2),
        distributions={p: optuna.distributions.CategoricalDistribution([v]) for p, v in dict(
            BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=4, num_stages=2).items()},
        value=1234.5))
    note = study_note(study)
    assert note.startswith("# M = 8: best 1234.50 µs") and "not performance numbers" in note


# --- Bad input --------------------------------------------------------------------------------------------------------

def test_port_in_use_is_a_one_line_error(replay_db):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(TuneError, match=rf"^port {port} on 127.0.0.1 is in use; pass a free port with --port"):
            start_dashboard(replay_db, port=port)


def test_bad_storage_and_port_are_one_line_errors(tmp_path):
    with pytest.raises(TuneError, match=r"no such file; give an existing \.db file or a URL such as"):
        start_dashboard(str(tmp_path / "missing.db"), port=0)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(study_name="not-moe", storage=other)
    with pytest.raises(TuneError, match=r"holds no moe_opt studies \(1 other studies\)"):
        start_dashboard(other, port=0)
    with pytest.raises(TuneError, match=r"port 70000 is not a port number; give an integer 1\.\.65535, or 0"):
        start_dashboard(other, port=70000)


def test_study_cards_show_their_batch_size_first(replay_db, browser, screenshot):
    with start_dashboard(replay_db, port=0) as handle:
        browser.get(handle.url)
        _wait_for_text(browser, ["M = 4096", "M = 1024", "M = 1\n"])
        badges = browser.execute_script("return [...document.querySelectorAll('.MuiCard-root .moe-opt-m')]"
                                        ".map(b => b.textContent)")
        assert sorted(badges) == sorted(f"M = {M}" for M in (1, 16, 64, 256, 1024, 4096))
        # The full name is still on each card, set to wrap between fields rather than anywhere.
        style = browser.execute_script("const t = document.querySelector('.MuiCard-root .MuiTypography-h5');"
                                       "return [t.textContent, getComputedStyle(t).wordBreak]")
        assert style[0].split(". ", 1)[1] in _study_names(replay_db) and style[1] == "normal"
        screenshot(browser, "dashboard_cards.png")

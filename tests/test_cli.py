"""The first hour of a new user: the README's commands, the command line as the engines' tuners spell it, bare
storage paths everywhere, what a tune says at its end and in a log, Ctrl-C and closed pipes. Real SQLite, the real
CLI (in this process or as `python -m moe_opt`), replay tables and the CPU interpreter."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

import moe_opt
from moe_opt.cli import main
from moe_opt.space import Config
from moe_opt.view.progress import Progress

REPO = Path(__file__).resolve().parents[1]
TABLE = str(REPO / "moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def moe_opt_command(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`python -m moe_opt ARGS`, as a user runs it, with this checkout first on the path."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **kwargs.pop("env", {}))
    return subprocess.run([sys.executable, "-m", "moe_opt", *args], capture_output=True, text=True, env=env,
                          timeout=kwargs.pop("timeout", 300), **kwargs)


def code_blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", markdown, flags=re.S | re.M)


# --- The README ----------------------------------------------------------------------------------------------------

def test_the_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    commands = [block.strip() for block in code_blocks(readme, "bash")]
    test_command = next(c for c in commands if "scripts/test" in c)
    ci = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', test_command]
    main_job = commands[0]
    assert main_job.startswith("bash scripts/install && ") and "moe-opt tune --model" in main_job
    for script in ("scripts/install", "scripts/test", ".ci/run"):
        text = (REPO / script).read_text()
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text, script
        assert os.access(REPO / script, os.X_OK), f"{script} is not executable"
    # The test command installs the system packages the browser and PostgreSQL tests need, and starts PostgreSQL.
    install, test = (REPO / "scripts/install").read_text(), (REPO / "scripts/test").read_text()
    assert all(p in install for p in ("chromium", "chromium-driver", "postgresql", "apt-get update"))
    assert "MOE_OPT_TEST_POSTGRES_URL" in test and "pg_ctlcluster" in test


@pytest.mark.timeout(600)
def test_the_readme_python_example_runs_on_a_cpu_as_written(tmp_path):
    readme = (REPO / "README.md").read_text()
    example = code_blocks(readme, "python")[0]
    assert "moe_opt.tune(model=" in example
    script = tmp_path / "example.py"
    script.write_text(example)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    printed = [line for line in lines if re.match(r"^\d+ \{'BLOCK_SIZE_M'", line)]
    assert [int(line.split()[0]) for line in printed] == [1, 8, 32]  # the interpreter's batch sizes
    assert all(re.search(r" [\d.]+ us [\d.]+x$", line) for line in printed), printed
    assert "NOT performance numbers" in done.stdout  # said before the tune, by the session
    assert "not performance numbers" in done.stdout  # and in the summary, with what the CPU run did
    assert "batch sizes 1, 8, 32 with 4 trials each" in done.stdout
    assert (tmp_path / "studies" / "DeepSeek-V4-Flash.db").is_file()


# --- Flags --------------------------------------------------------------------------------------------------------

def test_version():
    done = moe_opt_command("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"moe-opt {moe_opt.__version__}"


@pytest.mark.parametrize("argv", [
    ["tune", "--replay", TABLE, "--n-tri", "3"],            # --n-trials
    ["tune", "--replay", TABLE, "--batch", "1"],            # --batch-size or --batch-sizes
    ["show", "studies/x.db", "--tab", TABLE],               # --table
    ["dashboard", "--po", "0"],                             # --port
    ["--vers"],                                             # --version
])
def test_abbreviated_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err or "--vers" in argv


def test_the_engines_tuner_flags_mean_the_same(in_tmp, capsys):
    ours = ["tune", "--replay", TABLE, "--tp", "8", "--batch-sizes", "1,16", "--n-trials", "3",
            "--seed", "1", "--storage", "ours.db", "--output-dir", "ours"]
    theirs = ["tune", "--replay", TABLE, "--tp-size", "8", "--ep-size", "1", "--dtype", "auto", "--batch-size", "1",
              "16", "--n-trials", "3", "--seed", "1", "--storage", "theirs.db", "--save-dir", "theirs", "--tune"]
    assert main(ours) == 0 and main(theirs) == 0
    files = {d: sorted(p.relative_to(d).as_posix() for p in Path(d).rglob("*.json")) for d in ("ours", "theirs")}
    assert files["ours"] == files["theirs"] and len(files["ours"]) == 2
    for name in files["ours"]:
        assert json.loads((Path("ours") / name).read_text()) == json.loads((Path("theirs") / name).read_text())
    sglang = next(name for name in files["theirs"] if name.startswith("configs/triton_"))
    assert sorted(json.loads((Path("theirs") / sglang).read_text())) == ["1", "16"]
    capsys.readouterr()
    # vLLM's -tp and --enable-expert-parallel: the experts spread over all TP ranks.
    assert main(["resolve", "deepseek-ai/DeepSeek-V3", "-tp", "8", "--enable-expert-parallel", "--json"]) == 0
    vllm_style = json.loads(capsys.readouterr().out)
    assert main(["resolve", "deepseek-ai/DeepSeek-V3", "--tp", "8", "--ep-size", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == vllm_style and vllm_style["ep_size"] == 8


@pytest.mark.parametrize("argv", [["--batch-sizes", ""], ["--batch-sizes", " , "], ["--batch-size", ""]])
def test_an_empty_batch_size_list_is_an_error_not_all_of_them(in_tmp, capsys, argv):
    assert main(["tune", "--replay", TABLE, *argv, "--storage", "s.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-opt tune: error: --batch-size") and "gives no batch size" in err and "\n" not in err
    assert not Path("s.db").exists() and not Path("moe_configs").exists()


def test_resolve_names_the_dtype_of_an_unquantized_model(capsys):
    assert main(["resolve", "Qwen/Qwen3-30B-A3B"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("dtype "))
    assert line.split(None, 1)[1] == "bfloat16 (unquantized)"


# --- STORAGE is a bare path everywhere ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["studies/x.db", "studies/x.journal"])
def test_a_bare_storage_path_works_for_every_command(in_tmp, capsys, name):
    assert main(["tune", "--replay", TABLE, "--batch-sizes", "1,16", "--n-trials", "3", "--storage", name,
                 "--output-dir", "tuned"]) == 0
    assert Path(name).is_file()
    capsys.readouterr()
    assert main(["show", name]) == 0
    assert "geometric-mean speedup" in capsys.readouterr().out
    assert main(["report", name, "-o", "r.html"]) == 0 and Path("r.html").stat().st_size > 1_000_000
    assert main(["export", name, "-o", "rebuilt"]) == 0
    assert sorted(p.name for p in Path("rebuilt").rglob("*.json")) == sorted(p.name for p in Path("tuned").rglob("*.json"))
    assert main(["record", name, "-o", "t.csv"]) == 0
    rows = list(csv.DictReader(open("t.csv")))
    assert {r["M"] for r in rows} == {"1", "16"} and len(rows) == 6
    # A second tune on the same bare path resumes the same studies.
    assert main(["tune", "--replay", TABLE, "--batch-sizes", "1,16", "--n-trials", "4", "--storage", name,
                 "--no-export"]) == 0
    from moe_opt.store.storage import open_storage

    counts = {s.study_name.rsplit("|", 1)[1]: s.n_trials
              for s in optuna.get_all_study_summaries(open_storage(name, create=False), include_best_trial=False)}
    assert counts == {"M=1": 4, "M=16": 4}


@pytest.mark.timeout(60)
def test_the_dashboard_takes_a_bare_path_and_says_what_it_binds(in_tmp):
    assert main(["tune", "--replay", TABLE, "--batch-sizes", "1", "--n-trials", "2", "--storage", "studies/x.db",
                 "--no-export"]) == 0
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for host, listening in (("127.0.0.1", "listening on 127.0.0.1:"), ("", "listening on every interface (0.0.0.0:")):
        proc = subprocess.Popen([sys.executable, "-m", "moe_opt", "dashboard", "studies/x.db", "--port", "0",
                                 "--host", host], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            lines = [proc.stdout.readline(), proc.stdout.readline()]
            assert "1 studies (1 shape) in sqlite:///studies/x.db" in lines[0], lines
            assert listening in lines[1], lines
            url = lines[1].split("open ", 1)[1].split(" ")[0]
            assert url.startswith("http://127.0.0.1:") and urllib.request.urlopen(url, timeout=10).status == 200
        finally:
            proc.terminate()
            proc.wait(timeout=10)


# --- What a tune says ----------------------------------------------------------------------------------------------

def test_the_end_of_a_tune_names_the_studies_and_the_next_steps(in_tmp, capsys):
    assert main(["tune", "--replay", TABLE, "--batch-sizes", "1,16", "--n-trials", "3"]) == 0
    out = capsys.readouterr().out
    db = "studies/replay_DeepSeek-V4-Flash_tp8_H200.db"
    assert f"studies: sqlite:///{db} (run the same command again to resume or add trials)" in out
    steps = {line.split("#")[0].strip() for line in out.splitlines() if line.startswith("  moe-opt ")}
    assert {f"moe-opt show {db}", f"moe-opt report {db} -o report.html", f"moe-opt dashboard {db}"} <= steps
    folder = (in_tmp / "moe_configs").resolve()
    assert f"export SGLANG_MOE_CONFIG_DIR={folder}" in out and f"export VLLM_TUNED_CONFIG_FOLDER={folder}" in out
    check = next(s for s in steps if s.startswith("moe-opt check "))
    assert check == f"moe-opt check --model deepseek-ai/DeepSeek-V4-Flash --tp 8 --config-dir {folder}"
    # The printed commands work as printed.
    for step in sorted(steps - {check}):
        if step.startswith(("moe-opt show", "moe-opt report")):
            assert main(shlex.split(step)[1:]) == 0, step


def test_an_in_memory_tune_says_its_studies_are_gone_with_the_process(capsys):
    result = moe_opt.tune(replay=TABLE, batch_sizes=[1], n_trials=2, storage="sqlite:///:memory:", output_dir=None,
                          progress=True)
    out = capsys.readouterr().out
    assert "studies: in memory: gone when this process ends" in out and "moe-opt show" not in out
    df = result.trials_dataframe()
    assert "value" in df.columns and (df["value"] == df["value_latency_us"]).all()


def test_progress_in_a_log_is_plain_lines_with_the_time_left(in_tmp):
    done = moe_opt_command("tune", "--replay", TABLE, "--batch-sizes", "1,16,64", "--n-trials", "4", "--storage",
                           "s.db", "--no-export")
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert "\r" not in err  # no tqdm bar in a file
    lines = err.splitlines()
    assert lines[0] == "moe-opt: 3 batch sizes (M = 1, 16, 64), 4 trials each"
    finished = [line for line in lines if " done: " in line]
    assert [re.search(r"M=(\d+) done: 4/4", line).group(1) for line in finished] == ["1", "16", "64"]
    assert "1/3 batch sizes done" in finished[0] and "3/3 batch sizes done, 12/12 trials" in finished[-1]
    assert len(lines) <= 2 + len(finished) + 1  # header, a line per batch size, a closing line: nothing else


def test_progress_lines_between_batch_sizes_come_at_most_every_interval():
    studies = {M: optuna.create_study() for M in (1, 16)}
    now = [0.0]
    stream = io.StringIO()
    bar = Progress(studies, 10, {}, stream=stream, interval_s=30, clock=lambda: now[0])
    from moe_opt.measure.base import Measurement

    for i in range(8):  # 8 trials in 40 s: a line at 30 s, none before
        now[0] += 5
        bar.update(1 if i % 2 == 0 else 16, Config(16, 32, 64, 1, 4, 3), Measurement(10.0 + i))
    lines = stream.getvalue().splitlines()
    assert lines[0] == "moe-opt: 2 batch sizes (M = 1, 16), 10 trials each" and len(lines) == 2
    assert "6/20 trials" in lines[1] and "about 1 min 10 s left" in lines[1]  # 14 trials left at 5 s each


def test_progress_on_a_terminal_is_a_bar():
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    with os.fdopen(slave, "w") as tty:
        bar = Progress({1: optuna.create_study()}, 3, {}, stream=tty)
        from moe_opt.measure.base import Measurement

        bar.update(1, Config(16, 32, 64, 1, 4, 3), Measurement(12.5))
        bar.close()
    chunks = []
    while True:  # everything written before the terminal closed, then EIO
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    shown = b"".join(chunks).decode()
    assert "\r" in shown and "1/3" in shown and "best 12.5us" in shown


def test_a_tune_with_nothing_to_export_exits_1_with_one_line(in_tmp, capsys):
    failing = in_tmp / "failing.csv"
    failing.write_text("M,BLOCK_SIZE_M,BLOCK_SIZE_N,BLOCK_SIZE_K,GROUP_SIZE_M,num_warps,num_stages,us,error\n"
                       "4,16,32,64,1,4,3,,OutOfResources: shared memory\n")
    # A table with nothing to tune at a batch size is refused before anything starts (exit 2, bad input).
    assert main(["tune", "--replay", str(failing), "--n-trials", "3", "--storage", "f.db"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == ["moe-opt tune: error: replay table failing.csv: every config at batch size 4 failed (us empty "
                      "or NaN), nothing to tune there; give batch_sizes without it, or a table with latencies > 0 at "
                      "it"]
    # A tune that measured but found no result anywhere exits 1 with one line.
    failing.write_text("M,BLOCK_SIZE_M,BLOCK_SIZE_N,BLOCK_SIZE_K,GROUP_SIZE_M,num_warps,num_stages,us,error\n"
                       "4,16,32,64,1,4,2,,OutOfResources: shared memory\n4,16,32,64,1,4,3,9.0,\n")  # the grid's first fails
    assert main(["tune", "--replay", str(failing), "--batch-sizes", "4", "--n-trials", "1", "--no-warm-start",
                 "--sampler", "grid", "--storage", "g.db"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # beside the progress
    assert errors == ["moe-opt tune: error: no batch size has a result (every measured config failed to compile or "
                      "run; the summary above says why); nothing was exported"]
    from moe_opt import space

    working = in_tmp / "working.csv"  # measures, but records no model spec to name the files by
    with open(working, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["M", *space.PARAM_NAMES, "us"])
        writer.writerows([4, *c.to_dict().values(), 10 + i % 7] for i, c in enumerate(space.grid(64)))
    assert main(["tune", "--replay", str(working), "--n-trials", "2", "--storage", "w.db"]) == 1
    assert "nothing was exported: the replay table records no model spec" in capsys.readouterr().err


# --- Ctrl-C and pipes -----------------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_ctrl_c_while_the_command_starts_exits_130_with_one_line(in_tmp):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "moe_opt", "tune", "--replay", TABLE, "--storage", "s.db"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if "libtorch" in maps.read_text():  # torch is loading: the command is starting up
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert err.strip() == "moe-opt tune: interrupted during start-up; nothing was done"
    assert not Path("s.db").exists()


def test_a_closed_pipe_ends_show_quietly(in_tmp):
    assert main(["tune", "--replay", TABLE, "--n-trials", "2", "--storage", "s.db", "--no-export"]) == 0
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "moe_opt", "show", "s.db"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # `| head` that has read enough
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert err == "" and proc.returncode == 141


def test_show_aligns_every_column(in_tmp, capsys):
    assert main(["tune", "--replay", TABLE, "--n-trials", "6", "--storage", "s.db", "--no-export"]) == 0
    capsys.readouterr()
    assert main(["show", "s.db"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("M  best_config"))
    table = lines[header:header + 7]
    start = table[0].index("best_config")
    for line in table[1:]:
        assert re.fullmatch(r"M\d+ N\d+ K\d+ G\d+ w\d s\d", line[start:].split("  ")[0]), line
        assert line[:start].endswith("  ") and line[:start].strip().isdigit()
    ends = {column: table[0].index(column) + len(column) for column in ("latency_us", "speedup", "failures")}
    for line in table[1:]:  # numbers end under their header
        for column, end in ends.items():
            assert line[end - 1] != " " and (end == len(line) or line[end] == " "), (column, line)


def test_progress_of_worker_processes_catches_up_from_the_studies():
    """With --workers the tuning process only reads the studies; in a log it still prints plain lines."""
    studies = {M: optuna.create_study() for M in (1, 16)}
    now = [0.0]
    stream = io.StringIO()
    bar = Progress(studies, 2, {}, stream=stream, interval_s=10, clock=lambda: now[0])
    params = Config(16, 32, 64, 1, 4, 3).to_dict()
    dists = {k: optuna.distributions.IntDistribution(1, 256) for k in params}
    for M, values in ((1, (12.0, 11.0)), (16, (30.0,))):  # as workers tell them
        for v in values:
            studies[M].add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=v))
    now[0] = 4.0
    bar.sync(studies)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[1].startswith("moe-opt: M=1 done: 2/2 best 11.0us; 1/2 batch sizes done, 3/4 trials")
    assert lines[-1] == "moe-opt: 1/2 batch sizes done, 3/4 trials in 4 s"

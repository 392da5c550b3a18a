"""Bad input: one clear line naming the problem and what is accepted, through the API and the CLI (exit code 2),
and no partial or empty config file left behind. Ctrl-C during the warm start: exit code 130, nothing exported.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import optuna
import pytest

import moe_opt
from moe_opt import MoeOptError, SpecError
from moe_opt.cli import main

REPO = Path(__file__).resolve().parents[1]
TABLE = str(REPO / "moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv")


def read_only_directory(tmp_path: Path) -> str:
    """A directory nobody can create files in; root ignores permission bits, but not sysfs."""
    if os.geteuid() == 0:
        return "/sys"
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o555)
    return str(d)


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Bad files in a scratch directory that is also the working directory; the Hub is offline."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "bad_config").mkdir()
    (tmp_path / "bad_config" / "config.json").write_text('{"architectures": ["DeepseekV3ForCausalLM",')
    (tmp_path / "not_a.db").write_text("these are my notes, not a database\n")
    (tmp_path / "not_a.journal").write_text("these are my notes, not a journal\n")
    (tmp_path / "columns.csv").write_text("M,BLOCK_SIZE_M,us\n1,16,3.5\n")
    (tmp_path / "negative.csv").write_text("M,BLOCK_SIZE_M,BLOCK_SIZE_N,BLOCK_SIZE_K,GROUP_SIZE_M,num_warps,num_stages,"
                                           "us\n1,16,32,64,1,4,3,12.5\n1,16,32,64,1,4,4,-2.5\n")
    return {"read_only": read_only_directory(tmp_path)}


def no_config_files_left(root: Path) -> None:
    assert not [p for p in root.rglob("*.json") if "hf" not in p.parts and p.name != "config.json"]
    assert not list(root.rglob("*.tmp"))


REPLAY = dict(replay=TABLE, n_trials=2, output_dir="out", progress=False)
# (id, tune() keyword arguments, `moe-opt tune` arguments, the error's text)
CASES = [
    ("unknown model offline", dict(model="nobody/NoSuchMoE-42", output_dir="out", progress=False),
     ["--model", "nobody/NoSuchMoE-42"], "model nobody/NoSuchMoE-42 not found offline: give a local config.json"),
    ("malformed config.json", dict(model="bad_config", output_dir="out", progress=False),
     ["--model", "bad_config"], r"config.json is not valid JSON \(Expecting value at line 1 column 44\); give a "
                                r"config.json as the Hub ships it"),
    ("batch size zero", dict(batch_sizes=[0], **REPLAY), ["--batch-sizes", "0"],
     "batch size 0 must be positive; batch sizes are integers >= 1"),
    ("negative batch size", dict(batch_sizes=[1, -4], **REPLAY), ["--batch-sizes", "1,-4"],
     "batch size -4 must be positive; batch sizes are integers >= 1"),
    ("duplicated batch size", dict(batch_sizes=[16, 1, 16], **REPLAY), ["--batch-sizes", "16,1,16"],
     "batch size\\(s\\) 16 given twice; each batch size once"),
    ("batch size not an integer", dict(batch_sizes=[1, "x"], **REPLAY), ["--batch-sizes", "1,x"],
     "batch size 'x' is not an integer; batch sizes are positive integers such as 1,16,64"),
    ("fractional batch size", dict(batch_sizes=[2.5], **REPLAY), ["--batch-sizes", "2.5"],
     "batch size (2.5|'2.5') is not an integer; batch sizes are positive integers"),
    ("unknown dtype", dict(model="deepseek-ai/DeepSeek-V4-Flash", dtype="int3", output_dir="out", progress=False),
     ["--model", "deepseek-ai/DeepSeek-V4-Flash", "--dtype", "int3"],
     "unknown dtype 'int3'; accepted: fp8_w8a8, bf16/bfloat16, fp16/float16"),
    ("block_shape does not divide N", None,
     ["--shape", "E=8,topk=2,K=256,intermediate=192,dtype=fp8_w8a8,block=128x128"],
     r"block_shape \[128, 128\]: block_k 128 must divide hidden_size 256 and N 192"),
    ("storage unreachable", dict(storage="postgresql://moe:secret@127.0.0.1:1/studies", **REPLAY),
     ["--storage", "postgresql://moe:secret@127.0.0.1:1/studies"],
     r"storage postgresql://moe:\*\*\*@127.0.0.1:1/studies (cannot be opened: .*Connection refused|needs its "
     r"database driver)"),
    ("storage in a read-only directory", dict(storage="sqlite:///{read_only}/studies.db", **REPLAY),
     ["--storage", "sqlite:///{read_only}/studies.db"],
     r"storage sqlite:///{read_only}/studies.db: directory {read_only} is read-only \(.+\); choose a writable "
     "location"),
    ("storage file is not a database", dict(storage="sqlite:///not_a.db", **REPLAY),
     ["--storage", "sqlite:///not_a.db"],
     "storage sqlite:///not_a.db: not_a.db is not an SQLite database; give a new or existing .db file"),
    ("storage file is not a journal", dict(storage="journal:not_a.journal", **REPLAY),
     ["--storage", "journal:not_a.journal"],
     "storage journal:not_a.journal: not_a.journal is not an Optuna journal file"),
    ("storage is not a URL", dict(storage="studies", **REPLAY), ["--storage", "studies"],
     "storage 'studies' is not a storage URL; accepted: sqlite:///PATH.db, journal:PATH, postgresql://"),
    ("replay table lacks columns", dict(replay="columns.csv", output_dir="out", progress=False),
     ["--replay", "columns.csv"],
     "replay table columns.csv lacks column\\(s\\) BLOCK_SIZE_N, BLOCK_SIZE_K, GROUP_SIZE_M, num_warps, "
     "num_stages; needed: M, BLOCK_SIZE_M"),
    ("replay table has no rows for a batch size", dict(batch_sizes=[1, 7], **REPLAY), ["--batch-sizes", "1,7"],
     "replay table DeepSeek-V4-Flash_tp8_H200.csv has no rows for batch size 7; it has 1, 16, 64, 256, 1024, 4096"),
    ("n_trials below one", dict(replay=TABLE, n_trials=0, output_dir="out", progress=False), ["--n-trials", "0"],
     "n_trials must be an integer >= 1, got 0"),
    ("replay table latency not positive", dict(replay="negative.csv", output_dir="out", progress=False),
     ["--replay", "negative.csv"], "replay table negative.csv, line 3: us '-2.5' is not a latency; accepted: "),
    ("negative timeout", dict(timeout_s=-1.0, **REPLAY), ["--timeout", "-1"],
     "timeout_s must be a finite number of seconds > 0 or None, got -1.0"),
    ("timeout not a number", dict(timeout_s=float("nan"), **REPLAY), ["--timeout", "nan"],
     "timeout_s must be a finite number of seconds > 0 or None, got nan"),
    ("compile workers below one", dict(compile_workers=-3, **REPLAY), ["--compile-workers", "-3"],
     "compile_workers must be an integer >= 1, got -3"),
    ("unknown dtype in replay mode", dict(dtype="fp7", **REPLAY), ["--dtype", "fp7"],
     "unknown dtype 'fp7'; accepted: fp8_w8a8, bf16/bfloat16, fp16/float16"),
]


@pytest.mark.parametrize("kwargs,argv,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_through_the_api_and_the_cli(files, tmp_path, capsys, kwargs, argv, message):
    message = message.format(**files)
    if kwargs is not None:
        kwargs = {k: v.format(**files) if isinstance(v, str) else v for k, v in kwargs.items()}
        started = time.monotonic()
        with pytest.raises(MoeOptError, match=message) as info:
            moe_opt.tune(**kwargs)
        assert "\n" not in str(info.value)
        assert time.monotonic() - started < 20  # no network retries, no waiting on a dead server
        no_config_files_left(tmp_path)

    argv = [a.format(**files) for a in argv] + ["--output-dir", "out"]
    if "--model" not in argv and "--shape" not in argv and "--replay" not in argv:
        argv += ["--replay", TABLE]
    if "--n-trials" not in argv:
        argv += ["--n-trials", "2"]
    capsys.readouterr()
    assert main(["tune", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("moe-opt tune: error: ") and "\n" not in err, err
    assert re.search(message, err), err
    assert "Traceback" not in captured.out
    no_config_files_left(tmp_path)


def test_unknown_model_fails_fast_without_a_network_or_offline_flag(tmp_path, monkeypatch):
    """huggingface_hub retries a failed connection five times with sleeps; resolve_model asks once."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    started = time.monotonic()
    with pytest.raises(SpecError, match="model nobody/NoSuchMoE-42 not found (offline|on the Hub)"):
        moe_opt.resolve_model("nobody/NoSuchMoE-42")
    assert time.monotonic() - started < 15


@pytest.fixture
def terminal_sigint():
    """SIGINT raises KeyboardInterrupt, as in a terminal. A shell without job control starts background commands
    with SIGINT ignored (POSIX) and Python keeps it ignored, so a test run started that way never sees a Ctrl-C."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_the_warm_start_exports_nothing_and_resumes(files, tmp_path, monkeypatch, capsys,
                                                                    terminal_sigint):
    enqueue = optuna.Study.enqueue_trial
    signals = []

    def interrupted_enqueue(self, *args, **kwargs):  # a real SIGINT, delivered while the warm start enqueues
        if not signals:
            signals.append(True)
            # raise_signal, not os.kill: the kernel may hand a process-directed SIGINT to another thread (tqdm's
            # monitor, a heartbeat), and the main thread then sees it a little later, deep inside SQLAlchemy.
            signal.raise_signal(signal.SIGINT)
        return enqueue(self, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "enqueue_trial", interrupted_enqueue)
    with pytest.raises(KeyboardInterrupt, match="interrupted during the warm start; nothing was measured or "
                                                "exported; run the same command again to resume"):
        moe_opt.tune(replay=TABLE, n_trials=2, storage="sqlite:///s.db", output_dir="out", progress=False)
    no_config_files_left(tmp_path)

    signals.clear()
    assert main(["tune", "--replay", TABLE, "--n-trials", "2", "--storage", "sqlite:///s.db",
                 "--output-dir", "out"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == ("moe-opt tune: interrupted during the warm start; nothing was measured or exported; run the "
                   "same command again to resume")
    no_config_files_left(tmp_path)

    monkeypatch.setattr(optuna.Study, "enqueue_trial", enqueue)
    result = moe_opt.tune(replay=TABLE, n_trials=2, storage="sqlite:///s.db", output_dir="out", progress=False)
    assert result.trials_used == {1: 2, 16: 2, 64: 2, 256: 2, 1024: 2, 4096: 2} and result.files["sglang"].exists()


def test_triton_imported_before_moe_opt_without_a_gpu_is_one_clear_error(tmp_path):
    # Triton's interpreter must be chosen before Triton loads (kernel/__init__.py); otherwise every config of a CPU tune
    # failed with "Cannot call @triton.jit'd outside of the scope of a kernel".
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU Triton compiles the kernels: the order of imports does not matter there")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    late = subprocess.run([sys.executable, "-c", "import triton; import moe_opt.kernel"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert late.returncode != 0
    last = late.stderr.strip().splitlines()[-1]
    assert "Triton was imported before moe_opt" in last and "TRITON_INTERPRET=1" in last
    first = subprocess.run([sys.executable, "-c", "import moe_opt.kernel, triton, os; print(os.environ['TRITON_INTERPRET'])"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "1"

"""tune(): studies in a real SQLite file that resume, exported config files, replay mode, the search's quality.

On the CPU the measurements come from Triton's interpreter (a scaled-down shape) or from replay tables: the
full-grid tables recorded on an H200 (DeepSeek-V4-Flash fp8 TP8, Qwen3-30B-A3B bf16 TP1), the partial one recorded
on an H100 (DeepSeek-V4-Flash, two batch sizes) and small synthetic tables made here.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time

import optuna
import pytest

import moe_opt
from moe_opt import Config, TuneError, space
from moe_opt.cli import main
from moe_opt.measure.base import Measurement
from moe_opt.measure.replay import ReplayTable, record_table

DSV4_TABLE = "moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv"
QWEN_TABLE = "moe_opt/data/Qwen3-30B-A3B_tp1_H200.csv"
DSV4_H100_TABLE = "moe_opt/data/DeepSeek-V4-Flash_tp8_H100.csv"
MIXTRAL_TABLE = "moe_opt/data/Mixtral-8x7B-v0.1_tp8_H200.csv"
QWEN235_TABLE = "moe_opt/data/Qwen3-235B-A22B-FP8_tp4_H200.csv"
QWEN_NEXT_TABLE = "moe_opt/data/Qwen3-Next-80B-A3B-Instruct_tp4_H200.csv"  # recorded after the search's rules were set


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch, request):
    root = request.config.rootpath
    monkeypatch.setenv("MOE_OPT_REPO", str(root))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def repo_path(rel: str) -> str:
    import os

    return os.path.join(os.environ["MOE_OPT_REPO"], rel)


def synthetic_table(path, batch_sizes=(1, 16, 256), block_k=None, fail_every=7) -> dict[int, tuple[Config, float]]:
    """A smooth landscape with its optimum at a different config per batch size; some configs fail."""
    rows, optimum = [], {}
    for M in batch_sizes:
        target = {"BLOCK_SIZE_M": 16 if M < 64 else 64, "BLOCK_SIZE_N": 64 if M < 64 else 128}
        best = None
        for i, c in enumerate(space.grid(block_k)):
            if i % fail_every == fail_every - 1:
                rows.append({"M": M, **c.to_dict(), "us": ""})
                continue
            us = 10.0 * math.log2(M + 1) + 5
            us *= 1 + 0.3 * abs(math.log2(c.BLOCK_SIZE_M / target["BLOCK_SIZE_M"]))
            us *= 1 + 0.2 * abs(math.log2(c.BLOCK_SIZE_N / target["BLOCK_SIZE_N"]))
            us *= 1 + 0.1 * abs(math.log2(c.BLOCK_SIZE_K / 128)) + 0.05 * (c.num_warps == 8)
            us *= 1 + 0.03 * abs(c.num_stages - 3) + 0.01 * (c.GROUP_SIZE_M == 1)
            rows.append({"M": M, **c.to_dict(), "us": f"{us:.4f}", "extra": "ignored"})
            if best is None or us < best[1]:
                best = (c, us)
        optimum[M] = best
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()) + ["extra"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return optimum


def count_trials(storage: str) -> dict[str, int]:
    return {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}


def test_interpreter_tune_writes_sqlite_resumes_and_exports(tmp_path):
    """The README's main job on a machine without a GPU: a real (scaled-down) tune through the interpreter."""
    kwargs = dict(model="deepseek-ai/DeepSeek-V4-Flash", tp_size=8, batch_sizes=[1, 8], progress=False)
    first = moe_opt.tune(n_trials=2, **kwargs)
    assert not first.is_performance
    db = tmp_path / "studies" / "DeepSeek-V4-Flash.db"
    assert db.exists()
    storage = f"sqlite:///{db}"
    counts = count_trials(storage)
    assert sorted(counts.values()) == [2, 2]
    first_trials = {M: first.trials_dataframe().query("M == @M")["params_BLOCK_SIZE_M"].tolist() for M in (1, 8)}

    second = moe_opt.tune(n_trials=3, **kwargs)  # same arguments, bigger budget: resumes
    assert second.study_names == first.study_names
    assert sorted(count_trials(storage).values()) == [3, 3]
    df = second.trials_dataframe()
    for M in (1, 8):
        assert df.query("M == @M")["params_BLOCK_SIZE_M"].tolist()[:2] == first_trials[M]  # earlier trials kept

    sglang, vllm = second.files["sglang"], second.files["vllm"]
    assert sglang.parent.name.startswith("triton_") and "block_shape=[128, 128]" in sglang.name
    assert "block_shape=[128,128]" in vllm.name
    assert set(json.loads(sglang.read_text())) == {"1", "8"}
    vllm_data = json.loads(vllm.read_text())
    assert "triton_version" in vllm_data and {"1", "8"} <= set(vllm_data)
    for M in (1, 8):
        assert Config.from_dict(json.loads(sglang.read_text())[str(M)]) == Config.from_dict(second.best[M])


def test_second_call_with_same_budget_measures_nothing_new(tmp_path):
    table = tmp_path / "t.csv"
    synthetic_table(table)
    kwargs = dict(replay=str(table), n_trials=5, storage="sqlite:///s.db", output_dir=None, progress=False)
    moe_opt.tune(**kwargs)
    before = count_trials("sqlite:///s.db")
    again = moe_opt.tune(**kwargs)
    assert count_trials("sqlite:///s.db") == before
    assert all(n == 5 for n in again.trials_used.values())


def test_replay_on_a_table_made_here_finds_the_optimum_and_counts_failures(tmp_path):
    table = tmp_path / "synthetic.csv"
    optimum = synthetic_table(table)
    result = moe_opt.tune(replay=str(table), n_trials=40, storage="sqlite:///r.db", output_dir=None, seed=3,
                          progress=False)
    assert sorted(result.best) == [1, 16, 256]  # batch sizes default to the table's
    for M, (config, us) in optimum.items():
        assert result.latency_us[M] == pytest.approx(us, rel=1e-3)
        assert Config.from_dict(result.best[M]) == config
    assert all(n == 40 for n in result.trials_used.values())
    df = result.trials_dataframe()
    assert len(df) == 3 * 40  # failed configs count against n_trials like measured ones


def test_tpe_and_random_samplers_count_failures_too(tmp_path):
    table = tmp_path / "synthetic.csv"
    synthetic_table(table, fail_every=2)
    for sampler in ("tpe", "random"):
        r = moe_opt.tune(replay=str(table), n_trials=12, storage=f"sqlite:///{sampler}.db", output_dir=None,
                         sampler=sampler, seed=0, progress=False, warm_start=False)
        df = r.trials_dataframe()
        assert len(df) == 3 * 12 and (df.state == "FAIL").any()


def test_grid_sampler_records_a_table_that_replays_identically(tmp_path):
    table = tmp_path / "synthetic.csv"
    synthetic_table(table, batch_sizes=(4,), block_k=64)  # block_k 64: 640 configs, quick
    r = moe_opt.tune(replay=str(table), sampler="grid", storage="sqlite:///g.db", output_dir=None, progress=False)
    assert r.trials_used[4] == len(space.grid(64))
    recorded = record_table("sqlite:///g.db", tmp_path / "recorded.csv")
    original, again = ReplayTable(table), ReplayTable(recorded)
    assert again.configs(4).keys() == original.configs(4).keys()
    for config, us in original.configs(4).items():
        assert again.configs(4)[config] == (pytest.approx(us, rel=1e-4) if us is not None else None)


def test_warm_start_measures_sglang_default_and_existing_tuned_file_first(tmp_path):
    from moe_opt.export.engines import write_sglang

    table = ReplayTable(repo_path(DSV4_TABLE))
    spec = moe_opt.ModelSpec.from_dict(table.metadata()["spec"])
    existing = Config(32, 64, 128, 64, 8, 4)
    write_sglang(spec, {64: existing}, tmp_path / "old", device_name="NVIDIA H200", triton_version="3.6.0")
    r = moe_opt.tune(replay=repo_path(DSV4_TABLE), batch_sizes=[64], n_trials=3, storage="sqlite:///w.db",
                     output_dir=None, tuned_config_dirs=[tmp_path / "old"], progress=False)
    first_two = r.trials_dataframe().sort_values("number").head(2)
    configs = [Config(*(int(row[f"params_{p}"]) for p in space.PARAM_NAMES)) for _, row in first_two.iterrows()]
    assert configs == [space.default_config(64, 256, "fp8_w8a8", [128, 128]), existing]
    assert r.default_latency_us[64] == pytest.approx(table.configs(64)[configs[0]])


def test_a_replay_does_not_warm_start_from_what_an_earlier_replay_of_the_table_exported(tmp_path):
    """The output folder of a replay holds the table's own answers once a replay has exported there: a second
    replay that read them would measure the search with the answers given (rule of the search-quality goal)."""
    from moe_opt.export.engines import write_sglang

    table = ReplayTable(repo_path(DSV4_TABLE))
    spec = moe_opt.ModelSpec.from_dict(table.metadata()["spec"])
    optimum = table.best(64)[0]
    write_sglang(spec, {64: optimum}, tmp_path / "out", device_name="NVIDIA H200", triton_version="3.6.0")
    r = moe_opt.tune(replay=repo_path(DSV4_TABLE), batch_sizes=[64], n_trials=2, storage="sqlite:///w.db",
                     output_dir=tmp_path / "out", progress=False)
    first = r.trials_dataframe().sort_values("number").head(2)
    configs = [Config(*(int(row[f"params_{p}"]) for p in space.PARAM_NAMES)) for _, row in first.iterrows()]
    assert configs[0] == space.default_config(64, 256, "fp8_w8a8", [128, 128])
    assert optimum not in configs


class LoggedReplay(ReplayTable):
    """The recorded table, writing when it measured which config at which batch size (it runs in the isolated
    measuring process, so it tells the test through a file)."""

    def __init__(self, path, log):
        super().__init__(path)
        self.log = log

    def measure(self, config, M):
        with open(self.log, "a") as f:
            f.write(json.dumps([time.time(), M, config.to_dict()]) + "\n")
        return super().measure(config, M)


def test_on_the_gpu_path_configs_are_measured_as_their_compiles_finish(tmp_path):
    """The GPU path's trial loop (loop.py): every batch size holds a claimed config that compiles while others
    are measured, measurements queue in the isolated process, compile failures are told without measuring.
    The compile pool is the real CompilePool, its GPU worker processes replaced by threads that take a scripted
    time per config (compiling needs a GPU)."""
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial

    from moe_opt.measure.compile_pool import CompilePool
    from moe_opt.measure.isolated import IsolatedMeasurer

    table = ReplayTable(repo_path(DSV4_TABLE))
    spec = moe_opt.ModelSpec.from_dict(table.metadata()["spec"])
    # M=1's first trial (no warm start: a seeded first proposal, the same whatever measures it) compiles slowly.
    kwargs = dict(replay=repo_path(DSV4_TABLE), warm_start=False, seed=3, output_dir=None, progress=False)
    first = moe_opt.tune(n_trials=1, storage=optuna.storages.InMemoryStorage(), **kwargs)
    slow = Config.from_dict(first.best[1])
    compiled_at: dict[Config, float] = {}

    def scripted_compile(config: Config, M: int) -> str | None:
        time.sleep(1.5 if config == slow else 0.05)
        compiled_at[config] = time.time()
        if config.num_warps == 8 and config.GROUP_SIZE_M == 64:
            return "OutOfResources: out of resource: shared memory (scripted)"
        return None

    log = tmp_path / "measured.jsonl"
    with ThreadPoolExecutor(4) as threads, \
            IsolatedMeasurer(partial(LoggedReplay, repo_path(DSV4_TABLE), str(log)), timeout_s=30) as measurer:
        pool = CompilePool(spec, workers=4, shared_memory_bytes=232_448, executor=threads,
                           compile_fn=scripted_compile)
        r = moe_opt.tune(measurer=measurer, compile_pool=pool, n_trials=12, storage="sqlite:///gpu_path.db",
                         guard=False, confirm=False, **kwargs)
    assert r.trials_used == {M: 12 for M in table.batch_sizes}
    measured = [(t, M, Config.from_dict(c)) for t, M, c in map(json.loads, log.read_text().splitlines())]
    # Nothing was measured before its compile finished; nothing that failed to compile was measured.
    assert all(compiled_at[c] <= t for t, _, c in measured)
    assert not [c for _, _, c in measured if c.num_warps == 8 and c.GROUP_SIZE_M == 64]
    failed = [t for M in table.batch_sizes for t in optuna.load_study(
        study_name=r.study_names[M], storage="sqlite:///gpu_path.db").trials if t.state.name == "FAIL"]
    assert all(t.user_attrs["error"].startswith("OutOfResources") for t in failed)
    assert r.timings["measured"] + len(failed) == 6 * 12
    assert len(measured) == r.timings["measured"] + 6  # and SGLang's defaults, timed apart (no warm start here)
    # M=1's slow compile held up no one: the other batch sizes were measured meanwhile.
    first_at_1 = min(t for t, M, _ in measured if M == 1)
    assert {M for t, M, _ in measured if t < first_at_1} == {16, 64, 256, 1024, 4096}
    assert r.timings["compiled"] == len(compiled_at) and r.timings["measuring_s"] > 0
    # The start's timeline, the measuring process's own working time and the closing (TuneResult.timings).
    t = r.timings
    assert t["measurer_ready_s"] <= t["first_result_s"] and t["first_submit_s"] <= t["first_result_s"]
    assert 0 < t["measurer_busy_s"] < r.wall_s and t["close_s"] >= 0


def test_a_kernel_that_specializes_on_the_batch_size_is_compiled_once_per_batch_size():
    """An engine's own kernel compiles again per batch size (Triton specializes its EM and num_valid_tokens), so
    the pool compiles a config once per batch size for it, and once for all batch sizes for the builtin."""
    from concurrent.futures import ThreadPoolExecutor

    from moe_opt.kernel.backend import BuiltinBackend
    from moe_opt.measure.compile_pool import CompilePool

    class SpecializingBuiltin(BuiltinBackend):  # the builtin's screen and space, with an engine kernel's property
        specializes_on_m = True

    spec = moe_opt.ModelSpec.from_dict(ReplayTable(repo_path(DSV4_TABLE)).metadata()["spec"])
    config = Config(16, 64, 128, 1, 4, 3)
    for backend, compiled in ((BuiltinBackend(), [4]), (SpecializingBuiltin(), [1, 8, 64])):
        calls: list[int] = []
        with ThreadPoolExecutor(2) as threads:
            pool = CompilePool(spec, workers=2, shared_memory_bytes=232_448, executor=threads, backend=backend,
                               compile_fn=lambda c, M: calls.append(M))
            pool.ensure([(config, 1), (config, 8)])
            assert [pool.result(config, M) for M in (1, 8, 64)] == [None] * 3
            assert pool.ready(config, 64) and pool.compiled == len(compiled)
        assert sorted(calls) == compiled


def test_a_compile_launches_few_experts_aligned_as_the_whole_shape_at_one_batch_size_per_launch_path():
    """A compile worker's weights are the topk experts' only (the GEMM's binary depends on N and K), but its
    alignment counts the whole shape's E (its kernels specialize on E: aligned as few experts, the measuring
    process compiled 7 kernels again on the H200, benchmarks/measurer_compiles.py), and for vLLM's launch rules it
    launches on both sides of the tiny-batch rule."""
    from moe_opt.kernel.backend import BuiltinBackend

    spec = moe_opt.ModelSpec.from_dict(ReplayTable(repo_path(DSV4_TABLE)).metadata()["spec"])
    inputs = BuiltinBackend().compile_inputs(spec, "cpu")
    assert inputs.w1.shape[0] == spec.topk == 6 and inputs.kwargs["global_num_experts"] == spec.E == 256
    assert BuiltinBackend().compile_batch_sizes(spec) == (4,)
    assert BuiltinBackend("vllm").compile_batch_sizes(spec) == (4, 4096)  # 4 * 6 * 4 <= 256: 4 is tiny
    few = spec.replace(num_experts=8, topk=2)
    assert BuiltinBackend("vllm").compile_batch_sizes(few) == (4, 1)  # 4 * 2 * 4 > 8, 1 * 2 * 4 <= 8


def test_the_compile_pool_compiles_a_config_per_gemm_and_screens_both():
    """Re-measuring times each batch size's best pair; its compile is a job of its own (with USE_TMA in the down
    config GEMM1 writes its output sorted: a binary neither config compiles alone)."""
    from concurrent.futures import ThreadPoolExecutor

    from moe_opt.measure.compile_pool import CompilePool
    from moe_opt.space import ConfigPair

    spec = moe_opt.ModelSpec.from_dict(ReplayTable(repo_path(DSV4_TABLE)).metadata()["spec"])
    launched: list = []
    up, down = Config(16, 64, 128, 1, 4, 3), Config(16, 128, 128, 16, 4, 2, USE_TMA=True)
    small, too_big = Config(128, 64, 128, 1, 4, 3), Config(128, 256, 128, 1, 8, 5)  # over the H200's shared memory
    with ThreadPoolExecutor(2) as threads:
        pool = CompilePool(spec, workers=2, shared_memory_bytes=232_448, executor=threads,
                           compile_fn=lambda c, M: launched.append(c))
        assert pool.result(ConfigPair(up, down), 1) is None
        assert pool.result(ConfigPair(small, too_big), 1).startswith("Rejected: shared-memory estimate")
    assert launched == [ConfigPair(up, down)]


def test_closing_the_compile_pool_cancels_what_has_not_started_and_does_not_wait_for_the_rest():
    """A tune's end does not wait for its compile workers: a compile still running finishes on its own, one not
    started never starts (on the GPU each worker's exit is also its CUDA context's teardown)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from moe_opt.measure.compile_pool import CompilePool

    spec = moe_opt.ModelSpec.from_dict(ReplayTable(repo_path(DSV4_TABLE)).metadata()["spec"])
    release, started = threading.Event(), []

    def held_compile(config: Config, M: int) -> None:
        started.append(config)
        release.wait(10)

    configs = [Config(16, 64, 128, 1, 4, 3), Config(16, 128, 128, 1, 4, 3)]
    threads = ThreadPoolExecutor(1)
    pool = CompilePool(spec, workers=1, shared_memory_bytes=232_448, executor=threads, compile_fn=held_compile)
    pool.ensure([(c, 1) for c in configs])
    while not started:
        time.sleep(0.01)
    pool.close()
    assert not pool.ready(configs[0], 1)  # still compiling: close() did not wait for it
    release.set()
    threads.shutdown(wait=True)
    assert started == configs[:1]  # the queued one was cancelled


def test_a_compile_pool_that_breaks_says_so_once_and_leaves_compiling_to_the_measurer(capsys):
    """A compile worker that dies (on the H200: out of GPU memory in its initializer) breaks the whole pool; the
    tune goes on with the measuring process compiling, which is slower, so it is said, once."""
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from moe_opt.measure.compile_pool import CompilePool

    def dead(config, M):
        raise BrokenProcessPool("A process in the initializer failed")

    spec = moe_opt.ModelSpec.from_dict(ReplayTable(repo_path(DSV4_TABLE)).metadata()["spec"])
    configs = [Config(16, 64, 128, 1, 4, 3), Config(16, 128, 128, 1, 4, 3)]
    with ThreadPoolExecutor(1) as threads:
        pool = CompilePool(spec, workers=1, shared_memory_bytes=232_448, executor=threads, compile_fn=dead)
        assert pool.compile(configs, M=1) == {c: None for c in configs}  # None: the measurer compiles them
        threads.shutdown()
        pool.ensure([(Config(16, 32, 128, 1, 4, 3), 1)])  # submit now raises RuntimeError: still no exception
    assert pool.broken == "BrokenProcessPool: A process in the initializer failed"
    err = capsys.readouterr().err
    assert err.count("the compile pool failed") == 1 and "compiles each config itself" in err


def test_a_compile_worker_that_cannot_launch_configs_says_so_once_and_the_measurer_retries_them(capsys):
    """A launch error in a worker (not a compile failure) is no reason to fail the trial: compile_failure reports
    none and the measuring process compiles the config; the fallback is said once."""
    from concurrent.futures import ThreadPoolExecutor

    from moe_opt.measure.compile_pool import CompilePool
    from moe_opt.run.scheduler import compile_failure

    spec = moe_opt.ModelSpec.from_dict(ReplayTable(repo_path(DSV4_TABLE)).metadata()["spec"])
    configs = [Config(16, 64, 128, 1, 4, 3), Config(16, 128, 128, 1, 4, 3)]
    with ThreadPoolExecutor(1) as threads:
        pool = CompilePool(spec, workers=1, shared_memory_bytes=232_448, executor=threads,
                           compile_fn=lambda c, M: "RuntimeError: CUDA error: an illegal memory access")
        assert [compile_failure(pool, c, 1) for c in configs] == [None, None]
    assert pool.launch_failed == "RuntimeError: CUDA error: an illegal memory access"
    assert capsys.readouterr().err.count("a compile worker could not launch") == 1


class LuckyOnce(ReplayTable):
    """The recorded table, except that SGLang's default config at M=64 measures twice as fast the first time: a
    lucky draw, as noise gives one config among 48 on a GPU."""

    def __init__(self, path):
        super().__init__(path)
        spec = moe_opt.ModelSpec.from_dict(self.metadata()["spec"])
        self.lucky = space.default_config(64, spec.E, spec.dtype, spec.block_shape)
        self.seen = set()

    def measure(self, config, M):
        m = super().measure(config, M)
        if (config, M) == (self.lucky, 64) and (config, M) not in self.seen:
            self.seen.add((config, M))
            return Measurement(m.latency_us / 2, None, m.attrs)
        return m


def test_close_contenders_are_measured_again_so_a_lucky_draw_is_not_exported(tmp_path):
    table = ReplayTable(repo_path(DSV4_TABLE))
    kwargs = dict(replay=repo_path(DSV4_TABLE), batch_sizes=[16, 64], n_trials=12, output_dir=None, progress=False)
    cursed = moe_opt.tune(measurer=LuckyOnce(repo_path(DSV4_TABLE)), confirm=False, storage="sqlite:///a.db",
                          **kwargs)
    lucky = LuckyOnce(repo_path(DSV4_TABLE)).lucky
    assert Config.from_dict(cursed.best[64]) == lucky  # without re-measuring, the lucky draw wins

    r = moe_opt.tune(measurer=LuckyOnce(repo_path(DSV4_TABLE)), storage="sqlite:///b.db", **kwargs)
    true_us = table.configs(64)
    assert Config.from_dict(r.best[64]) != lucky
    assert r.latency_us[64] == pytest.approx(true_us[Config.from_dict(r.best[64])])
    assert r.default_latency_us[64] == pytest.approx(true_us[lucky])  # the fresh measurement, not the lucky one
    assert r.speedup()[64] >= 1.0
    study = optuna.load_study(study_name=r.study_names[64], storage="sqlite:///b.db")
    assert study.user_attrs["confirmed"]  # {trial number: us}, kept in the study
    assert min(study.user_attrs["confirmed"].values()) == pytest.approx(r.latency_us[64])
    # What reads the storage later ranks the same way: the dashboard note, and `moe-opt export STORAGE`.
    from moe_opt.export.engines import load_tuned_configs
    from moe_opt.export.from_storage import export_storage
    from moe_opt.view.notes import study_note

    assert f"Best config **{r.latency_us[64]:.2f} µs**" in study_note(study)
    rebuilt = [p for p in export_storage("sqlite:///b.db", tmp_path / "rebuilt") if "configs" in p.parts]
    assert load_tuned_configs(rebuilt[0])[64] == Config.from_dict(r.best[64])


def _seeds_all_within(table_path: str, within: float) -> tuple[float, list]:
    """Over 20 seeds of a default (32-trial) replay tune: the share in which every batch size is within ``within``
    of the table's optimum at once, and the (seed, M) misses."""
    table = ReplayTable(repo_path(table_path))
    seeds = range(20)
    all_within = 0
    misses = []
    for seed in seeds:
        r = moe_opt.tune(replay=repo_path(table_path), seed=seed, storage=optuna.storages.InMemoryStorage(),
                         output_dir=None, progress=False)
        assert all(r.trials_used[M] == 32 for M in table.batch_sizes)  # the default budget
        missed = [M for M in table.batch_sizes if r.latency_us[M] > within * table.best(M)[1]]
        all_within += not missed
        misses += [(seed, M) for M in missed]
    return all_within / len(seeds), misses


@pytest.mark.parametrize("table_path", [DSV4_TABLE, QWEN_TABLE, DSV4_H100_TABLE, MIXTRAL_TABLE, QWEN235_TABLE,
                                        QWEN_NEXT_TABLE])
def test_search_reaches_one_percent_of_grid_optimum_in_95_percent_of_seeds(table_path):
    """Goal 1 of the performance issue, on every full-grid table recorded (DeepSeek-V4-Flash fp8 block TP8,
    Qwen3-30B-A3B bf16 TP1, Mixtral-8x7B bf16 TP8, Qwen3-235B-A22B fp8 block TP4 and Qwen3-Next-80B-A3B bf16 TP4 on
    an H200, six batch sizes each; DeepSeek-V4-Flash on an H100, two; Qwen3-Next's was recorded after the search's
    rules were chosen on the others, and replayed without changing them): with the default 32 trials per batch size, the best configs found are
    within 1% of the grid optimum at every batch size at once in at least 95% of 20 seeds. Deterministic (seeded),
    no GPU."""
    share, misses = _seeds_all_within(table_path, 1.01)
    assert share >= 0.95, misses


def test_warm_start_adds_the_default_with_the_block_m_that_holds_one_experts_tokens_and_the_next(tmp_path):
    """DeepSeek-V4-Flash (E=256, topk 6): SGLang's fp8 default has BLOCK_SIZE_M 64 at every M; at M=256 an expert
    gets 6 tokens, so the next trials are the default with BLOCK_SIZE_M 16 and 32; at M=1024 (24 tokens) with 32 (the
    next, 64, is the default's); at M=4096 (96 tokens) with 128 (the largest)."""
    r = moe_opt.tune(replay=repo_path(DSV4_TABLE), batch_sizes=[256, 1024, 4096], n_trials=3,
                     storage="sqlite:///b.db", output_dir=None, progress=False)
    for M, sizes in ((256, (16, 32)), (1024, (32,)), (4096, (128,))):
        trials = optuna.load_study(study_name=r.study_names[M], storage="sqlite:///b.db").trials
        configs = [Config(*(t.params[p] for p in space.PARAM_NAMES)) for t in sorted(trials, key=lambda t: t.number)]
        default = space.default_config(M, 256, "fp8_w8a8", [128, 128])
        seeded = [default] + [dataclasses.replace(default, BLOCK_SIZE_M=size) for size in sizes]
        assert configs[:len(seeded)] == seeded and all(t.user_attrs.get("warm_start") for t in trials[:len(seeded)])
        assert len(seeded) == 3 or not trials[len(seeded)].user_attrs.get("warm_start")  # then the search's own


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(TuneError, match="n_trials must be an integer >= 1"):
        moe_opt.tune(replay=repo_path(DSV4_TABLE), n_trials=0, output_dir=None, progress=False)
    with pytest.raises(TuneError, match="batch size 0 must be positive"):
        moe_opt.tune(replay=repo_path(DSV4_TABLE), batch_sizes=[0], output_dir=None, progress=False)
    with pytest.raises(TuneError, match="given twice"):
        moe_opt.tune(replay=repo_path(DSV4_TABLE), batch_sizes=[1, 1], output_dir=None, progress=False)
    with pytest.raises(TuneError, match="no rows for batch size 7"):
        moe_opt.tune(replay=repo_path(DSV4_TABLE), batch_sizes=[7], n_trials=1, storage="sqlite:///e.db",
                     output_dir=None, progress=False)
    with pytest.raises(TuneError, match="unknown sampler"):
        moe_opt.tune(replay=repo_path(DSV4_TABLE), sampler="annealing", storage="sqlite:///e2.db",
                     output_dir=None, progress=False)


def test_gpt_oss_activation_is_refused_not_tuned_wrong():
    with pytest.raises(TuneError, match="activation 'swigluoai'"):
        moe_opt.tune(model="openai/gpt-oss-20b", output_dir=None, progress=False)


def test_cli_tune_replay_and_export(tmp_path, capsys):
    assert main(["tune", "--replay", repo_path(DSV4_TABLE), "--n-trials", "4", "--storage", "sqlite:///c.db",
                 "--output-dir", "out"]) == 0
    text = capsys.readouterr().out
    assert "geometric-mean speedup" in text and "wrote sglang" in text
    first = {p.name: p.read_text() for p in (tmp_path / "out").rglob("*.json")}
    assert main(["export", "sqlite:///c.db", "-o", "out2"]) == 0
    second = {p.name: p.read_text() for p in (tmp_path / "out2").rglob("*.json")}
    assert second == first  # rebuilt from the storage alone
    assert main(["tune", "--replay", repo_path(DSV4_TABLE), "--batch-sizes", "1,x"]) == 2
    assert "batch size 'x' is not an integer" in capsys.readouterr().err


def test_cli_shape_must_name_its_sizes(capsys):
    assert main(["tune", "--shape", "E=8,topk=2"]) == 2
    assert "--shape 'E=8,topk=2' must be E=..,topk=..,K=..,intermediate=.." in capsys.readouterr().err


def test_block_m_for_tokens_is_the_smallest_power_of_two_holding_an_experts_share_from_16_to_128():
    assert space.block_m_for_tokens(1, 8, 128) == 16  # 0.06 tokens per expert: the smallest block
    assert space.block_m_for_tokens(256, 8, 128) == 16  # 16 tokens exactly
    assert space.block_m_for_tokens(272, 8, 128) == 32  # 17 tokens
    assert space.block_m_for_tokens(4096, 6, 256) == 128  # 96 tokens
    assert space.block_m_for_tokens(4096, 2, 8) == 128  # 1,024 tokens: capped


def test_the_search_state_never_offers_a_config_it_has_tried_at_that_batch_size():
    from moe_opt.search.surrogate import SearchState

    candidates = [Config(m, n, 128, 32, 4, 3) for m in (16, 32, 64) for n in (64, 128)]
    state = SearchState(candidates)
    state.record(16, candidates[0], 10.0)
    state.record(16, candidates[1], None)  # failed to run at M=16 only
    state.record(64, candidates[2], None, compile_failure=True)  # failed to compile: at every M
    state.record(16, Config(128, 64, 128, 32, 4, 3), 9.0)  # outside the candidates: kept, never offered
    assert state.open_candidates(16) == candidates[3:]
    assert state.open_candidates(1) == candidates[:2] + candidates[3:]
    # A state built from what another one learned (a resumed tune) offers the same.
    rebuilt = SearchState(candidates, measured=state.measured, failed=state.failed, failed_at=state.failed_at)
    assert rebuilt.open_candidates(16) == candidates[3:] and rebuilt.open_candidates(1) == state.open_candidates(1)


def test_the_search_states_predictions_are_the_kernel_weighted_average_of_every_measurement():
    import numpy as np

    from moe_opt.search import surrogate
    from moe_opt.search.surrogate import SearchState

    candidates = [Config(m, n, k, 32, w, 3) for m in (16, 32, 64) for n in (64, 128) for k in (64, 128)
                  for w in (4, 8)]
    state = SearchState(candidates)
    latency = {(M, c): 10.0 + 3 * i + M / 8 for i, c in enumerate(candidates) for M in (16, 64, 256)}
    for (M, c), us in list(latency.items())[::3]:
        state.record(M, c, us)
    state.record(16, Config(128, 64, 128, 32, 4, 3), 9.0)  # outside the candidates: sets M=16's best only
    state.record(64, candidates[4], 12.5)  # a config measured again: its newer latency replaces the first
    state.record(64, candidates[4], 11.0)
    sibling = state.sibling()  # shares the geometry, learns nothing of this state's measurements
    assert sibling.geometry is state.geometry and not sibling.measured

    def direct(M: int) -> tuple[np.ndarray, np.ndarray]:
        num = np.full(len(candidates), surrogate.PRIOR_WEIGHT * surrogate.PRIOR_LOG_RATIO)
        den = np.full(len(candidates), surrogate.PRIOR_WEIGHT)
        for m, results in state.measured.items():
            w = 1.0 if m == M else surrogate.OTHER_M_WEIGHT * math.exp(-surrogate.BATCH_DECAY * abs(math.log2(m / M)))
            best = min(results.values())
            for c, us in results.items():
                if c in candidates:
                    k = w * state.geometry.similarity[:, candidates.index(c)]
                    num += k * math.log(us / best)
                    den += k
        return num / den, 1 / np.sqrt(den)

    for M in (16, 64, 128, 1024):
        (mean, sigma), (want_mean, want_sigma) = state.predict(M), direct(M)
        np.testing.assert_allclose(mean, want_mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(sigma, want_sigma, rtol=1e-9)
    # A state built from another's measurements (a resumed tune) predicts the same.
    rebuilt = SearchState(candidates, measured=state.measured)
    np.testing.assert_allclose(rebuilt.predict(64)[0], state.predict(64)[0], rtol=1e-9, atol=1e-12)


def test_a_measurer_that_stops_early_is_told_a_margin_over_the_batch_sizes_best_so_far(tmp_path):
    from moe_opt.run.scheduler import STOP_ABOVE_BEST

    class StoppingTable(ReplayTable):
        """A table that declares stops_early and records what each measurement was told."""

        def __init__(self, path):
            super().__init__(path)
            self.info = dataclasses.replace(self.info, stops_early=True)
            self.told = []

        def measure(self, config, M, stop_above_us=None):
            m = super().measure(config, M)
            self.told.append((M, stop_above_us, m.latency_us))
            return m

    measurer = StoppingTable(repo_path(QWEN_TABLE))
    result = moe_opt.tune(replay=repo_path(QWEN_TABLE), measurer=measurer, batch_sizes=[1, 64], n_trials=8,
                          storage=f"sqlite:///{tmp_path}/s.db", output_dir=None, progress=False)
    assert result.trials_used == {1: 8, 64: 8}
    for M in (1, 64):
        told = [(stop, us) for m, stop, us in measurer.told if m == M]
        trials, after = told[:8], told[8:]  # the trial loop, then re-measuring the contenders
        assert trials[0][0] is None  # the first trial has nothing to be compared with
        best = trials[0][1]
        for stop, us in trials[1:]:
            assert stop == pytest.approx(STOP_ABOVE_BEST * best)
            best = min(best, us)
        assert after and all(stop is None for stop, _ in after)  # re-measuring never stops early

"""One result per study for every reader, one study per measurement source, and a light ``import moe_opt``.

The tune, ``moe-opt show``, the report, the dashboard notes and ``moe-opt export STORAGE`` all read a study's
result through store/results.py; these tests hold them to the same answer when the correctness guard rejects
the fastest config. Study identity keeps replayed, interpreted and measured trials apart. Real SQLite files,
real replay tables, the real CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna

import moe_opt
from moe_opt import Config, space
from moe_opt.cli import main
from moe_opt.export.engines import export_paths, load_tuned_configs, write_engine_files
from moe_opt.measure.base import Measurement, MeasurerInfo
from moe_opt.measure.replay import ReplayTable
from moe_opt.store.identity import list_moe_studies
from moe_opt.store.storage import open_storage
from moe_opt.view.notes import study_note
from moe_opt.view.report_data import summary

REPO = Path(__file__).resolve().parents[1]
TABLE = str(REPO / "moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv")
SPEC = moe_opt.ModelSpec.from_dict(ReplayTable(TABLE).metadata()["spec"])


def _fastest_rejected(tmp_path):
    """A replay tune whose fastest config at M=64 the guard rejects; returns (result, storage, rejected)."""
    storage = f"sqlite:///{tmp_path}/g.db"
    kwargs = dict(replay=TABLE, batch_sizes=[16, 64], n_trials=8, storage=storage, progress=False)
    wrong = Config.from_dict(moe_opt.tune(output_dir=None, guard=False, **kwargs).best[64])
    result = moe_opt.tune(output_dir=tmp_path / "tuned", guard=lambda c: 0.31 if c == wrong else 0.002, **kwargs)
    return result, storage, wrong


def test_a_guard_rejected_config_is_named_best_by_no_reader(tmp_path, capsys):
    result, storage, wrong = _fastest_rejected(tmp_path)
    assert Config.from_dict(result.best[64]) != wrong
    tuned = str(Config.from_dict(result.best[64]))

    df = summary(storage)  # moe-opt show and the report's table
    row = df[df["M"] == 64].iloc[0]
    assert row["best_config"] == tuned and row["latency_us"] == result.latency_us[64]
    assert main(["show", storage]) == 0
    shown = next(line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["64"])
    assert tuned in shown and str(wrong) not in shown

    assert main(["report", storage, "-o", str(tmp_path / "r.html")]) == 0
    report_rows = (tmp_path / "r.csv").read_text().splitlines()
    row_64 = next(line for line in report_rows if ",64," in line)
    assert tuned in row_64 and str(wrong) not in row_64

    study = optuna.load_study(study_name=result.study_names[64], storage=storage)
    note = study_note(study)
    assert "| **best** (trial" in note and "Rejected by the correctness guard: " + str(wrong) in note
    best_line = next(line for line in note.splitlines() if "**best**" in line)
    assert "| " + " | ".join(str(v) for v in Config.from_dict(result.best[64]).to_dict().values()) in best_line

    out = tmp_path / "rebuilt"
    assert main(["export", storage, "-o", str(out)]) == 0
    path = export_paths(SPEC, out, device_name="NVIDIA H200", triton_version="3.6.0")["sglang"]
    assert load_tuned_configs(path)[64] == Config.from_dict(result.best[64]) != wrong
    assert json.loads(result.files["sglang"].read_text()) == json.loads(path.read_text())


def test_export_from_storage_keeps_the_batch_sizes_already_in_the_folder(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/s.db"
    result = moe_opt.tune(replay=TABLE, batch_sizes=[16, 64], n_trials=4, storage=storage, output_dir=None,
                          progress=False)
    out = tmp_path / "configs"
    kept = Config(32, 64, 128, 16, 4, 3)
    write_engine_files(SPEC, {7: kept, 64: Config(16, 32, 64, 1, 4, 2)}, out, device_name="NVIDIA H200",
                       triton_version="3.6.0")  # each engine's file of an earlier tune
    assert main(["export", storage, "-o", str(out)]) == 0
    paths = export_paths(SPEC, out, device_name="NVIDIA H200", triton_version="3.6.0")
    for engine in ("sglang", "vllm"):
        configs = load_tuned_configs(paths[engine])
        assert sorted(configs) == [7, 16, 64]
        assert configs[7] == kept  # no result for M=7 in the storage: the file's entry stays
        assert configs[64] == Config.from_dict(result.best[64])  # the storage's result replaces the old entry


class MeasuredH200(ReplayTable):
    """Stands in for a real tune on an H200 with Triton 3.6.0: the same shape, device and Triton version as the
    bundled table's sidecar, but a measurer that says it measures the GPU."""

    def __init__(self, path):
        super().__init__(path)
        self.info = MeasurerInfo(device_name="NVIDIA H200", source="NVIDIA H200", description="CUDA graph",
                                 kind="custom")
        self.calls = 0

    def measure(self, config, M):
        self.calls += 1
        m = super().measure(config, M)
        return Measurement(m.latency_us * 1.01, m.error, m.attrs) if m.ok else m


def test_replayed_and_measured_trials_never_share_a_study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = "sqlite:///shared.db"
    replayed = moe_opt.tune(replay=TABLE, batch_sizes=[64], n_trials=5, storage=storage, output_dir=None,
                            progress=False)
    measurer = MeasuredH200(TABLE)
    measured = moe_opt.tune(spec=SPEC, measurer=measurer, batch_sizes=[64], n_trials=5, storage=storage,
                            output_dir=None, progress=False, guard=False, confirm=False)
    assert replayed.study_names[64] != measured.study_names[64]
    assert "replay:DeepSeek-V4-Flash_tp8_H200.csv" in replayed.study_names[64]
    assert measurer.calls >= 5  # nothing of the replay was resumed as if measured
    store = open_storage(storage)
    infos = {i.name: i for i in list_moe_studies(store)}
    assert infos[replayed.study_names[64]].is_replay and not infos[measured.study_names[64]].is_replay
    study = optuna.load_study(study_name=measured.study_names[64], storage=store)
    assert all(t.value == ReplayTable(TABLE).configs(64)[Config(**t.params)] * 1.01
               for t in study.trials if t.value is not None)
    # Without a storage given, a replay writes a file of its own, not the model's.
    moe_opt.tune(replay=TABLE, batch_sizes=[64], n_trials=2, output_dir=None, progress=False)
    assert (tmp_path / "studies" / "replay_DeepSeek-V4-Flash_tp8_H200.db").is_file()
    assert not (tmp_path / "studies" / "DeepSeek-V4-Flash.db").exists()


def test_the_study_name_says_source_triton_and_kernel(tmp_path):
    r = moe_opt.tune(replay=TABLE, batch_sizes=[16], n_trials=2, storage=f"sqlite:///{tmp_path}/n.db",
                     output_dir=None, progress=False)
    name = r.study_names[16]
    assert name == ("moe|E=256,N=256,K=4096,topk=6,fp8_w8a8,block=[128,128],swiglu_limit=10"
                    "|replay:DeepSeek-V4-Flash_tp8_H200.csv|triton=3.6.0|kernel=builtin@1|M=16")
    attrs = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/n.db").user_attrs
    assert attrs["source"] == "replay:DeepSeek-V4-Flash_tp8_H200.csv" and attrs["kernel"] == "builtin@1"
    assert attrs["device_name"] == "NVIDIA H200"  # the engines' files are still named for the table's GPU


def test_a_storage_written_by_moe_opt_0_1_still_shows_and_exports(tmp_path):
    """Studies named before the source and kernel were in the name (no "schema" attribute) read as before."""
    storage = f"sqlite:///{tmp_path}/old.db"
    store = open_storage(storage)
    name = "moe|E=256,N=256,K=4096,topk=6,fp8_w8a8,block=[128,128],swiglu_limit=10|NVIDIA_H200|triton=3.6.0|M=64"
    study = optuna.create_study(study_name=name, storage=store)
    attrs = {"moe_opt_base": name.rsplit("|", 1)[0], "M": 64, "device_name": "NVIDIA H200",
             "triton_version": "3.6.0", "measurement": "CUDA graph", "is_performance": True, "spec": SPEC.to_dict(),
             "default_config": moe_opt.default_config(64, 256, "fp8_w8a8", [128, 128]).to_dict()}
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    dist = {k: optuna.distributions.CategoricalDistribution([16, 32, 64, 128, 256, 1, 2, 3, 4, 5, 8])
            for k in space.PARAM_NAMES}
    for config, us in ((Config(64, 128, 128, 32, 4, 3), 300.0), (Config(16, 64, 128, 1, 4, 3), 250.0)):
        study.add_trial(optuna.trial.create_trial(params=config.to_dict(), distributions=dist, value=us))
    df = summary(storage)
    assert df["best_config"].tolist() == [str(Config(16, 64, 128, 1, 4, 3))]
    assert df["speedup"].round(3).tolist() == [1.2]
    info = list_moe_studies(store)[0]
    assert info.source == "NVIDIA H200" and info.kernel == "builtin@0.1"
    assert main(["export", storage, "-o", str(tmp_path / "out")]) == 0


def test_a_measurer_with_less_shared_memory_is_never_proposed_configs_that_cannot_fit(tmp_path):
    class SmallCard(ReplayTable):
        def __init__(self, path):
            super().__init__(path)
            self.info = MeasurerInfo(device_name="NVIDIA H200", source="small-card", description="small",
                                     shared_memory_bytes=101_376)  # an sm_86-sized limit
            self.seen = []

        def measure(self, config, M):
            self.seen.append(config)
            return super().measure(config, M)

    card = SmallCard(TABLE)
    moe_opt.tune(spec=SPEC, measurer=card, batch_sizes=[64, 1024], n_trials=12, storage=f"sqlite:///{tmp_path}/m.db",
                 output_dir=None, progress=False, guard=False, confirm=False)
    assert len(card.seen) >= 20
    assert all(space.shared_memory_bytes(c, 1, 1) <= 101_376 for c in card.seen)


def test_import_moe_opt_loads_no_heavy_dependency():
    code = ("import moe_opt, sys; heavy = [m for m in ('torch', 'triton', 'optuna', 'pandas', 'plotly') "
            "if m in sys.modules]; assert not heavy, heavy; moe_opt.Config(16, 32, 64, 1); print('light')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "light", out.stderr

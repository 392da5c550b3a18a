"""USE_TMA: the fused MoE with tensor-descriptor loads computes the same function as without, and the tune offers
it only where the device, the engine and the format have it.

The kernel tests run on the GPU where one is present, else through Triton's interpreter, which runs tensor
descriptors (Triton 3.9: host-side TensorDescriptor arguments, zero padding past the tensor). Outputs are poisoned
with NaN before each run; the bounds are test_kernel.py's.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from test_kernel import CONFIGS, SWIGLU_LIMIT, TOLERANCE, K, make_case

from moe_opt import ConfigError, fused_moe
from moe_opt.kernel import fused_moe_reference, quantize_weights
from moe_opt.kernel.activation import dynamic_tensor_scale
from moe_opt.kernel.align import moe_align_block_size
from moe_opt.kernel.backend import BuiltinBackend
from moe_opt.kernel.tma import device_supports_tma
from moe_opt.model.spec import ModelSpec
from moe_opt.space import Config, ConfigPair, candidates_for, choices_for, tma_refusal

PATHS = ("bf16", "fp8_tensor", "fp8_block")
# Which GEMM loads by TMA: GEMM1's weights (up), GEMM2's A and B with GEMM1 writing expert-sorted (down), or both.
WHICH = {"up": (True, False), "down": (False, True), "both": (True, True)}
# BLOCK_SIZE_M 16; M = 17 is not a multiple of it. N, K and tails: E, N, K = 16, 128, 256 (test_kernel.py).
TMA_CASES = [  # (M, topk, swiglu_limit, ep_drop)
    (1, 1, None, False),
    (1, 8, SWIGLU_LIMIT, False),
    (17, 6, None, True),
    (3, 2, SWIGLU_LIMIT, False),
]


def pair(which: str, base: dict = CONFIGS["small"], down: dict = CONFIGS["mid"]) -> tuple[Config, Config]:
    up_tma, down_tma = WHICH[which]
    up = Config.from_dict(base)
    dn = Config.from_dict({**down, "BLOCK_SIZE_M": base["BLOCK_SIZE_M"]})
    return Config.from_dict({**up.to_dict(), "USE_TMA": up_tma}), Config.from_dict({**dn.to_dict(), "USE_TMA": down_tma})


def tma_error(inputs, kwargs, up: Config, down: Config) -> float:
    x = inputs[0]
    out = torch.full((x.shape[0], K), float("nan"), dtype=x.dtype, device=x.device)
    fused_moe(*inputs, up, config_down=down, out=out, **kwargs)
    ref = fused_moe_reference(*inputs, **kwargs)
    got = out.double().cpu()
    assert not got.isnan().any(), "some output elements were never written"
    return ((got - ref).norm() / ref.norm()).item()


@pytest.mark.cuda
@pytest.mark.parametrize("which", list(WHICH))
@pytest.mark.parametrize("dtype_path", PATHS)
@pytest.mark.parametrize("M,topk,swiglu_limit,ep_drop", TMA_CASES)
def test_tma_paths_match_float64_reference(dtype_path, which, M, topk, swiglu_limit, ep_drop, device):
    inputs, kwargs = make_case(dtype_path, M, topk, swiglu_limit, device, ep_drop=ep_drop)
    err = tma_error(inputs, kwargs, *pair(which))
    assert err < TOLERANCE[dtype_path], f"relative Frobenius error {err:.2e} >= {TOLERANCE[dtype_path]}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype_path", ["bf16", "fp8_block"])
def test_one_tma_config_for_both_gemms_and_a_big_block(dtype_path, device):
    """A single Config with USE_TMA runs both GEMMs by TMA (what a trial of the tune measures); BLOCK_SIZE_M 128
    is larger than any expert's tokens, so every block is mostly padding rows of the sorted intermediate."""
    inputs, kwargs = make_case(dtype_path, 17, 2, None, device)
    tma = Config.from_dict({**CONFIGS["big_m"], "USE_TMA": True})
    assert tma_error(inputs, kwargs, tma, tma) < TOLERANCE[dtype_path]


@pytest.mark.cuda
def test_down_tma_gemm1_writes_its_output_in_expert_sorted_order(device):
    """SGLang's c_sorted: GEMM1's row p is slot sorted_token_ids[p]'s, one row per position of the alignment."""
    inputs, kwargs = make_case("bf16", 5, 3, None, device)
    up, down = pair("down")
    plain = fused_moe(*inputs, up, config_down=Config.from_dict(CONFIGS["mid"] | {"BLOCK_SIZE_M": 16}),
                      up_only=True, **kwargs)
    sorted_out = fused_moe(*inputs, up, config_down=down, up_only=True, **kwargs)
    ids = moe_align_block_size(inputs[4], up.BLOCK_SIZE_M, 16).sorted_token_ids
    assert sorted_out.shape == (ids.shape[0], plain.shape[1])
    valid = ids < plain.shape[0]
    assert torch.equal(sorted_out[valid], plain[ids[valid].long()])


def test_per_tensor_scale_leaves_out_rows_nothing_wrote():
    x = torch.tensor([[1.0, -2.0], [float("nan"), 1e30], [0.5, 4.0]])
    rows = torch.tensor([True, False, True])
    assert dynamic_tensor_scale(x, rows=rows).item() == pytest.approx(4.0 / 448)


@pytest.mark.gpu_only
@pytest.mark.parametrize("dtype_path", PATHS)
def test_tma_full_matrix_on_gpu(dtype_path, device):
    """Every TMA path over M = 1, 3, 17, 64, topk 1..8, with and without the limit and experts on other ranks."""
    errors = {}
    for which, M, topk, limit, ep in itertools.product(WHICH, (1, 3, 17, 64), (1, 2, 6, 8), (None, SWIGLU_LIMIT),
                                                       (False, True)):
        inputs, kwargs = make_case(dtype_path, M, topk, limit, device, ep_drop=ep)
        errors[(which, M, topk, limit, ep)] = tma_error(inputs, kwargs, *pair(which))
    worst = max(errors, key=errors.get)
    median = sorted(errors.values())[len(errors) // 2]
    print(f"{dtype_path} TMA: median {median:.2e}, worst {errors[worst]:.2e} at (which, M, topk, limit, ep) = {worst}")
    assert errors[worst] < TOLERANCE[dtype_path]


@pytest.mark.gpu_only
def test_the_device_offers_tma_where_it_has_it():
    major = torch.cuda.get_device_capability()[0]
    assert device_supports_tma("cuda") == (major >= 9)


# Where TMA is refused: one-line errors, never a crash.
@pytest.mark.cuda
def test_tma_refusals_are_one_line_config_errors(device):
    inputs, kwargs = make_case("bf16", 3, 2, None, device)
    up, down = pair("both")
    with pytest.raises(ConfigError, match="SGLang's path"):
        fused_moe(*inputs, up, config_down=down, launch="vllm", **kwargs)
    x, _, w2, tw, ids = inputs
    misaligned = torch.randn(16, 2 * 128, K + 4, dtype=torch.bfloat16, device=device)[..., :K]  # rows of 520 bytes
    with pytest.raises(ConfigError, match="16"):
        fused_moe(x, misaligned, w2, tw, ids, up, config_down=down)
    E, N = 16, 128
    q1, s1, _ = quantize_weights(torch.randn(E, 2 * N, K) / 16, "int4_w4a16", group_size=128)
    q2, s2, _ = quantize_weights(torch.randn(E, K, N) / 16, "int4_w4a16", group_size=128)
    with pytest.raises(ConfigError, match="gptq/awq"):
        fused_moe(x, q1.to(device), q2.to(device), tw, ids, up, config_down=down, quant_dtype="int4_w4a16",
                  block_shape=[0, 128], w1_scale=s1.to(device), w2_scale=s2.to(device))


BF16 = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=4096, intermediate_size=14336)
INT4 = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=4096, intermediate_size=14336, dtype="int4_w4a16",
                            group_size=128)
FP8_BLOCK = ModelSpec.from_shape(num_experts=256, topk=8, hidden_size=7168, intermediate_size=2048, tp_size=8,
                                 dtype="fp8_w8a8", block_shape=(128, 128))


def test_a_config_writes_use_tma_only_where_it_is_true():
    plain, tma = Config(64, 128, 128, 32, 4, 3), Config(64, 128, 128, 32, 4, 3, USE_TMA=True)
    assert "USE_TMA" not in plain.to_dict() and tma.to_dict()["USE_TMA"] is True
    assert plain != tma and len({plain, tma}) == 2
    assert Config.from_dict(tma.to_dict()) == tma and Config.from_dict(plain.to_dict()) == plain
    assert Config.from_dict({**plain.to_dict(), "USE_TMA": False}) == plain
    with pytest.raises(ValueError, match="USE_TMA"):
        Config.from_dict({**plain.to_dict(), "USE_TMA": "yes"})
    assert str(tma) == "M64 N128 K128 G32 w4 s3 tma"


def test_the_space_offers_tma_only_on_a_device_that_has_it_and_formats_that_take_it():
    plain = candidates_for(BF16)
    assert not any(c.USE_TMA for c in plain) and "USE_TMA" not in choices_for(BF16)
    with_tma = candidates_for(BF16, tma=True)
    assert len(with_tma) == 2 * len(plain) and {c for c in with_tma if not c.USE_TMA} == set(plain)
    assert choices_for(BF16, tma=True)["USE_TMA"] == (False, True)
    assert len(candidates_for(FP8_BLOCK, tma=True)) == 2 * len(candidates_for(FP8_BLOCK))
    assert candidates_for(INT4, tma=True) == candidates_for(INT4) and "gptq/awq" in tma_refusal(INT4)
    per_channel = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=4096, intermediate_size=14336,
                                       dtype="fp8_w8a8", per_channel_quant=True)
    assert "per-channel" in tma_refusal(per_channel)
    assert not device_supports_tma("cpu")


def test_screen_refuses_tma_where_it_cannot_run_with_a_reason():
    tma = Config(64, 128, 128, 32, 4, 3, USE_TMA=True)
    assert BuiltinBackend().screen(BF16, tma, 232_448) is None
    assert BuiltinBackend().screen(INT4, tma, 232_448).startswith("Rejected: USE_TMA")
    assert "vllm" in BuiltinBackend("vllm").screen(BF16, tma, 232_448)
    assert not any(c.USE_TMA for c in BuiltinBackend("vllm").candidates(BF16, 232_448, tma=True))
    big = Config(256, 256, 256, 1, 8, 5, USE_TMA=True)  # the tiles cannot fit, with TMA as without
    assert "shared-memory" in BuiltinBackend().screen(BF16, big, 232_448)


def test_a_trial_carries_use_tma_and_a_stored_trial_without_it_reads_false():
    import optuna

    from moe_opt.store.schema import config_of, trial_params

    study = optuna.create_study()
    tma = Config(64, 128, 128, 32, 4, 3, USE_TMA=True)
    study.enqueue_trial(trial_params(tma))
    study.enqueue_trial(trial_params(Config(16, 32, 64, 1, 4, 3)))
    old = optuna.trial.create_trial(params=Config(32, 64, 64, 1, 4, 2).to_dict(), value=1.0, distributions={
        p: optuna.distributions.CategoricalDistribution([v]) for p, v in Config(32, 64, 64, 1, 4, 2).to_dict().items()})
    study.add_trial(old)
    configs = [config_of(t) for t in study.get_trials()]
    assert configs == [tma, Config(16, 32, 64, 1, 4, 3), Config(32, 64, 64, 1, 4, 2)]


def test_a_replay_table_with_and_without_a_use_tma_column(tmp_path):
    from moe_opt.measure.replay import ReplayTable

    head = "M,BLOCK_SIZE_M,BLOCK_SIZE_N,BLOCK_SIZE_K,GROUP_SIZE_M,num_warps,num_stages,us"
    (tmp_path / "old.csv").write_text(f"{head}\n4,16,32,64,1,4,3,10.5\n")
    (tmp_path / "tma.csv").write_text(f"{head},USE_TMA\n4,16,32,64,1,4,3,10.5,\n4,16,32,64,1,4,3,9.5,true\n")
    old, tma = ReplayTable(tmp_path / "old.csv"), ReplayTable(tmp_path / "tma.csv")
    assert not old.info.tma and old.configs(4) == {Config(16, 32, 64, 1, 4, 3): 10.5}
    assert tma.info.tma and tma.best(4) == (Config(16, 32, 64, 1, 4, 3, USE_TMA=True), 9.5)


def test_a_pair_with_tma_on_the_down_config_exports_it_only_in_the_down_file(tmp_path):
    from moe_opt.export.engines import write_engine_files

    up, down = Config(16, 64, 128, 1, 4, 3), Config(16, 128, 128, 16, 4, 4, USE_TMA=True)
    files, _ = write_engine_files(FP8_BLOCK, {1: up, 64: down}, tmp_path, device_name="NVIDIA H200",
                                  triton_version="3.6.0", sglang_pairs={1: ConfigPair(up, down)})
    up_file, down_file = (json.loads(files[k].read_text()) for k in ("sglang", "sglang_down"))
    assert "USE_TMA" not in up_file["1"] and down_file["1"]["USE_TMA"] is True
    assert files["sglang_down"].name.endswith("_down.json")
    vllm = json.loads(files["vllm"].read_text())
    assert all("USE_TMA" not in entry for key, entry in vllm.items() if key != "triton_version")


def test_a_tune_on_a_table_that_recorded_tma_searches_it_and_exports_it(tmp_path, monkeypatch):
    """A replay table with USE_TMA rows (what a Hopper grid records) offers USE_TMA to the search; where TMA is
    faster the tune finds it and writes "USE_TMA": true into SGLang's file."""
    import csv

    import moe_opt
    from moe_opt import space

    monkeypatch.chdir(tmp_path)
    spec = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=1024, intermediate_size=1024)
    rows = []
    for c in space.candidates_for(spec, tma=True):
        us = 10 * (1 + 0.3 * abs(c.BLOCK_SIZE_M.bit_length() - 5) + 0.2 * abs(c.BLOCK_SIZE_N.bit_length() - 7))
        rows.append({"M": 16, **c.params(), "us": f"{us * (0.8 if c.USE_TMA else 1.0):.4f}"})
    table = tmp_path / "tma.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "tma.csv.json").write_text(json.dumps({"spec": spec.to_dict(), "device": "NVIDIA H200"}))
    r = moe_opt.tune(replay=str(table), n_trials=40, storage="sqlite:///t.db", output_dir=str(tmp_path / "out"),
                     seed=1, progress=False)
    best = Config.from_dict(r.best[16])
    assert best.USE_TMA and (best.BLOCK_SIZE_M, best.BLOCK_SIZE_N) == (16, 64)
    sglang = next((tmp_path / "out" / "configs").rglob("E=8,N=1024,device_name=NVIDIA_H200.json"))
    assert json.loads(sglang.read_text())["16"]["USE_TMA"] is True
    assert "USE_TMA" not in json.loads((tmp_path / "out" / "E=8,N=1024,device_name=NVIDIA_H200.json").read_text())["16"]

    # tma=False: the same table's tune never proposes USE_TMA, in a study of its own ("|tma" names the other one).
    off = moe_opt.tune(replay=str(table), n_trials=20, storage="sqlite:///t.db", output_dir=None, seed=1,
                       progress=False, tma=False)
    assert not Config.from_dict(off.best[16]).USE_TMA
    assert r.study_names[16].endswith("|tma|M=16") and "|tma" not in off.study_names[16]


def test_tma_true_on_a_device_without_tensor_descriptors_is_a_one_line_error(tmp_path, monkeypatch):
    import moe_opt
    from moe_opt.errors import TuneError

    monkeypatch.chdir(tmp_path)
    table = "moe_opt/data/DeepSeek-V4-Flash_tp8_H200.csv"
    import pathlib

    table = str(pathlib.Path(__file__).resolve().parents[1] / table)
    with pytest.raises(TuneError, match=r"tma=True needs a measurer that can time USE_TMA: a GPU with tensor descriptors .* a replay table "
                       r"with a USE_TMA column; .* has neither; give tma=None$"):
        moe_opt.tune(replay=table, n_trials=2, storage="sqlite:///x.db", output_dir=None, progress=False, tma=True)
    with pytest.raises(TuneError, match="tma must be None, True or False, got 'yes'"):
        moe_opt.tune(replay=table, n_trials=2, output_dir=None, progress=False, tma="yes")

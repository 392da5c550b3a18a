"""Target engines and engine backends: the builtin kernel launched by vLLM's rules computes the same function as the
float64 reference; vLLM's default configs are the ones its source gives; engine kernels are chosen by name, and a
missing engine (here: both) is a one-line error naming the package; the target is part of a study's name.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE  # the GPU where one is present, else the CPU interpreter
from test_kernel import TOLERANCE  # the kernel tests' bounds, where their derivation is written
from test_kernel import make_case as kernel_case
from test_kernel import relative_error as kernel_relative_error

from moe_opt import ConfigError, TuneError, fused_moe
from moe_opt.kernel import fused_moe_reference
from moe_opt.kernel.align import (
    VLLM_SPARSITY_FACTOR,
    vllm_em,
    vllm_max_num_tokens_padded,
    vllm_naive_block_assignment,
    vllm_uses_naive_block_assignment,
)
from moe_opt.kernel.backend import BuiltinBackend, backend_key, get_backend
from moe_opt.kernel.engines import SGLANG_KNOWN_VERSIONS, VLLM_KNOWN_VERSIONS
from moe_opt.model.spec import ModelSpec
from moe_opt.space import Config, default_config, vllm_default_config
from moe_opt.store.identity import StudyIdentity

E, N, K = 64, 128, 256  # E large enough that M * topk * 4 <= E holds up to topk 8
SMALL = Config(16, 32, 64, 1, 4, 2)
MID = Config(32, 64, 128, 16, 4, 3)
BIG_M = Config(128, 128, 64, 32, 8, 3)


def make_case(dtype_path, M, topk, *, active_experts=E, ep_drop=False, swiglu_limit=None):
    """test_kernel's inputs with this file's E (experts >= active_experts receive no tokens; ep_drop marks some
    slots -1)."""
    return kernel_case(dtype_path, M, topk, swiglu_limit, DEVICE, active_experts=active_experts, ep_drop=ep_drop,
                       num_experts=E)


def relative_error(inputs, kwargs, config, launch):
    return kernel_relative_error(inputs, kwargs, config, launch)[0]


# (dtype path, M, topk, config, case): the tiny-batch path (M * topk * 4 <= 64) at topk 1..8, odd M, experts
# without tokens, slots on another EP rank, the clamp.
NAIVE_CASES = [
    ("fp16", 1, 1, SMALL, {}),
    ("bf16", 1, 8, BIG_M, {"swiglu_limit": 10.0}),
    ("fp16", 3, 5, MID, {"active_experts": 20}),
    ("fp8_tensor", 2, 8, SMALL, {}),
    ("fp8_block", 1, 4, BIG_M, {"ep_drop": True}),
    ("bf16", 5, 3, SMALL, {"active_experts": 8, "ep_drop": True}),
]


@pytest.mark.parametrize("dtype_path,M,topk,config,case", NAIVE_CASES)
def test_vllm_tiny_batch_path_matches_float64_reference(dtype_path, M, topk, config, case):
    assert vllm_uses_naive_block_assignment(M, topk, E, False)
    inputs, kwargs = make_case(dtype_path, M, topk, **case)
    err = relative_error(inputs, kwargs, config, "vllm")
    assert err < TOLERANCE[dtype_path], f"relative Frobenius error {err:.2e}"


# Aligned, with the grid trimmed (M < BLOCK_SIZE_M, one GEMM or both) and untrimmed.
ALIGNED_CASES = [
    ("fp16", 5, 8, BIG_M, {}),            # GEMM1 and GEMM2 trimmed (5 and 40 rows < 128)
    ("bf16", 17, 2, MID, {"active_experts": 12}),  # GEMM1 trimmed (17 < 32), GEMM2 not (34 rows)
    ("fp8_block", 33, 6, SMALL, {"ep_drop": True}),  # neither
]


@pytest.mark.parametrize("dtype_path,M,topk,config,case", ALIGNED_CASES)
def test_vllm_trimmed_grid_matches_float64_reference(dtype_path, M, topk, config, case):
    assert not vllm_uses_naive_block_assignment(M, topk, E, False)
    inputs, kwargs = make_case(dtype_path, M, topk, **case)
    err = relative_error(inputs, kwargs, config, "vllm")
    assert err < TOLERANCE[dtype_path], f"relative Frobenius error {err:.2e}"


def test_vllm_launch_gives_the_same_output_as_sglangs():
    inputs, kwargs = make_case("fp16", 2, 4, active_experts=10)
    outs = [fused_moe(*inputs, SMALL, launch=launch, **kwargs) for launch in ("sglang", "vllm")]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-3, atol=1e-3)


def test_vllm_tiny_batch_condition_is_vllms():
    """fused_experts_impl: num_tokens * top_k * SPARSITY_FACTOR (4) <= global_num_experts, not for group scales."""
    assert VLLM_SPARSITY_FACTOR == 4
    assert vllm_uses_naive_block_assignment(4, 8, 128, False)      # 128 <= 128
    assert not vllm_uses_naive_block_assignment(5, 8, 128, False)  # 160 > 128
    assert not vllm_uses_naive_block_assignment(1, 8, 8, False)    # Mixtral: never
    assert not vllm_uses_naive_block_assignment(1, 1, 256, True)   # int4/int8_w8a16 with groups: aligned


def test_vllm_block_assignment_and_grid_rows():
    ids = torch.tensor([[5, -1], [2, 7]], dtype=torch.int32)
    a = vllm_naive_block_assignment(ids, 32)
    assert a.expert_ids.tolist() == [5, -1, 2, 7] and int(a.num_tokens_post_padded) == 4 * 32
    assert vllm_em(4, 2, 64, 32, naive=True) == 128
    # numel < E: sorted_token_ids holds numel * BLOCK_SIZE_M; else numel + E * (BLOCK_SIZE_M - 1).
    assert vllm_max_num_tokens_padded(8, 64, 16) == 128 and vllm_max_num_tokens_padded(100, 64, 16) == 1060
    assert vllm_em(100, 50, 64, 64, naive=False) == min(100 + 64 * 63, 100 * 64)  # GEMM1: 50 rows < 64
    assert vllm_em(100, 100, 64, 64, naive=False) == 100 + 64 * 63  # GEMM2: 100 rows >= 64, untrimmed


def test_unknown_launch_is_a_config_error():
    inputs, kwargs = make_case("fp16", 1, 1)
    with pytest.raises(ConfigError, match="unknown launch 'trtllm'; accepted: sglang, vllm"):
        fused_moe(*inputs, SMALL, launch="trtllm", **kwargs)


@pytest.mark.parametrize("M,E_,dtype,block_shape,want", [
    # vLLM get_default_config: M <= E -> 16/32/64/1; else 64/64/32/8 (no num_warps/num_stages: Triton's 4, 3).
    (1, 8, None, None, Config(16, 32, 64, 1, 4, 3)),
    (64, 8, None, None, Config(64, 64, 32, 8, 4, 3)),
    (64, 128, None, None, Config(16, 32, 64, 1, 4, 3)),
    # per-tensor fp8 takes the generic ones in vLLM (SGLang has fp8 configs of its own).
    (1, 128, "fp8_w8a8", None, Config(16, 32, 64, 1, 4, 3)),
    (256, 128, "fp8_w8a8", None, Config(64, 64, 32, 8, 4, 3)),
    # block fp8: BLOCK_SIZE_N/K = block_shape, GROUP_SIZE_M 32, num_stages 3 (CUDA).
    (4096, 256, "fp8_w8a8", [128, 128], Config(64, 128, 128, 32, 4, 3)),
    # wna16: BLOCK_SIZE_M by M (<= 20: 16, <= 40: 32, else 64), GROUP_SIZE_M 1; N/K from
    # get_moe_wna16_block_config's Triton branch (one token: 32/64, else 64/32).
    (1, 128, "int4_w4a16", [0, 128], Config(16, 32, 64, 1, 4, 3)),
    (20, 128, "int4_w4a16", [0, 128], Config(16, 64, 32, 1, 4, 3)),
    (40, 128, "int8_w8a16", [0, 64], Config(32, 64, 32, 1, 4, 3)),
    (41, 128, "int4_w4a16", [0, 128], Config(64, 64, 32, 1, 4, 3)),
])
def test_vllm_default_config_is_vllms(M, E_, dtype, block_shape, want):
    assert vllm_default_config(M, E_, 768, 2048, 8, dtype, block_shape) == want


def test_vllm_and_sglang_defaults_differ_where_vllm_says():
    assert vllm_default_config(1, 128, 768, 2048, 8, "fp8_w8a8") != default_config(1, 128, "fp8_w8a8")


def test_builtin_backend_follows_its_target():
    spec = ModelSpec.from_shape(num_experts=128, topk=8, hidden_size=2048, intermediate_size=768, dtype="fp8_w8a8")
    assert get_backend("builtin").default_config(spec, 1) == default_config(1, 128, "fp8_w8a8")
    vllm = get_backend("builtin", target="vllm")
    assert vllm.target == "vllm" and vllm.default_config(spec, 1) == Config(16, 32, 64, 1, 4, 3)
    assert get_backend("builtin:vllm").target == "vllm" and get_backend(vllm) is vllm
    assert backend_key(vllm) == backend_key(BuiltinBackend()) == "builtin@1"  # the target is named apart


def test_unknown_kernels_and_targets_are_tune_errors():
    with pytest.raises(TuneError, match="unknown kernel 'trtllm'; accepted: builtin .*engine's own kernel: sglang, vllm"):
        get_backend("trtllm")
    with pytest.raises(TuneError, match="unknown target 'trtllm'; accepted: sglang, vllm"):
        get_backend("builtin", target="trtllm")
    with pytest.raises(TuneError, match="kernel 'vllm' times vllm's own kernel"):
        get_backend("vllm", target="sglang")


@pytest.mark.parametrize("engine,known", [("sglang", SGLANG_KNOWN_VERSIONS), ("vllm", VLLM_KNOWN_VERSIONS)])
def test_missing_engine_is_one_line_naming_the_package(engine, known):
    """Neither engine is installed here (they need CUDA): the real missing-engine path."""
    with pytest.raises(TuneError) as e:
        get_backend(engine)
    msg = str(e.value)
    assert "\n" not in msg and f"needs the {engine} package: it is not installed" in msg
    assert f"known to work: {engine} {known[0]}" in msg


def test_tune_with_a_missing_engine_or_bad_target_fails_before_anything_runs():
    import moe_opt

    spec = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=256, intermediate_size=128)
    with pytest.raises(TuneError, match="needs the vllm package"):
        moe_opt.tune(spec=spec, kernel="vllm", storage="sqlite:///:memory:", output_dir=None, progress=False)
    with pytest.raises(TuneError, match="unknown kernel 'tgi'; accepted: builtin or a KernelBackend, or an installed "
                                        "engine's own kernel: sglang, vllm"):
        moe_opt.tune(spec=spec, kernel="tgi", storage="sqlite:///:memory:", output_dir=None, progress=False)
    with pytest.raises(TuneError, match="unknown target 'tgi'"):
        moe_opt.tune(spec=spec, target="tgi", storage="sqlite:///:memory:", output_dir=None, progress=False)


def test_target_and_kernel_are_in_the_study_name_only_when_not_sglang_builtin():
    spec = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=4096, intermediate_size=14336)
    before = "moe|E=8,N=14336,K=4096,topk=2,bfloat16|NVIDIA_H200|triton=3.6.0|kernel=builtin@1|M=64"
    assert StudyIdentity(spec, "NVIDIA H200", "3.6.0", "builtin@1").name(64) == before
    assert StudyIdentity(spec, "NVIDIA H200", "3.6.0", "builtin@1", target="sglang").name(64) == before
    vllm = StudyIdentity(spec, "NVIDIA H200", "3.6.0", "builtin@1", target="vllm")
    assert vllm.name(64) == before.replace("|M=64", "|target=vllm|M=64")
    engine = StudyIdentity(spec, "NVIDIA H200", "3.6.0", "vllm@0.33.0", target="vllm")
    assert len({before, vllm.name(64), engine.name(64)}) == 3 and "kernel=vllm@0.33.0|target=vllm" in engine.name(64)
    attrs = vllm.attrs(64, device_name="NVIDIA_H200", torch_version="2", description="d", is_performance=True)
    assert attrs["target"] == "vllm"


def test_import_moe_opt_loads_no_engine_module():
    code = "import sys, moe_opt; print('moe_opt.kernel.engines' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_an_interpreter_tune_for_vllm_names_its_studies_and_starts_from_vllms_default(tmp_path):
    """E=8, topk=1, M=1: 1 * 1 * 4 <= 8, so the timed calls and the guard take vLLM's tiny-batch path."""
    import optuna

    import moe_opt

    spec = ModelSpec.from_shape(num_experts=8, topk=1, hidden_size=256, intermediate_size=128)
    storage = f"sqlite:///{tmp_path}/v.db"
    r = moe_opt.tune(spec=spec, batch_sizes=[1], n_trials=2, storage=storage, output_dir=None, progress=False,
                     target="vllm", down_config=False)
    assert 1 in r.best
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    assert len(names) == 1 and "|kernel=builtin@1|target=vllm|M=1" in names[0]
    study = optuna.load_study(study_name=names[0], storage=storage)
    assert study.user_attrs["target"] == "vllm"
    assert Config.from_dict(study.user_attrs["default_config"]) == vllm_default_config(1, 8, 128, 256, 1, None)


def test_a_tune_for_vllm_tunes_one_config_for_both_gemms_and_writes_only_vllms_file(tmp_path):
    """vLLM runs one config for both GEMMs (no _down file): no pair search, and SGLang's files are not written from
    timings of vLLM's launch rules; the summary's speedup is over vLLM's default. Asking for the pair is an error."""
    import dataclasses

    import moe_opt
    from moe_opt.view.summary import next_steps, summary_text

    spec = ModelSpec.from_shape(num_experts=8, topk=1, hidden_size=256, intermediate_size=128)
    out = tmp_path / "configs"
    r = moe_opt.tune(spec=spec, batch_sizes=[1], n_trials=2, storage=f"sqlite:///{tmp_path}/v.db", output_dir=out,
                     progress=False, target="vllm")
    assert r.target == "vllm" and r.pairs == {} and list(r.files) == ["vllm"]
    assert [p.name for p in out.rglob("*.json")] == [r.files["vllm"].name]
    # What the summary says of such a result on a GPU (the interpreter's says its times are no speedups).
    gpu = dataclasses.replace(r, is_performance=True, default_latency_us={1: 2 * r.latency_us[1]})
    assert "geometric-mean speedup over vLLM's default: 2.000x" in summary_text(gpu)
    steps = "\n".join(next_steps(gpu))
    assert "VLLM_TUNED_CONFIG_FOLDER" in steps and "SGLANG_MOE_CONFIG_DIR" not in steps
    with pytest.raises(TuneError, match="down_config=True tunes SGLang's _down file; the target 'vllm' runs one "
                                        "config for both GEMMs"):
        moe_opt.tune(spec=spec, batch_sizes=[1], n_trials=1, storage=f"sqlite:///{tmp_path}/w.db", output_dir=None,
                     progress=False, target="vllm", down_config=True)
    assert not (tmp_path / "w.db").exists()


def test_vllm_launch_of_group_quantized_int4_stays_aligned_and_matches_the_reference():
    """int4_w4a16 with groups never takes the tiny-batch path in vLLM; its trimmed grid still computes every slot."""
    from moe_opt.kernel import quantize_weights

    M, topk = 1, 2  # 1 * 2 * 4 <= 64, but group scales keep the alignment
    x = torch.randn(M, K, dtype=torch.bfloat16)
    w1, s1, _z1 = quantize_weights(torch.randn(E, 2 * N, K) / K ** 0.5, "int4_w4a16", group_size=128)
    w2, s2, _z2 = quantize_weights(torch.randn(E, K, N) / N ** 0.5, "int4_w4a16", group_size=128)
    topk_weights, topk_ids = torch.rand(M, E).softmax(-1).topk(topk)
    kwargs = {"quant_dtype": "int4_w4a16", "block_shape": [0, 128], "w1_scale": s1, "w2_scale": s2}
    kwargs.update(w1_scale=s1.to(DEVICE), w2_scale=s2.to(DEVICE))
    inputs = tuple(t.to(DEVICE) for t in (x, w1, w2, topk_weights, topk_ids.to(torch.int32)))
    assert relative_error(inputs, kwargs, Config(16, 32, 64, 1, 4, 2), "vllm") < TOLERANCE["bf16"]


# --- The engine-kernel mode: an engine's own files loaded from a folder (kernel/engine_source.py) -------------------
# No engine code is checked in: the loader is tested on a toy engine written here; the real SGLang/vLLM folders
# (benchmarks/carry_engines.py builds .engines/ from their wheels) are tested where present.

TOY_KERNEL = '''
import triton
import triton.language as tl

from toyeng.utils import is_cuda, register_op
from toyeng.ops import never_called

_IS_CUDA = is_cuda()
register_op("toy")


@triton.jit
def _double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2, mask=mask)


def launch(x, y):
    _double_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))


def default(M):
    return {"is_cuda": _IS_CUDA, "M": M}
'''


def toy_layout(**changes):
    from dataclasses import replace

    from moe_opt.kernel.engine_source import EngineLayout, Replacement, not_carried

    layout = EngineLayout(
        engine="toyeng", files=("toyeng.kernels.toy",),
        replaced=(Replacement("toyeng.utils", {"is_cuda": lambda: True, "register_op": lambda name: None},
                              "probe, registration"),
                  Replacement("toyeng.ops", {"never_called": not_carried("never_called")}, "not used")),
        launch="toyeng.kernels.toy:launch", default_config="toyeng.kernels.toy:default", configs_dir="toyeng/configs")
    return replace(layout, **changes)


def toy_source(tmp_path, kernel=TOY_KERNEL, version="1.2.3"):
    root = tmp_path / "src"
    (root / "toyeng/kernels").mkdir(parents=True)
    # Package __init__ files that must never run (an engine's import the serving stack).
    (root / "toyeng/__init__.py").write_text("raise RuntimeError('toyeng/__init__.py ran')\n")
    (root / "toyeng/kernels/__init__.py").write_text("raise RuntimeError('toyeng/kernels/__init__.py ran')\n")
    (root / "toyeng/kernels/toy.py").write_text(kernel)
    if version:
        (root / f"toyeng-{version}.dist-info").mkdir()
    return root


@pytest.fixture
def clean_toy():
    yield
    for m in [m for m in sys.modules if m == "toyeng" or m.startswith("toyeng.")]:
        del sys.modules[m]


def test_engine_source_loads_the_real_file_with_declared_replacements_and_runs_its_triton_kernel(tmp_path, clean_toy):
    from moe_opt.kernel.engine_source import load_source

    root = toy_source(tmp_path)
    src = load_source(toy_layout(), root)
    assert src.version == "1.2.3" and src.loaded == ["toyeng/kernels/toy.py"]
    assert src.launch.__module__ == "toyeng.kernels.toy" and src.default_config(4) == {"is_cuda": True, "M": 4}
    assert sys.modules["toyeng.kernels.toy"].__file__ == str(root / "toyeng/kernels/toy.py")
    x = torch.arange(5, dtype=torch.float32, device=DEVICE)
    y = torch.full_like(x, float("nan"))
    src.launch(x, y)  # Triton compiles (here: interprets) the loaded file's own kernel
    assert y.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]
    record = src.record()
    assert record["packages_not_initialized"] == ["toyeng", "toyeng.kernels"]
    assert record["replaced_imports"]["toyeng.utils"] == {"names": ["is_cuda", "register_op"],
                                                          "why": "probe, registration"}
    with pytest.raises(RuntimeError, match="never_called is not carried"):
        sys.modules["toyeng.ops"].never_called()


def test_engine_source_refuses_an_import_it_does_not_declare_and_leaves_nothing_behind(tmp_path, clean_toy):
    from moe_opt.kernel.engine_source import load_source

    kernel = TOY_KERNEL.replace("from toyeng.ops import never_called", "from toyeng.serving import scheduler")
    with pytest.raises(ImportError, match="toyeng.serving is imported by the toyeng kernel files but neither "
                                          "carried nor replaced"):
        load_source(toy_layout(), toy_source(tmp_path, kernel))
    assert not [m for m in sys.modules if m.startswith("toyeng")]


def test_a_replaced_module_gives_only_the_names_declared(tmp_path, clean_toy):
    from moe_opt.kernel.engine_source import load_source

    kernel = TOY_KERNEL.replace("import is_cuda, register_op", "import is_cuda, register_op, is_rocm")
    with pytest.raises(ImportError, match="cannot import name 'is_rocm' from 'toyeng.utils'"):
        load_source(toy_layout(), toy_source(tmp_path, kernel))


def test_engine_source_errors_name_what_is_missing(tmp_path, clean_toy):
    from moe_opt.kernel.engine_source import load_source

    with pytest.raises(ImportError, match="has no toyeng/ folder"):
        load_source(toy_layout(), tmp_path)
    with pytest.raises(ImportError, match="exactly one toyeng-<version>.dist-info"):
        load_source(toy_layout(), toy_source(tmp_path, version=None))
    layout = toy_layout(files=("toyeng.kernels.toy", "toyeng.kernels.gone"),
                        launch="toyeng.kernels.gone:launch")
    with pytest.raises(ImportError, match=r"gone.py is missing .*carry_engines.py"):
        load_source(layout, toy_source(tmp_path / "again"))


def test_placeholders_raise_when_called_and_still_work_in_annotations():
    from moe_opt.kernel.engine_source import not_carried

    cls = not_carried("FusedMoEQuantConfig")
    assert (cls | None) is not None and cls.SILU.value is not None  # vLLM's signatures evaluate both at import
    with pytest.raises(RuntimeError, match=r"FusedMoEQuantConfig.SILU is not carried"):
        cls.SILU()


def test_engine_kernel_refs_that_cannot_load_are_one_line_tune_errors(tmp_path):
    with pytest.raises(TuneError, match=r"kernel 'sglang-kernel=.*': .* has no sglang/ folder"):
        get_backend(f"sglang-kernel={tmp_path}")
    with pytest.raises(TuneError, match="unknown kernel 'trt-kernel=x'; an engine's kernel files are named"):
        get_backend("trt-kernel=x")


def test_fused_moe_launches_its_gemms_through_invoke():
    """The seam the engine kernels use: the same call through a recording invoke gives the same output."""
    from moe_opt.kernel.gemm import invoke_fused_moe_kernel

    calls = []

    def invoke(*args, **kwargs):
        calls.append(kwargs["mul_routed_weight"])
        invoke_fused_moe_kernel(*args, **kwargs)

    inputs, kwargs = make_case("fp16", 3, 2)
    want = fused_moe(*inputs, SMALL, launch="vllm", **kwargs)
    got = fused_moe(*inputs, SMALL, launch="vllm", invoke=invoke, **kwargs)
    assert calls == [False, True] and torch.equal(want, got)


ENGINE_SOURCES = Path(__file__).resolve().parent.parent / ".engines"


@pytest.fixture
def engine_backend():
    """get_backend for ENGINE-kernel=.engines/ENGINE (skipped where .engines/ is not built); the engine's modules it
    put in sys.modules are removed afterwards, so later tests that look for an installed engine do not find them."""
    before = set(sys.modules)

    def load(engine: str):
        if not (ENGINE_SOURCES / engine).is_dir():
            pytest.skip(f"no {ENGINE_SOURCES / engine} (benchmarks/carry_engines.py builds it from the wheel)")
        return get_backend(f"{engine}-kernel={ENGINE_SOURCES / engine}")

    yield load
    for m in set(sys.modules) - before:
        if m.split(".")[0] in ("sglang", "vllm"):
            del sys.modules[m]


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
@pytest.mark.parametrize("dtype_path,M,topk", [("fp16", 5, 2), ("fp16", 1, 4), ("fp8_block", 40, 4)])
def test_the_engines_own_kernels_in_moe_opts_pipeline_match_the_float64_reference(engine, dtype_path, M, topk,
                                                                                   engine_backend):
    """With .engines/ built from the real wheels: SGLang's invoke_fused_moe_kernel and vLLM's
    invoke_fused_moe_triton_kernel (its tiny-batch path at M=1: 1 * 4 * 4 <= 64) on the interpreter."""
    from moe_opt.kernel.engine_kernels import EngineKernelBackend, sglang_invoke, vllm_invoke

    backend = engine_backend(engine)
    assert isinstance(backend, EngineKernelBackend) and backend.name == f"{engine}-kernel"
    assert backend_key(backend).startswith(f"{engine}-kernel@") and backend.target == engine
    inputs, kwargs = make_case(dtype_path, M, topk)
    x, _, _, topk_weights, topk_ids = inputs
    launch = backend.source.launch
    invoke = sglang_invoke(launch, topk_weights, topk_ids) if engine == "sglang" else vllm_invoke(launch, topk_weights)
    out = torch.full((M, K), float("nan"), dtype=x.dtype, device=x.device)
    fused_moe(*inputs, MID, out=out, launch=engine, invoke=invoke, **kwargs)
    ref = fused_moe_reference(*inputs, **kwargs)
    assert not out.isnan().any()
    err = ((out.double().cpu() - ref.cpu()).norm() / ref.norm()).item()  # the float64 reference is on the CPU
    assert err < TOLERANCE[dtype_path], f"relative Frobenius error {err:.2e}"


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_an_engine_kernel_offers_no_tma_configs(engine, engine_backend):
    """The engine's GEMM is launched without TMA here (fused_moe refuses USE_TMA with invoke=): an H200 tune of
    SGLang's kernel had proposed USE_TMA configs, each a wasted failed trial."""
    from moe_opt import space

    backend = engine_backend(engine)
    spec = ModelSpec.from_shape(num_experts=256, topk=6, hidden_size=4096, intermediate_size=256, dtype="fp8_w8a8",
                                block_shape=[128, 128])
    assert space.TMA_NAME not in backend.choices(spec, tma=True)
    assert not any(c.USE_TMA for c in backend.candidates(spec, 232_448, tma=True))
    tma = Config(16, 64, 128, 1, 4, 3, USE_TMA=True)
    assert backend.screen(spec, tma, 232_448) == f"Rejected: USE_TMA: kernel {engine}-kernel for {engine} has no TMA path"


def test_tune_takes_an_engine_kernel_folder_and_names_a_missing_one_in_one_line(tmp_path, monkeypatch):
    import moe_opt
    from moe_opt.errors import TuneError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(TuneError) as err:
        moe_opt.tune(spec=moe_opt.ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=64, intermediate_size=64),
                     kernel=f"sglang-kernel={tmp_path / 'missing'}", output_dir=None, progress=False)
    assert "missing" in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())  # refused before any storage or file was made
    with pytest.raises(TuneError, match="unknown kernel 'mxnet-kernel=x'"):
        moe_opt.tune(spec=moe_opt.ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=64, intermediate_size=64),
                     kernel="mxnet-kernel=x", output_dir=None, progress=False)

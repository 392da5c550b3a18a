"""The fused-MoE kernel computes the same function as a float64 reference, on every dtype path.

Runs on the GPU where one is present, else through Triton's interpreter (conftest.py). Inputs are fresh random
draws for every case (a failing case's output names its seed); outputs are poisoned with NaN before each run, so
an unwritten element fails.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from moe_opt import ConfigError, fused_moe
from moe_opt.kernel import fused_moe_reference, quantize_weight_fp8
from moe_opt.kernel.align import moe_align_block_size
from moe_opt.kernel.reference import swiglu_reference

pytestmark = pytest.mark.cuda

# Relative Frobenius error bounds. fp16/bf16: outputs and intermediates rounded to 11 / 8 mantissa bits;
# measured worst 3.4e-4 / 2.7e-3 over the full matrix on an H200 (Triton 3.6), the same on the interpreter.
# fp8: the reference quantizes activations like the kernel, but a GEMM1 value that lands on the other side of a
# bf16 or fp8 rounding boundary moves a whole fp8 step (6-12%); for one or three tokens a handful of such flips
# is the whole error. Measured on the H200: median 2.6e-3 (per tensor) and 6.4e-3 (block), worst 3.2e-2 and
# 2.9e-2 at M = 1..3; on the interpreter ~2.5e-3. A wrong scale or index gives errors of order 1.
TOLERANCE = {"fp16": 2e-3, "bf16": 1e-2, "fp8_tensor": 6e-2, "fp8_block": 6e-2}
# The median over the full GPU matrix must stay far below the per-case bound.
MEDIAN_TOLERANCE = {"fp16": 1e-3, "bf16": 5e-3, "fp8_tensor": 1e-2, "fp8_block": 1e-2}

CFG_SMALL = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=4, num_stages=2)
CFG_MID = dict(BLOCK_SIZE_M=32, BLOCK_SIZE_N=64, BLOCK_SIZE_K=128, GROUP_SIZE_M=16, num_warps=4, num_stages=3)
# BLOCK_SIZE_M larger than any expert's tokens in every case below.
CFG_BIG_M = dict(BLOCK_SIZE_M=128, BLOCK_SIZE_N=128, BLOCK_SIZE_K=64, GROUP_SIZE_M=32, num_warps=8, num_stages=3)
CONFIGS = {"small": CFG_SMALL, "mid": CFG_MID, "big_m": CFG_BIG_M}

E, N, K = 16, 128, 256
SWIGLU_LIMIT = 10.0


def make_case(dtype_path: str, M: int, topk: int, swiglu_limit: float | None, device: str, *,
              active_experts: int = 12, ep_drop: bool = False, seed: int | None = None, num_experts: int = E):
    """Random inputs for one case of ``num_experts`` experts; experts >= active_experts receive no tokens."""
    E = num_experts
    seed = seed if seed is not None else torch.seed() % 2**31
    print(f"make_case({dtype_path!r}, M={M}, topk={topk}, ..., seed={seed})")  # pytest shows it when a case fails
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen)
    w1 = torch.randn(E, 2 * N, K, generator=gen) / K ** 0.5
    w2 = torch.randn(E, K, N, generator=gen) / N ** 0.5
    if swiglu_limit is not None:
        x = x * 8  # gate/up reach well past the limit, so the clamp fires
    logits = torch.randn(M, E, generator=gen)
    logits[:, active_experts:] = -float("inf")
    topk_weights, topk_ids = logits.softmax(-1).topk(topk)
    topk_ids = topk_ids.to(torch.int32)
    if ep_drop:
        # About 30% of slots go to another rank, but never all of them: a case whose every slot is dropped has an
        # all-zero reference, so its relative error is 0/0 (that case has its own test). Where there are two or
        # more slots, at least one is dropped, so the case tests what it names.
        dropped = torch.rand(M, topk, generator=gen) < 0.3
        dropped.view(-1)[-1] = False
        if M * topk > 1:
            dropped.view(-1)[0] = True
        topk_ids[dropped] = -1
    kwargs: dict = {"swiglu_limit": swiglu_limit}
    if dtype_path in ("fp16", "bf16"):
        dtype = torch.float16 if dtype_path == "fp16" else torch.bfloat16
        w1, w2 = w1.to(dtype), w2.to(dtype)
    else:
        dtype = torch.bfloat16
        block_shape = [128, 128] if dtype_path == "fp8_block" else None
        w1, s1 = quantize_weight_fp8(w1, block_shape)
        w2, s2 = quantize_weight_fp8(w2, block_shape)
        kwargs.update(block_shape=block_shape, w1_scale=s1.to(device), w2_scale=s2.to(device))
    x = x.to(dtype)
    return (x.to(device), w1.to(device), w2.to(device), topk_weights.to(device), topk_ids.to(device)), kwargs


def relative_error(inputs, kwargs, config, launch: str = "sglang"):
    """(relative Frobenius error, reference) of fused_moe under the ``launch`` rules; fails if any output element
    was left unwritten (NaN)."""
    x = inputs[0]
    out = torch.full((x.shape[0], K), float("nan"), dtype=x.dtype, device=x.device)
    fused_moe(*inputs, config, out=out, launch=launch, **kwargs)
    ref = fused_moe_reference(*inputs, **kwargs)
    got = out.double().cpu()
    assert not got.isnan().any(), "some output elements were never written"
    return ((got - ref).norm() / ref.norm()).item(), ref


def check(dtype_path, inputs, kwargs, config):
    err, ref = relative_error(inputs, kwargs, config)
    assert err < TOLERANCE[dtype_path], f"relative Frobenius error {err:.2e} >= {TOLERANCE[dtype_path]}"
    return ref


# Covering set: every M, every topk, both activations and every config appear with every dtype path.
CASES = [  # (M, topk, swiglu_limit, config)
    (1, 1, None, "small"),
    (1, 8, SWIGLU_LIMIT, "big_m"),
    (3, 2, SWIGLU_LIMIT, "small"),
    (3, 6, None, "big_m"),
    (17, 6, SWIGLU_LIMIT, "mid"),
    (17, 1, None, "big_m"),
    (64, 8, None, "mid"),
    (64, 2, SWIGLU_LIMIT, "small"),
]


@pytest.mark.parametrize("dtype_path", list(TOLERANCE))
@pytest.mark.parametrize("M,topk,swiglu_limit,config", CASES)
def test_matches_float64_reference(dtype_path, M, topk, swiglu_limit, config, device):
    inputs, kwargs = make_case(dtype_path, M, topk, swiglu_limit, device)
    check(dtype_path, inputs, kwargs, CONFIGS[config])


@pytest.mark.gpu_only
@pytest.mark.parametrize("dtype_path", list(TOLERANCE))
def test_full_matrix_on_gpu(dtype_path, device):
    """Every combination of M, topk, limit and config (too slow for the interpreter; the CASES cover it there)."""
    errors = {}
    for M, topk, limit, config in itertools.product((1, 3, 17, 64), (1, 2, 6, 8), (None, SWIGLU_LIMIT), CONFIGS):
        inputs, kwargs = make_case(dtype_path, M, topk, limit, device)
        errors[(M, topk, limit, config)] = relative_error(inputs, kwargs, CONFIGS[config])[0]
    worst = max(errors, key=errors.get)
    median = sorted(errors.values())[len(errors) // 2]
    print(f"{dtype_path}: median error {median:.2e}, worst {errors[worst]:.2e} at (M, topk, swiglu_limit, "
          f"config) = {worst}")
    assert errors[worst] < TOLERANCE[dtype_path], f"error {errors[worst]:.2e} at {worst}"
    assert median < MEDIAN_TOLERANCE[dtype_path]


def test_swiglu_limit_fires_and_changes_the_result(device):
    """The scaled inputs push gate and up past the limit, and the kernel follows the clamped formula."""
    inputs, kwargs = make_case("bf16", 17, 2, SWIGLU_LIMIT, device)
    x, w1 = inputs[0].double().cpu(), inputs[1].double().cpu()
    h = x @ w1[0].T
    assert (h[:, :N] > SWIGLU_LIMIT).any() and (h[:, N:].abs() > SWIGLU_LIMIT).any()
    clamped = check("bf16", inputs, kwargs, CFG_SMALL)
    unclamped = fused_moe_reference(*inputs, swiglu_limit=None)
    assert ((clamped - unclamped).norm() / unclamped.norm()).item() > 0.1


def test_swiglu_formula_clamps_gate_from_above_only():
    h = torch.tensor([[20.0, -20.0, 30.0, -30.0]], dtype=torch.float64)
    got = swiglu_reference(h, 10.0)
    silu = torch.nn.functional.silu
    want = torch.tensor([[silu(torch.tensor(10.0)) * 10.0, silu(torch.tensor(-20.0)) * -10.0]], dtype=torch.float64)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype_path", ["bf16", "fp8_block"])
def test_expert_parallel_minus_one_ids_contribute_zero(dtype_path, device):
    inputs, kwargs = make_case(dtype_path, 17, 6, None, device, ep_drop=True)
    assert (inputs[4] == -1).any()
    check(dtype_path, inputs, kwargs, CFG_SMALL)
    # A token routed only to other ranks gets exactly zero.
    x, w1, w2, tw, ids = inputs
    ids = ids.clone()
    ids[0] = -1
    out = torch.full((x.shape[0], K), float("nan"), dtype=x.dtype, device=x.device)
    fused_moe(x, w1, w2, tw, ids, CFG_SMALL, out=out, **kwargs)
    assert out[0].eq(0).all()


def test_expert_parallel_cases_drop_some_slots_and_keep_some():
    """Every ep_drop case, however small, has a slot on this rank (else its reference is all zero and the relative
    error 0/0) and, where it has two slots or more, one on another rank. CI once drew all four slots of M = 1,
    topk 4 as dropped (probability 0.3 ** 4) and failed with an error of NaN."""
    for seed, (M, topk) in itertools.product(range(200), [(1, 1), (1, 2), (1, 4), (2, 8), (17, 6)]):
        ids = make_case("fp16", M, topk, None, "cpu", ep_drop=True, seed=seed)[0][4]
        assert (ids >= 0).any(), (seed, M, topk)
        assert (ids == -1).any() or M * topk == 1, (seed, M, topk)


@pytest.mark.parametrize("launch", ["sglang", "vllm"])
def test_weights_of_some_experts_aligned_as_all_of_them_compute_the_same_function(launch, device):
    """global_num_experts (a compile worker's few-expert weights, expert parallelism): the alignment counts the whole
    shape's experts and vLLM's tiny-batch rule compares with them (at M=3, topk 2: 24 <= 256, the naive path, where
    16 experts alone take the alignment), and the result is the same function of the experts the weights hold."""
    inputs, kwargs = make_case("fp8_block", 3, 2, None, device)
    ref = fused_moe_reference(*inputs, **kwargs)
    x = inputs[0]
    for count in (None, 256):
        out = torch.full((x.shape[0], K), float("nan"), dtype=x.dtype, device=x.device)
        fused_moe(*inputs, CFG_SMALL, out=out, launch=launch, global_num_experts=count, **kwargs)
        got = out.double().cpu()
        assert not got.isnan().any()
        assert ((got - ref).norm() / ref.norm()).item() < TOLERANCE["fp8_block"]
    with pytest.raises(ConfigError, match="global_num_experts must be an integer >= w1's 16 experts, got 8"):
        fused_moe(*inputs, CFG_SMALL, global_num_experts=8, **kwargs)


def test_align_groups_every_slot_once_in_padded_expert_blocks(device):
    ids = torch.tensor([[3, 0], [3, 1], [0, -1], [3, 3]], dtype=torch.int32, device=device)
    block_m = 16
    sorted_ids, expert_ids, num_post = moe_align_block_size(ids, block_m, num_experts=4)
    sorted_ids, expert_ids, num_post = sorted_ids.cpu(), expert_ids.cpu(), int(num_post.cpu())
    used = sorted_ids[:num_post]
    sentinel = ids.numel()
    assert sorted(used[used < sentinel].tolist()) == list(range(ids.numel()))
    assert num_post % block_m == 0 and num_post == 4 * block_m  # experts 0, 1, 3 and the -1 bucket
    flat = ids.flatten().cpu()
    for b in range(num_post // block_m):
        slots = used[b * block_m:(b + 1) * block_m]
        slots = slots[slots < sentinel]
        assert (flat[slots.long()] == expert_ids[b]).all()
    assert (expert_ids[num_post // block_m:] == -1).all()


def test_bad_inputs_give_one_line_errors(device):
    inputs, kwargs = make_case("fp8_block", 3, 2, None, device)
    bad_k = dict(CFG_SMALL, BLOCK_SIZE_K=256)
    with pytest.raises(ConfigError, match="BLOCK_SIZE_K 256 must divide block_k 128"):
        fused_moe(*inputs, bad_k, **kwargs)
    x, w1, w2, tw, ids = inputs
    with pytest.raises(ConfigError, match="shape mismatch"):
        fused_moe(x[:, :128], w1, w2, tw, ids, CFG_SMALL, **kwargs)
    with pytest.raises(ConfigError, match="fp8 weights need w1_scale and w2_scale"):
        fused_moe(x, w1, w2, tw, ids, CFG_SMALL, block_shape=[128, 128])
    with pytest.raises(ValueError, match="lacks GROUP_SIZE_M"):
        fused_moe(x, w1, w2, tw, ids, {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64}, **kwargs)


def test_config_values_are_checked_with_one_line_messages():
    from moe_opt import Config

    with pytest.raises(ValueError, match=r"Config.BLOCK_SIZE_N must be a power of two >= 16 \(tl.dot needs it\), got 48"):
        Config(16, 48, 64, 1)
    with pytest.raises(ValueError, match="Config.num_warps must be a positive integer, got 0"):
        Config(16, 32, 64, 1, 0, 3)

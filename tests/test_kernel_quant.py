"""The quantized fused-MoE paths (fp8/int8 w8a8 per channel, int8 w8a8 per tensor, int8_w8a16, int4_w4a16)
compute the same function as the float64 reference, which dequantizes the packed weights itself.

Same method and matrix as test_kernel.py: fresh random inputs for every case, outputs poisoned with NaN before
each run, relative Frobenius error; M = 1, 3, 17, 64, topk 1..8, experts with no tokens, with and without
swiglu_limit. A covering subset runs on the interpreter; the whole matrix of every path on the GPU.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import pytest
import torch
from test_kernel import CONFIGS, SWIGLU_LIMIT, K, make_case, relative_error

from moe_opt import ConfigError, fused_moe
from moe_opt.kernel import dequantize_weight, fused_moe_reference, pack_int4, quantize_weights, unpack_int4
from moe_opt.space import block_size_k_choices, operand_bytes

pytestmark = pytest.mark.cuda


class Path(NamedTuple):
    quant_dtype: str
    per_channel_quant: bool = False
    group_size: int | None = None  # block_shape [0, group_size]: GPTQ/AWQ weights
    zero_point: bool = False
    x_dtype: str = "bf16"
    trailing_one: bool = False  # per-channel scales as SGLang's compressed-tensors checkpoints store them, (E, rows, 1)


PATHS = {
    "fp8_channel": Path("fp8_w8a8", per_channel_quant=True),
    "int8_channel": Path("int8_w8a8", per_channel_quant=True, trailing_one=True),
    "int8_tensor": Path("int8_w8a8"),
    "int8_w8a16": Path("int8_w8a16", trailing_one=True),
    "int8_w8a16_fp16": Path("int8_w8a16", x_dtype="fp16"),
    "uint8_g128": Path("int8_w8a16", group_size=128),
    "uint8_g64_zp": Path("int8_w8a16", group_size=64, zero_point=True),
    **{f"int4_g{g}{'_zp' if zp else ''}": Path("int4_w4a16", group_size=g, zero_point=zp)
       for g in (32, 64, 128) for zp in (False, True)},
    "int4_g128_zp_fp16": Path("int4_w4a16", group_size=128, zero_point=True, x_dtype="fp16"),
}

# Relative Frobenius error bounds, per family of paths.
# w*a16 (int8_w8a16, uint8 and int4 groups): the reference dequantizes the same integers and scales in float64;
# a group weight (q - zp) * scale has at most 8 + 11 significant bits, exact in float32, so the kernel and the
# reference round it to the same bf16/fp16 value before the dot. What is left is test_kernel.py's bf16/fp16
# error (output and intermediates rounded to 8 / 11 mantissa bits), and its bounds: 1e-2 / 2e-3.
# fp8 per channel: test_kernel.py's fp8 argument and bounds (a GEMM1 value on the other side of a bf16 or fp8
# rounding boundary moves a whole fp8 step of 6-12%; for one or three tokens a few such flips are the error).
# int8 w8a8: the reference quantizes activations like the kernel, so most elements round alike. But when a
# token's largest GEMM1 value lands on the other side of a bf16 rounding boundary, its scale moves by ~0.4% and
# all of the token's elements are re-rounded: the difference is then the int8 quantization noise of that token,
# ~1e-2 (max|token| / 127 steps); at M = 1 that token is the whole output. 3e-2 leaves twice that. The median
# over the GPU matrix must stay near the bf16 floor (5e-3): quantizing per tensor instead of per token, or not
# emulating the activation quantization at all, gives medians of ~1e-2 and more.
# Measured on the interpreter (8 CASES per path, M = 1..64): w*a16 median 2.3e-3, worst 2.6e-3 (bf16) and
# 3.0e-4 / 3.1e-4 (fp16); fp8 per channel 2.4e-3 / 7.4e-3; int8 per channel 2.8e-3 / 5.4e-3 and per tensor
# 3.0e-3 / 6.7e-3; 48 more draws at M = 1..17: int8 per channel worst 1.5e-2, per tensor 5.9e-3, fp8 2.7e-3.
# A wrong nibble order gives 1.5, ignored zero points 0.47, channel scales off by one channel 0.31.
FAMILY_TOLERANCE = {"bf16": 1e-2, "fp16": 2e-3, "fp8": 6e-2, "int8": 3e-2}
FAMILY_MEDIAN_TOLERANCE = {"bf16": 5e-3, "fp16": 1e-3, "fp8": 1e-2, "int8": 5e-3}


def family(path: str) -> str:
    p = PATHS[path]
    if p.quant_dtype == "fp8_w8a8":
        return "fp8"
    if p.quant_dtype == "int8_w8a8":
        return "int8"
    return p.x_dtype


def config_for(path: str, name: str) -> dict:
    """The named config of test_kernel.py, BLOCK_SIZE_K capped at the group size (SGLang's rule: it divides it)."""
    config = dict(CONFIGS[name])
    g = PATHS[path].group_size
    if g is not None:
        config["BLOCK_SIZE_K"] = min(config["BLOCK_SIZE_K"], g)
    return config


def make_quant_case(path: str, M: int, topk: int, swiglu_limit: float | None, device: str, **kwargs):
    """test_kernel.py's random case with its weights quantized to the path's format."""
    p = PATHS[path]
    (x, w1, w2, tw, ids), call = make_case(p.x_dtype, M, topk, swiglu_limit, device, **kwargs)
    quantized = []
    for w in (w1, w2):
        q, s, z = quantize_weights(w.float(), p.quant_dtype, per_channel_quant=p.per_channel_quant,
                                   group_size=p.group_size, zero_point=p.zero_point, scale_dtype=x.dtype)
        quantized.append((q, s.unsqueeze(-1) if p.trailing_one else s, z))
    (q1, s1, z1), (q2, s2, z2) = quantized
    call.update(quant_dtype=p.quant_dtype, per_channel_quant=p.per_channel_quant, w1_scale=s1, w2_scale=s2,
                w1_zp=z1, w2_zp=z2, block_shape=None if p.group_size is None else [0, p.group_size])
    return (x, q1, q2, tw, ids), call


def check(path, inputs, kwargs, config):
    err, ref = relative_error(inputs, kwargs, config)
    bound = FAMILY_TOLERANCE[family(path)]
    assert err < bound, f"{path}: relative Frobenius error {err:.2e} >= {bound}"
    return ref


# Covering subset for the interpreter: every path, each of M = 1, 3, 17, topk 1, 2, 6, 8, both activations, every
# config and every group size with and without zero points. (M = 64 is slow there; the GPU matrix has it.)
CPU_CASES = [  # (path, M, topk, swiglu_limit, config)
    ("fp8_channel", 17, 6, SWIGLU_LIMIT, "mid"),
    ("fp8_channel", 3, 6, None, "big_m"),
    ("int8_channel", 3, 2, SWIGLU_LIMIT, "small"),
    ("int8_channel", 17, 1, None, "big_m"),
    ("int8_tensor", 1, 8, SWIGLU_LIMIT, "big_m"),
    ("int8_tensor", 3, 6, None, "big_m"),
    ("int8_w8a16", 17, 6, SWIGLU_LIMIT, "mid"),
    ("int8_w8a16", 1, 1, None, "small"),
    ("int8_w8a16_fp16", 3, 2, SWIGLU_LIMIT, "small"),
    ("uint8_g128", 17, 6, SWIGLU_LIMIT, "mid"),
    ("uint8_g64_zp", 3, 6, None, "big_m"),
    ("int4_g32", 3, 2, SWIGLU_LIMIT, "small"),
    ("int4_g32_zp", 17, 1, None, "big_m"),
    ("int4_g64", 1, 8, SWIGLU_LIMIT, "big_m"),
    ("int4_g64_zp", 17, 6, SWIGLU_LIMIT, "mid"),
    ("int4_g128", 3, 6, None, "big_m"),
    ("int4_g128_zp", 3, 2, SWIGLU_LIMIT, "small"),
    ("int4_g128_zp_fp16", 17, 6, None, "mid"),
]


@pytest.mark.parametrize("path,M,topk,swiglu_limit,config", CPU_CASES)
def test_quantized_paths_match_float64_reference(path, M, topk, swiglu_limit, config, device):
    inputs, kwargs = make_quant_case(path, M, topk, swiglu_limit, device)
    check(path, inputs, kwargs, config_for(path, config))


@pytest.mark.gpu_only
@pytest.mark.parametrize("path", list(PATHS))
def test_full_matrix_on_gpu(path, device):
    """Every combination of M, topk, limit and config for every path (too slow for the interpreter)."""
    errors = {}
    for M, topk, limit, config in itertools.product((1, 3, 17, 64), (1, 2, 6, 8), (None, SWIGLU_LIMIT), CONFIGS):
        inputs, kwargs = make_quant_case(path, M, topk, limit, device)
        errors[(M, topk, limit, config)] = relative_error(inputs, kwargs, config_for(path, config))[0]
    worst = max(errors, key=errors.get)
    median = sorted(errors.values())[len(errors) // 2]
    print(f"{path}: median error {median:.2e}, worst {errors[worst]:.2e} at (M, topk, swiglu_limit, config) = {worst}")
    assert errors[worst] < FAMILY_TOLERANCE[family(path)], f"error {errors[worst]:.2e} at {worst}"
    assert median < FAMILY_MEDIAN_TOLERANCE[family(path)]


@pytest.mark.parametrize("path", ["int8_channel", "int4_g64_zp"])
def test_expert_parallel_minus_one_ids_contribute_zero(path, device):
    inputs, kwargs = make_quant_case(path, 17, 2, None, device, ep_drop=True)
    assert (inputs[4] == -1).any()
    check(path, inputs, kwargs, config_for(path, "small"))
    x, w1, w2, tw, ids = inputs
    ids = ids.clone()
    ids[0] = -1
    out = torch.full((x.shape[0], K), float("nan"), dtype=x.dtype, device=x.device)
    fused_moe(x, w1, w2, tw, ids, config_for(path, "small"), out=out, **kwargs)
    assert out[0].eq(0).all()


def test_int8_per_tensor_takes_static_activation_scales_and_clips_like_the_reference(device):
    """Static a1_scale/a2_scale, chosen small enough that some activations clip at +-127 on both sides."""
    inputs, kwargs = make_quant_case("int8_tensor", 3, 2, SWIGLU_LIMIT, device)
    x = inputs[0]
    kwargs.update(a1_scale=(x.abs().amax().float() * 0.8 / 127).reshape(1),
                  a2_scale=torch.tensor([0.05], device=device))
    ref = check("int8_tensor", inputs, kwargs, config_for("int8_tensor", "small"))
    dynamic = fused_moe_reference(*inputs, **dict(kwargs, a1_scale=None, a2_scale=None))
    assert ((ref - dynamic).norm() / dynamic.norm()).item() > 1e-3  # the static scales were used


def test_int4_packing_round_trips_in_sglangs_nibble_order():
    # SGLang's fused_moe_kernel_gptq_awq reads weight k of byte k // 2 at shift (k % 2) * 4: even k low.
    assert pack_int4(torch.tensor([[1, 2, 3, 4]])).tolist() == [[0x21, 0x43]]
    assert pack_int4(torch.tensor([[1], [2]]), dim=0).tolist() == [[0x21]]
    q = torch.randint(0, 16, (3, 8, 6), dtype=torch.uint8)
    for dim in (-1, 1):
        packed = pack_int4(q, dim)
        assert packed.dtype == torch.uint8 and packed.shape[dim] == q.shape[dim] // 2
        assert torch.equal(unpack_int4(packed, dim), q)
    all_bytes = torch.arange(256, dtype=torch.uint8).reshape(1, 256)
    assert torch.equal(pack_int4(unpack_int4(all_bytes)), all_bytes)


@pytest.mark.parametrize("path", [p for p in PATHS if not p.endswith("fp16")])
def test_quantizers_store_sglangs_layouts_and_dequantize_within_half_a_step(path):
    p = PATHS[path]
    w = torch.randn(2, 64, 256)
    q, s, z = quantize_weights(w, p.quant_dtype, per_channel_quant=p.per_channel_quant, group_size=p.group_size,
                               zero_point=p.zero_point)
    g = p.group_size
    want = {"fp8_w8a8": ((2, 64, 256), torch.float8_e4m3fn), "int8_w8a8": ((2, 64, 256), torch.int8),
            "int8_w8a16": ((2, 64, 256), torch.uint8 if g else torch.int8),
            "int4_w4a16": ((2, 64, 128), torch.uint8)}[p.quant_dtype]
    assert (tuple(q.shape), q.dtype) == want
    if g is None:
        assert tuple(s.shape) == ((2, 64) if p.per_channel_quant or p.quant_dtype == "int8_w8a16" else (2,))
    else:
        assert tuple(s.shape) == (2, 64, 256 // g)
        if p.zero_point:
            assert z.dtype == torch.uint8 and tuple(z.shape) == (2, 64 // (2 if p.quant_dtype == "int4_w4a16" else 1),
                                                                 256 // g)
    W = dequantize_weight(q, s, None if g is None else [0, g], quant_dtype=p.quant_dtype, zp=z)
    step = s.double().repeat_interleave(g, 2) if g else s.double().reshape(2, -1, 1)
    if p.quant_dtype == "fp8_w8a8":  # 3 mantissa bits; subnormals (below 2**-6 * scale) a fixed grid of 2**-9
        assert ((W - w.double()).abs() <= w.double().abs() / 16 + step * 2 ** -10).all()
    else:
        # GPTQ's symmetric grid puts +max|w| at 2**(bits-1) - 0.5 steps, clipped: half a step, plus float32 rounding.
        assert ((W - w.double()).abs() <= step * (0.5 + 1e-4)).all()


@pytest.mark.parametrize("block_shape", [None, [128, 128]])
def test_fp8_weights_of_many_experts_quantize_a_few_experts_at_a_time_to_the_same_values(block_shape):
    """quantize_weight_fp8 bounds its temporaries by quantizing FP8_EXPERTS_AT_ONCE experts at a time; scales are
    per expert or per block, so the result is the one of quantizing the whole weight at once."""
    from moe_opt.kernel.quant import FP8_EXPERTS_AT_ONCE, _quantize_weight_fp8, quantize_weight_fp8

    E = 2 * FP8_EXPERTS_AT_ONCE + 3  # two whole chunks and a partial one
    w = torch.randn(E, 200, 136, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    q, scale = quantize_weight_fp8(w, block_shape)
    q_all, scale_all = _quantize_weight_fp8(w, block_shape)
    assert q.shape == q_all.shape and q.dtype == q_all.dtype and scale.shape == scale_all.shape
    assert torch.equal(q.view(torch.uint8), q_all.view(torch.uint8)) and torch.equal(scale, scale_all)


def test_block_size_k_table_follows_sglangs_divisibility_rule():
    assert block_size_k_choices(None) == (64, 128, 256)
    assert block_size_k_choices("fp8_w8a8", [128, 128]) == (64, 128)
    assert block_size_k_choices("int4_w4a16", [0, 128]) == (32, 64, 128)
    assert block_size_k_choices("int4_w4a16", [0, 32]) == (32,)
    assert block_size_k_choices("int8_w8a16") == (64, 128, 256)
    assert block_size_k_choices("int8_w8a16", [0, 64]) == (32, 64)
    assert operand_bytes("int4_w4a16") == (2, 0.5) and operand_bytes("int8_w8a8") == (1, 1)
    assert operand_bytes("int8_w8a16") == (2, 1) and operand_bytes(None) == (2, 2)


def test_bad_quantized_inputs_give_one_line_errors(device):
    def raises(match, inputs, kwargs, config=None, **changes):
        with pytest.raises(ConfigError, match=match) as info:
            fused_moe(*inputs, config or config_for("int4_g64", "small"), **dict(kwargs, **changes))
        assert "\n" not in str(info.value)

    inputs, kwargs = make_quant_case("int4_g64_zp", 3, 2, None, device)
    x, w1, w2, tw, ids = inputs
    s1, z1 = kwargs["w1_scale"], kwargs["w1_zp"]
    raises(r"BLOCK_SIZE_K 128 must divide the group size 64", inputs, kwargs, dict(CONFIGS["mid"]))
    raises(r"BLOCK_SIZE_K 128 must divide the group size 64", inputs, kwargs,
           config_down=dict(CONFIGS["small"], BLOCK_SIZE_K=128))
    raises(r"group size 48 must divide K 256 and N 128", inputs, kwargs, block_shape=[0, 48])
    raises(r"block_shape \[0, 64\] needs w1_scale \(16, 256, 4\) and w2_scale \(16, 256, 2\), got \(16, 256, 2\)",
           inputs, kwargs, w1_scale=s1[:, :, :2])
    raises(r"int4_w4a16 group scales take block_shape \[0, group_size\]", inputs, kwargs, block_shape=None)
    raises(r"int4_w4a16 zero points must be uint8 w1_zp \(16, 128, 4\)", inputs, kwargs, w1_zp=z1.to(torch.int8))
    raises(r"w1_zp and w2_zp must be given together", inputs, kwargs, w2_zp=None)
    raises(r"shape mismatch: .*\(int4: K/2 and N/2 bytes\)", (x, unpack_int4(w1), unpack_int4(w2), tw, ids), kwargs)
    raises(r"quant_dtype must be one of fp8_w8a8, int8_w8a8, int8_w8a16, int4_w4a16 or None, got 'int4'", inputs,
           kwargs, quant_dtype="int4")
    raises(r"torch.uint8 weights need quant_dtype", inputs, kwargs, quant_dtype=None)
    raises(r"per_channel_quant is for fp8_w8a8, int8_w8a8 and int8_w8a16", inputs, kwargs, per_channel_quant=True)

    inputs, kwargs = make_quant_case("int8_channel", 3, 2, None, device)
    cfg = config_for("int8_channel", "small")
    s1 = kwargs["w1_scale"]
    raises(r"int8_w8a8 with per_channel_quant needs per-channel w1_scale \(16, 256\) and w2_scale \(16, 256\), "
           r"optionally with a trailing 1; got \(16, 128, 1\)", inputs, kwargs, cfg, w1_scale=s1[:, :128])
    raises(r"per-tensor int8 needs one scale per expert", inputs, kwargs, cfg, per_channel_quant=False)
    raises(r"per_channel_quant and block_shape \[128, 128\] are exclusive", inputs, kwargs, cfg, block_shape=[128, 128])
    raises(r"per_channel_quant quantizes activations per token", inputs, kwargs, cfg, a1_scale=torch.ones(1))
    raises(r"block-wise int8_w8a8 \(block_shape \[128, 128\]\) is not implemented", inputs, kwargs, cfg,
           per_channel_quant=False, block_shape=[128, 128])
    raises(r"w1_zp/w2_zp need group-quantized weights", inputs, kwargs, cfg, w1_zp=torch.zeros(1),
           w2_zp=torch.zeros(1))
    x, w1, w2, tw, ids = inputs
    raises(r"int8_w8a16 weights must be torch.int8 \(per-channel scales\) or torch.uint8 with block_shape "
           r"\[0, group_size\]", (x, w1.view(torch.uint8), w2.view(torch.uint8), tw, ids), kwargs, cfg,
           quant_dtype="int8_w8a16")
    raises(r"fp8_w8a8 weights must be torch.float8_e4m3fn, got torch.int8", inputs, kwargs, cfg, quant_dtype="fp8_w8a8")
    raises(r"int8_w8a8 weights need w1_scale and w2_scale", inputs, kwargs, cfg, w1_scale=None)
    raises(r"per_channel_quant, scales and zero points need a quant_dtype",
           (x, w1.to(x.dtype), w2.to(x.dtype), tw, ids), kwargs, cfg, quant_dtype=None)

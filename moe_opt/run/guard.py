"""The correctness guard: a config is exported only if the kernel launched with it computes the right thing.

Fast is worthless if wrong: a miscompiled tile shape or pipeline depth can return garbage quickly. Before
export, the fastest config of each batch size runs once on fresh random inputs against the float64 torch
reference (:func:`moe_opt.kernel.fused_moe_reference`), on the tuner's device, with the output poisoned (NaN)
first. A relative Frobenius error above the bound of tests/test_kernel.py for the dtype path excludes the config;
the next-fastest config that passes is exported instead. Each outcome is kept in the study's user attribute
``"guard"`` ({trial number: "passed: error 0.0021 <= 0.06" or "failed: error 0.31 > 0.06"}; Optuna cannot
change a finished trial, so the study holds it), where the one ranking (store/results.py) reads it: a rejected
config is never the result of the study for any reader. The guard runs the kernel backend's ``forward`` where the
measurer holds its inputs (measure/base.py, KernelRunner) and compares with the float64 reference, which does not
depend on the backend.

The guard's batch: M = 17 tokens, every one routed to the last expert (the largest weight offsets) and to
experts drawn from a few low ones. A config's launch does not depend on M except through masking: 17 rows give
the last expert one full and one partial 16-row block and every other used expert a partial block, so the
masked and unmasked row paths, several M blocks per expert and untouched experts all run; N and K are the
tuned shape's, so every BLOCK_SIZE_N/K tile and pipeline stage runs as in serving. A larger M adds time
(the reference runs on the CPU in float64), not coverage.
"""

from __future__ import annotations

import math
import random
import weakref
from typing import Any, Callable

from ..measure.base import KernelRunner, describe_failure
from ..model.spec import ModelSpec
from ..space import Config
from ..store.results import GUARD_ATTR, GUARD_GAVE_UP_ATTR, study_result

GUARD_M = 17
# The per-case bounds of tests/test_kernel.py (TOLERANCE) and tests/test_kernel_quant.py (FAMILY_TOLERANCE),
# where their derivation is written down: weight-only formats keep their activation dtype's bound, w8a8 formats
# their 8-bit type's.
TOLERANCE = {"fp16": 2e-3, "bf16": 1e-2, "fp8_tensor": 6e-2, "fp8_block": 6e-2, "fp8_channel": 6e-2,
             "int8": 3e-2}
MAX_CHECKS_PER_M = 5  # if the five fastest configs all fail, the kernel or its inputs are wrong, not the configs
SKIPPED_REPLAY = "skipped: replay mode, no kernel to check"


def dtype_path(spec: ModelSpec) -> str:
    """The key of TOLERANCE for a spec: "fp8_block", "fp8_tensor", "fp8_channel", "int8" (int8_w8a8), or the
    activation dtype "fp16"/"bf16" (unquantized and weight-only formats)."""
    if spec.dtype == "fp8_w8a8":
        return "fp8_channel" if spec.per_channel_quant else "fp8_block" if spec.block_shape else "fp8_tensor"
    if spec.dtype == "int8_w8a8":
        return "int8"
    return "fp16" if spec.torch_dtype == "float16" else "bf16"


def outcome(error: float, bound: float) -> str:
    """ "passed: error 0.0021 <= 0.06" or "failed: error 0.31 > 0.06"."""
    if not math.isfinite(error):
        return f"failed: error {error} (output has NaN or unwritten elements)"
    return f"passed: error {error:.2g} <= {bound:g}" if error <= bound else f"failed: error {error:.2g} > {bound:g}"


def kernel_error(backend: Any, inputs: Any, config: Config, *, M: int = GUARD_M, seed: int | None = None) -> float:
    """Relative Frobenius error of the backend's fused MoE with ``config`` against the float64 reference.

    Args:
        backend: the kernel backend (kernel/backend.py); its ``forward`` runs the kernel.
        inputs: the backend's inputs (weights and scales are reused; x and routing are new).
        config: the launch config.
        M: tokens in the batch.
        seed: seed of the random draws (default: fresh).

    Example:
        >>> from moe_opt.kernel import get_backend
        >>> spec = ModelSpec.from_shape(num_experts=4, topk=2, hidden_size=128, intermediate_size=128)
        >>> backend = get_backend("builtin")
        >>> kernel_error(backend, backend.make_inputs(spec, "cpu"), Config(16, 32, 64, 1, 4, 2)) < 1e-2  # doctest: +SKIP
        True
    """
    import torch

    from ..kernel.reference import fused_moe_reference

    spec, device = inputs.spec, inputs.device
    gen = torch.Generator().manual_seed(seed if seed is not None else random.SystemRandom().getrandbits(62))
    E, topk, K = spec.E, spec.topk, spec.K
    x = torch.randn(M, K, generator=gen).to(spec.activation_dtype)
    experts, W1, W2 = _reference_experts(inputs)
    low = len(experts) - 1  # a few low experts share the tokens, so blocks hold several rows
    ids = torch.empty(M, topk, dtype=torch.int32)
    for row in range(M):
        others = torch.randperm(low, generator=gen)[:topk - 1]
        ids[row] = torch.cat([torch.tensor([E - 1]), others]).to(torch.int32)
    if spec.ep_size > 1:
        ids[::4, -1] = -1  # experts on other EP ranks
    weights = torch.rand(M, topk, generator=gen).softmax(-1)
    x, ids, weights = x.to(device), ids.to(device), weights.to(device)
    out = torch.full((M, K), float("nan"), dtype=spec.activation_dtype, device=device)
    backend.forward(inputs, x, weights, ids, config, out)
    got = out.double().cpu()
    # The reference computes with the guard's experts only (dequantized once per inputs), ids renumbered.
    renumber = {e: i for i, e in enumerate(experts)}
    local_ids = torch.tensor([[renumber.get(int(e), -1) for e in row] for row in ids.cpu()], dtype=torch.int32)
    kwargs = {k: v for k, v in inputs.kwargs.items() if k not in _PER_EXPERT}
    ref = fused_moe_reference(x, inputs.w1, inputs.w2, weights, local_ids, dequantized=(W1, W2), **kwargs)
    if got.isnan().any():
        return float("nan")
    return ((got - ref).norm() / ref.norm()).item()


_PER_EXPERT = ("w1_scale", "w2_scale", "w1_zp", "w2_zp")
_REFERENCE_EXPERTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _reference_experts(inputs: Any) -> tuple[list[int], Any, Any]:
    """The experts the guard's batch can be routed to (the low ones, then the last) and their float64 weights as
    the reference computes with them, dequantized once per inputs: every config the guard checks is compared
    against the same experts (dequantizing them each time cost a tune of a large shape half a minute)."""
    import torch

    from ..kernel.reference import reference_weights

    if inputs not in _REFERENCE_EXPERTS:
        E, topk = inputs.spec.E, inputs.spec.topk
        experts = list(range(min(E - 1, max(2 * (topk - 1), 1)))) + [E - 1]
        index = torch.tensor(experts, device=inputs.w1.device)
        picked = {k: v.index_select(0, index.to(v.device)) if k in _PER_EXPERT and v is not None else v
                  for k, v in inputs.kwargs.items()}
        _REFERENCE_EXPERTS[inputs] = (experts, *reference_weights(
            inputs.w1.index_select(0, index), inputs.w2.index_select(0, index), inputs.spec.activation_dtype,
            **picked))
    return _REFERENCE_EXPERTS[inputs]


def check_config(backend: Any, inputs: Any, config: Config) -> str:
    """The guard's outcome for one config with a backend's inputs (run where the inputs live)."""
    return outcome(kernel_error(backend, inputs, config), TOLERANCE[dtype_path(inputs.spec)])


class Guard:
    """Checks configs once each (results are kept per config: a config's correctness does not depend on M).

    Args:
        spec: the tuned spec (gives the bound).
        measurer: the tune's measurer; one that runs a kernel (KernelRunner, in this process or isolated) runs
            the check, others skip it.
        hook: instead of the kernel, ``hook(config)`` gives the relative error (or an outcome string); for
            tests and for checks of one's own.
    """

    def __init__(self, spec: ModelSpec, measurer: Any = None, hook: Callable[[Config], Any] | None = None):
        self.spec = spec
        self.bound = TOLERANCE[dtype_path(spec)]
        self.measurer = measurer
        self.hook = hook
        self.outcomes: dict[Config, str] = {}

    def check(self, config: Config) -> str:
        if config not in self.outcomes:
            self.outcomes[config] = self._check(config)
        return self.outcomes[config]

    def _check(self, config: Config) -> str:
        from ..measure.isolated import IsolatedFailure

        try:
            if self.hook is not None:
                value = self.hook(config)
                return value if isinstance(value, str) else outcome(float(value), self.bound)
            if not isinstance(self.measurer, KernelRunner):
                return "skipped: the measurer runs no kernel"
            try:  # isolated: a crash here fails the config, not the tune
                return self.measurer.run_with_inputs(check_config, config)
            except IsolatedFailure as exc:
                return f"failed: {exc}"
        except Exception as exc:
            return f"failed: {describe_failure(exc)}"


def guard_study(study: Any, guard: Guard, max_checks: int = MAX_CHECKS_PER_M) -> tuple[str, list[str]]:
    """Check a study's fastest configs in ranked order until one passes; every verdict is stored in the study, so
    the ranking passes over rejected configs. Returns (the outcome of the config that is now the result,
    ["trial 12 M64 N128 ...: failed: error 0.31 > 0.06", ...] of the configs it rejected now)."""
    excluded: list[str] = []
    if study.user_attrs.get(GUARD_GAVE_UP_ATTR):  # an earlier run's verdict; this run's configs may pass
        study.set_user_attr(GUARD_GAVE_UP_ATTR, None)
    for _ in range(max_checks):
        result = study_result(study)
        best = result.best
        if best is None:
            break
        verdict = result.guard.get(best.config)
        if verdict is None:
            verdict = guard.check(best.config)
            if verdict.startswith("skipped"):
                return verdict, excluded
            stored = dict(study.user_attrs.get(GUARD_ATTR) or {})
            stored[str(best.trial_number)] = verdict
            study.set_user_attr(GUARD_ATTR, stored)
        if verdict.startswith("passed"):
            _guard_pair(study, guard)
            return verdict, excluded
        excluded.append(f"trial {best.trial_number} {best.config}: {verdict}")
    if study_result(study).best is None and not excluded:
        return "no completed trial", excluded
    gave_up = (f"failed: the {max_checks} fastest configs all fail the guard; nothing exported for this batch "
               "size")
    study.set_user_attr(GUARD_GAVE_UP_ATTR, gave_up)
    return gave_up, excluded


def _guard_pair(study: Any, guard: Guard) -> None:
    """Check the study's confirmed config pair (one config per GEMM) as it would be exported for SGLang; a pair
    that fails is not exported (store/results.py: the best single config is, for both GEMMs)."""
    from ..space import ConfigPair

    pair = study_result(study).pair
    if pair is None or pair.confirmed_us is None or pair.guard is not None:
        return
    verdict = guard.check(ConfigPair(pair.up, pair.down))
    if not verdict.startswith("skipped"):
        stored = dict(study.user_attrs.get(GUARD_ATTR) or {})
        stored[pair.guard_key] = verdict
        study.set_user_attr(GUARD_ATTR, stored)


def make_guard(spec: ModelSpec | None, measurer: Any, guard: bool | Callable[[Config], Any], *,
               replay_mode: bool) -> tuple[Guard | None, str]:
    """The guard a tune runs, or None with the reason it is skipped."""
    if guard is False:
        return None, "skipped: guard off"
    if spec is None or (replay_mode and not callable(guard)):
        return None, SKIPPED_REPLAY
    if callable(guard):
        return Guard(spec, hook=guard), ""
    return Guard(spec, measurer), ""

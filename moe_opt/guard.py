"""The correctness guard: a config is exported only if the kernel launched with it computes the right thing.

Fast is worthless if wrong: a miscompiled tile shape or pipeline depth can return garbage quickly. Before
export, the fastest config of each batch size runs once on fresh random inputs against the float64 torch
reference (:func:`moe_opt.kernel.fused_moe_reference`), on the tuner's device, with the output poisoned (NaN)
first. A relative Frobenius error above the bound of tests/test_kernel.py for the dtype path excludes the config;
the next-fastest config that passes is exported instead. Each outcome is kept in the study's user attribute
``"guard"`` ({trial number: "passed: error 0.0021 <= 0.06" or "failed: error 0.31 > 0.06"}; Optuna cannot
change a finished trial, so the study holds it).

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
from typing import Any, Callable

import optuna
import torch
from optuna.trial import TrialState

from .measure import describe_failure
from .space import Config
from .spec import ModelSpec
from .study import confirmed_latencies, latency_of

GUARD_M = 17
# The per-case bounds of tests/test_kernel.py (TOLERANCE), where their derivation is written down.
TOLERANCE = {"fp16": 2e-3, "bf16": 1e-2, "fp8_tensor": 6e-2, "fp8_block": 6e-2}
MAX_CHECKS_PER_M = 5  # if the five fastest configs all fail, the kernel or its inputs are wrong, not the configs
SKIPPED_REPLAY = "skipped: replay mode, no kernel to check"


def dtype_path(spec: ModelSpec) -> str:
    """The key of TOLERANCE for a spec: "fp8_block", "fp8_tensor", "fp16" or "bf16"."""
    if spec.dtype == "fp8_w8a8":
        return "fp8_block" if spec.block_shape else "fp8_tensor"
    return "fp16" if spec.torch_dtype == "float16" else "bf16"


def outcome(error: float, bound: float) -> str:
    """ "passed: error 0.0021 <= 0.06" or "failed: error 0.31 > 0.06"."""
    if not math.isfinite(error):
        return f"failed: error {error} (output has NaN or unwritten elements)"
    return f"passed: error {error:.2g} <= {bound:g}" if error <= bound else f"failed: error {error:.2g} > {bound:g}"


def kernel_error(inputs: Any, config: Config, *, M: int = GUARD_M, seed: int | None = None) -> float:
    """Relative Frobenius error of ``fused_moe`` with ``config`` against the float64 reference.

    Args:
        inputs: a :class:`~moe_opt.measure.MoeInputs` (its weights and scales are reused; x and routing are new).
        config: the launch config.
        M: tokens in the batch.
        seed: seed of the random draws (default: fresh).

    Example:
        >>> from moe_opt.measure import MoeInputs
        >>> spec = ModelSpec.from_shape(num_experts=4, topk=2, hidden_size=128, intermediate_size=128)
        >>> kernel_error(MoeInputs(spec, "cpu"), Config(16, 32, 64, 1, 4, 2)) < 1e-2  # doctest: +SKIP
        True
    """
    from .kernel import fused_moe, fused_moe_reference

    spec, device = inputs.spec, inputs.device
    gen = torch.Generator().manual_seed(seed if seed is not None else random.SystemRandom().getrandbits(62))
    E, topk, K = spec.E, spec.topk, spec.K
    x = torch.randn(M, K, generator=gen).to(spec.activation_dtype)
    low = max(2 * (topk - 1), 1)  # a few low experts share the tokens, so blocks hold several rows
    ids = torch.empty(M, topk, dtype=torch.int32)
    for row in range(M):
        others = torch.randperm(min(E - 1, low), generator=gen)[:topk - 1]
        ids[row] = torch.cat([torch.tensor([E - 1]), others]).to(torch.int32)
    if spec.ep_size > 1:
        ids[::4, -1] = -1  # experts on other EP ranks
    weights = torch.rand(M, topk, generator=gen).softmax(-1)
    x, ids, weights = x.to(device), ids.to(device), weights.to(device)
    out = torch.full((M, K), float("nan"), dtype=spec.activation_dtype, device=device)
    fused_moe(x, inputs.w1, inputs.w2, weights, ids, config, out=out, **inputs.kwargs)
    got = out.double().cpu()
    # The reference dequantizes every expert it is given: give it the used ones only, ids renumbered.
    used = sorted(set(ids.flatten().tolist()) - {-1})
    index = torch.tensor(used, device=inputs.w1.device)
    renumber = {e: i for i, e in enumerate(used)}
    local_ids = torch.tensor([[renumber.get(int(e), -1) for e in row] for row in ids.cpu()], dtype=torch.int32)
    kwargs = {k: (v.index_select(0, index.to(v.device)) if k in ("w1_scale", "w2_scale") else v)
              for k, v in inputs.kwargs.items()}
    ref = fused_moe_reference(x, inputs.w1.index_select(0, index), inputs.w2.index_select(0, index), weights,
                              local_ids, **kwargs)
    if got.isnan().any():
        return float("nan")
    return ((got - ref).norm() / ref.norm()).item()


def check_config(measurer: Any, config: Config) -> str:
    """The guard's outcome for one config, with the inputs of a kernel measurer (``measurer.inputs``)."""
    inputs = getattr(measurer, "inputs", None)
    if inputs is None:
        return "skipped: the measurer runs no kernel"
    return outcome(kernel_error(inputs, config), TOLERANCE[dtype_path(inputs.spec)])


class Guard:
    """Checks configs once each (results are kept per config: a config's correctness does not depend on M).

    Args:
        spec: the tuned spec (gives the bound).
        measurer: the tune's kernel measurer, in this process or isolated (its child runs the check).
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
        try:
            if self.hook is not None:
                value = self.hook(config)
                return value if isinstance(value, str) else outcome(float(value), self.bound)
            if hasattr(self.measurer, "run"):  # isolated: a crash here fails the config, not the tune
                from .isolation import IsolatedFailure

                try:
                    return self.measurer.run(_check_in_child, config)
                except IsolatedFailure as exc:
                    return f"failed: {exc}"
            return check_config(self.measurer, config)
        except Exception as exc:
            return f"failed: {describe_failure(exc)}"


def _check_in_child(measurer: Any, config: Config) -> str:
    return check_config(measurer, config)


def choose_exported(studies: dict[int, optuna.Study], guard: Guard | None, config_of: Callable,
                    max_checks: int = MAX_CHECKS_PER_M, skipped: str = SKIPPED_REPLAY
                    ) -> tuple[dict, dict[int, str], dict[int, list[str]], dict[int, float]]:
    """Per batch size, the fastest completed trial (by :func:`latency_of`) that passes the guard.

    Returns ({M: trial}, {M: its outcome}, {M: ["trial 12 M64 N128 ...: failed: error 0.31 > 0.06", ...]},
    {M: the chosen trial's latency}).
    Outcomes already stored in the study for a trial are reused.
    """
    chosen, outcomes, excluded, latency = {}, {}, {}, {}
    for M, study in studies.items():
        confirmed = confirmed_latencies(study.user_attrs)  # one storage query per study
        complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                          key=lambda t: latency_of(t, confirmed))
        if not complete:
            continue
        if guard is None:
            chosen[M], outcomes[M], latency[M] = complete[0], skipped, latency_of(complete[0], confirmed)
            continue
        stored = dict(study.user_attrs.get("guard") or {})
        before = dict(stored)
        for t in complete[:max_checks]:
            config = config_of(t)
            result = stored.get(str(t.number))
            if result is None:
                result = guard.check(config)
                if not result.startswith("skipped"):
                    stored[str(t.number)] = result
            if result.startswith(("passed", "skipped")):
                chosen[M], outcomes[M], latency[M] = t, result, latency_of(t, confirmed)
                break
            excluded.setdefault(M, []).append(f"trial {t.number} {config}: {result}")
        if M not in chosen:
            outcomes[M] = (f"failed: the {min(max_checks, len(complete))} fastest configs all fail the guard; "
                           "nothing exported for this batch size")
        if stored != before:
            study.set_user_attr("guard", stored)
    return chosen, outcomes, excluded, latency


def apply_guard(result: Any, studies: dict[int, optuna.Study], measurer: Any, spec: ModelSpec | None,
                guard: bool | Callable[[Config], Any], *, replay_mode: bool) -> None:
    """Set ``result.best``/``latency_us`` to the fastest config per batch size that passes the guard, and
    ``result.guard``/``excluded``/``notes`` to what the guard found."""
    from .coordination import config_of

    checker, skipped = None, SKIPPED_REPLAY
    if guard is False or spec is None:
        skipped = "skipped: guard off" if guard is False else SKIPPED_REPLAY
    elif callable(guard):
        checker = Guard(spec, hook=guard)
    elif not replay_mode:
        checker = Guard(spec, measurer)
    if checker is None and guard is not False:
        result.notes.append(f"correctness guard {skipped}")
    chosen, result.guard, result.excluded, result.latency_us = choose_exported(studies, checker, config_of,
                                                                               skipped=skipped)
    result.best = {M: config_of(t).to_dict() for M, t in chosen.items()}
    for M in studies:
        if M not in chosen and M in result.guard:
            result.notes.append(f"M={M}: {result.guard[M]}")

"""Routing in a tune: the timed calls draw their topk_ids from the routing the user chose (a recorded trace, a
Zipf-skewed popularity), and the routing is part of the study identity. Runs through Triton's CPU interpreter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moe_opt
from moe_opt.errors import TuneError
from moe_opt.measure.interpreter import InterpreterTimer
from moe_opt.model.routing import RoutingSpec

SPEC = moe_opt.ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=256, intermediate_size=128)


def _trace(tmp_path, tokens: int = 40, E: int = 8, topk: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(E, size=topk, replace=False) for _ in range(tokens)]).astype(np.int32)
    path = tmp_path / "trace.npy"
    np.save(path, ids)
    return path, ids


def _is_slice(drawn: np.ndarray, trace: np.ndarray) -> bool:
    M = drawn.shape[0]
    return any(np.array_equal(drawn, trace[i:i + M]) for i in range(trace.shape[0] - M + 1))


def test_the_timed_topk_ids_come_from_the_trace(tmp_path):
    path, ids = _trace(tmp_path)
    timer = InterpreterTimer(SPEC, routing=RoutingSpec("trace", trace_path=str(path)))
    _, routing, _ = timer.inputs.for_batch(8)
    assert routing and all(_is_slice(drawn.cpu().numpy(), ids) for _, drawn in routing)
    assert timer.measure(moe_opt.Config(16, 32, 64, 1, 4, 2), 8).ok


def test_a_tune_with_a_trace_names_it_in_its_studies_and_runs(tmp_path):
    path, _ = _trace(tmp_path)
    kwargs = dict(spec=SPEC, batch_sizes=[8], n_trials=2, output_dir=None, progress=False, confirm=False)
    traced = moe_opt.tune(storage=f"sqlite:///{tmp_path}/t.db", routing=f"trace:{path}", **kwargs)
    uniform = moe_opt.tune(storage=f"sqlite:///{tmp_path}/t.db", **kwargs)
    skewed = moe_opt.tune(storage=f"sqlite:///{tmp_path}/t.db", routing="zipf1.2", **kwargs)
    assert "|routing=trace:trace.npy@" in traced.study_names[8]
    assert "routing=" not in uniform.study_names[8]
    assert "|routing=zipf1.2|" in skewed.study_names[8]
    assert len({traced.study_names[8], uniform.study_names[8], skewed.study_names[8]}) == 3
    assert all(r.trials_used[8] == 2 for r in (traced, uniform, skewed))  # nothing resumed across routings


def test_a_bad_trace_is_a_one_line_error_before_anything_is_timed(tmp_path):
    path = tmp_path / "bad.npy"
    np.save(path, np.full((16, 2), 9, dtype=np.int32))  # expert 9 of 8
    with pytest.raises(TuneError, match=r"^routing trace .*bad\.npy.* 9") as err:
        moe_opt.tune(spec=SPEC, batch_sizes=[8], n_trials=1, storage=f"sqlite:///{tmp_path}/b.db", output_dir=None,
                     progress=False, routing=f"trace:{path}")
    assert "\n" not in str(err.value)
    with pytest.raises(TuneError, match="routing 'zipfy'"):
        moe_opt.tune(spec=SPEC, batch_sizes=[8], n_trials=1, output_dir=None, progress=False, routing="zipfy")


def test_replay_tables_refuse_a_routing_they_were_not_recorded_with(tmp_path):
    table = moe_opt.__path__[0] + "/data/DeepSeek-V4-Flash_tp8_H200.csv"
    with pytest.raises(TuneError, match="a replay table was recorded with uniform routing"):
        moe_opt.tune(replay=table, n_trials=1, storage=f"sqlite:///{tmp_path}/r.db", output_dir=None,
                     progress=False, routing="zipf1.2")


def test_uniform_routing_draws_what_it_drew_before_routing_could_be_chosen():
    """The default routing is today's: a real top-k over random softmaxed logits from the batch size's generator,
    drawn after x (so recorded tables and resumed studies stay comparable)."""
    timer = InterpreterTimer(SPEC)
    M = 8
    x, routing, _ = timer.inputs.for_batch(M)
    gen = torch.Generator().manual_seed(0 * 1_000_003 + M)
    torch.randn(M, SPEC.K, generator=gen, dtype=SPEC.activation_dtype)
    weights, ids = torch.randn(M, SPEC.E, generator=gen, dtype=torch.float32).softmax(-1).topk(SPEC.topk, dim=-1)
    assert torch.equal(routing[0][1], ids.to(torch.int32)) and torch.equal(routing[0][0], weights)

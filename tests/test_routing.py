"""Routing of timed calls: uniform as moe_opt always drew it, Zipf-skewed popularity, and recorded traces (SGLang's
dumps, .pt and .npy files) replayed slice by slice; every bad trace or argument is one clear line.

Draws run on the GPU where one is present, else on the CPU (conftest.py's ``device``); traces are real files.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch

from moe_opt.errors import TuneError
from moe_opt.kernel.inputs import MoeInputs
from moe_opt.model.routing import RoutingSpec, RoutingTrace, load_trace, trace_digest, uniform_routing, zipf_routing
from moe_opt.model.spec import ModelSpec

E, TOPK = 16, 4


def generator(device: str, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def trace_ids(tokens: int = 300, topk: int = TOPK, num_experts: int = E, seed: int = 1) -> torch.Tensor:
    """Distinct ids per token, as a router gives them, some -1 for padded tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, num_experts, generator=g).argsort(dim=1)[:, :topk].to(torch.int32)
    ids[-3:] = -1
    return ids


def slice_offset(trace: RoutingTrace, ids: torch.Tensor) -> tuple[str, int]:
    """(segment, offset) of the M consecutive tokens of one segment (wrapping around) that ``ids`` are."""
    ids, M, first = ids.cpu(), ids.shape[0], 0
    for label, n in trace.segments:
        segment = trace.topk_ids[first:first + n]
        for offset in range(n):
            if torch.equal(segment[(offset + torch.arange(M)) % n], ids):
                return label, offset
        first += n
    raise AssertionError("the drawn ids are no slice of the trace")


def distinct_per_token(ids: torch.Tensor) -> bool:
    return bool((ids.sort(dim=1).values.diff(dim=1) > 0).all())


# --- uniform -------------------------------------------------------------------------------------------------


def test_uniform_routing_draws_what_moe_inputs_drew_for_the_same_generator():
    spec = ModelSpec.from_shape(num_experts=E, topk=TOPK, hidden_size=64, intermediate_size=32)
    seed, M = 7, 5
    _, old_sets, _ = MoeInputs(spec, "cpu", routing_sets=3, seed=seed).for_batch(M)
    gen = generator("cpu", seed * 1_000_003 + M)  # MoeInputs.for_batch's generator, which draws x first
    torch.randn(M, spec.K, generator=gen, dtype=spec.activation_dtype)
    for old_weights, old_ids in old_sets:
        weights, ids = uniform_routing(M, E, TOPK, gen, "cpu")
        assert torch.equal(weights, old_weights) and torch.equal(ids, old_ids)
        assert weights.dtype == torch.float32 and ids.dtype == torch.int32
        assert weights.is_contiguous() and ids.is_contiguous()


def test_every_kind_draws_contiguous_float32_weights_and_int32_ids_on_the_device(device, tmp_path):
    path = tmp_path / "trace.pt"
    torch.save(trace_ids(), path)
    for spec in (RoutingSpec(), RoutingSpec("zipf", exponent=1.2), RoutingSpec("trace", trace_path=path)):
        for weights, ids in spec.draw_sets(E, TOPK, M=33, n_sets=3, seed=0, device=device):
            assert weights.shape == ids.shape == (33, TOPK)
            assert (weights.dtype, ids.dtype) == (torch.float32, torch.int32)
            assert weights.device.type == ids.device.type == torch.device(device).type
            assert weights.is_contiguous() and ids.is_contiguous()


# --- zipf ----------------------------------------------------------------------------------------------------


def test_zipf_with_exponent_0_hits_every_expert_about_equally(device):
    _, ids = zipf_routing(20_000, 64, 8, 0.0, generator(device), device)
    counts = torch.bincount(ids.flatten().long().cpu(), minlength=64).float()
    # 2500 slots per expert expected, binomial sd 48: 10% is over 5 sd
    assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()


def test_zipf_with_exponent_1_5_sends_most_tokens_to_the_rank_1_expert(device):
    gen = generator(device, 3)
    _, ids = zipf_routing(20_000, 64, 8, 1.5, gen, device)
    counts = torch.bincount(ids.flatten().long().cpu(), minlength=64).float()
    assert counts.max() > 6 * counts.mean()  # near every token takes it: 8x the uniform share at most
    rank = torch.randperm(64, generator=generator(device, 3), device=device)  # the draw's first step, replayed
    assert int(counts.argmax()) == int(rank.argmin())


def test_zipf_draws_put_other_experts_on_top_call_after_call(device):
    sets = RoutingSpec("zipf", exponent=1.5).draw_sets(64, 8, M=2000, n_sets=5, seed=0, device=device)
    hottest = {int(torch.bincount(ids.flatten().long().cpu(), minlength=64).argmax()) for _, ids in sets}
    assert len(hottest) > 1


@pytest.mark.parametrize("exponent", [0.0, 1.5, 300.0])
def test_zipf_gives_each_token_distinct_experts_even_at_extreme_exponents(device, exponent):
    for E_, topk in ((256, 8), (8, 8)):
        weights, ids = zipf_routing(500, E_, topk, exponent, generator(device), device)
        assert distinct_per_token(ids) and int(ids.min()) >= 0 and int(ids.max()) < E_
        assert torch.allclose(weights.sum(-1), torch.ones(500, device=device))
        assert bool((weights.diff(dim=1) <= 0).all())  # sorted descending


def test_uniform_gives_each_token_distinct_experts(device):
    _, ids = uniform_routing(500, E, TOPK, generator(device), device)
    assert distinct_per_token(ids)


def test_draw_sets_repeat_for_a_seed_and_differ_from_set_to_set(device):
    spec = RoutingSpec("zipf", exponent=1.0)
    first = spec.draw_sets(E, TOPK, M=64, n_sets=4, seed=11, device=device)
    again = spec.draw_sets(E, TOPK, M=64, n_sets=4, seed=11, device=device)
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not torch.equal(first[0][1], first[1][1])


# --- traces --------------------------------------------------------------------------------------------------


def write_pt(tmp_path, device):
    torch.save(trace_ids().long(), tmp_path / "ids.pt")
    return tmp_path / "ids.pt", "trace ids.pt (300 tokens, topk 4)"


def write_npy(tmp_path, device):
    np.save(tmp_path / "ids.npy", trace_ids().numpy())
    return tmp_path / "ids.npy", "trace ids.npy (300 tokens, topk 4)"


def write_sglang_dump(tmp_path, device):
    # As SGLang's benchmark/kernels/fused_moe_triton README has DeepseekV2MoE.forward_normal save it: the
    # int32 topk_ids of select_experts, on the GPU, torch.save'd as topk_ids_layer{layer_id}_idx{save_idx}.pt
    path = tmp_path / "topk_ids_layer3_idx0.pt"
    torch.save(trace_ids().to(device), path)
    return path, "trace topk_ids_layer3_idx0.pt layer 3 (300 tokens, topk 4)"


def write_sglang_directory(tmp_path, device):
    d = tmp_path / "topk_ids"
    d.mkdir()
    for layer, idx, seed in ((3, 0, 1), (3, 1, 2), (10, 0, 3)):
        torch.save(trace_ids(seed=seed).to(device), d / f"topk_ids_layer{layer}_idx{idx}.pt")
    (d / "capture_server.log").write_text("server log, not a dump\n")
    return d, "trace topk_ids/ (900 tokens in 3 files, topk 4)"


def write_recorder_dump(tmp_path, device):
    # SGLang's --expert-distribution-recorder-mode per_token dump (python/sglang/srt/eplb/expert_distribution.py,
    # _DetailAccumulator.dump): one record per forward pass, topk_ids_of_layer (num_layers, tokens, 8), -1 where
    # nothing was routed: dense layer 0, and the columns past topk 4.
    records = []
    for forward_pass_id, tokens in enumerate((200, 100)):
        per_layer = torch.full((3, tokens, 8), -1, dtype=torch.int32)
        per_layer[1, :, :TOPK] = trace_ids(tokens, seed=forward_pass_id)
        per_layer[2, :, :TOPK] = trace_ids(tokens, seed=10 + forward_pass_id)
        records.append(dict(forward_pass_id=forward_pass_id, rank=0, gatherer_key="primary",
                            input_ids=list(range(tokens)), positions=list(range(tokens)), extend_seq_lens=[tokens],
                            forward_mode=1, topk_ids_of_layer=per_layer, misc_objects=[],
                            global_physical_count=torch.zeros(3, E, dtype=torch.int32)))
    path = tmp_path / "expert_distribution_recorder_1712345678.9_0.pt"
    torch.save(dict(records=records, last_physical_to_logical_map=torch.arange(E).repeat(3, 1)), path)
    return path, "trace expert_distribution_recorder_1712345678.9_0.pt (600 tokens in 2 layers, topk 4)"


FORMATS = {"pt": write_pt, "npy": write_npy, "sglang dump": write_sglang_dump,
           "sglang directory": write_sglang_directory, "sglang recorder": write_recorder_dump}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_trace_of_each_format_drives_the_draws_with_slices_of_itself(tmp_path, device, fmt):
    path, description = FORMATS[fmt](tmp_path, device)
    trace = load_trace(path, num_experts=E, topk=TOPK)
    assert trace.describe() == description
    assert trace.topk_ids.dtype == torch.int32 and trace.topk_ids.device.type == "cpu"
    gen, places = generator(device), set()
    for _ in range(20):
        weights, ids = trace.draw(50, gen, device)
        assert ids.device.type == torch.device(device).type
        label, offset = slice_offset(trace, ids)
        assert offset + 50 <= dict(trace.segments)[label]  # inside one segment: no wrapping needed
        places.add((label, offset))
    assert len(places) > 10  # random offsets


def test_a_trace_shorter_than_the_batch_is_repeated_cyclically(tmp_path, device):
    torch.save(trace_ids(10), tmp_path / "short.pt")
    trace = load_trace(tmp_path / "short.pt")
    _, ids = trace.draw(25, generator(device), device)
    slice_offset(trace, ids)


def test_a_layer_of_a_directory_or_recorder_dump_can_be_picked(tmp_path, device):
    d, _ = write_sglang_directory(tmp_path, device)
    trace = load_trace(d, layer=3)
    assert [label for label, _ in trace.segments] == ["topk_ids_layer3_idx0.pt", "topk_ids_layer3_idx1.pt"]
    assert trace.describe() == "trace topk_ids/ layer 3 (600 tokens in 2 files, topk 4)"
    recorder, _ = write_recorder_dump(tmp_path, device)
    trace = load_trace(recorder, num_experts=E, topk=TOPK, layer=2)
    assert trace.describe() == "trace expert_distribution_recorder_1712345678.9_0.pt layer 2 (300 tokens, topk 4)"
    assert torch.equal(trace.topk_ids, torch.cat([trace_ids(200, seed=10), trace_ids(100, seed=11)]))


def test_expert_histogram_counts_the_slots_of_each_expert_without_the_minus_1s(tmp_path):
    ids = trace_ids()
    torch.save(ids, tmp_path / "ids.pt")
    hist = load_trace(tmp_path / "ids.pt").expert_histogram(E)
    assert hist.tolist() == [int((ids == e).sum()) for e in range(E)]
    assert int(hist.sum()) == int((ids >= 0).sum())


def test_routing_spec_names_itself_and_a_trace_by_its_content(tmp_path):
    assert RoutingSpec().key() == "uniform"
    assert RoutingSpec("zipf", exponent=1.2).key() == "zipf1.2"
    assert RoutingSpec("zipf", exponent=0).key() == "zipf0"
    assert RoutingSpec("zipf", exponent=1.2345678).key() == "zipf1.2345678"
    path = tmp_path / "layer3.pt"
    torch.save(trace_ids(), path)
    spec = RoutingSpec("trace", trace_path=str(path))
    assert spec.key() == f"trace:layer3.pt@{hashlib.sha1(path.read_bytes()).hexdigest()[:12]}"
    assert load_trace(path).sha1 == trace_digest(path) == hashlib.sha1(path.read_bytes()).hexdigest()
    before = spec.key()
    torch.save(trace_ids(seed=5), path)
    assert spec.key() != before
    d, _ = write_sglang_directory(tmp_path, "cpu")
    assert re.fullmatch(r"trace:topk_ids@[0-9a-f]{12}:layer10", RoutingSpec("trace", trace_path=d, layer=10).key())
    assert RoutingSpec("zipf", exponent=1) == RoutingSpec("zipf", exponent=1.0)
    assert len({RoutingSpec(), RoutingSpec(), RoutingSpec("zipf", exponent=1.2)}) == 2


def test_routing_spec_parses_what_a_user_types(tmp_path):
    assert RoutingSpec.parse("uniform") == RoutingSpec()
    assert RoutingSpec.parse("zipf1.2") == RoutingSpec("zipf", exponent=1.2)
    assert RoutingSpec.parse("trace:/a/b.pt") == RoutingSpec("trace", trace_path="/a/b.pt")
    assert RoutingSpec.parse("trace:/a/dumps:layer3") == RoutingSpec("trace", trace_path="/a/dumps", layer=3)


# --- bad input -----------------------------------------------------------------------------------------------


def save(name, obj):
    def write(tmp_path):
        path = tmp_path / name
        if isinstance(obj, str):
            path.write_text(obj)
        elif name.endswith(".npy"):
            np.save(path, obj)
        else:
            torch.save(obj, path)
        return path
    return write


def empty_directory(tmp_path):
    (tmp_path / "dumps").mkdir()
    (tmp_path / "dumps" / "notes.txt").write_text("no dumps here\n")
    return tmp_path / "dumps"


def per_pass_recorder_dump(tmp_path):
    path = tmp_path / "expert_distribution_recorder_1.0_0.pt"
    torch.save(dict(records=[dict(forward_pass_id=0, global_physical_count=torch.zeros(3, E))],
                    last_physical_to_logical_map=torch.arange(E)), path)
    return path


ACCEPTED_WHAT = re.escape("accepted: a .pt or .npy file of topk_ids (tokens, topk), a directory of SGLang's "
                          "topk_ids_layer<L>_idx<I>.pt dumps, or SGLang's per_token expert_distribution_recorder_*.pt")
ACCEPTED = rf"\({ACCEPTED_WHAT}\)"
# (id, write the file, load_trace keyword arguments, the error's text)
BAD_TRACES = [
    ("missing file", lambda tmp_path: tmp_path / "nope.pt", {}, rf"routing trace \S*nope\.pt not found {ACCEPTED}"),
    ("unknown extension", save("ids.csv", "0,1\n2,3\n"), {},
     rf"routing trace \S*ids\.csv: unknown file type '\.csv' {ACCEPTED}"),
    ("unreadable .pt", save("ids.pt", "0,1\n2,3\n"), {},
     rf"routing trace \S*ids\.pt could not be read by torch\.load \(not a file torch\.save wrote; {ACCEPTED_WHAT}\)"),
    ("unreadable .npy", save("ids.npy", "\x93NUMPY garbage"), {},
     rf"routing trace \S*ids\.npy could not be read by numpy\.load \(ValueError: .*; {ACCEPTED_WHAT}\)"),
    ("pickled object in .pt", save("ids.pt", ModelSpec.from_shape(num_experts=E, topk=TOPK, hidden_size=64,
                                                                  intermediate_size=32)), {},
     rf"routing trace \S*ids\.pt could not be read by torch\.load \(it holds objects other than tensors, "
     rf"lists and dicts; {ACCEPTED_WHAT}\)"),
    ("not a tensor", save("ids.pt", {"topk_ids": [[0, 1]]}), {},
     rf"routing trace \S*ids\.pt holds a dict, not a tensor of topk_ids {ACCEPTED}"),
    ("one dimension", save("ids.pt", torch.arange(8)), {},
     r"routing trace \S*ids\.pt: topk_ids must have 2 dimensions \(tokens, topk\), got shape \(8,\)"),
    ("three dimensions", save("ids.npy", np.zeros((2, 3, 4), dtype=np.int32)), {},
     r"routing trace \S*ids\.npy: topk_ids must have 2 dimensions \(tokens, topk\), got shape \(2, 3, 4\)"),
    ("float ids", save("ids.pt", torch.rand(10, TOPK)), {},
     r"routing trace \S*ids\.pt: topk_ids must be integers, got torch\.float32"),
    ("float array", save("ids.npy", np.zeros((10, TOPK))), {},
     r"routing trace \S*ids\.npy: topk_ids must be integers, got float64"),
    ("empty", save("ids.pt", torch.empty(0, TOPK, dtype=torch.int32)), {},
     r"routing trace \S*ids\.pt holds no tokens \(shape \(0, 4\)\)"),
    ("ids >= E", save("ids.pt", trace_ids(num_experts=E + 1)), dict(num_experts=E, topk=TOPK),
     r"routing trace \S*ids\.pt has expert id 16, out of range for E=16 \(ids are 0\.\.E-1, or -1 for none; "
     r"an expert-parallel server records global ids\)"),
    ("ids < -1", save("ids.pt", torch.tensor([[0, -2]])), {},
     r"routing trace \S*ids\.pt has expert id -2: ids are 0\.\.E-1, or -1 for none"),
    ("wrong topk", save("ids.pt", trace_ids(topk=TOPK + 1)), dict(num_experts=E, topk=TOPK),
     r"routing trace \S*ids\.pt has 5 experts per token, the model's topk is 4 \(SGLang counts a fused shared "
     r"expert as one more: tune with the shared-expert fusion the server ran\)"),
    ("directory without dumps", empty_directory, {},
     rf"routing trace \S*dumps: the directory holds no topk_ids_layer<L>_idx<I>\.pt files {ACCEPTED}"),
    ("layer not dumped", lambda tmp_path: write_sglang_directory(tmp_path, "cpu")[0], dict(layer=7),
     r"routing trace \S*topk_ids has no dumps of layer 7 \(its layers: 3 to 10\)"),
    ("layer of a plain file", save("ids.pt", trace_ids()), dict(layer=3),
     r"routing trace \S*ids\.pt is not a dump of layer 3: layer= picks one layer of a directory of SGLang's dumps "
     r"or of a recorder dump"),
    ("recorder without per-token ids", per_pass_recorder_dump, {},
     r"routing trace \S*expert_distribution_recorder_1\.0_0\.pt: SGLang's recorder dump holds no per-token "
     r"topk_ids \(record with --expert-distribution-recorder-mode per_token\)"),
    ("recorder layer not routed", lambda tmp_path: write_recorder_dump(tmp_path, "cpu")[0], dict(layer=0),
     r"routing trace \S*_0\.pt has no routed tokens in layer 0 \(routed layers: 1 to 2\)"),
]

@pytest.mark.parametrize("write, kwargs, message", [case[1:] for case in BAD_TRACES],
                         ids=[case[0] for case in BAD_TRACES])
def test_a_bad_trace_is_refused_in_one_line_naming_the_file_and_what_is_accepted(tmp_path, write, kwargs, message):
    path = write(tmp_path)
    with pytest.raises(TuneError) as info:
        load_trace(path, **kwargs)
    text = str(info.value)
    assert "\n" not in text and str(path) in text
    assert re.fullmatch(message, text), text


def test_a_bad_trace_fails_when_the_router_is_made_before_anything_is_timed(tmp_path):
    torch.save(trace_ids(num_experts=E + 1), tmp_path / "ids.pt")
    spec = RoutingSpec("trace", trace_path=tmp_path / "ids.pt")
    with pytest.raises(TuneError, match=r"has expert id 16, out of range for E=16"):
        spec.router(E, TOPK)


@pytest.mark.parametrize("exponent", [-0.5, float("nan"), float("inf"), "1.2", True, None])
def test_a_zipf_exponent_that_is_no_finite_number_at_least_0_is_refused(exponent):
    message = r"zipf exponent must be a finite number >= 0 \(0 = every expert equally popular\), got .*"
    with pytest.raises(TuneError, match=message):
        zipf_routing(8, E, TOPK, exponent, generator("cpu"), "cpu")
    with pytest.raises(TuneError, match=message):
        RoutingSpec("zipf", exponent=exponent)


@pytest.mark.parametrize("make, message", [
    (lambda: RoutingSpec("hot"), r"routing kind 'hot' is not one of uniform, zipf, trace"),
    (lambda: RoutingSpec("uniform", exponent=1.0), r"exponent applies to zipf routing, not uniform"),
    (lambda: RoutingSpec("trace"), r"trace routing needs trace_path, a file or directory, got None"),
    (lambda: RoutingSpec("zipf", exponent=1.0, trace_path="t.pt"),
     r"trace_path and layer apply to trace routing, not zipf"),
    (lambda: RoutingSpec("trace", trace_path="t.pt", layer=-1), r"layer must be an integer >= 0, got -1"),
    (lambda: RoutingSpec.parse("zipf"), r"routing 'zipf': zipf takes its exponent right after it, as in zipf1\.2"),
    (lambda: RoutingSpec.parse("skewed"),
     r"routing 'skewed' is not one of: uniform, zipf<s> \(as zipf1\.2\), trace:<path>\[:layer<L>\]"),
    (lambda: uniform_routing(4, 4, 5, generator("cpu"), "cpu"),
     r"topk 5 must be at most E 4: a token's experts are distinct"),
    (lambda: uniform_routing(0, E, TOPK, generator("cpu"), "cpu"), r"M must be a positive integer, got 0"),
    (lambda: uniform_routing(4, E, TOPK, generator("cpu"), "cuda"),
     r"the generator is on cpu but routing is drawn on cuda: give a torch\.Generator\(device=\.\.\.\) of the same "
     r"device"),
    (lambda: RoutingSpec().draw_sets(E, TOPK, M=4, n_sets=0, seed=0, device="cpu"),
     r"n_sets must be a positive integer, got 0"),
], ids=["kind", "exponent on uniform", "trace without path", "path on zipf", "negative layer", "zipf without s",
        "unknown word", "topk > E", "M = 0", "generator elsewhere", "no sets"])
def test_bad_routing_arguments_are_refused_in_one_line(make, message):
    with pytest.raises(TuneError) as info:
        make()
    assert re.fullmatch(message, str(info.value)), str(info.value)

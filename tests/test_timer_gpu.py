"""The CUDA-graph timer on the GPU: every capture goes into one held memory pool, which a tune's hundreds of
measurements over many batch sizes neither outgrow nor break; the next measurement's graph is captured during the
running one, and kept graphs are timed again without a capture. Runs on the device only (CUDA graphs)."""

import pytest
import torch

from moe_opt.measure.cuda_graph import CudaGraphTimer
from moe_opt.model.spec import ModelSpec
from moe_opt.space import Config, ConfigPair

pytestmark = pytest.mark.gpu_only

SPEC = ModelSpec.from_shape(num_experts=16, topk=4, hidden_size=1024, intermediate_size=512)
CONFIGS = [Config(16, 64, 64, 1, 4, 3), Config(64, 64, 64, 16, 4, 3), Config(32, 128, 64, 1, 4, 2)]
BATCH_SIZES = (1, 16, 64, 256, 1024)


def test_a_second_round_of_measurements_takes_no_more_memory_than_the_first():
    timer = CudaGraphTimer(SPEC, split_stages=True)
    for c in CONFIGS:
        for M in BATCH_SIZES:
            assert timer.measure(c, M).ok
    after_first = torch.cuda.memory_reserved()
    for _ in range(2):
        for c in CONFIGS:
            for M in BATCH_SIZES:
                m = timer.measure(c, M)
                assert m.ok and m.attrs["up_us"] > 0
    # The pool's buffers are reused by the next capture: repeating the same measurements allocates nothing new.
    assert torch.cuda.memory_reserved() <= after_first


def test_the_pool_is_let_go_past_its_limit_and_measuring_goes_on():
    timer = CudaGraphTimer(SPEC)
    timer._pool.limit_bytes = 0  # every measurement that takes memory is past it
    base = timer._pool._base
    released = 0
    for M in BATCH_SIZES:
        assert timer.measure(CONFIGS[1], M).ok
        if not timer._pool.held:  # let go: the cache emptied, only the calls' own buffers kept
            released += 1
            assert torch.cuda.memory_reserved() <= base + 64 * 2**20
        else:  # held: only while the process holds no more than when the timer started
            assert torch.cuda.memory_reserved() <= base
    assert released  # the larger batch sizes' graphs take memory
    assert timer.measure(ConfigPair(CONFIGS[0], Config(16, 128, 64, 1, 4, 2)), 64).ok


def test_a_config_that_fails_mid_measurement_leaves_the_timer_usable():
    timer = CudaGraphTimer(SPEC)
    too_big = Config(256, 256, 256, 1, 4, 5)  # far past the shared memory of any GPU
    failed = timer.measure(too_big, 64)
    assert not failed.ok and "OutOfResources" in failed.error
    assert timer.healthy()
    assert timer.measure(CONFIGS[0], 64).ok


def test_a_pair_tunes_measurement_times_gemm1s_stage_inside_the_whole_call():
    timer = CudaGraphTimer(SPEC, split_stages=True)
    for M in (1, 256):
        m = timer.measure(CONFIGS[0], M)
        assert m.ok and 0 < m.attrs["up_us"] < m.latency_us
        assert m.attrs["down_us"] == pytest.approx(m.latency_us - m.attrs["up_us"])
    # A config per GEMM is the whole call only (the re-measuring step's): no stage events, no stage times.
    pair = timer.measure(ConfigPair(CONFIGS[0], CONFIGS[0]), 64)
    assert pair.ok and "up_us" not in pair.attrs


def test_a_measurement_told_to_stop_above_a_latency_times_one_replay_where_it_is_slower():
    timer = CudaGraphTimer(SPEC, split_stages=True)
    full = timer.measure(CONFIGS[1], 64)
    assert full.ok and "replays" not in full.attrs
    stopped = timer.measure(CONFIGS[1], 64, stop_above_us=full.latency_us / 10)
    assert stopped.ok and stopped.attrs["replays"] == 1 and stopped.attrs["up_us"] > 0
    assert stopped.attrs["stopped_above_us"] == full.latency_us / 10
    kept = timer.measure(CONFIGS[1], 64, stop_above_us=full.latency_us * 10)  # faster than told: every replay
    assert kept.ok and "replays" not in kept.attrs


def _counting_captures(timer):
    captured = []
    capture = timer._capture

    def counted(config, M, split, after=None):
        captured.append((config, M, after is not None))
        return capture(config, M, split, after=after)

    timer._capture = counted
    return captured


def test_the_next_measurements_graph_is_captured_during_the_running_one_and_not_again():
    timer = CudaGraphTimer(SPEC, split_stages=True)
    captured = _counting_captures(timer)
    first = timer.measure(CONFIGS[0], 64, upcoming=lambda: (CONFIGS[1], 256))
    assert first.ok and timer.prefetched
    assert captured == [(CONFIGS[0], 64, False), (CONFIGS[1], 256, True)]  # the second while the first ran
    second = timer.measure(CONFIGS[1], 256)
    assert second.ok and second.attrs["up_us"] > 0 and not timer.prefetched
    assert len(captured) == 2  # its graph was there
    again = timer.measure(CONFIGS[0], 64)  # kept: timed again without a capture (re-measuring)
    assert again.ok and len(captured) == 2


def test_a_config_that_fails_while_it_is_prepared_fails_in_its_own_measurement_only():
    timer = CudaGraphTimer(SPEC)
    too_big = Config(256, 256, 256, 1, 4, 5)  # far past the shared memory of any GPU
    running = timer.measure(CONFIGS[0], 64, upcoming=lambda: (too_big, 64))
    assert running.ok and timer.healthy()
    failed = timer.measure(too_big, 64)
    assert not failed.ok and "OutOfResources" in failed.error
    assert timer.measure(CONFIGS[1], 64).ok


class OutOfBoundsTimer(CudaGraphTimer):
    """The timer, except that one config's call first writes far out of bounds: an illegal memory access, which
    breaks the CUDA context for good, on the device and after the launch returned."""

    def __init__(self, spec, bad: Config):
        super().__init__(spec)
        inner, self.bad = self.backend, bad

        class Backend:
            def __getattr__(self, name):
                return getattr(inner, name)

            def call(self, inputs, config, M, **kwargs):
                if config == bad:
                    _write_far_out_of_bounds[(1,)](inputs_anchor)
                return inner.call(inputs, config, M, **kwargs)

        inputs_anchor = torch.zeros(1, device=self.device)
        self.backend = Backend()


def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def write_far(ptr):
        tl.store(ptr + (1 << 40), 1.0)

    return write_far


_write_far_out_of_bounds = _triton_kernel()


def test_a_config_that_breaks_the_context_while_it_is_prepared_fails_alone_and_the_one_running_is_measured():
    """In the measuring process the bad config's eager call runs during the measurement before it (the timer
    prepares it): that one is measured again alone in a fresh process, the bad one fails with its own error."""
    from functools import partial

    from moe_opt.measure.isolated import IsolatedMeasurer

    bad = CONFIGS[1]
    with IsolatedMeasurer(partial(OutOfBoundsTimer, SPEC, bad), timeout_s=120) as measurer:
        assert measurer.info.prefetches
        for config in (CONFIGS[0], bad, CONFIGS[2]):
            measurer.submit(config, 64)
        results = [measurer.collect() for _ in range(3)]
    assert results[0].ok and results[2].ok, results
    assert not results[1].ok and "illegal memory access" in results[1].error

"""The continuous-batching decode loop and the FIFO prefill queue, on the real clock."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator

import numpy as np
import pytest

from loadtest.emulator.costmodel import CostModel
from loadtest.emulator.engine import (
    DecodeEngine,
    EngineLoad,
    EngineStoppedError,
    PrefillEngine,
    TokenEvent,
)
from zones.geometry import ModelGeometry

G = ModelGeometry("tiny", num_layers=3, num_experts=16, top_k=2)
STEP = 0.02


def fixed_experts(first: int) -> Iterator[tuple[int, np.ndarray]]:
    """Endless tokens whose experts are always {first, first+1} in every layer."""
    row = np.array([[first, first + 1]] * G.num_layers, dtype=np.int32)
    for i in itertools.count():
        yield 100 + i, row


async def collect(handle) -> list[tuple[TokenEvent, float]]:
    return [(ev, time.monotonic()) async for ev in handle]


@pytest.fixture
async def engine_factory():
    engines: list[DecodeEngine] = []

    async def make(step: float = STEP, max_batch_size: int = 64) -> DecodeEngine:
        eng = DecodeEngine(CostModel.fixed(step, G), G, max_batch_size=max_batch_size)
        await eng.start()
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        await eng.stop()


async def test_tokens_arrive_spaced_by_the_step_time(engine_factory):
    eng = await engine_factory()
    start = time.monotonic()
    events = await collect(eng.submit("r", 10, 6, fixed_experts(0)))
    assert [ev.index for ev, _ in events] == list(range(6))
    assert [ev.token_id for ev, _ in events] == list(range(100, 106))
    # Token k can never arrive before k+1 modelled steps (a busy host only delays tokens), and
    # on an idle-enough host all six arrive in about six steps (generous bound: shared CI).
    arrivals = np.array([t - start for _, t in events])
    assert np.all(arrivals >= STEP * 0.95 * np.arange(1, 7))
    assert arrivals[-1] < 6 * STEP + 0.5
    stats = eng.stats()
    assert stats.steps == 6 and stats.tokens == 6
    assert stats.step_seconds_sum == pytest.approx(6 * STEP)


async def test_requests_join_at_step_boundaries_and_share_steps(engine_factory):
    eng = await engine_factory()
    first = eng.submit("a", 0, 20, fixed_experts(0))
    events_a: list[TokenEvent] = []
    async for ev in first:
        events_a.append(ev)
        if ev.index == 1:
            break
    second = eng.submit("b", 0, 3, fixed_experts(4))
    rest_a, events_b = await asyncio.gather(collect(first), collect(second))
    # b joined mid-stream and its 3 tokens shared steps with a: a's 20 tokens took 20 steps
    assert first.finish_reason == second.finish_reason == "length"
    assert len(rest_a) == 18 and len(events_b) == 3
    stats = eng.stats()
    assert stats.steps == 20
    assert stats.batch_size_sum == 23
    assert stats.batch_size.counts[1] == 3   # three steps of batch 2 (bucket le=2)


async def test_max_batch_size_holds_the_rest_waiting(engine_factory):
    eng = await engine_factory(max_batch_size=2)
    handles = [eng.submit(f"r{i}", 5, n, fixed_experts(2 * i)) for i, n in enumerate((10, 10, 3))]
    load = eng.load()
    assert (load.num_running_reqs + load.num_waiting_reqs) == 3
    first_events: list[list[tuple[int, float, EngineLoad]]] = [[], [], []]

    async def watch(i):
        async for ev in handles[i]:
            first_events[i].append((ev.index, time.monotonic(), eng.load()))

    await asyncio.gather(*(watch(i) for i in range(3)))
    # while r0 and r1 ran, r2 waited
    assert first_events[0][0][2].num_waiting_reqs == 1
    assert first_events[2][0][1] >= first_events[0][-1][1]
    stats = eng.stats()
    assert stats.steps == 13 and stats.batch_size_sum == 23
    assert stats.batch_size.counts[0] + stats.batch_size.counts[1] == stats.steps   # all <= 2


async def test_cancel_frees_the_slot_for_a_waiting_request(engine_factory):
    eng = await engine_factory(max_batch_size=1)
    long = eng.submit("long", 0, 10_000, fixed_experts(0))
    short = eng.submit("short", 0, 2, fixed_experts(2))
    async for ev in long:
        assert ev.index == 0
        long.cancel()
        break
    remaining = await collect(long)   # the stream ends at the next step boundary
    assert len(remaining) <= 1
    assert long.finish_reason == "abort"
    assert len(await collect(short)) == 2 and short.finish_reason == "length"
    assert eng.stats().requests_aborted == 1


async def test_cancel_while_waiting_and_eos_stop(engine_factory):
    eng = await engine_factory(step=0.001, max_batch_size=1)
    running = eng.submit("run", 0, 50, fixed_experts(0))
    queued = eng.submit("queued", 0, 50, fixed_experts(2))
    queued.cancel()
    assert await collect(queued) == [] and queued.finish_reason == "abort"
    await collect(running)

    def with_eos() -> Iterator[tuple[int, np.ndarray]]:
        row = np.zeros((G.num_layers, G.top_k), dtype=np.int32) + np.array([0, 1])
        yield from [(7, row), (8, row), (1, row), (9, row)]

    handle = eng.submit("eos", 0, 10, with_eos(), eos_token_id=1)
    assert [ev.token_id for ev, _ in await collect(handle)] == [7, 8, 1]
    assert handle.finish_reason == "stop"
    ignore = eng.submit("ignore", 0, 4, with_eos(), eos_token_id=None)
    assert len(await collect(ignore)) == 4 and ignore.finish_reason == "length"


async def test_distinct_experts_statistics(engine_factory):
    eng = await engine_factory(step=0.001)
    # four requests on experts {0,1}, {0,1}, {2,3}, {8,9}: 6 distinct per layer per step
    hs = [eng.submit(str(i), 0, 5, fixed_experts(f)) for i, f in enumerate((0, 0, 2, 8))]
    await asyncio.gather(*(collect(h) for h in hs))
    stats = eng.stats()
    assert stats.steps == 5
    assert stats.distinct_experts_sum == pytest.approx(5 * 6)
    hist = stats.distinct_experts_per_layer
    assert hist.count == 5 * G.num_layers and hist.sum == 5 * G.num_layers * 6
    ids = np.array([[[1, 5], [2, 3], [0, 15]], [[5, 1], [3, 4], [15, 14]]])
    assert eng.distinct_experts(ids).tolist() == [2, 3, 3]


async def test_distinct_experts_drive_the_modelled_step_time():
    model = CostModel.for_geometry(ModelGeometry("DeepSeek-V2-Lite", 26, 64, 6),
                                   time_scale=1.0)
    geometry = ModelGeometry("DeepSeek-V2-Lite", 26, 64, 6)

    def source(experts: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        row = np.array([experts] * 26, dtype=np.int32)
        return ((i, row) for i in itertools.count())

    async def run(offsets: list[int]) -> float:
        eng = DecodeEngine(model, geometry)
        await eng.start()
        try:
            hs = [eng.submit(str(i), 100, 4, source(list(range(o, o + 6))))
                  for i, o in enumerate(offsets)]
            await asyncio.gather(*(collect(h) for h in hs))
            return eng.stats().step_seconds_sum
        finally:
            await eng.stop()

    same = await run([0] * 8)                     # 6 distinct experts per layer
    mixed = await run([0, 6, 12, 18, 24, 30, 36, 42])   # 48 distinct
    assert mixed > same * 1.5


async def test_broken_token_source_aborts_only_its_request(engine_factory):
    eng = await engine_factory(step=0.001)

    def bad() -> Iterator[tuple[int, np.ndarray]]:
        yield 5, np.zeros((2, 2), dtype=np.int32)   # wrong shape

    good = eng.submit("good", 0, 3, fixed_experts(0))
    broken = eng.submit("bad", 0, 3, bad())
    assert await collect(broken) == []
    assert broken.finish_reason == "abort" and "expert_ids" in (broken.error or "")
    assert len(await collect(good)) == 3


async def test_host_lag_is_recorded_when_the_step_work_overruns(engine_factory):
    eng = await engine_factory(step=0.001)

    def slow() -> Iterator[tuple[int, np.ndarray]]:
        row = np.array([[0, 1]] * G.num_layers, dtype=np.int32)
        for i in itertools.count():
            time.sleep(0.02)    # stands in for CPU work the host cannot finish in time
            yield i, row

    await collect(eng.submit("slow", 0, 3, slow()))
    stats = eng.stats()
    assert stats.lagged_steps == 3
    assert stats.host_lag_seconds_sum >= 3 * 0.015
    assert stats.wall_seconds_sum > stats.step_seconds_sum


async def test_idle_engine_takes_no_steps_and_load_counts_tokens(engine_factory):
    eng = await engine_factory(step=0.001)
    await collect(eng.submit("r", 7, 2, fixed_experts(0)))
    steps = eng.stats().steps
    for _ in range(50):
        await asyncio.sleep(0)
    assert eng.stats().steps == steps
    assert eng.load().num_total_tokens == 0
    h = eng.submit("x", 40, 1000, fixed_experts(0))
    async for ev in h:
        load = eng.load()
        assert load.num_running_reqs == 1
        assert load.num_total_tokens == 40 + ev.index + 1
        if ev.index == 2:
            h.cancel()


async def test_submit_validation_and_stop(engine_factory):
    eng = await engine_factory()
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.submit("r", 1, -1, fixed_experts(0))
    with pytest.raises(ValueError, match="prompt_len"):
        eng.submit("r", -3, 1, fixed_experts(0))
    with pytest.raises(ValueError, match="max_batch_size"):
        DecodeEngine(CostModel.instant(), G, max_batch_size=0)
    zero = eng.submit("zero", 1, 0, fixed_experts(0))
    assert await collect(zero) == [] and zero.finish_reason == "length"
    pending = eng.submit("p", 1, 10_000, fixed_experts(0))
    await eng.stop()
    await collect(pending)
    assert pending.finish_reason == "abort"
    with pytest.raises(EngineStoppedError):
        eng.submit("late", 1, 1, fixed_experts(0))


async def test_prefill_engine_is_fifo_one_at_a_time():
    engine = PrefillEngine(CostModel.fixed(0.0, G, prefill_seconds_per_token=0.001))
    order: list[int] = []

    async def job(i: int, tokens: int) -> None:
        await engine.run(tokens)
        order.append(i)

    start = time.monotonic()
    tasks = [asyncio.ensure_future(job(i, 10)) for i in range(3)]
    await asyncio.sleep(0)   # let all three enqueue
    load = engine.load()
    assert load.num_running_reqs == 1 and load.num_waiting_reqs == 2
    assert load.num_total_tokens == 30
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert time.monotonic() - start >= 0.03 * 0.95     # serialised: 3 x 10 ms
    assert engine.load().num_total_tokens == 0
    assert engine.stats().tokens == 30


async def test_prefill_cancelled_while_waiting_releases_its_place():
    engine = PrefillEngine(CostModel.fixed(0.0, G, prefill_seconds_per_token=0.01))
    first = asyncio.ensure_future(engine.run(5))
    second = asyncio.ensure_future(engine.run(7))
    await asyncio.sleep(0)
    assert engine.load().num_waiting_reqs == 1
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert engine.load().num_waiting_reqs == 0 and engine.load().num_total_tokens == 5
    await first
    assert engine.load() == engine.load().__class__(0, 0, 0)
    with pytest.raises(ValueError, match="num_tokens"):
        await engine.run(-1)


class _BrokenCostModel:
    def decode_step_seconds(self, batch_size, distinct, kv_tokens):
        raise RuntimeError("boom")


async def test_a_failing_step_aborts_every_request_instead_of_hanging():
    eng = DecodeEngine(_BrokenCostModel(), G)  # type: ignore[arg-type]
    await eng.start()
    try:
        handles = [eng.submit(str(i), 0, 5, fixed_experts(0)) for i in range(3)]
        for h in handles:
            assert await collect(h) == []
            assert h.finish_reason == "abort" and "boom" in (h.error or "")
        with pytest.raises(EngineStoppedError, match="failed"):
            eng.submit("late", 0, 1, fixed_experts(0))
    finally:
        await eng.stop()

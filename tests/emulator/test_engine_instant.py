"""The instant path: requests that do not report routed experts skip routing, with the same
tokens and text as a routed run; an engine that needs expert ids refuses a source without them."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import aiohttp
import numpy as np
import pytest

from loadtest.emulator.cluster import ClusterConfig, run_cluster
from loadtest.emulator.config import EngineOptions, WorkerConfig
from loadtest.emulator.costmodel import CostModel
from loadtest.emulator.engine import DecodeEngine
from loadtest.emulator.pd import LocalBootstraps
from loadtest.emulator.routing import (
    BigramWalk,
    RoutingSource,
    TokenHashRouting,
    default_trace_path,
    make_routing_source,
)
from loadtest.emulator.server import WorkerServer
from loadtest.emulator.tokenizer import Tokenizer
from tests.emulator.workers import wait_until
from zones.geometry import ModelGeometry, geometry_by_name

G = ModelGeometry("tiny", num_layers=3, num_experts=16, top_k=2)
PROMPT = "the court reads the contract and the judge hears the appeal about the contract terms"


def routed(first: int) -> Iterator[tuple[int, np.ndarray]]:
    row = np.array([[first, first + 1]] * G.num_layers, dtype=np.int32)
    for i in itertools.count():
        yield 100 + i, row


def unrouted() -> Iterator[tuple[int, None]]:
    for i in itertools.count():
        yield 200 + i, None




async def drain(handle: Any) -> list[Any]:
    return [ev async for ev in handle]


async def test_instant_engine_accepts_tokens_without_experts_and_counts_only_routed_ones():
    eng = DecodeEngine(CostModel.instant(), G, experts_required=False)
    await eng.start()
    try:
        plain = await drain(eng.submit("plain", 4, 5, unrouted()))
        assert [ev.token_id for ev in plain] == [200, 201, 202, 203, 204]
        assert all(ev.expert_ids is None for ev in plain)
        stats = eng.stats()
        assert stats.steps == 5 and stats.routed_steps == 0 and stats.distinct_experts_sum == 0
        # A routed request next to an unrouted one: distinct experts cover the routed one only.
        both = await asyncio.gather(drain(eng.submit("r", 4, 3, routed(4))),
                                    drain(eng.submit("u", 4, 3, unrouted())))
        assert [ev.expert_ids.tolist() for ev in both[0]] == [[[4, 5]] * 3] * 3
        stats = eng.stats()
        assert stats.routed_steps >= 3
        assert stats.distinct_experts_sum == pytest.approx(2.0 * stats.routed_steps)
    finally:
        await eng.stop()


async def test_engine_that_needs_experts_aborts_only_the_source_without_them():
    eng = DecodeEngine(CostModel.instant(), G)   # experts_required defaults to True
    await eng.start()
    try:
        bad = eng.submit("bad", 4, 3, unrouted())
        good = eng.submit("good", 4, 3, routed(0))
        await asyncio.gather(drain(bad), drain(good))
        assert bad.finish_reason == "abort" and "no expert ids" in (bad.error or "")
        assert good.finish_reason == "length" and good.completion_tokens == 3
    finally:
        await eng.stop()


async def test_engine_aborts_a_source_with_out_of_range_experts_and_keeps_the_batch():
    eng = DecodeEngine(CostModel.instant(), G)
    await eng.start()

    def broken() -> Iterator[tuple[int, np.ndarray]]:
        yield 7, np.full((G.num_layers, G.top_k), G.num_experts, dtype=np.int32)

    try:
        bad = eng.submit("bad", 4, 3, broken())
        good = eng.submit("good", 4, 3, routed(2))
        await asyncio.gather(drain(bad), drain(good))
        assert bad.finish_reason == "abort" and "outside" in (bad.error or "")
        assert good.finish_reason == "length"
    finally:
        await eng.stop()


async def test_instant_pd_request_skips_routing_but_returns_the_routed_runs_tokens(
        session: aiohttp.ClientSession) -> None:
    config = ClusterConfig(prefill=1, decode=1, engine=EngineOptions(instant=True))
    async with run_cluster(config) as c:
        decode_url = c.decode_urls[0]

        async def pd(room: int, **extra: Any) -> dict[str, Any]:
            body = {"text": PROMPT, "bootstrap_host": "127.0.0.1",
                    "bootstrap_port": c.prefill[0].bootstrap_port, "bootstrap_room": room,
                    "sampling_params": {"max_new_tokens": 40, "ignore_eos": True}, **extra}

            async def one(url: str) -> dict[str, Any]:
                async with session.post(url + "/generate", json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    out: dict[str, Any] = await resp.json()
                    return out
            pre, dec = await asyncio.gather(one(c.prefill_urls[0]), one(decode_url))
            assert pre["output_ids"] == dec["output_ids"][:1]
            return dec

        plain = await pd(7)
        async with session.get(decode_url + "/emulator/stats") as resp:
            stats = await resp.json()
        assert stats["steps"] > 0 and stats["routed_steps"] == 0   # nothing was routed
        with_experts = await pd(7, return_routed_experts=True)
        assert "routed_experts" not in plain["meta_info"]
        assert with_experts["meta_info"]["routed_experts"]
        # Same room -> same continuation: skipping routing changed no token and no text.
        assert plain["output_ids"] == with_experts["output_ids"]
        assert plain["text"] == with_experts["text"]
        async with session.get(decode_url + "/emulator/stats") as resp:
            assert (await resp.json())["routed_steps"] > 0


async def test_in_process_bootstrap_hands_over_the_kv_without_http(
        session: aiohttp.ClientSession) -> None:
    local = LocalBootstraps()
    opts = EngineOptions(instant=True)
    async with WorkerServer(WorkerConfig(role="prefill", engine=opts),
                            local_bootstraps=local) as prefill, \
            WorkerServer(WorkerConfig(role="decode", engine=opts),
                         local_bootstraps=local) as decode:
        def body(room: int) -> dict[str, Any]:
            return {"text": PROMPT, "bootstrap_host": "127.0.0.1",
                    "bootstrap_port": prefill.bootstrap_port, "bootstrap_room": room,
                    "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}}

        async def post(url: str, room: int) -> tuple[int, Any]:
            async with session.post(url + "/generate", json=body(room)) as resp:
                return resp.status, await resp.json()

        (ps, pre), (ds, dec) = await asyncio.gather(post(prefill.url, 1), post(decode.url, 1))
        assert (ps, ds) == (200, 200)
        assert dec["output_ids"][0] == pre["output_ids"][0] and len(dec["output_ids"]) == 5
        assert local.collected == 1
        # A decode that disconnects while waiting in-process fails the room, as a closed
        # bootstrap connection does: the prefill then answers SGLang's bootstrap failure.
        registry = prefill.worker.registry
        decode_task = asyncio.ensure_future(post(decode.url, 2))
        await wait_until(lambda: len(registry) == 1)
        decode_task.cancel()
        await wait_until(lambda: len(registry) == 0)
        status, out = await post(prefill.url, 2)
        assert status == 500 and "disconnected" in out["message"]
        assert local.collected == 1
    assert local.lookup("127.0.0.1", prefill.bootstrap_port or 0) is None   # unregistered


def test_every_routing_source_draws_its_tokens_from_the_bigram_walk() -> None:
    """What the prefill's routing-free first token and the unrouted stream rely on."""
    tok = Tokenizer()
    ids = tok.encode(PROMPT)
    sources: list[RoutingSource] = [
        TokenHashRouting(geometry_by_name("Qwen3-30B-A3B"), tok, seed=5)]
    trace_path = default_trace_path()
    if trace_path.is_file():
        sources.append(make_routing_source("trace", G, tok, trace_path=str(trace_path)))
    for source in sources:
        for seed in (0, 17):
            walk = BigramWalk(ids, seed, tok.eos_token_id)
            want = [walk.next_token() for _ in range(100)]
            got = [t for t, _ in itertools.islice(source.continuation(ids, PROMPT, seed), 100)]
            assert got == want, type(source).__name__

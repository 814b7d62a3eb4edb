"""Clients that leave at random points, in front of emulated workers (finding 1, fuzzed): while
the request body is still being sent, right after it, while waiting for the answer's head, or
after some bytes of a stream or a body; both PD flows, streaming and not, several at once. After
the run every in-flight count and gauge is back to 0 within 1 s, and the gateway still serves.

The plans come from a seeded generator, so a failure names a reproducible plan."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest

from gateway.config import PrefillSpec, Settings
from gateway.state import GatewayState
from loadtest.emulator.cluster import ClusterConfig, run_cluster
from loadtest.emulator.config import EngineOptions
from tests.gateway.conftest import pd_settings
from tests.gateway.fakes import start_workers
from tests.gateway_server import running_gateway

pytestmark = pytest.mark.slow

ENGINE = EngineOptions(time_scale=0.05, bootstrap_timeout_secs=5.0, waiting_timeout_secs=5.0)
PLANS = 120
AT_ONCE = 8
POINTS = ("mid_body", "after_body", "after_delay", "after_bytes")


@dataclass(frozen=True)
class Plan:
    path: str
    stream: bool
    point: str  # one of POINTS
    delay: float  # seconds, for after_delay
    nbytes: int  # response bytes read first, for after_bytes

    def body(self, i: int) -> bytes:
        if self.path == "/generate":
            doc: dict[str, object] = {"text": f"plan {i} " * 20, "stream": self.stream,
                                      "sampling_params": {"max_new_tokens": 16}}
        else:
            doc = {"model": "m", "stream": self.stream, "max_tokens": 16,
                   "messages": [{"role": "user", "content": f"plan {i} " * 20}]}
        return orjson.dumps(doc)


def plans(seed: int) -> list[Plan]:
    rng = random.Random(seed)
    return [Plan(rng.choice(("/generate", "/v1/chat/completions")), rng.random() < 0.6,
                 rng.choice(POINTS), rng.uniform(0.0, 0.06), rng.randint(1, 600))
            for _ in range(PLANS)]


async def run_plan(base: str, plan: Plan, i: int) -> None:
    url = urlsplit(base)
    body = plan.body(i)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    head = (f"POST {plan.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    try:
        if plan.point == "mid_body":
            writer.write(head + body[: len(body) // 2])
            await writer.drain()
            return
        writer.write(head + body)
        await writer.drain()
        if plan.point == "after_delay":
            await asyncio.sleep(plan.delay)
        elif plan.point == "after_bytes":
            got = 0
            while got < plan.nbytes:
                try:
                    chunk = await asyncio.wait_for(reader.read(plan.nbytes - got), 1.0)
                except asyncio.TimeoutError:
                    break  # nothing comes (a non-stream answer waits for its prefill): leave
                if not chunk:
                    break
                got += len(chunk)
    finally:
        writer.transport.abort()  # a reset, not a polite close: the harshest client


def leftovers(state: GatewayState) -> dict[str, float]:
    counts: dict[str, float] = {w.worker_id: w.in_flight for w in state.workers if w.in_flight}
    for metric in state.registry.collect():
        if metric.name == "eldr_worker_active_requests":
            for sample in metric.samples:
                if sample.value:
                    counts[f"{sample.name}{sample.labels}"] = sample.value
    return counts


async def fuzz(url: str, state: GatewayState, seed: int, *, stream_after: bool = False) -> None:
    """Run the seeded plans AT_ONCE at a time, then check nothing is left in flight and that a
    request still succeeds (`stream_after`: a stream, which does not wait for the prefill)."""
    todo = plans(seed)
    gate = asyncio.Semaphore(AT_ONCE)
    peak = 0

    async def one(i: int, plan: Plan) -> None:
        async with gate:
            await run_plan(url, plan, i)

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, sum(w.in_flight for w in state.workers))
            await asyncio.sleep(0.002)

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.gather(*(one(i, p) for i, p in enumerate(todo)))
    finally:
        watcher.cancel()
    assert peak >= 2, "no plan reached the workers: the run tests nothing"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.0
    while leftovers(state) and loop.time() < deadline:
        await asyncio.sleep(0.02)
    assert leftovers(state) == {}, f"seed {seed}"
    async with aiohttp.ClientSession() as s, s.post(url + "/generate", json={
            "text": "still serving", "stream": stream_after,
            "sampling_params": {"max_new_tokens": 2}}) as r:
        assert r.status == 200, await r.text()
        assert (await r.read()).endswith(b"data: [DONE]\n\n") or not stream_after


@pytest.mark.parametrize("flow", ["dual", "prefill-first"])
async def test_random_disconnects_in_front_of_emulated_workers(flow: str) -> None:
    async with run_cluster(ClusterConfig(prefill=1, decode=2, engine=ENGINE)) as cluster:
        settings = Settings(
            pd_disaggregation=True, pd_flow=flow,
            prefill=[PrefillSpec(w.url, w.bootstrap_port) for w in cluster.prefill],
            decode=cluster.decode_urls, prometheus_port=0, request_timeout_secs=20.0,
            retry_initial_backoff_ms=1, retry_max_backoff_ms=5)
        async with running_gateway(settings) as (url, state):
            await fuzz(url, state, seed=7 if flow == "dual" else 8)


async def test_random_disconnects_while_a_prefill_hangs() -> None:
    """The finding's shape: one prefill never answers (as with a wrong bootstrap port) while
    its decodes stream anyway; legs that no longer serve a client must not hold anything."""
    hanging = (await start_workers("prefill", hang=True))[0]
    decodes = await start_workers("decode", "decode", chunks=30, chunk_delay=0.01)
    settings = pd_settings([hanging], decodes, request_timeout_secs=30.0)
    try:
        async with running_gateway(settings) as (url, state):
            await fuzz(url, state, seed=9, stream_after=True)
    finally:
        hanging.released.set()
        for worker in (hanging, *decodes):
            await worker.close()

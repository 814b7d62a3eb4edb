"""A request's accounting ends when the client has its answer (or is gone), never when a prefill
leg that no longer serves it ends (issue: stuck in-flight counts and head-of-line blocking).

The prefill here answers only when released, like a prefill whose bootstrap port is wrong (it
waits for a decode that will never connect) while the decode streams anyway (in these fakes the
decode does not need the KV transfer)."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from gateway.state import GatewayState
from tests.gateway.conftest import pd_settings
from tests.gateway.fakes import start_workers
from tests.gateway_server import running_gateway


async def until(cond: object, timeout: float = 5.0) -> float:
    """Wait for `cond()`; returns how long it took."""
    t0 = time.perf_counter()
    while not cond():  # type: ignore[operator]
        assert time.perf_counter() - t0 < timeout, "condition not reached"
        await asyncio.sleep(0.01)
    return time.perf_counter() - t0


def in_flight(state: GatewayState) -> dict[str, int]:
    return {w.role: w.in_flight for w in state.workers}


def unfinished(state: GatewayState) -> float:
    """Sum of the active-requests gauge over workers."""
    total = 0.0
    for metric in state.registry.collect():
        if metric.name == "eldr_worker_active_requests":
            total += sum(s.value for s in metric.samples)
    return total


async def test_stream_answered_while_prefill_hangs_releases_everything_at_once() -> None:
    prefill = (await start_workers("prefill", hang=True))[0]
    decode = (await start_workers("decode"))[0]
    settings = pd_settings([prefill], [decode], request_timeout_secs=30.0)
    try:
        async with running_gateway(settings) as (url, state), aiohttp.ClientSession() as s:
            t0 = time.perf_counter()
            async with s.post(url + "/generate", json={"text": "x", "stream": True}) as r:
                body = await r.read()
            assert r.status == 200 and body.endswith(b"data: [DONE]\n\n")
            # Answered at once although the prefill leg is open for 30 s.
            assert time.perf_counter() - t0 < 2.0
            assert in_flight(state)["decode"] == 0
            # The prefill leg lingers at most PREFILL_LINGER_SECS, then is abandoned, and its
            # connection closed: that is how SGLang learns to abort the request.
            assert await until(lambda: in_flight(state)["prefill"] == 0) < 1.5
            assert unfinished(state) == 0
            assert await until(lambda: prefill.disconnects == 1) < 1.0
    finally:
        await prefill.close()
        await decode.close()


async def test_next_request_on_the_same_connection_is_not_blocked() -> None:
    prefill = (await start_workers("prefill", hang=True))[0]
    decode = (await start_workers("decode"))[0]
    settings = pd_settings([prefill], [decode], request_timeout_secs=30.0)
    try:
        async with running_gateway(settings) as (url, _state):
            connector = aiohttp.TCPConnector(limit=1)  # one keep-alive connection for both
            async with aiohttp.ClientSession(connector=connector) as s:
                t0 = time.perf_counter()
                for _ in range(2):
                    async with s.post(url + "/generate",
                                      json={"text": "x", "stream": True}) as r:
                        assert r.status == 200
                        await r.read()
                assert time.perf_counter() - t0 < 3.0  # not 30 s per request
    finally:
        await prefill.close()
        await decode.close()


async def test_client_gone_mid_stream_releases_accounting_while_prefill_hangs() -> None:
    prefill = (await start_workers("prefill", hang=True))[0]
    decode = (await start_workers("decode", chunks=50, chunk_delay=0.05))[0]
    settings = pd_settings([prefill], [decode], request_timeout_secs=30.0)
    try:
        async with running_gateway(settings) as (url, state):
            async with aiohttp.ClientSession() as s:
                r = await s.post(url + "/generate", json={"text": "x", "stream": True})
                assert r.status == 200
                await r.content.readany()  # the first chunk, then the client leaves
                r.close()
            assert await until(lambda: in_flight(state) == {"prefill": 0, "decode": 0}) < 1.5
            assert unfinished(state) == 0
    finally:
        await prefill.close()
        await decode.close()


async def test_prefill_answering_just_after_the_stream_is_still_recorded() -> None:
    """A prefill whose answer trails the decode's last chunk (the normal case) is waited for,
    off the client's path, and its outcome reaches its breaker (here: a 500 opens it)."""
    prefill = (await start_workers("prefill", hang=True, status=500))[0]
    decode = (await start_workers("decode"))[0]
    settings = pd_settings([prefill], [decode], request_timeout_secs=30.0,
                           cb_failure_threshold=1)
    try:
        async with running_gateway(settings) as (url, state), aiohttp.ClientSession() as s:
            async with s.post(url + "/generate", json={"text": "x", "stream": True}) as r:
                assert r.status == 200
                await r.read()
            worker = next(w for w in state.workers if w.role == "prefill")
            assert worker.in_flight == 1 and worker.breaker.state == "closed"  # lingering
            prefill.released.set()  # answers 500 well within the linger
            await until(lambda: worker.in_flight == 0)
            assert worker.breaker.state == "open"
    finally:
        await prefill.close()
        await decode.close()

"""Prefix and key policies through the gateway, with fake workers on loopback sockets."""

from __future__ import annotations

import aiohttp

from tests.gateway.conftest import pd_settings
from tests.gateway.fakes import FakeWorker, start_workers
from tests.gateway_server import running_gateway

SYSTEM = "You are a careful assistant who answers in one sentence. " * 30


def _served(workers: list[FakeWorker], before: list[int]) -> str:
    """The URL of the one worker whose received count grew since `before`."""
    grown = [w.url for w, n in zip(workers, before, strict=True) if len(w.received) > n]
    assert len(grown) == 1
    return grown[0]


async def test_cache_aware_keeps_a_shared_prefix_on_one_worker_and_spreads_the_rest():
    workers = await start_workers("regular", "regular", "regular")
    try:
        settings = pd_settings([], [], pd_disaggregation=False, policy="cache_aware",
                               worker_urls=[w.url for w in workers])
        async with (running_gateway(settings) as (url, _), aiohttp.ClientSession() as session):

            async def send(prompt: str) -> str:
                before = [len(w.received) for w in workers]
                async with session.post(url + "/v1/completions",
                                        json={"prompt": prompt}) as r:
                    assert r.status == 200
                    await r.read()
                return _served(workers, before)

            shared = {await send(SYSTEM + f"Question {i}: why?") for i in range(5)}
            assert len(shared) == 1
            distinct = {await send(f"{i} unrelated prompt number {i} " * 3) for i in range(4)}
            assert len(distinct) >= 2
            assert await send(SYSTEM + "One more question.") == shared.pop()
    finally:
        for w in workers:
            await w.close()


async def test_manual_pins_a_routing_key_in_pd_mode():
    prefills = await start_workers("prefill", "prefill")
    decodes = await start_workers("decode", "decode", "decode")
    try:
        settings = pd_settings(prefills, decodes, policy="manual")
        async with (running_gateway(settings) as (url, _), aiohttp.ClientSession() as session):

            async def send(key: str, text: str) -> tuple[str, str]:
                before_p = [len(w.received) for w in prefills]
                before_d = [len(w.received) for w in decodes]
                async with session.post(url + "/generate", json={"text": text},
                                        headers={"X-SMG-Routing-Key": key}) as r:
                    assert r.status == 200
                    await r.read()
                return _served(prefills, before_p), _served(decodes, before_d)

            for key in ("alice", "bob", "carol"):
                pairs = {await send(key, f"message {i}") for i in range(6)}
                assert len(pairs) == 1, key
    finally:
        for w in prefills + decodes:
            await w.close()

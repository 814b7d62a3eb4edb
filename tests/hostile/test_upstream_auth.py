"""Finding 5: with `--api-key`, the client's Authorization header never reaches a worker; the
worker sees exactly one Authorization, the gateway's. Without a key the client's is passed on,
as the Rust router does (shown here so the first test cannot pass by dropping every header)."""

from __future__ import annotations

import aiohttp

from tests.gateway.conftest import pd_settings
from tests.gateway_server import running_gateway
from tests.hostile.helpers import recording_workers

CLIENT = {"Authorization": "Bearer client-secret"}
REQUESTS = [("/generate", {"text": "x"}), ("/generate", {"text": "x", "stream": True}),
            ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user",
                                                                   "content": "hi"}]}),
            ("/v1/completions", {"model": "m", "prompt": "x", "stream": True})]


async def test_client_authorization_is_replaced_by_the_api_key():
    async with recording_workers("prefill", "decode") as (prefill, decode), \
            running_gateway(pd_settings([prefill], [decode], api_key="worker-key")) \
            as (base, _), aiohttp.ClientSession() as s:
        for path, body in REQUESTS:
            async with s.post(base + path, json=body, headers=CLIENT) as r:
                assert r.status == 200, await r.text()
                await r.read()
        async with s.get(base + "/get_server_info", headers=CLIENT) as r:
            assert r.status == 200
    for worker in (prefill, decode):
        expected = len(REQUESTS) + (1 if worker is decode else 0)  # server_info asks decode
        assert worker.authorizations == [["Bearer worker-key"]] * expected, worker.role


async def test_without_an_api_key_the_client_authorization_is_passed_on():
    async with recording_workers("prefill", "decode") as (prefill, decode), \
            running_gateway(pd_settings([prefill], [decode])) as (base, _), \
            aiohttp.ClientSession() as s, \
            s.post(base + "/generate", json={"text": "x"}, headers=CLIENT) as r:
        assert r.status == 200
    assert prefill.authorizations == decode.authorizations == [["Bearer client-secret"]]

"""Workers enter rotation only after a passing health check (the Rust router's
--worker-startup-timeout-secs / --worker-startup-check-interval): a dead command-line worker is
never sent a request, and /readiness says so."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp.test_utils import TestServer

from gateway.config import Settings
from loadtest.procs import free_port
from tests.gateway.conftest import pd_settings
from tests.gateway.fakes import FakeWorker, start_workers
from tests.gateway_server import running_gateway


async def test_dead_regular_worker_is_out_of_rotation_and_not_ready() -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = Settings(worker_urls=[dead], prometheus_port=0, health_check_timeout_secs=0.5)
    async with running_gateway(settings) as (url, state), aiohttp.ClientSession() as s:
        async with s.get(url + "/readiness") as r:
            assert r.status == 503
        async with s.post(url + "/generate", json={"text": "x"}) as r:
            assert r.status == 503  # no available worker, not a 502 from a dead one
            assert "no available regular workers" in (await r.json())["error"]["message"]
        assert not next(iter(state.workers)).healthy


async def test_dead_decode_keeps_pd_not_ready_and_the_live_one_serves() -> None:
    prefill, decode = await start_workers("prefill", "decode")
    try:
        settings = pd_settings([prefill], [decode])
        settings = settings.replace(decode=[decode.url, f"http://127.0.0.1:{free_port()}"])
        async with running_gateway(settings) as (url, _), aiohttp.ClientSession() as s:
            for _ in range(4):  # every request goes to the live decode
                async with s.post(url + "/generate", json={"text": "x"}) as r:
                    assert r.status == 200
            assert len(decode.received) == 4
            async with s.get(url + "/readiness") as r:
                assert r.status == 200  # one healthy prefill and one healthy decode
    finally:
        for w in (prefill, decode):
            await w.close()


async def test_worker_that_comes_up_later_joins_after_a_startup_check() -> None:
    late = FakeWorker("regular")
    port = free_port()
    settings = Settings(worker_urls=[f"http://127.0.0.1:{port}"], prometheus_port=0,
                        health_check_timeout_secs=0.5, worker_startup_check_interval=0.1,
                        health_check_interval_secs=60.0)
    async with running_gateway(settings) as (url, state), aiohttp.ClientSession() as s:
        worker = next(iter(state.workers))
        assert not worker.healthy
        late.server = TestServer(late.app(), host="127.0.0.1", port=port)
        await late.server.start_server()
        try:
            for _ in range(100):
                if worker.healthy:
                    break
                await asyncio.sleep(0.05)
            assert worker.healthy  # well before the 60 s periodic round
            async with s.post(url + "/generate", json={"text": "x"}) as r:
                assert r.status == 200
        finally:
            await late.close()


async def test_disabled_health_checks_trust_the_command_line() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    settings = Settings(worker_urls=[dead], prometheus_port=0, disable_health_check=True)
    async with running_gateway(settings) as (_url, state):
        assert next(iter(state.workers)).healthy

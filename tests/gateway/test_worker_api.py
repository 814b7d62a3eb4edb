"""The worker API answers with smg 1.13's fields (measured against smg 1.13.0 on 2026-12-02:
POST /workers -> 202 {status, worker_id, url, location, message}; GET /workers -> {workers:
[{id, url, worker_type, connection_mode, is_healthy, status, load, ...}], total, stats})."""

from __future__ import annotations

import aiohttp

from tests.gateway.conftest import pd_settings
from tests.gateway.fakes import start_workers
from tests.gateway_server import running_gateway


async def test_add_then_list_and_follow_location() -> None:
    prefill, decode, extra = await start_workers("prefill", "decode", "decode")
    try:
        async with running_gateway(pd_settings([prefill], [decode])) as (url, _), \
                aiohttp.ClientSession() as s:
            async with s.post(url + "/workers", json={"url": extra.url,
                                                      "worker_type": "decode"}) as r:
                assert r.status == 202
                added = await r.json()
            assert added["status"] == "accepted" and added["url"] == extra.url
            async with s.get(url + added["location"]) as r:
                assert r.status == 200
                worker = await r.json()
            assert worker["url"] == extra.url and worker["worker_type"] == "decode"
            async with s.get(url + "/workers") as r:
                listing = await r.json()
            assert listing["total"] == 3
            assert listing["stats"] == {"prefill_count": 1, "decode_count": 2,
                                        "regular_count": 0}
            first = next(w for w in listing["workers"] if w["url"] == decode.url)
            assert first["connection_mode"] == "http" and first["status"] == "ready"
            assert first["is_healthy"] is True and first["load"] == 0
    finally:
        for w in (prefill, decode, extra):
            await w.close()

"""SIGTERM: requests in progress get the grace period once (not twice), and a stream still open
at its end is closed with an error event saying why, not cut silently."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import orjson
import pytest

from tests.gateway.fakes import start_workers
from tests.hostile.helpers import gateway_process

GRACE = 1.5


@pytest.mark.slow
async def test_stream_open_at_the_end_of_the_grace_period_ends_with_an_event() -> None:
    prefill = (await start_workers("prefill"))[0]
    decode = (await start_workers("decode", chunks=1000, chunk_delay=0.05))[0]
    try:
        async with gateway_process(prefill, decode, "--shutdown-grace-period-secs",
                                   str(GRACE)) as (proc, url), aiohttp.ClientSession() as s:
            r = await s.post(url + "/generate", json={"text": "x", "stream": True})
            await r.content.readline()
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            lines = [line async for line in r.content if line.strip()]  # ends cleanly
            took = time.monotonic() - t0
            last = orjson.loads(lines[-1].removeprefix(b"data: "))
            assert last["error"]["type"] == "shutdown"
            assert GRACE - 0.2 < took < GRACE + 1.5  # once the grace period, not twice
            assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        await prefill.close()
        await decode.close()

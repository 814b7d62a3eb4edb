from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.config import PrefillSpec, Settings
from tests.gateway.fakes import FakeWorker, start_workers


def pd_settings(prefills: list[FakeWorker], decodes: list[FakeWorker], **kw: Any) -> Settings:
    base: dict[str, Any] = dict(
        pd_disaggregation=True,
        prefill=[PrefillSpec(w.url, 8998) for w in prefills],
        decode=[w.url for w in decodes],
        prometheus_port=0, retry_initial_backoff_ms=1, retry_max_backoff_ms=5,
        health_check_interval_secs=0.05, health_check_timeout_secs=1.0,
        load_poll_interval_secs=0.05, request_timeout_secs=10.0,
    )
    base.update(kw)
    return Settings(**base)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def pd_cluster() -> AsyncIterator[tuple[list[FakeWorker], list[FakeWorker]]]:
    prefills = await start_workers("prefill", "prefill")
    decodes = await start_workers("decode", "decode")
    yield prefills, decodes
    for w in prefills + decodes:
        await w.close()

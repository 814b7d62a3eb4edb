"""Finding 3: display paths never echo credentials written into a URL or a name, even one that
got past `check_url` (a zone table's worker names are free strings)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway.eldr.runtime import ZoneRuntime
from gateway.urls import redact_url
from tests.eldr.helpers import table
from tests.gateway.conftest import pd_settings
from tests.gateway_server import running_gateway
from tests.hostile.helpers import recording_workers
from zones.table import save_table

SECRET = "hunter2"


@pytest.mark.parametrize("given,shown", [
    ("http://user:hunter2@h:1", "http://***@h:1"),
    ("https://hunter2@h", "https://***@h"),
    ("http://a@b:hunter2@h:1/x", "http://***@h:1/x"),
    ("user:hunter2@h:1", "***@h:1"),
    ("//user:hunter2@h", "//***@h"),
    ("http://h:1", "http://h:1"),
    ("http://h:1/path@not-userinfo", "http://h:1/path@not-userinfo"),
    ("http://h:1?next=a@b", "http://h:1?next=a@b"),
    ("decode-0", "decode-0"),
    ("", ""),
])
def test_redact_url(given, shown):
    assert redact_url(given) == shown


async def test_worker_listings_never_echo_userinfo():
    async with recording_workers("prefill", "decode") as (prefill, decode), \
            running_gateway(pd_settings([prefill], [decode], disable_health_check=True,
                                        load_poll_interval_secs=0)) as (base, state), \
            aiohttp.ClientSession() as s:
        # Past every entry check (the registry itself does not validate), as a bug might.
        state.workers.add(f"http://ops:{SECRET}@127.0.0.1:9", "decode")
        for path in ("/workers", "/get_loads", "/v1/loads"):
            async with s.get(base + path) as r:
                text = await r.text()
                assert r.status == 200, text
                assert SECRET not in text, path
                assert "http://***@127.0.0.1:9" in text, path


async def test_a_worker_id_carrying_credentials_is_refused():
    """The id is a metrics label and appears in logs, so the URL rule applies to it too."""
    async with recording_workers("prefill", "decode", "decode") as (prefill, decode, extra), \
            running_gateway(pd_settings([prefill], [decode])) as (base, state), \
            aiohttp.ClientSession() as s:
        body = {"url": extra.url, "worker_type": "decode", "id": f"http://ops:{SECRET}@d9:1"}
        async with s.post(base + "/workers", json=body) as r:
            text = await r.text()
            assert r.status == 400, text
        assert SECRET not in text and "id: " in text
        assert len(state.workers) == 2
        async with s.get(base + "/metrics") as r:
            assert SECRET not in await r.text()


def test_zone_info_redacts_credentials_in_table_worker_names(tmp_path: Path):
    path = tmp_path / "zones.json"
    names = [f"http://ops:{SECRET}@d0:1", f"ops:{SECRET}@d1:1", "http://d2:1"]
    save_table(table([[1, 0, 0], [0, 1, 0], [0, 0, 1]], names), path)
    runtime = ZoneRuntime(path)
    assert asyncio.run(runtime.reload()).status == "loaded"
    table_workers = ["http://***@d0:1", "***@d1:1", "http://d2:1"]
    info = runtime.info()  # before the registry reports: each zone shows its table name
    assert SECRET not in orjson.dumps(info).decode()
    assert [r["table_worker"] for r in info["workers"]] == table_workers
    assert [r["worker"] for r in info["workers"]] == table_workers
    runtime.set_workers([(names[0], names[0]), ("http://d2:1", "http://d2:1")])
    info = runtime.info()
    assert SECRET not in orjson.dumps(info).decode()
    assert [r["worker"] for r in info["workers"]] == ["http://***@d0:1", None, "http://d2:1"]

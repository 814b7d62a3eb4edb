"""Zone tables swapped under load: the gateway as a subprocess (`python -m gateway`, eldr policy,
prefill-first flow) in front of the in-process emulated cluster, a closed loop of clients sending
the whole time, and the table replaced by atomic rename (watcher), rename + SIGHUP, and the admin
endpoint, then corrupt tables by each route.

Asserted: every request completes with 200 and none takes longer than `LATENCY_BOUND_SECS`
(a stall would show as the 60 s request timeout); requests keep completing between every swap;
a good table becomes active (checksum at GET /zones); a corrupt one is rejected with a clear error
at GET /zones, in the admin answer (422) and in `eldr_zone_reloads_total{result="failed"}`, while
the old table keeps its checksum and keeps routing (prefill signatures keep being resolved and no
decision falls back for want of a table).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest

from loadtest.emulator.cluster import Cluster, ClusterConfig, run_cluster
from loadtest.emulator.config import EngineOptions
from loadtest.procs import free_port
from zones.geometry import geometry_by_name
from zones.signature import SignatureSpec
from zones.table import make_table, table_to_json

pytestmark = pytest.mark.slow

MODEL = "Qwen3-30B-A3B"
ENGINE = EngineOptions(model=MODEL, time_scale=0.05, bootstrap_timeout_secs=20.0,
                       waiting_timeout_secs=20.0, prefill_first_hold_secs=20.0)
TOKEN = "reload-secret"
CLIENTS = 6
# Requests are 4 output tokens at time scale 0.05 (milliseconds of modelled time); seconds means
# the busy host, tens of seconds a stall. The gateway's request timeout is 60 s.
LATENCY_BOUND_SECS = 10.0
# Completions required between two swaps: proof that traffic flowed through each swap.
FLOW_BETWEEN_SWAPS = 20


def _table_bytes(decode_urls: list[str], seed: int) -> bytes:
    """A valid table (real `make_table`) with random unit centroids; seed varies the checksum."""
    geometry = geometry_by_name(MODEL)
    spec = SignatureSpec(geometry,
                         np.ones((geometry.num_layers, geometry.num_experts), np.float32),
                         np.ones(geometry.num_layers, bool))
    rows = np.random.default_rng(seed).random((len(decode_urls), geometry.signature_dim))
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    table = make_table(spec, rows, list(decode_urls), provenance={"version": f"seed-{seed}"})
    return table_to_json(table)


def _checksum_of(data: bytes) -> str:
    return str(orjson.loads(data)["checksum"])


def _replace_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # rename(2): readers see the old file or the new one, never half


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def client(self, session: aiohttp.ClientSession, url: str, idx: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            body = {"text": f"client {idx} request {n}: review this contract clause and the "
                            "attached python function for errors",
                    "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}
            started = time.perf_counter()
            try:
                async with session.post(url + "/generate", json=body,
                                        timeout=aiohttp.ClientTimeout(total=60)) as r:
                    text = await r.text()
                    if r.status != 200:
                        self.failures.append(f"{r.status}: {text[:200]}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self.latencies.append(time.perf_counter() - started)


async def _until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def gateway_process(cluster: Cluster, zones: Path, log: Path
                          ) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "--pd-disaggregation"]
    for w in cluster.prefill:
        argv += ["--prefill", w.url, str(w.bootstrap_port)]
    for u in cluster.decode_urls:
        argv += ["--decode", u]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--prometheus-port", "0",
             "--decode-policy", "eldr", "--pd-flow", "prefill-first", "--zones", str(zones),
             "--admin-token", TOKEN, "--log-level", "info"]
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            async def ready() -> bool:
                if proc.returncode is not None:
                    raise AssertionError(f"gateway exited {proc.returncode}: "
                                         f"{log.read_text()[-2000:]}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(url + "/readiness") as r:
                        return r.status == 200
                return False

            await _until(ready, 60, "gateway readiness")
        yield url, proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


def _metric(text: str, name: str, labels: str) -> float:
    """Sum of the samples of `name` whose label set contains `labels` (Prometheus text)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and labels in line)


@pytest.mark.timeout(240)
async def test_tables_swap_under_load_and_corrupt_tables_are_rejected(tmp_path: Path) -> None:
    async with run_cluster(ClusterConfig(prefill=1, decode=3, engine=ENGINE)) as cluster:
        urls = cluster.decode_urls
        path = tmp_path / "zones.json"
        tables = {seed: _table_bytes(urls, seed) for seed in (1, 2, 3)}
        path.write_bytes(tables[1])
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with gateway_process(cluster, path, tmp_path / "gateway.log") as (url, proc), \
                aiohttp.ClientSession() as s:
            load = Load()
            clients = [asyncio.ensure_future(load.client(s, url, i)) for i in range(CLIENTS)]

            async def zones() -> dict:
                async with s.get(url + "/zones", headers=auth) as r:
                    assert r.status == 200, await r.text()
                    return dict(await r.json())

            async def metrics() -> str:
                async with s.get(url + "/metrics") as r:
                    return await r.text()

            async def traffic_flows() -> None:
                mark = len(load.latencies)

                async def enough() -> bool:
                    assert proc.returncode is None, "gateway died"
                    return len(load.latencies) >= mark + FLOW_BETWEEN_SWAPS

                await _until(enough, 60, f"{FLOW_BETWEEN_SWAPS} completions")

            async def active_is(data: bytes) -> None:
                want = _checksum_of(data)

                async def check() -> bool:
                    return (await zones())["checksum"] == want

                await _until(check, 30, f"table {want[:19]} active")

            try:
                await traffic_flows()
                assert (await zones())["checksum"] == _checksum_of(tables[1])

                # 1. file replaced by rename: the watcher picks it up.
                _replace_atomically(path, tables[2])
                await active_is(tables[2])
                await traffic_flows()

                # 2. rename + SIGHUP (the process must survive the signal and reload).
                _replace_atomically(path, tables[3])
                proc.send_signal(signal.SIGHUP)
                await active_is(tables[3])
                await traffic_flows()

                # 3. admin endpoint: unauthenticated is refused, authenticated loads.
                _replace_atomically(path, tables[1])
                async with s.post(url + "/admin/zones/reload") as r:
                    assert r.status == 401
                async with s.post(url + "/admin/zones/reload", headers=auth) as r:
                    doc = await r.json()
                    # The watcher may have won the race: then the file is already active.
                    assert r.status == 200 and doc["result"] in ("loaded", "unchanged"), doc
                await active_is(tables[1])
                await traffic_flows()

                good = await zones()
                failed_before = _metric(await metrics(), "eldr_zone_reloads_total",
                                        'result="failed"')
                prefill_before = _metric(await metrics(), "eldr_signature_resolutions_total",
                                         'source="prefill"')

                # 4. corrupt tables, by every route: truncated JSON (watcher, SIGHUP), a table
                # whose centroid bytes no longer match its checksum (admin).
                _replace_atomically(path, tables[2][: len(tables[2]) // 2])

                async def failure_seen() -> bool:
                    return (await zones())["last_error"] is not None

                await _until(failure_seen, 30, "the truncated table to be rejected")
                proc.send_signal(signal.SIGHUP)
                doc2 = orjson.loads(tables[2])
                data = doc2["centroids"]["data"]
                doc2["centroids"]["data"] = ("B" if data[0] != "B" else "C") + data[1:]
                _replace_atomically(path, orjson.dumps(doc2))
                async with s.post(url + "/admin/zones/reload", headers=auth) as r:
                    bad = await r.json()
                    assert r.status == 422, bad
                assert bad["result"] == "failed"
                assert bad["error"]["code"] == "invalid_zone_table"
                assert "checksum" in bad["error"]["message"], bad
                assert bad["zones"]["checksum"] == good["checksum"]
                await traffic_flows()

                after = await zones()
                assert after["checksum"] == good["checksum"]
                assert after["generation"] == good["generation"]
                assert "checksum" in after["last_error"] and str(path) in after["last_error"]
                text = await metrics()
                assert _metric(text, "eldr_zone_reloads_total", 'result="failed"') \
                    >= failed_before + 2, text
                info = [ln for ln in text.splitlines() if ln.startswith("eldr_zone_table_info{")]
                assert len(info) == 1 and good["checksum"] in info[0], info
                # The old table still routes: signatures keep coming from the prefill results
                # and no decision fell back for want of a table.
                assert _metric(text, "eldr_signature_resolutions_total", 'source="prefill"') \
                    >= prefill_before + FLOW_BETWEEN_SWAPS
                assert _metric(text, "eldr_fallback_decisions_total", 'reason="no_table"') == 0
                assert _metric(text, "eldr_signature_resolutions_total", 'source="none"') == 0
                # Every eldr decision is recorded with its signature source and latency.
                assert _metric(text, "eldr_decisions_total", 'source="prefill"') \
                    >= prefill_before + FLOW_BETWEEN_SWAPS
                assert _metric(text, "eldr_decision_seconds_count", "") > 0
            finally:
                load.stop.set()
                await asyncio.gather(*clients)
            assert proc.returncode is None
    assert not load.failures, load.failures[:5]
    assert len(load.latencies) >= 6 * FLOW_BETWEEN_SWAPS
    assert max(load.latencies) < LATENCY_BOUND_SECS, sorted(load.latencies)[-5:]

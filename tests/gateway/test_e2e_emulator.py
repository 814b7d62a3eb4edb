"""End to end over real sockets: gateway in front of the SGLang PD emulator (loadtest/emulator).

Covers the must-show list: every endpoint, the official `openai` client streaming a chat through
the gateway, a decode worker SIGKILLed mid-stream (clean client error, gateway up, worker out of
rotation and back when healthy), a prefill 400 returned at once, malformed and oversized bodies,
and a real Prometheus server scraping the metrics port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from gateway.config import PrefillSpec, Settings
from loadtest.emulator.cluster import ClusterConfig, run_cluster
from loadtest.emulator.config import EngineOptions
from loadtest.procs import free_port
from tests.gateway_server import running_gateway

pytestmark = pytest.mark.slow

ENGINE = EngineOptions(time_scale=0.05, bootstrap_timeout_secs=5.0, waiting_timeout_secs=5.0)


def _settings(cluster, **kw) -> Settings:  # type: ignore[no-untyped-def]
    base = dict(pd_disaggregation=True,
                prefill=[PrefillSpec(w.url, w.bootstrap_port) for w in cluster.prefill],
                decode=cluster.decode_urls, prometheus_port=0, request_timeout_secs=20.0,
                health_check_interval_secs=0.1, health_check_timeout_secs=1.0,
                health_failure_threshold=2, health_success_threshold=1,
                load_poll_interval_secs=0.1, retry_initial_backoff_ms=1,
                retry_max_backoff_ms=10)
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


async def _wait_until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def cluster_and_gateway(**kw) -> AsyncIterator[tuple]:  # type: ignore[no-untyped-def]
    async with run_cluster(ClusterConfig(prefill=1, decode=2, engine=ENGINE)) as cluster, \
            running_gateway(_settings(cluster, **kw)) as (url, state), \
            aiohttp.ClientSession() as session:
        yield cluster, url, state, session


async def test_every_endpoint_against_emulator():
    async with cluster_and_gateway(admin_token="tok") as (_cluster, url, state, s), \
            run_cluster(ClusterConfig(prefill=1, decode=1, engine=ENGINE)) as extra:
        auth = {"Authorization": "Bearer tok"}
        gen = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 4}}
        async with s.post(url + "/generate", json=gen) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
            assert body["meta_info"]["completion_tokens"] == 4
        async with s.post(url + "/generate", json={**gen, "text": ["a b", "c d"]}) as r:
            assert r.status == 200, await r.text()
            assert len(await r.json()) == 2
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        async with s.post(url + "/v1/chat/completions", json=chat) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["choices"][0]["message"]["role"] == "assistant"
        async with s.post(url + "/v1/completions",
                          json={"model": "m", "prompt": "x y", "max_tokens": 3}) as r:
            assert r.status == 200, await r.text()
            assert "choices" in await r.json()
        for path in ("/health", "/liveness", "/readiness", "/health_generate", "/server_info",
                     "/get_server_info", "/model_info", "/get_model_info", "/v1/models",
                     "/get_loads", "/v1/loads", "/metrics", "/openapi.json"):
            async with s.get(url + path) as r:
                assert r.status == 200, (path, r.status, await r.text())
        async with s.get(url + "/workers") as r:
            assert r.status == 401
        async with s.post(url + "/flush_cache", headers=auth) as r:
            assert r.status == 200, await r.text()
        async with s.get(url + "/workers", headers=auth) as r:
            assert (await r.json())["total"] == 3
        # worker management with SGLang's 202 semantics
        new_url = extra.decode_urls[0]
        async with s.post(url + "/workers", headers=auth,
                          json={"url": new_url, "worker_type": "decode"}) as r:
            assert r.status == 202
            wid = (await r.json())["worker_id"]
        await _wait_until(lambda: state.workers.get(wid).healthy)
        async with s.get(url + "/workers/" + wid, headers=auth) as r:
            assert (await r.json())["is_healthy"] is True
        async with s.put(url + "/workers/" + wid, headers=auth,
                         json={"bootstrap_port": 1}) as r:
            assert r.status == 400 and "bootstrap_port" in await r.text()
        async with s.post(url + "/workers", headers=auth, json={"url": new_url}) as r:
            assert r.status == 409
        async with s.delete(url + "/workers/" + wid, headers=auth) as r:
            assert r.status == 202
        async with s.get(url + "/workers/" + wid, headers=auth) as r:
            assert r.status == 404


async def test_openai_client_streams_chat_through_gateway():
    openai = pytest.importorskip("openai")
    async with cluster_and_gateway() as (_, url, _state, _s):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model="emulated", messages=[{"role": "user", "content": "Tell me a story"}],
            max_tokens=8, stream=True)
        pieces = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        await client.close()
        assert len(pieces) >= 2


async def test_prefill_400_returned_at_once():
    async with cluster_and_gateway() as (_, url, _state, s):
        t0 = time.perf_counter()
        # An invalid sampling parameter: the prefill rejects it with 400 before any bootstrap.
        async with s.post(url + "/generate", json={"text": "x", "sampling_params":
                                                   {"max_new_tokens": -5}}) as r:
            assert r.status == 400, await r.text()
        assert time.perf_counter() - t0 < 3.0  # well below the 5 s bootstrap timeout


async def test_malformed_and_oversized_bodies_against_emulator():
    async with cluster_and_gateway(max_payload_size=2048) as (_, url, _state, s):
        async with s.post(url + "/v1/chat/completions", data=b'{"messages": [',
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400
            assert "not valid JSON" in (await r.json())["error"]["message"]
        async with s.post(url + "/generate", json={"text": "y" * 4096}) as r:
            assert r.status == 413
            assert "max_payload_size" in (await r.json())["error"]["message"]


async def test_decode_killed_mid_stream_then_recovers():
    port = free_port()
    cmd = [sys.executable, "-m", "loadtest.emulator", "--role", "decode", "--port", str(port),
           "--time-scale", "1.0"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)

    proc = spawn()
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # "decode http://..." once it listens
        async with run_cluster(ClusterConfig(prefill=1, decode=1, engine=ENGINE)) as cluster:
            settings = _settings(cluster, decode=[f"http://127.0.0.1:{port}"],
                                 retry_max_retries=1)
            async with running_gateway(settings) as (url, state), aiohttp.ClientSession() as s:
                wid = f"http://127.0.0.1:{port}"
                req = {"text": "x", "stream": True,
                       "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
                async with s.post(url + "/generate", json=req) as r:
                    assert r.status == 200
                    first = await r.content.readline()
                    assert first.startswith(b"data:")
                    proc.send_signal(signal.SIGKILL)
                    rest = await asyncio.wait_for(r.read(), 10)
                events = [orjson.loads(ln[5:]) for ln in (first + rest).split(b"\n")
                          if ln.startswith(b"data:") and ln.strip() != b"data: [DONE]"]
                assert "error" in events[-1] and events[-1]["error"]["code"] == 502
                async with s.get(url + "/health") as r:
                    assert r.status == 200
                await _wait_until(lambda: not state.workers.get(wid).healthy)
                async with s.post(url + "/generate", json={"text": "x"}) as r:
                    assert r.status == 503  # the only decode is out of rotation
                proc.wait(5)
                proc = spawn()
                assert proc.stdout is not None
                proc.stdout.readline()
                await _wait_until(lambda: state.workers.get(wid).healthy)
                async with s.post(url + "/generate", json={"text": "x", "sampling_params":
                                                           {"max_new_tokens": 2}}) as r:
                    assert r.status == 200, await r.text()
                assert all(w.in_flight == 0 for w in state.workers)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus binary not installed")
async def test_real_prometheus_scrapes_metrics_port():
    metrics_port, prom_port = free_port(), free_port()
    async with run_cluster(ClusterConfig(prefill=1, decode=1, engine=ENGINE)) as cluster:
        settings = _settings(cluster, prometheus_port=metrics_port, prometheus_host="127.0.0.1")
        from aiohttp.test_utils import TestServer

        from gateway.app import create_app

        server = TestServer(create_app(settings), host="127.0.0.1")
        await server.start_server()
        workdir = tempfile.mkdtemp(prefix="prom-")
        config = os.path.join(workdir, "prometheus.yml")
        with open(config, "w") as fh:
            fh.write("global:\n  scrape_interval: 1s\nscrape_configs:\n"
                     "  - job_name: eldr\n    static_configs:\n"
                     f"      - targets: ['127.0.0.1:{metrics_port}']\n")
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir}/data",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(f"http://127.0.0.1:{server.port}/generate",
                                  json={"text": "x", "sampling_params":
                                        {"max_new_tokens": 2}}) as r:
                    assert r.status == 200
                query = (f"http://127.0.0.1:{prom_port}/api/v1/query?query="
                         "eldr_requests_total")
                deadline = time.monotonic() + 30
                result: list = []
                while time.monotonic() < deadline and not result:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with s.get(query) as r:
                            if r.status == 200:
                                result = (await r.json())["data"]["result"]
                    if not result:
                        await asyncio.sleep(0.5)
                assert result, "prometheus never scraped eldr_requests_total"
                labels = result[0]["metric"]
                assert labels["endpoint"] == "/generate" and labels["status"] == "200"
        finally:
            prom.terminate()
            prom.wait(10)
            await server.close()
            shutil.rmtree(workdir, ignore_errors=True)


async def test_prefill_first_flow_against_emulator():
    async with cluster_and_gateway(pd_flow="prefill-first") as (cluster, url, state, s):
        for stream in (False, True):
            async with s.post(url + "/generate", json={
                    "text": "Route me after prefill", "stream": stream,
                    "sampling_params": {"max_new_tokens": 3}}) as r:
                assert r.status == 200, await r.text()
                data = await r.read()
            if stream:
                assert b"data: [DONE]" in data
            else:
                assert orjson.loads(data)["meta_info"]["completion_tokens"] == 3
        assert all(w.in_flight == 0 for w in state.workers)
        assert len(cluster.decode) == 2


def _random_table(path: str, decode_urls: list[str]) -> None:
    import numpy as np

    from zones.geometry import geometry_by_name
    from zones.signature import SignatureSpec
    from zones.table import make_table, save_table

    geometry = geometry_by_name(ENGINE.model)
    spec = SignatureSpec(geometry,
                         np.ones((geometry.num_layers, geometry.num_experts), np.float32),
                         np.ones(geometry.num_layers, bool))
    rows = np.random.default_rng(0).random((len(decode_urls), geometry.signature_dim))
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    save_table(make_table(spec, rows, list(decode_urls)), path)


@pytest.mark.parametrize("flow,source,decision", [
    ("prefill-first", "prefill", "band"), ("dual", None, "band"),
    ("prefill-first", "prefill", "step-cost"), ("dual", None, "step-cost")])
async def test_eldr_policy_wired_end_to_end(tmp_path, flow, source, decision):
    """--zones + eldr: the prefill-first flow routes on the prefill's exact expert counts;
    step-cost releases every request it admitted once the answers are in."""
    async with run_cluster(ClusterConfig(prefill=1, decode=2, engine=ENGINE)) as cluster:
        table_path = str(tmp_path / "zones.json")
        _random_table(table_path, cluster.decode_urls)
        settings = _settings(cluster, zones=table_path, decode_policy="eldr", pd_flow=flow,
                             eldr_decision=decision)
        async with running_gateway(settings) as (url, state), aiohttp.ClientSession() as s:
            for i in range(4):
                async with s.post(url + "/generate", json={
                        "text": f"request {i} about contracts and law",
                        "sampling_params": {"max_new_tokens": 2}}) as r:
                    assert r.status == 200, await r.text()
            async with s.get(url + "/zones") as r:
                assert r.status == 200
            resolved = {src: state.registry.get_sample_value(
                "eldr_signature_resolutions_total", {"source": src}) or 0
                for src in ("prefill", "cache", "predictor", "none")}
            assert sum(resolved.values()) == 4
            if source is not None:
                assert resolved[source] == 4
            tracker = state.dispatcher.policies["decode"]._tracker
            if decision == "step-cost" and source is not None:
                assert tracker is not None
            if tracker is not None:
                assert all(tracker.tracked(w.worker_id) == 0 for w in state.workers)


async def test_calibration_log_records_before_the_first_table_with_model_geometry(tmp_path):
    """The first table's data: no --zones, --model-geometry gives the records' routing shape."""
    from zones.calibration import read_calibration

    async with run_cluster(ClusterConfig(prefill=1, decode=2, engine=ENGINE)) as cluster:
        log_path = str(tmp_path / "calib.jsonl")
        settings = _settings(cluster, calibration_log=log_path, model_geometry=ENGINE.model,
                             decode_policy="least_load")
        async with running_gateway(settings) as (url, _state), aiohttp.ClientSession() as s:
            for i in range(3):
                async with s.post(url + "/generate", json={
                        "text": f"first data {i}", "sampling_params": {"max_new_tokens": 4}}) as r:
                    assert r.status == 200, await r.text()
                    assert "routed_experts" not in (await r.json())["meta_info"]
            async with s.get(url + "/zones") as r:
                assert r.status == 404  # no table path: no zone routes
    records = list(read_calibration(log_path))
    assert len(records) == 3
    assert all(rec.output_counts is not None for rec in records)


async def test_calibration_log_records_sampled_requests_and_hides_routed_experts(tmp_path):
    from zones.calibration import read_calibration

    async with run_cluster(ClusterConfig(prefill=1, decode=2, engine=ENGINE)) as cluster:
        table_path, log_path = str(tmp_path / "zones.json"), str(tmp_path / "calib.jsonl")
        _random_table(table_path, cluster.decode_urls)
        settings = _settings(cluster, zones=table_path, calibration_log=log_path,
                             calibration_sample_rate=1.0)
        async with running_gateway(settings) as (url, _state), aiohttp.ClientSession() as s:
            for i, asked in enumerate((False, True, False)):
                body = {"text": f"calibrate me {i}", "sampling_params": {"max_new_tokens": 4}}
                if asked:
                    body["return_routed_experts"] = True
                async with s.post(url + "/generate", json=body) as r:
                    assert r.status == 200, await r.text()
                    meta = (await r.json())["meta_info"]
                assert ("routed_experts" in meta) == asked
    records = list(read_calibration(log_path))
    assert len(records) == 3
    assert all(rec.output_counts is not None and rec.decode_worker in cluster.decode_urls
               for rec in records)

"""A prefill configured with the wrong bootstrap port (finding: its failures were charged to the
decode breakers). With real emulated workers: the decode's handshake with the prefill's bootstrap
server fails (SGLang's "Decode handshake failed" 500), the failure is charged to that prefill,
the retry leaves that prefill out, and the decodes' breakers stay closed."""

from __future__ import annotations

import aiohttp
import pytest

from gateway.config import PrefillSpec, Settings
from loadtest.emulator.cluster import ClusterConfig, run_cluster
from loadtest.emulator.config import EngineOptions
from loadtest.procs import free_port
from tests.gateway_server import running_gateway

pytestmark = pytest.mark.slow

ENGINE = EngineOptions(time_scale=0.02, bootstrap_timeout_secs=5.0, waiting_timeout_secs=5.0)


async def test_wrong_bootstrap_port_is_the_prefills_fault() -> None:
    async with run_cluster(ClusterConfig(prefill=2, decode=2, engine=ENGINE)) as cluster:
        bad, good = cluster.prefill
        settings = Settings(
            pd_disaggregation=True,
            prefill=[PrefillSpec(bad.url, free_port()), PrefillSpec(good.url, good.bootstrap_port)],
            decode=cluster.decode_urls, prometheus_port=0, request_timeout_secs=20.0,
            policy="round_robin", cb_failure_threshold=3, retry_initial_backoff_ms=1,
            retry_max_backoff_ms=5, health_check_interval_secs=60.0)
        async with running_gateway(settings) as (url, state), aiohttp.ClientSession() as s:
            for i in range(8):
                async with s.post(url + "/generate", json={
                        "text": f"request {i}", "sampling_params": {"max_new_tokens": 2}}) as r:
                    assert r.status == 200, await r.text()
            workers = {w.url: w for w in state.workers}
            errors = {(w.role, w.url): state.registry.get_sample_value(
                "eldr_upstream_errors_total", {"worker": w.worker_id, "role": w.role,
                                                "kind": "500"}) or 0
                for w in state.workers}
            assert errors[("prefill", bad.url)] >= 1
            assert all(errors[("decode", u)] == 0 for u in cluster.decode_urls), errors
            assert all(workers[u].breaker.state == "closed" for u in cluster.decode_urls)
            # Three handshake failures within the window open the bad prefill's circuit: no
            # request is sent through it any more.
            assert workers[bad.url].breaker.state == "open"

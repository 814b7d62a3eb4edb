"""`--load-view reported`: replicas that see each other's requests through the workers' loads.

Unit: `Worker.shared_load` by hand. End to end: two gateway replicas in front of one emulated
PD cluster; requests sent through replica A change what replica B's least_load picks, which
with the local view (each replica counting only its own requests) they cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from gateway.circuit import BreakerConfig
from gateway.config import PrefillSpec, Settings
from gateway.loads import parse_load_report
from gateway.routing import LoadReport
from gateway.state import GatewayState
from gateway.workers import Worker, WorkerRegistry
from loadtest.emulator.cluster import ClusterConfig, run_cluster
from loadtest.emulator.config import EngineOptions
from tests.gateway_server import running_gateway


def requests_of(payload: object, dp_rank: int | None = None) -> int | None:
    report = parse_load_report(payload, 1, dp_rank)
    return None if report is None else report.requests


def test_load_report_requests_sum_running_and_waiting_per_rank() -> None:
    loads = {"loads": [{"dp_rank": 0, "num_running_reqs": 3, "num_waiting_reqs": 1},
                       {"dp_rank": 1, "num_running_reqs": 2, "num_waiting_reqs": 0}]}
    assert requests_of(loads) == 6
    assert requests_of(loads, dp_rank=1) == 2
    assert requests_of({"loads": [{"num_running_reqs": 1}]}) is None  # no waiting field
    assert requests_of([1, 2]) is None and requests_of(None) is None
    report = parse_load_report(loads, 3, dp_rank=1)
    assert report is not None and report.requests == 2 and report.seq == 3


def _report(worker: Worker, requests: int | None, now: float | None = None) -> None:
    """A poll whose /v1/loads answer says the worker holds `requests` (None: no counts)."""
    worker.note_load_report(LoadReport(0, 0, 0.0, 0.0, worker.report_seq + 1, requests),
                            time.monotonic() if now is None else now)


def test_shared_load_is_the_report_plus_this_process_change_since() -> None:
    reg = WorkerRegistry(BreakerConfig(), load_stale_secs=5.0, shared_load=True)
    w = reg.add("http://127.0.0.1:1", "decode")
    w.in_flight = 2
    assert reg.views([w])[0].in_flight == 2  # no report yet: this process's count
    _report(w, 7)  # 7 on the worker, 2 of them ours
    assert reg.views([w])[0].in_flight == 7
    w.in_flight = 5  # we dispatched 3 more since the report
    assert reg.views([w])[0].in_flight == 10
    w.in_flight = 0  # all of ours finished: the worker holds at least the others' 5
    assert reg.views([w])[0].in_flight == 5
    w.in_flight = 1
    _report(w, 4, time.monotonic() - 10)  # stale: back to this process's own count
    assert reg.views([w])[0].in_flight == 1
    _report(w, 4)
    assert reg.views([w])[0].in_flight == 4
    _report(w, None)  # a report without request counts: this process's own count
    assert reg.views([w])[0].in_flight == 1
    _report(w, 4)
    w.note_load_report(None, time.monotonic())  # a failed poll clears the report
    assert reg.views([w])[0].in_flight == 1
    local = WorkerRegistry(BreakerConfig(), load_stale_secs=5.0)
    v = local.add("http://127.0.0.1:2", "decode")
    v.in_flight = 1
    _report(v, 9)
    assert local.views([v])[0].in_flight == 1  # the local view ignores reports


async def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def two_replicas(view: str) -> AsyncIterator[tuple[str, GatewayState, str, GatewayState]]:
    # Slow enough that a 64-token request decodes for seconds.
    engine = EngineOptions(time_scale=0.5, bootstrap_timeout_secs=10.0)
    async with run_cluster(ClusterConfig(prefill=1, decode=2, engine=engine)) as cluster:
        settings = Settings(
            pd_disaggregation=True,
            prefill=[PrefillSpec(w.url, w.bootstrap_port) for w in cluster.prefill],
            decode=cluster.decode_urls, prometheus_port=0, decode_policy="least_load",
            prefill_policy="round_robin", load_view=view, load_poll_interval_secs=0.05,
            health_check_interval_secs=0.1, request_timeout_secs=30.0)
        async with running_gateway(settings) as (a_url, a), \
                running_gateway(settings) as (b_url, b):
            yield a_url, a, b_url, b


async def _hold_requests(session: aiohttp.ClientSession, url: str, n: int,
                         started: list[asyncio.Task[None]]) -> None:
    async def one(i: int) -> None:
        body = {"text": f"request {i} about the weather in spring", "stream": True,
                "sampling_params": {"max_new_tokens": 64, "ignore_eos": True}}
        async with session.post(url + "/generate", json=body) as r:
            assert r.status == 200
            await r.read()

    for i in range(n):
        started.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0.05)  # dispatched one after another: least_load sees each


@pytest.mark.slow
@pytest.mark.parametrize("view", ["reported", "local"])
async def test_replica_b_sees_the_requests_replica_a_sent(view: str) -> None:
    async with two_replicas(view) as (a_url, a, b_url, b), aiohttp.ClientSession() as s:
        decodes = [w for w in a.workers if w.role == "decode"]
        await _wait_until(lambda: all(w.healthy for w in b.workers))
        tasks: list[asyncio.Task[None]] = []
        # Through A: least_load with lowest-index ties puts 2 on decode-0, 1 on decode-1.
        await _hold_requests(s, a_url, 3, tasks)
        await _wait_until(lambda: [w.in_flight for w in decodes] == [2, 1])
        b_decodes = [w for w in b.workers if w.role == "decode"]
        if view == "reported":
            # B polls the workers: they hold 2 and 1 (waiting for KV or decoding).
            await _wait_until(lambda: [w.load_report and w.load_report.requests
                                       for w in b_decodes] == [2, 1])
        # One request through B: the shared view sends it to the less loaded decode-1; the
        # local view sees two idle workers and takes decode-0, the busier one.
        await _hold_requests(s, b_url, 1, tasks)
        await _wait_until(lambda: sum(w.in_flight for w in b_decodes) == 1)
        chosen = [w.in_flight for w in b_decodes].index(1)
        assert chosen == (1 if view == "reported" else 0)
        await asyncio.gather(*tasks)

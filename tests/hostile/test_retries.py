"""Retries and breakers: a retry goes to another worker than the one that just failed (when
there is one), the request timeout is one budget for all attempts, and a half-open breaker
admits one trial request at a time."""

from __future__ import annotations

import time

import aiohttp

from gateway.circuit import CLOSED, HALF_OPEN, HALF_OPEN_TRIAL_SECS, BreakerConfig, CircuitBreaker
from gateway.config import Settings
from tests.gateway.fakes import start_workers
from tests.gateway_server import running_gateway


async def test_retry_avoids_the_worker_that_failed() -> None:
    bad = (await start_workers("regular", status=503))[0]
    good = (await start_workers("regular"))[0]
    # least_load with both idle picks the first listed every time: without avoidance every
    # attempt would go to `bad`.
    settings = Settings(worker_urls=[bad.url, good.url], policy="least_load", prometheus_port=0,
                        retry_initial_backoff_ms=1, retry_max_backoff_ms=2,
                        disable_circuit_breaker=True)
    try:
        async with running_gateway(settings) as (url, _), aiohttp.ClientSession() as s:
            async with s.post(url + "/generate", json={"text": "x"}) as r:
                assert r.status == 200
            assert len(bad.received) == 1 and len(good.received) == 1
    finally:
        await bad.close()
        await good.close()


async def test_with_one_worker_the_retry_still_uses_it() -> None:
    only = (await start_workers("regular", status=503))[0]
    settings = Settings(worker_urls=[only.url], prometheus_port=0, retry_max_retries=3,
                        retry_initial_backoff_ms=1, retry_max_backoff_ms=2,
                        disable_circuit_breaker=True)
    try:
        async with running_gateway(settings) as (url, _), aiohttp.ClientSession() as s:
            async with s.post(url + "/generate", json={"text": "x"}) as r:
                assert r.status == 503
            assert len(only.received) == 3
    finally:
        await only.close()


def test_half_open_admits_one_trial_at_a_time() -> None:
    clock = [0.0]
    cb = CircuitBreaker(BreakerConfig(failure_threshold=1, success_threshold=2, timeout_secs=10),
                        lambda: clock[0])
    cb.record_failure()
    assert not cb.allows()
    clock[0] = 10.0
    assert cb.state == HALF_OPEN and cb.allows()
    cb.trial_started()  # dispatch picked it: the next trial waits
    assert not cb.allows()
    clock[0] = 10.0 + HALF_OPEN_TRIAL_SECS / 2
    assert not cb.allows()
    clock[0] = 10.0 + HALF_OPEN_TRIAL_SECS
    assert cb.allows()  # a lost trial (its client left) cannot keep the worker out for good
    cb.trial_started()
    cb.record_success()
    clock[0] += HALF_OPEN_TRIAL_SECS
    cb.trial_started()
    cb.record_success()
    assert cb.state == CLOSED and cb.allows()
    cb.trial_started()  # closed: no gating
    assert cb.allows()


async def test_a_hanging_worker_costs_one_request_timeout_not_one_per_attempt() -> None:
    stuck = (await start_workers("regular", hang=True))[0]
    settings = Settings(worker_urls=[stuck.url], prometheus_port=0, request_timeout_secs=0.5,
                        retry_max_retries=5, retry_initial_backoff_ms=1, retry_max_backoff_ms=2,
                        disable_circuit_breaker=True)
    try:
        async with running_gateway(settings) as (url, _), aiohttp.ClientSession() as s:
            t0 = time.perf_counter()
            async with s.post(url + "/generate", json={"text": "x"}) as r:
                assert r.status == 504
            assert time.perf_counter() - t0 < 1.2  # 5 attempts x 0.5 s before
    finally:
        await stuck.close()


async def test_a_request_every_worker_answers_500_opens_no_breaker() -> None:
    """A client cannot open workers' circuits with requests that fail everywhere."""
    workers = await start_workers("regular", "regular", status=500)
    settings = Settings(worker_urls=[w.url for w in workers], prometheus_port=0,
                        cb_failure_threshold=2, retry_initial_backoff_ms=1,
                        retry_max_backoff_ms=2)
    try:
        async with running_gateway(settings) as (url, state), aiohttp.ClientSession() as s:
            for _ in range(4):
                async with s.post(url + "/generate", json={"text": "poison"}) as r:
                    assert r.status == 500
            assert all(len(w.received) >= 4 for w in workers)  # each request met both
            assert all(w.breaker.state == CLOSED for w in state.workers)
    finally:
        for w in workers:
            await w.close()


async def test_a_worker_whose_500s_another_worker_serves_is_charged() -> None:
    bad = (await start_workers("regular", status=500))[0]
    good = (await start_workers("regular"))[0]
    settings = Settings(worker_urls=[bad.url, good.url], policy="least_load", prometheus_port=0,
                        cb_failure_threshold=2, retry_initial_backoff_ms=1,
                        retry_max_backoff_ms=2)
    try:
        async with running_gateway(settings) as (url, state), aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.post(url + "/generate", json={"text": "x"}) as r:
                    assert r.status == 200
            breaker = next(w.breaker for w in state.workers if w.url == bad.url)
            assert breaker.state == "open"
            async with s.post(url + "/generate", json={"text": "x"}) as r:
                assert r.status == 200
            assert len(bad.received) == 2  # out of rotation now
    finally:
        await bad.close()
        await good.close()


async def test_with_a_single_worker_500s_are_charged_as_before() -> None:
    only = (await start_workers("regular", status=500))[0]
    settings = Settings(worker_urls=[only.url], prometheus_port=0, cb_failure_threshold=2,
                        disable_retries=True)
    try:
        async with running_gateway(settings) as (url, state), aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.post(url + "/generate", json={"text": "x"}) as r:
                    assert r.status == 500
            assert next(iter(state.workers)).breaker.state == "open"
    finally:
        await only.close()

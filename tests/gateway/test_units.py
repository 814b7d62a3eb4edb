"""Pure unit tests: bootstrap injection, logprob merge, retry/backoff, circuit breaker,
policies, config/CLI, limiter, health counters, load parsing."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import orjson
import pytest

from gateway import bootstrap
from gateway.circuit import CLOSED, HALF_OPEN, OPEN, BreakerConfig, CircuitBreaker
from gateway.cli import settings_from_args
from gateway.config import PrefillSpec, Settings
from gateway.errors import BadRequestError, ConfigError, OverloadedError, QueueTimeoutError
from gateway.health import apply_health_result
from gateway.limiter import AdmissionRate, ConcurrencyLimiter
from gateway.loads import parse_get_load, parse_v1_loads
from gateway.logprobs import merge_logprobs, merge_sse_line, prefill_logprobs_from_stream
from gateway.policies.registry import make_policy
from gateway.retry import RetryConfig, is_retryable_status
from gateway.routing import NO_ROUTING_INPUT, WorkerView
from gateway.workers import Worker


# ---------------------------------------------------------------- bootstrap
def test_bootstrap_single_request():
    out = bootstrap.inject({"text": "hi"}, "http://10.0.0.5:8000", 8998, 42)
    assert out == {"text": "hi", "bootstrap_host": "10.0.0.5", "bootstrap_port": 8998,
                   "bootstrap_room": 42}


def test_bootstrap_ipv6_host_is_bracketed_and_null_port():
    out = bootstrap.inject({"text": "hi"}, "http://[::1]:8000", None, 1)
    assert out["bootstrap_host"] == "[::1]"
    assert out["bootstrap_port"] is None


@pytest.mark.parametrize("body,size", [
    ({"text": ["a", "b", "c"]}, 3),
    ({"input_ids": [[1, 2], [3]]}, 2),
    ({"prompt": ["a", "b"]}, 2),
    ({"messages": [{"role": "user", "content": "x"}], "n": 4}, 4),
    ({"prompt": [1, 2, 3]}, None),  # one tokenised prompt, not a batch
    ({"input_ids": [1, 2, 3]}, None),
    ({"text": "a", "n": 1}, None),
])
def test_batch_size(body, size):
    assert bootstrap.batch_size(body) == size


def test_batch_rooms_are_arrays_of_distinct_valid_rooms():
    rng = random.Random(0)
    rooms = bootstrap.new_rooms(3, rng)
    assert isinstance(rooms, list) and len(set(rooms)) == 3
    assert all(0 <= r <= 2**63 - 1 for r in rooms)
    out = bootstrap.inject({"text": ["a", "b", "c"]}, "http://h:1", 5, rooms)
    assert out["bootstrap_host"] == ["h"] * 3 and out["bootstrap_port"] == [5] * 3


@pytest.mark.parametrize("body,field", [({"text": []}, "text"), ({"prompt": []}, "prompt"),
                                        ({"input_ids": []}, "input_ids"),
                                        ({"n": 10**9}, "n"), ({"text": ["a"] * 5000}, "text")])
def test_empty_batch_names_field(body, field):
    with pytest.raises(BadRequestError, match=field):
        bootstrap.batch_size(body)


# ---------------------------------------------------------------- logprobs
def test_merge_prepends_prefill_logprobs():
    p = {"meta_info": {"input_token_logprobs": [[-1.0, 1, None]]}}
    d = {"meta_info": {"input_token_logprobs": [[-2.0, 2, None]]}}
    assert merge_logprobs(p, d)
    assert d["meta_info"]["input_token_logprobs"] == [[-1.0, 1, None], [-2.0, 2, None]]


def test_merge_batch_elementwise_and_missing_fields():
    p = [{"meta_info": {"input_token_logprobs": [1]}}, {"meta_info": {}}]
    d = [{"meta_info": {"input_token_logprobs": [2]}}, {"meta_info": {"input_token_logprobs": [3]}}]
    assert merge_logprobs(p, d)
    assert d[0]["meta_info"]["input_token_logprobs"] == [1, 2]
    assert d[1]["meta_info"]["input_token_logprobs"] == [3]
    assert not merge_logprobs({"x": 1}, {"meta_info": {}})


def test_merge_sse_line():
    p = {"meta_info": {"input_token_logprobs": [1]}}
    line = b'data: {"meta_info":{"input_token_logprobs":[2]}}\n'
    merged = merge_sse_line(p, line)
    assert merged.endswith(b"\n")
    assert orjson.loads(merged[5:])["meta_info"]["input_token_logprobs"] == [1, 2]
    assert merge_sse_line(p, b"data: [DONE]\n") == b"data: [DONE]\n"
    assert merge_sse_line(p, b": keepalive\n") == b": keepalive\n"


def test_prefill_logprobs_from_stream_takes_last_json_event():
    body = b'data: {"a":1}\n\ndata: {"a":2}\n\ndata: [DONE]\n\n'
    assert prefill_logprobs_from_stream(body) == {"a": 2}


# ---------------------------------------------------------------- retry
def test_retryable_statuses_match_rust_router():
    assert all(is_retryable_status(s) for s in (408, 429, 500, 502, 503, 504))
    assert not any(is_retryable_status(s) for s in (200, 400, 401, 404, 422, 501))


def test_backoff_grows_caps_and_jitters_within_bounds():
    cfg = RetryConfig(initial_backoff_ms=100, max_backoff_ms=1000, multiplier=2.0,
                      jitter_factor=0.0)
    rng = random.Random(1)
    assert [cfg.backoff_secs(i, rng) for i in range(5)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    jittered = RetryConfig(initial_backoff_ms=100, jitter_factor=0.2)
    values = [jittered.backoff_secs(0, rng) for _ in range(200)]
    assert min(values) >= 0.08 and max(values) <= 0.12 and len(set(values)) > 1


# ---------------------------------------------------------------- circuit breaker
class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_half_opens_and_closes():
    clock = Clock()
    cb = CircuitBreaker(BreakerConfig(failure_threshold=3, success_threshold=2,
                                      timeout_secs=10, window_secs=60), clock)
    for _ in range(2):
        cb.record_failure()
    assert cb.state == CLOSED and cb.allows()
    cb.record_failure()
    assert cb.state == OPEN and not cb.allows()
    clock.t = 10.0
    assert cb.state == HALF_OPEN and cb.allows()
    cb.record_failure()  # any half-open failure re-opens
    assert cb.state == OPEN
    clock.t = 20.0
    cb.record_success()
    assert cb.state == HALF_OPEN
    cb.record_success()
    assert cb.state == CLOSED


def test_breaker_window_forgets_old_failures_and_success_resets():
    clock = Clock()
    cb = CircuitBreaker(BreakerConfig(failure_threshold=2, window_secs=5), clock)
    cb.record_failure()
    clock.t = 6.0
    cb.record_failure()
    assert cb.state == CLOSED
    cb.record_success()
    cb.record_failure()
    assert cb.state == CLOSED


def test_disabled_breaker_never_opens():
    cb = CircuitBreaker(BreakerConfig(failure_threshold=1, enabled=False))
    cb.record_failure()
    assert cb.allows()


# ---------------------------------------------------------------- policies
def views(*in_flight: int, loads: tuple[int | None, ...] | None = None) -> list[WorkerView]:
    loads = loads or (None,) * len(in_flight)
    return [WorkerView(f"w{i}", f"http://w{i}", n, ld)
            for i, (n, ld) in enumerate(zip(in_flight, loads, strict=True))]


def test_round_robin_cycles():
    policy = make_policy("round_robin", Settings())
    picks = [policy.select(views(0, 0, 0), NO_ROUTING_INPUT).worker.worker_id for _ in range(6)]
    assert picks == ["w0", "w1", "w2", "w0", "w1", "w2"]


def test_least_load_picks_fewest_in_flight_lowest_index_on_ties():
    policy = make_policy("least_load", Settings())
    assert policy.select(views(3, 1, 1), NO_ROUTING_INPUT).worker.worker_id == "w1"


def test_power_of_two_prefers_reported_load_then_in_flight():
    policy = make_policy("power_of_two", Settings(), rng=random.Random(0))
    pair = views(0, 9, loads=(500, 10))
    assert all(policy.select(pair, NO_ROUTING_INPUT).worker.worker_id == "w1" for _ in range(20))
    stale = views(0, 9, loads=(500, None))  # one report missing: compare in-flight
    assert all(policy.select(stale, NO_ROUTING_INPUT).worker.worker_id == "w0" for _ in range(20))


def test_random_covers_all_candidates():
    policy = make_policy("random", Settings(), rng=random.Random(3))
    picks = {policy.select(views(0, 0, 0), NO_ROUTING_INPUT).worker.worker_id for _ in range(60)}
    assert picks == {"w0", "w1", "w2"}


def test_unknown_policy_is_config_error():
    with pytest.raises(ConfigError, match="unknown policy"):
        make_policy("nope", Settings())


# ---------------------------------------------------------------- config / CLI
def test_cli_mirrors_rust_router_flags():
    s = settings_from_args([
        "--pd-disaggregation", "--prefill", "http://p1:8000", "9000",
        "--prefill", "http://p2:8000", "none", "--prefill", "http://p3:8000",
        "--decode", "http://d1:8001", "--decode", "http://d2:8001",
        "--policy", "power_of_two", "--decode-policy", "least_load", "--port", "31000",
        "--retry-max-retries", "3", "--cb-failure-threshold", "4", "--disable-health-check",
    ], env={})
    assert s.prefill == [PrefillSpec("http://p1:8000", 9000), PrefillSpec("http://p2:8000", None),
                         PrefillSpec("http://p3:8000", None)]
    assert s.decode == ["http://d1:8001", "http://d2:8001"]
    assert (s.effective_prefill_policy, s.effective_decode_policy) == ("power_of_two",
                                                                        "least_load")
    assert (s.port, s.retry_max_retries, s.cb_failure_threshold) == (31000, 3, 4)
    assert s.disable_health_check


def test_defaults_match_rust_router():
    s = Settings()
    assert (s.host, s.port, s.prometheus_port, s.request_timeout_secs) == ("0.0.0.0", 30000,
                                                                           29000, 1800.0)
    assert (s.retry_max_retries, s.retry_initial_backoff_ms, s.retry_max_backoff_ms,
            s.retry_backoff_multiplier, s.retry_jitter_factor) == (5, 50, 30000, 1.5, 0.2)
    assert (s.cb_failure_threshold, s.cb_success_threshold, s.cb_timeout_duration_secs,
            s.cb_window_duration_secs) == (10, 3, 60.0, 120.0)
    assert (s.health_failure_threshold, s.health_success_threshold,
            s.health_check_timeout_secs, s.health_check_interval_secs,
            s.health_check_endpoint) == (3, 2, 5.0, 60.0, "/health")
    assert (s.max_payload_size, s.max_concurrent_requests, s.queue_size,
            s.queue_timeout_secs) == (536870912, -1, 100, 60.0)


def test_env_vars_and_flag_precedence():
    env = {"GATEWAY_PORT": "31111", "GATEWAY_ADMIN_TOKEN": "s3cret",
           "GATEWAY_PD_DISAGGREGATION": "true",
           "GATEWAY_PREFILL": "http://p1:8000 8998,http://p2:8000",
           "GATEWAY_DECODE": "http://d1:8001,http://d2:8001"}
    s = settings_from_args(["--port", "32000"], env=env)
    assert s.port == 32000 and s.admin_token == "s3cret"
    assert s.prefill == [PrefillSpec("http://p1:8000", 8998), PrefillSpec("http://p2:8000")]
    assert s.decode == ["http://d1:8001", "http://d2:8001"]


@pytest.mark.parametrize("argv,env,key", [
    ([], {"GATEWAY_PORT": "abc"}, "GATEWAY_PORT"),
    ([], {"GATEWAY_DISABLE_RETRIES": "maybe"}, "GATEWAY_DISABLE_RETRIES"),
    (["--retry-jitter-factor", "2"], {}, "retry_jitter_factor"),
    (["--decode", "ftp://x"], {}, "decode"),
    (["--pd-disaggregation", "--decode-policy", "eldr"], {}, "zones"),
    (["--pd-disaggregation", "--prefill", "http://p:1", "notaport"], {}, "prefill"),
    (["--cache-threshold", "1.5"], {}, "cache_threshold"),
    (["--enable-mesh"], {}, "--enable-mesh is not supported"),
    (["--no-such-flag", "1"], {}, "unrecognized arguments: --no-such-flag 1"),
    (["--decode", "http://d:1"], {}, "pd-disaggregation"),
])
def test_bad_config_fails_fast_naming_the_key(argv, env, key):
    with pytest.raises(ConfigError, match=key):
        settings_from_args(argv, env=env)


# ---------------------------------------------------------------- limiter
async def test_limiter_queues_then_rejects():
    limiter = ConcurrencyLimiter(1, queue_size=1, queue_timeout=5)
    entered = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with limiter.slot():
            entered.set()
            await release.wait()

    holder = asyncio.ensure_future(hold())
    await entered.wait()
    waiter = asyncio.ensure_future(hold())
    while limiter.waiting == 0:
        await asyncio.sleep(0)
    with pytest.raises(OverloadedError, match="queue"):
        async with limiter.slot():
            pass
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, waiter), 5)
    assert limiter.active == 0 and limiter.waiting == 0


async def test_limiter_queue_timeout():
    limiter = ConcurrencyLimiter(1, queue_size=5, queue_timeout=0.01)
    async with limiter.slot():
        with pytest.raises(OverloadedError, match="queue_timeout_secs"):
            async with limiter.slot():
                pass
    assert limiter.active == 0 and limiter.waiting == 0


# ---------------------------------------------------------------- health / loads
def test_health_thresholds():
    w = Worker("w", "http://w", "decode", None, CircuitBreaker(BreakerConfig()))
    flips = [apply_health_result(w, False, 3, 2) for _ in range(3)]
    assert flips == [False, False, True] and not w.healthy
    assert not apply_health_result(w, True, 3, 2)
    assert apply_health_result(w, True, 3, 2) and w.healthy


def test_load_parsers():
    assert parse_v1_loads({"loads": [{"num_total_tokens": 5}, {"num_total_tokens": 7}]}) == 12
    assert parse_v1_loads({"loads": []}) is None
    assert parse_v1_loads([1]) is None
    assert parse_get_load([{"num_tokens": 3}, {"num_tokens": 4}]) == 7
    assert parse_get_load({"x": 1}) is None


def test_worker_view_is_reused_until_its_counts_change():
    from gateway.circuit import BreakerConfig
    from gateway.workers import WorkerRegistry

    registry = WorkerRegistry(BreakerConfig(), load_stale_secs=5.0)
    worker = registry.add("http://d1:8000", "decode")
    first = worker.view(100.0, 5.0)
    assert (first.worker_id, first.url, first.in_flight, first.reported_load) == (
        "http://d1:8000", "http://d1:8000", 0, None)
    assert worker.view(100.0, 5.0) is first  # nothing moved: the same snapshot
    worker.in_flight += 1
    busier = worker.view(100.0, 5.0)
    assert busier is not first and busier.in_flight == 1 and first.in_flight == 0
    worker.reported_load, worker.load_updated_at = 300, 100.0
    loaded = worker.view(101.0, 5.0)
    assert loaded.reported_load == 300 and worker.view(102.0, 5.0) is loaded
    stale = worker.view(106.0, 5.0)  # the report is older than load_stale_secs
    assert stale.reported_load is None and stale.in_flight == 1
    worker.in_flight -= 1
    assert worker.view(106.0, 5.0).in_flight == 0
    assert [v.in_flight for v in registry.views(registry.available("decode"))] == [0]


async def test_limiter_answers_as_smg_429_when_full_503_on_timeout():
    limiter = ConcurrencyLimiter(1, queue_size=0, queue_timeout=5)
    async with limiter.slot():
        with pytest.raises(OverloadedError) as full:
            async with limiter.slot():
                pass
    assert (full.value.status, full.value.code) == (429, "admission_queue_full")
    limiter = ConcurrencyLimiter(1, queue_size=5, queue_timeout=0.01)
    async with limiter.slot():
        with pytest.raises(QueueTimeoutError) as late:
            async with limiter.slot():
                pass
    assert (late.value.status, late.value.code) == (503, "admission_queue_timeout")


async def test_admission_rate_bursts_then_paces_in_order():
    now = [0.0]
    rate = AdmissionRate(10.0, burst=3, queue_size=10, queue_timeout=5.0, clock=lambda: now[0])
    for _ in range(3):  # the burst passes at once
        await asyncio.wait_for(rate.admit(), 0.05)
    started = time.perf_counter()
    await rate.admit()  # the 4th waits for one refill: 0.1 s at 10/s
    assert 0.08 <= time.perf_counter() - started < 1.0
    now[0] = 10.0  # a long pause refills the bucket to its burst, no more
    for _ in range(3):
        await asyncio.wait_for(rate.admit(), 0.05)


async def test_admission_rate_refuses_what_cannot_be_served_in_time():
    rate = AdmissionRate(0.1, burst=1, queue_size=1, queue_timeout=5.0, clock=lambda: 0.0)
    await rate.admit()
    with pytest.raises(QueueTimeoutError, match=r"10\.0s away"):
        await rate.admit()  # the next token is 10 s away, over the 5 s queue timeout
    rate = AdmissionRate(1.0, burst=1, queue_size=1, queue_timeout=5.0, clock=lambda: 0.0)
    await rate.admit()
    sleeper = asyncio.ensure_future(rate.admit())
    await asyncio.sleep(0.01)
    with pytest.raises(OverloadedError, match="already wait"):
        await rate.admit()  # one sleeper is the whole queue
    sleeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sleeper

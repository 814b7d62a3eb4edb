"""Dispatch over real loopback sockets against in-process fake workers."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson

from gateway.dispatch import PREFILL_LINGER_SECS
from tests.gateway.conftest import pd_settings
from tests.gateway.fakes import FakeWorker, start_workers
from tests.gateway_server import running_gateway


async def test_dual_dispatch_same_body_and_room_to_both(pd_cluster, session):
    prefills, decodes = pd_cluster
    async with (running_gateway(pd_settings(prefills, decodes)) as (url, _),
                session.post(url + "/generate", json={"text": "hello"}) as r):
        assert r.status == 200
        body = await r.json()
    assert body["meta_info"]["role"] == "decode"
    p = next(w for w in prefills if w.received)
    d = next(w for w in decodes if w.received)
    assert p.received[0] == d.received[0]
    sent = p.received[0]
    assert sent["bootstrap_host"] == "127.0.0.1"
    assert sent["bootstrap_port"] == 8998
    assert 0 <= sent["bootstrap_room"] <= 2**63 - 1
    assert sent["text"] == "hello"


async def test_prefill_400_returned_at_once_while_decode_hangs(session):
    prefill = (await start_workers("prefill", status=400))[0]
    decode = (await start_workers("decode", hang=True))[0]
    try:
        async with running_gateway(pd_settings([prefill], [decode])) as (url, state):
            t0 = time.perf_counter()
            async with session.post(url + "/generate", json={"text": "x"}) as r:
                assert r.status == 400
                err = await r.json()
            assert time.perf_counter() - t0 < 5.0  # request timeout is 10 s
            assert "prefill says 400" in err["error"]["message"]
            assert decode.received, "decode was contacted concurrently"
            # guards released: nothing counted in flight after the answer
            assert all(w.in_flight == 0 for w in state.workers)
    finally:
        await prefill.close()
        await decode.close()


async def test_prefill_failure_retried_while_decode_hangs(session):
    """Each attempt's failing prefill interrupts its pending decode; the retry loop goes on in
    the same handler task (the interruption leaves no cancellation behind)."""
    prefill = (await start_workers("prefill", status=503))[0]
    decode = (await start_workers("decode", hang=True))[0]
    try:
        settings = pd_settings([prefill], [decode], retry_max_retries=3,
                               disable_circuit_breaker=True)
        async with running_gateway(settings) as (url, state):
            t0 = time.perf_counter()
            async with session.post(url + "/generate", json={"text": "x"}) as r:
                assert r.status == 503
                err = await r.json()
            assert time.perf_counter() - t0 < 5.0  # request timeout is 10 s
            assert "prefill says 503" in err["error"]["message"]
            assert len(prefill.received) == 3
            assert all(w.in_flight == 0 for w in state.workers)
    finally:
        await prefill.close()
        await decode.close()


async def test_stream_prefill_failure_before_first_chunk_is_a_clean_error(session):
    """The decode's headers are in but no body yet when the prefill fails: the client gets the
    prefill's error status, not a 200 stream."""
    prefill = (await start_workers("prefill", status=500, hang=True))[0]
    decode = (await start_workers("decode", first_chunk_delay=5.0))[0]
    try:
        async with running_gateway(pd_settings([prefill], [decode], disable_retries=True)) \
                as (url, state):
            post = asyncio.ensure_future(session.post(url + "/generate",
                                                      json={"text": "x", "stream": True}))
            await asyncio.wait_for(decode.connected.wait(), 5)
            await asyncio.sleep(0.2)  # the decode's headers reach the gateway
            t0 = time.perf_counter()
            prefill.released.set()
            async with await post as r:
                assert r.status == 500
                err = await r.json()
            assert time.perf_counter() - t0 < 2.0
            assert "prefill says 500" in err["error"]["message"]
            assert all(w.in_flight == 0 for w in state.workers)
    finally:
        await prefill.close()
        await decode.close()


async def test_retry_moves_to_another_decode_on_503(session):
    prefill = (await start_workers("prefill"))[0]
    bad = (await start_workers("decode", status=503))[0]
    good = (await start_workers("decode"))[0]
    try:
        settings = pd_settings([prefill], [bad, good], policy="round_robin")
        async with running_gateway(settings) as (url, state):
            statuses = []
            for _ in range(4):
                async with session.post(url + "/generate", json={"text": "x"}) as r:
                    statuses.append(r.status)
            assert statuses == [200] * 4
            assert bad.received and good.received
            retries = state.registry.get_sample_value("eldr_retries_total",
                                                      {"endpoint": "/generate"})
            assert retries and retries >= 1
            rooms = [b["bootstrap_room"] for b in prefill.received]
            assert len(set(rooms)) == len(rooms), "each attempt gets a new room"
    finally:
        for w in (prefill, bad, good):
            await w.close()


async def test_non_retryable_decode_400_is_returned(session):
    prefill = (await start_workers("prefill"))[0]
    decode = (await start_workers("decode", status=400))[0]
    try:
        async with running_gateway(pd_settings([prefill], [decode])) as (url, _):
            async with session.post(url + "/generate", json={"text": "x"}) as r:
                assert r.status == 400
            assert len(decode.received) == 1
    finally:
        await prefill.close()
        await decode.close()


async def test_all_attempts_fail_with_transport_error_gives_502(session):
    prefill = (await start_workers("prefill"))[0]
    decode = (await start_workers("decode"))[0]
    dead_url = decode.url
    await decode.close()
    try:
        settings = pd_settings([prefill], [decode], retry_max_retries=2,
                               disable_health_check=True)
        settings.decode = [dead_url]
        async with running_gateway(settings) as (url, _):
            async with session.post(url + "/generate", json={"text": "x"}) as r:
                assert r.status == 502
                err = await r.json()
            assert "decode worker" in err["error"]["message"]
    finally:
        await prefill.close()


async def test_streaming_passthrough_and_metrics(pd_cluster, session):
    prefills, decodes = pd_cluster
    async with running_gateway(pd_settings(prefills, decodes)) as (url, state):
        async with session.post(url + "/generate", json={"text": "x", "stream": True}) as r:
            assert r.status == 200
            assert r.content_type == "text/event-stream"
            raw = await r.read()
        lines = [ln for ln in raw.split(b"\n") if ln.startswith(b"data:")]
        assert lines[-1] == b"data: [DONE]"
        assert [orjson.loads(ln[5:])["index"] for ln in lines[:-1]] == [0, 1, 2]
        ttft = state.registry.get_sample_value("eldr_time_to_first_token_seconds_count",
                                               {"endpoint": "/generate"})
        assert ttft == 1
        assert all(w.in_flight == 0 for w in state.workers if w.role == "decode")
        # A prefill leg still open when the stream ends is settled off the client's path, within
        # PREFILL_LINGER_SECS (gateway/dispatch.py).
        deadline = time.perf_counter() + 2 * PREFILL_LINGER_SECS
        while any(w.in_flight for w in state.workers) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        assert all(w.in_flight == 0 for w in state.workers)


async def test_logprob_merge_non_stream_and_stream(pd_cluster, session):
    prefills, decodes = pd_cluster
    async with running_gateway(pd_settings(prefills, decodes)) as (url, _):
        async with session.post(url + "/generate",
                                json={"text": "x", "return_logprob": True}) as r:
            body = await r.json()
        assert body["meta_info"]["input_token_logprobs"] == [[-0.5, 1, None], [-0.25, 2, None]]
        async with session.post(url + "/generate", json={"text": "x", "return_logprob": True,
                                                         "stream": True}) as r:
            raw = await r.read()
        chunks = [orjson.loads(ln[5:]) for ln in raw.split(b"\n")
                  if ln.startswith(b"data:") and ln != b"data: [DONE]"]
        assert chunks and all(c["meta_info"]["input_token_logprobs"][0] == [-0.5, 1, None]
                              for c in chunks)


async def test_decode_killed_mid_stream_gives_clean_error_and_gateway_survives(session):
    prefill = (await start_workers("prefill"))[0]
    decode = (await start_workers("decode", die_after=1, chunks=5, chunk_delay=0.05))[0]
    try:
        async with running_gateway(pd_settings([prefill], [decode])) as (url, state):
            async with session.post(url + "/generate", json={"text": "x", "stream": True}) as r:
                assert r.status == 200
                raw = await r.read()
            events = [orjson.loads(ln[5:]) for ln in raw.split(b"\n") if ln.startswith(b"data:")]
            assert events[0]["index"] == 0
            assert events[-1]["error"]["code"] == 502
            errors = state.registry.get_sample_value(
                "eldr_upstream_errors_total",
                {"worker": decode.url, "role": "decode", "kind": "transport"})
            assert errors == 1
            decode.die_after = None
            async with session.get(url + "/health") as r:
                assert r.status == 200
            async with session.post(url + "/generate", json={"text": "x"}) as r:
                assert r.status == 200
            assert all(w.in_flight == 0 for w in state.workers)
    finally:
        await prefill.close()
        await decode.close()


async def test_client_disconnect_releases_in_flight(session):
    prefill = (await start_workers("prefill"))[0]
    decode = (await start_workers("decode", hang=True))[0]
    try:
        async with running_gateway(pd_settings([prefill], [decode])) as (url, state):
            task = asyncio.ensure_future(session.post(url + "/generate", json={"text": "x"}))
            await asyncio.wait_for(decode.connected.wait(), 5)
            assert sum(w.in_flight for w in state.workers) >= 1
            task.cancel()
            for _ in range(500):  # bounded wait for the gateway to notice the disconnect
                if all(w.in_flight == 0 for w in state.workers):
                    break
                await asyncio.sleep(0.01)
            assert all(w.in_flight == 0 for w in state.workers)
    finally:
        await prefill.close()
        await decode.close()


async def test_malformed_json_and_oversized_body(pd_cluster, session):
    prefills, decodes = pd_cluster
    async with running_gateway(pd_settings(prefills, decodes, max_payload_size=1000)) as (url, _):
        async with session.post(url + "/generate", data=b"{not json",
                                headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400
            assert "not valid JSON" in (await r.json())["error"]["message"]
        async with session.post(url + "/generate", data=b"[1,2]") as r:
            assert r.status == 400
            assert "JSON object" in (await r.json())["error"]["message"]
        async with session.post(url + "/generate", json={"text": "x" * 5000}) as r:
            assert r.status == 413
            assert "max_payload_size" in (await r.json())["error"]["message"]
        async with session.post(url + "/v1/chat/completions", json={"model": "m"}) as r:
            assert r.status == 400
            assert "messages" in (await r.json())["error"]["message"]
        async with session.post(url + "/generate", json={"text": []}) as r:
            assert r.status == 400
            assert "text" in (await r.json())["error"]["message"]
    assert not any(w.received for w in prefills + decodes)


async def test_regular_mode(session):
    worker = (await start_workers("regular"))[0]
    try:
        settings = pd_settings([], [], pd_disaggregation=False, worker_urls=[worker.url])
        async with (running_gateway(settings) as (url, _),
                    session.post(url + "/v1/completions",
                                 json={"prompt": "x", "stream": True}) as r):
            assert r.status == 200
            assert b"data: [DONE]" in await r.read()
        assert "bootstrap_room" not in worker.received[0]
    finally:
        await worker.close()


async def test_prefill_first_flow_reuses_room_and_chooses_decode_after(pd_cluster, session):
    prefills, decodes = pd_cluster
    settings = pd_settings(prefills, decodes, pd_flow="prefill-first")
    async with (running_gateway(settings) as (url, _),
                session.post(url + "/generate", json={"text": "x", "stream": True}) as r):
        assert r.status == 200
        await r.read()
    p = next(w for w in prefills if w.received)
    d = next(w for w in decodes if w.received)
    assert p.received[0]["prefill_first"] is True and p.received[0]["stream"] is False
    assert "prefill_first" not in d.received[0]
    assert p.received[0]["bootstrap_room"] == d.received[0]["bootstrap_room"]


async def test_prefill_first_releases_room_when_no_decode(session):
    prefill = (await start_workers("prefill"))[0]
    decode = (await start_workers("decode", status=400))[0]
    try:
        settings = pd_settings([prefill], [decode], pd_flow="prefill-first")
        async with (running_gateway(settings) as (url, _),
                    session.post(url + "/generate", json={"text": "x"}) as r):
            assert r.status == 400
        assert prefill.paths[-1] == "/disaggregation/release"
        assert prefill.received[-1]["bootstrap_room"] == prefill.received[0]["bootstrap_room"]
    finally:
        await prefill.close()
        await decode.close()


async def test_no_workers_gives_503(session):
    settings = pd_settings([], [], pd_disaggregation=True)
    async with running_gateway(settings) as (url, _):
        async with session.post(url + "/generate", json={"text": "x"}) as r:
            assert r.status == 503
        async with session.get(url + "/readiness") as r:
            assert r.status == 503


async def test_rate_limit_queue_full_gives_429(session):
    prefill = (await start_workers("prefill"))[0]
    decode = (await start_workers("decode", hang=True))[0]
    try:
        settings = pd_settings([prefill], [decode], max_concurrent_requests=1, queue_size=0)
        async with running_gateway(settings) as (url, state):
            first = asyncio.ensure_future(session.post(url + "/generate", json={"text": "a"}))
            await asyncio.wait_for(decode.connected.wait(), 5)
            async with session.post(url + "/generate", json={"text": "b"}) as r:
                assert r.status == 429
            assert state.registry.get_sample_value("eldr_rate_limit_rejections_total",
                                                   {"reason": "queue_full"}) == 1
            decode.released.set()
            resp = await asyncio.wait_for(first, 5)
            assert resp.status == 200
            resp.release()
    finally:
        await prefill.close()
        await decode.close()


async def test_aiohttp_client_error_type_is_transport():
    assert issubclass(aiohttp.ServerDisconnectedError, aiohttp.ClientError)
    assert FakeWorker("decode").role == "decode"


async def test_deeply_nested_body_is_a_clear_400(pd_cluster, session):
    prefills, decodes = pd_cluster
    deep = b'{"text": "x", "extra": ' + b"[" * 500 + b"]" * 500 + b"}"
    async with (running_gateway(pd_settings(prefills, decodes)) as (url, _),
                session.post(url + "/generate", data=deep) as r):
        assert r.status == 400
        assert "cannot be forwarded" in (await r.json())["error"]["message"]


async def test_circuit_opens_after_failures_and_takes_worker_out(session):
    prefill = (await start_workers("prefill"))[0]
    decode = (await start_workers("decode", status=503))[0]
    try:
        settings = pd_settings([prefill], [decode], retry_max_retries=1, cb_failure_threshold=2,
                               disable_health_check=True)
        async with running_gateway(settings) as (url, state):
            for _ in range(2):
                async with session.post(url + "/generate", json={"text": "x"}) as r:
                    assert r.status == 503
            assert state.registry.get_sample_value("eldr_worker_circuit_state",
                                                   {"worker": decode.url}) == 1
            async with session.post(url + "/generate", json={"text": "x"}) as r:
                assert r.status == 503
                assert "no available decode" in (await r.json())["error"]["message"]
            assert len(decode.received) == 2  # the open circuit kept the third away
    finally:
        await prefill.close()
        await decode.close()


async def test_admin_guard_runs_before_routing_and_only_with_a_token(pd_cluster, session):
    prefills, decodes = pd_cluster
    auth = {"Authorization": "Bearer tok"}
    async with running_gateway(pd_settings(prefills, decodes, admin_token="tok")) as (url, _):
        for method, path in (("GET", "/workers"), ("GET", "/workers/nope/extra"),
                             ("PATCH", "/workers"), ("POST", "/admin/unknown")):
            async with session.request(method, url + path) as r:
                assert r.status == 401, (method, path)
                assert (await r.json())["error"]["code"] == "unauthorized"
        async with session.get(url + "/workers", headers={"Authorization": "Bearer no"}) as r:
            assert r.status == 401
        async with session.get(url + "/workers", headers=auth) as r:
            assert r.status == 200
        async with session.post(url + "/admin/unknown", headers=auth) as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "unknown_url"
        async with session.post(url + "/generate", json={"text": "x"}) as r:
            assert r.status == 200  # generation needs no admin token
        async with session.post(url + "/generate", data=b"{bad") as r:
            assert r.status == 400  # the JSON error mapping still runs behind the guard
    async with running_gateway(pd_settings(prefills, decodes)) as (url, _), \
            session.get(url + "/workers") as r:
        assert r.status == 200  # no token configured: admin endpoints are open

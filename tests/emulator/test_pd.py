"""PD semantics of the emulator: the bootstrap handshake, its timeouts and aborts, and the
prefill-first extension. Expectations cite sglang 0.5.23 `srt/disaggregation/`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from loadtest.emulator.cluster import Cluster, ClusterConfig, run_cluster
from loadtest.emulator.config import EngineOptions
from tests.emulator.workers import wait_until
from zones.geometry import geometry_by_name
from zones.routed_experts import decode_counts, decode_routed_experts

PROMPT = "a lawyer reads the contract and the court hears the case about the contract terms"
GEOMETRY = geometry_by_name("Qwen3-30B-A3B")


@contextlib.asynccontextmanager
async def cluster(**engine: Any) -> AsyncIterator[Cluster]:
    opts = EngineOptions(**{"instant": True, **engine})
    async with run_cluster(ClusterConfig(prefill=1, decode=1, engine=opts)) as c:
        yield c




def pd_body(c: Cluster, room: int, **extra: Any) -> dict[str, Any]:
    body = {"text": PROMPT, "bootstrap_host": "127.0.0.1",
            "bootstrap_port": c.prefill[0].bootstrap_port, "bootstrap_room": room,
            "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}}
    body.update(extra)
    return body


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]
               ) -> tuple[int, Any]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def test_pd_pair_completes_and_decode_returns_output_rows(
        session: aiohttp.ClientSession) -> None:
    async with cluster() as c:
        body = pd_body(c, 11, return_routed_experts=True, return_logprob=True)
        (ps, pout), (ds, dout) = await asyncio.gather(
            post(session, c.prefill_urls[0] + "/generate", body),
            post(session, c.decode_urls[0] + "/generate", body))
    assert ps == ds == 200
    # Prefill: SGLang's one-token response, finish_reason FINISH_LENGTH(length=0).
    assert len(pout["output_ids"]) == 1
    assert pout["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    # The decode's output token 0 is the token the prefill sampled (sent with the KV).
    assert dout["output_ids"][0] == pout["output_ids"][0]
    assert len(dout["output_ids"]) == 6
    # Input logprobs only on the prefill (the router prepends them to the decode's).
    prompt_len = dout["meta_info"]["prompt_tokens"]
    assert len(pout["meta_info"]["input_token_logprobs"]) == prompt_len
    assert dout["meta_info"]["input_token_logprobs"] == []
    # Prefill rows: the prompt; decode rows: [0, seqlen-1) with only output rows valid.
    prows = decode_routed_experts(pout["meta_info"]["routed_experts"], GEOMETRY)
    drows = decode_routed_experts(dout["meta_info"]["routed_experts"], GEOMETRY)
    assert prows.shape[0] == prompt_len
    assert drows.shape[0] == prompt_len + 6 - 1
    assert not drows[:prompt_len].any()  # never forwarded on the decode
    out_rows = drows[prompt_len:]
    assert all(len(set(r)) == GEOMETRY.top_k for r in out_rows.reshape(-1, GEOMETRY.top_k).tolist())


async def test_missing_room_is_400_on_both_roles(session: aiohttp.ClientSession) -> None:
    async with cluster() as c:
        for url in (c.prefill_urls[0], c.decode_urls[0]):
            status, out = await post(session, url + "/generate", {"text": PROMPT})
            assert status == 400
            # scheduler.py handle_generate_request, verbatim prefix
            assert out["error"]["message"].startswith(
                "Invalid request: Disaggregated request received without bootstrap room id.")


async def test_prefill_waits_for_decode_then_both_finish(
        session: aiohttp.ClientSession) -> None:
    async with cluster() as c:
        prefill = c.prefill[0].worker
        body = pd_body(c, 12)
        ptask = asyncio.ensure_future(post(session, c.prefill_urls[0] + "/generate", body))
        await wait_until(lambda: prefill.bootstrap_queue == 1)
        assert prefill.prefill_tokens_total == 0  # no forward pass before the decode connects
        assert not ptask.done()
        ds, _ = await post(session, c.decode_urls[0] + "/generate", body)
        ps, _ = await ptask
        assert ps == ds == 200
        assert prefill.prefill_tokens_total > 0


async def test_decode_never_comes_prefill_times_out(session: aiohttp.ClientSession) -> None:
    """The stock-SGLang deadlock of "prefill first, then choose a decode": the prefill sits in
    its bootstrap queue and aborts after SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT."""
    async with cluster(bootstrap_timeout_secs=0.3) as c:
        start = time.monotonic()
        status, out = await post(session, c.prefill_urls[0] + "/generate", pd_body(c, 13))
        elapsed = time.monotonic() - start
        async with session.get(c.prefill_urls[0] + "/metrics") as resp:
            metrics = await resp.text()
    assert status == 500
    assert out["message"].startswith("Prefill bootstrap failed for request")
    assert "timed out" in out["message"] and "KVPoll.Bootstrapping" in out["message"]
    assert elapsed >= 0.3
    assert 'sglang:num_bootstrap_failed_reqs_total{model_name="Qwen3-30B-A3B"} 1.0' in metrics


async def test_prefill_never_comes_decode_times_out(session: aiohttp.ClientSession) -> None:
    async with cluster(bootstrap_timeout_secs=0.2, waiting_timeout_secs=0.2) as c:
        status, out = await post(session, c.decode_urls[0] + "/generate", pd_body(c, 14))
    assert status == 500
    assert out["message"].startswith("Decode handshake failed for request")
    assert "KVPoll.WaitingForInput" in out["message"]


async def test_unreachable_bootstrap_server_fails_the_decode(
        session: aiohttp.ClientSession) -> None:
    async with cluster() as c:
        body = pd_body(c, 15, bootstrap_port=1)  # nothing listens on port 1
        status, out = await post(session, c.decode_urls[0] + "/generate", body)
    assert status == 500 and "cannot reach bootstrap server" in out["message"]


async def test_fake_bootstrap_host_skips_the_handshake(session: aiohttp.ClientSession) -> None:
    async with cluster() as c:
        body = pd_body(c, 0, bootstrap_host="2.2.2.2", bootstrap_port=None)
        for url in (c.prefill_urls[0], c.decode_urls[0]):
            status, _ = await post(session, url + "/generate", body)
            assert status == 200


async def test_prefill_first_returns_counts_and_holds_kv(session: aiohttp.ClientSession) -> None:
    async with cluster() as c:
        prefill = c.prefill[0].worker
        body = pd_body(c, 21, prefill_first=True, return_routed_experts=True,
                       routed_experts_start_len=2)
        status, pout = await post(session, c.prefill_urls[0] + "/generate", body)
        assert status == 200  # answered without any decode connected
        meta = pout["meta_info"]
        prompt_len = meta["prompt_tokens"]
        assert meta["expert_geometry"] == GEOMETRY.to_dict()
        counts = decode_counts(meta["prompt_expert_counts"], GEOMETRY)
        assert counts.shape == (48, 128)
        assert (counts.sum(axis=1) == prompt_len * GEOMETRY.top_k).all()
        rows = decode_routed_experts(meta["routed_experts"], GEOMETRY)
        assert rows.shape[0] == prompt_len - 2
        # The counts are the histogram of the full prompt's routing.
        full = prefill.routing.route_prompt(prefill.tokenizer.encode(PROMPT), PROMPT)
        np.testing.assert_array_equal(rows, full[2:])
        assert prefill.registry.held_rooms == 1
        # A decode chosen afterwards collects the held KV.
        ds, dout = await post(session, c.decode_urls[0] + "/generate", body)
        assert ds == 200 and dout["output_ids"][0] == pout["output_ids"][0]
        assert prefill.registry.held_rooms == 0


async def test_prefill_first_hold_timeout_frees_the_kv(session: aiohttp.ClientSession) -> None:
    async with cluster() as c:
        prefill = c.prefill[0].worker
        body = pd_body(c, 22, prefill_first=True, prefill_first_hold_secs=0.2)
        status, _ = await post(session, c.prefill_urls[0] + "/generate", body)
        assert status == 200 and prefill.registry.held_rooms == 1
        await wait_until(lambda: prefill.registry.held_rooms == 0)
        start = time.monotonic()
        ds, dout = await post(session, c.decode_urls[0] + "/generate", body)
    assert ds == 500 and "was freed" in dout["message"]
    assert time.monotonic() - start < 5  # fails at once, not after the waiting timeout


async def test_prefill_first_release(session: aiohttp.ClientSession) -> None:
    async with cluster() as c:
        body = pd_body(c, 23, prefill_first=True)
        await post(session, c.prefill_urls[0] + "/generate", body)
        url = c.prefill_urls[0] + "/disaggregation/release"
        assert await post(session, url, {"bootstrap_room": 23}) == (
            200, {"bootstrap_room": 23, "released": True})
        status, _ = await post(session, url, {"bootstrap_room": 23})
        assert status == 404
        await post(session, c.prefill_urls[0] + "/generate", pd_body(c, 25, prefill_first=True))
        assert await post(session, url, {"bootstrap_room": [25, 26]}) == (
            200, {"bootstrap_room": [25, 26], "released": [True, False]})
        status, out = await post(session, url, {"bootstrap_room": "x"})
        assert status == 400 and "bootstrap_room" in out["error"]["message"]
        ds, dout = await post(session, c.decode_urls[0] + "/generate", body)
        assert ds == 500 and "released" in dout["message"]


async def test_prefill_first_rejected_when_disabled(session: aiohttp.ClientSession) -> None:
    async with cluster(prefill_first=False) as c:
        status, out = await post(session, c.prefill_urls[0] + "/generate",
                                 pd_body(c, 24, prefill_first=True))
    assert status == 400 and "prefill_first" in out["error"]["message"]


async def test_decode_client_disconnect_frees_the_batch_slot(
        session: aiohttp.ClientSession) -> None:
    # Slow steps so the request is still running when the client goes away.
    async with cluster(instant=False, time_scale=20.0) as c:
        decode = c.decode[0].worker
        body = pd_body(c, 31, prefill_first=True, stream=True)
        body["sampling_params"] = {"max_new_tokens": 10_000, "ignore_eos": True}
        status, _ = await post(session, c.prefill_urls[0] + "/generate",
                               {**body, "stream": False})
        assert status == 200
        resp = await session.post(c.decode_urls[0] + "/generate", json=body)
        first = await resp.content.readline()
        assert first.startswith(b"data: ")
        assert decode.decode_engine.load().num_running_reqs == 1
        resp.close()  # client disconnect
        await wait_until(lambda: decode.decode_engine.load().num_running_reqs == 0)
        assert decode.decode_engine.stats().requests_aborted == 1


async def test_decode_disconnect_during_handshake_aborts_the_prefill(
        session: aiohttp.ClientSession) -> None:
    """Closing the decode connection before the KV arrived fails the room on the prefill."""
    async with cluster(bootstrap_timeout_secs=30) as c:
        prefill, decode = c.prefill[0].worker, c.decode[0].worker
        body = pd_body(c, 32)
        # The decode connects first and waits for a prefill that has not arrived yet.
        dtask = asyncio.ensure_future(post(session, c.decode_urls[0] + "/generate", body))
        await wait_until(lambda: decode.transfer_queue == 1 and len(prefill.registry) == 1)
        dtask.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dtask
        await wait_until(lambda: len(prefill.registry) == 0)
        start = time.monotonic()
        status, out = await post(session, c.prefill_urls[0] + "/generate", body)
    assert status == 500 and "disconnected" in out["message"]
    assert time.monotonic() - start < 5  # no wait for the bootstrap timeout


async def test_prefill_first_on_openai_endpoints_uses_sglext(
        session: aiohttp.ClientSession) -> None:
    async with cluster() as c:
        base = {"bootstrap_host": "127.0.0.1", "bootstrap_port": c.prefill[0].bootstrap_port,
                "bootstrap_room": 41, "prefill_first": True, "max_tokens": 3,
                "ignore_eos": True}
        chat = {**base, "model": "m", "messages": [{"role": "user", "content": PROMPT}]}
        status, pout = await post(session, c.prefill_urls[0] + "/v1/chat/completions", chat)
        assert status == 200
        counts = decode_counts(pout["sglext"]["prompt_expert_counts"], GEOMETRY)
        assert (counts.sum(axis=1) == pout["usage"]["prompt_tokens"] * GEOMETRY.top_k).all()
        assert pout["sglext"]["expert_geometry"]["num_layers"] == 48
        ds, dout = await post(session, c.decode_urls[0] + "/v1/chat/completions", chat)
        assert ds == 200 and dout["usage"]["completion_tokens"] == 3
        assert "sglext" not in dout  # nothing requested from the decode


async def test_non_stream_client_timeout_aborts_the_decode() -> None:
    async with cluster(instant=False, time_scale=20.0) as c:
        decode = c.decode[0].worker
        body = pd_body(c, 42, prefill_first=True)
        body["sampling_params"] = {"max_new_tokens": 10_000, "ignore_eos": True}
        async with aiohttp.ClientSession() as s:
            status, _ = await post(s, c.prefill_urls[0] + "/generate", body)
            assert status == 200
            with pytest.raises(asyncio.TimeoutError):
                async with s.post(c.decode_urls[0] + "/generate", json=body,
                                  timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
                    await resp.read()
        await wait_until(lambda: decode.decode_engine.stats().requests_aborted == 1)
        assert decode.decode_engine.load().num_running_reqs == 0


async def test_streaming_failure_is_an_abort_chunk_then_done(
        session: aiohttp.ClientSession) -> None:
    """tokenizer_manager._handle_abort_finish_reason: a stream yields the abort output."""
    async with cluster() as c, session.post(c.decode_urls[0] + "/generate",
                            json={"text": PROMPT, "stream": True}) as resp:
        assert resp.status == 200
        raw = (await resp.read()).decode()
    events = [e[len("data: "):] for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]" and len(events) == 2
    reason = orjson.loads(events[0])["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and reason["status_code"] == 400
    assert reason["message"].startswith("Invalid request: Disaggregated request received")

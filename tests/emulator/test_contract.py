"""HTTP contract of one emulated worker, checked against sglang 0.5.23's sources.

Each expectation cites the sglang function it comes from; see docs/wire-format.md.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from tests.emulator.workers import worker
from zones.geometry import geometry_by_name
from zones.routed_experts import decode_routed_experts

PROMPT = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat"
# tokenizer_manager._handle_batch_output meta_info keys (+ e2e_latency once finished).
META_KEYS = {"id", "finish_reason", "prompt_tokens", "weight_version", "num_retractions",
             "reasoning_tokens", "completion_tokens", "cached_tokens", "e2e_latency"}


async def sse_events(resp: aiohttp.ClientResponse) -> list[bytes]:
    """Raw `data:` payloads in order; asserts SGLang's framing on every event."""
    raw = (await resp.read()).decode()
    assert raw.endswith("\n\n")
    events = raw.split("\n\n")[:-1]
    for e in events:
        assert e.startswith("data: "), e
    return [e[len("data: "):].encode() for e in events]


async def test_generate_non_stream_fields(session: aiohttp.ClientSession) -> None:
    async with worker() as w:
        body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 6, "ignore_eos": True},
                "rid": "r-1"}
        async with session.post(w.url + "/generate", json=body) as resp:
            assert resp.status == 200
            out = await resp.json()
    assert set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert set(meta) == META_KEYS
    assert meta["id"] == "r-1"
    assert meta["finish_reason"] == {"type": "length", "length": 6}  # FINISH_LENGTH.to_json
    assert meta["completion_tokens"] == len(out["output_ids"]) == 6
    assert meta["prompt_tokens"] == len(w.worker.tokenizer.encode(PROMPT))
    assert out["text"] == w.worker.tokenizer.decode(out["output_ids"])


async def test_generate_batch_and_input_ids(session: aiohttp.ClientSession) -> None:
    async with worker() as w:
        body = {"input_ids": [[5, 6, 7], [8, 9]], "sampling_params": {"max_new_tokens": 2,
                                                                     "ignore_eos": True}}
        async with session.post(w.url + "/generate", json=body) as resp:
            outs = await resp.json()
    assert isinstance(outs, list) and len(outs) == 2
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [3, 2]


async def test_stream_sse_format_ends_with_done(session: aiohttp.ClientSession) -> None:
    async with worker() as w:
        body = {"text": PROMPT, "stream": True,
                "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}
        async with session.post(w.url + "/generate", json=body) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = await sse_events(resp)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert len(chunks) == 4  # one chunk per token; the last one carries finish_reason
    assert [len(c["output_ids"]) for c in chunks] == [1, 2, 3, 4]  # cumulative (non-incremental)
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    assert chunks[-1]["text"].startswith(chunks[-2]["text"])


async def test_routed_experts_round_trip_regular(session: aiohttp.ClientSession) -> None:
    """Regular mode: rows for positions [start_len, seqlen - 1) (scheduler
    _maybe_collect_routed_experts), base64 little-endian int32 [tokens, layers, top_k]."""
    geometry = geometry_by_name("Qwen3-30B-A3B")
    async with worker() as w:
        prompt_ids = w.worker.tokenizer.encode(PROMPT)
        for start in (0, 3):
            body = {"text": PROMPT, "return_routed_experts": True,
                    "routed_experts_start_len": start,
                    "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}}
            async with session.post(w.url + "/generate", json=body) as resp:
                out = await resp.json()
            rows = decode_routed_experts(out["meta_info"]["routed_experts"], geometry)
            assert rows.shape == (len(prompt_ids) + 5 - 1 - start, 48, 8)
            expected_prompt = w.worker.routing.route_prompt(prompt_ids, PROMPT)[start:]
            np.testing.assert_array_equal(rows[: len(prompt_ids) - start], expected_prompt)
            # top-k experts of one token in one layer are distinct
            assert all(len(set(r)) == 8 for r in rows.reshape(-1, 8).tolist())


async def test_routed_experts_start_len_beyond_prompt_is_400(
        session: aiohttp.ClientSession) -> None:
    async with worker() as w:
        body = {"input_ids": [3, 4], "return_routed_experts": True,
                "routed_experts_start_len": 5}
        async with session.post(w.url + "/generate", json=body) as resp:
            assert resp.status == 400
            assert "routed_experts_start_len" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize("body, field", [
    ({"sampling_params": {"max_new_tokens": 2}}, "text"),
    ({"text": "x", "input_ids": [1]}, "input_ids"),
    ({"text": "x", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ({"text": "x", "stream": "yes"}, "stream"),
    ({"text": "x", "bootstrap_room": "seven"}, "bootstrap_room"),
    ({"input_ids": [1, "a"]}, "input_ids"),
])
async def test_bad_input_is_400_naming_the_field(session: aiohttp.ClientSession,
                                                 body: dict[str, Any], field: str) -> None:
    async with worker() as w:
        async with session.post(w.url + "/generate", json=body) as resp:
            assert resp.status == 400
            assert field in (await resp.json())["error"]["message"]
        async with session.post(w.url + "/generate", data=b"{not json") as resp:
            assert resp.status == 400


async def test_info_and_load_endpoints(session: aiohttp.ClientSession) -> None:
    async with worker(role="decode") as w:
        async with session.get(w.url + "/v1/loads") as resp:
            loads = await resp.json()
        # v1_loads.get_loads envelope + LoadSnapshot core keys
        assert {"timestamp", "version", "accelerator", "num_accelerators", "loads"} <= set(loads)
        snap = loads["loads"][0]
        for key in ("dp_rank", "num_running_reqs", "num_waiting_reqs", "num_total_tokens",
                    "num_used_tokens", "token_usage", "max_running_requests"):
            assert key in snap
        assert snap["disaggregation"]["mode"] == "decode"
        async with session.get(w.url + "/v1/loads?include=core") as resp:
            assert "disaggregation" not in (await resp.json())["loads"][0]
        async with session.get(w.url + "/v1/loads?include=bogus") as resp:
            assert resp.status == 400
        async with session.get(w.url + "/get_load") as resp:
            assert (await resp.json())[0]["num_tokens"] == 0
        for path in ("/server_info", "/get_server_info"):
            async with session.get(w.url + path) as resp:
                info = await resp.json()
            assert info["disaggregation_mode"] == "decode" and info["dp_size"] == 1
        for path in ("/model_info", "/get_model_info"):
            async with session.get(w.url + path) as resp:
                info = await resp.json()
            assert info["is_generation"] is True and info["model_path"] == "Qwen3-30B-A3B"
        async with session.get(w.url + "/v1/models") as resp:
            assert (await resp.json())["data"][0]["id"] == "Qwen3-30B-A3B"
        async with session.post(w.url + "/flush_cache") as resp:
            assert (await resp.text()).startswith("Cache flushed.")
        for path in ("/health", "/health_generate", "/ready"):
            async with session.get(w.url + path) as resp:
                assert resp.status == 200, path


async def test_metrics_names_and_step_stats(session: aiohttp.ClientSession) -> None:
    async with worker() as w:
        body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}
        async with session.post(w.url + "/generate", json=body) as resp:
            assert resp.status == 200
        async with session.get(w.url + "/metrics") as resp:
            text = await resp.text()
        async with session.get(w.url + "/emulator/stats") as resp:
            stats = await resp.json()
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:gen_throughput",
                 "sglang:token_usage", "sglang:prompt_tokens_total",
                 "sglang:generation_tokens_total", "sglang:time_to_first_token_seconds_bucket",
                 "sglang:inter_token_latency_seconds_bucket",
                 "sglang:e2e_request_latency_seconds_bucket",
                 "emulator_distinct_experts_per_layer_bucket", "emulator_batch_size_bucket",
                 "emulator_step_seconds_bucket"):
        assert name in text, name
    gen = [ln for ln in text.splitlines() if ln.startswith("sglang:generation_tokens_total")]
    assert gen and float(gen[0].split()[-1]) == 3.0
    assert stats["role"] == "regular" and stats["url"] == w.url
    assert stats["tokens"] == 3 and stats["steps"] >= 1


async def test_openai_chat_and_completions_with_the_openai_client() -> None:
    openai = pytest.importorskip("openai")
    async with worker() as w:
        client = openai.AsyncOpenAI(base_url=w.url + "/v1", api_key="unused")
        try:
            chat = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=4,
                extra_body={"ignore_eos": True})
            assert chat.choices[0].finish_reason == "length"
            assert chat.usage is not None and chat.usage.completion_tokens == 4
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=3,
                stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True, "return_routed_experts": True})
            chunks = [c async for c in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text and chunks[0].choices[0].delta.role == "assistant"
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
            ext = [c.model_extra.get("sglext") for c in chunks if c.model_extra]
            routed = [e["routed_experts"] for e in ext if e]
            assert len(routed) == 1
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
            comp = await client.completions.create(model="m", prompt=PROMPT, max_tokens=2,
                                                   extra_body={"ignore_eos": True})
            assert comp.choices[0].finish_reason == "length" and comp.choices[0].text
        finally:
            await client.close()


async def test_openai_stream_raw_framing(session: aiohttp.ClientSession) -> None:
    async with worker() as w:
        body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": 2, "stream": True, "ignore_eos": True}
        async with session.post(w.url + "/v1/chat/completions", json=body) as resp:
            events = await sse_events(resp)
        async with session.post(w.url + "/v1/chat/completions", json={"messages": []}) as resp:
            assert resp.status == 400
            assert "messages" in (await resp.json())["message"]
        bad_part = {"messages": [{"role": "user", "content": [{"type": "text", "text": {}}]}]}
        async with session.post(w.url + "/v1/chat/completions", json=bad_part) as resp:
            assert resp.status == 400  # was a 500 (a TypeError joining the parts)
            assert "messages[0].content[0].text" in (await resp.json())["message"]
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

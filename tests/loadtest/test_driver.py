"""The load driver against a tiny in-process SSE server on a real loopback socket."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from loadtest.driver import (
    DriverConfig,
    DriverError,
    arrival_offsets,
    parse_sse_data,
    run_load,
    write_run,
)
from loadtest.workloads import Conversation, Turn

TOKEN_GAP = 0.004  # seconds between streamed tokens
FIRST_TOKEN_DELAY = 0.02


class FakeSSE:
    """Streams `max_tokens` one-word tokens, SGLang-style, and remembers what it received."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if "fail" in body["text"]:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        n = body["sampling_params"]["max_new_tokens"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(FIRST_TOKEN_DELAY)
        text = ""
        for i in range(n):
            if i:
                await asyncio.sleep(TOKEN_GAP)
            text += f"w{i} "
            meta: dict[str, Any] = {"completion_tokens": i + 1, "prompt_tokens": 9}
            if body.get("return_routed_experts") and i == n - 1:
                meta["routed_experts"] = "A" * 1_000_000  # longer than aiohttp's line cap
            chunk = {"text": text, "meta_info": meta}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        n = body["max_tokens"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(FIRST_TOKEN_DELAY)
        for i in range(n):
            if i:
                await asyncio.sleep(TOKEN_GAP)
            chunk = {"choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n}}
        await resp.write(b"data: " + orjson.dumps(usage) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, FakeSSE]]:
    fake = FakeSSE()
    app = web.Application()
    app.router.add_post("/generate", fake.generate)
    app.router.add_post("/v1/chat/completions", fake.chat)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    try:
        yield f"http://127.0.0.1:{srv.port}", fake
    finally:
        await srv.close()


def _convs(n: int, tokens: int = 5, turns: int = 1, text: str = "hello") -> list[Conversation]:
    return [
        Conversation(
            f"c{i}",
            "task",
            "code",
            f"doc{i}",
            "evaluation",
            tuple(Turn(f"{text} {i}.{k}", tokens) for k in range(turns)),
        )
        for i in range(n)
    ]


async def test_generate_records_ttft_tpot_and_excludes_warmup(
    server: tuple[str, FakeSSE], tmp_path: Path
) -> None:
    url, fake = server
    config = DriverConfig(url=url, rate=200.0, num_requests=6, warmup=2, progress=False, seed=3)
    result = await run_load(config, _convs(8, tokens=5))
    assert len(fake.bodies) == 8  # warm-up requests were sent...
    assert [r.conversation_id for r in result.records] == [f"c{i}" for i in range(2, 8)]
    for r in result.records:  # ...but only the measured ones are recorded
        assert r.success, r.error
        assert r.output_tokens == 5
        assert r.prompt_tokens == 9
        assert r.ttft is not None and r.ttft >= FIRST_TOKEN_DELAY
        assert r.tpot is not None and r.tpot >= TOKEN_GAP
        assert r.tpot == pytest.approx((r.latency - r.ttft) / 4)
        assert len(r.itl) == 4
    offsets = arrival_offsets(6, 200.0, 3)
    assert [r.scheduled_s for r in result.records] == pytest.approx(offsets)
    assert all(r.sent_s >= r.scheduled_s for r in result.records)
    summary = write_run(result, tmp_path)
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["tpot_ms"]["p50"] >= TOKEN_GAP * 1000
    assert (tmp_path / "requests.jsonl").read_text().count("\n") == 6
    header, row = (tmp_path / "summary.csv").read_text().splitlines()
    assert "tpot_ms_p99" in header.split(",") and row


async def test_long_final_line_with_routed_experts(server: tuple[str, FakeSSE]) -> None:
    url, _ = server
    config = DriverConfig(
        url=url,
        num_requests=1,
        warmup=0,
        progress=False,
        extra_body={"return_routed_experts": True},
    )
    result = await run_load(config, _convs(1, tokens=3))
    rec = result.records[0]
    assert rec.success, rec.error
    assert rec.routed_experts is not None and len(rec.routed_experts) == 1_000_000
    assert "routed_experts" not in rec.to_json()


async def test_chat_multi_turn_carries_previous_output(server: tuple[str, FakeSSE]) -> None:
    url, fake = server
    config = DriverConfig(
        url=url, endpoint="chat", concurrency=2, num_requests=2, warmup=0, progress=False
    )
    result = await run_load(config, _convs(2, tokens=3, turns=2))
    assert len(result.records) == 4 and all(r.success for r in result.records)
    assert all(r.output_tokens == 3 for r in result.records)
    second_turns = [b for b in fake.bodies if len(b["messages"]) == 3]
    assert len(second_turns) == 2
    for b in second_turns:
        roles = [m["role"] for m in b["messages"]]
        assert roles == ["user", "assistant", "user"]
        assert b["messages"][1]["content"] == "w0 w1 w2 "


async def test_http_errors_are_recorded_not_raised(server: tuple[str, FakeSSE]) -> None:
    url, _ = server
    config = DriverConfig(url=url, num_requests=3, warmup=0, progress=False)
    result = await run_load(config, _convs(3, text="please fail"))
    assert [r.success for r in result.records] == [False] * 3
    assert all(r.status == 500 and "HTTP 500" in (r.error or "") for r in result.records)
    assert result.summary()["errors"] == {"HTTP 500": 3}


async def test_unreachable_url_is_an_error_record() -> None:
    config = DriverConfig(
        url="http://127.0.0.1:9", num_requests=1, warmup=0, progress=False, request_timeout=5
    )
    result = await run_load(config, _convs(1))
    assert not result.records[0].success
    assert result.records[0].error


async def test_max_duration_bounds_new_arrivals(server: tuple[str, FakeSSE]) -> None:
    url, fake = server
    # Mean gap 1 s but a 0.3 s bound: only arrivals before 0.3 s are sent.
    config = DriverConfig(
        url=url, rate=1.0, num_requests=50, warmup=0, max_duration=0.3, progress=False, seed=1
    )
    result = await run_load(config, _convs(50, tokens=2))
    expected = sum(1 for t in arrival_offsets(50, 1.0, 1) if t < 0.3)
    assert len(result.records) == expected == len(fake.bodies)


def test_bad_config_names_the_flag() -> None:
    with pytest.raises(DriverError, match="--url"):
        DriverConfig(url="localhost:1")
    with pytest.raises(DriverError, match="--rate"):
        DriverConfig(url="http://x", rate=0)
    with pytest.raises(DriverError, match="--concurrency"):
        DriverConfig(url="http://x", concurrency=0)
    assert DriverConfig(url="http://x", rate=math.inf).rate == math.inf


def test_parse_sse_data_shapes() -> None:
    assert parse_sse_data("chat", b"[DONE]") is None
    info = parse_sse_data("generate", b'{"text": "ab", "meta_info": {"completion_tokens": 2}}')
    assert info is not None and info.cumulative_text and info.tokens_total == 2
    err = parse_sse_data("generate", b'{"error": {"message": "bad request"}}')
    assert err is not None and err.error == "bad request"
    with pytest.raises(ValueError):
        parse_sse_data("chat", b"{not json")


def test_cli_bad_input_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from loadtest.cli import main

    assert main(["run", "--url", "localhost:1", "--no-progress"]) == 2
    assert "--url must start with http://" in capsys.readouterr().err
    missing = tmp_path / "none.jsonl"
    assert main(["run", "--url", "http://127.0.0.1:9", "--workload", str(missing)]) == 2
    assert "workload file not found" in capsys.readouterr().err
    assert main(["workloads", "build", "--kind", "task", "--num", "2", "--mix", "nope=1"]) == 2
    assert "unknown domain" in capsys.readouterr().err


async def test_cli_run_writes_results(server: tuple[str, FakeSSE], tmp_path: Path) -> None:
    from loadtest.cli import main

    url, _ = server
    out = tmp_path / "run"
    args = [
        "run",
        "--url",
        url,
        "--workload",
        "language",
        "--rate",
        "50",
        "--num-requests",
        "3",
        "--warmup",
        "1",
        "--max-output-tokens",
        "4",
        "--min-output-tokens",
        "2",
        "--no-progress",
        "--out",
        str(out),
    ]
    # The server runs on this test's event loop, so the CLI (which owns its own loop) runs in a
    # worker thread.
    assert await asyncio.to_thread(main, args) == 0
    lines = (out / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert all(orjson.loads(line)["success"] for line in lines)


def test_replicas_split_conversations_stably_and_evenly() -> None:
    from loadtest.driver import url_for

    one = DriverConfig(url="http://a:1")
    assert url_for(one, "c-1") == "http://a:1"
    cfg = DriverConfig(url="http://a:1", replica_urls=("http://b:1", "http://c:1"))
    picks = [url_for(cfg, f"conv-{i}") for i in range(3000)]
    assert picks == [url_for(cfg, f"conv-{i}") for i in range(3000)]  # stable
    for u in ("http://a:1", "http://b:1", "http://c:1"):
        assert 900 < picks.count(u) < 1100  # even within ~3 standard deviations
    with pytest.raises(DriverError, match="--url"):
        DriverConfig(url="http://a:1", replica_urls=("b:1",))

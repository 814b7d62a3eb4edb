"""The real SGLang Rust router (`sglang-router` from PyPI), unmodified, in front of an emulated
2-prefill / 2-decode cluster: it must discover the workers and serve `/generate` and streaming
`/v1/chat/completions` through the PD handshake."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from loadtest.emulator.cluster import Cluster, ClusterConfig, run_cluster
from loadtest.emulator.config import EngineOptions
from loadtest.procs import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("sglang_router") is None,
                       reason="sglang-router is not installed"),
]
ROUTER_READY_TIMEOUT_S = 60.0


@contextlib.asynccontextmanager
async def router(cluster: Cluster, log_path: Path) -> AsyncIterator[
        tuple[str, asyncio.subprocess.Process]]:
    port = free_port()
    cmd = cluster.router_command(port)
    assert cmd[1:3] == ["-m", "sglang_router.launch_router"]
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *cmd[1:], "--log-level", "warn", stdout=log, stderr=log)
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


async def wait_ready(session: aiohttp.ClientSession, url: str,
                     proc: asyncio.subprocess.Process, log_path: Path) -> None:
    """The router registers workers asynchronously; ready = a /generate succeeds."""
    deadline = time.monotonic() + ROUTER_READY_TIMEOUT_S
    body = {"text": "warm up", "sampling_params": {"max_new_tokens": 1}}
    last = ""
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise AssertionError(f"router exited with {proc.returncode}: "
                                 f"{log_path.read_text()[-3000:]}")
        try:
            async with session.post(url + "/generate", json=body) as resp:
                if resp.status == 200:
                    return
                last = f"{resp.status} {await resp.text()}"
        except aiohttp.ClientError as exc:
            last = repr(exc)
        await asyncio.sleep(0.25)
    raise AssertionError(f"router not ready after {ROUTER_READY_TIMEOUT_S}s: {last}")


async def test_rust_router_serves_generate_and_streaming_chat(tmp_path: Path) -> None:
    opts = EngineOptions(time_scale=1.0)
    timeout = aiohttp.ClientTimeout(total=30)
    async with run_cluster(ClusterConfig(prefill=2, decode=2, engine=opts)) as cluster, \
            router(cluster, tmp_path / "router.log") as (url, proc), \
            aiohttp.ClientSession(timeout=timeout) as session:
        await wait_ready(session, url, proc, tmp_path / "router.log")
        decode_tokens_before = sum(w.worker.decode_engine.stats().tokens for w in cluster.decode)

        prompt = "the court hears the case about the contract"
        body = {"text": prompt, "return_logprob": True,
                "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}}
        outs = []
        for _ in range(4):
            async with session.post(url + "/generate", json=body) as resp:
                assert resp.status == 200, await resp.text()
                # The router relays the body with content-type application/octet-stream.
                outs.append(orjson.loads(await resp.read()))
        for out in outs:
            meta = out["meta_info"]
            assert len(out["output_ids"]) == 5 and meta["finish_reason"]["type"] == "length"
            # The router prepends the prefill's input logprobs to the decode's (which has none).
            assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]

        chat = {"model": "any", "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 4, "stream": True, "ignore_eos": True}
        async with session.post(url + "/v1/chat/completions", json=chat) as resp:
            assert resp.status == 200
            raw = (await resp.read()).decode()
        events = [e[len("data: "):] for e in raw.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [orjson.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        content = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks)
        assert content

        decode_tokens = sum(w.worker.decode_engine.stats().tokens for w in cluster.decode)
        assert decode_tokens - decode_tokens_before == 4 * 5 + 4
        # Every prefill handshake completed: no room left waiting on any prefill.
        assert all(len(w.worker.registry) == 0 for w in cluster.prefill)

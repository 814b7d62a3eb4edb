"""The command lines: `python -m loadtest cluster --json` and `python -m loadtest.emulator`."""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import orjson
import pytest

pytestmark = pytest.mark.slow


async def test_cluster_cli_json_line_serves_and_stops_by_itself() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest", "cluster", "--prefill", "2", "--decode", "1",
        "--base-port", "0", "--instant", "--json", "--duration-secs", "20",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        info = orjson.loads(line)
        assert [len(info["prefill"]), len(info["decode"])] == [2, 1]
        p, d = info["prefill"][0], info["decode"][0]
        body = {"text": "hello there", "bootstrap_host": "127.0.0.1",
                "bootstrap_port": p["bootstrap_port"], "bootstrap_room": 5,
                "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
            async def go(url: str) -> int:
                async with s.post(url + "/generate", json=body) as r:
                    return r.status
            assert await asyncio.gather(go(p["url"]), go(d["url"])) == [200, 200]
        proc.terminate()  # SIGTERM: clean shutdown
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_single_worker_cli_rejects_bad_flags() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.emulator", "--role", "decode", "--bootstrap-port", "9",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2 and b"bootstrap_port" in err


async def test_single_worker_cli_runs_for_duration() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.emulator", "--role", "regular", "--port", "0",
        "--instant", "--duration-secs", "0.5",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0 and out.startswith(b"regular http://127.0.0.1:")

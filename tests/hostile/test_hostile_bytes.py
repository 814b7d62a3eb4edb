"""Hostile bytes get a 4xx naming the problem, never a 500, and cost bounded memory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp.http_exceptions import BadHttpMessage

from gateway.server import MalformedRequestFilter
from tests.gateway.conftest import pd_settings
from tests.gateway.fakes import FakeWorker, start_workers
from tests.gateway_server import running_gateway
from tests.hostile.helpers import gateway_process


async def raw_request(url: str, head: bytes, body: bytes) -> tuple[int, bytes]:
    """Send bytes no HTTP client library would send; returns (status, body)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@asynccontextmanager
async def pd_pair() -> AsyncIterator[tuple[FakeWorker, FakeWorker]]:
    prefill = (await start_workers("prefill"))[0]
    decode = (await start_workers("decode"))[0]
    try:
        yield prefill, decode
    finally:
        await prefill.close()
        await decode.close()


@pytest.mark.parametrize("header", [b"X-Request-Id: a\xff\xfe", b"traceparent: \xc3\x28",
                                    b"Authorization: Bearer \xff"])
async def test_non_utf8_forwarded_header_is_a_400_naming_it(header: bytes) -> None:
    async with pd_pair() as (prefill, decode), \
            running_gateway(pd_settings([prefill], [decode])) as (url, _):
        status, body = await raw_request(
            url, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + header + b"\r\n", b'{"text": "x"}')
        name = header.split(b":")[0].lower()
        assert status == 400 and name in body and b"not valid UTF-8" in body
        assert not decode.received  # nothing half-sent upstream


async def test_gzip_encoding_on_a_plain_body_is_415_not_500() -> None:
    async with pd_pair() as (prefill, decode), \
            running_gateway(pd_settings([prefill], [decode])) as (url, _), \
            aiohttp.ClientSession() as s:
        async with s.post(url + "/generate", data=b'{"text": "x"}',
                          headers={"Content-Encoding": "gzip",
                                   "Content-Type": "application/json"}) as r:
            assert r.status == 415
            assert "Content-Encoding" in (await r.json())["error"]["message"]
        # identity is no encoding at all
        async with s.post(url + "/generate", data=b'{"text": "x"}',
                          headers={"Content-Encoding": "identity",
                                   "Content-Type": "application/json"}) as r:
            assert r.status == 200


def gzip_bomb(inflated_mib: int) -> bytes:
    """A gzip stream of a JSON body `inflated_mib` MiB long, built without holding it."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [c.compress(b'{"text": "')]
    chunk = b"a" * (1 << 20)
    parts += [c.compress(chunk) for _ in range(inflated_mib)]
    parts += [c.compress(b'"}'), c.flush()]
    return b"".join(parts)


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
async def test_gzip_bomb_is_refused_without_inflating() -> None:
    bomb = gzip_bomb(400)
    assert len(bomb) < 500 * 1024  # ~400 KiB on the wire, 400 MiB inflated
    async with pd_pair() as (prefill, decode), \
            gateway_process(prefill, decode) as (proc, url), aiohttp.ClientSession() as s:
        async with s.post(url + "/generate", json={"text": "warm"}) as r:
            assert r.status == 200
        idle = peak_rss_mib(proc.pid)
        for _ in range(3):
            async with s.post(url + "/generate", data=bomb,
                              headers={"Content-Encoding": "gzip",
                                       "Content-Type": "application/json"}) as r:
                assert r.status == 415
        assert peak_rss_mib(proc.pid) - idle < 100
        async with s.post(url + "/generate", json={"text": "after"}) as r:
            assert r.status == 200  # still serving


async def test_non_utf8_authorization_on_an_admin_path_is_a_401_not_500() -> None:
    async with pd_pair() as (prefill, decode), \
            running_gateway(pd_settings([prefill], [decode], admin_token="s3cret")) as (url, _):
        status, body = await raw_request(
            url, b"POST /flush_cache HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n",
            b"")
        assert status == 401 and b"bearer token" in body


def test_malformed_http_is_logged_as_one_info_line_not_an_error_traceback() -> None:
    try:
        raise BadHttpMessage("Invalid header value char")
    except BadHttpMessage:
        record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1,
                                   "Error handling request from %s", ("127.0.0.1",),
                                   sys.exc_info())
    assert MalformedRequestFilter().filter(record)
    assert record.levelno == logging.INFO and record.exc_info is None
    assert "Invalid header value char" in record.getMessage()
    try:
        raise RuntimeError("a bug of ours")
    except RuntimeError:
        bug = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error", (),
                                sys.exc_info())
    assert MalformedRequestFilter().filter(bug) and bug.levelno == logging.ERROR
    assert bug.exc_info is not None


async def test_worker_answer_over_max_response_size_is_a_502_not_a_memory_blowup() -> None:
    async with pd_pair() as (prefill, decode), aiohttp.ClientSession() as s:
        settings = pd_settings([prefill], [decode], max_response_size=64, disable_retries=True)
        async with running_gateway(settings) as (url, _), \
                s.post(url + "/generate", json={"text": "x"}) as r:
            assert r.status == 502  # the fake's answer is ~200 bytes
            assert "max_response_size" in (await r.json())["error"]["message"]
        async with running_gateway(pd_settings([prefill], [decode])) as (url, _), \
                s.post(url + "/generate", json={"text": "x"}) as r:
            assert r.status == 200


@pytest.mark.slow
async def test_an_unfinished_request_head_is_closed_after_the_idle_timeout() -> None:
    async with pd_pair() as (prefill, decode), \
            gateway_process(prefill, decode, "--client-idle-timeout-secs", "1") as (_, url):
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /generate HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and nothing more
        await writer.drain()
        t0 = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the gateway
        assert time.monotonic() - t0 < 3.0  # an hour with aiohttp's default
        writer.close()


@pytest.mark.slow
async def test_a_trickled_request_head_does_not_extend_its_deadline() -> None:
    """Slowloris: one header byte every 0.2 s. The deadline runs from the connection's start,
    so trickling cannot keep it open past the idle timeout."""
    async with pd_pair() as (prefill, decode), \
            gateway_process(prefill, decode, "--client-idle-timeout-secs", "1") as (_, url):
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /generate HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        t0 = time.monotonic()
        closed_after = None
        while time.monotonic() - t0 < 6.0:
            try:
                writer.write(b"a")
                await writer.drain()
            except ConnectionError:
                closed_after = time.monotonic() - t0
                break
            with contextlib.suppress(asyncio.TimeoutError):
                if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                    closed_after = time.monotonic() - t0
                    break
        writer.close()
        assert closed_after is not None and closed_after < 3.0, closed_after

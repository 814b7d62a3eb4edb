"""The worker legs' HTTP/1.1 client (gateway/http1.py).

Parser tests feed hand-written responses to a connection in one piece and byte by byte, both
through an in-memory transport (exact control over how bytes are split) and over real loopback
sockets. Pool tests use scripted asyncio servers on 127.0.0.1 port 0. Every test runs on the
default asyncio loop and on uvloop (the serving process uses uvloop).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from gateway.circuit import BreakerConfig, CircuitBreaker
from gateway.http1 import (
    HIGH_WATER,
    MAX_HEAD,
    Http1Error,
    Http1Pool,
    Response,
    Target,
    _Connection,
    encode_request,
    media_type,
)
from gateway.upstream import TRANSPORT_ERRORS, AttemptFailed, UrlCache
from gateway.workers import Worker

Run = Callable[[Coroutine[Any, Any, Any]], Any]


def worker(url: str) -> Worker:
    return Worker("w", url, "decode", None, CircuitBreaker(BreakerConfig()))


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(asyncio.wait_for(coro, 30))

    return runner


# ---------------------------------------------------------------------- scripted servers
async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One request (head, body) off the wire; None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return head, body


Handler = Callable[["Server", asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Server:
    """asyncio server on a loopback port; `handler(server, reader, writer, connection_index)`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.requests: list[tuple[int, bytes, bytes]] = []  # (connection index, head, body)
        self.eof_seen: list[int] = []  # connection indexes the client closed
        self.server: asyncio.Server | None = None
        self.host = "127.0.0.1"
        self.port = 0

    async def start(self, host: str = "127.0.0.1") -> Server:
        self.host = host
        self.server = await asyncio.start_server(self._handle, host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.accepted
        self.accepted += 1
        try:
            await self.handler(self, reader, writer, index)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    async def wait_eof(self, reader: asyncio.StreamReader, index: int) -> None:
        """Block until the client closes this connection, then record it."""
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        self.eof_seen.append(index)


def scripted(responses: list[bytes], *, bytewise: bool = False, hold_open: bool = True
             ) -> Handler:
    """Answer each request (on any connection) with the next scripted response."""

    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        while True:
            request = await read_request(reader)
            if request is None:
                server.eof_seen.append(index)
                return
            server.requests.append((index, *request))
            if not responses:
                return
            raw = responses.pop(0)
            if bytewise:
                for i in range(len(raw)):
                    writer.write(raw[i:i + 1])
                    await writer.drain()
                    await asyncio.sleep(0.0005)
            else:
                writer.write(raw)
                await writer.drain()
            if not hold_open:
                return

    return handler


async def start_scripted(responses: list[bytes], host: str = "127.0.0.1", **kw: Any) -> Server:
    return await Server(scripted(responses, **kw)).start(host)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


# ---------------------------------------------------------------------- hand-written answers
JSON_BODY = b'{"text": "hi"}'
CASES: dict[str, tuple[bytes, int, bytes, str, bool]] = {
    # name: (raw response, status, body, content type, connection reusable)
    "content-length": (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
        b"Content-Length: 14\r\n\r\n" + JSON_BODY, 200, JSON_BODY, "application/json", True),
    "chunked-ext-trailers": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n"
        b"\r\n5;name=value\r\nhello\r\n7\r\n, world\r\nA ; x=\"y\"\r\n0123456789\r\n"
        b"0\r\nX-Trailer: 1\r\nX-Other: two\r\n\r\n",
        200, b"hello, world0123456789", "text/event-stream", True),
    "chunked-no-trailers": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        200, b"abc", "application/octet-stream", True),
    "close-delimited": (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", 200,
        b"until the end", "text/plain", False),
    "204": (b"HTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n", 204, b"", "application/octet-stream",
            True),
    "connection-close": (
        b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 4\r\n\r\nbusy",
        503, b"busy", "application/octet-stream", False),
    "http-1.0": (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, b"ok",
                 "application/octet-stream", False),
    "100-continue-first": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nnew",
        201, b"new", "application/octet-stream", True),
    "empty-content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 200, b"",
                             "application/octet-stream", True),
    "folded-header": (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Long: a\r\n b\r\n"
        b"Content-Length: 1\r\n\r\nz", 200, b"z", "text/plain", True),
}


class MemoryTransport(asyncio.Transport):
    """In-memory transport: records writes; close() runs connection_lost like a real one."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.written: list[bytes] = []
        self.closing = False
        self.paused = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def memory_open(raw: bytes, pieces: int | None, *, head_only: bool = False,
                      eof: bool = False) -> tuple[Http1Pool, MemoryTransport,
                                                  Response | Http1Error]:
    """Send one request on an in-memory connection, feed `raw` in `pieces` (None: whole; 1:
    byte by byte), optionally signal EOF; return the response (body unread) or the error."""
    loop = asyncio.get_running_loop()
    pool = Http1Pool()
    pool._loop = loop
    key = ("http", "worker", 80)
    conn = _Connection(pool, key, loop)
    transport = MemoryTransport(conn)
    conn.connection_made(transport)
    task = asyncio.ensure_future(conn.exchange(b"POST / HTTP/1.1\r\n\r\n", "http://worker/x",
                                               head_only, None, None))
    await asyncio.sleep(0)
    step = max(len(raw), 1) if pieces is None else pieces
    for i in range(0, len(raw), step):
        conn.data_received(raw[i:i + step])
    if eof:
        conn.eof_received()
        transport.close()
    try:
        return pool, transport, await task
    except Http1Error as exc:
        return pool, transport, exc


async def memory_exchange(raw: bytes, pieces: int | None, *, head_only: bool = False,
                          eof: bool = False) -> tuple[Http1Pool, MemoryTransport,
                                                      Response | Http1Error, bytes | None]:
    """`memory_open`, then read the whole body (an error while reading is returned)."""
    pool, transport, resp = await memory_open(raw, pieces, head_only=head_only, eof=eof)
    if isinstance(resp, Http1Error):
        return pool, transport, resp, None
    try:
        return pool, transport, resp, await resp.read()
    except Http1Error as exc:
        return pool, transport, exc, None


@pytest.mark.parametrize("pieces", [None, 1, 3], ids=["whole", "bytewise", "3-bytes"])
@pytest.mark.parametrize("case", list(CASES))
def test_parser_in_memory(run: Run, case: str, pieces: int | None) -> None:
    raw, status, body, content_type, reusable = CASES[case]

    async def main() -> None:
        pool, transport, resp, data = await memory_exchange(
            raw, pieces, eof=case == "close-delimited")
        assert isinstance(resp, Response), resp
        assert resp.status == status
        assert data == body
        assert resp.content_type == content_type
        assert resp.at_eof()
        assert pool.idle_count() == (1 if reusable else 0)
        assert transport.closing is (not reusable)
        if case == "folded-header":
            assert resp.headers["x-long"] == "a b"
        if case == "chunked-ext-trailers":
            assert "x-trailer" not in resp.headers  # trailers are checked, then dropped

    run(main())


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("case", list(CASES))
def test_parser_over_sockets(run: Run, case: str, bytewise: bool) -> None:
    raw, status, body, content_type, reusable = CASES[case]

    async def main() -> None:
        server = await start_scripted([raw, CASES["content-length"][0]], bytewise=bytewise,
                                      hold_open=case != "close-delimited")
        pool = Http1Pool()
        try:
            resp = await pool.request("POST", server.url + "/generate", b"{}", {}, 5)
            assert resp.status == status
            assert await resp.read() == body
            assert resp.content_type == content_type
            # A second request: same connection when reusable, a new one when not.
            second = await pool.request("POST", server.url + "/generate", b"{}", {}, 5)
            assert await second.read() == JSON_BODY
            assert server.accepted == (1 if reusable else 2)
            assert [r[0] for r in server.requests] == ([0, 0] if reusable else [0, 1])
        finally:
            await pool.close()
            await server.close()

    run(main())


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nEXTRA",
    b"HTTP/1.1 204 No Content\r\n\r\nEXTRA",
], ids=["content-length", "chunked", "204"])
def test_stray_bytes_after_the_answer_prevent_reuse(run: Run, raw: bytes) -> None:
    async def main() -> None:
        pool, transport, resp, data = await memory_exchange(raw, None)
        assert isinstance(resp, Response)
        assert data in (b"ok", b"")
        assert pool.idle_count() == 0 and transport.closing

    run(main())


def test_head_request_has_no_body(run: Run) -> None:
    async def main() -> None:
        raw = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        pool, transport, resp, data = await memory_exchange(raw, None, head_only=True)
        assert isinstance(resp, Response)
        assert data == b""
        assert pool.idle_count() == 1 and not transport.closing

    run(main())


MALFORMED: dict[str, tuple[bytes, str]] = {
    "status-line": (b"HTPT/1.1 200 OK\r\n\r\n", "malformed status line"),
    "status-code": (b"HTTP/1.1 2x0 OK\r\n\r\n", "malformed status code"),
    "no-colon": (b"HTTP/1.1 200 OK\r\nContent-Length 2\r\n\r\nok", "malformed header line"),
    "space-before-colon": (b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
                           "malformed header line"),
    "bare-lf": (b"HTTP/1.1 200 OK\nX: y\r\nContent-Length: 2\r\n\r\nok", "bare CR or LF"),
    "content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 1e3\r\n\r\n",
                       "invalid Content-Length"),
    "conflicting-lengths": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
                            "invalid Content-Length"),
    "chunk-size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
                   "malformed chunk size line"),
    "chunk-size-sign": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+2\r\nab\r\n",
                        "malformed chunk size line"),
    "chunk-overrun": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
                      "chunk data longer than its declared size"),
    "trailer": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nno colon\r\n\r\n",
                "malformed chunked trailer"),
    "switching-protocols": (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "unexpected 101"),
}


@pytest.mark.parametrize("pieces", [None, 1], ids=["whole", "bytewise"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_answers_raise_connection_error_subclass(run: Run, case: str,
                                                           pieces: int | None) -> None:
    raw, words = MALFORMED[case]

    async def main() -> None:
        pool, transport, resp, _ = await memory_exchange(raw, pieces)
        assert isinstance(resp, Http1Error), f"parsed {resp!r}"
        assert isinstance(resp, ConnectionError)
        assert words in str(resp)
        assert "http://worker/x" in str(resp)
        assert transport.closing and pool.idle_count() == 0

    run(main())


def test_oversize_header_block_is_rejected(run: Run) -> None:
    async def main() -> None:
        raw = b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n"
        for pieces in (None, 4096):
            _, transport, resp, _ = await memory_exchange(raw, pieces)
            assert isinstance(resp, Http1Error)
            assert f"exceed {MAX_HEAD} bytes" in str(resp)
            assert transport.closing

    run(main())


@pytest.mark.parametrize("raw,words", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
     "with 7 of the Content-Length body bytes still missing"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
     "in the middle of a chunked body"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", "in the middle of the response headers"),
    (b"", "before any response byte arrived"),
])
def test_eof_before_complete_answer(run: Run, raw: bytes, words: str) -> None:
    async def main() -> None:
        _, _, resp, _ = await memory_exchange(raw, None, eof=True)
        assert isinstance(resp, Http1Error)
        assert words in str(resp)
        assert not resp.stale  # a fresh connection: never retried

    run(main())


def test_connection_refused_names_the_url(run: Run) -> None:
    async def main() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # nothing listens here once closed
        pool = Http1Pool()
        with pytest.raises(Http1Error) as info:
            await pool.request("POST", f"http://127.0.0.1:{port}/generate", b"{}", {}, 5)
        assert f"http://127.0.0.1:{port}/generate" in str(info.value)
        assert "cannot connect" in str(info.value)
        assert isinstance(info.value, TRANSPORT_ERRORS)
        failed = AttemptFailed.from_exception(worker("http://x"), info.value)
        assert failed.status == 502 and failed.retryable and failed.kind == "transport"
        await pool.close()

    run(main())


# ---------------------------------------------------------------------- pool behaviour
def test_request_encoding_and_connection_reuse(run: Run) -> None:
    async def main() -> None:
        ok = CASES["content-length"][0]
        server = await start_scripted([ok, ok])
        pool = Http1Pool()
        try:
            for i in range(2):
                resp = await pool.request("POST", server.url + "/v1/completions?x=1",
                                          b'{"a": 1}', {"X-Request-Id": f"r{i}"}, 5)
                assert await resp.read() == JSON_BODY
                resp.release()
            assert server.accepted == 1
            assert [r[0] for r in server.requests] == [0, 0]
            head, body = server.requests[1][1:]
            lines = head.decode().split("\r\n")
            assert lines[0] == "POST /v1/completions?x=1 HTTP/1.1"
            assert f"Host: 127.0.0.1:{server.port}" in lines
            assert "Content-Length: 8" in lines
            assert "Content-Type: application/json" in lines
            assert "X-Request-Id: r1" in lines
            assert body == b'{"a": 1}'
            assert pool.idle_count() == 1
        finally:
            await pool.close()
            await server.close()
        assert pool.idle_count() == 0 and pool.open_count() == 0

    run(main())


def test_given_content_type_and_host_are_kept() -> None:
    target = Target("https://user:pw@Example.com/base/generate")
    raw = encode_request("POST", target, b"x", {"Content-Type": "text/plain"})
    text = raw.decode()
    assert text.startswith("POST /base/generate HTTP/1.1\r\n")
    assert "Content-Type: text/plain\r\n" in text
    assert "application/json" not in text
    assert "Host: example.com\r\n" in text  # default port left out
    assert "Authorization: Basic dXNlcjpwdw==\r\n" in text
    assert target.key == ("https", "example.com", 443)
    with pytest.raises(ValueError, match="newline"):
        encode_request("POST", target, b"", {"X-Evil": "a\r\nInjected: 1"})


def test_content_type_media_type() -> None:
    assert media_type("Text/Event-Stream; charset=utf-8") == "text/event-stream"
    assert media_type(None) == "application/octet-stream"
    assert media_type("") == "application/octet-stream"
    assert media_type("nonsense") == "application/octet-stream"


def test_url_cache_parses_once() -> None:
    cache = UrlCache(max_entries=2)
    first = cache.get(worker("http://[::1]:8000"), "/generate")
    assert cache.get(worker("http://[::1]:8000"), "/generate") is first
    assert first.key == ("http", "::1", 8000)
    assert first.host_header == "[::1]:8000" and first.path == "/generate"


def test_server_closing_idle_connections_is_not_reused(run: Run) -> None:
    async def main() -> None:
        ok = CASES["content-length"][0]
        server = await start_scripted([ok, ok], hold_open=False)  # closes after each answer
        pool = Http1Pool()
        try:
            first = await pool.request("POST", server.url + "/a", b"{}", {}, 5)
            assert await first.read() == JSON_BODY
            await until(lambda: pool.idle_count() == 0)  # the EOF took it out of rotation
            second = await pool.request("POST", server.url + "/b", b"{}", {}, 5)
            assert await second.read() == JSON_BODY
            assert server.accepted == 2
            assert [r[0] for r in server.requests] == [0, 1]
        finally:
            await pool.close()
            await server.close()

    run(main())


def test_stale_reused_connection_is_retried_once_on_a_fresh_one(run: Run) -> None:
    ok = CASES["content-length"][0]

    async def main() -> None:
        async def handler(server: Server, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter, index: int) -> None:
            while (request := await read_request(reader)) is not None:
                server.requests.append((index, *request))
                if index == 0 and len(server.requests) == 2:
                    return  # the idle-close race: the second request is dropped unanswered
                writer.write(ok)
                await writer.drain()

        server = Server(handler)
        await server.start()
        pool = Http1Pool()
        try:
            for _ in range(2):
                resp = await pool.request("POST", server.url + "/generate", b"{}", {}, 5)
                assert resp.status == 200 and await resp.read() == JSON_BODY
            # Request 2 reached the stale connection 0, was retried on connection 1.
            assert [r[0] for r in server.requests] == [0, 0, 1]
            assert server.accepted == 2
        finally:
            await pool.close()
            await server.close()

    run(main())


def test_stale_retry_uses_a_new_connection_not_another_idle_one(run: Run) -> None:
    ok = CASES["content-length"][0]

    async def main() -> None:
        async def handler(server: Server, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter, index: int) -> None:
            answered = 0
            while (request := await read_request(reader)) is not None:
                server.requests.append((index, *request))
                if index < 2 and answered:
                    return  # connections 0 and 1 went stale while idle
                answered += 1
                if index == 1:  # answer connection 1 last: it is released last, LIFO picks it
                    await asyncio.sleep(0.05)
                writer.write(ok)
                await writer.drain()

        server = Server(handler)
        await server.start()
        pool = Http1Pool()
        try:
            first = [pool.request("POST", server.url + "/g", b"{}", {}, 5) for _ in range(2)]
            for resp in await asyncio.gather(*first):
                await resp.read()
            assert pool.idle_count() == 2
            resp = await pool.request("POST", server.url + "/g", b"{}", {}, 5)
            assert await resp.read() == JSON_BODY
            assert [r[0] for r in server.requests][2:] == [1, 2]  # LIFO pick, then a new one
            assert server.accepted == 3
        finally:
            await pool.close()
            await server.close()

    run(main())


def test_fresh_connection_closed_without_answer_is_not_retried(run: Run) -> None:
    async def main() -> None:
        server = await start_scripted([])  # reads the request, then hangs up
        pool = Http1Pool()
        try:
            with pytest.raises(Http1Error, match="before any response byte arrived"):
                await pool.request("POST", server.url + "/generate", b"{}", {}, 5)
            assert len(server.requests) == 1 and server.accepted == 1
        finally:
            await pool.close()
            await server.close()

    run(main())


def test_stale_retry_happens_only_once(run: Run) -> None:
    ok = CASES["content-length"][0]

    async def main() -> None:
        async def handler(server: Server, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter, index: int) -> None:
            while (request := await read_request(reader)) is not None:
                server.requests.append((index, *request))
                if len(server.requests) > 1:
                    return  # every later request is dropped
                writer.write(ok)
                await writer.drain()

        server = Server(handler)
        await server.start()
        pool = Http1Pool()
        try:
            resp = await pool.request("POST", server.url + "/generate", b"{}", {}, 5)
            await resp.read()
            with pytest.raises(Http1Error):
                await pool.request("POST", server.url + "/generate", b"{}", {}, 5)
            assert [r[0] for r in server.requests] == [0, 0, 1]  # one retry, no more
        finally:
            await pool.close()
            await server.close()

    run(main())


def test_bytes_arriving_on_an_idle_connection_take_it_out(run: Run) -> None:
    ok = CASES["content-length"][0]

    async def main() -> None:
        async def handler(server: Server, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter, index: int) -> None:
            while (request := await read_request(reader)) is not None:
                server.requests.append((index, *request))
                writer.write(ok)
                await writer.drain()
                if index == 0:
                    await asyncio.sleep(0.05)
                    writer.write(b"HTTP/1.1 200 OK\r\n")  # unsolicited
                    await writer.drain()

        server = Server(handler)
        await server.start()
        pool = Http1Pool()
        try:
            resp = await pool.request("POST", server.url + "/generate", b"{}", {}, 5)
            await resp.read()
            assert pool.idle_count() == 1
            await until(lambda: pool.idle_count() == 0)
            resp = await pool.request("POST", server.url + "/generate", b"{}", {}, 5)
            assert await resp.read() == JSON_BODY
            assert server.accepted == 2
        finally:
            await pool.close()
            await server.close()

    run(main())


def test_idle_timeout_and_idle_cap(run: Run) -> None:
    ok = CASES["content-length"][0]

    async def main() -> None:
        server = await start_scripted([ok] * 3)
        pool = Http1Pool(idle_timeout=0.2, max_idle_per_host=2)
        try:
            started = [pool.request("POST", server.url + "/generate", b"{}", {}, 5)
                       for _ in range(3)]
            responses = await asyncio.gather(*started)
            for resp in responses:
                assert await resp.read() == JSON_BODY
            assert server.accepted == 3  # concurrent requests: no connection limit
            assert pool.idle_count() == 2  # the third went over the idle cap and was closed
            await until(lambda: len(server.eof_seen) == 1)
            await until(lambda: len(server.eof_seen) == 3, timeout=3)  # idle timeout
            assert pool.idle_count() == 0
        finally:
            await pool.close()
            await server.close()

    run(main())


def test_total_timeout_before_headers_closes_the_connection(run: Run) -> None:
    async def main() -> None:
        async def handler(server: Server, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter, index: int) -> None:
            request = await read_request(reader)
            assert request is not None
            server.requests.append((index, *request))
            if index == 0:
                await server.wait_eof(reader, index)  # never answers
                return
            writer.write(CASES["content-length"][0])
            await writer.drain()
            await read_request(reader)

        server = Server(handler)
        await server.start()
        pool = Http1Pool()
        loop = asyncio.get_running_loop()
        try:
            t0 = loop.time()
            with pytest.raises(asyncio.TimeoutError, match=r"no complete response within 0\.2 s"):
                await pool.request("POST", server.url + "/generate", b"{}", {}, 0.2)
            assert 0.15 < loop.time() - t0 < 2
            await until(lambda: server.eof_seen == [0])  # the client closed it
            resp = await pool.request("POST", server.url + "/generate", b"{}", {}, 5)
            assert await resp.read() == JSON_BODY
            assert server.accepted == 2
        finally:
            await pool.close()
            await server.close()

    run(main())


def test_total_timeout_covers_the_body(run: Run) -> None:
    async def main() -> None:
        async def handler(server: Server, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter, index: int) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"6\r\ndata: \r\n")
            await writer.drain()
            await server.wait_eof(reader, index)

        server = Server(handler)
        await server.start()
        pool = Http1Pool()
        try:
            resp = await pool.request("POST", server.url + "/generate", b"{}", {}, 0.3)
            assert resp.status == 200
            assert await resp.readany() == b"data: "
            with pytest.raises(asyncio.TimeoutError):
                await resp.readany()
            assert not resp.at_eof()
            await until(lambda: server.eof_seen == [0])
            assert pool.idle_count() == 0
            failed = AttemptFailed.from_exception(
worker(server.url), asyncio.TimeoutError())
            assert failed.status == 504 and failed.kind == "timeout"
        finally:
            await pool.close()
            await server.close()

    run(main())


def test_cancellation_mid_body_closes_the_connection(run: Run) -> None:
    async def main() -> None:
        async def handler(server: Server, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter, index: int) -> None:
            while (request := await read_request(reader)) is not None:
                server.requests.append((index, *request))
                if index == 0:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
                    await writer.drain()
                    await server.wait_eof(reader, index)
                    return
                writer.write(CASES["content-length"][0])
                await writer.drain()

        server = Server(handler)
        await server.start()
        pool = Http1Pool()
        try:
            # A long total timeout: only the cancellation may close the connection here.
            resp = await pool.request("POST", server.url + "/generate", b"{}", {}, 60)
            reader = asyncio.ensure_future(resp.read())
            await asyncio.sleep(0.05)
            assert not reader.done()
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
            await until(lambda: server.eof_seen == [0], timeout=2)
            assert pool.idle_count() == 0
            resp2 = await pool.request("POST", server.url + "/generate", b"{}", {}, 5)
            assert await resp2.read() == JSON_BODY
            assert server.accepted == 2
        finally:
            await pool.close()
            await server.close()

    run(main())


def test_cancellation_while_waiting_for_headers_closes_the_connection(run: Run) -> None:
    async def main() -> None:
        async def handler(server: Server, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter, index: int) -> None:
            await read_request(reader)
            await server.wait_eof(reader, index)

        server = Server(handler)
        await server.start()
        pool = Http1Pool()
        try:
            task = asyncio.ensure_future(pool.request("POST", server.url + "/g", b"{}", {}, 60))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(lambda: server.eof_seen == [0], timeout=2)
            assert pool.idle_count() == 0 and pool.open_count() == 0
        finally:
            await pool.close()
            await server.close()

    run(main())


def test_release_of_unread_body_closes_and_full_read_reuses(run: Run) -> None:
    async def main() -> None:
        big = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"  # 3 bytes never come
        server = await start_scripted([big])
        pool = Http1Pool()
        try:
            resp = await pool.request("POST", server.url + "/generate", b"{}", {}, 5)
            assert await resp.readany() == b"ab"
            resp.release()
            with pytest.raises(Http1Error, match="closed before the response was read"):
                await resp.read()
            await until(lambda: server.eof_seen == [0])
            assert pool.idle_count() == 0
        finally:
            await pool.close()
            await server.close()

    run(main())


def test_streaming_readline_and_readany_across_chunk_boundaries(run: Run) -> None:
    lines = [b"data: {\"text\": \"a\"}\n", b"\n", b"data: {\"text\": \"bc\"}\n", b"\n",
             b"data: [DONE]\n", b"\n"]
    stream = b"".join(lines)
    # Chunk boundaries that split lines in the middle, plus an extension and a trailer.
    cuts = [0, 3, 4, 20, 21, 40, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(cuts)]
    raw = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n"
           + b"".join(b"%x;e=1\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\nT: 1\r\n\r\n")

    async def main() -> None:
        server = await start_scripted([raw, raw], bytewise=True)
        pool = Http1Pool()
        try:
            resp = await pool.request("POST", server.url + "/generate", b"{}", {}, 10)
            got = []
            while line := await resp.readline():
                got.append(line)
            assert got == lines
            assert resp.at_eof()
            resp = await pool.request("POST", server.url + "/generate", b"{}", {}, 10)
            parts = []
            while part := await resp.readany():
                parts.append(part)
            assert b"".join(parts) == stream
            assert len(parts) > 1  # arrived in pieces
            assert server.accepted == 1
        finally:
            await pool.close()
            await server.close()

    run(main())


def test_readline_returns_unterminated_tail_at_eof(run: Run) -> None:
    async def main() -> None:
        raw = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nline\ntail"
        _, _, resp = await memory_open(raw, 2)
        assert isinstance(resp, Response)
        assert await resp.readline() == b"line\n"
        assert await resp.readline() == b"tail"
        assert await resp.readline() == b""

    run(main())


def test_backpressure_pauses_reading_until_drained(run: Run) -> None:
    size = 3 * HIGH_WATER
    payload = bytes(range(256)) * (size // 256)

    async def main() -> None:
        raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + payload
        server = await start_scripted([raw])
        pool = Http1Pool()
        try:
            resp = await pool.request("POST", server.url + "/generate", b"{}", {}, 10)
            conn = resp._conn
            assert conn is not None
            await until(lambda: conn.paused)
            await asyncio.sleep(0.05)
            assert HIGH_WATER < resp._size < size  # stopped reading, not everything buffered
            received = bytearray()
            while part := await resp.readany():
                received += part
            assert bytes(received) == payload
            assert not conn.paused and pool.idle_count() == 1
        finally:
            await pool.close()
            await server.close()

    run(main())


def test_ipv6_loopback(run: Run) -> None:
    async def main() -> None:
        ok = CASES["content-length"][0]
        try:
            server = await start_scripted([ok], host="::1")
        except OSError:
            pytest.skip("no IPv6 loopback on this machine")
        pool = Http1Pool()
        try:
            resp = await pool.request("POST", server.url + "/generate", b"{}", {}, 5)
            assert await resp.read() == JSON_BODY
            head = server.requests[0][1].decode()
            assert f"Host: [::1]:{server.port}\r\n" in head
            assert pool.idle_count(("http", "::1", server.port)) == 1
        finally:
            await pool.close()
            await server.close()

    run(main())


def test_pool_close_fails_open_responses_and_refuses_new_requests(run: Run) -> None:
    async def main() -> None:
        partial = b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nsome"
        server = await start_scripted([partial])
        pool = Http1Pool()
        try:
            resp = await pool.request("POST", server.url + "/generate", b"{}", {}, 5)
            await pool.close()
            with pytest.raises(Http1Error, match="pool closed"):
                await resp.read()
            with pytest.raises(RuntimeError, match="closed"):
                await pool.request("POST", server.url + "/generate", b"{}", {}, 5)
            await until(lambda: server.eof_seen == [0])
        finally:
            await server.close()

    run(main())

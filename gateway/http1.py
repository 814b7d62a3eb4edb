"""A lean keep-alive HTTP/1.1 client for the generation legs (POSTs to prefill/decode workers).

Profiles of the gateway under load put aiohttp's client (`ClientSession._request`, request
writing, timeout handles, response parsing) at about 38% of the gateway's busy time. The legs
need much less: one POST with a small JSON body to a handful of known hosts, then either the
whole answer or its body passed through as it arrives. This module does that on asyncio
protocols directly (uvloop transports in the server):

- `Http1Pool`: keep-alive connections keyed by (scheme, host, port). Idle connections are reused
  last-in first-out; no limit on connections in use (aiohttp's `TCPConnector(limit=0)`), at most
  `max_idle_per_host` kept idle, each closed after `idle_timeout` seconds idle (aiohttp's
  keep-alive default, 15 s). A connection that got EOF or bytes while idle is never handed out.
- `Http1Pool.request(...)` sends header and body in one `transport.write` and returns a
  `Response` once the status line and headers are in; the body is read with `read()`,
  `readany()` or `readline()`. When the body is complete the connection goes back to the pool by
  itself (or is closed: `Connection: close`, HTTP/1.0, close-delimited bodies, stray bytes).
- One total timeout per request covers connect, headers and the whole body (aiohttp's
  `ClientTimeout(total=...)`); on expiry reads raise `asyncio.TimeoutError` and the connection
  is closed. Cancelling a waiting request or read closes its connection.
- The wire format itself (targets, request encoding, head parsing) is `gateway.http1_wire`.
- Every transport or protocol problem (connect refused, reset, EOF before a complete answer,
  malformed status line, headers or chunk framing) raises `Http1Error`, a `ConnectionError`
  whose message names the URL and what was wrong. A request on a reused connection that the
  server closed before sending a single byte is retried once on a fresh connection (the server
  closed the idle connection as the request was written; it never reached the application).
- Reading pauses when more than `HIGH_WATER` unread body bytes are buffered and resumes once the
  reader has drained them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl as ssl_module
from typing import cast

from gateway.http1_wire import Http1Error, Target, encode_request, media_type, parse_head

MAX_HEAD = 64 * 1024  # status line + headers (and, separately, chunked trailers)
MAX_CHUNK_LINE = 8 * 1024  # one chunk-size line including extensions
HIGH_WATER = 1024 * 1024  # unread body bytes before reading is paused
LOW_WATER = HIGH_WATER // 4  # ... and resumed
DEFAULT_MAX_IDLE_PER_HOST = 256
DEFAULT_IDLE_TIMEOUT = 15.0

_HEX = b"0123456789abcdefABCDEF"
_NO_BODY_STATUS = frozenset({204, 304})

# Body framing of the response being read.
_NONE, _LENGTH, _CHUNKED, _UNTIL_CLOSE = range(4)
# Chunked sub-states.
_C_SIZE, _C_DATA, _C_CRLF, _C_TRAILER = range(4)


class Response:
    """An upstream answer whose status line and headers arrived; the body is read from it."""

    __slots__ = ("_chunks", "_conn", "_eof", "_exc", "_loop", "_size", "_waiter", "headers",
                 "status", "url", "version_11")

    def __init__(self, conn: _Connection | None, status: int, version_11: bool,
                 headers: dict[str, str], url: str, loop: asyncio.AbstractEventLoop) -> None:
        self._conn = conn  # None once the body is complete (connection released or closed)
        self._loop = loop
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.status = status
        self.version_11 = version_11
        self.headers = headers
        self.url = url

    @property
    def content_type(self) -> str:
        return media_type(self.headers.get("content-type"))

    def at_eof(self) -> bool:
        """The whole body arrived and was read."""
        return self._eof and not self._chunks

    def release(self) -> None:
        """Done with the answer. A complete body has already put the connection back in the
        pool; an incomplete one cannot be reused, so its connection is closed."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.abort()

    close = release

    async def read(self, limit: int | None = None) -> bytes:
        """The whole (remaining) body; Http1Error once it grows past `limit` bytes."""
        parts: list[bytes] = []
        total = 0
        chunks = self._chunks
        while True:
            if chunks:
                parts.extend(chunks)
                if limit is not None:
                    total += sum(map(len, chunks))
                    if total > limit:
                        self.release()
                        raise Http1Error(self.url, f"answer exceeds {limit} bytes "
                                         "(max_response_size)")
                self._consumed(chunks)
            if self._exc is not None:
                raise self._exc
            if self._eof:
                break
            await self._wait()
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    async def readany(self) -> bytes:
        """Whatever body bytes are buffered (waiting for some); b"" at the end of the body."""
        chunks = self._chunks
        while True:
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._consumed(chunks)
                return data
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            await self._wait()

    async def readline(self) -> bytes:
        """One line including its b"\\n" (the rest of the body if it does not end in one);
        b"" at the end of the body."""
        chunks = self._chunks
        start = 0
        while True:
            if chunks:
                if len(chunks) > 1:
                    chunks[:] = [b"".join(chunks)]
                data = chunks[0]
                nl = data.find(b"\n", start)
                if nl >= 0:
                    line = data[:nl + 1]
                    rest = data[nl + 1:]
                    if rest:
                        chunks[0] = rest
                        self._size = len(rest)
                        self._maybe_resume()
                    else:
                        self._consumed(chunks)
                    return line
                start = len(data)
            if self._exc is not None:
                raise self._exc
            if self._eof:
                if not chunks:
                    return b""
                data = chunks[0]
                self._consumed(chunks)
                return data
            await self._wait()

    # ------------------------------------------------------------------ internals
    def _consumed(self, chunks: list[bytes]) -> None:
        chunks.clear()
        self._size = 0
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        conn = self._conn
        if conn is not None and conn.paused and self._size <= LOW_WATER:
            conn.resume()

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        except asyncio.CancelledError:
            # Whoever reads this body gave up: the connection cannot be reused.
            self.release()
            raise
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER:
            conn = self._conn
            if conn is not None and not conn.paused:
                conn.pause()
        self._wake()

    def _feed_eof(self) -> None:
        self._eof = True
        self._conn = None
        self._wake()

    def _set_exception(self, exc: BaseException) -> None:
        self._exc = exc
        self._conn = None
        self._wake()

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.url}>"


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the parser of the response being read on it."""

    __slots__ = ("_cbuf", "_cstate", "_got_bytes", "_hbuf", "_head_only", "_keep_alive",
                 "_mode", "_remaining", "_resp", "_timeout_s", "_timer", "_trailer_bytes",
                 "_url", "_waiter", "alive", "idle_since", "key", "loop", "paused", "pool",
                 "reused", "transport")

    def __init__(self, pool: Http1Pool, key: tuple[str, str, int],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.key = key
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.alive = False  # connected and not closed, no EOF seen
        self.reused = False  # handed out from the idle list at least once
        self.paused = False
        self.idle_since = 0.0
        self._url = ""
        self._waiter: asyncio.Future[Response] | None = None  # until the headers are in
        self._resp: Response | None = None  # while the body is read
        self._hbuf: bytearray | None = None
        self._head_only = False
        self._keep_alive = False
        self._got_bytes = False
        self._mode = _NONE
        self._remaining = 0
        self._cstate = _C_SIZE
        self._cbuf = b""
        self._trailer_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timeout_s = 0.0

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.alive = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):  # not TCP: nothing to set
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._resp is not None:
            self._body(data)
        elif self._waiter is not None:
            self._head(data)
        else:  # bytes on an idle connection: nothing sane can follow
            self.abort()

    def eof_received(self) -> bool | None:
        self.alive = False
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self.pool._forget(self)
        if self._resp is not None:
            if self._mode == _UNTIL_CLOSE and exc is None:
                self._finish()
            else:
                self._fail(Http1Error(self._url, self._lost_message(exc)))
        elif self._waiter is not None:
            stale = self.reused and not self._got_bytes
            what = ("connection closed before any response byte arrived" if not self._got_bytes
                    else "connection closed in the middle of the response headers")
            self._fail(Http1Error(self._url, what + (f" ({exc})" if exc else ""), stale=stale))

    # ------------------------------------------------------------------ request side
    async def exchange(self, payload: bytes, url: str, head_only: bool,
                       deadline: float | None, timeout_s: float | None) -> Response:
        transport = self.transport
        assert transport is not None
        self._url = url
        self._head_only = head_only
        self._got_bytes = False
        waiter: asyncio.Future[Response] = self.loop.create_future()
        self._waiter = waiter
        if deadline is not None:
            self._timeout_s = timeout_s or 0.0
            self._timer = self.loop.call_at(deadline, self._on_timeout)
        transport.write(payload)
        try:
            return await waiter
        except asyncio.CancelledError:
            if self._waiter is waiter:  # still waiting for the headers on this connection
                self.abort()
            elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Headers arrived but we were cancelled before resuming: drop that answer
                # (a no-op when its body is complete and the connection already reused).
                waiter.result().release()
            raise

    def pause(self) -> None:
        if self.transport is not None and self.alive:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        self.paused = False
        if self.transport is not None and self.alive:
            self.transport.resume_reading()

    def abort(self, reason: str = "connection closed before the response was read") -> None:
        """Close the connection now; whatever waits on it gets an error."""
        self.alive = False
        if self._resp is not None or self._waiter is not None:
            self._fail(Http1Error(self._url, reason))
        elif self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ parsing
    def _head(self, data: bytes) -> None:
        self._got_bytes = True
        hbuf = self._hbuf
        if hbuf is None:
            buf: bytes | bytearray = data
            end = data.find(b"\r\n\r\n")
        else:
            start = max(len(hbuf) - 3, 0)
            hbuf += data
            buf = hbuf
            end = hbuf.find(b"\r\n\r\n", start)
        while True:
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._fail(Http1Error(self._url, f"response headers exceed {MAX_HEAD} bytes"))
                elif hbuf is None:
                    self._hbuf = bytearray(buf)
                return
            if end > MAX_HEAD:
                self._fail(Http1Error(self._url, f"response headers exceed {MAX_HEAD} bytes"))
                return
            try:
                status, v11, headers = parse_head(buf[:end].decode("latin-1"), self._url)
            except Http1Error as exc:
                self._fail(exc)
                return
            rest = buf[end + 4:]
            if 100 <= status < 200 and status != 101:  # interim answer (100 Continue): skip
                buf = rest
                end = buf.find(b"\r\n\r\n")
                if end < 0 and not buf:
                    self._hbuf = None
                    return
                hbuf = None
                continue
            break
        self._hbuf = None
        if status == 101:
            self._fail(Http1Error(self._url, "unexpected 101 Switching Protocols"))
            return
        if not self._framing(status, v11, headers):
            return
        resp = Response(self, status, v11, headers, self._url, self.loop)
        waiter = self._waiter
        self._waiter = None
        self._resp = resp
        if waiter is not None and not waiter.done():
            waiter.set_result(resp)
        if self._mode == _NONE:
            if rest:
                self._keep_alive = False  # bytes after a body-less answer: framing is off
            self._finish()
        elif rest:
            self._body(bytes(rest) if isinstance(rest, bytearray) else rest)

    def _framing(self, status: int, v11: bool, headers: dict[str, str]) -> bool:
        keep_alive = v11
        connection = headers.get("connection")
        if connection is not None and "close" in connection.lower() and \
                any(t.strip() == "close" for t in connection.lower().split(",")):
            keep_alive = False
        transfer = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if self._head_only or status in _NO_BODY_STATUS:
            self._mode = _NONE
        elif transfer is not None:
            if transfer.rpartition(",")[2].strip().lower() == "chunked":
                self._mode = _CHUNKED
                self._cstate = _C_SIZE
                self._cbuf = b""
                self._trailer_bytes = 0
                if length is not None:  # RFC 9112 6.3: chunked wins, do not reuse
                    keep_alive = False
            else:
                self._mode = _UNTIL_CLOSE
                keep_alive = False
        elif length is not None:
            values = {v.strip() for v in length.split(",")}
            value = values.pop() if len(values) == 1 else ""
            if not (value.isascii() and value.isdigit()):
                self._fail(Http1Error(self._url, f"invalid Content-Length {length!r}"))
                return False
            size = int(value)
            self._mode = _LENGTH if size else _NONE
            self._remaining = size
        else:
            self._mode = _UNTIL_CLOSE
            keep_alive = False
        self._keep_alive = keep_alive
        return True

    def _body(self, data: bytes) -> None:
        mode = self._mode
        resp = self._resp
        assert resp is not None
        if mode == _LENGTH:
            remaining = self._remaining
            n = len(data)
            if n < remaining:
                self._remaining = remaining - n
                resp._feed(data)
                return
            if n > remaining:
                self._keep_alive = False  # stray bytes after the body
                data = data[:remaining]
            self._remaining = 0
            resp._feed(data)
            self._finish()
        elif mode == _CHUNKED:
            self._chunked(data, resp)
        elif data:
            resp._feed(data)

    def _chunked(self, data: bytes, resp: Response) -> None:
        if self._cbuf:
            data = self._cbuf + data
            self._cbuf = b""
        pos = 0
        end = len(data)
        state = self._cstate
        remaining = self._remaining
        if state == _C_SIZE:
            # Fast path: whole "SIZE\r\nDATA\r\n" chunks (what a streaming worker sends).
            while True:
                nl = data.find(b"\r\n", pos, pos + 17)
                if nl <= pos:
                    break
                size_line = data[pos:nl]
                if size_line.strip(_HEX):
                    break  # extensions, whitespace or junk: the general loop decides
                size = int(size_line, 16)
                stop = nl + 2 + size
                if not size or stop + 2 > end or data[stop:stop + 2] != b"\r\n":
                    break
                resp._feed(data[nl + 2:stop])
                pos = stop + 2
        while pos < end:
            if state == _C_DATA:
                take = end - pos
                if take > remaining:
                    take = remaining
                resp._feed(data if take == end else data[pos:pos + take])
                pos += take
                remaining -= take
                if not remaining:
                    state = _C_CRLF
            elif state == _C_CRLF:
                if data.startswith(b"\r\n", pos):
                    pos += 2
                elif data[pos] == 10:  # bare LF tolerated
                    pos += 1
                elif data[pos] == 13 and pos + 1 == end:  # CR now, LF in the next read
                    self._cbuf = data[pos:]
                    break
                else:
                    self._fail(Http1Error(self._url, "chunk data longer than its declared size"))
                    return
                state = _C_SIZE
            else:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    rest = data[pos:]
                    limit = MAX_CHUNK_LINE if state == _C_SIZE else MAX_HEAD
                    if len(rest) > limit:
                        what = "chunk size line" if state == _C_SIZE else "chunked trailers"
                        self._fail(Http1Error(self._url, f"{what} longer than {limit} bytes"))
                        return
                    self._cbuf = rest
                    break
                line = data[pos:nl - 1] if data[nl - 1] == 13 and nl > pos else data[pos:nl]
                pos = nl + 1
                if state == _C_SIZE:
                    digits = line.partition(b";")[0].strip(b" \t")
                    if not digits or len(digits) > 15 or digits.strip(_HEX):
                        self._fail(Http1Error(self._url,
                                              f"malformed chunk size line {line[:100]!r}"))
                        return
                    remaining = int(digits, 16)
                    state = _C_DATA if remaining else _C_TRAILER
                elif line:  # a trailer field: checked for shape, then dropped
                    self._trailer_bytes += len(line)
                    if b":" not in line or self._trailer_bytes > MAX_HEAD:
                        self._fail(Http1Error(self._url,
                                              f"malformed chunked trailer {line[:100]!r}"))
                        return
                else:  # the empty line after the last chunk and trailers
                    if pos < end:
                        self._keep_alive = False
                    self._finish()
                    return
        self._cstate = state
        self._remaining = remaining

    # ------------------------------------------------------------------ outcomes
    def _finish(self) -> None:
        """The body is complete: hand it to the reader, reuse or close the connection."""
        resp = self._resp
        self._resp = None
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        if resp is not None:
            resp._feed_eof()
        if self.paused:
            self.resume()
        if self._keep_alive and self.alive:
            self.pool._release(self)
        else:
            self.alive = False
            if self.transport is not None:
                self.transport.close()

    def _fail(self, exc: BaseException) -> None:
        self.alive = False
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        resp = self._resp
        self._resp = None
        if resp is not None:
            resp._set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def _on_timeout(self) -> None:
        self._timer = None
        if self._waiter is not None or self._resp is not None:
            self._fail(asyncio.TimeoutError(
                f"{self._url}: no complete response within {self._timeout_s:g} s"))

    def _lost_message(self, exc: Exception | None) -> str:
        if self._mode == _LENGTH:
            what = f"with {self._remaining} of the Content-Length body bytes still missing"
        elif self._mode == _CHUNKED:
            what = "in the middle of a chunked body"
        else:
            what = "while reading the body"
        return f"connection closed {what}" + (f" ({exc})" if exc else "")


class Http1Pool:
    """Keep-alive HTTP/1.1 connections to the workers; one per app, closed with it."""

    def __init__(self, *, max_idle_per_host: int = DEFAULT_MAX_IDLE_PER_HOST,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 ssl_context: ssl_module.SSLContext | None = None) -> None:
        self.max_idle_per_host = max_idle_per_host
        self.idle_timeout = idle_timeout
        self._ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def idle_count(self, key: tuple[str, str, int] | None = None) -> int:
        """Idle connections still usable (all hosts, or one pool key)."""
        lists = self._idle.values() if key is None else [self._idle.get(key, [])]
        return sum(1 for idle in lists for c in idle if c.alive)

    def open_count(self) -> int:
        return len(self._open)

    async def request(self, method: str, url: Target | str, body: bytes = b"",
                      headers: dict[str, str] | None = None,
                      timeout_s: float | None = None) -> Response:
        """Send one request; return once the status line and headers are in.

        Raises `Http1Error` (a ConnectionError) for transport and protocol failures and
        `asyncio.TimeoutError` when `timeout_s` (connect + whole response) runs out.
        """
        if self._closed:
            raise RuntimeError("HTTP client pool is closed")
        target = url if isinstance(url, Target) else Target(url)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        payload = encode_request(method, target, body, headers)
        head_only = method == "HEAD"
        conn = self._acquire(target.key)
        if conn is None:
            conn = await self._connect(target, deadline, timeout_s)
        try:
            return await conn.exchange(payload, target.url, head_only, deadline, timeout_s)
        except Http1Error as exc:
            if not exc.stale:
                raise
        # The server closed the reused idle connection as the request went out: one more try,
        # on a new connection (other idle ones may be just as stale).
        conn = await self._connect(target, deadline, timeout_s)
        return await conn.exchange(payload, target.url, head_only, deadline, timeout_s)

    def _acquire(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if conn.alive and transport is not None and not transport.is_closing():
                conn.reused = True
                return conn
            if transport is not None:
                transport.close()
        return None

    async def _connect(self, target: Target, deadline: float | None,
                       timeout_s: float | None) -> _Connection:
        loop = self._loop
        assert loop is not None
        ssl: ssl_module.SSLContext | None = None
        if target.scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = ssl_module.create_default_context()
            ssl = self._ssl_context
        key = target.key
        coro = loop.create_connection(lambda: _Connection(self, key, loop), target.host,
                                      target.port, ssl=ssl)
        origin = f"{target.scheme}://{target.host_header}"
        try:
            if deadline is None:
                _, conn = await coro
            else:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    coro.close()
                    raise asyncio.TimeoutError(
                        f"{target.url}: no complete response within {timeout_s:g} s")
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that arrives as the connect completes, and the dual flow cancels
                # this task to abandon a decode leg when its prefill fails.
                async with asyncio.timeout(remaining):
                    _, conn = await coro
        except asyncio.TimeoutError as exc:
            if deadline is not None and loop.time() >= deadline:
                raise asyncio.TimeoutError(
                    f"{target.url}: connect to {origin} timed out after {timeout_s:g} s") from None
            raise Http1Error(target.url, f"cannot connect to {origin}: {exc}") from exc
        except OSError as exc:
            raise Http1Error(target.url, f"cannot connect to {origin}: {exc}") from exc
        if self._closed:
            conn.abort()
            raise RuntimeError("HTTP client pool is closed")
        self._open.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        """A connection whose answer was read completely and may be reused."""
        transport = conn.transport
        if self._closed or transport is None or transport.is_closing():
            conn.alive = False
            if transport is not None:
                transport.close()
            return
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        if len(idle) >= self.max_idle_per_host:
            conn.alive = False
            transport.close()
            return
        loop = self._loop
        assert loop is not None
        conn.idle_since = loop.time()
        idle.append(conn)
        if self._sweep is None:
            self._sweep = loop.call_at(conn.idle_since + self.idle_timeout, self._close_expired)

    def _forget(self, conn: _Connection) -> None:
        self._open.discard(conn)

    def _close_expired(self) -> None:
        """Close connections idle for `idle_timeout`; re-arm for the next one to expire."""
        self._sweep = None
        loop = self._loop
        if loop is None or self._closed:
            return
        now = loop.time()
        cutoff = now - self.idle_timeout
        next_due: float | None = None
        for key in list(self._idle):
            keep: list[_Connection] = []
            for conn in self._idle[key]:
                if conn.alive and conn.idle_since > cutoff:
                    keep.append(conn)
                else:
                    conn.alive = False
                    if conn.transport is not None:
                        conn.transport.close()
            if keep:
                self._idle[key] = keep
                due = keep[0].idle_since + self.idle_timeout  # oldest first (LIFO list)
                next_due = due if next_due is None else min(next_due, due)
            else:
                del self._idle[key]
        if next_due is not None:
            self._sweep = loop.call_at(max(next_due, now + 0.05), self._close_expired)

    async def close(self) -> None:
        """Close every connection, idle or in use (readers get an error)."""
        if self._closed:
            return
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in self._idle.values():
            for conn in idle:
                conn.alive = False
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()
        for conn in list(self._open):
            conn.abort("HTTP client pool closed")
        self._open.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost

    def __repr__(self) -> str:
        return f"<Http1Pool open={len(self._open)} idle={self.idle_count()}>"


__all__ = ["Http1Error", "Http1Pool", "Response", "Target", "encode_request", "media_type",
           "parse_head"]

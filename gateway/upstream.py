"""Calls to workers: the one place where transport failures become domain errors.

The generation legs go through `gateway.http1.Http1Pool` (a lean keep-alive HTTP/1.1 client).
Every leg raises `AttemptFailed` for anything other than a usable answer: a transport or
protocol error (502, retryable), a timeout (504, retryable) or an HTTP error status from the worker
(returned to the client as is when it is final; retryable per `retry.is_retryable_status`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web

from gateway.http1 import Http1Pool, Response, Target
from gateway.responses import error_body
from gateway.retry import is_retryable_status
from gateway.workers import Worker


@dataclass(frozen=True, slots=True)
class LegResult:
    """A fully read upstream answer (prefill legs, small admin calls)."""

    status: int
    body: bytes
    content_type: str


class AttemptFailed(Exception):
    """One attempt failed at `worker` (role given); `response()` is what the client would get."""

    def __init__(self, worker: Worker | None, status: int, body: bytes, content_type: str,
                 retryable: bool, kind: str) -> None:
        super().__init__(f"{kind} from {worker.worker_id if worker else '-'}: {status}")
        self.worker = worker
        self.status = status
        self.body = body
        self.content_type = content_type
        self.retryable = retryable
        self.kind = kind  # "status" | "transport" | "timeout"

    @classmethod
    def from_status(cls, worker: Worker, status: int, body: bytes,
                    content_type: str) -> AttemptFailed:
        return cls(worker, status, body, content_type, is_retryable_status(status), "status")

    @classmethod
    def from_exception(cls, worker: Worker, exc: BaseException) -> AttemptFailed:
        timeout = isinstance(exc, asyncio.TimeoutError)
        status = 504 if timeout else 502
        kind = "timeout" if timeout else "transport"
        message = (f"{worker.role} worker {worker.worker_id} "
                   f"{'timed out' if timeout else 'failed'}: {type(exc).__name__}: {exc}")
        body = orjson.dumps(error_body(status, message,
                                       "upstream_timeout" if timeout else "upstream_error"))
        return cls(worker, status, body, "application/json", True, kind)

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body,
                            content_type=self.content_type or "application/json")

    def blamed_on(self, worker: Worker) -> AttemptFailed:
        """The same failure (what the client gets is unchanged) charged to `worker`."""
        return AttemptFailed(worker, self.status, self.body, self.content_type, self.retryable,
                             self.kind)


# SGLang's decode aborts a request whose bootstrap handshake with the prefill failed with this
# message (sglang 0.5.23 `srt/disaggregation/decode.py`, `_update_handshake_waiters`, a 500).
# The handshake targets the address the gateway injected for the prefill (bootstrap_host/port),
# so the fault is the prefill's (down, or its configured bootstrap port is wrong), not the
# decode's: charging the decode would open healthy decodes' breakers one by one.
HANDSHAKE_FAILURE_MARK = b"Decode handshake failed"
_MARK_WINDOW = 4096  # the message sits at the start of SGLang's small error body


def is_handshake_failure(failure: AttemptFailed) -> bool:
    """A decode's 5xx saying its KV bootstrap handshake with the prefill failed."""
    return failure.kind == "status" and failure.status >= 500 and \
        HANDSHAKE_FAILURE_MARK in failure.body[:_MARK_WINDOW]


# `Http1Error` (the worker legs' client, gateway/http1.py) is a ConnectionError; aiohttp's errors
# stay listed for the calls that still go through the aiohttp session.
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)


class UrlCache:
    """Parsed upstream URLs, one `Target` per (worker URL, path).

    Each upstream call needs the pool key, request path and Host header of `worker.url + path`;
    they are parsed once per (worker, path) instead of on every call (two per PD request).
    Bounded: workers come and go through the admin API, so the cache is dropped whenever it
    reaches `max_entries` rather than growing without limit.
    """

    __slots__ = ("_urls", "max_entries")

    def __init__(self, max_entries: int = 4096) -> None:
        self._urls: dict[tuple[str, str], Target] = {}
        self.max_entries = max_entries

    def get(self, worker: Worker, path: str) -> Target:
        key = (worker.url, path)
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) >= self.max_entries:
                self._urls.clear()
            url = self._urls[key] = Target(worker.url + path)
        return url


async def post_read(client: Http1Pool, worker: Worker, url: Target | str, body: bytes,
                    headers: dict[str, str], timeout_s: float,
                    limit: int | None = None) -> LegResult:
    """POST and read the whole answer (at most `limit` bytes); any status is returned (the
    caller judges it)."""
    try:
        resp = await client.request("POST", url, body, headers, timeout_s)
        try:
            data = await resp.read(limit)
        finally:
            resp.release()
        return LegResult(resp.status, data, resp.content_type)
    except TRANSPORT_ERRORS as exc:
        raise AttemptFailed.from_exception(worker, exc) from exc


async def post_open(client: Http1Pool, worker: Worker, url: Target | str, body: bytes,
                    headers: dict[str, str], timeout_s: float) -> Response:
    """POST and return once the status line and headers arrived (body still unread).

    A non-2xx answer is read and raised as AttemptFailed, so callers only ever get a response
    they can relay.
    """
    try:
        resp = await client.request("POST", url, body, headers, timeout_s)
    except TRANSPORT_ERRORS as exc:
        raise AttemptFailed.from_exception(worker, exc) from exc
    if resp.status >= 300:
        try:
            data = await resp.read()
        except TRANSPORT_ERRORS as exc:
            raise AttemptFailed.from_exception(worker, exc) from exc
        finally:
            resp.release()
        raise AttemptFailed.from_status(worker, resp.status, data, resp.content_type)
    return resp


def close_response(resp: Response) -> None:
    """Done with an answer: a fully read one already went back to the pool (no-op); one with
    unread body bytes has its connection closed."""
    resp.release()

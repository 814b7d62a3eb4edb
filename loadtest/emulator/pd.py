"""The prefill/decode KV handshake, keyed by `bootstrap_room`, over loopback HTTP.

What SGLang does (sglang 0.5.23 `srt/disaggregation/prefill.py` PrefillBootstrapQueue,
`srt/disaggregation/decode.py` DecodePreallocQueue, `srt/disaggregation/common/conn.py`):
the prefill puts a request in its bootstrap queue and does not run the forward pass until the
decode for the same room has connected through the prefill's bootstrap server and sent its KV
indices (`KVPoll.Bootstrapping` -> `WaitingForInput`). The prefill aborts the request after
SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT (`_check_bootstrap_timeout`); the decode aborts after
SGLANG_DISAGGREGATION_WAITING_TIMEOUT without the KV (`_check_waiting_timeout`). The first
output token (sampled by the prefill) travels with the KV.

The emulator's handshake: the decode POSTs `{"bootstrap_room": R}` to
`http://bootstrap_host:bootstrap_port/emulator/kv` and the request stays open until the prefill
has "transferred" the KV (its answer carries the first token) or the room fails. Opening the
request = the decode connected; the connection closing before the answer = the decode aborted,
which fails the room so the prefill aborts too.

Prefill-first extension (docs/wire-format.md): the prefill publishes the KV without waiting and
holds it for `hold_secs`; a decode connecting later collects it at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

# sglang 0.5.23 `srt/disaggregation/utils.py`: FAKE_BOOTSTRAP_HOST = "2.2.2.2" (warm-up and
# /health_generate requests on PD workers use it to skip the KV transfer).
FAKE_BOOTSTRAP_HOST = "2.2.2.2"
KV_PATH = "/emulator/kv"
# Remember why recently closed rooms closed, so a late decode fails at once with the reason
# instead of waiting out its timeout. Bounded: rooms are random 63-bit ids, reuse is rare.
_CLOSED_ROOMS_KEPT = 4096


class HandshakeError(RuntimeError):
    """The PD pair for a room could not be completed (timeout, abort, release)."""


@dataclass(frozen=True)
class KvPayload:
    """What the decode receives with the KV: enough to continue the request.

    `cached_tokens` is the prefill's prefix-cache hit, which SGLang ships in the metadata
    buffer with the first token (sglang 0.5.23 `disaggregation/utils.py` MetadataBuffers.set_buf
    slot 0) and the decode reports as its own `cached_tokens` (`disaggregation/decode.py`
    `_commit_transfer_to_req`). Absent in a payload: 0.
    """

    first_token_id: int
    prompt_len: int
    cached_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"first_token_id": self.first_token_id, "prompt_len": self.prompt_len,
                "cached_tokens": self.cached_tokens}

    @classmethod
    def from_json(cls, data: Any) -> KvPayload:
        try:
            return cls(int(data["first_token_id"]), int(data["prompt_len"]),
                       int(data.get("cached_tokens", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise HandshakeError(f"malformed KV payload from the prefill: {data!r}") from exc


@dataclass
class _Room:
    decode_connected: asyncio.Event = field(default_factory=asyncio.Event)
    kv: asyncio.Future[KvPayload] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    created: float = field(default_factory=time.monotonic)
    hold_timer: asyncio.TimerHandle | None = None


class BootstrapRegistry:
    """Rooms in flight on one prefill worker. Either side may create a room first."""

    def __init__(self) -> None:
        self._rooms: dict[int, _Room] = {}
        self._closed: OrderedDict[int, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rooms)

    @property
    def held_rooms(self) -> int:
        """Rooms whose KV is ready and waiting for a decode (prefill-first holds, mostly)."""
        return sum(1 for r in self._rooms.values() if r.kv.done() and not r.kv.exception())

    def _room(self, room: int) -> _Room:
        if room in self._closed and room not in self._rooms:
            raise HandshakeError(self._closed[room])
        state = self._rooms.get(room)
        if state is None:
            state = self._rooms[room] = _Room()
        return state

    async def wait_for_decode(self, room: int, timeout: float) -> None:
        """Prefill side (stock SGLang): block until the decode connects; timeout aborts."""
        state = self._room(room)
        start = time.monotonic()
        waiter: asyncio.Future[Any] = asyncio.ensure_future(state.decode_connected.wait())
        kv: asyncio.Future[Any] = state.kv
        try:
            await asyncio.wait({waiter, kv}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if state.kv.done() and state.kv.exception() is not None:
            raise HandshakeError(str(state.kv.exception()))
        if not state.decode_connected.is_set():
            # Message shape: sglang 0.5.23 `srt/disaggregation/common/conn.py`
            # `_check_bootstrap_timeout` + KVTransferError.__str__.
            reason = (f"KVTransferError(bootstrap_room={room}): Request {room} timed out after "
                      f"{time.monotonic() - start:.1f}s in KVPoll.Bootstrapping")
            self.fail(room, reason)
            raise HandshakeError(reason)

    def publish(self, room: int, payload: KvPayload, *, hold_secs: float | None = None) -> None:
        """Prefill side: the forward pass is done; hand the KV to the (current or later) decode."""
        state = self._room(room)
        if not state.kv.done():
            state.kv.set_result(payload)
        if hold_secs is not None and not state.decode_connected.is_set():
            state.hold_timer = asyncio.get_running_loop().call_later(
                hold_secs, self._expire, room, hold_secs)

    def _expire(self, room: int, hold_secs: float) -> None:
        self._close(room, f"KV for bootstrap_room {room} was freed: no decode connected within "
                          f"prefill_first_hold_secs={hold_secs:g}")

    def release(self, room: int) -> bool:
        """`POST /disaggregation/release`: free a held KV early. False if the room is unknown."""
        if room not in self._rooms:
            return False
        self._close(room, f"KV for bootstrap_room {room} was released")
        return True

    def fail(self, room: int, reason: str) -> None:
        """Either side gave up: the other side's wait ends with `reason`."""
        self._close(room, reason)

    def _close(self, room: int, reason: str) -> None:
        state = self._rooms.pop(room, None)
        if state is not None:
            if state.hold_timer is not None:
                state.hold_timer.cancel()
            if not state.kv.done():
                state.kv.set_exception(HandshakeError(reason))
            elif state.kv.exception() is None:
                # The payload was published but never collected: replace with the failure.
                pass
            state.kv.exception()  # mark retrieved: a failure nobody awaits is not an error
        self._closed[room] = reason
        while len(self._closed) > _CLOSED_ROOMS_KEPT:
            self._closed.popitem(last=False)

    async def collect(self, room: int, timeout: float) -> KvPayload:
        """Decode side (inside the bootstrap server): connect, then wait for the KV."""
        state = self._room(room)
        state.decode_connected.set()
        if state.hold_timer is not None:
            state.hold_timer.cancel()
            state.hold_timer = None
        delivered = False
        try:
            payload = await asyncio.wait_for(asyncio.shield(state.kv), timeout)
            delivered = True
            return payload
        except asyncio.TimeoutError:
            reason = (f"KVTransferError(bootstrap_room={room}): Request {room} timed out after "
                      f"{timeout:.1f}s in KVPoll.WaitingForInput")
            self.fail(room, reason)
            raise HandshakeError(reason) from None
        finally:
            if delivered:
                self._rooms.pop(room, None)
            elif room in self._rooms:
                # Cancelled: the decode's connection closed before the KV arrived.
                self.fail(room, f"decode for bootstrap_room {room} disconnected (aborted)")


class LocalBootstraps:
    """Prefill bootstrap registries served by THIS process, keyed by (host, bootstrap port).

    Workers of one in-process cluster share one instance (passed to each `WorkerServer`), so a
    decode whose prefill lives in the same process collects the KV straight from the prefill's
    registry: the same `BootstrapRegistry.collect` the bootstrap server's handler calls, with
    the same timeouts, failures and abort-on-cancel, minus one loopback HTTP round trip per
    request (a client request plus a server request, the largest host cost left per PD request
    on an instant cluster). Addresses not registered here still go over HTTP.
    """

    def __init__(self) -> None:
        self._registries: dict[tuple[str, int], BootstrapRegistry] = {}
        self.collected = 0   # KVs handed over in-process (observability and tests)

    def register(self, host: str, port: int, registry: BootstrapRegistry) -> None:
        self._registries[(host, port)] = registry

    def unregister(self, host: str, port: int) -> None:
        self._registries.pop((host, port), None)

    def lookup(self, host: str, port: int) -> BootstrapRegistry | None:
        return self._registries.get((host, port))

    async def collect(self, registry: BootstrapRegistry, room: int, timeout: float
                      ) -> KvPayload:
        payload = await registry.collect(room, timeout)
        self.collected += 1
        return payload


def bootstrap_routes(registry: BootstrapRegistry, kv_timeout: float) -> list[web.RouteDef]:
    """Routes of the prefill's bootstrap server (second aiohttp site on the bootstrap port)."""

    async def kv(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            room = body["bootstrap_room"]
            if not isinstance(room, int) or isinstance(room, bool):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return web.json_response(
                {"error": "body must be a JSON object with integer 'bootstrap_room'"}, status=400)
        try:
            payload = await registry.collect(room, kv_timeout)
        except HandshakeError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        return web.json_response(payload.to_json())

    async def health(_: web.Request) -> web.Response:
        # The real bootstrap server (common/conn.py CommonKVBootstrapServer) answers GET /health.
        return web.Response(text="OK")

    return [web.post(KV_PATH, kv), web.get("/health", health)]


async def fetch_kv(session: aiohttp.ClientSession, host: str, port: int, room: int,
                   timeout: float) -> KvPayload:
    """Decode side: connect to the prefill's bootstrap server and wait for the room's KV.

    Cancelling this coroutine closes the connection, which the prefill sees as a decode abort.
    """
    url = f"http://{host}:{port}{KV_PATH}"
    try:
        async with session.post(url, json={"bootstrap_room": room},
                                timeout=aiohttp.ClientTimeout(total=timeout + 5.0)) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200:
                raise HandshakeError(str(data.get("error", data)) if isinstance(data, dict)
                                     else str(data))
            return KvPayload.from_json(data)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise HandshakeError(
            f"cannot reach bootstrap server {host}:{port} for bootstrap_room {room}: "
            f"{type(exc).__name__}: {exc}") from exc

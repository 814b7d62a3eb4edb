"""Shared pieces of the hostile-input tests: a fake worker that records what it was sent, a
transport that claims a peer address, this host's non-loopback address, if any, and the gateway
as a real process."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import aiohttp
from aiohttp import web

from loadtest.procs import free_port
from tests.gateway.fakes import FakeWorker


@dataclass
class RecordingWorker(FakeWorker):
    """A FakeWorker that records every Authorization header it receives (all values, to catch
    a duplicate) and can answer server_info/model_info with a fixed body."""

    authorizations: list[list[str]] = field(default_factory=list)
    info_body: bytes | None = None
    info_type: str = "application/json"

    def _record(self, request: web.Request) -> None:
        self.authorizations.append(request.headers.getall("Authorization", []))

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        return await super().generate(request)

    async def info(self, request: web.Request) -> web.Response:
        self._record(request)
        if self.info_body is None:
            return await super().info(request)
        return web.Response(body=self.info_body, content_type=self.info_type)


@asynccontextmanager
async def recording_workers(*roles: str, **kwargs: Any,
                            ) -> AsyncIterator[list[RecordingWorker]]:
    workers = [await RecordingWorker(role, **kwargs).start() for role in roles]
    try:
        yield workers
    finally:
        for w in workers:
            await w.close()


def transport_from(peername: Sequence[Any] | None) -> mock.Mock:
    """A transport whose socket reports `peername` (None: none, as a non-TCP socket), for
    `make_mocked_request(transport=...)`."""
    transport = mock.Mock()
    peer = None if peername is None else tuple(peername)
    transport.get_extra_info.side_effect = (
        lambda name, default=None: peer if name == "peername" else default)
    return transport


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this host other than 127.x, or None. Connecting a UDP socket sends
    nothing; it only picks the source address the routing table would use."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@asynccontextmanager
async def gateway_process(
    prefill: FakeWorker, decode: FakeWorker, *args: str
) -> AsyncIterator[tuple[subprocess.Popen[bytes], str]]:
    """`python -m gateway` in PD mode over the two fakes, as an operator runs it (signals,
    process memory); yields (process, base URL) once `/readiness` answers 200."""
    async with gateway_command("--pd-disaggregation", "--prefill", prefill.url,
                               "--decode", decode.url, "--log-level", "warn", *args) as started:
        yield started


@asynccontextmanager
async def gateway_command(*args: str) -> AsyncIterator[tuple[subprocess.Popen[bytes], str]]:
    """`python -m gateway ARGS` on a free loopback port; yields (process, base URL) once
    `/readiness` answers 200 (the gateway's stderr is shown when it exits at start-up)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", *args, "--host", "127.0.0.1", "--port", str(port),
         "--prometheus-port", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with s.get(url + "/readiness") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if proc.poll() is not None:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise AssertionError(f"gateway exited at start-up: {err}")
                assert time.monotonic() < deadline, "gateway did not become ready"
                await asyncio.sleep(0.1)  # polling a condition
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
        await asyncio.to_thread(proc.wait, 15)
        if proc.stderr is not None:
            proc.stderr.close()

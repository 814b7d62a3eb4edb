"""An in-process gateway on a real loopback socket, shared by the gateway and ELDR test suites."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import Settings
from gateway.server import AUTO_DECOMPRESS, HANDLER_CANCELLATION
from gateway.state import STATE, GatewayState


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[tuple[str, GatewayState]]:
    """Serve `create_app(settings)` on 127.0.0.1; yields (base URL, the app's state)."""
    app = create_app(settings, serve_metrics=False)
    # The server options of gateway/server.py (client disconnects cancel both legs; compressed
    # bodies are not inflated by the parser). TestServer ignores its constructor's server
    # options and always sets handler_cancellation itself; the rest go to start_server.
    server = TestServer(app, host="127.0.0.1")
    assert HANDLER_CANCELLATION
    await server.start_server(auto_decompress=AUTO_DECOMPRESS)
    try:
        yield f"http://127.0.0.1:{server.port}", app[STATE]
    finally:
        await server.close()

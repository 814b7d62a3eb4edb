"""An in-process gateway on a real loopback socket, shared by the gateway and ELDR test suites."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp.test_utils import TestServer

from gateway.app import STATE, GatewayState, create_app
from gateway.config import Settings


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[tuple[str, GatewayState]]:
    """Serve `create_app(settings)` on 127.0.0.1; yields (base URL, the app's state)."""
    app = create_app(settings, serve_metrics=False)
    # handler_cancellation as in gateway/server.py: a client disconnect cancels both legs.
    server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}", app[STATE]
    finally:
        await server.close()

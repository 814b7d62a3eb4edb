"""Finding 1: without --admin-token, admin mutations are accepted from loopback peers only.

Another host's request is made two honest ways: a mocked request whose transport reports a
non-loopback peer, run through the middleware chain `create_app` installs; and, where this host
has a non-loopback address, a real socket connecting from it. Loopback is a real TestServer."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request

from gateway.app import create_app
from gateway.config import Settings
from tests.gateway.conftest import pd_settings
from tests.gateway_server import running_gateway
from tests.hostile.helpers import non_loopback_ipv4, recording_workers, transport_from

MUTATIONS = [("POST", "/workers"), ("PUT", "/workers/w"), ("DELETE", "/workers/w"),
             ("POST", "/flush_cache"), ("POST", "/admin/zones/reload"), ("PATCH", "/workers")]
OTHER_HOSTS = [("10.0.0.5", 1234), ("192.168.1.20", 1), ("2001:db8::5", 1234, 0, 0),
               ("::ffff:10.0.0.5", 1234, 0, 0), ("0.0.0.0", 1)]
LOOPBACK = [("127.0.0.1", 1234), ("127.8.9.10", 1), ("::1", 1234, 0, 0),
            ("::ffff:127.0.0.1", 1234, 0, 0)]


async def through_app(app: web.Application, method: str, path: str,
                      peer: Sequence[Any] | None, headers: dict[str, str] | None = None,
                      ) -> tuple[web.StreamResponse, bool]:
    """Run one request from `peer` through the app's middlewares, in the order aiohttp chains
    them, to a stand-in handler; returns (response, whether the handler was reached)."""
    request = make_mocked_request(method, path, headers=headers, app=app,
                                  transport=transport_from(peer))
    reached: list[bool] = []

    async def handler(_: web.Request) -> web.StreamResponse:
        reached.append(True)
        return web.Response(text="handled")

    chain: Callable[[web.Request], Awaitable[web.StreamResponse]] = handler
    for middleware in reversed(app.middlewares):
        chain = functools.update_wrapper(functools.partial(middleware, handler=chain), chain)
    response = await chain(request)
    return response, bool(reached)


def error_of(response: web.StreamResponse) -> dict[str, Any]:
    assert isinstance(response, web.Response) and isinstance(response.body, bytes)
    error: dict[str, Any] = orjson.loads(response.body)["error"]
    return error


@pytest.fixture(scope="module")
def open_app() -> web.Application:
    return create_app(Settings(), serve_metrics=False)


@pytest.fixture(scope="module")
def token_app() -> web.Application:
    return create_app(Settings(admin_token="tok"), serve_metrics=False)


@pytest.mark.parametrize("peer", OTHER_HOSTS, ids=lambda p: p[0])
@pytest.mark.parametrize("method,path", MUTATIONS)
async def test_without_a_token_admin_mutations_from_another_host_are_refused(
        open_app, method, path, peer):
    response, reached = await through_app(open_app, method, path, peer)
    assert not reached
    assert response.status == 403
    error = error_of(response)
    assert error["type"] == "permission_error" and error["code"] == "forbidden"
    assert "--admin-token" in error["message"] and "GATEWAY_ADMIN_TOKEN" in error["message"]


@pytest.mark.parametrize("method,path", [
    ("GET", "/workers"), ("HEAD", "/workers"), ("GET", "/workers/w"), ("GET", "/zones"),
    ("POST", "/generate"), ("POST", "/v1/chat/completions"), ("GET", "/get_loads"),
])
async def test_without_a_token_reads_and_generation_stay_open_to_other_hosts(
        open_app, method, path):
    _, reached = await through_app(open_app, method, path, OTHER_HOSTS[0])
    assert reached


@pytest.mark.parametrize("peer", LOOPBACK, ids=lambda p: p[0])
@pytest.mark.parametrize("method,path", MUTATIONS)
async def test_without_a_token_loopback_peers_may_mutate(open_app, method, path, peer):
    _, reached = await through_app(open_app, method, path, peer)
    assert reached


@pytest.mark.parametrize("headers", [
    {"X-Forwarded-For": "127.0.0.1"}, {"X-Real-IP": "127.0.0.1"},
    {"Forwarded": "for=127.0.0.1"}, {"Host": "127.0.0.1"},
])
async def test_headers_claiming_loopback_do_not_make_a_request_local(open_app, headers):
    response, reached = await through_app(open_app, "POST", "/workers", OTHER_HOSTS[0], headers)
    assert not reached and response.status == 403


async def test_a_request_without_a_peer_address_is_not_local(open_app):
    response, reached = await through_app(open_app, "POST", "/workers", None)
    assert response.status == 403 and not reached


@pytest.mark.parametrize("peer", [OTHER_HOSTS[0], LOOPBACK[0]], ids=lambda p: p[0])
async def test_with_a_token_the_bearer_check_applies_to_every_peer(token_app, peer):
    for method, path in [*MUTATIONS, ("GET", "/workers")]:
        response, reached = await through_app(token_app, method, path, peer)
        assert response.status == 401 and not reached, (method, path)  # loopback: no exemption
        assert error_of(response)["code"] == "unauthorized"
        _, reached = await through_app(token_app, method, path, peer,
                                       {"Authorization": "Bearer tok"})
        assert reached, (method, path)


async def test_loopback_client_manages_workers_without_a_token():
    async with recording_workers("prefill", "decode", "decode") as (prefill, decode, extra), \
            running_gateway(pd_settings([prefill], [decode])) as (url, state), \
            aiohttp.ClientSession() as s:
        async with s.post(url + "/workers", json={"url": extra.url, "worker_type": "decode"}) as r:
            assert r.status == 202, await r.text()
        assert state.workers.find(extra.url) is not None
        async with s.post(url + "/flush_cache") as r:
            assert r.status == 200, await r.text()
        async with s.delete(url + "/workers/" + extra.url) as r:
            assert r.status == 202, await r.text()
        assert state.workers.find(extra.url) is None


async def test_a_real_connection_from_a_non_loopback_address_cannot_mutate():
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to connect from")
    async with recording_workers("prefill", "decode", "decode") as (prefill, decode, extra):
        server = TestServer(create_app(pd_settings([prefill], [decode]), serve_metrics=False),
                            host=address)
        await server.start_server()
        try:
            base = f"http://{address}:{server.port}"
            async with aiohttp.ClientSession() as s:
                async with s.post(base + "/workers",
                                  json={"url": extra.url, "worker_type": "decode"}) as r:
                    assert r.status == 403, await r.text()
                    assert "--admin-token" in (await r.json())["error"]["message"]
                async with s.delete(base + "/workers/" + decode.url) as r:
                    assert r.status == 403
                async with s.get(base + "/workers") as r:
                    assert r.status == 200
                    assert (await r.json())["total"] == 2  # nothing was added or removed
                async with s.post(base + "/generate", json={"text": "x"}) as r:
                    assert r.status == 200
        finally:
            await server.close()


def test_missing_admin_token_is_warned_once_at_app_creation(caplog):
    with caplog.at_level(logging.WARNING, logger="gateway.admin"):
        create_app(Settings(), serve_metrics=False)
    warnings = [r for r in caplog.records if r.name == "gateway.admin"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "loopback only" in warnings[0].getMessage()
    assert "--admin-token" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway.admin"):
        create_app(Settings(admin_token="tok"), serve_metrics=False)
    assert not [r for r in caplog.records if r.name == "gateway.admin"]

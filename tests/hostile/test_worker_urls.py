"""Finding 2: a worker URL is `http(s)://host[:port][/]` and nothing more, at start-up (the
flag named in a ConfigError) and on `POST /workers` (400 naming `url`).

The gateway builds worker requests as `url + path`; a URL ending in `#` or `?` (which urlsplit
reports as an empty fragment or query) or carrying a path made `/get_server_info` and the
health probe read whatever internal URL was registered."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.cli import settings_from_args
from gateway.errors import ConfigError
from gateway.urls import check_url
from tests.gateway.conftest import pd_settings
from tests.gateway_server import running_gateway
from tests.hostile.helpers import recording_workers

BAD = [
    ("http://h:1/x", "must not have a path"),
    ("http://h:1/v1/", "must not have a path"),
    ("http://h:1//", "must not have a path"),
    ("http://h:1#", "must not have a fragment"),
    ("http://h:1/#", "must not have a fragment"),
    ("http://h:1#/admin", "must not have a fragment"),
    ("http://h:1?", "must not have a query"),
    ("http://h:1/?", "must not have a query"),
    ("http://h:1?a=b", "must not have a query"),
    ("http://user:hunter2@h:1", "must not contain credentials"),
    ("http://hunter2@h:1", "must not contain credentials"),
    ("ftp://h:1", "is not an http(s) URL with a host"),
    ("h:1", "is not an http(s) URL with a host"),
    ("http://:1", "is not an http(s) URL with a host"),
    ("http://h:0", "invalid port"),
    ("http://h:65536", "invalid port"),
    ("http://h:x", "invalid port"),
    ("http://h:", "invalid port"),
    ("http://[::1", "is not a valid URL"),
    ("http://[::1]x:1", "invalid IPv6 host"),
    ("http://h\\x:1", "invalid host"),
    ("http://h%2e:1", "invalid host"),
    ("http://h:1\r\nX-Injected: 1", "whitespace or control characters"),
    ("http://h :1", "whitespace or control characters"),
]
GOOD = ["http://h", "http://h:1", "http://h:1/", "https://10.0.0.5:8443", "http://[::1]:30000",
        "http://[fe80::1%25eth0]:80", "http://decode_0.ns.svc.cluster.local:30000", "HTTP://H:1"]


@pytest.mark.parametrize("url,problem", BAD)
def test_check_url_names_the_field_and_the_problem(url, problem):
    with pytest.raises(ConfigError) as info:
        check_url("url", url)
    assert str(info.value).startswith("url: ") and problem in str(info.value)
    assert "hunter2" not in str(info.value)  # credentials are never echoed, even refused


@pytest.mark.parametrize("url", GOOD)
def test_check_url_accepts_a_scheme_host_and_port(url):
    check_url("url", url)


@pytest.mark.parametrize("argv,key,problem", [
    (["--pd-disaggregation", "--decode", "http://d:1#", "--prefill", "http://p:1"], "decode",
     "fragment"),
    (["--pd-disaggregation", "--decode", "http://d:1", "--prefill", "http://p:1/x/"], "prefill",
     "path"),
    (["--worker-urls", "http://w:1?"], "worker_urls", "query"),
    (["--worker-urls", "http://u:p@w:1"], "worker_urls", "credentials"),
])
def test_bad_worker_urls_fail_start_up_naming_the_flag(argv, key, problem):
    with pytest.raises(ConfigError) as info:
        settings_from_args(argv, env={})
    assert str(info.value).startswith(f"{key}: ") and problem in str(info.value)


@pytest.mark.parametrize("url,problem", BAD)
async def test_post_workers_refuses_a_bad_url_with_400(url, problem):
    async with recording_workers("prefill", "decode") as (prefill, decode), \
            running_gateway(pd_settings([prefill], [decode])) as (base, state), \
            aiohttp.ClientSession() as s:
        async with s.post(base + "/workers", json={"url": url, "worker_type": "decode"}) as r:
            text = await r.text()
            assert r.status == 400, text
        error = (await r.json())["error"]
        assert error["message"].startswith("url: ") and problem in error["message"]
        assert "hunter2" not in text
        assert len(state.workers) == 2


async def test_a_trailing_hash_can_no_longer_point_the_gateway_at_an_internal_url():
    """The review's case: `POST /workers {"url": "http://internal/secret#"}` made the health
    probe and `/get_server_info` GET `/secret` (the `#` swallowed the appended path)."""
    hits: list[str] = []

    async def secret(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"internal": "do not leak"})

    internal = web.Application()
    internal.router.add_get("/secret", secret)
    server = TestServer(internal, host="127.0.0.1")
    await server.start_server()
    try:
        async with running_gateway(pd_settings([], [], health_check_interval_secs=0.01)) \
                as (base, state), aiohttp.ClientSession() as s:
            for suffix in ("/secret#", "/secret?", "/secret"):
                target = f"http://127.0.0.1:{server.port}{suffix}"
                async with s.post(base + "/workers",
                                  json={"url": target, "worker_type": "decode"}) as r:
                    assert r.status == 400, await r.text()
            assert len(state.workers) == 0
            async with s.get(base + "/get_server_info") as r:
                assert r.status == 503  # no worker to ask, and certainly not /secret
                assert "do not leak" not in await r.text()
        assert hits == []
    finally:
        await server.close()

"""--cors-allowed-origins (smg 1.13's flag): allowed origins get CORS headers on plain answers,
streams and errors, and their preflights a 204; other origins get none."""

from __future__ import annotations

import aiohttp

from tests.gateway.conftest import pd_settings
from tests.gateway.fakes import start_workers
from tests.gateway_server import running_gateway

APP = "https://app.example.com"


async def test_allowed_origin_gets_headers_everywhere_others_get_none() -> None:
    prefill, decode = await start_workers("prefill", "decode")
    settings = pd_settings([prefill], [decode], cors_allowed_origins=[APP])
    try:
        async with running_gateway(settings) as (url, _), aiohttp.ClientSession() as s:
            async with s.options(url + "/v1/chat/completions", headers={
                    "Origin": APP, "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, content-type"}) as r:
                assert r.status == 204
                assert r.headers["Access-Control-Allow-Origin"] == APP
                assert "POST" in r.headers["Access-Control-Allow-Methods"]
                assert r.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
                assert r.headers["Vary"] == "Origin"
            for stream in (False, True):
                async with s.post(url + "/generate", json={"text": "x", "stream": stream},
                                  headers={"Origin": APP}) as r:
                    assert r.status == 200
                    assert r.headers["Access-Control-Allow-Origin"] == APP
                    await r.read()
            async with s.post(url + "/generate", data=b"{bad", headers={"Origin": APP}) as r:
                assert r.status == 400 and r.headers["Access-Control-Allow-Origin"] == APP
            async with s.post(url + "/generate", json={"text": "x"},
                              headers={"Origin": "https://evil.example"}) as r:
                assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
            async with s.options(url + "/generate", headers={
                    "Origin": "https://evil.example",
                    "Access-Control-Request-Method": "POST"}) as r:
                assert "Access-Control-Allow-Origin" not in r.headers
    finally:
        await prefill.close()
        await decode.close()


async def test_star_allows_any_origin_and_no_flag_means_no_headers() -> None:
    prefill, decode = await start_workers("prefill", "decode")
    try:
        for origins, expected in ((["*"], "*"), ([], None)):
            settings = pd_settings([prefill], [decode], cors_allowed_origins=origins)
            async with running_gateway(settings) as (url, _), aiohttp.ClientSession() as s, \
                    s.post(url + "/generate", json={"text": "x"},
                           headers={"Origin": "http://localhost:3000"}) as r:
                assert r.status == 200
                assert r.headers.get("Access-Control-Allow-Origin") == expected
    finally:
        await prefill.close()
        await decode.close()

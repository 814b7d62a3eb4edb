"""Finding 4: `/get_server_info` and `/server_info` are relayed from a worker without keys that
name credentials (SGLang builds the answer from its ServerArgs, `api_key` included)."""

from __future__ import annotations

import aiohttp
import orjson
import pytest

from gateway.info import filter_server_info, is_secret_key
from tests.gateway.conftest import pd_settings
from tests.gateway_server import running_gateway
from tests.hostile.helpers import recording_workers

WORKER_INFO = {
    "model_path": "fake-moe",
    "api_key": "sk-LEAK1",
    "admin_api_key": "LEAK2",
    "max_total_num_tokens": 4096,
    "max_prefill_tokens": 16384,
    "tokenizer_path": "fake-moe",
    "skip_tokenizer_init": False,
    "internal_states": [{"hf_token": "LEAK3", "last_gen_throughput": 1.5}],
    "nested": {"Client_Secret": "LEAK4", "DB-PASSWORD": "LEAK5", "deeper": [[{"apiKey": "LEAK6"}]],
               "kept": 1},
    "Admin-Token": "LEAK7",
}
FILTERED = {
    "model_path": "fake-moe",
    "max_total_num_tokens": 4096,
    "max_prefill_tokens": 16384,
    "tokenizer_path": "fake-moe",
    "skip_tokenizer_init": False,
    "internal_states": [{"last_gen_throughput": 1.5}],
    "nested": {"deeper": [[{}]], "kept": 1},
}


@pytest.mark.parametrize("key,secret", [
    ("api_key", True), ("API_KEY", True), ("admin_api_key", True), ("apiKey", True),
    ("token", True), ("hf_token", True), ("Admin-Token", True), ("accessToken", True),
    ("client_secret", True), ("ssl_keyfile_password", True),
    ("max_total_num_tokens", False), ("max_prefill_tokens", False), ("tokenizer_path", False),
    ("skip_tokenizer_init", False), ("token_usage", False), ("model_path", False),
])
def test_secret_key_names(key, secret):
    assert is_secret_key(key) is secret


@pytest.mark.parametrize("path", ["/get_server_info", "/server_info"])
async def test_server_info_secrets_are_removed_at_any_depth(path):
    body = orjson.dumps(WORKER_INFO)
    async with recording_workers("prefill", "decode", info_body=body) as (prefill, decode), \
            running_gateway(pd_settings([prefill], [decode])) as (base, _), \
            aiohttp.ClientSession() as s, s.get(base + path) as r:
        assert r.status == 200
        raw = await r.read()
    assert b"LEAK" not in raw
    assert orjson.loads(raw) == FILTERED


async def test_model_info_and_clean_or_non_json_server_info_are_relayed_unchanged():
    for body, content_type in ((b"api_key=sk-1 is not JSON", "text/plain"),
                               (b'{"model_path":  "m",\n "max_total_num_tokens": 1}',
                                "application/json")):
        async with recording_workers("prefill", "decode", info_body=body,
                                     info_type=content_type) as (prefill, decode), \
                running_gateway(pd_settings([prefill], [decode])) as (base, _), \
                aiohttp.ClientSession() as s:
            for path in ("/get_server_info", "/server_info", "/get_model_info"):
                async with s.get(base + path) as r:
                    assert r.status == 200
                    assert await r.read() == body, path
    secret_model_info = orjson.dumps({"api_key": "kept: only server_info is filtered"})
    async with recording_workers("prefill", "decode", info_body=secret_model_info) \
            as (prefill, decode), \
            running_gateway(pd_settings([prefill], [decode])) as (base, _), \
            aiohttp.ClientSession() as s, s.get(base + "/model_info") as r:
        assert await r.read() == secret_model_info


def test_filter_keeps_what_orjson_cannot_parse_filterable():
    # Python servers can write NaN and integers beyond 64 bits; the filter must still apply.
    body = b'{"api_key": "LEAK", "x": NaN, "big": 123456789012345678901234567890}'
    out = filter_server_info(body)
    assert b"LEAK" not in out and b"123456789012345678901234567890" in out and b"NaN" in out

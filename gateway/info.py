"""Read-mostly endpoints: health probes, server/model info, loads, cache flush.

Semantics follow the Rust router's HTTP surface: `/health` and `/liveness` answer for the gateway
process itself; `/readiness` is 503 unless at least one healthy prefill and one healthy decode
worker exist (PD) or one healthy regular worker (non-PD); `/health_generate` asks every healthy
worker's `/health_generate` (a real forward pass); info endpoints are answered by one available
worker (decode preferred: it runs the sampling the client sees); a server_info answer goes out
without the keys that name credentials (SGLang builds it from its ServerArgs, `api_key` included).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway.errors import NoWorkersError
from gateway.responses import error_body, json_response
from gateway.state import STATE, GatewayState
from gateway.urls import redact_url
from gateway.workers import Worker

# Info requests, /flush_cache and /health_generate (a real forward pass, queued behind running
# batches on a busy worker) get this long before the worker counts as failed for that request.
UPSTREAM_INFO_TIMEOUT_SECS = 30.0
# Client path -> worker path of the info endpoints answered by one available worker.
FORWARDED_INFO = (("/server_info", "/server_info"), ("/get_server_info", "/server_info"),
                  ("/model_info", "/model_info"), ("/get_model_info", "/model_info"),
                  ("/v1/models", "/v1/models"))
# Keys of a server_info answer naming any of these are dropped (see `is_secret_key`).
SECRET_KEY_WORDS = ("api_key", "apikey", "secret", "password")


def _info_worker(state: GatewayState) -> Worker:
    for role in ("decode", "regular", "prefill"):
        workers = state.workers.available(role)
        if workers:
            return workers[0]
    raise NoWorkersError("no available worker to answer this request")


async def ask_worker(state: GatewayState, worker: Worker, path: str, method: str = "GET",
                     ) -> tuple[int, bytes, str]:
    """(status, body, content type) of one request to a worker; a transport failure is a 502
    in the gateway's error shape, never an exception."""
    assert state.session is not None
    timeout = aiohttp.ClientTimeout(total=UPSTREAM_INFO_TIMEOUT_SECS)
    try:
        async with state.session.request(method, worker.url + path, timeout=timeout,
                                         headers=state.upstream_headers()) as resp:
            return resp.status, await resp.read(), resp.content_type
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        message = f"{worker.role} worker {worker.worker_id} failed: {type(exc).__name__}: {exc}"
        return 502, orjson.dumps(error_body(502, message, "upstream_error")), "application/json"


async def fan_out(state: GatewayState, workers: Sequence[Worker], path: str,
                  method: str = "GET") -> list[tuple[int, bytes, str]]:
    """`ask_worker` on every worker at once, answers in the workers' order."""
    return list(await asyncio.gather(*(ask_worker(state, w, path, method) for w in workers)))


async def health(_: web.Request) -> web.Response:
    return web.Response(text="OK")


async def readiness(request: web.Request) -> web.Response:
    state = request.app[STATE]
    workers = state.workers
    if state.settings.pd_disaggregation:
        ready = workers.has_healthy("prefill") and workers.has_healthy("decode")
        detail = {"healthy_prefill": len([w for w in workers.by_role("prefill") if w.healthy]),
                  "healthy_decode": len([w for w in workers.by_role("decode") if w.healthy])}
    else:
        ready = workers.has_healthy("regular")
        detail = {"healthy_regular": len([w for w in workers.by_role("regular") if w.healthy])}
    return json_response({"status": "ready" if ready else "not ready", **detail},
                         200 if ready else 503)


async def health_generate(request: web.Request) -> web.Response:
    state = request.app[STATE]
    workers = [w for w in state.workers if w.healthy]
    if not workers:
        raise NoWorkersError("no healthy workers")
    results = await fan_out(state, workers, "/health_generate")
    failed = {w.worker_id: status for w, (status, _, _) in zip(workers, results, strict=True)
              if not 200 <= status < 300}
    if failed:
        return json_response({"status": "unhealthy", "failed": failed}, 503)
    return web.Response(text="OK")


def is_secret_key(name: str) -> bool:
    """Whether a server_info key names a credential. `token` counts only as the name's last
    word (`token`, `admin_token`, `hf_token`, `accessToken`): `max_total_num_tokens`,
    `max_prefill_tokens` and `tokenizer_path` are capacity and model facts that clients and the
    Rust router read from this answer."""
    lowered = name.lower().replace("-", "_")
    return (any(word in lowered for word in SECRET_KEY_WORDS)
            or lowered.rsplit("_", 1)[-1].endswith("token"))


def without_secrets(value: Any) -> tuple[Any, bool]:
    """`value` with every secret-named key removed at any depth; and whether one was."""
    if isinstance(value, dict):
        kept: dict[Any, Any] = {}
        removed = False
        for key, item in value.items():
            if isinstance(key, str) and is_secret_key(key):
                removed = True
                continue
            kept[key], inner = without_secrets(item)
            removed = removed or inner
        return kept, removed
    if isinstance(value, list):
        pairs = [without_secrets(item) for item in value]
        return [item for item, _ in pairs], any(inner for _, inner in pairs)
    return value, False


def filter_server_info(body: bytes) -> bytes:
    """The worker's server_info answer without credentials: SGLang builds it from its
    ServerArgs, which hold `api_key` (and, in some versions, admin keys). A body that is not
    JSON is relayed as it is; one with nothing to remove, byte for byte."""
    try:
        # The standard parser, not orjson: it reads what Python servers write (NaN, integers
        # over 64 bits), and a body this cannot parse would go out unfiltered.
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return body
    filtered, removed = without_secrets(doc)
    return json.dumps(filtered).encode() if removed else body


def _forward(path: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        state = request.app[STATE]
        status, body, content_type = await ask_worker(state, _info_worker(state), path)
        if path == "/server_info":
            body = filter_server_info(body)
        return web.Response(status=status, body=body,
                            content_type=content_type or "application/json")
    return handler


async def loads(request: web.Request) -> web.Response:
    by_role: dict[str, list[dict[str, Any]]] = {}
    for w in request.app[STATE].workers:
        by_role.setdefault(w.role, []).append({
            "engine": redact_url(w.url), "worker_id": w.display_id,
            "load": w.reported_load, "in_flight": w.in_flight, "is_healthy": w.healthy,
        })
    return json_response(by_role)


async def metrics(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return web.Response(body=generate_latest(request.app[STATE].registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(_: web.Request) -> web.Response:
    from gateway.openapi import load_openapi

    return json_response(load_openapi())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/liveness", health)
    app.router.add_get("/readiness", readiness)
    app.router.add_get("/health_generate", health_generate)
    for path, upstream in FORWARDED_INFO:
        app.router.add_get(path, _forward(upstream))
    app.router.add_get("/get_loads", loads)
    app.router.add_get("/v1/loads", loads)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)

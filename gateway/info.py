"""Read-mostly endpoints: health probes, server/model info, loads, cache flush.

Semantics follow the Rust router's HTTP surface: `/health` and `/liveness` answer for the gateway
process itself; `/readiness` is 503 unless at least one healthy prefill and one healthy decode
worker exist (PD) or one healthy regular worker (non-PD); `/health_generate` asks every healthy
worker's `/health_generate` (a real forward pass); info endpoints are answered by one available
worker (decode preferred: it runs the sampling the client sees).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from gateway.errors import NoWorkersError
from gateway.workers import Worker

if TYPE_CHECKING:
    from gateway.app import GatewayState


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status,
                        content_type="application/json")


def _info_worker(state: GatewayState) -> Worker:
    for role in ("decode", "regular", "prefill"):
        workers = state.workers.available(role)
        if workers:
            return workers[0]
    raise NoWorkersError("no available worker to answer this request")


async def _get(state: GatewayState, worker: Worker, path: str, method: str = "GET",
               ) -> tuple[int, bytes, str]:
    assert state.session is not None
    timeout = aiohttp.ClientTimeout(total=state.settings.health_check_timeout_secs * 6)
    try:
        async with state.session.request(method, worker.url + path, timeout=timeout,
                                         headers=state.upstream_headers()) as resp:
            return resp.status, await resp.read(), resp.content_type
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        message = f"{worker.role} worker {worker.worker_id} failed: {type(exc).__name__}: {exc}"
        return 502, orjson.dumps({"error": {"message": message, "type": "upstream_error",
                                            "code": 502}}), "application/json"


def add_routes(app: web.Application, state: GatewayState) -> None:
    async def health(_: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def readiness(_: web.Request) -> web.Response:
        workers = state.workers
        if state.settings.pd_disaggregation:
            ready = workers.has_healthy("prefill") and workers.has_healthy("decode")
            detail = {"healthy_prefill": len([w for w in workers.by_role("prefill") if w.healthy]),
                      "healthy_decode": len([w for w in workers.by_role("decode") if w.healthy])}
        else:
            ready = workers.has_healthy("regular")
            detail = {"healthy_regular": len([w for w in workers.by_role("regular")
                                              if w.healthy])}
        return _json({"status": "ready" if ready else "not ready", **detail},
                     200 if ready else 503)

    async def health_generate(_: web.Request) -> web.Response:
        workers = [w for w in state.workers if w.healthy]
        if not workers:
            raise NoWorkersError("no healthy workers")
        results = await asyncio.gather(*(_get(state, w, "/health_generate") for w in workers))
        failed = {w.worker_id: status for w, (status, _, _) in zip(workers, results, strict=True)
                  if not 200 <= status < 300}
        if failed:
            return _json({"status": "unhealthy", "failed": failed}, 503)
        return web.Response(text="OK")

    def forward(path: str) -> Any:
        async def handler(_: web.Request) -> web.Response:
            status, body, content_type = await _get(state, _info_worker(state), path)
            return web.Response(status=status, body=body,
                                content_type=content_type or "application/json")
        return handler

    async def loads(_: web.Request) -> web.Response:
        by_role: dict[str, list[dict[str, Any]]] = {}
        for w in state.workers:
            by_role.setdefault(w.role, []).append({
                "engine": w.url, "worker_id": w.worker_id, "load": w.reported_load,
                "in_flight": w.in_flight, "is_healthy": w.healthy,
            })
        return _json(by_role)

    async def metrics(_: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(body=generate_latest(state.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(_: web.Request) -> web.Response:
        from gateway.openapi import load_openapi

        return _json(load_openapi())

    app.router.add_get("/health", health)
    app.router.add_get("/liveness", health)
    app.router.add_get("/readiness", readiness)
    app.router.add_get("/health_generate", health_generate)
    for path, upstream in (("/server_info", "/server_info"),
                           ("/get_server_info", "/server_info"),
                           ("/model_info", "/model_info"),
                           ("/get_model_info", "/model_info"),
                           ("/v1/models", "/v1/models")):
        app.router.add_get(path, forward(upstream))
    app.router.add_get("/get_loads", loads)
    app.router.add_get("/v1/loads", loads)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)

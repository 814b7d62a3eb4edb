"""Admin endpoints and their bearer-token guard.

Worker management follows the Rust router's HTTP API: `POST /workers` answers 202 Accepted and
the worker joins rotation once its first health check passes (done in the background, as the
Rust router's job queue does); `DELETE /workers/{id}` answers 202 and takes the worker out at
once (in-flight requests finish on it). `POST /flush_cache` is fanned out to every worker.
With `--admin-token` set (or GATEWAY_ADMIN_TOKEN), these endpoints require
`Authorization: Bearer <token>`; read-only endpoints stay open.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from gateway.config import Settings, _check_url
from gateway.errors import BadRequestError, ConfigError, UnauthorizedError
from gateway.health import apply_health_result
from gateway.info import _get

if TYPE_CHECKING:
    from gateway.app import GatewayState

ADMIN_PREFIXES = ("/workers", "/flush_cache", "/admin/")
WORKER_FIELDS = {"url", "worker_type", "bootstrap_port", "id"}


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status,
                        content_type="application/json")


def is_admin_request(request: web.Request) -> bool:
    path = request.path
    if path.startswith("/workers"):
        return True  # GET /workers too: it reveals internal URLs
    return any(path.startswith(p) for p in ADMIN_PREFIXES)


def auth_check_for(settings: Settings) -> Callable[[web.Request], web.Response | None] | None:
    """The admin bearer-token check run by the app's middleware before any handler: returns
    the 401 answer for an admin request without the right token, else None. None (no check at
    all) when no admin token is configured."""
    token = settings.admin_token
    if not token:
        return None
    expected = f"Bearer {token}".encode()

    def check(request: web.Request) -> web.Response | None:
        if not is_admin_request(request):
            return None
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), expected):
            return None
        body = {"error": {"message": "admin endpoint: missing or wrong bearer token "
                          "(Authorization: Bearer <admin token>)",
                          "type": UnauthorizedError.code, "code": 401}}
        return _json(body, 401)

    return check


async def _read_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequestError("request body must be a JSON object")
    return body


def _port(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise BadRequestError("bootstrap_port: must be an integer 1..65535 or null")
    return value


def add_routes(app: web.Application, state: GatewayState,
               on_workers_changed: Callable[[], None]) -> None:
    registry = state.workers

    async def activate(worker_id: str) -> None:
        """Probe a newly added worker until it passes once (bounded), then put it in rotation."""
        health = state.health
        for _ in range(state.settings.health_failure_threshold * 10):
            worker = registry.find(worker_id)
            if worker is None or health is None:
                return
            if await health.probe(worker):
                worker.healthy = True
                apply_health_result(worker, True, state.settings.health_failure_threshold,
                                    state.settings.health_success_threshold)
                state.metrics.record_health(worker.worker_id, worker.role, True, True)
                return
            await asyncio.sleep(min(state.settings.health_check_interval_secs, 1.0))

    async def add_worker(request: web.Request) -> web.Response:
        body = await _read_object(request)
        unknown = set(body) - WORKER_FIELDS
        if unknown:
            raise BadRequestError(f"unknown field(s): {', '.join(sorted(unknown))}; allowed: "
                                  f"{', '.join(sorted(WORKER_FIELDS))}")
        url = body.get("url")
        if not isinstance(url, str):
            raise BadRequestError("url: required, must be a string")
        try:
            _check_url("url", url)
        except ConfigError as exc:
            raise BadRequestError(str(exc)) from None
        default_role = "decode" if state.settings.pd_disaggregation else "regular"
        role = body.get("worker_type", default_role)
        if not isinstance(role, str):
            raise BadRequestError("worker_type: must be a string")
        wid = body.get("id")
        if wid is not None and (not isinstance(wid, str) or not wid):
            raise BadRequestError("id: must be a non-empty string")
        worker = registry.add(url, role, _port(body.get("bootstrap_port")), wid)
        worker.healthy = False  # joins rotation after its first successful health check
        state.metrics.record_health(worker.worker_id, worker.role, False, False)
        state.metrics.record_circuit_state(worker.worker_id, worker.breaker.state)
        on_workers_changed()
        task = asyncio.ensure_future(activate(worker.worker_id))
        state.tasks.append(task)
        task.add_done_callback(lambda t: state.tasks.remove(t) if t in state.tasks else None)
        return _json({"status": "accepted", "worker_id": worker.worker_id,
                      "message": "worker added; it enters rotation once healthy"}, 202)

    async def list_workers(_: web.Request) -> web.Response:
        workers = [w.to_json() for w in registry]
        return _json({"workers": workers, "total": len(workers)})

    async def get_worker(request: web.Request) -> web.Response:
        return _json(registry.get(request.match_info["worker_id"]).to_json())

    async def update_worker(request: web.Request) -> web.Response:
        worker = registry.get(request.match_info["worker_id"])
        body = await _read_object(request)
        unknown = set(body) - {"bootstrap_port"}
        if unknown:
            raise BadRequestError(f"unknown field(s): {', '.join(sorted(unknown))}; only "
                                  "bootstrap_port can be updated")
        if "bootstrap_port" in body:
            if worker.role != "prefill":
                raise BadRequestError("bootstrap_port: only prefill workers have one")
            worker.bootstrap_port = _port(body["bootstrap_port"])
        return _json(worker.to_json())

    async def delete_worker(request: web.Request) -> web.Response:
        worker = registry.remove(request.match_info["worker_id"])
        state.metrics.forget_worker(worker.worker_id, worker.role)
        on_workers_changed()
        return _json({"status": "accepted", "worker_id": worker.worker_id,
                      "message": "worker removed from rotation"}, 202)

    async def flush_cache(_: web.Request) -> web.Response:
        workers = list(registry)
        results = await asyncio.gather(*(_get(state, w, "/flush_cache", "POST")
                                         for w in workers))
        per_worker = {w.worker_id: status for w, (status, _, _) in zip(workers, results,
                                                                       strict=True)}
        ok = all(200 <= s < 300 for s in per_worker.values())
        return _json({"status": "ok" if ok else "partial failure", "workers": per_worker},
                     200 if ok else 502)

    app.router.add_post("/workers", add_worker)
    app.router.add_get("/workers", list_workers)
    app.router.add_get("/workers/{worker_id:.+}", get_worker)
    app.router.add_put("/workers/{worker_id:.+}", update_worker)
    app.router.add_delete("/workers/{worker_id:.+}", delete_worker)
    app.router.add_post("/flush_cache", flush_cache)


def add_zone_routes(app: web.Application, state: GatewayState) -> None:
    """Delegate `/admin/zones/reload` and `/zones` to the zone runtime's own handlers (built per
    request because the runtime only exists once the app lifecycle has started)."""

    def delegate(method: str, path: str) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            from gateway.zone_runtime import zone_admin_routes

            if state.zone_runtime is None:
                raise BadRequestError("zones: no zone runtime is active")
            for route in zone_admin_routes(state.zone_runtime):
                if route.method == method and route.path == path:
                    response: web.StreamResponse = await route.handler(request)
                    return response
            raise BadRequestError(f"zones: runtime has no {method} {path} handler")
        return handler

    app.router.add_post("/admin/zones/reload", delegate("POST", "/admin/zones/reload"))
    app.router.add_get("/zones", delegate("GET", "/zones"))

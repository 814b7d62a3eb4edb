"""Admin endpoints and their bearer-token guard.

Worker management follows the Rust router's HTTP API: `POST /workers` answers 202 Accepted and
the worker joins rotation once its first health check passes (done in the background, as the
Rust router's job queue does); `DELETE /workers/{id}` answers 202 and takes the worker out at
once (in-flight requests finish on it). `POST /flush_cache` is fanned out to every worker.
With `--admin-token` set (or GATEWAY_ADMIN_TOKEN), these endpoints require
`Authorization: Bearer <token>`; read-only endpoints stay open.

Zone tables (with `--zones`): `POST /admin/zones/reload` reloads now (200 loaded or unchanged,
422 rejected while the old table keeps serving); `GET /zones` shows the
active table, its zone -> worker mapping and the last reload error. Both are mounted only with
--zones.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from gateway.config import Settings, check_url
from gateway.errors import BadRequestError, ConfigError, ConflictError, UnauthorizedError
from gateway.health import apply_health_result
from gateway.info import fan_out
from gateway.responses import error_response, json_response
from gateway.state import STATE, GatewayState

ADMIN_PREFIXES = ("/workers", "/flush_cache", "/admin/")
WORKER_FIELDS = {"url", "worker_type", "bootstrap_port", "id"}
# A worker added over the API is probed until it passes once, at most this long, then given up
# on (it stays registered and unhealthy; the periodic health check can still bring it in).
ACTIVATION_TIMEOUT_SECS = 60.0
ACTIVATION_PROBE_SECS = 1.0  # between probes (or the health interval, when shorter)


def is_admin_request(request: web.Request) -> bool:
    # GET /workers too: it reveals internal URLs.
    return request.path.startswith(ADMIN_PREFIXES)


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
        return error_response(401, "admin endpoint: missing or wrong bearer token "
                              "(Authorization: Bearer <admin token>)", UnauthorizedError.code)

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


async def _activate(state: GatewayState, worker_id: str) -> None:
    """Probe a newly added worker until it passes once (bounded), then put it in rotation."""
    settings = state.settings
    deadline = time.monotonic() + ACTIVATION_TIMEOUT_SECS
    while time.monotonic() < deadline:
        worker = state.workers.find(worker_id)
        health = state.health
        if worker is None or health is None:
            return
        if await health.probe(worker):
            worker.healthy = True
            apply_health_result(worker, True, settings.health_failure_threshold,
                                settings.health_success_threshold)
            state.metrics.record_health(worker.worker_id, worker.role, True, True)
            return
        await asyncio.sleep(min(settings.health_check_interval_secs, ACTIVATION_PROBE_SECS))


async def add_worker(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _read_object(request)
    unknown = set(body) - WORKER_FIELDS
    if unknown:
        raise BadRequestError(f"unknown field(s): {', '.join(sorted(unknown))}; allowed: "
                              f"{', '.join(sorted(WORKER_FIELDS))}")
    url = body.get("url")
    if not isinstance(url, str):
        raise BadRequestError("url: required, must be a string")
    try:
        check_url("url", url)
    except ConfigError as exc:
        raise BadRequestError(str(exc)) from None
    default_role = "decode" if state.settings.pd_disaggregation else "regular"
    role = body.get("worker_type", default_role)
    if not isinstance(role, str):
        raise BadRequestError("worker_type: must be a string")
    wid = body.get("id")
    if wid is not None and (not isinstance(wid, str) or not wid):
        raise BadRequestError("id: must be a non-empty string")
    worker = state.workers.add(url, role, _port(body.get("bootstrap_port")), wid)
    worker.healthy = False  # joins rotation after its first successful health check
    state.metrics.record_health(worker.worker_id, worker.role, False, False)
    state.metrics.record_circuit_state(worker.worker_id, worker.breaker.state)
    state.decode_workers_changed()
    task = asyncio.ensure_future(_activate(state, worker.worker_id))
    state.tasks.append(task)
    task.add_done_callback(lambda t: state.tasks.remove(t) if t in state.tasks else None)
    return json_response({"status": "accepted", "worker_id": worker.worker_id,
                          "message": "worker added; it enters rotation once healthy"}, 202)


async def list_workers(request: web.Request) -> web.Response:
    workers = [w.to_json() for w in request.app[STATE].workers]
    return json_response({"workers": workers, "total": len(workers)})


async def get_worker(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].workers.get(request.match_info["worker_id"]).to_json())


async def update_worker(request: web.Request) -> web.Response:
    worker = request.app[STATE].workers.get(request.match_info["worker_id"])
    body = await _read_object(request)
    unknown = set(body) - {"bootstrap_port"}
    if unknown:
        raise BadRequestError(f"unknown field(s): {', '.join(sorted(unknown))}; only "
                              "bootstrap_port can be updated")
    if "bootstrap_port" in body:
        if worker.role != "prefill":
            raise BadRequestError("bootstrap_port: only prefill workers have one")
        worker.bootstrap_port = _port(body["bootstrap_port"])
    return json_response(worker.to_json())


async def delete_worker(request: web.Request) -> web.Response:
    state = request.app[STATE]
    worker = state.workers.remove(request.match_info["worker_id"])
    state.metrics.forget_worker(worker.worker_id, worker.role)
    state.decode_workers_changed()
    return json_response({"status": "accepted", "worker_id": worker.worker_id,
                          "message": "worker removed from rotation"}, 202)


async def flush_cache(request: web.Request) -> web.Response:
    state = request.app[STATE]
    workers = list(state.workers)
    results = await fan_out(state, workers, "/flush_cache", "POST")
    per_worker = {w.worker_id: status for w, (status, _, _) in zip(workers, results, strict=True)}
    ok = all(200 <= s < 300 for s in per_worker.values())
    return json_response({"status": "ok" if ok else "partial failure", "workers": per_worker},
                         200 if ok else 502)


async def reload_zones(request: web.Request) -> web.Response:
    locality = request.app[STATE].locality
    if locality is None:
        raise ConflictError("zones: no zone table path configured (--zones)")
    runtime = locality.runtime
    result = await runtime.reload()
    body: dict[str, Any] = {"result": result.status, "zones": runtime.info()}
    if result.status == "failed":
        body["error"] = {"code": "invalid_zone_table", "message": result.error}
        return json_response(body, 422)
    return json_response(body)


async def show_zones(request: web.Request) -> web.Response:
    locality = request.app[STATE].locality
    if locality is None:
        raise ConflictError("zones: no zone table path configured (--zones)")
    return json_response(locality.runtime.info())


def add_routes(app: web.Application) -> None:
    app.router.add_post("/workers", add_worker)
    app.router.add_get("/workers", list_workers)
    app.router.add_get("/workers/{worker_id:.+}", get_worker)
    app.router.add_put("/workers/{worker_id:.+}", update_worker)
    app.router.add_delete("/workers/{worker_id:.+}", delete_worker)
    app.router.add_post("/flush_cache", flush_cache)
    if app[STATE].settings.zones:
        app.router.add_post("/admin/zones/reload", reload_zones)
        app.router.add_get("/zones", show_zones)

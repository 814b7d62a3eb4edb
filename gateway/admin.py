"""Admin endpoints and their bearer-token guard.

Worker management follows the Rust router's HTTP API: `POST /workers` answers 202 Accepted and
the worker joins rotation once its first health check passes (done in the background, as the
Rust router's job queue does); `DELETE /workers/{id}` answers 202 and takes the worker out at
once (in-flight requests finish on it). `POST /flush_cache` is fanned out to every worker.
With `--admin-token` set (or GATEWAY_ADMIN_TOKEN), these endpoints (reads included: `GET /workers`
shows internal URLs) require `Authorization: Bearer <token>`. Without one, reads stay open and
mutations (any method but GET/HEAD) are accepted from loopback clients only, answered 403 from
anywhere else: an open port must not let anyone add a worker that receives every prompt.

Zone tables (with `--zones`): `POST /admin/zones/reload` reloads now (200 loaded or unchanged,
422 rejected while the old table keeps serving); `GET /zones` shows the
active table, its zone -> worker mapping and the last reload error. Both are mounted only with
--zones.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import web

from gateway import dp
from gateway.config import Settings
from gateway.errors import BadRequestError, ConfigError, ConflictError, UnauthorizedError
from gateway.info import fan_out
from gateway.responses import error_response, json_response
from gateway.state import STATE, GatewayState
from gateway.urls import check_url, redact_url
from gateway.workers import Worker

log = logging.getLogger(__name__)

ADMIN_PREFIXES = ("/workers", "/flush_cache", "/admin/")
WORKER_FIELDS = {"url", "worker_type", "bootstrap_port", "id"}

AdminCheck = Callable[[web.Request], web.Response | None]
READ_METHODS = frozenset({"GET", "HEAD"})  # aiohttp's add_get also answers HEAD
FORBIDDEN = "forbidden"  # error type of the 403 answer (the guard answers, nothing is raised)


def is_admin_request(request: web.Request) -> bool:
    # GET /workers too: it reveals internal URLs.
    return request.path.startswith(ADMIN_PREFIXES)


def is_loopback(request: web.Request) -> bool:
    """Whether the TCP peer is this host (127.0.0.0/8, ::1, ::ffff:127.x). Only the socket's
    address counts: a header such as X-Forwarded-For is the client's word, not evidence."""
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:  # no peer address (a non-TCP transport): not known to be local
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # Python 3.11 calls ::ffff:127.0.0.1 not loopback
    return address.is_loopback


def auth_check_for(settings: Settings) -> AdminCheck:
    """The admin guard run by the app's middleware before any handler: returns the refusal
    for an admin request it does not allow, else None. With an admin token: 401 for any admin
    request without `Authorization: Bearer <token>`. Without one: 403 for an admin mutation
    (not GET/HEAD) from a non-loopback peer; this also logs the start-up warning that says so,
    once per app (the app calls this once, when it is built)."""
    token = settings.admin_token
    if not token:
        log.warning("no admin token configured: admin mutations (POST/PUT/DELETE /workers, "
                    "/flush_cache, /admin/...) accepted from loopback only; set --admin-token "
                    "(GATEWAY_ADMIN_TOKEN) to manage workers from other hosts")
        return _loopback_mutations_only
    expected = f"Bearer {token}".encode()

    def check(request: web.Request) -> web.Response | None:
        if not is_admin_request(request):
            return None
        given = request.headers.get("Authorization", "")
        # surrogateescape: undecodable header bytes are compared as the bytes they were
        # (a mismatch, so a 401), not a failed encode.
        if hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
            return None
        return error_response(401, "admin endpoint: missing or wrong bearer token "
                              "(Authorization: Bearer <admin token>)", UnauthorizedError.code)

    return check


def _loopback_mutations_only(request: web.Request) -> web.Response | None:
    if request.method in READ_METHODS or not is_admin_request(request) or is_loopback(request):
        return None
    return error_response(403, f"admin endpoint: {request.method} {request.path} is accepted "
                          "from loopback only while no admin token is configured; set "
                          "--admin-token (GATEWAY_ADMIN_TOKEN) and send Authorization: Bearer "
                          "<admin token>", FORBIDDEN)


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
    if wid is not None and redact_url(wid) != wid:
        # The id is a metrics label and is logged: the no-credentials rule of `url` holds for it.
        raise BadRequestError(f"id: {redact_url(wid)!r} must not contain credentials (user@)")
    added = await register_worker(state, url, role, _port(body.get("bootstrap_port")), wid)
    first = added[0]
    return json_response({"status": "accepted", "worker_id": first.worker_id,
                          "worker_ids": [w.worker_id for w in added],
                          "url": redact_url(first.url),
                          "location": f"/workers/{quote(first.worker_id, safe='')}",
                          "message": "worker added; it enters rotation once healthy"}, 202)


async def register_worker(state: GatewayState, url: str, role: str,
                          bootstrap_port: int | None, worker_id: str | None = None
                          ) -> list[Worker]:
    """Register a worker out of rotation; it joins once a health check passes. The one add path
    of `POST /workers` and service discovery (gateway/discovery.py). Returns the registered
    workers: one, or one per DP rank with --dp-aware."""
    worker = state.workers.add(url, role, bootstrap_port, worker_id)
    # Joins rotation once a health check passes (gateway/health.py), unless checks are off.
    worker.healthy = state.settings.disable_health_check
    added = [worker]
    if state.settings.dp_aware and state.session is not None:
        # One worker per DP rank, `id@rank` (gateway/dp.py); DELETE of the id removes them all.
        added = await dp.expand(state.workers, worker, state.session, state.upstream_headers(),
                                state.settings.health_check_timeout_secs)
    for each in added:
        state.metrics.record_health(each.worker_id, each.role, each.healthy, False)
        state.metrics.record_circuit_state(each.worker_id, each.breaker.state)
    state.decode_workers_changed()
    for each in added:
        if not each.healthy:
            state.activate(each)
    return added


def unregister_worker(state: GatewayState, worker_id: str) -> list[Worker]:
    """Take a worker out at once (requests in flight finish on it): the one remove path of
    `DELETE /workers/{id}` and service discovery. NotFoundError when it is not registered."""
    # --dp-aware registered a worker's ranks as `id@rank`; its own id removes all of them.
    ranks = [w for w in state.workers if w.dp_rank is not None
             and w.worker_id == f"{worker_id}@{w.dp_rank}"] \
        if state.workers.find(worker_id) is None else []
    removed = ([state.workers.remove(w.worker_id) for w in ranks] if ranks
               else [state.workers.remove(worker_id)])
    for worker in removed:
        state.metrics.forget_worker(worker.worker_id, worker.role)
    state.decode_workers_changed()
    return removed


async def list_workers(request: web.Request) -> web.Response:
    workers = [w.to_json() for w in request.app[STATE].workers]
    stats = {f"{role}_count": sum(1 for w in workers if w["worker_type"] == role)
             for role in ("prefill", "decode", "regular")}
    return json_response({"workers": workers, "total": len(workers), "stats": stats})


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
    wid = request.match_info["worker_id"]
    unregister_worker(state, wid)
    return json_response({"status": "accepted", "worker_id": wid,
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
    if locality is None or locality.runtime.path is None:
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
    if locality is None or locality.runtime.path is None:
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

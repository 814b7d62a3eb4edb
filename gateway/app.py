"""App factory: `create_app(settings) -> aiohttp.web.Application`.

Everything stateful (HTTP clients, worker registry, policies, metrics registry,
background health/load tasks, the Prometheus site, the optional zone runtime) is built in the
app's cleanup context and torn down with it: no module-level state, so tests build apps freely.
State lives under the typed app key `gateway.state.STATE` (its `.registry` is the per-app
Prometheus `CollectorRegistry` other modules attach metrics to).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CollectorRegistry

from gateway import admin, dp, info
from gateway.circuit import BreakerConfig
from gateway.config import Settings
from gateway.cors import CorsPolicy
from gateway.dispatch import Dispatcher
from gateway.errors import GatewayError
from gateway.health import HealthChecker
from gateway.http1 import Http1Pool
from gateway.loads import LoadPoller
from gateway.metrics import GatewayMetrics
from gateway.policies.registry import make_policy
from gateway.resolver import NullResolver
from gateway.responses import error_response
from gateway.state import STATE, GatewayState
from gateway.tls import client_context
from gateway.workers import WorkerRegistry

log = logging.getLogger(__name__)

GENERATION_ENDPOINTS = ("/generate", "/v1/chat/completions", "/v1/completions")


@web.middleware
async def error_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                           ) -> web.StreamResponse:
    encoding = request.headers.get("Content-Encoding")
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        # Refused before a byte is read: a few hundred KiB of gzip inflate to the whole payload
        # limit, and the server does not inflate bodies (AUTO_DECOMPRESS, gateway/server.py),
        # so this answer names the problem. SGLang's own server does not decode compressed
        # request bodies either.
        return error_response(415, f"Content-Encoding: {encoding[:40]!r} is not supported; "
                              "send the request body uncompressed", "unsupported_media_type")
    try:
        return await handler(request)
    except GatewayError as exc:
        return error_response(exc.status, exc.message, exc.code, exc.param)
    except RequestPayloadError as exc:  # a body that broke off or did not decode
        return error_response(400, f"request body could not be read: {exc}", "invalid_request_body")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = exc.reason
        if exc.status == 413:
            limit = request.app[STATE].settings.max_payload_size
            reason = f"request body exceeds max_payload_size ({limit} bytes)"
        return error_response(exc.status, f"{reason}: {request.method} {request.path}"
                              if exc.status in (404, 405) else reason,
                              {404: "unknown_url", 405: "method_not_allowed",
                               413: "payload_too_large"}.get(exc.status, "http_error"))
    except Exception as exc:
        # A bug of ours: log it with its traceback and answer in our JSON error shape, so a plain
        # aiohttp "Server got itself in trouble" 500 can only have come from a worker.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, f"internal gateway error: {type(exc).__name__}",
                              "internal_error")


def _middlewares(settings: Settings) -> list[Any]:
    """One middleware for every request: the admin guard, then the JSON error mapping (aiohttp
    runs each middleware as an extra coroutine per request, generation requests included, so
    the two share one)."""
    check = admin.auth_check_for(settings)
    if settings.cors_allowed_origins:
        return [_cors_middleware(CorsPolicy(settings.cors_allowed_origins), check)]

    @web.middleware
    async def admin_auth_then_errors(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        denied = check(request)
        if denied is not None:
            return denied
        return await error_middleware(request, handler)

    return [admin_auth_then_errors]


def _cors_middleware(cors: CorsPolicy, check: Callable[[web.Request], web.Response | None]
                     ) -> Any:
    """The middleware with `--cors-allowed-origins`: preflights answered first (a browser sends
    them without credentials), then the admin guard and errors, with CORS headers on the answer.
    Streams get theirs from dispatch before their headers go out (`GatewayState.cors`)."""

    @web.middleware
    async def cors_then_admin_auth_then_errors(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        preflight = cors.preflight(request)
        if preflight is not None:
            return preflight
        denied = check(request)
        response = denied if denied is not None else await error_middleware(request, handler)
        cors.decorate(request, response)
        return response

    return cors_then_admin_auth_then_errors


def _build_state(settings: Settings) -> GatewayState:
    registry = CollectorRegistry()
    breaker = BreakerConfig(
        failure_threshold=settings.cb_failure_threshold,
        success_threshold=settings.cb_success_threshold,
        timeout_secs=settings.cb_timeout_duration_secs,
        window_secs=settings.cb_window_duration_secs,
        enabled=not settings.disable_circuit_breaker,
    )
    workers = WorkerRegistry(breaker, settings.load_stale_secs,
                             shared_load=settings.load_view == "reported")
    added = [workers.add(spec.url, "prefill", spec.bootstrap_port) for spec in settings.prefill]
    added += [workers.add(url, "decode") for url in settings.decode]
    added += [workers.add(url, "regular") for url in settings.worker_urls]
    for worker in added:
        # Out of rotation until a health check passes (gateway/health.py), as the Rust router
        # does; with health checks disabled there is nothing to wait for.
        worker.healthy = settings.disable_health_check
    return GatewayState(settings=settings, registry=registry,
                        metrics=GatewayMetrics(registry), workers=workers)


async def _start_locality(state: GatewayState) -> None:
    if not (state.settings.zones or state.settings.calibration_log):
        return
    # Imported here so a gateway without --zones never loads the locality stack.
    from gateway.eldr.locality import start_locality

    locality = await start_locality(state.settings, state.registry)
    state.locality = locality
    state.decode_workers_changed()
    if state.settings.zones:
        state.tasks.append(asyncio.ensure_future(locality.runtime.watch()))


async def _metrics_site(state: GatewayState) -> web.AppRunner | None:
    settings = state.settings
    if settings.prometheus_port == 0:
        return None
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def serve_metrics(_: web.Request) -> web.Response:
        body = generate_latest(state.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    metrics_app = web.Application()
    metrics_app.router.add_get("/metrics", serve_metrics)
    runner = web.AppRunner(metrics_app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.prometheus_host, settings.prometheus_port,
                       reuse_port=settings.processes > 1)
    await site.start()
    server = getattr(site, "_server", None)
    sockets = getattr(server, "sockets", None) or []
    state.metrics_port = sockets[0].getsockname()[1] if sockets else settings.prometheus_port
    return runner


def create_app(settings: Settings, *, rng: random.Random | None = None,
               serve_metrics: bool = True) -> web.Application:
    """Build the gateway app. `serve_metrics=False` skips the Prometheus site (tests that run
    many apps in one process); `/metrics` on the main port is always available."""
    settings.validate()
    state = _build_state(settings)
    app = web.Application(client_max_size=settings.max_payload_size,
                          middlewares=_middlewares(settings))
    app[STATE] = state

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        # One TLS context (gateway/tls.py) for every worker connection, both clients below.
        tls = client_context(settings)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True,
                                         ssl=True if tls is None else tls)
        # The aiohttp session serves health checks, load polls and the info/flush fan-out; the
        # generation legs use `state.client` (gateway/http1.py). DummyCookieJar: workers are not
        # cookie-based and the Rust router keeps no cookie state.
        state.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              cookie_jar=aiohttp.DummyCookieJar(),
                                              json_serialize=lambda o: orjson.dumps(o).decode())
        state.client = Http1Pool(ssl_context=tls)
        if settings.dp_aware:
            # Before the locality stack maps zones onto decode workers: those are the ranks.
            for worker in list(state.workers):
                await dp.expand(state.workers, worker, state.session, state.upstream_headers(),
                                settings.health_check_timeout_secs)
        await _start_locality(state)
        locality = state.locality
        state.dispatcher = Dispatcher(
            settings, state.workers, state.client, state.metrics,
            prefill_policy=make_policy(settings.effective_prefill_policy, settings, rng=rng),
            decode_policy=make_policy(settings.effective_decode_policy, settings, rng=rng,
                                      locality=locality),
            regular_policy=make_policy(settings.policy if settings.policy != "eldr"
                                       else "least_load", settings, rng=rng),
            resolver=NullResolver() if locality is None else locality.resolver, rng=rng,
            hook=None if locality is None else locality.hook,
            eldr_metrics=None if locality is None else locality.metrics)
        headers = state.upstream_headers()
        state.health = HealthChecker(
            state.workers, state.session, state.metrics, settings.health_check_endpoint,
            settings.health_check_interval_secs, settings.health_check_timeout_secs,
            settings.health_failure_threshold, settings.health_success_threshold, headers)
        if not settings.disable_health_check:
            # Probed once before serving, so workers that are up serve the first request; the
            # others are probed in the background until they pass.
            workers = list(state.workers)
            admitted = await asyncio.gather(*(state.health.admit(w) for w in workers))
            for worker, ok in zip(workers, admitted, strict=True):
                if not ok:
                    log.warning("worker %s did not pass its first health check; out of "
                                "rotation until it does", worker.worker_id)
                    state.activate(worker, probe_now=False)
            state.tasks.append(asyncio.ensure_future(state.health.run()))
        if settings.load_poll_interval_secs > 0:
            poller = LoadPoller(state.workers, state.session, state.metrics,
                                settings.load_poll_interval_secs,
                                settings.health_check_timeout_secs, headers)
            state.tasks.append(asyncio.ensure_future(poller.run()))
        if settings.service_discovery:
            # Imported here so a gateway without --service-discovery never loads the client.
            from gateway.discovery import start_discovery

            await start_discovery(state)
        metrics_runner = await _metrics_site(state) if serve_metrics else None
        for worker in state.workers:
            state.metrics.record_health(worker.worker_id, worker.role, worker.healthy, True)
            state.metrics.record_circuit_state(worker.worker_id, worker.breaker.state)
        try:
            yield
        finally:
            for task in state.tasks:
                task.cancel()
            for task in state.tasks:
                with contextlib.suppress(BaseException):
                    await task
            state.tasks.clear()
            if metrics_runner is not None:
                await metrics_runner.cleanup()
            if state.dispatcher is not None:
                await state.dispatcher.close()  # abandons prefill legs still lingering
                hook = state.dispatcher.hook
                if hook is not None:
                    await asyncio.to_thread(hook.close)  # flushes queued records (bounded)
            await state.client.close()
            await state.session.close()

    app.cleanup_ctx.append(lifecycle)

    async def generation(request: web.Request) -> web.StreamResponse:
        dispatcher = state.dispatcher
        assert dispatcher is not None, "dispatcher is built in the app lifecycle"
        return await dispatcher.handle(request, request.path)

    for path in GENERATION_ENDPOINTS:
        app.router.add_post(path, generation)
    info.add_routes(app)
    admin.add_routes(app)
    return app

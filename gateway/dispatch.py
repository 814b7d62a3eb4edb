"""The one dispatch path: every generation endpoint goes through `Dispatcher.handle`.

    parse + validate body -> concurrency slot -> attempts (retry loop) -> relay -> metrics

An attempt is one *flow* opening a decode (or regular) answer whose status is 2xx:
- `dual` (stock SGLang, sgl-router `http/pd_router.rs`): choose the prefill AND the decode
  first, inject the same bootstrap fields into both bodies, POST both at once. Whichever leg
  fails first decides: a prefill error cancels the decode and is returned as is (transport
  errors 502), so a prefill 400 is answered at once rather than after the decode times out.
- `prefill-first` (the paper's flow; emulator extension in docs/wire-format.md): POST the prefill
  with `"prefill_first": true, "stream": false`, read its result, let the resolver turn it into
  a routing input, choose the decode, POST the decode with the same bootstrap room. A room whose
  decode never connects is freed with `POST /disaggregation/release`.
- `regular` (non-PD `--worker-urls`): one worker, one POST.
Batched requests fall back from prefill-first to dual (one prefill answer carries one signature).

The relay is shared by all flows: non-streaming answers are returned with the decode's status
and content type (re-encoded only when prefill input logprobs must be merged); streams are passed
through chunk by chunk without re-encoding unless a logprob merge needs SSE lines. A stream whose
upstream breaks after the client got the headers ends with an SSE `data: {"error": ...}` event
(SGLang's own in-stream error shape), since the status line was already sent.

Retries (new pair, new room) happen only before anything was sent to the client. In-flight counts
are held by `InFlight` guards inside a per-attempt `Cleanup` (a lean exit stack) that also cancels
the prefill leg and closes upstream responses, so client disconnects (handler cancellation)
release everything. In the dual flow only the prefill leg is a task: the decode leg is awaited in
the handler's own task, and a failing prefill interrupts it through a done-callback
(`_PrefillWatch`) instead of an `asyncio.wait` over two tasks per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from aiohttp import web

from gateway import bootstrap, dp
from gateway.config import Settings
from gateway.cors import CorsPolicy
from gateway.errors import (
    BadRequestError,
    NoWorkersError,
    OverloadedError,
    PayloadTooLargeError,
)
from gateway.http1 import Http1Pool, Response
from gateway.limiter import AdmissionRate, ConcurrencyLimiter
from gateway.loads import InFlight
from gateway.logprobs import merge_logprobs, merge_sse_line, prefill_logprobs_from_stream
from gateway.metrics import GatewayMetrics
from gateway.policies.request_text import routing_text
from gateway.resolver import NullResolver, RequestContext, ResultHook, RoutingResolver
from gateway.responses import sse_error_event
from gateway.retry import RetryConfig
from gateway.routing import NO_ROUTING_INPUT, Policy, RoutingInput, Selection
from gateway.upstream import (
    TRANSPORT_ERRORS,
    AttemptFailed,
    LegResult,
    UrlCache,
    close_response,
    is_handshake_failure,
    post_open,
    post_read,
)
from gateway.workers import Worker, WorkerRegistry

if TYPE_CHECKING:  # only with --zones does the app build one (gateway/eldr/locality.py)
    from gateway.eldr.metrics import EldrMetrics

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Client headers worth passing upstream (sgl-router `header_utils::should_forward_request_header`
# forwards auth and tracing headers and drops hop-by-hop ones).
FORWARDED_HEADERS = ("authorization", "x-request-id", "x-correlation-id", "traceparent",
                     "tracestate")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# After the client has the whole stream (or is gone), a dual-flow prefill answer that is still
# missing serves nobody. One that trails the decode's last chunk by milliseconds is normal (the
# prefill answers once its KV transfer is done), so it gets this long, off the client's path and
# outside the request's accounting, before the leg is abandoned (its connection closed).
PREFILL_LINGER_SECS = 0.5
# Freeing an unused prefill-first room is a best-effort bookkeeping call on a live prefill (the
# prefill also frees it on its own bootstrap timeout), so it gets a short, fixed bound.
ROOM_RELEASE_TIMEOUT_SECS = 5.0
# A stream still open when the shutdown grace period ends gets this error event before it is cut
# (SGLang's in-stream error shape), written within this long.
SHUTDOWN_EVENT = sse_error_event(503, "gateway shutting down; the stream was cut", "shutdown")
SHUTDOWN_WRITE_SECS = 1.0


@dataclass(slots=True)
class Opened:
    """A 2xx decode/regular answer ready to relay, plus what the relay needs around it."""

    response: Response
    worker: Worker
    selection: Selection | None
    prefill_task: asyncio.Task[LegResult] | None = None  # dual flow: may still be running
    prefill_result: LegResult | None = None  # prefill-first flow: already read
    first_chunk: bytes | None = None  # streams: read while racing the prefill


class Cleanup:
    """What one attempt must undo, run last-in first-out by `aclose()` on every exit path.

    A lean `AsyncExitStack` for the fixed cleanup set of an attempt (in-flight guards, upstream
    responses, the prefill leg): plain callables, no per-entry wrapper closures. As with the stack,
    every entry runs even when an earlier one raises, and the last exception raised propagates.
    """

    __slots__ = ("_items",)

    def __init__(self) -> None:
        # (callable, args, is_async)
        self._items: list[tuple[Callable[..., Any], tuple[Any, ...], bool]] = []

    def enter(self, guard: InFlight) -> InFlight:
        guard.__enter__()
        self._items.append((guard.release, (), False))
        return guard

    def callback(self, fn: Callable[..., Any], *args: Any) -> None:
        self._items.append((fn, args, False))

    def push_async(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self._items.append((fn, args, True))

    async def aclose(self) -> None:
        items = self._items
        error: BaseException | None = None
        while items:
            fn, args, is_async = items.pop()
            try:
                if is_async:
                    await fn(*args)
                else:
                    fn(*args)
            except BaseException as exc:
                if error is not None and exc.__context__ is None:
                    exc.__context__ = error
                error = exc
        if error is not None:
            raise error


@dataclass(slots=True, eq=False)  # identity: a key of Dispatcher._lingering
class _PrefillLeg:
    """The dual flow's prefill request: its task, its in-flight guard, and whether a late answer
    is worth waiting for (set once the decode has produced its first bytes)."""

    worker: Worker
    task: asyncio.Task[LegResult]
    guard: InFlight
    linger: bool = False


class _PrefillWatch:
    """Done-callback of the dual flow's prefill task. While armed (the handler task awaits a
    decode step), a failed prefill (transport error, timeout, non-2xx status) cancels the handler
    task; `Dispatcher._unless_prefill_fails` turns that cancellation into the prefill's error
    (`Task.uncancel`, so a client disconnect at the same moment still cancels)."""

    __slots__ = ("_handler", "armed", "fired", "task")

    def __init__(self, task: asyncio.Task[LegResult]) -> None:
        self.task = task
        self.armed = False
        self.fired = False
        handler = asyncio.current_task()
        assert handler is not None
        self._handler = handler
        task.add_done_callback(self._on_done)

    def uncancel(self) -> int:
        return self._handler.uncancel()

    def _on_done(self, task: asyncio.Task[LegResult]) -> None:
        if self.armed and not self.fired and _leg_failed(task):
            self.fired = True
            self._handler.cancel()


class Dispatcher:
    def __init__(self, settings: Settings, registry: WorkerRegistry,
                 client: Http1Pool, metrics: GatewayMetrics,
                 prefill_policy: Policy, decode_policy: Policy,
                 regular_policy: Policy, resolver: RoutingResolver | None = None,
                 rng: random.Random | None = None, hook: ResultHook | None = None,
                 eldr_metrics: EldrMetrics | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.client = client  # keep-alive HTTP/1.1 pool for the worker legs
        self.metrics = metrics
        self.policies = {"prefill": prefill_policy, "decode": decode_policy,
                         "regular": regular_policy}
        self.resolver: RoutingResolver = resolver or NullResolver()
        self.hook = hook
        self.eldr_metrics = eldr_metrics
        self.rng = rng or random.Random()
        self.retry = RetryConfig(
            max_attempts=settings.max_attempts,
            initial_backoff_ms=settings.retry_initial_backoff_ms,
            max_backoff_ms=settings.retry_max_backoff_ms,
            multiplier=settings.retry_backoff_multiplier,
            jitter_factor=settings.retry_jitter_factor,
        )
        self.cors = CorsPolicy(settings.cors_allowed_origins) \
            if settings.cors_allowed_origins else None
        self.limiter = ConcurrencyLimiter(settings.max_concurrent_requests, settings.queue_size,
                                          settings.queue_timeout_secs)
        rate = settings.rate_limit_tokens_per_second
        self.admission = None if rate is None else AdmissionRate(
            rate, settings.max_concurrent_requests if settings.max_concurrent_requests > 0
            else int(rate), settings.queue_size, settings.queue_timeout_secs)
        # The whole request's budget, retries included: each leg gets what is left of it, so a
        # hanging worker costs one request timeout, not one per attempt.
        self.timeout = settings.request_timeout_secs
        self.max_response = settings.max_response_size  # buffered (non-streaming) answers
        self._id_headers = tuple(h.lower() for h in settings.request_id_headers)
        # Per-request header loops, built once.
        self._request_id_names = (*self._id_headers, "x-request-id")
        self._forwarded_names = (*FORWARDED_HEADERS, *self._id_headers)
        self._urls = UrlCache()
        # Prefill legs left to finish after their request was answered (`_end_prefill_leg`),
        # with the timer that abandons each.
        self._lingering: dict[_PrefillLeg, asyncio.TimerHandle] = {}
        # Handler tasks of the requests in progress, for a graceful shutdown (`drain`).
        self._active: set[asyncio.Task[Any]] = set()
        self._cutting = False  # set when the grace period is over: streams end with an event

    async def drain(self, grace: float) -> int:
        """Shutdown: wait up to `grace` seconds for the requests in progress, then cancel the
        rest (a stream gets SHUTDOWN_EVENT first). Returns how many were cut."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._active and loop.time() < deadline:
            await asyncio.wait(set(self._active), timeout=deadline - loop.time())
        left = list(self._active)
        self._cutting = True
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=2 * SHUTDOWN_WRITE_SECS)
        return len(left)

    async def close(self) -> None:
        """Abandon the prefill legs still lingering (app shutdown)."""
        for leg in list(self._lingering):
            self._abandon_prefill(leg)
            await _cancel(leg.task)

    # ------------------------------------------------------------------ entry point
    async def handle(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        task = asyncio.current_task()
        if task is not None:
            self._active.add(task)
        try:
            ctx = await self._parse(request, endpoint, started)
            if self.admission is not None:
                await self.admission.admit()
            if self.limiter.enabled:
                async with self.limiter.slot():
                    response = await self._attempts(request, ctx)
            else:  # skip building a context manager per request when there is no limit
                response = await self._attempts(request, ctx)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except Exception as exc:
            status = getattr(exc, "status", 500)
            if isinstance(exc, OverloadedError):
                self.metrics.record_rejection(exc.reason)
            raise
        except asyncio.CancelledError:
            status = 499  # client closed the connection (nginx's convention)
            raise
        finally:
            self._active.discard(task)
            self.metrics.record_request(endpoint, status, time.perf_counter() - started)

    async def _parse(self, request: web.Request, endpoint: str, started: float) -> RequestContext:
        limit = self.settings.max_payload_size
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLargeError(
                f"request body is {request.content_length} bytes; max_payload_size is {limit}")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLargeError(
                f"request body exceeds max_payload_size ({limit} bytes)") from None
        if not raw:
            raise BadRequestError("request body is empty; expected a JSON object")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRequestError(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequestError(
                f"request body must be a JSON object, got {type(body).__name__}")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequestError("stream: must be a boolean", param="stream")
        if endpoint == "/v1/chat/completions" and not isinstance(body.get("messages"), list):
            raise BadRequestError("messages: required, must be an array", param="messages")
        if endpoint == "/v1/completions" and "prompt" not in body:
            raise BadRequestError("prompt: required", param="prompt")
        if endpoint == "/generate" and not any(k in body for k in
                                               ("text", "input_ids", "input_embeds")):
            raise BadRequestError("text or input_ids: one is required", param="text")
        n = body.get("n")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1
                              or n > bootstrap.MAX_BATCH):
            raise BadRequestError(f"n: must be an integer in 1..{bootstrap.MAX_BATCH}", param="n")
        batch = bootstrap.batch_size(body) if self.settings.pd_disaggregation else None
        request_id = None
        for name in self._request_id_names:
            request_id = request.headers.get(name)
            if request_id:
                break
        routing_key = None
        for name in self.settings.routing_key_headers:
            routing_key = request.headers.get(name)
            if routing_key:
                break
        return RequestContext(endpoint=endpoint, body=body, stream=stream,
                              return_logprob=body.get("return_logprob") is True, batch=batch,
                              started=started, request_id=request_id,
                              routing_key=routing_key or None)

    def _headers(self, request: web.Request) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        for name in self._forwarded_names:
            value = request.headers.get(name)
            if value is not None:
                # aiohttp keeps undecodable header bytes as lone surrogates, which cannot be
                # sent on: the client gets a 400 naming the header, not a failed encode.
                if not value.isascii() and not _utf8(value):
                    raise BadRequestError(f"header {name}: value is not valid UTF-8")
                headers[name] = value
        if self.settings.api_key:
            headers["authorization"] = f"Bearer {self.settings.api_key}"
        return headers

    # ------------------------------------------------------------------ retry loop
    async def _attempts(self, request: web.Request, ctx: RequestContext) -> web.StreamResponse:
        headers = self._headers(request)
        if self.hook is not None:
            ctx.upstream_body = self.hook.prepare(ctx)
        attempts = self.retry.max_attempts
        # 5xx answers not yet charged to their workers' breakers: a request that gets a 5xx from
        # every worker it tries is the request's fault (a client could otherwise open any
        # worker's circuit with a few crafted requests), one that another worker serves is the
        # failed worker's (`_settle_status_failures`).
        answered_5xx: list[AttemptFailed] = []
        for attempt in range(attempts):
            if attempt:
                self.metrics.record_retry(ctx.endpoint)
                await asyncio.sleep(self.retry.backoff_secs(attempt - 1, self.rng))
            stack = Cleanup()
            try:
                opened = await self._open(ctx, headers, stack)
            except AttemptFailed as failure:
                await stack.aclose()
                deferred = failure.kind == "status" and failure.status >= 500
                self._record_failure(failure, charge=not deferred)
                if deferred:
                    answered_5xx.append(failure)
                if failure.worker is not None:
                    ctx.failed_workers.add(failure.worker.worker_id)
                if failure.retryable and attempt + 1 < attempts and self._left(ctx) > 0:
                    log.info("attempt %d of %s failed (%s); retrying", attempt + 1,
                             ctx.endpoint, failure)
                    continue
                self._settle_status_failures(answered_5xx, served=False)
                return failure.response()
            except BaseException:
                await stack.aclose()
                raise
            self._settle_status_failures(answered_5xx, served=True)
            try:
                return await self._relay(request, ctx, opened)
            finally:
                await stack.aclose()
        raise AssertionError("unreachable: the last attempt returns")  # pragma: no cover

    def _left(self, ctx: RequestContext) -> float:
        """Seconds left of the request's timeout (a leg covers connect and its whole answer)."""
        return max(0.0, ctx.started + self.timeout - time.perf_counter())

    def _record_failure(self, failure: AttemptFailed, charge: bool = True) -> None:
        worker = failure.worker
        if worker is None:
            return
        self.metrics.record_upstream_error(worker.worker_id, worker.role,
                                           failure.kind if failure.kind != "status"
                                           else str(failure.status))
        # Only failures that say something about the worker's health count against its breaker:
        # a 4xx is the client's fault (the Rust router records failures for 5xx and transport).
        if charge and (failure.kind != "status" or failure.status >= 500):
            self._charge(worker)

    def _charge(self, worker: Worker) -> None:
        worker.breaker.record_failure()
        self.metrics.record_circuit_state(worker.worker_id, worker.breaker.state)

    def _settle_status_failures(self, failures: list[AttemptFailed], served: bool) -> None:
        """Charge a request's 5xx answers to their workers' breakers once its outcome is known:
        when another worker served it, or when it only ever met one worker (no way to tell
        whose fault it was, so the Rust router's rule: charge it). A request answered 5xx by
        two or more workers charges nobody."""
        workers = {f.worker.worker_id: f.worker for f in failures if f.worker is not None}
        if served or len(workers) == 1:
            for worker in workers.values():
                self._charge(worker)

    def _record_success(self, worker: Worker) -> None:
        worker.breaker.record_success()
        self.metrics.record_circuit_state(worker.worker_id, worker.breaker.state)

    # ------------------------------------------------------------------ selection
    def _select(self, role: str, routing: RoutingInput,
                ctx: RequestContext) -> tuple[Worker, Selection]:
        """Ask the role's policy for a worker among the available ones, leaving out the workers
        that failed this request's earlier attempts unless nothing else is left."""
        avoid = ctx.failed_workers
        workers = self.registry.available(role)
        if not workers:
            raise NoWorkersError(f"no available {role} workers (all unhealthy, circuit-open or "
                                 "none registered)")
        if avoid:
            others = [w for w in workers if w.worker_id not in avoid]
            workers = others or workers
        policy = self.policies[role]
        if policy.needs_request:
            routing = replace(routing, text=routing_text(ctx.endpoint, ctx.body),
                              routing_key=ctx.routing_key)
        views = self.registry.views(workers)
        started = time.perf_counter()
        selection = policy.select(views, routing)
        elapsed = time.perf_counter() - started
        worker = self.registry.find(selection.worker.worker_id)
        if worker is None:  # a policy returned something that is not a candidate: a bug
            raise AssertionError(f"policy {policy.name} chose unknown worker "
                                 f"{selection.worker.worker_id}")
        worker.breaker.trial_started()
        self.metrics.record_selection(role, policy.name, worker.worker_id)
        if role == "decode" and self.eldr_metrics is not None:
            self.eldr_metrics.record_decision(policy.name, routing.signature_source, selection,
                                              elapsed)
        return worker, selection

    # ------------------------------------------------------------------ flows
    async def _open(self, ctx: RequestContext, headers: dict[str, str],
                    stack: Cleanup) -> Opened:
        if not self.settings.pd_disaggregation:
            return await self._open_regular(ctx, headers, stack)
        if self.settings.pd_flow == "prefill-first" and ctx.batch is None:
            return await self._open_prefill_first(ctx, headers, stack)
        return await self._open_dual(ctx, headers, stack)

    async def _open_regular(self, ctx: RequestContext, headers: dict[str, str],
                            stack: Cleanup) -> Opened:
        worker, selection = self._select("regular", NO_ROUTING_INPUT, ctx)
        stack.enter(InFlight(worker, self.metrics))
        body = _encode(dp.with_ranks(_outgoing(ctx), worker))
        resp = await post_open(self.client, worker, self._urls.get(worker, ctx.endpoint), body,
                               headers, self._left(ctx))
        stack.callback(close_response, resp)
        opened = Opened(resp, worker, selection)
        if ctx.stream:
            opened.first_chunk = await self._read_first(opened, merge=False)
        return opened

    async def _open_dual(self, ctx: RequestContext, headers: dict[str, str],
                         stack: Cleanup) -> Opened:
        prefill, _ = self._select("prefill", NO_ROUTING_INPUT, ctx)
        decode_policy = self.policies["decode"]
        routing = (await self.resolver.resolve(ctx) if decode_policy.needs_signature
                   else NO_ROUTING_INPUT)
        ctx.signature_source = routing.signature_source
        decode, selection = self._select("decode", routing, ctx)
        if selection.release is not None:  # the policy's per-worker tracking ends with us
            stack.callback(selection.release)
        rooms = dp.rooms_for(bootstrap.new_rooms(ctx.batch, self.rng), prefill)
        injected = bootstrap.inject(_outgoing(ctx), prefill.url, prefill.bootstrap_port, rooms)
        body = _encode(dp.with_ranks(injected, prefill))
        # Without DP ranks (the default) both legs get the very same bytes.
        decode_body = (body if prefill.dp_rank is None and decode.dp_rank is None
                       else _encode(dp.with_ranks(injected, decode, prefill)))
        prefill_guard = InFlight(prefill, self.metrics).__enter__()
        prefill_task = asyncio.ensure_future(
            post_read(self.client, prefill, self._urls.get(prefill, ctx.endpoint), body, headers,
                      self._left(ctx), self.max_response))
        leg = _PrefillLeg(prefill, prefill_task, prefill_guard)
        # One cleanup entry owns the prefill task and its guard; it never waits for the leg.
        stack.callback(self._end_prefill_leg, leg)
        stack.enter(InFlight(decode, self.metrics))
        # The decode leg runs in this task; a failing prefill interrupts it (see _PrefillWatch).
        watch = _PrefillWatch(prefill_task)
        with _handshake_faults_to(prefill):
            resp = await self._unless_prefill_fails(
                post_open(self.client, decode, self._urls.get(decode, ctx.endpoint), decode_body,
                          headers, self._left(ctx)), watch, prefill)
        stack.callback(close_response, resp)
        opened = Opened(resp, decode, selection, prefill_task=prefill_task)
        if not ctx.stream or ctx.return_logprob:
            # The decode cannot finish without the prefill, and a merge needs its logprobs.
            self._check_prefill(prefill, await prefill_task)
            prefill_guard.release()
        if ctx.stream:
            # The decode's headers arrive before it has anything to say; only the first body
            # bytes prove the KV transfer happened. Waiting for them while the prefill may still
            # fail keeps "prefill failed" a clean error response instead of a broken 200 stream.
            opened.first_chunk = await self._unless_prefill_fails(
                self._read_first(opened, ctx.return_logprob), watch, prefill)
            # The KV transfer happened: a prefill still open should answer shortly, and its
            # outcome, unlike one already awaited above, is not known to the attempt.
            leg.linger = not prefill_task.done()
        return opened

    async def _unless_prefill_fails(self, step: Coroutine[Any, Any, _T], watch: _PrefillWatch,
                                    prefill: Worker) -> _T:
        """Await a decode step (its headers, its first bytes) in this task unless the prefill
        fails first: then the step is cancelled (which closes the decode connection) and the
        prefill's error is raised instead."""
        task = watch.task
        if task.done():
            if _leg_failed(task):  # failed before this step started: it never runs
                step.close()
                raise _prefill_error(prefill, task)
            return await step
        watch.armed = True
        try:
            result = await step
        except asyncio.CancelledError:
            if not watch.fired or watch.uncancel():
                raise  # cancelled from outside too (client gone): not ours to swallow
            raise _prefill_error(prefill, task) from None
        finally:
            watch.armed = False
        if watch.fired:  # the step finished although it was cancelled (the cancel was absorbed)
            watch.uncancel()
            if isinstance(result, Response):
                close_response(result)
            raise _prefill_error(prefill, task)
        return result

    async def _open_prefill_first(self, ctx: RequestContext, headers: dict[str, str],
                                  stack: Cleanup) -> Opened:
        prefill, _ = self._select("prefill", NO_ROUTING_INPUT, ctx)
        room = dp.rooms_for(bootstrap.new_rooms(None, self.rng), prefill)
        injected = bootstrap.inject(_outgoing(ctx), prefill.url, prefill.bootstrap_port, room)
        prefill_body = dict(dp.with_ranks(injected, prefill), prefill_first=True, stream=False)
        with InFlight(prefill, self.metrics):
            result = await post_read(self.client, prefill, self._urls.get(prefill, ctx.endpoint),
                                     _encode(prefill_body), headers, self._left(ctx),
                                     self.max_response)
        self._check_prefill(prefill, result)
        released = False

        async def release_room() -> None:
            if not released:
                await self._release_room(prefill, room, headers)

        stack.push_async(release_room)
        decode_policy = self.policies["decode"]
        routing = NO_ROUTING_INPUT
        if decode_policy.needs_signature:
            try:
                parsed = orjson.loads(result.body)
            except orjson.JSONDecodeError:
                parsed = None
            routing = self.resolver.from_prefill(ctx, parsed)
        ctx.signature_source = routing.signature_source
        decode, selection = self._select("decode", routing, ctx)
        if selection.release is not None:
            stack.callback(selection.release)
        stack.enter(InFlight(decode, self.metrics))
        with _handshake_faults_to(prefill):
            resp = await post_open(self.client, decode, self._urls.get(decode, ctx.endpoint),
                                   _encode(dp.with_ranks(injected, decode, prefill)), headers,
                                   self._left(ctx))
        released = True  # the decode connected: the room is consumed by it
        stack.callback(close_response, resp)
        opened = Opened(resp, decode, selection, prefill_result=result)
        if ctx.stream:
            opened.first_chunk = await self._read_first(opened, merge=ctx.return_logprob)
        return opened

    async def _release_room(self, prefill: Worker, room: int | list[int],
                            headers: dict[str, str]) -> None:
        body = orjson.dumps({"bootstrap_room": room})
        with contextlib.suppress(AttemptFailed):
            await post_read(self.client, prefill,
                            self._urls.get(prefill, "/disaggregation/release"), body, headers,
                            ROOM_RELEASE_TIMEOUT_SECS)

    def _check_prefill(self, prefill: Worker, result: LegResult) -> None:
        if not 200 <= result.status < 300:
            raise AttemptFailed.from_status(prefill, result.status, result.body,
                                            result.content_type)
        self._record_success(prefill)

    def _end_prefill_leg(self, leg: _PrefillLeg) -> None:
        """Attempt cleanup of a dual-flow prefill leg; it never holds up the client.

        Before the decode's first bytes (`leg.linger` False) the attempt itself reported the
        leg's outcome, or failed for another reason: an unfinished leg is cancelled at once.
        After them, the leg's outcome is news: recorded now if the leg is done, else after a
        background wait of at most `PREFILL_LINGER_SECS` (module constants), then abandoned.
        """
        task = leg.task
        if not leg.linger:
            if task.done():
                if not task.cancelled():
                    task.exception()  # retrieved: the attempt has dealt with it
            else:
                task.cancel()
            leg.guard.release()
        elif task.done():
            self._settle_prefill(leg)
        else:
            # A timer and a done-callback rather than a task per lingering leg: streams are
            # the common case and this runs for most of them.
            self._lingering[leg] = asyncio.get_running_loop().call_later(
                PREFILL_LINGER_SECS, self._abandon_prefill, leg)
            task.add_done_callback(lambda _: self._prefill_settled(leg))

    def _prefill_settled(self, leg: _PrefillLeg) -> None:
        timer = self._lingering.pop(leg, None)
        if timer is not None:  # answered in time
            timer.cancel()
            self._settle_prefill(leg)

    def _abandon_prefill(self, leg: _PrefillLeg) -> None:
        if self._lingering.pop(leg, None) is None:
            return
        log.info("prefill %s had not answered %.1fs after its decode's first bytes; leg "
                 "abandoned", leg.worker.worker_id, PREFILL_LINGER_SECS)
        leg.task.cancel()
        leg.guard.release()

    def _settle_prefill(self, leg: _PrefillLeg) -> None:
        """Record a finished prefill leg's outcome against its worker; release its guard."""
        leg.guard.release()
        task = leg.task
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, AttemptFailed):
            self._record_failure(exc)
            return
        if exc is None:
            try:
                self._check_prefill(leg.worker, task.result())
            except AttemptFailed as failure:
                self._record_failure(failure)

    async def _read_first(self, opened: Opened, merge: bool) -> bytes:
        try:
            if merge:
                return await opened.response.readline()
            return await opened.response.readany()
        except TRANSPORT_ERRORS as exc:
            raise AttemptFailed.from_exception(opened.worker, exc) from exc

    # ------------------------------------------------------------------ relay
    async def _relay(self, request: web.Request, ctx: RequestContext,
                     opened: Opened) -> web.StreamResponse:
        if ctx.stream:
            return await self._relay_stream(request, ctx, opened)
        resp = opened.response
        try:
            data = await resp.read(self.max_response)
        except TRANSPORT_ERRORS as exc:
            failure = AttemptFailed.from_exception(opened.worker, exc)
            self._record_failure(failure)
            return failure.response()
        self._record_success(opened.worker)
        parsed: Any = None
        prefill = opened.prefill_result or _task_result(opened.prefill_task)
        if ctx.return_logprob and prefill is not None:
            parsed = _loads_or_none(data)
            if parsed is not None and merge_logprobs(_loads_or_none(prefill.body), parsed):
                data = orjson.dumps(parsed)
        if self.resolver.wants_decode_results or ctx.upstream_body is not None:
            if parsed is None:
                parsed = _loads_or_none(data)
            if parsed is not None:
                self._observe(ctx, opened, parsed)
                if self.hook is not None and ctx.upstream_body is not None and \
                        self._hook_result(ctx, opened, parsed):
                    data = orjson.dumps(parsed)
        return web.Response(body=data, status=resp.status,
                            content_type=resp.content_type or "application/json")

    def _hook_result(self, ctx: RequestContext, opened: Opened, parsed: Any) -> bool:
        assert self.hook is not None
        try:
            prefill = (_loads_or_none(opened.prefill_result.body)
                       if opened.prefill_result is not None else None)
            return self.hook.on_result(ctx, opened.worker.worker_id, opened.selection, parsed,
                                       prefill)
        except Exception:  # the calibration log must never fail a request that succeeded
            log.exception("result hook failed")
            return False

    def _observe(self, ctx: RequestContext, opened: Opened, parsed: Any) -> None:
        try:
            self.resolver.observe_decode(ctx, opened.worker.worker_id, opened.selection, parsed)
        except Exception:  # learning must never fail a request that already succeeded
            log.exception("resolver.observe_decode failed")

    async def _relay_stream(self, request: web.Request, ctx: RequestContext,
                            opened: Opened) -> web.StreamResponse:
        resp = opened.response
        out = web.StreamResponse(status=resp.status)
        out.content_type = resp.content_type or "text/event-stream"
        out.headers.update(SSE_HEADERS)
        if self.cors is not None:  # the middleware cannot add headers once they are sent
            self.cors.decorate(request, out)
        await out.prepare(request)
        merge_source: Any = None
        prefill = opened.prefill_result or _task_result(opened.prefill_task)
        if ctx.return_logprob and prefill is not None:
            merge_source = (prefill_logprobs_from_stream(prefill.body)
                            if prefill.content_type == "text/event-stream"
                            else _loads_or_none(prefill.body))
        transform: Callable[[bytes], bytes] | None = None
        if merge_source is not None:
            def transform(line: bytes) -> bytes:
                return merge_sse_line(merge_source, line)

        endpoint = ctx.endpoint
        last = ctx.started
        first = True
        chunk = opened.first_chunk or b""
        try:
            while chunk:
                now = time.perf_counter()
                if first:
                    self.metrics.record_ttft(endpoint, now - ctx.started)
                    first = False
                else:
                    self.metrics.record_itl(endpoint, now - last)
                last = now
                await out.write(transform(chunk) if transform else chunk)
                chunk = await (resp.readline() if transform else resp.readany())
        except TRANSPORT_ERRORS as exc:
            failure = AttemptFailed.from_exception(opened.worker, exc)
            self._record_failure(failure)
            log.warning("stream from %s broke: %s", opened.worker.worker_id, exc)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await out.write(sse_error_event(
                    failure.status, f"{opened.worker.role} worker {opened.worker.worker_id} "
                    f"broke off the stream: {type(exc).__name__}: {exc}", "upstream_error"))
                await out.write_eof()
            return out
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._cutting or task is None:
                raise  # the client left
            # Shutdown (`drain`): end the stream properly, with an event that says why.
            task.uncancel()
            with contextlib.suppress(ConnectionError, RuntimeError, asyncio.TimeoutError):
                await asyncio.wait_for(out.write(SHUTDOWN_EVENT), SHUTDOWN_WRITE_SECS)
                await asyncio.wait_for(out.write_eof(), SHUTDOWN_WRITE_SECS)
            return out
        self._record_success(opened.worker)
        await out.write_eof()
        return out


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _outgoing(ctx: RequestContext) -> dict[str, Any]:
    return ctx.upstream_body if ctx.upstream_body is not None else ctx.body


def _encode(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError as exc:
        # orjson reads 1024 levels of nesting but writes only 254: reject rather than fail late.
        raise BadRequestError(f"request body cannot be forwarded: {exc}") from None


@contextlib.contextmanager
def _handshake_faults_to(prefill: Worker) -> Iterator[None]:
    """Around opening a decode leg: a failed bootstrap handshake is charged to the prefill (its
    bootstrap address is what failed), so breakers and the retry's avoidance hit the worker at
    fault (`is_handshake_failure`). What the client gets is unchanged."""
    try:
        yield
    except AttemptFailed as failure:
        if failure.worker is not prefill and is_handshake_failure(failure):
            raise failure.blamed_on(prefill) from None
        raise


def _task_result(task: asyncio.Task[LegResult] | None) -> LegResult | None:
    if task is None or not task.done() or task.cancelled() or task.exception() is not None:
        return None
    return task.result()


def _leg_failed(task: asyncio.Task[LegResult]) -> bool:
    """A finished prefill task that failed (transport error, timeout, non-2xx status)."""
    if task.cancelled():
        return False
    return task.exception() is not None or not 200 <= task.result().status < 300


def _prefill_error(prefill: Worker, task: asyncio.Task[LegResult]) -> BaseException:
    """What the client gets for a failed prefill (the exception `_check_prefill` raises)."""
    exc = task.exception()
    if exc is not None:
        return exc
    result = task.result()
    return AttemptFailed.from_status(prefill, result.status, result.body, result.content_type)


def _loads_or_none(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


async def _cancel(task: asyncio.Future[Any]) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(BaseException):
        await task

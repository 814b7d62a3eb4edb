"""HTTP surface of one emulated SGLang worker (sglang 0.5.23 `srt/entrypoints/http_server.py`).

`WorkerServer(config)` owns a `Worker` and one aiohttp site (plus, for a prefill, a second site
on the bootstrap port, both in the caller's event loop). Handler cancellation is on, so a client
that closes its connection aborts its request, as SGLang's disconnect checks do.
See docs/wire-format.md for every endpoint and field.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from loadtest.emulator import openai_api, sse
from loadtest.emulator.config import WorkerConfig
from loadtest.emulator.generate_input import GenerateItem, RequestError, parse_generate
from loadtest.emulator.pd import FAKE_BOOTSTRAP_HOST, LocalBootstraps, bootstrap_routes
from loadtest.emulator.worker import WORKER_KEY, GenerationError, InvalidRequestError, Worker

SGLANG_VERSION = "0.5.23"
# sglang 0.5.23 http_server.py: HEALTH_CHECK_TIMEOUT (SGLANG_HEALTH_CHECK_TIMEOUT, 20 s).
HEALTH_CHECK_TIMEOUT_S = 20.0
SERVER_KEY: web.AppKey[WorkerServer] = web.AppKey("server", object)  # type: ignore[arg-type]


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
                        status=status, content_type="application/json")


def error_response(status: int, message: str) -> web.Response:
    """SGLang's two non-stream error shapes (http_server.py).

    400 (ValueError): `_create_error_response` -> {"error": {"message": ...}}.
    Other codes (fastapi.HTTPException): the HTTPException handler's ErrorResponse
    {"object": "error", "message", "type": str(code), "param": null, "code"}.
    """
    if status == 400:
        return json_response({"error": {"message": message}}, status)
    return json_response({"object": "error", "message": message, "type": str(status),
                          "param": None, "code": status}, status)


def abort_chunk(item: GenerateItem, exc: GenerationError) -> dict[str, Any]:
    """A failed streaming request: SGLang yields the abort output, then `[DONE]`
    (tokenizer_manager._handle_abort_finish_reason returns `out` for streams)."""
    return {"text": "", "output_ids": [], "meta_info": {
        "id": item.rid,
        "finish_reason": {"type": "abort", "message": exc.message, "status_code": exc.status,
                          "err_type": None},
        "prompt_tokens": 0, "weight_version": "default", "num_retractions": 0,
        "reasoning_tokens": 0, "completion_tokens": 0, "cached_tokens": 0, "e2e_latency": 0.0,
    }}


async def run_all(worker: Worker, items: list[GenerateItem]) -> list[dict[str, Any]]:
    """Run a batch concurrently; the first failure cancels the rest (the request fails)."""
    if len(items) == 1:
        # The common case: no task or gather per request (a handler cancellation still
        # reaches the generator through the await).
        return [await worker.complete(items[0])]
    tasks = [asyncio.ensure_future(worker.complete(it)) for it in items]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


class WorkerServer:
    """A started worker with its listening sites; `async with` or start()/stop()."""

    def __init__(self, config: WorkerConfig, *,
                 local_bootstraps: LocalBootstraps | None = None) -> None:
        """`local_bootstraps`: shared by the workers of one in-process cluster (pd.py)."""
        self.config = config
        self.worker = Worker(config, local_bootstraps=local_bootstraps)
        self._local_bootstraps = local_bootstraps
        self._runners: list[web.AppRunner] = []
        self.port: int | None = None
        self.bootstrap_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    async def start(self) -> None:
        await self.worker.start()
        try:
            app = create_app(self)
            self.port = await self._serve(app, self.config.port)
            if self.config.role == "prefill":
                boot = web.Application()
                opts = self.config.engine
                boot.add_routes(bootstrap_routes(
                    self.worker.registry, opts.bootstrap_timeout_secs + opts.waiting_timeout_secs))
                self.bootstrap_port = await self._serve(boot, self.config.bootstrap_port or 0)
                if self._local_bootstraps is not None:
                    self._local_bootstraps.register(self.config.host, self.bootstrap_port,
                                                    self.worker.registry)
        except BaseException:
            await self.stop()
            raise

    async def _serve(self, app: web.Application, port: int) -> int:
        # handler_cancellation: a closed client connection cancels its handler (aiohttp >= 3.9
        # leaves it off by default), which is how disconnects abort requests here.
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.config.host, port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None
        return int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self._local_bootstraps is not None and self.bootstrap_port is not None:
            self._local_bootstraps.unregister(self.config.host, self.bootstrap_port)
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        await self.worker.stop()

    async def __aenter__(self) -> WorkerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(server: WorkerServer) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[WORKER_KEY] = server.worker
    app[SERVER_KEY] = server
    routes: list[tuple[str, str, Handler]] = [
        ("POST", "/generate", generate),
        ("PUT", "/generate", generate),
        ("GET", "/health", health),
        ("GET", "/health_generate", health_generate),
        ("GET", "/ready", health),
        ("GET", "/model_info", model_info),
        ("GET", "/get_model_info", model_info),
        ("GET", "/server_info", server_info),
        ("GET", "/get_server_info", server_info),
        ("GET", "/v1/models", models),
        ("GET", "/v1/loads", loads),
        ("GET", "/get_load", get_load),
        ("GET", "/flush_cache", flush_cache),
        ("POST", "/flush_cache", flush_cache),
        ("GET", "/metrics", metrics),
        ("GET", "/emulator/stats", emulator_stats),
        ("POST", "/disaggregation/release", release),
        ("POST", "/v1/chat/completions", openai_api.chat_completions),
        ("POST", "/v1/completions", openai_api.completions),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return app


async def read_json(request: web.Request) -> Any:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from exc


async def generate(request: web.Request) -> web.StreamResponse:
    worker = request.app[WORKER_KEY]
    try:
        items, batched = parse_generate(await read_json(request))
    except RequestError as exc:
        return error_response(400, str(exc))
    if items[0].stream:
        return await stream_generate(request, worker, items[0])
    try:
        outs = await run_all(worker, items)
    except GenerationError as exc:
        return error_response(exc.status, exc.message)
    return json_response(outs if batched else outs[0])


async def stream_generate(request: web.Request, worker: Worker, item: GenerateItem
                          ) -> web.StreamResponse:
    resp = await sse.open_stream(request)
    try:
        async with contextlib.aclosing(worker.generate(item)) as outs:
            async for out in outs:
                await resp.write(sse.event(out))
    except InvalidRequestError as exc:
        # http_server.py generate_request.stream_results: a ValueError becomes one error event.
        await resp.write(sse.event({"error": {"message": exc.message,
                                              "type": "invalid_request_error",
                                              "code": 400, "retryable": False}}))
    except GenerationError as exc:
        await resp.write(sse.event(abort_chunk(item, exc)))
    await resp.write(sse.DONE)
    await resp.write_eof()
    return resp


async def health(request: web.Request) -> web.Response:
    # sglang 0.5.23: /health answers 200 without generating unless
    # SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION is set; /ready is 200 once serving.
    return web.Response(status=200)


async def health_generate(request: web.Request) -> web.Response:
    """Generate one token; PD workers use the fake bootstrap host and room 0 (as SGLang)."""
    worker = request.app[WORKER_KEY]
    body: dict[str, Any] = {"input_ids": [0], "sampling_params": {"max_new_tokens": 1,
                                                                  "temperature": 0.0},
                            "rid": f"HEALTH_CHECK_{time.time_ns()}"}
    if worker.role != "regular":
        body.update(bootstrap_host=FAKE_BOOTSTRAP_HOST, bootstrap_room=0)
    items, _ = parse_generate(body)
    try:
        await asyncio.wait_for(worker.complete(items[0]), HEALTH_CHECK_TIMEOUT_S)
    except (asyncio.TimeoutError, GenerationError):
        return web.Response(status=503)
    return web.Response(status=200)


def served_model_name(worker: Worker) -> str:
    return worker.geometry.name


async def model_info(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    name = served_model_name(worker)
    return json_response({
        "model_path": name,
        "served_model_name": name,
        "tokenizer_path": name,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": "default",
        "load_format": "auto",
        "reasoning_parser": None,
        "tool_call_parser": None,
        "disaggregation_mode": "null" if worker.role == "regular" else worker.role,
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "model_type": "emulated_moe",
        "architectures": ["EmulatedMoEForCausalLM"],
        # Emulator extension: the routing shape, so clients can decode routed_experts.
        "expert_geometry": worker.geometry.to_dict(),
    })


async def server_info(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    worker = server.worker
    opts = worker.config.engine
    mode = "null" if worker.role == "regular" else worker.role
    return json_response({
        # A subset of ServerArgs as build_server_info returns them; the Rust router reads
        # dp_size / tp_size / disaggregation_mode / model_path from here.
        "model_path": served_model_name(worker),
        "served_model_name": served_model_name(worker),
        "host": worker.config.host,
        "port": server.port,
        # DP attention as sglang 0.5.23 reports it (server_args.py resolved_dict): the ranks are
        # `attn_dp_size` (`--dp-size N --enable-dp-attention` resolves to attn_dp_size N,
        # dp_size 1: arg_groups/parallel_hook.py), `enable_dp_attention` says whether
        # attention DP runs, and each rank is one GPU of the TP group (tp_size = ranks).
        # Routers must count ranks as dp_size * attn_dp_size (runtime_context.py
        # num_dp_ranks_of).
        "tp_size": worker.dp_size,
        "dp_size": 1,
        "attn_dp_size": worker.dp_size,
        "enable_dp_attention": worker.dp_size > 1,
        "pp_size": 1,
        # "auto" resolved as arg_groups/serving_hook.py handle_load_balance_method does.
        "load_balance_method": ("follow_bootstrap_room" if worker.role == "prefill"
                                else "round_robin"),
        "max_running_requests": opts.max_batch_size,
        "max_total_num_tokens": worker.max_total_num_tokens,
        "disaggregation_mode": mode,
        "disaggregation_transfer_backend": "emulated",
        "disaggregation_bootstrap_port": server.bootstrap_port,
        "enable_metrics": True,
        "enable_return_routed_experts": True,
        "disable_radix_cache": worker.prefix_cache is None,
        "page_size": 1,
        "enable_cache_report": opts.enable_cache_report,
        # One entry per DP rank (http_server.py server_info: "internal states per DP").
        "internal_states": [{"last_gen_throughput": worker.metrics.gen_throughput(
            None if worker.dp_size == 1 else rank)} for rank in range(worker.dp_size)],
        "startup_time": worker.started_at,
        "version": SGLANG_VERSION,
        "frontend": "python",
        "emulator": {"routing": opts.routing, "time_scale": opts.time_scale,
                     "instant": opts.instant, "prefill_first": opts.prefill_first,
                     "expert_geometry": worker.geometry.to_dict()},
    })


async def models(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    name = served_model_name(worker)
    return json_response({"object": "list", "data": [{
        "id": name, "object": "model", "created": int(worker.started_at), "owned_by": "sglang",
        "root": name, "parent": None, "max_model_len": worker.max_total_num_tokens}]})


async def loads(request: web.Request) -> web.Response:
    """sglang 0.5.23 `srt/entrypoints/v1_loads.py` get_loads (JSON format)."""
    worker = request.app[WORKER_KEY]
    include = request.query.get("include")
    raw_rank = request.query.get("dp_rank")
    dp_rank: int | None = None
    if raw_rank is not None:
        try:
            dp_rank = int(raw_rank)
        except ValueError:
            # FastAPI's query validation of `dp_rank: Optional[int]` (pydantic v2 shape).
            return json_response({"detail": [{
                "type": "int_parsing", "loc": ["query", "dp_rank"],
                "msg": "Input should be a valid integer, unable to parse string as an integer",
                "input": raw_rank}]}, 422)
    if dp_rank is None:
        snaps = worker.load_snapshots()
    elif 0 <= dp_rank < worker.dp_size:
        snaps = [worker.load_snapshot(dp_rank)]
    else:
        # tokenizer_control_mixin.py get_loads: an unknown rank gives an empty list.
        snaps = []
    if include:
        wanted = {s.strip() for s in include.split(",")}
        valid = {"core", "memory", "spec", "lora", "disagg", "queues", "all"}
        if not wanted <= valid:
            return error_response(400, f"Invalid include sections: {wanted - valid}. "
                                       f"Valid options: {sorted(valid)}")
        if "all" not in wanted:
            for snap in snaps:
                if "disagg" not in wanted:
                    snap.pop("disaggregation", None)
                if "queues" not in wanted:
                    snap.pop("queues", None)
    return json_response({
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "version": SGLANG_VERSION,
        "accelerator": None,
        # v1_loads.py _num_accelerators_per_dp_rank: tp * pp, divided by the DP ranks when
        # attention DP runs; one GPU per rank here either way.
        "num_accelerators": 1,
        "loads": snaps,
    })


async def get_load(request: web.Request) -> web.Response:
    # Pre-0.5 SGLang `GET /get_load` (removed from 0.5.23's http_server, still probed by
    # sglang-router's power-of-two policy): one dict per DP rank.
    snaps = request.app[WORKER_KEY].load_snapshots()
    return json_response([{"dp_rank": snap["dp_rank"], "num_reqs": snap["num_running_reqs"],
                           "num_waiting_reqs": snap["num_waiting_reqs"],
                           "num_tokens": snap["num_total_tokens"]} for snap in snaps])


async def flush_cache(request: web.Request) -> web.Response:
    """sglang 0.5.23 http_server.flush_cache: the scheduler resets the radix tree only when
    fully idle (scheduler.py flush_cache); otherwise 400 "Flush cache failed." (no `timeout`
    query: the emulator never defers a flush)."""
    worker = request.app[WORKER_KEY]
    if not worker.flush_cache():
        return web.Response(text="Flush cache failed.\n", status=400)
    return web.Response(text=(
        "Cache flushed.\nPlease check backend logs for more details. "
        "(When there are running or waiting requests, the operation will not be performed.)\n"))


async def metrics(request: web.Request) -> web.Response:
    body = request.app[WORKER_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def emulator_stats(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    stats = dataclasses.asdict(server.worker.decode_engine.stats())
    stats.update(role=server.worker.role, url=server.url,
                 prefix_cache=server.worker.prefix_cache_stats())
    return json_response(stats)


async def release(request: web.Request) -> web.Response:
    """Prefill-first extension: free a held KV before its hold time runs out."""
    worker = request.app[WORKER_KEY]
    try:
        body = await read_json(request)
    except RequestError as exc:
        return error_response(400, str(exc))
    room = body.get("bootstrap_room") if isinstance(body, dict) else None
    raw = room if isinstance(room, list) else [room]
    rooms: list[int] = [r for r in raw if isinstance(r, int) and not isinstance(r, bool)]
    if not rooms or len(rooms) != len(raw):
        return error_response(400, "'bootstrap_room' must be an integer or a list of integers")
    if worker.role != "prefill":
        return error_response(400, "/disaggregation/release is only served by prefill workers")
    released = [worker.registry.release(r) for r in rooms]
    # A batched request's rooms come as a list (as in its `bootstrap_room`); 404 only when
    # none of them was held.
    return json_response({"bootstrap_room": room,
                          "released": released if isinstance(room, list) else released[0]},
                         200 if any(released) else 404)

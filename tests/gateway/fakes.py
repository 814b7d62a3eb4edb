"""In-process fake SGLang workers for dispatch tests (real sockets on 127.0.0.1).

A `FakeWorker` answers the generation endpoints like SGLang does in shape only: non-streaming
answers are JSON with `meta_info` (echoing the bootstrap fields it received), streaming answers
are SSE `data:` chunks ending in `data: [DONE]`. Knobs make it fail, hang, or die mid-stream.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass
class FakeWorker:
    role: str  # "prefill" | "decode" | "regular"
    status: int = 200  # status for generation endpoints
    hang: bool = False  # never answer generation requests (until released)
    chunks: int = 3  # SSE data chunks per streaming answer
    die_after: int | None = None  # abort the connection after this many chunks
    healthy: bool = True
    load: int | None = 7
    chunk_delay: float = 0.0
    first_chunk_delay: float = 0.0  # streams: pause between the headers and the first chunk
    received: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    disconnects: int = 0  # hanging requests whose client closed the connection (SGLang aborts)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def app(self) -> web.Application:
        app = web.Application()
        for path in ("/generate", "/v1/chat/completions", "/v1/completions"):
            app.router.add_post(path, self.generate)
        app.router.add_get("/health", self.health)
        app.router.add_get("/health_generate", self.health)
        app.router.add_get("/v1/loads", self.loads)
        app.router.add_get("/server_info", self.info)
        app.router.add_get("/model_info", self.info)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/flush_cache", self.flush)
        app.router.add_post("/disaggregation/release", self.release)
        return app

    async def start(self) -> FakeWorker:
        self.server = TestServer(self.app(), host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        self.released.set()
        if self.server is not None:
            await self.server.close()

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def loads(self, _: web.Request) -> web.Response:
        if self.load is None:
            return web.Response(status=404)
        return web.json_response({"loads": [{"dp_rank": 0, "num_total_tokens": self.load}]})

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response({"role": self.role, "path": request.path,
                                  "model_path": "fake-moe"})

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-moe"}]})

    async def flush(self, _: web.Request) -> web.Response:
        return web.Response(text="Cache flushed.")

    async def release(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        self.received.append(await request.json())
        return web.json_response({"released": True})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(body)
        self.paths.append(request.path)
        self.connected.set()
        if self.hang:
            try:
                await self.released.wait()
            except asyncio.CancelledError:
                # The client closed the connection (TestServer cancels the handler then): SGLang
                # notices the same way and aborts the request.
                self.disconnects += 1
                raise
        if self.status != 200:
            return web.json_response({"error": {"message": f"{self.role} says {self.status}",
                                                "code": self.status}}, status=self.status)
        meta = {"id": "r", "role": self.role, "bootstrap_room": body.get("bootstrap_room"),
                "bootstrap_host": body.get("bootstrap_host"),
                "input_token_logprobs": [[-0.5, 1, None]] if self.role == "prefill" else
                [[-0.25, 2, None]]}
        if body.get("prefill_first"):
            meta["prompt_expert_counts"] = "AAAA"
        if not body.get("stream"):
            return web.Response(body=orjson.dumps({"text": f"hi from {self.role}",
                                                   "meta_info": meta}),
                                content_type="application/json")
        resp = web.StreamResponse()
        resp.content_type = "text/event-stream"
        await resp.prepare(request)
        if self.first_chunk_delay:  # prepare() has sent the headers
            await asyncio.sleep(self.first_chunk_delay)
        for i in range(self.chunks):
            if self.die_after is not None and i >= self.die_after:
                assert request.transport is not None
                request.transport.close()  # simulate a killed worker
                return resp
            chunk = {"text": f"t{i}", "meta_info": meta, "index": i}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def start_workers(*roles: str, **kwargs: Any) -> list[FakeWorker]:
    return [await FakeWorker(role, **kwargs).start() for role in roles]

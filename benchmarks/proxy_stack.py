"""Benchmark candidate stacks for a pass-through JSON proxy on loopback.

Why: the gateway's overhead is dominated by its HTTP server, HTTP client, event loop and JSON
library, so we choose them by measurement, not by reputation. Each candidate runs in its own
subprocess together with an in-process instant upstream (an aiohttp handler answering a fixed
small JSON body); a separate load-generator subprocess keeps `--concurrency` requests in flight
for `--duration` seconds and reports requests/s and p50/p99 latency. The proxy parses the JSON
body, adds the three bootstrap fields the real gateway injects, re-serialises it and forwards it,
so the JSON library is on the measured path.

Run:  python benchmarks/proxy_stack.py [--duration 5] [--concurrency 64]
Every process is bounded by the duration; the script prints one line per candidate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from loadtest.procs import free_port

REQUEST_BODY = json.dumps(
    {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8}}
).encode()
UPSTREAM_BODY = json.dumps(
    {"text": " Paris.", "meta_info": {"id": "x", "prompt_tokens": 6, "completion_tokens": 2}}
).encode()

CANDIDATES = (
    "direct",  # load generator -> upstream, no proxy: the floor
    "aiohttp+aiohttp+uvloop+orjson",
    "aiohttp+aiohttp+asyncio+orjson",
    "aiohttp+aiohttp+uvloop+json",
    "uvicorn(starlette,uvloop,h11)+aiohttp+orjson",
)


def _loads_dumps(use_orjson: bool) -> tuple[Callable[[bytes], Any], Callable[[Any], bytes]]:
    if use_orjson:
        import orjson

        return orjson.loads, orjson.dumps
    return json.loads, lambda obj: json.dumps(obj).encode()


async def _start_upstream(port: int) -> Any:
    from aiohttp import web

    async def handle(_: web.Request) -> web.Response:
        return web.Response(body=UPSTREAM_BODY, content_type="application/json")

    app = web.Application()
    app.router.add_post("/generate", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def _inject(obj: dict[str, Any]) -> dict[str, Any]:
    obj["bootstrap_host"] = "127.0.0.1"
    obj["bootstrap_port"] = None
    obj["bootstrap_room"] = 123456789
    return obj


async def _serve_aiohttp_proxy(port: int, up_port: int, use_orjson: bool, seconds: float) -> None:
    import aiohttp
    from aiohttp import web

    loads, dumps = _loads_dumps(use_orjson)
    upstream = await _start_upstream(up_port)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None), auto_decompress=False
    )
    url = f"http://127.0.0.1:{up_port}/generate"

    async def handle(request: web.Request) -> web.Response:
        body = dumps(_inject(loads(await request.read())))
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            data = await r.read()
            return web.Response(body=data, status=r.status, content_type="application/json")

    app = web.Application()
    app.router.add_post("/generate", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await asyncio.sleep(seconds)
    await session.close()
    await runner.cleanup()
    await upstream.cleanup()


def _run_aiohttp_proxy(port: int, up_port: int, loop_kind: str, use_orjson: bool, s: float) -> None:
    if loop_kind == "uvloop":
        import uvloop

        uvloop.run(_serve_aiohttp_proxy(port, up_port, use_orjson, s))
    else:
        asyncio.run(_serve_aiohttp_proxy(port, up_port, use_orjson, s))


def _run_direct_upstream(port: int, seconds: float) -> None:
    import uvloop

    async def main() -> None:
        runner = await _start_upstream(port)
        await asyncio.sleep(seconds)
        await runner.cleanup()

    uvloop.run(main())


def _run_uvicorn_proxy(port: int, up_port: int, seconds: float) -> None:
    import aiohttp
    import orjson
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    state: dict[str, Any] = {}
    url = f"http://127.0.0.1:{up_port}/generate"

    async def handle(request: Request) -> Response:
        body = orjson.dumps(_inject(orjson.loads(await request.body())))
        async with state["session"].post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as r:
            return Response(await r.read(), status_code=r.status, media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> Any:
        state["upstream"] = await _start_upstream(up_port)
        state["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await state["session"].close()
        await state["upstream"].cleanup()

    app = Starlette(routes=[Route("/generate", handle, methods=["POST"])], lifespan=lifespan)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, loop="uvloop", http="h11", log_level="error",
        access_log=False, backlog=1024,
    )
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.ensure_future(server.serve())
        await asyncio.sleep(seconds)
        server.should_exit = True
        await task

    import uvloop

    uvloop.run(main())


def _load(port: int, concurrency: int, warmup: float, duration: float, out: Any) -> None:
    import aiohttp
    import uvloop

    async def main() -> tuple[int, list[float], int]:
        url = f"http://127.0.0.1:{port}/generate"
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        # Wait (bounded) for the server under test to accept connections.
        for _ in range(200):
            try:
                async with session.post(url, data=REQUEST_BODY) as r:
                    await r.read()
                break
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
        latencies: list[float] = []
        errors = 0
        t_start = time.perf_counter()
        t_measure = t_start + warmup
        t_end = t_measure + duration

        async def worker() -> None:
            nonlocal errors
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    async with session.post(
                        url, data=REQUEST_BODY, headers={"Content-Type": "application/json"}
                    ) as r:
                        await r.read()
                        ok = r.status == 200
                except aiohttp.ClientError:
                    ok = False
                t1 = time.perf_counter()
                if t0 >= t_measure and t1 <= t_end:
                    if ok:
                        latencies.append(t1 - t0)
                    else:
                        errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await session.close()
        return len(latencies), latencies, errors

    n, lat, errors = uvloop.run(main())
    out.put((n / duration, lat, errors))


def run_candidate(name: str, concurrency: int, duration: float, warmup: float) -> dict[str, Any]:
    port, up_port = free_port(), free_port()
    life = warmup + duration + 3.0
    if name == "direct":
        server = mp.Process(target=_run_direct_upstream, args=(port, life))
    elif name.startswith("uvicorn"):
        server = mp.Process(target=_run_uvicorn_proxy, args=(port, up_port, life))
    else:
        _, _, loop_kind, json_kind = name.split("+")
        server = mp.Process(
            target=_run_aiohttp_proxy, args=(port, up_port, loop_kind, json_kind == "orjson", life)
        )
    server.start()
    out: Any = mp.Queue()
    loader = mp.Process(target=_load, args=(port, concurrency, warmup, duration, out))
    loader.start()
    rps, lat, errors = out.get(timeout=life + 30)
    loader.join(timeout=10)
    server.join(timeout=life + 10)
    if server.is_alive():
        server.terminate()
    lat.sort()
    return {
        "candidate": name,
        "rps": rps,
        "p50_ms": statistics.median(lat) * 1e3 if lat else float("nan"),
        "p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1e3 if lat else float("nan"),
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per candidate")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--only", nargs="*", default=None, help="subset of candidate names")
    args = p.parse_args(argv)
    names = args.only or list(CANDIDATES)
    print(f"# {args.concurrency} connections, {args.duration}s each, cpus={os.cpu_count()}")
    print(f"{'candidate':48s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>6s}")
    for name in names:
        r = run_candidate(name, args.concurrency, args.duration, args.warmup)
        print(
            f"{r['candidate']:48s} {r['rps']:9.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
            f"{r['errors']:6d}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Requests per second an `--instant` emulator cluster answers, and its CPU cost per request.

An instant cluster (cost model all zeros) is what router/gateway proxy benchmarks put behind the
proxy, so it must answer far faster than any proxy: this measures how fast it is on its own.

    python benchmarks/emulator_instant_throughput.py [--prefill 1 --decode 1] [--concurrency 64]
        [--requests 2000] [--repeat 3] [--max-new-tokens 8] [--routed-experts] [--prefill-first]
        [--routing token-hash] [--router]

Starts `python -m loadtest cluster --instant --json` as a subprocess (its own process, as in an
experiment), then drives non-streaming PD `/generate` requests at `--concurrency`: by default
straight at the workers (prefill and decode POSTed concurrently with the same bootstrap room, as
a PD router does); with `--router` through the Rust sglang-router
(`python -m sglang_router.launch_router --pd-disaggregation`, round robin) started as a second
subprocess. `--local-bootstrap` runs the cluster through this script's own launcher instead,
whose workers share one `pd.LocalBootstraps` (the decode collects the KV from an in-process
prefill without the loopback HTTP round trip; `python -m loadtest cluster` does not wire it
yet). Reports, per repeat: requests/s, client latency p50/p99, and the CPU seconds the
cluster process (and the router) spent per request (psutil; CPU per request is steadier than
req/s on a shared machine, where req/s also depends on what else runs).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from typing import Any

import aiohttp
import orjson
import psutil

from loadtest.procs import free_port

WORDS = ["court", "contract", "judge", "appeal", "statute", "translate", "sentence", "grammar",
         "summary", "article", "intent", "booking", "flight", "weather", "music", "recipe"]
STARTUP_TIMEOUT_S = 60.0


def make_body(rng: random.Random, args: argparse.Namespace) -> dict[str, Any]:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))
    body: dict[str, Any] = {"text": text, "stream": False,
                            "sampling_params": {"max_new_tokens": args.max_new_tokens,
                                                "ignore_eos": True}}
    if args.routed_experts:
        body["return_routed_experts"] = True
    return body


async def direct_request(session: aiohttp.ClientSession, info: dict[str, Any], i: int,
                         body: dict[str, Any], args: argparse.Namespace) -> None:
    prefill = info["prefill"][i % len(info["prefill"])]
    decode = info["decode"][i % len(info["decode"])]["url"]
    pd_body = {**body, "bootstrap_host": "127.0.0.1", "bootstrap_port": prefill["bootstrap_port"],
               "bootstrap_room": 10_000 + i}
    prefill_body = {**pd_body, "prefill_first": True} if args.prefill_first else pd_body

    async def post(url: str, payload: dict[str, Any]) -> None:
        async with session.post(url + "/generate", data=orjson.dumps(payload),
                                headers={"Content-Type": "application/json"}) as r:
            data = await r.read()
            if r.status != 200:
                raise RuntimeError(f"{url} answered {r.status}: {data[:200]!r}")

    if args.prefill_first:   # prefill answers first, then the decode collects the held KV
        await post(prefill["url"], prefill_body)
        await post(decode, pd_body)
    else:
        await asyncio.gather(post(prefill["url"], prefill_body), post(decode, pd_body))


async def router_request(session: aiohttp.ClientSession, router_url: str,
                         body: dict[str, Any]) -> None:
    async with session.post(router_url + "/generate", data=orjson.dumps(body),
                            headers={"Content-Type": "application/json"}) as r:
        data = await r.read()
        if r.status != 200:
            raise RuntimeError(f"router answered {r.status}: {data[:200]!r}")


async def one_round(info: dict[str, Any], router_url: str | None, args: argparse.Namespace,
                    procs: dict[str, psutil.Process], seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    bodies = [make_body(rng, args) for _ in range(args.requests)]
    latencies: list[float] = []
    next_index = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def client() -> None:
            nonlocal next_index
            while next_index < args.requests:
                i = next_index
                next_index += 1
                t0 = time.perf_counter()
                if router_url is None:
                    await direct_request(session, info, seed * 1_000_000 + i, bodies[i], args)
                else:
                    await router_request(session, router_url, bodies[i])
                latencies.append(time.perf_counter() - t0)

        cpu0 = {k: p.cpu_times() for k, p in procs.items()}
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        wall = time.perf_counter() - start
        cpu1 = {k: p.cpu_times() for k, p in procs.items()}
    out: dict[str, Any] = {
        "requests": len(latencies), "wall_s": round(wall, 3),
        "req_per_s": round(len(latencies) / wall, 1),
        "latency_p50_ms": round(statistics.median(latencies) * 1e3, 2),
        "latency_p99_ms": round(statistics.quantiles(latencies, n=100)[-1] * 1e3, 2),
    }
    for name in procs:
        used = (cpu1[name].user + cpu1[name].system) - (cpu0[name].user + cpu0[name].system)
        out[f"{name}_cpu_ms_per_req"] = round(used / len(latencies) * 1e3, 3)
    return out


async def wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/health",
                                       timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not become healthy within {timeout:.0f}s")


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


async def serve_local_cluster(args: argparse.Namespace) -> None:
    """The `--local-bootstrap` cluster: instant workers sharing one LocalBootstraps."""
    import signal

    from loadtest.emulator import blas  # noqa: F401  (before numpy loads)
    from loadtest.emulator.config import EngineOptions, WorkerConfig
    from loadtest.emulator.pd import LocalBootstraps
    from loadtest.emulator.server import WorkerServer

    local = LocalBootstraps()
    opts = EngineOptions(instant=True, routing=args.routing, model=args.model)
    servers: list[WorkerServer] = []
    stop_event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_event.set)
    try:
        for role, count in (("prefill", args.prefill), ("decode", args.decode)):
            for _ in range(count):
                server = WorkerServer(WorkerConfig(role=role, engine=opts),  # type: ignore[arg-type]
                                      local_bootstraps=local)
                await server.start()
                servers.append(server)
        info = {"prefill": [{"url": s.url, "bootstrap_port": s.bootstrap_port}
                            for s in servers[:args.prefill]],
                "decode": [{"url": s.url} for s in servers[args.prefill:]]}
        print(orjson.dumps(info).decode(), flush=True)
        await stop_event.wait()
    finally:
        for server in reversed(servers):
            await server.stop()


async def main_async(args: argparse.Namespace) -> int:
    cmd = [sys.executable, "-m", "loadtest", "cluster", "--prefill", str(args.prefill),
           "--decode", str(args.decode), "--base-port", "0", "--json", "--instant",
           "--routing", args.routing, "--model", args.model]
    if args.local_bootstrap:
        cmd = [sys.executable, __file__, "--serve-local-cluster", "--prefill", str(args.prefill),
               "--decode", str(args.decode), "--routing", args.routing, "--model", args.model]
    cluster = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
    router: asyncio.subprocess.Process | None = None
    try:
        assert cluster.stdout is not None
        info = orjson.loads(await asyncio.wait_for(cluster.stdout.readline(), STARTUP_TIMEOUT_S))
        procs = {"cluster": psutil.Process(cluster.pid)}
        router_url = None
        if args.router:
            port = free_port()
            rcmd = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
                    "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin",
                    "--log-level", "warn"]
            for p in info["prefill"]:
                rcmd += ["--prefill", p["url"], str(p["bootstrap_port"])]
            for d in info["decode"]:
                rcmd += ["--decode", d["url"]]
            router = await asyncio.create_subprocess_exec(
                *rcmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            router_url = f"http://127.0.0.1:{port}"
            await wait_healthy(router_url, STARTUP_TIMEOUT_S)
            procs["router"] = psutil.Process(router.pid)
        config = {k: getattr(args, k) for k in ("prefill", "decode", "concurrency", "requests",
                                                  "max_new_tokens", "routed_experts",
                                                  "prefill_first", "routing", "model", "router",
                                                  "local_bootstrap")}
        print(orjson.dumps({"config": config}).decode(), flush=True)
        await one_round(info, router_url, args, procs, seed=99)   # warm-up (caches, JIT-free)
        for r in range(args.repeat):
            result = await one_round(info, router_url, args, procs, seed=r)
            print(orjson.dumps({"repeat": r, **result}).decode(), flush=True)
    finally:
        if router is not None:
            await stop(router)
        await stop(cluster)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--prefill", type=int, default=1)
    ap.add_argument("--decode", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--routed-experts", action="store_true",
                    help="ask for return_routed_experts (forces expert routing)")
    ap.add_argument("--prefill-first", action="store_true",
                    help="send prefill_first to the prefill (it then routes the prompt)")
    ap.add_argument("--routing", default="token-hash", choices=("token-hash", "trace"))
    ap.add_argument("--model", default="Qwen3-30B-A3B")
    ap.add_argument("--router", action="store_true", help="go through the Rust sglang-router")
    ap.add_argument("--local-bootstrap", action="store_true",
                    help="cluster whose decodes collect KV from in-process prefills directly")
    ap.add_argument("--serve-local-cluster", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_local_cluster:
        import uvloop
        uvloop.run(serve_local_cluster(args))
        return 0
    if min(args.prefill, args.decode, args.concurrency, args.requests, args.repeat) < 1:
        ap.error("--prefill, --decode, --concurrency, --requests and --repeat must be >= 1")
    if args.router and args.prefill_first:
        ap.error("--prefill-first is a direct-drive option (the Rust router does not send it)")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())

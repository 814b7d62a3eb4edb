"""Gateway vs the Rust routers (PyPI sglang-router and smg), side by side in one run.

Setup: one PD upstream in its own process. `--upstream fake` (default): a minimal aiohttp prefill
and decode pair speaking SGLang's /generate shape that answer at once (no KV handshake), so the
routers, not the upstream, are the bottleneck. `--upstream emulator`: the SGLang PD emulator
(`python -m loadtest cluster --instant`), which implements the real bootstrap handshake; since
the emulator's instant path was sped up it serves a few hundred requests/s on 2 cores, still
several times the fake's cost per request, so it dilutes router overhead (use it to check the
routers against the real wire contract, the fake to compare router cost). Against it, in turn
and never at the same time (the machine may have only 2 cores):
  direct   no router: the load generator does the dual dispatch itself (same bootstrap room to
           prefill and decode, both POSTed at once); the reference for "added latency"
  gateway  python -m gateway (`--processes N`, SO_REUSEPORT when N > 1)
  rust     python -m sglang_router.launch_router --pd-disaggregation   (sglang-router)
  smg      python -m smg.launch_router --pd-disaggregation --disable-tokenizer-autoload
           (PyPI smg, a Rust router; it registers workers in the background after /health
           answers, so it is waited for on /readiness)
All routers use round_robin for prefill and decode, retries and health checks at defaults
(smg's worker overload protection and PD admission gate included; the fake upstream reports no
running window, so the gate never applies to it).
`--decode-policy P [P ...]` runs one gateway phase per decode policy instead (named
`gateway:P`); with `eldr` the gateway gets a zone table for the decode workers, built here:
Qwen3-30B-A3B geometry with every layer kept (48 x 128 = 6,144 dimensions), clustered centroids,
and a predictor so that every request is routed on a predicted signature. That is how the cost
of a locality decision is measured against the rest of the gateway's work per request:

    python benchmarks/gateway_vs_rust.py --decode 64 --only gateway \
        --decode-policy least_load eldr --repeat 3

Load, in a separate process: closed loop (`--concurrency` clients, each sending its next request
when the last answered; this saturates the slowest stage and gives the throughput ratio) or open
loop (`--rate` Poisson arrivals/s, at most `--concurrency` outstanding; latency from the scheduled
arrival; this gives added latency at a fixed moderate load). `--duration` seconds measured after
`--warmup`, non-streaming `/generate` (requests/s, p50/p99 latency) and streaming `/generate`
(requests/s, SSE chunks/s). Added latency = router p50/p99 minus direct p50/p99 of the same
round. `--repeat N` runs N interleaved rounds of direct/gateway/rust/smg and prints per-round
rows, medians and the gateway/rust and gateway/smg throughput ratios per round (`--only` picks
phases); the 1-minute load average is printed per phase, since on a shared machine the numbers
move with other jobs. `cpu us` is the router process's CPU time (user + system, its children
and threads included) per answered request over the phase, warm-up included: it moves much less
with other jobs than latency does.

Run:  python benchmarks/gateway_vs_rust.py [--duration 8] [--concurrency 64] [--rate 0]
      [--repeat 1] [--processes 1] [--upstream fake|emulator] [--only direct gateway rust smg]
Every phase and every subprocess is bounded; the script prints a table and, with --json, one JSON
line per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import orjson

from loadtest.procs import free_port

MAX_NEW_TOKENS = 8
STREAM_TOKENS = 16
PHASES = ("direct", "gateway", "rust", "smg")
# Rust baselines the gateway is compared with: phase name -> label in the ratio lines.
BASELINES = {"rust": "sglang-router", "smg": "smg"}


def _wait_http(url: str, timeout: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s")


@contextlib.contextmanager
def _process(cmd: list[str], log_path: str) -> Iterator[subprocess.Popen[bytes]]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _serve_fake_pd(ports: list[int], seconds: float) -> None:
    """Instant prefill (ports[0]) and decode (ports[1:]) workers in one uvloop process."""
    import logging

    import uvloop
    from aiohttp import web

    # The Rust router first tries an HTTP/2 prior-knowledge preface on new upstream connections;
    # aiohttp rejects it (400) and logs a traceback per connection, and the router then speaks
    # HTTP/1.1. Keep that noise out of the benchmark output.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    meta = {"id": "x", "prompt_tokens": 9, "completion_tokens": MAX_NEW_TOKENS,
            "finish_reason": {"type": "length", "length": MAX_NEW_TOKENS}}
    nonstream = orjson.dumps({"text": " jumps over", "meta_info": meta})

    async def generate(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        if not body.get("stream"):
            return web.Response(body=nonstream, content_type="application/json")
        resp = web.StreamResponse()
        resp.content_type = "text/event-stream"
        await resp.prepare(request)
        tokens = body.get("sampling_params", {}).get("max_new_tokens", 1)
        for i in range(tokens):
            await resp.write(b"data: " + orjson.dumps({"text": "t" * (i + 1), "meta_info": meta})
                             + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def loads(_: web.Request) -> web.Response:
        return web.json_response({"loads": [{"dp_rank": 0, "num_total_tokens": 0,
                                             "num_running_reqs": 0, "num_waiting_reqs": 0}]})

    async def info(_: web.Request) -> web.Response:
        return web.json_response({"model_path": "fake", "is_generation": True})

    async def main() -> None:
        runners = []
        for port in ports:
            app = web.Application()
            app.router.add_post("/generate", generate)
            for path in ("/health", "/health_generate"):
                app.router.add_get(path, ok)
            app.router.add_get("/v1/loads", loads)
            app.router.add_get("/get_load", loads)
            for path in ("/server_info", "/get_server_info", "/model_info", "/get_model_info"):
                app.router.add_get(path, info)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port, backlog=2048).start()
            runners.append(runner)
        await asyncio.sleep(seconds)
        for runner in runners:
            await runner.cleanup()

    uvloop.run(main())


def _load(target: dict[str, Any], stream: bool, concurrency: int, warmup: float,
          duration: float, rate: float, out: Any) -> None:
    """One load phase in its own process; puts a result dict on `out`.

    rate == 0: closed loop, `concurrency` clients each sending its next request when the last
    answered (saturates the slowest stage). rate > 0: open loop, Poisson arrivals at `rate`
    requests/s (seeded) with at most `concurrency` outstanding; latency counts from the
    scheduled arrival, so a router that falls behind is not flattered (no coordinated omission).
    """
    import aiohttp
    import uvloop

    body: dict[str, Any] = {"text": "The quick brown fox jumps over the lazy dog",
                            "sampling_params": {"max_new_tokens":
                                                STREAM_TOKENS if stream else MAX_NEW_TOKENS,
                                                "ignore_eos": True},
                            "stream": stream}
    encoded = orjson.dumps(body)
    hdrs = {"Content-Type": "application/json"}

    async def main() -> dict[str, Any]:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                        cookie_jar=aiohttp.DummyCookieJar())
        rng = random.Random(0)
        latencies: list[float] = []
        chunks = 0
        errors = 0
        skipped = 0
        completed = 0  # every answered request, warm-up included (CPU per request)
        t_measure = time.perf_counter() + warmup
        t_end = t_measure + duration

        async def one() -> tuple[bool, int]:
            if target["mode"] == "direct":
                # The client does the dual dispatch itself (same room in both legs, both POSTed
                # at once, as a PD router does): the reference "added latency" is measured
                # against, with the same upstream work per request as through a router.
                room = rng.randint(0, 2**63 - 1)
                sent = orjson.dumps(dict(body, bootstrap_host="127.0.0.1",
                                         bootstrap_port=target["bootstrap_port"],
                                         bootstrap_room=room))

                async def prefill() -> None:
                    async with session.post(target["prefill"] + "/generate", data=sent,
                                            headers=hdrs) as r:
                        await r.read()

                async def decode() -> tuple[bool, int]:
                    async with session.post(target["decode"] + "/generate", data=sent,
                                            headers=hdrs) as r:
                        data = await r.read()
                        return r.status == 200, data.count(b"data:")

                _, result = await asyncio.gather(prefill(), decode())
                return result
            async with session.post(target["url"] + "/generate", data=encoded,
                                    headers=hdrs) as r:
                data = await r.read()
                return r.status == 200, data.count(b"data:")

        def record(t0: float, t1: float, ok: bool, n: int) -> None:
            nonlocal chunks, errors, completed
            completed += 1
            if t0 >= t_measure and t1 <= t_end:
                if ok:
                    latencies.append(t1 - t0)
                    chunks += n
                else:
                    errors += 1

        async def timed(t0: float) -> None:
            try:
                ok, n = await asyncio.wait_for(one(), 30)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok, n = False, 0
            record(t0, time.perf_counter(), ok, n)

        async def client() -> None:
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                await timed(t0)

        async def open_loop() -> None:
            nonlocal skipped
            arrivals = random.Random(1)
            pending: set[asyncio.Task[None]] = set()
            due = time.perf_counter()
            while due < t_end:
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(pending) >= concurrency:
                    skipped += 1  # over the cap: the target is not keeping up with `rate`
                else:
                    task = asyncio.ensure_future(timed(due))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                due += arrivals.expovariate(rate)
            if pending:
                await asyncio.wait(pending, timeout=35)

        if rate > 0:
            await open_loop()
        else:
            await asyncio.gather(*(client() for _ in range(concurrency)))
        await session.close()
        latencies.sort()
        return {
            "rps": len(latencies) / duration,
            "chunks_per_s": chunks / duration,
            "p50_ms": statistics.median(latencies) * 1e3 if latencies else float("nan"),
            "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1e3 if latencies
            else float("nan"),
            "errors": errors, "ok": len(latencies), "skipped": skipped, "completed": completed,
        }

    out.put(uvloop.run(main()))


def run_load(target: dict[str, Any], stream: bool, args: argparse.Namespace) -> dict[str, Any]:
    queue: Any = mp.Queue()
    proc = mp.Process(target=_load, args=(target, stream, args.concurrency, args.warmup,
                                          args.duration, args.rate, queue))
    proc.start()
    result: dict[str, Any] = queue.get(timeout=args.warmup + args.duration + 90)
    proc.join(10)
    return result


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - platforms without getloadavg
        return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=64,
                   help="closed-loop clients, or the cap on outstanding requests with --rate")
    p.add_argument("--rate", type=float, default=0.0,
                   help="open-loop Poisson arrivals per second (0: closed loop)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of direct/gateway/rust/smg, interleaved; medians are reported")
    p.add_argument("--processes", type=int, default=1, help="gateway server processes")
    p.add_argument("--decode", type=int, default=1, help="emulated decode workers")
    p.add_argument("--only", nargs="*", choices=PHASES, default=list(PHASES),
                   help="phases to run: rust = sglang-router, smg = smg (default: all)")
    p.add_argument("--upstream", choices=("fake", "emulator"), default="fake")
    p.add_argument("--decode-policy", nargs="+", default=None,
                   choices=("round_robin", "least_load", "random", "power_of_two", "eldr"),
                   help="one gateway phase per decode policy (default: one, round_robin)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--log-dir", default="/tmp")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.duration <= 0 or args.concurrency < 1 or args.rate < 0:
        p.error("--repeat and --concurrency must be >= 1, --duration > 0, --rate >= 0")
    py = sys.executable
    base = free_port()
    with contextlib.suppress(Exception):  # pick a base with room for 2 + 2*decode ports
        while any(not _port_free(base + i) for i in range(2 + 2 * args.decode)):
            base = free_port()
    cluster_cmd = [py, "-m", "loadtest", "cluster", "--prefill", "1", "--decode",
                   str(args.decode), "--instant", "--base-port", str(base), "--json",
                   "--duration-secs", "900"]
    prefill_url = f"http://127.0.0.1:{base}"
    decode_urls = [f"http://127.0.0.1:{base + 1 + j}" for j in range(args.decode)]
    bootstrap_port = base + 1 + args.decode
    pd_args = ["--pd-disaggregation", "--prefill", prefill_url, str(bootstrap_port)]
    for url in decode_urls:
        pd_args += ["--decode", url]
    policies = args.decode_policy or ["round_robin"]
    zones_path = (_write_zone_table(decode_urls, os.path.join(args.log_dir, "bench_zones.json"))
                  if "eldr" in policies else None)
    phases: list[tuple[str, str | None]] = []
    for name in args.only:
        if name == "gateway" and args.decode_policy:
            phases += [(f"gateway:{policy}", policy) for policy in policies]
        else:
            phases.append((name, "round_robin" if name == "gateway" else None))
    results: list[dict[str, Any]] = []
    load = f"rate={args.rate}/s (open loop, cap {args.concurrency})" if args.rate else \
        f"concurrency={args.concurrency} (closed loop)"
    print(f"# cpus={os.cpu_count()} {load} duration={args.duration}s repeat={args.repeat} "
          f"gateway processes={args.processes} decode workers={args.decode} "
          f"upstream={args.upstream} loadavg(1m) at start={_loadavg():.2f}", flush=True)
    if args.upstream == "fake":
        upstream: Any = mp.Process(target=_serve_fake_pd,
                                   args=([base + i for i in range(1 + args.decode)], 3600.0),
                                   daemon=True)
        upstream.start()
        cm: Any = _terminating(upstream)
    else:
        cm = _process(cluster_cmd, os.path.join(args.log_dir, "bench_cluster.log"))
    with cm:
        _wait_http(prefill_url + "/health", 60)
        for url in decode_urls:
            _wait_http(url + "/health", 60)
        for round_ in range(args.repeat):
            for name, policy in phases:
                port = free_port()
                if name == "direct":
                    target = {"mode": "direct", "prefill": prefill_url,
                              "decode": decode_urls[0], "bootstrap_port": bootstrap_port}
                    ctx: Any = contextlib.nullcontext()
                elif name.startswith("gateway"):
                    target = {"mode": "router", "url": f"http://127.0.0.1:{port}"}
                    extra = ["--zones", str(zones_path)] if policy == "eldr" else []
                    ctx = _process([py, "-m", "gateway", *pd_args, "--host", "127.0.0.1",
                                    "--port", str(port), "--policy", "round_robin",
                                    "--decode-policy", str(policy), *extra,
                                    "--prometheus-port", str(free_port()), "--processes",
                                    str(args.processes), "--log-level", "warn"],
                                   os.path.join(args.log_dir, "bench_gateway.log"))
                else:
                    target = {"mode": "router", "url": f"http://127.0.0.1:{port}"}
                    module, extra = (("smg.launch_router", ["--disable-tokenizer-autoload"])
                                     if name == "smg" else ("sglang_router.launch_router", []))
                    ctx = _process([py, "-m", module, *pd_args,
                                    "--host", "127.0.0.1", "--port", str(port), "--policy",
                                    "round_robin", "--prometheus-port", str(free_port()),
                                    "--prometheus-host", "127.0.0.1", "--log-level", "warn",
                                    *extra],
                                   os.path.join(args.log_dir, f"bench_{name}.log"))
                with ctx as router_proc:
                    if target["mode"] == "router":
                        # smg's /health answers before its workers are registered.
                        ready = "/readiness" if name == "smg" else "/health"
                        _wait_http(target["url"] + ready, 60)
                    for stream in (False, True):
                        ticks = _cpu_ticks(router_proc.pid) if router_proc else None
                        r = run_load(target, stream, args)
                        cpu_us = float("nan")
                        if ticks is not None and r.get("completed"):
                            used = _cpu_ticks(router_proc.pid) - ticks
                            cpu_us = 1e6 * used / os.sysconf("SC_CLK_TCK") / r["completed"]
                        r.update(name=name, stream=stream, round=round_, loadavg=_loadavg(),
                                 cpu_us=cpu_us)
                        results.append(r)
                        if args.json:
                            print(orjson.dumps(r).decode(), flush=True)
    _print_table(results)
    print(f"# loadavg(1m) at end={_loadavg():.2f}", flush=True)
    return 0


def _write_zone_table(decode_urls: list[str], path: str) -> str:
    """A zone table for `decode_urls` at production size (module docstring) with a predictor;
    the same construction as benchmarks/eldr_decision.py's clustered data."""
    import numpy as np

    from zones.geometry import KNOWN_GEOMETRIES
    from zones.predictor import train_predictor
    from zones.signature import SignatureSpec
    from zones.table import make_table, save_table

    rng = np.random.default_rng(0)
    g = KNOWN_GEOMETRIES["Qwen3-30B-A3B"]
    spec = SignatureSpec(g, rng.uniform(0.1, 3.0, size=(g.num_layers, g.num_experts))
                         .astype(np.float32), np.ones(g.num_layers, dtype=bool))
    k = len(decode_urls)
    pref = np.zeros((k, g.num_layers, g.num_experts), dtype=bool)
    for zone in range(k):
        for layer in range(g.num_layers):
            pref[zone, layer, rng.choice(g.num_experts, size=16, replace=False)] = True
    rates = np.where(pref, 3.0, 0.3)
    centroids, ok = spec.build_many((rates * 100).astype(np.int64))
    assert ok.all()
    # Prompts of zone z use words of their own vocabulary, so the predictor has something to
    # learn; the benchmark's own prompt is ordinary English and lands wherever it lands.
    texts, sigs = [], []
    for i in range(8 * k):
        zone = i % k
        texts.append(" ".join(f"w{zone}x{j}" for j in rng.integers(0, 40, size=24)))
        sig = spec.build(rng.poisson(rates[zone]))
        sigs.append(sig if sig is not None else centroids[zone])
    predictor = train_predictor(texts, None, np.stack(sigs), num_buckets=2048, rank=32)
    save_table(make_table(spec, centroids, decode_urls, predictor=predictor), path)
    return path


@contextlib.contextmanager
def _terminating(proc: Any) -> Iterator[None]:
    try:
        yield
    finally:
        proc.terminate()
        proc.join(10)


def _cpu_ticks(pid: int) -> int:
    """User + system CPU ticks of a router process and its direct children (gateway
    `--processes N` forks its servers), all threads included; 0 where /proc is missing."""
    def stat(p: int | str) -> list[str] | None:
        try:
            with open(f"/proc/{p}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None

    total = 0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        fields = stat(entry)
        if fields is not None and (int(entry) == pid or int(fields[1]) == pid):
            total += int(fields[11]) + int(fields[12])
    return total


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _median(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return statistics.median(finite) if finite else float("nan")


def _print_table(results: list[dict[str, Any]]) -> None:
    """Per round: every phase; then medians over rounds (added latency and ratios are taken per
    round, against that round's direct phase and each Rust baseline, then the median of those)."""
    rounds = sorted({r["round"] for r in results})
    nan = float("nan")
    head = (f"{'round':>5s} {'phase':18s} {'mode':9s} {'req/s':>7s} {'chunks/s':>8s} "
            f"{'p50 ms':>7s} {'p99 ms':>7s} {'+p50 ms':>7s} {'+p99 ms':>7s} {'err':>4s} "
            f"{'skip':>4s} {'load':>5s} {'cpu us':>6s}")
    print(head)
    derived: list[dict[str, Any]] = []
    for rnd in rounds:
        mine = [r for r in results if r["round"] == rnd]
        direct = {r["stream"]: r for r in mine if r["name"] == "direct"}
        base = {b: {r["stream"]: r for r in mine if r["name"] == b} for b in BASELINES}
        for r in mine:
            d = direct.get(r["stream"])
            add50 = r["p50_ms"] - d["p50_ms"] if d and r["name"] != "direct" else nan
            add99 = r["p99_ms"] - d["p99_ms"] if d and r["name"] != "direct" else nan
            per_base: dict[str, float] = {}
            for b, by_stream in base.items():
                ru = by_stream.get(r["stream"])
                per_base[f"ratio_{b}"] = (r["rps"] / ru["rps"] if ru and ru["rps"] > 0 and
                                        r["name"].startswith("gateway") else nan)
            derived.append(dict(r, add50=add50, add99=add99, **per_base))
            print(f"{rnd:5d} {r['name']:18s} {'stream' if r['stream'] else 'non-strm':9s} "
                  f"{r['rps']:7.0f} {r['chunks_per_s']:8.0f} {r['p50_ms']:7.2f} "
                  f"{r['p99_ms']:7.2f} {add50:7.2f} {add99:7.2f} {r['errors']:4d} "
                  f"{r.get('skipped', 0):4d} {r['loadavg']:5.2f} "
                  f"{r.get('cpu_us', nan):6.0f}")
    print(f"# medians over {len(rounds)} round(s); gw/rust = gateway/sglang-router req/s, "
          f"gw/smg = gateway/smg req/s")
    print(f"{'phase':18s} {'mode':9s} {'req/s':>7s} {'chunks/s':>8s} {'p50 ms':>7s} "
          f"{'p99 ms':>7s} {'+p50 ms':>7s} {'+p99 ms':>7s} {'gw/rust':>7s} {'gw/smg':>7s} "
          f"{'cpu us':>6s}")
    names = list(dict.fromkeys(r["name"] for r in results))
    keys = ("rps", "chunks_per_s", "p50_ms", "p99_ms", "add50", "add99", "ratio_rust",
            "ratio_smg", "cpu_us")
    medians: dict[tuple[str, bool], dict[str, float]] = {}
    for name in names:
        for stream in (False, True):
            rows = [d for d in derived if d["name"] == name and d["stream"] == stream]
            if not rows:
                continue
            med = medians[name, stream] = {k: _median([float(d[k]) for d in rows]) for k in keys}
            print(f"{name:18s} {'stream' if stream else 'non-strm':9s} {med['rps']:7.0f} "
                  f"{med['chunks_per_s']:8.0f} {med['p50_ms']:7.2f} {med['p99_ms']:7.2f} "
                  f"{med['add50']:7.2f} {med['add99']:7.2f} {med['ratio_rust']:7.2f} "
                  f"{med['ratio_smg']:7.2f} {med['cpu_us']:6.0f}")
    for stream in (False, True):
        kind = "stream" if stream else "non-stream"
        for b, label in BASELINES.items():
            ratios = [d[f"ratio_{b}"] for d in derived if d["name"].startswith("gateway")
                      and d["stream"] == stream and d[f"ratio_{b}"] == d[f"ratio_{b}"]]
            if ratios:
                print(f"gateway/{label} throughput ratio ({kind}): median {_median(ratios):.2f} "
                      f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
        added = [f"{name} {med['add50']:.2f}" for (name, s), med in medians.items()
                 if s == stream and name != "direct" and med["add50"] == med["add50"]]
        if added:
            print(f"added p50 ms ({kind}): {', '.join(added)}")

if __name__ == "__main__":
    sys.exit(main())

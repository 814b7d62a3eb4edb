#!/usr/bin/env python3
"""Bounded loopback soak run: emulated PD cluster + gateway, minutes of mixed traffic.

What it does, all on 127.0.0.1 with ephemeral ports:
1. starts one prefill and `--decode` decode emulator workers, each its own
   `python -m loadtest.emulator` process (so one decode worker can be killed and restarted),
   and the gateway (`python -m gateway --pd-disaggregation ...`) as subprocesses;
2. runs `--minutes` of mixed traffic at `--concurrency`: /generate and /v1/chat/completions,
   streaming and not, clients that disconnect mid-stream, and malformed requests;
3. kills decode worker 0 (SIGKILL, like a crashed pod) at 1/3 of the run and restarts it on the
   same port `--restart-after` seconds later;
4. samples the gateway's RSS, open file descriptors and TCP connections (psutil) throughout, and
   again after traffic stops and in-flight requests drain;
5. polls the gateway's `/get_loads` after the last request until every worker's in-flight count
   is 0 (the time it takes is reported and must be under a second);
6. sends SIGTERM to the gateway and measures how long its graceful shutdown takes;
7. prints outcomes by kind (and separately those inside the restart window, where failures of
   requests pinned to the killed worker are expected), resource growth, whether the admin token
   appeared in any log, and writes everything as JSON to OUT/soak.json.

`--bad-bootstrap-prefill` adds a second prefill that the gateway is given with a wrong bootstrap
port (an operator's typo): its requests cannot hand over their KV, so their decodes fail and are
retried elsewhere, and the misconfigured prefill holds each room until its bootstrap timeout.
Answers from it may be 5xx (answered, not lost), but no request may hang or be lost.

Exit status: 0 when there were no unexpected failures outside the restart window (with
`--bad-bootstrap-prefill`, 5xx answers are tolerated; timeouts, broken connections and cut
streams are not), no bad request got a 5xx, no request took longer than the gateway's request
timeout, every in-flight count was back to 0 within 1 s of the last request, the gateway's RSS
grew by less than 20 MiB, the admin token never appeared in a log, and the gateway shut down
cleanly in time; 1 otherwise; 2 when the stack could not be started. Every wait is bounded, so
it stops by itself.

    python scripts/soak.py --minutes 2 --out runs/soak
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from loadtest.procs import free_port

HOST = "127.0.0.1"
# Outcome kinds that count as failures wherever they happen.
FAILURE_PREFIXES = ("http_5", "timeout", "connection_error", "incomplete_stream", "bad_body")
# Lost or hung requests: failures even where a worker is expected to answer with errors.
LOST_PREFIXES = ("timeout", "connection_error", "incomplete_stream", "bad_body")
DRAIN_LIMIT_S = 1.0  # every in-flight count back to 0 within this long of the last request
RSS_GROWTH_LIMIT_MB = 20.0
CLIENT_SLACK_S = 10.0  # the client's timeout beyond the gateway's request timeout
SLOWEST_SLACK_S = 1.0  # how far past its request timeout a request may end (scheduling)


@dataclass
class Proc:
    """A child process with its log file; restartable with the same command line."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        log = self.log_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # our signals reach only this child, not our own group
            )
        finally:
            log.close()
        self.starts += 1

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.kill()
            self.popen.wait(timeout=10)

    def terminate(self, grace_s: float) -> tuple[int | None, float]:
        """SIGTERM, wait up to grace_s, then SIGKILL. Returns (exit code, seconds to exit)."""
        if self.popen is None:
            return None, 0.0
        if self.popen.poll() is not None:
            return self.popen.returncode, 0.0
        t0 = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait(timeout=10)
        return code, time.monotonic() - t0


@dataclass
class Sample:
    t: float
    rss_mb: float
    fds: int
    connections: int


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    in_restart_window: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    slowest_s: float = 0.0  # any outcome


def sample_process(pid: int, t0: float) -> Sample | None:
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            rss = p.memory_info().rss / 2**20
            fds = p.num_fds()
            conns = len(p.net_connections(kind="tcp"))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return Sample(round(time.monotonic() - t0, 1), round(rss, 1), fds, conns)


async def wait_http_ok(
    session: aiohttp.ClientSession, url: str, timeout_s: float, proc: Proc
) -> None:
    """Poll url until it answers 200; fail early if the process died."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited (see {proc.log_path}) before {url} was ready")
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            last = type(e).__name__
        await asyncio.sleep(0.2)  # polling interval for a condition, not a fixed wait
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f}s ({last}); see {proc.log_path}")


PROMPTS = (
    "Summarise the following contract clause in plain words: the licensee shall not sublicense",
    "def fibonacci(n):\n    # return the n-th Fibonacci number iteratively\n",
    "Translate to German: the weather is nice today and we are going to the lake.",
    "Classify the intent of: I want to cancel my subscription before it renews next month.",
)


def build_request(kind: str, rng: random.Random) -> tuple[str, Any, bool]:
    """(path, json body or raw bytes, streams?) for one request kind."""
    prompt = rng.choice(PROMPTS) + f" [{rng.randrange(10**6)}]"
    max_tokens = rng.randint(4, 48)
    chat: dict[str, Any] = {
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
    }
    gen: dict[str, Any] = {"text": prompt, "sampling_params": {"max_new_tokens": max_tokens}}
    if kind == "generate":
        return "/generate", gen, False
    if kind == "generate_stream":
        return "/generate", {**gen, "stream": True}, True
    if kind == "chat":
        return "/v1/chat/completions", chat, False
    if kind in ("chat_stream", "disconnect"):
        return "/v1/chat/completions", {**chat, "stream": True}, True
    if kind == "bad_json":
        return "/v1/chat/completions", b'{"model": "default", "messages": [', False
    if kind == "bad_field":
        return "/v1/chat/completions", {"model": "default", "messages": "not-a-list"}, False
    raise ValueError(f"unknown request kind {kind!r}")


MIX: tuple[tuple[str, float], ...] = (
    ("generate", 0.2),
    ("generate_stream", 0.2),
    ("chat", 0.2),
    ("chat_stream", 0.2),
    ("disconnect", 0.1),
    ("bad_json", 0.05),
    ("bad_field", 0.05),
)


async def one_request(
    session: aiohttp.ClientSession, base: str, kind: str, rng: random.Random, token: str,
    request_timeout_s: float,
) -> str:
    path, body, streams = build_request(kind, rng)
    # The admin token rides along on data-plane requests too, so the log check below would see
    # it if the gateway logged request headers.
    headers = {"Authorization": f"Bearer {token}"}
    kwargs: dict[str, Any] = {"headers": headers}
    if isinstance(body, bytes):
        kwargs["data"] = body
        headers["Content-Type"] = "application/json"
    else:
        kwargs["json"] = body
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    try:
        async with session.post(base + path, timeout=timeout, **kwargs) as r:
            if kind.startswith("bad_"):
                await r.read()
                if 400 <= r.status < 500:
                    return "bad_request_4xx"
                return f"http_{r.status}_for_bad_request"
            if r.status != 200:
                await r.read()
                return f"http_{r.status}"
            if not streams:
                data = await r.json(content_type=None)
                ok = isinstance(data, (dict, list))
                return "ok" if ok else "bad_body"
            chunks = 0
            saw_done = False
            async for line in r.content:
                if not line.strip():
                    continue
                chunks += 1
                if line.strip() == b"data: [DONE]":
                    saw_done = True
                if kind == "disconnect" and chunks >= 2:
                    # Leave mid-stream: the gateway must abort the upstream pair and free the
                    # worker's slot; leaks show up as fd/connection growth.
                    r.close()
                    return "client_disconnect"
            if kind == "disconnect":
                return "client_disconnect_late"  # stream ended before we could leave
            return "ok" if saw_done else "incomplete_stream"
    except asyncio.TimeoutError:
        return "timeout"
    except aiohttp.ClientPayloadError:
        return "incomplete_stream"
    except aiohttp.ClientError as e:
        return f"connection_error_{type(e).__name__}"


async def traffic(
    base: str, deadline: float, concurrency: int, seed: int, token: str, tally: Tally,
    in_window: Callable[[], bool], request_timeout_s: float,
) -> None:
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < deadline:
                kind = rng.choices(kinds, weights)[0]
                window = in_window()
                t0 = time.monotonic()
                outcome = await one_request(session, base, kind, rng, token, request_timeout_s)
                window = window or in_window()
                tally.outcomes[outcome] += 1
                if window:
                    tally.in_restart_window[outcome] += 1
                took = time.monotonic() - t0
                tally.slowest_s = max(tally.slowest_s, took)
                if outcome == "ok":
                    tally.latencies_s.append(took)

        await asyncio.gather(*(client(i) for i in range(concurrency)))


def is_failure(outcome: str, errors_expected: bool = False) -> bool:
    """A failure of the gateway; with `errors_expected` (a misconfigured worker in the stack)
    only lost or hung requests count, not error answers."""
    return outcome.startswith(LOST_PREFIXES if errors_expected else FAILURE_PREFIXES)


async def drain_seconds(session: aiohttp.ClientSession, base: str, limit_s: float) -> float | None:
    """Seconds until the gateway reports no request in flight on any worker (`/get_loads`);
    None when that did not happen within `limit_s` (polled every 20 ms)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 <= limit_s:
        async with session.get(base + "/get_loads") as r:
            loads = await r.json()
        if all(w["in_flight"] == 0 for role in loads.values() for w in role):
            return round(time.monotonic() - t0, 3)
        await asyncio.sleep(0.02)  # polling a condition
    return None


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 4)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--minutes", type=float, default=1.0, help="traffic duration (default 1)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--decode", type=int, default=2, help="decode workers (>= 2 to survive restart)")
    p.add_argument("--restart-after", type=float, default=5.0,
                   help="seconds decode worker 0 stays down before it is restarted")
    p.add_argument("--policy", default="least_load", help="gateway --decode-policy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--startup-timeout", type=float, default=90.0)
    p.add_argument("--shutdown-grace", type=float, default=30.0)
    p.add_argument("--sample-every", type=float, default=2.0, help="psutil sampling period (s)")
    p.add_argument("--emulator-arg", action="append", default=[],
                   help="extra argument for every emulator worker (repeatable)")
    p.add_argument("--gateway-arg", action="append", default=[],
                   help="extra argument for the gateway (repeatable)")
    p.add_argument("--bad-bootstrap-prefill", action="store_true",
                   help="add a prefill given to the gateway with a wrong bootstrap port")
    p.add_argument("--out", type=Path, default=Path("runs/soak"), help="logs + soak.json")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.minutes > 24 * 60:
        p.error("--minutes must be in (0, 1440]")
    if args.concurrency < 1:
        p.error("--concurrency must be >= 1")
    if args.decode < 1:
        p.error("--decode must be >= 1")
    return args


async def run(args: argparse.Namespace) -> int:
    procs: list[Proc] = []
    try:
        return await _run(args, procs)
    finally:
        # Whatever happened (error, Ctrl-C), no child outlives the soak.
        for proc in procs:
            proc.kill()


async def _run(args: argparse.Namespace, procs: list[Proc]) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    token = secrets.token_hex(16)
    emu = [str(a) for a in args.emulator_arg]

    prefill_port, bootstrap_port = free_port(), free_port()
    prefill = Proc(
        "prefill",
        [py, "-m", "loadtest.emulator", "--role", "prefill", "--host", HOST,
         "--port", str(prefill_port), "--bootstrap-port", str(bootstrap_port), *emu],
        out / "prefill.log",
    )
    decodes = []
    for i in range(args.decode):
        port = free_port()
        decodes.append(Proc(
            f"decode-{i}",
            [py, "-m", "loadtest.emulator", "--role", "decode", "--host", HOST,
             "--port", str(port), *emu],
            out / f"decode-{i}.log",
        ))
    gw_port, prom_port = free_port(), free_port()
    decode_urls = [f"http://{HOST}:{d.argv[d.argv.index('--port') + 1]}" for d in decodes]
    gw_argv = [py, "-m", "gateway", "--pd-disaggregation",
               "--prefill", f"http://{HOST}:{prefill_port}", str(bootstrap_port)]
    extra_prefills = []
    if args.bad_bootstrap_prefill:
        bad_port = free_port()
        extra_prefills.append(Proc(
            "prefill-bad-bootstrap",
            [py, "-m", "loadtest.emulator", "--role", "prefill", "--host", HOST,
             "--port", str(bad_port), "--bootstrap-port", str(free_port()), *emu],
            out / "prefill-bad-bootstrap.log",
        ))
        # The gateway is told another port than the one this prefill's bootstrap server uses.
        gw_argv += ["--prefill", f"http://{HOST}:{bad_port}", str(free_port())]
    for u in decode_urls:
        gw_argv += ["--decode", u]
    gw_argv += ["--host", HOST, "--port", str(gw_port), "--prometheus-host", HOST,
                "--prometheus-port", str(prom_port), "--decode-policy", args.policy,
                "--request-timeout-secs", str(args.request_timeout),
                *[str(a) for a in args.gateway_arg]]
    gateway = Proc("gateway", gw_argv, out / "gateway.log",
                   env={**os.environ, "GATEWAY_ADMIN_TOKEN": token})
    base = f"http://{HOST}:{gw_port}"
    procs.extend([prefill, *extra_prefills, *decodes, gateway])

    tally = Tally()
    samples: list[Sample] = []
    events: list[dict[str, Any]] = []
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    t0 = time.monotonic()
    window: list[float] = []  # [start, end] of the decode restart window, monotonic seconds

    def in_window() -> bool:
        now = time.monotonic()
        return bool(window) and window[0] <= now <= (window[1] if len(window) > 1 else now)

    try:
        # Workers first, the gateway once they answer: a worker still starting when the gateway
        # probes it stays out of rotation until the next startup probe
        # (--worker-startup-check-interval, 30 s), and the soak's kill of the other decode
        # would then leave none (a harness race, not what the soak measures).
        for proc in procs:
            if proc is not gateway:
                proc.start()
        async with aiohttp.ClientSession() as s:
            for proc in [prefill, *extra_prefills, *decodes]:
                url = proc.argv[proc.argv.index("--port") + 1]
                await wait_http_ok(s, f"http://{HOST}:{url}/health", args.startup_timeout, proc)
            gateway.start()
            await wait_http_ok(s, base + "/readiness", args.startup_timeout, gateway)
        events.append({"t": round(time.monotonic() - t0, 1), "event": "stack ready"})
    except (RuntimeError, OSError) as e:
        print(f"soak: could not start the stack: {e}", file=sys.stderr)
        return 2

    assert gateway.popen is not None
    gw_pid = gateway.popen.pid
    duration = args.minutes * 60.0
    deadline = time.monotonic() + duration

    async def sampler() -> None:
        while time.monotonic() < deadline:
            smp = sample_process(gw_pid, t0)
            if smp is not None:
                samples.append(smp)
            await asyncio.sleep(args.sample_every)  # sampling period

    async def chaos() -> None:
        await asyncio.sleep(duration / 3)
        victim = decodes[0]
        window.append(time.monotonic())
        victim.kill()
        events.append({"t": round(time.monotonic() - t0, 1), "event": f"killed {victim.name}"})
        await asyncio.sleep(args.restart_after)
        victim.start()
        events.append({"t": round(time.monotonic() - t0, 1), "event": f"restarted {victim.name}"})
        async with aiohttp.ClientSession() as s:
            port = victim.argv[victim.argv.index("--port") + 1]
            try:
                await wait_http_ok(s, f"http://{HOST}:{port}/health", args.startup_timeout, victim)
                events.append({"t": round(time.monotonic() - t0, 1),
                               "event": f"{victim.name} healthy again"})
            except RuntimeError as e:
                events.append({"t": round(time.monotonic() - t0, 1), "event": str(e)})
        # The window closes once the gateway's health checker has had time to re-admit the
        # worker: requests routed meanwhile may still fail on the dead connection pool.
        await asyncio.sleep(min(10.0, duration / 6))
        window.append(time.monotonic())

    first = sample_process(gw_pid, t0)
    tasks = [asyncio.create_task(sampler())]
    if args.decode >= 2:
        tasks.append(asyncio.create_task(chaos()))
    else:
        events.append({"t": 0, "event": "restart skipped: needs --decode >= 2"})
    try:
        await asyncio.wait_for(
            # The client waits longer than the gateway's own timeout, so a request the gateway
            # fails to bound shows up as a client timeout (a lost request).
            traffic(base, deadline, args.concurrency, args.seed, token, tally, in_window,
                    args.request_timeout + CLIENT_SLACK_S),
            timeout=duration + args.request_timeout + 30,
        )
    except asyncio.TimeoutError:
        events.append({"t": round(time.monotonic() - t0, 1), "event": "traffic overran"})
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    events.append({"t": round(time.monotonic() - t0, 1), "event": "traffic stopped"})
    async with aiohttp.ClientSession() as s:
        drained_s = await drain_seconds(s, base, limit_s=5.0)

    # After traffic: let keep-alive connections and aborted upstreams settle, then sample once
    # more. Growth measured here (idle) is what indicates a leak.
    settle_deadline = time.monotonic() + 15
    after = sample_process(gw_pid, t0)
    while time.monotonic() < settle_deadline and after is not None and first is not None:
        if after.connections <= first.connections + 2:
            break
        await asyncio.sleep(0.5)
        after = sample_process(gw_pid, t0)

    gateway_alive_at_end = gateway.alive()
    code, shutdown_s = gateway.terminate(args.shutdown_grace)
    for proc in [prefill, *extra_prefills, *decodes]:
        proc.terminate(10)

    logs = "".join(p.log_path.read_text(errors="replace") for p in procs if p.log_path.exists())
    token_leaked = token in logs

    errors_expected = args.bad_bootstrap_prefill
    failures = {k: v for k, v in tally.outcomes.items() if is_failure(k, errors_expected)}
    in_win = dict(tally.in_restart_window)
    fail_outside = {
        k: v - tally.in_restart_window.get(k, 0) for k, v in failures.items()
        if v - tally.in_restart_window.get(k, 0) > 0
    }
    bad_5xx = {k: v for k, v in tally.outcomes.items() if k.endswith("_for_bad_request")}
    clean_shutdown = code == 0 and shutdown_s < args.shutdown_grace
    rss = [s.rss_mb for s in samples]
    # A leak grows with traffic; a connection pool plateaus. Quarter-by-quarter values tell the
    # two apart where the single start/end difference cannot.
    quarters = [samples[min(len(samples) - 1, (len(samples) * q) // 4)] for q in (1, 2, 3, 4)] \
        if samples else []
    report.update({
        "duration_s": round(duration, 1),
        "requests": sum(tally.outcomes.values()),
        "outcomes": dict(tally.outcomes),
        "outcomes_in_restart_window": in_win,
        "failures_outside_restart_window": fail_outside,
        "bad_requests_answered_5xx": bad_5xx,
        "slowest_request_s": round(tally.slowest_s, 2),
        "in_flight_drained_s": drained_s,
        "ok_latency_s": {"p50": percentile(tally.latencies_s, 0.5),
                         "p99": percentile(tally.latencies_s, 0.99)},
        "gateway_first": asdict(first) if first else None,
        "gateway_peak_rss_mb": max(rss) if rss else None,
        "gateway_after_drain": asdict(after) if after else None,
        "rss_growth_mb": round(after.rss_mb - first.rss_mb, 1) if first and after else None,
        "fd_growth": after.fds - first.fds if first and after else None,
        "by_quarter": [asdict(q) for q in quarters],
        "gateway_alive_at_end": gateway_alive_at_end,
        "gateway_exit_code": code,
        "gateway_shutdown_s": round(shutdown_s, 2),
        "admin_token_in_logs": token_leaked,
        "events": events,
        "samples": [asdict(s) for s in samples],
    })
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    print_report(report, out)
    rss_growth = report["rss_growth_mb"]
    ok = (not fail_outside and not bad_5xx and not token_leaked and clean_shutdown
          and gateway_alive_at_end
          and tally.slowest_s <= args.request_timeout + SLOWEST_SLACK_S
          and drained_s is not None and drained_s <= DRAIN_LIMIT_S
          and rss_growth is not None and rss_growth < RSS_GROWTH_LIMIT_MB)
    print(f"soak: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def print_report(r: dict[str, Any], out: Path) -> None:
    print(f"soak: {r['requests']} requests in {r['duration_s']:.0f}s")
    print("outcomes:")
    for k, v in sorted(r["outcomes"].items(), key=lambda kv: -kv[1]):
        win = r["outcomes_in_restart_window"].get(k, 0)
        print(f"  {k:<40} {v:>7}   (in restart window: {win})")
    print(f"failures outside restart window: {r['failures_outside_restart_window'] or 'none'}")
    print(f"bad requests answered 5xx:       {r['bad_requests_answered_5xx'] or 'none'}")
    lat = r["ok_latency_s"]
    print(f"ok latency p50/p99 (s):          {lat['p50']} / {lat['p99']}")
    print(f"slowest request (any outcome):   {r['slowest_request_s']} s")
    drained = r["in_flight_drained_s"]
    print(f"in flight back to 0 after:       "
          f"{'NOT within 5 s' if drained is None else f'{drained} s'}")
    f, a = r["gateway_first"], r["gateway_after_drain"]
    if f and a:
        print(f"gateway RSS MB  start {f['rss_mb']}  peak {r['gateway_peak_rss_mb']}  "
              f"after drain {a['rss_mb']}  growth {r['rss_growth_mb']}")
        print(f"gateway fds     start {f['fds']}  after drain {a['fds']}  growth {r['fd_growth']}")
        print(f"gateway tcp     start {f['connections']}  after drain {a['connections']}")
    if r["by_quarter"]:
        rows = "  ".join(f"{q['rss_mb']}MB/{q['fds']}fd/{q['connections']}tcp"
                         for q in r["by_quarter"])
        print(f"gateway by quarter of the run: {rows}")
    print(f"gateway shutdown: exit {r['gateway_exit_code']} in {r['gateway_shutdown_s']}s")
    print(f"admin token in logs: {'YES' if r['admin_token_in_logs'] else 'no'}")
    for e in r["events"]:
        print(f"  t={e['t']:>7}s  {e['event']}")
    print(f"details: {out / 'soak.json'}; logs in {out}/")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())

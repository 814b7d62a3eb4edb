"""`python -m loadtest demo`: an emulated PD cluster, a freshly fitted zone table and the gateway.

What `make demo` runs on a fresh clone. One run:
1. starts the emulated SGLang PD cluster (`python -m loadtest cluster`, one subprocess);
2. calibrates exactly as `loadtest compare` does (`compare.Experiment.calibrate`): the
   calibration split of the committed corpus goes through a least_load gateway with
   `return_routed_experts`, the decode results become a calibration log, and `python -m zones
   fit` turns it into a zone table (one zone per decode worker);
3. starts the real gateway (`python -m gateway --pd-disaggregation ... --decode-policy eldr
   --zones TABLE`) as a subprocess, waits until `/readiness` answers 200, and prints where to
   send requests (curl, the `openai` client) and where to watch the ELDR decisions;
4. runs until Ctrl-C / SIGTERM or `--duration-secs` (counted from "ready"), then stops the
   gateway and the cluster (SIGTERM to each process group, SIGKILL after a bounded grace).

Every artefact lands in the work directory (default `runs/demo-<UTC timestamp>/`): the
calibration log and zone table under `calibration/`, every child's output under `logs/`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.compare import (
    ClusterInfo,
    CompareError,
    CompareOptions,
    Experiment,
    worker_flags,
)
from loadtest.driver import DriverError
from loadtest.procs import ManagedProcess, ProcessStartError, free_port, python_argv
from loadtest.workloads import WorkloadError
from zones.geometry import GeometryError, geometry_by_name
from zones.table import ZoneTableError, load_table

DEFAULT_MODEL = "Qwen3-30B-A3B"
# The trace routing source replays DeepSeek-V2-Lite routing (esft_routing_shared.npz).
TRACE_MODEL = "DeepSeek-V2-Lite"
PD_FLOWS = ("dual", "prefill-first")
ROUTINGS = ("token-hash", "trace")
# Seconds to wait for each child to become ready (the cluster, each gateway).
STARTUP_TIMEOUT = 60.0
# The gateway drains in-flight requests for this long on SIGTERM (its own default, 180 s, is
# meant for production); ManagedProcess SIGKILLs after STOP_GRACE, so shutdown stays bounded.
GATEWAY_DRAIN_SECS = 5.0
STOP_GRACE = 10.0
EXAMPLE_PROMPT = "Explain in two sentences why a mixture-of-experts model routes tokens."


class DemoError(RuntimeError):
    """The demo cannot start; the message names the flag or the step that failed."""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    prefill: int = 2
    decode: int = 4
    model: str | None = None  # None: by routing (DEFAULT_MODEL, or TRACE_MODEL for trace)
    routing: str = "token-hash"
    # Slows the modelled H100 down 8x so that 6 workers in one Python process keep their clock
    # through the closed-loop calibration burst (32 requests in flight) on a shared 2-core box:
    # measured there, decode host lag was 0.40-0.50 of the modelled step time at scale 4 and
    # 0.04-0.05 at scale 8 (`/emulator/stats` host_lag_seconds_sum / step_seconds_sum). A
    # 32-token answer still streams in about a second (~30 ms per token at batch 1).
    time_scale: float = 8.0
    port: int = 30000
    prometheus_port: int = 29000
    pd_flow: str = "dual"
    calibration_requests: int = 96
    workdir: Path | None = None
    duration_secs: float | None = None
    seed: int = 0
    # Calibration outputs: short, so calibration takes seconds (zones need the decode's routed
    # experts, and 16-32 tokens per request already give hundreds of routing rows each).
    calibration_min_output_tokens: int = 16
    calibration_max_output_tokens: int = 32

    @property
    def model_name(self) -> str:
        if self.model is not None:
            return self.model
        return TRACE_MODEL if self.routing == "trace" else DEFAULT_MODEL

    def validate(self) -> None:
        """Raises DemoError naming the flag; nothing is started before this passes."""
        if self.prefill < 1:
            raise DemoError(f"--prefill must be >= 1, got {self.prefill}")
        if self.decode < 1:
            raise DemoError(f"--decode must be >= 1, got {self.decode}")
        if self.routing not in ROUTINGS:
            raise DemoError(f"--routing must be one of {', '.join(ROUTINGS)}")
        if self.pd_flow not in PD_FLOWS:
            raise DemoError(f"--pd-flow must be one of {', '.join(PD_FLOWS)}")
        if not self.time_scale > 0:
            raise DemoError(f"--time-scale must be > 0, got {self.time_scale}")
        for flag, port in (("--port", self.port), ("--prometheus-port", self.prometheus_port)):
            if not 0 <= port <= 65535:
                raise DemoError(f"{flag} must be in [0, 65535] (0: any free port), got {port}")
        if self.port and self.port == self.prometheus_port:
            raise DemoError("--port and --prometheus-port must differ")
        # Balanced k-means needs at least one calibration request per zone (decode worker).
        if self.calibration_requests < self.decode:
            raise DemoError(
                f"--calibration-requests must be >= --decode ({self.decode}): one zone per "
                f"decode worker, got {self.calibration_requests}"
            )
        if self.duration_secs is not None and not self.duration_secs > 0:
            raise DemoError(f"--duration-secs must be > 0, got {self.duration_secs}")
        try:
            geometry_by_name(self.model_name)
        except GeometryError as exc:
            raise DemoError(f"--model: {exc}") from exc


def compare_options(opts: DemoOptions, workdir: Path) -> CompareOptions:
    """The `loadtest compare` settings whose cluster start and calibration the demo reuses."""
    router = "gateway:eldr-prefill-first" if opts.pd_flow == "prefill-first" else "gateway:eldr"
    return CompareOptions(
        out=workdir,
        # compare's cluster start switches the prefill-first extension on only when a
        # prefill-first router is listed, so a dual-flow demo faces stock-SGLang behaviour.
        routers=[router],
        workload="trace" if opts.routing == "trace" else "task",
        prefill=opts.prefill,
        decode=opts.decode,
        model=opts.model_name,
        time_scale=opts.time_scale,
        calibration_requests=opts.calibration_requests,
        warmup=0,
        seed=opts.seed,
        min_output_tokens=opts.calibration_min_output_tokens,
        max_output_tokens=opts.calibration_max_output_tokens,
        calibration_max_duration=300.0,
        request_timeout=120.0,
        progress=False,
        startup_timeout=STARTUP_TIMEOUT,
    )


def gateway_argv(
    cluster: ClusterInfo, opts: DemoOptions, table: Path, port: int, prometheus_port: int
) -> list[str]:
    """The gateway command line, exactly what an operator would type."""
    return python_argv(
        "gateway",
        [
            "--pd-disaggregation",
            *worker_flags(cluster),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(prometheus_port),
            "--prefill-policy",
            "round_robin",
            "--decode-policy",
            "eldr",
            "--pd-flow",
            opts.pd_flow,
            "--zones",
            str(table),
            "--shutdown-grace-period-secs",
            str(GATEWAY_DRAIN_SECS),
        ],
    )


def check_port_free(flag: str, port: int) -> int:
    """The port itself, or a free one for 0; DemoError when it is taken (before any work)."""
    if port == 0:
        return free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise DemoError(
                f"{flag} {port} is not free on 127.0.0.1 ({exc.strerror}); "
                f"pick another, or 0 for any free port"
            ) from exc
    return port


@dataclass(frozen=True, slots=True)
class Ready:
    """What the banner shows; built from the running stack's own answers."""

    gateway_url: str
    metrics_url: str
    model_id: str
    zones: dict[str, Any]
    opts: DemoOptions
    workdir: Path
    table: Path
    fitted_on: int | None  # calibration requests the fit used (fit_stats.num_requests)
    startup_seconds: float
    steps: tuple[tuple[str, float], ...]


def curl_generate(url: str) -> str:
    body = {"text": EXAMPLE_PROMPT, "sampling_params": {"max_new_tokens": 32}}
    return (
        f"curl -s {url}/generate -H 'content-type: application/json' "
        f"-d {shlex.quote(json.dumps(body))}"
    )


def curl_chat_stream(url: str, model: str) -> str:
    body = {
        "model": model,
        "stream": True,
        "max_tokens": 32,
        "messages": [{"role": "user", "content": EXAMPLE_PROMPT}],
    }
    return (
        f"curl -sN {url}/v1/chat/completions -H 'content-type: application/json' "
        f"-d {shlex.quote(json.dumps(body))}"
    )


def openai_snippet(url: str, model: str) -> str:
    # No blank line inside: it pastes into an interactive Python prompt as is.
    return "\n".join(
        [
            "from openai import OpenAI",
            f'client = OpenAI(base_url="{url}/v1", api_key="unused")',
            "stream = client.chat.completions.create(",
            f'    model="{model}", stream=True, max_tokens=32,',
            f'    messages=[{{"role": "user", "content": "{EXAMPLE_PROMPT}"}}],',
            ")",
            "for chunk in stream:",
            "    if chunk.choices and chunk.choices[0].delta.content:",
            '        print(chunk.choices[0].delta.content, end="", flush=True)',
            "print()",
        ]
    )


def render_banner(r: Ready) -> str:
    o, z = r.opts, r.zones
    version = z.get("version") or "?"
    steps = ", ".join(f"{name} {secs:.1f}s" for name, secs in r.steps)
    lines = [
        "",
        f"ELDR gateway demo is ready (startup {r.startup_seconds:.1f}s: {steps})",
        "",
        f"  gateway URL   {r.gateway_url}",
        f"  metrics URL   {r.metrics_url}",
        f"  zones         {r.gateway_url}/zones  ({z.get('num_zones')} zones, version {version})",
        f"  cluster       {o.prefill} prefill + {o.decode} decode emulated workers, "
        f"{o.model_name}, {o.routing} routing, time scale {o.time_scale:g}, "
        f"{o.pd_flow} PD flow",
        f"  zone table    {r.table} (fitted on {r.fitted_on} calibration requests)",
        f"  logs          {r.workdir / 'logs'}/",
        "",
        "# SGLang /generate",
        curl_generate(r.gateway_url),
        "",
        "# OpenAI-compatible streaming chat",
        curl_chat_stream(r.gateway_url, r.model_id),
        "",
        "# Python (openai package)",
        openai_snippet(r.gateway_url, r.model_id),
        "",
        "# ELDR at work: decode decisions, signature sources, chosen workers",
        f"curl -s {r.metrics_url} | grep -E "
        "'^eldr_(decisions_total|signature_resolutions_total|worker_selections_total)'",
        "",
        "# Gateway log",
        f"tail -f {r.workdir / 'logs' / 'gateway.log'}",
        "",
    ]
    tail = "Stop with Ctrl-C."
    if o.duration_secs is not None:
        tail = f"Stops by itself after {o.duration_secs:g}s, or with Ctrl-C."
    lines.append(tail)
    return "\n".join(lines)


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        if resp.status != 200:
            raise DemoError(f"GET {url} answered {resp.status}: {(await resp.text())[:300]}")
        return await resp.json()


async def _describe(gateway_url: str) -> tuple[dict[str, Any], str]:
    """The active zone table (GET /zones) and the served model id (GET /v1/models)."""
    try:
        async with aiohttp.ClientSession() as session:
            zones = await _get_json(session, gateway_url + "/zones")
            models = await _get_json(session, gateway_url + "/v1/models")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise DemoError(f"the gateway at {gateway_url} stopped answering: {exc!r}") from exc
    if not isinstance(zones, dict) or not zones.get("active"):
        raise DemoError(f"the gateway started without an active zone table: {zones}")
    data = models.get("data") if isinstance(models, dict) else None
    model_id = data[0].get("id") if isinstance(data, list) and data else None
    return zones, str(model_id or "default")


def _fitted_on(table: Path) -> int | None:
    """How many calibration requests the fit actually used (failed requests give none)."""
    try:
        n = load_table(table).fit_stats.get("num_requests")
    except ZoneTableError:
        return None
    return n if isinstance(n, int) else None


class Demo:
    """Owns the children (through compare's Experiment and one ManagedProcess) until stop()."""

    def __init__(self, opts: DemoOptions, workdir: Path) -> None:
        self.opts = opts
        self.workdir = workdir
        self.experiment = Experiment(compare_options(opts, workdir))
        self.gateway: ManagedProcess | None = None

    async def start(self, say: Callable[[str], None]) -> Ready:
        o = self.opts
        port, prometheus_port = o.port, o.prometheus_port
        t0 = time.monotonic()
        steps: list[tuple[str, float]] = []

        def step(name: str, since: float) -> float:
            now = time.monotonic()
            steps.append((name, now - since))
            return now

        say(f"starting {o.prefill} prefill + {o.decode} decode emulated workers ({o.model_name})")
        cluster = await self.experiment.start_cluster()
        t = step("cluster", t0)
        say(f"calibrating: {o.calibration_requests} requests from the corpus's calibration split")
        table = await self.experiment.calibrate()
        t = step("calibration + zone fit", t)
        say(f"zone table {table}; starting the gateway (eldr, {o.pd_flow} flow)")
        self.gateway = ManagedProcess(
            "gateway",
            gateway_argv(cluster, o, table, port, prometheus_port),
            self.workdir / "logs" / "gateway.log",
        )
        # docs/eldr.md: pin BLAS to one thread in the gateway; the per-request similarity
        # product gains nothing from waking other cores.
        await self.gateway.start(env={"OPENBLAS_NUM_THREADS": "1"})
        url = f"http://127.0.0.1:{port}"
        await self.gateway.wait_http_ok(url + "/readiness", STARTUP_TIMEOUT)
        zones, model_id = await _describe(url)
        step("gateway", t)
        return Ready(
            gateway_url=url,
            metrics_url=f"http://127.0.0.1:{prometheus_port}/metrics",
            model_id=model_id,
            zones=zones,
            opts=o,
            workdir=self.workdir,
            table=table,
            fitted_on=_fitted_on(table),
            startup_seconds=time.monotonic() - t0,
            steps=tuple(steps),
        )

    async def wait_children(self, timeout: float | None) -> str | None:
        """Waits until a child exits on its own (returns which one and how) or `timeout`
        passes (returns None)."""
        procs = [("gateway", self.gateway), ("emulated cluster", self.experiment.cluster_proc)]
        waits = {
            asyncio.ensure_future(p.proc.wait()): name
            for name, p in procs
            if p is not None and p.proc is not None
        }
        try:
            done, _ = await asyncio.wait(
                waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                return None
            task = next(iter(done))
            return f"{waits[task]} exited with code {task.result()}"
        finally:
            for task in waits:
                task.cancel()

    async def stop(self) -> dict[str, int | None]:
        """Gateway first (it drains), then the cluster; each bounded by STOP_GRACE."""
        codes: dict[str, int | None] = {}
        if self.gateway is not None:
            codes["gateway"] = await self.gateway.stop(STOP_GRACE)
        if self.experiment.cluster_proc is not None:
            codes["cluster"] = await self.experiment.cluster_proc.stop(STOP_GRACE)
        return codes


async def _race(coro: Coroutine[Any, Any, Any], stop: asyncio.Event) -> tuple[bool, Any]:
    """(True, result) when `coro` finished first, (False, None) when `stop` was set first."""
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return True, task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False, None


async def run_demo(opts: DemoOptions, workdir: Path) -> int:
    def say(msg: str) -> None:
        print(f"demo: {msg}", file=sys.stderr, flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    demo = Demo(opts, workdir)
    status = 0
    try:
        finished, ready = await _race(demo.start(say), stop)
        if not finished:
            say("interrupted during start-up")
            return 130
        print(render_banner(ready), flush=True)
        finished, why = await _race(demo.wait_children(opts.duration_secs), stop)
        if finished and why is not None:
            say(f"error: {why}; see {workdir / 'logs'}")
            status = 1
        elif finished:
            say(f"--duration-secs {opts.duration_secs:g} elapsed")
    finally:
        say("stopping the gateway and the emulated cluster")
        t = time.monotonic()
        codes = await demo.stop()
        say(
            "stopped in {:.1f}s ({})".format(
                time.monotonic() - t, ", ".join(f"{k} exit {v}" for k, v in codes.items())
            )
        )
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return status


def default_workdir() -> Path:
    return Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S", time.gmtime())


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Start an emulated SGLang PD cluster, fit a zone table on calibration traffic, and run "
        "the ELDR gateway in front of it until Ctrl-C."
    )
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    d = DemoOptions()
    parser.add_argument("--prefill", type=int, default=d.prefill, help="prefill workers")
    parser.add_argument("--decode", type=int, default=d.decode, help="decode workers (= zones)")
    parser.add_argument(
        "--model",
        default=None,
        help=f"model geometry (unset: {DEFAULT_MODEL}, or {TRACE_MODEL} with --routing trace)",
    )
    parser.add_argument(
        "--routing", choices=ROUTINGS, default=d.routing, help="emulated expert routing source"
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=d.time_scale,
        help="slow the emulated GPUs down by this factor so this host keeps up",
    )
    parser.add_argument("--port", type=int, default=d.port, help="gateway port (0: any free)")
    parser.add_argument(
        "--prometheus-port",
        type=int,
        default=d.prometheus_port,
        help="gateway metrics port (0: any free)",
    )
    parser.add_argument("--pd-flow", choices=PD_FLOWS, default=d.pd_flow)
    parser.add_argument(
        "--calibration-requests",
        type=int,
        default=d.calibration_requests,
        help="calibration-split requests whose decode routing the zones are fitted on",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the zone table and logs go (default runs/demo-<UTC timestamp>)",
    )
    parser.add_argument(
        "--duration-secs",
        type=float,
        default=None,
        help="stop this long after the gateway is ready (default: until Ctrl-C/SIGTERM)",
    )
    parser.add_argument(
        "--seed", type=int, default=d.seed, help="calibration workload and zone fit seed"
    )


def resolve_ports(opts: DemoOptions) -> DemoOptions:
    """Fails now, before minutes of work, when a requested port is taken; 0 becomes a free
    port (racy by nature: another process may take it before the gateway binds)."""
    port = check_port_free("--port", opts.port)
    prometheus_port = check_port_free("--prometheus-port", opts.prometheus_port)
    while prometheus_port == port:  # two free_port() calls can coincide
        prometheus_port = free_port()
    return replace(opts, port=port, prometheus_port=prometheus_port)


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    opts = DemoOptions(
        prefill=args.prefill,
        decode=args.decode,
        model=args.model,
        routing=args.routing,
        time_scale=args.time_scale,
        port=args.port,
        prometheus_port=args.prometheus_port,
        pd_flow=args.pd_flow,
        calibration_requests=args.calibration_requests,
        workdir=args.workdir,
        duration_secs=args.duration_secs,
        seed=args.seed,
    )
    opts.validate()
    return opts


def main(args: argparse.Namespace) -> int:
    from loadtest.emulator.cluster import run_event_loop

    try:
        opts = resolve_ports(options_from_args(args))
        workdir = opts.workdir or default_workdir()
        workdir.mkdir(parents=True, exist_ok=True)
        status: int = 0

        async def go() -> None:
            nonlocal status
            status = await run_demo(opts, workdir)

        run_event_loop(go())
    except (DemoError, CompareError, ProcessStartError, WorkloadError, DriverError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return status

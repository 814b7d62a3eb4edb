"""`python -m loadtest compare`: routers side by side on an emulated PD cluster.

One run of this command:
1. starts the emulated cluster (`python -m loadtest cluster ... --json`) as a subprocess;
2. fits zones: drives the *calibration* split through our gateway (least_load policy, with
   `--calibration-log`), then runs `python -m zones fit` on that log (skipped with `--zones`);
3. for every rate and every router under test, starts the router, drives the *evaluation* split
   with the same seed (so every router sees the identical prompts and Poisson arrival times),
   snapshots `/emulator/stats` on every decode worker before and after, samples CPU, stops the
   router, and marks the run VOID when the host rather than the modelled cluster was the limit;
4. writes `results.json` and renders the report (`loadtest/report.py`).

With `--prefill-url URL [BOOTSTRAP_PORT|none]` / `--decode-url URL` no emulator is started: the
routers run in front of those already-running SGLang-compatible workers. Their
`/emulator/stats` is probed once; where a worker lacks it (real SGLang answers 404), the
emulator counters (distinct experts, batch, host lag) are recorded as unavailable and the
host-lag VOID rule does not apply. Calibration then needs SGLang started with
`--enable-return-routed-experts`, or a ready table via `--zones`.

Routers are named `gateway:POLICY` (our gateway, dual PD flow), `gateway:eldr-prefill-first`
(our gateway, prefill-first flow), `sglang:POLICY` (the Rust `sglang-router`) and `smg:POLICY`
(the Rust `smg`, `python -m smg.launch_router`, at its defaults bar tokenizer autoload; not in
the default list, since each router costs a full run: name them with `--routers`). Every router
uses the same prefill policy (`--prefill-policy`, default round_robin) so that only decode
selection differs. The cluster is started with prefill-first support whenever a prefill-first
router is under test; dual-flow routers never send the `prefill_first` field, so to them the
workers behave like stock SGLang.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from loadtest.calibration_capture import ROUTED_EXPERTS_BODY, write_calibration_log
from loadtest.cluster_stats import (
    ClusterRunStats,
    counters,
    decode_run_stats,
    unavailable_run_stats,
    void_reasons,
)
from loadtest.driver import DriverConfig, arrival_offsets, run_load, write_run
from loadtest.emulator.costmodel import CostModel
from loadtest.emulator.routing import make_routing_source
from loadtest.emulator.tokenizer import Tokenizer
from loadtest.procs import (
    CpuSampler,
    ManagedProcess,
    ProcessStartError,
    free_port,
    free_port_block,
    python_argv,
)
from loadtest.rate_plan import (
    RAMP_LIFETIMES,
    STEADY_STATE_LIFETIMES,
    RatePlan,
    plan_for_batch,
    sampled_distinct_experts,
)
from loadtest.workloads import (
    DEFAULT_CORPUS,
    DEFAULT_TRACES,
    KINDS,
    Conversation,
    WorkloadError,
    WorkloadSpec,
    build_workload,
    load_corpus,
)
from zones.geometry import GeometryError, geometry_by_name

DEFAULT_MODEL = "Qwen3-30B-A3B"
GATEWAY_POLICIES = ("random", "round_robin", "least_load", "power_of_two", "eldr")
SGLANG_POLICIES = ("random", "round_robin", "power_of_two", "cache_aware")
SMG_POLICIES = ("random", "round_robin", "least_load", "power_of_two", "cache_aware")
ROUTER_KINDS = ("gateway", "sglang", "smg")
# The default `--routers` list (smg is opt-in: each router costs a full run per rate).
ALL_ROUTERS = (
    *(f"gateway:{p}" for p in GATEWAY_POLICIES),
    "gateway:eldr-prefill-first",
    *(f"sglang:{p}" for p in SGLANG_POLICIES),
)
SMG_ROUTERS = tuple(f"smg:{p}" for p in SMG_POLICIES)
# Routers that use no locality signal: "best load-only router" in the report is the best of
# these at each rate (cache_aware routes on prefix locality).
LOAD_ONLY_ROUTERS = tuple(
    r for r in (*ALL_ROUTERS, *SMG_ROUTERS) if "eldr" not in r and not r.endswith(":cache_aware")
)
QUICK_ROUTERS = ("gateway:round_robin", "gateway:least_load", "gateway:eldr", "sglang:round_robin")


class CompareError(RuntimeError):
    """An experiment could not be set up; the message says which step and why."""


@dataclass(frozen=True, slots=True)
class RouterSpec:
    name: str
    kind: str  # one of ROUTER_KINDS
    policy: str
    pd_flow: str = "dual"
    # Extra router flags of a variant: `gateway:eldr+eldr-load-bound=2` -> --eldr-load-bound 2,
    # `smg:least_load+prefill-policy=cache_aware` -> --prefill-policy cache_aware.
    extra_args: tuple[str, ...] = ()

    @classmethod
    def parse(cls, name: str) -> RouterSpec:
        kind, sep, policy = name.partition(":")
        if not sep or kind not in ROUTER_KINDS:
            raise CompareError(
                f"--routers entry {name!r} must be gateway:POLICY, sglang:POLICY or smg:POLICY"
            )
        policy, *variant = policy.split("+")
        extra = variant_args(name, variant)
        if kind == "gateway":
            if policy == "eldr-prefill-first":
                return cls(name, kind, "eldr", "prefill-first", extra)
            if policy not in GATEWAY_POLICIES:
                raise CompareError(f"--routers {name!r}: gateway policies are {GATEWAY_POLICIES}")
            return cls(name, kind, policy, extra_args=extra)
        elif kind == "sglang" and policy not in SGLANG_POLICIES:
            raise CompareError(f"--routers {name!r}: sglang policies are {SGLANG_POLICIES}")
        elif kind == "smg" and policy not in SMG_POLICIES:
            raise CompareError(f"--routers {name!r}: smg policies are {SMG_POLICIES}")
        return cls(name, kind, policy, extra_args=extra)

    @property
    def needs_zones(self) -> bool:
        return self.policy == "eldr"

    @property
    def ready_path(self) -> str:
        """Where the router answers 200 once it can route: smg's `/health` answers before its
        workers are registered (that happens in the background), its `/readiness` after."""
        return "/readiness" if self.kind == "smg" else "/health"


def variant_args(name: str, variant: Sequence[str]) -> tuple[str, ...]:
    """`["eldr-load-bound=2", "no-signature-cache"]` -> `--eldr-load-bound 2 --no-signature-cache`.

    The router parses them when the run starts; a flag it does not know fails that run by
    name (the other routers' runs go on). They come after compare's own flags, so they win
    (`+prefill-policy=cache_aware` overrides `--prefill-policy`)."""
    out: list[str] = []
    for item in variant:
        flag, eq, value = item.partition("=")
        if not flag or flag.startswith("-") or (eq and not value):
            raise CompareError(
                f"--routers {name!r}: a variant is +FLAG or +FLAG=VALUE (flag without dashes), "
                f"got {item!r}")
        out += [f"--{flag}", value] if eq else [f"--{flag}"]
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    prefill: list[tuple[str, int | None]]  # (url, bootstrap port)
    decode: list[str]
    pid: int = 0


def parse_cluster_info(doc: dict[str, Any]) -> ClusterInfo:
    """The cluster's `--json` line: `prefill` and `decode` lists of URLs or objects with `url`
    (and `bootstrap_port` for prefill workers)."""

    def items(key: str) -> list[Any]:
        value = doc.get(key) or doc.get(f"{key}_workers")
        if not isinstance(value, list) or not value:
            raise CompareError(f"cluster JSON line has no non-empty {key!r} list: {doc}")
        return value

    prefill: list[tuple[str, int | None]] = []
    for item in items("prefill"):
        if isinstance(item, str):
            prefill.append((item, None))
        elif isinstance(item, dict) and isinstance(item.get("url"), str):
            port = item.get("bootstrap_port")
            prefill.append((item["url"], int(port) if port is not None else None))
        else:
            raise CompareError(f"cluster JSON prefill entry is not a URL or {{url: ...}}: {item}")
    decode: list[str] = []
    for item in items("decode"):
        url = item if isinstance(item, str) else item.get("url") if isinstance(item, dict) else None
        if not isinstance(url, str):
            raise CompareError(f"cluster JSON decode entry is not a URL or {{url: ...}}: {item}")
        decode.append(url)
    return ClusterInfo(prefill, decode, int(doc.get("pid") or 0))


def worker_flags(cluster: ClusterInfo) -> list[str]:
    """`--prefill URL [BPORT] ... --decode URL ...`, the sglang_router syntax our gateway shares."""
    out: list[str] = []
    for url, port in cluster.prefill:
        out += ["--prefill", url] + ([str(port)] if port is not None else [])
    for url in cluster.decode:
        out += ["--decode", url]
    return out


def router_argv(
    spec: RouterSpec,
    cluster: ClusterInfo,
    port: int,
    prefill_policy: str,
    zones: Path | None,
    calibration_log: Path | None = None,
    model: str | None = None,
) -> list[str]:
    common = [
        "--pd-disaggregation",
        *worker_flags(cluster),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prefill-policy",
        prefill_policy,
        "--decode-policy",
        spec.policy,
    ]
    if spec.kind in ("sglang", "smg"):
        rust = [
            *common,
            "--prometheus-port",
            str(free_port()),
            "--prometheus-host",
            "127.0.0.1",
            "--log-level",
            "warn",
        ]
        rust += spec.extra_args  # variants: the router's own flags, last one wins
        if spec.kind == "sglang":
            return python_argv("sglang_router.launch_router", rust)
        # smg would otherwise fetch the workers' tokenizer (a HuggingFace id) in the background;
        # PD routing on /generate needs none.
        return python_argv("smg.launch_router", [*rust, "--disable-tokenizer-autoload"])
    args = [*common, "--pd-flow", spec.pd_flow, "--prometheus-port", "0", *spec.extra_args]
    if spec.needs_zones:
        if zones is None:
            raise CompareError(f"{spec.name} needs a zone table (calibration failed or --zones)")
        args += ["--zones", str(zones)]
    if calibration_log is not None:
        args += ["--calibration-log", str(calibration_log)]
    if model is not None:
        args += ["--model-geometry", model]
    return python_argv("gateway", args)


_WORKLOAD_DEFAULTS = WorkloadSpec()


@dataclass(slots=True)
class CompareOptions:
    out: Path
    workload: str = "task"
    rates: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])
    batches: list[int] | None = None  # when set, rates are planned from these
    routers: list[str] = field(default_factory=lambda: list(ALL_ROUTERS))
    prefill: int = 8
    decode: int = 16
    model: str = DEFAULT_MODEL
    time_scale: float = 20.0
    num_requests: int = 300
    calibration_requests: int = 400
    warmup: int = 4
    seed: int = 0
    turns: int = 1
    # Workload shape defaults come from WorkloadSpec, their one source.
    min_prompt_chars: int = _WORKLOAD_DEFAULTS.min_prompt_chars
    max_prompt_chars: int = _WORKLOAD_DEFAULTS.max_prompt_chars
    max_output_tokens: int = _WORKLOAD_DEFAULTS.max_output_tokens
    min_output_tokens: int = _WORKLOAD_DEFAULTS.min_output_tokens
    max_duration: float = 300.0
    request_timeout: float = 300.0
    prefill_policy: str = "round_robin"
    zones: Path | None = None
    calibration_via: str = "driver"  # "driver" | "gateway-log"
    calibration_max_duration: float = 900.0
    endpoint: str = "generate"
    progress: bool = True
    corpus: Path = DEFAULT_CORPUS
    traces: Path = DEFAULT_TRACES
    startup_timeout: float = 120.0
    # Already-running workers (both set, or neither): no emulator is started.
    prefill_urls: list[tuple[str, int | None]] | None = None
    decode_urls: list[str] | None = None
    # Router processes per run, identical configuration, each with only its own state; the
    # driver spreads conversations across them (loadtest.driver.url_for).
    gateway_replicas: int = 1
    # The rate plan behind `rates` when `batches` was given (rate_plan.RatePlan as dicts).
    plans: list[dict[str, Any]] | None = None

    @property
    def external(self) -> bool:
        return self.decode_urls is not None


# A few minutes on 2 cores, yet in the regime where locality can matter: one rate planned for a
# decode batch of 12 per worker (measured batches come out lower, see rate_plan.py), short
# outputs so that 320 requests span about 3 request lifetimes.
QUICK_OVERRIDES: dict[str, Any] = {
    "prefill": 4,
    "decode": 8,
    "batches": [12],
    "routers": list(QUICK_ROUTERS),
    "num_requests": 320,
    "calibration_requests": 160,
    "max_output_tokens": 32,
    "min_output_tokens": 16,
    "max_duration": 120.0,
    "request_timeout": 120.0,
}


async def fetch_stats(
    session: aiohttp.ClientSession, urls: Sequence[str]
) -> list[dict[str, float]]:
    async def one(url: str) -> dict[str, float]:
        try:
            async with session.get(
                url.rstrip("/") + "/emulator/stats", timeout=aiohttp.ClientTimeout(total=10)
            ) as r:
                if r.status != 200:
                    raise CompareError(f"GET {url}/emulator/stats answered {r.status}")
                return counters(await r.json(loads=orjson.loads))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise CompareError(f"GET {url}/emulator/stats failed: {exc}") from exc

    return list(await asyncio.gather(*(one(u) for u in urls)))


async def probe_emulator_stats(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether `url` serves `/emulator/stats` (our emulator) rather than lacking it (SGLang).

    404 or a non-JSON answer means the endpoint is missing; an unreachable worker is an error,
    because then no router could use it either.
    """
    target = url.rstrip("/") + "/emulator/stats"
    try:
        async with session.get(target, timeout=aiohttp.ClientTimeout(total=10)) as r:
            if r.status != 200:
                return False
            try:
                doc = orjson.loads(await r.read())
            except orjson.JSONDecodeError:
                return False
            return isinstance(doc, dict)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise CompareError(f"GET {target} failed: {exc}") from exc


async def wait_workers_healthy(urls: Sequence[str], timeout: float) -> None:
    """Poll each external worker's `/health` until 200, bounded by `timeout` seconds."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        for url in urls:
            last = "no answer"
            while True:
                try:
                    async with session.get(
                        url.rstrip("/") + "/health", timeout=aiohttp.ClientTimeout(total=5)
                    ) as r:
                        if r.status == 200:
                            break
                        last = f"status {r.status}"
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    last = str(exc) or type(exc).__name__
                if time.monotonic() > deadline:
                    raise CompareError(f"worker {url} not healthy after {timeout:g}s: {last}")
                await asyncio.sleep(0.5)


class Experiment:
    """Owns the cluster process for the whole comparison; routers come and go per run."""

    def __init__(self, opts: CompareOptions) -> None:
        self.opts = opts
        self.logs = opts.out / "logs"
        self.cluster_proc: ManagedProcess | None = None
        self.cluster: ClusterInfo | None = None
        self.stats_available = True  # False when a worker has no /emulator/stats
        self.specs = [RouterSpec.parse(r) for r in opts.routers]

    def workload(self, split: str, num: int) -> list[Conversation]:
        # Calibration stays single-turn: the zones are fitted per request.
        return build_conversations(self.opts, split, num,
                                   self.opts.turns if split == "evaluation" else 1)

    async def start_cluster(self) -> ClusterInfo:
        o = self.opts
        n = o.prefill + o.decode
        base = free_port_block(3 * n + 8)  # HTTP + bootstrap ports, with room to spare
        args = [
            "cluster",
            "--prefill",
            str(o.prefill),
            "--decode",
            str(o.decode),
            "--base-port",
            str(base),
            "--model",
            o.model,
            "--routing",
            "trace" if o.workload == "trace" else "token-hash",
            "--time-scale",
            str(o.time_scale),
            "--json",
        ]
        if o.workload == "trace":
            args += ["--trace-path", str(o.traces)]
        # Without a prefill-first router under test the workers reject the extension, exactly
        # like stock SGLang, so no dual-flow result can depend on it by accident.
        pf = any(s.pd_flow == "prefill-first" for s in self.specs)
        args.append("--prefill-first" if pf else "--no-prefill-first")
        proc = ManagedProcess(
            "emulated cluster", python_argv("loadtest", args), self.logs / "cluster.log"
        )
        self.cluster_proc = proc
        await proc.start(capture_stdout=True)
        info = parse_cluster_info(await proc.read_json_line(o.startup_timeout))
        for url in [u for u, _ in info.prefill] + info.decode:
            await proc.wait_http_ok(url.rstrip("/") + "/health", o.startup_timeout)
        self.cluster = replace(info, pid=proc.pid)
        return self.cluster

    async def use_external_cluster(self) -> ClusterInfo:
        """Take the `--prefill-url/--decode-url` workers as the cluster; probe their stats."""
        o = self.opts
        assert o.prefill_urls is not None and o.decode_urls is not None
        info = ClusterInfo(list(o.prefill_urls), list(o.decode_urls))
        await wait_workers_healthy([u for u, _ in info.prefill] + info.decode, o.startup_timeout)
        async with aiohttp.ClientSession() as session:
            probes = await asyncio.gather(*(probe_emulator_stats(session, u) for u in info.decode))
        # Counters are summed across decode workers, so a partial set would be misleading.
        self.stats_available = all(probes)
        if not self.stats_available:
            missing = [u for u, ok in zip(info.decode, probes, strict=True) if not ok]
            print(
                f"note: no /emulator/stats on {', '.join(missing)}: distinct experts, batch "
                f"and host lag are unavailable for this comparison",
                file=sys.stderr,
            )
        self.cluster = info
        return info

    async def start_router(
        self, spec: RouterSpec, zones: Path | None, tag: str, calibration_log: Path | None = None
    ) -> tuple[ManagedProcess, str]:
        assert self.cluster is not None
        port = free_port()
        argv = router_argv(
            spec, self.cluster, port, self.opts.prefill_policy, zones, calibration_log,
            self.opts.model if spec.kind == "gateway" else None,
        )
        proc = ManagedProcess(spec.name, argv, self.logs / f"{tag}.log")
        await proc.start()
        url = f"http://127.0.0.1:{port}"
        try:
            await proc.wait_http_ok(url + spec.ready_path, self.opts.startup_timeout)
        except BaseException:
            await proc.stop()
            raise
        return proc, url

    def driver_config(
        self, url: str, rate: float | None, num: int, extra_body: dict[str, Any] | None = None
    ) -> DriverConfig:
        o = self.opts
        return DriverConfig(
            url=url,
            endpoint=o.endpoint,
            rate=rate if rate else float("inf"),
            concurrency=None if rate else 2 * o.decode,
            num_requests=num,
            warmup=o.warmup,
            max_duration=o.max_duration,
            request_timeout=o.request_timeout,
            seed=o.seed,
            progress=o.progress,
            extra_body=dict(extra_body or {}),
        )

    async def calibrate(self, flow: str = "dual") -> Path:
        """Calibration-split traffic through a least_load gateway, then `zones fit`.

        `calibration_via="driver"` (default): the driver requests `return_routed_experts` and
        writes the calibration log itself from the decode results (works through any router).
        `"gateway-log"`: the gateway's own `--calibration-log` writes it.

        `flow="prefill-first"`: the table for prefill-first routers, which route on the
        prefill's prompt expert counts. Only the gateway sees those (in the prefill's answer),
        so the calibration gateway runs the prefill-first flow and writes the log; its records
        carry prompt counts and `zones fit` builds signatures from them. The dual flow's table
        stays fitted on what the dual flow resolves (output counts).
        """
        o = self.opts
        suffix = "" if flow == "dual" else f"-{flow}"
        log = o.out / "calibration" / f"calibration{suffix}.jsonl"
        table = o.out / "calibration" / f"zones{suffix}.json"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.unlink(missing_ok=True)
        via_gateway = o.calibration_via == "gateway-log" or flow == "prefill-first"
        spec = RouterSpec("gateway:least_load", "gateway", "least_load", flow)
        proc, url = await self.start_router(
            spec, None, f"calibration-gateway{suffix}", log if via_gateway else None
        )
        try:
            convs = self.workload("calibration", o.calibration_requests + o.warmup)
            # The gateway's log samples non-streaming answers only (one record per answer).
            body = {"stream": False} if via_gateway else ROUTED_EXPERTS_BODY
            config = replace(
                self.driver_config(url, None, o.calibration_requests, body),
                # Calibration is bounded by its request count, not by the per-run duration:
                # a short --max-duration must not silently shrink the calibration set.
                max_duration=o.calibration_max_duration,
                # Closed loop at a batch of 8 per decode worker: enough to finish quickly
                # without the host becoming the bottleneck.
                concurrency=8 * o.decode,
            )
            result = await run_load(config, convs)
            write_run(result, o.out / "calibration" / "traffic")
        finally:
            await proc.stop()
        if not via_gateway:
            stats = write_calibration_log(result.records, geometry_by_name(o.model), log)
            print(f"calibration capture: {stats}", file=sys.stderr)
        if not log.is_file() or not log.stat().st_size:
            raise CompareError(f"calibration produced no log at {log}; see {self.logs}")
        assert self.cluster is not None
        fit = ManagedProcess(
            "zones fit",
            python_argv("zones", zones_fit_args(log, self.cluster.decode, table, o.model, o.seed)),
            self.logs / f"zones-fit{suffix}.log",
        )
        await fit.start()
        assert fit.proc is not None
        try:
            code = await asyncio.wait_for(fit.proc.wait(), 600)
        finally:
            await fit.stop()
        if code != 0 or not table.is_file():
            raise fit.failure(f"exited with code {code}")
        return table

    async def run_one(
        self, spec: RouterSpec, rate: float, zones: Path | None, convs: list[Conversation]
    ) -> dict[str, Any]:
        o = self.opts
        assert self.cluster is not None
        run_dir = o.out / "runs" / spec.name.replace(":", "_") / f"rate_{rate:g}"
        tag = f"{spec.name.replace(':', '_')}-{rate:g}"
        procs: list[ManagedProcess] = []
        urls: list[str] = []
        try:
            # N identical router processes (--gateway-replicas), each with only its own view.
            for i in range(o.gateway_replicas):
                proc, url = await self.start_router(spec, zones, tag if i == 0 else f"{tag}-r{i}")
                procs.append(proc)
                urls.append(url)
            pids = {("router" if i == 0 else f"router-{i}"): p.pid for i, p in enumerate(procs)}
            pids["driver"] = os.getpid()
            if self.cluster_proc is not None:
                pids["emulator"] = self.cluster_proc.pid
            sampler = CpuSampler(pids)
            before: list[dict[str, float]] = []
            async with aiohttp.ClientSession() as session:
                decode_urls = self.cluster.decode if self.stats_available else []

                window = steady_window(o, rate)
                steady: list[list[dict[str, float]]] = []
                tasks: list[asyncio.Task[None]] = []

                async def snapshots_at(times: Sequence[float]) -> None:
                    start = time.monotonic()
                    for t in times:
                        await asyncio.sleep(max(0.0, start + t - time.monotonic()))
                        steady.append(await fetch_stats(session, decode_urls))

                async def measurement_starts() -> None:
                    before.extend(await fetch_stats(session, decode_urls))
                    sampler.start()
                    if window is not None and decode_urls:
                        tasks.append(asyncio.create_task(snapshots_at(window)))

                try:
                    config = replace(self.driver_config(urls[0], rate, o.num_requests),
                                     replica_urls=tuple(urls[1:]))
                    result = await run_load(config, convs, measurement_starts)
                finally:
                    await sampler.stop()
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                after = await fetch_stats(session, decode_urls)
        finally:
            await asyncio.gather(*(p.stop() for p in procs))
        summary = write_run(result, run_dir)
        cluster: ClusterRunStats = (
            decode_run_stats(before, after) if self.stats_available else unavailable_run_stats()
        )
        if len(steady) == 2 and window is not None:
            # The same counters between the end of ramp-up and the last arrival: the batch the
            # rate plan aims at (the whole-window mean includes ramp-up and drain).
            cluster = replace(cluster, steady_mean_batch_size=decode_run_stats(*steady)
                              .mean_batch_size, steady_window_s=window)
        cpu = sampler.usage()
        if len(procs) > 1:
            # "router" is every replica together (the report's router cores column).
            cores = cpu.process_cores
            cores["router"] = sum(v for k, v in cores.items() if k.startswith("router"))
        reasons = void_reasons(cluster, cpu.system_percent_mean)
        if summary["completed"] < 0.9 * summary["requests"]:
            reasons.append(f"only {summary['completed']}/{summary['requests']} requests completed")
        record = {
            "router": spec.name,
            "rate": rate,
            "workload": o.workload,
            "summary": summary,
            "cluster": cluster.to_dict(),
            "cpu": asdict(cpu),
            "void": bool(reasons),
            "void_reasons": reasons,
        }
        (run_dir / "run.json").write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2))
        return record

    async def run(self, argv_text: str) -> dict[str, Any]:
        o = self.opts
        o.out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        runs: list[dict[str, Any]] = []
        meta: dict[str, Any] = {
            "command": argv_text,
            "started_at": started,
            "options": _jsonable(asdict(o)),
            "load_only_routers": list(LOAD_ONLY_ROUTERS),
        }
        try:
            if o.external:
                await self.use_external_cluster()
            else:
                await self.start_cluster()
            meta["external_workers"] = o.external
            meta["emulator_stats"] = self.stats_available
            zones = o.zones
            if zones is None and any(s.needs_zones and s.pd_flow == "dual" for s in self.specs):
                zones = await self.calibrate()
            zones_pf = o.zones
            if zones_pf is None and any(s.needs_zones and s.pd_flow == "prefill-first"
                                        for s in self.specs):
                zones_pf = await self.calibrate("prefill-first")
                meta["zones_prefill_first"] = str(zones_pf)
            meta["zones"] = str(zones) if zones else None
            convs = self.workload("evaluation", o.num_requests + o.warmup)
            for rate in o.rates:
                for spec in self.specs:
                    try:
                        table = zones_pf if spec.pd_flow == "prefill-first" else zones
                        runs.append(await self.run_one(spec, rate, table, convs))
                    except (CompareError, ProcessStartError) as exc:
                        # One broken router must not lose the other routers' runs.
                        print(f"error: {spec.name} at rate {rate:g}: {exc}", file=sys.stderr)
                        runs.append(
                            {
                                "router": spec.name,
                                "rate": rate,
                                "workload": o.workload,
                                "error": str(exc),
                                "void": True,
                                "void_reasons": [str(exc)],
                            }
                        )
                    _write_results(o.out, meta, runs)
        finally:
            if self.cluster_proc is not None:
                await self.cluster_proc.stop()
            meta["finished_at"] = time.time()
            _write_results(o.out, meta, runs)
        return {"meta": meta, "runs": runs}


# Evaluation requests whose decode routing `workload_routing_sample` computes for the plan.
PLAN_SAMPLE_REQUESTS = 96


def build_conversations(opts: CompareOptions, split: str, num: int,
                        turns: int) -> list[Conversation]:
    """`num` conversations of the comparison's workload and shape from `split`."""
    spec = WorkloadSpec(
        kind=opts.workload, split=split, num_conversations=num, seed=opts.seed, turns=turns,
        min_prompt_chars=opts.min_prompt_chars, max_prompt_chars=opts.max_prompt_chars,
        min_output_tokens=opts.min_output_tokens, max_output_tokens=opts.max_output_tokens)
    return build_workload(spec, load_corpus(opts.corpus), opts.traces)


def steady_window(opts: CompareOptions, rate: float) -> tuple[float, float] | None:
    """Seconds after the measured phase starts between which the decode batch is in steady
    state: from `RAMP_LIFETIMES` planned request lifetimes (loadtest/rate_plan.py says why; a
    third of the arrivals when there is no plan) to the last arrival (drain starts). None when
    that leaves under one lifetime (or a second): the run never reached steady state, and a
    mean taken during the ramp would pass for the achieved batch."""
    offsets = arrival_offsets(opts.num_requests, rate, opts.seed)
    last = offsets[-1] if offsets else 0.0
    lifetime = next((p["request_seconds"] for p in opts.plans or [] if p["rate"] == rate), None)
    if lifetime is None:
        start, shortest = last / 3, 1.0
    else:
        start, shortest = RAMP_LIFETIMES * lifetime, max(lifetime, 1.0)
    return (start, last) if last - start >= shortest else None


def workload_routing_sample(opts: CompareOptions) -> list[np.ndarray]:
    """Decode routing ([tokens, layers, top_k]) of the first evaluation requests, routed offline
    by the same source and seed the emulated cluster uses (`loadtest cluster` defaults), for
    `rate_plan.sampled_distinct_experts`. Empty for external workers (no emulator to ask)."""
    if opts.external:
        return []
    geometry = geometry_by_name(opts.model)
    tok = Tokenizer()
    source = make_routing_source(
        "trace" if opts.workload == "trace" else "token-hash", geometry, tok,
        trace_path=str(opts.traces) if opts.workload == "trace" else None)
    rows = []
    for conv in build_conversations(opts, "evaluation", PLAN_SAMPLE_REQUESTS, turns=1):
        turn = conv.turns[0]
        ids = tok.encode(turn.text)
        steps = itertools.islice(source.continuation(ids, turn.text, 0), turn.max_tokens)
        rows.append(np.stack([r for _, r in steps]))
    return rows


def rate_plans(opts: CompareOptions, sample: Sequence[np.ndarray] | None = None
               ) -> list[RatePlan]:
    """Rates giving `opts.batches` requests decoding per worker (see loadtest/rate_plan.py),
    with the distinct-experts term measured on `sample` (the workload's decode routing) when
    given, else the uniform-routing upper bound."""
    geometry = geometry_by_name(opts.model)
    cost = CostModel.for_geometry(geometry, time_scale=opts.time_scale)
    # ~4 characters per token for the corpus's mostly Latin-script text; the prompt only enters
    # through the small KV-read term of the step time.
    prompt_tokens = (opts.min_prompt_chars + opts.max_prompt_chars) / 2 / 4
    output_tokens = (opts.min_output_tokens + opts.max_output_tokens) / 2
    return [
        plan_for_batch(
            cost,
            geometry,
            decode_workers=opts.decode,
            batch=b,
            mean_output_tokens=output_tokens,
            mean_prompt_tokens=prompt_tokens,
            distinct_experts=(sampled_distinct_experts(sample, b, geometry.num_experts)
                              if sample else None),
        )
        for b in opts.batches or []
    ]


def zones_fit_args(
    log: Path, decode_urls: Sequence[str], table: Path, model: str, seed: int
) -> list[str]:
    """`python -m zones fit` arguments: one zone per decode worker, zone k -> k-th URL."""
    return [
        "fit",
        "--input",
        str(log),
        "--format",
        "calibration",
        "--model",
        model,
        "--workers",
        ",".join(decode_urls),
        "--seed",
        str(seed),
        "--out",
        str(table),
        "--no-progress",
    ]


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def _write_results(out: Path, meta: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    (out / "results.json").write_bytes(
        orjson.dumps({"meta": meta, "runs": runs}, option=orjson.OPT_INDENT_2)
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0] if __doc__ else None
    d = CompareOptions(out=Path("."))
    parser.add_argument("--out", type=Path, required=True, help="results directory")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small preset: 4P+8D, one rate planned for batch 12, 4 routers, 320 requests",
    )
    parser.add_argument("--workload", choices=KINDS, default=d.workload)
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=None,
        help=f"request rates per second (default {d.rates})",
    )
    load.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="instead of --rates: target decode batch per worker; rates follow from the "
        "emulator's cost model (loadtest/rate_plan.py)",
    )
    parser.add_argument(
        "--routers",
        nargs="+",
        default=None,
        help=f"routers under test (default: {' '.join(ALL_ROUTERS)}; also smg:POLICY, "
        f"POLICY one of {' '.join(SMG_POLICIES)})",
    )
    parser.add_argument("--prefill", type=int, default=None, help=f"default {d.prefill}")
    parser.add_argument("--decode", type=int, default=None, help=f"default {d.decode}")
    parser.add_argument(
        "--model", default=None, help=f"geometry (default {d.model}; DeepSeek-V2-Lite for trace)"
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=d.time_scale,
        help="emulator slow-down so this machine is not the bottleneck",
    )
    parser.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help=f"measured requests per run (default {d.num_requests})",
    )
    parser.add_argument("--calibration-requests", type=int, default=None)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--gateway-replicas", type=int, default=None, metavar="N",
        help="run N identical processes of every router under test, each with only its own "
        "view, the driver spreading conversations across them like a Service (default 1)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None,
        help="run the whole comparison once per seed into OUT/seed-N, then write OUT/summary.md "
        "(median change over seeds with 95%% intervals, loadtest/multiseed.py); overrides --seed",
    )
    parser.add_argument(
        "--turns", type=int, default=None, help="user turns per evaluation conversation (default 1)"
    )
    parser.add_argument("--warmup", type=int, default=None, help=f"default {d.warmup}")
    parser.add_argument("--max-output-tokens", type=int, default=None)
    parser.add_argument("--prefill-policy", default=d.prefill_policy)
    parser.add_argument(
        "--zones", type=Path, default=None, help="use this zone table instead of calibrating"
    )
    parser.add_argument(
        "--calibration-via",
        choices=("driver", "gateway-log"),
        default=d.calibration_via,
        help="who writes the calibration log: the driver from returned routed experts, "
        "or the gateway's --calibration-log",
    )
    parser.add_argument(
        "--endpoint", choices=("generate", "chat", "completions"), default=d.endpoint
    )
    parser.add_argument(
        "--prefill-url",
        nargs="+",
        action="append",
        metavar="URL [BOOTSTRAP_PORT|none]",
        default=None,
        help="repeatable: an already-running prefill worker (same shape as the gateway's "
        "--prefill); with --decode-url no emulator is started",
    )
    parser.add_argument(
        "--decode-url",
        action="append",
        metavar="URL",
        default=None,
        help="repeatable: an already-running decode worker; --model should then name the "
        "served model's geometry",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-report", action="store_true")


def parse_prefill_urls(values: Sequence[Sequence[str]]) -> list[tuple[str, int | None]]:
    """`--prefill-url URL [BOOTSTRAP_PORT|none]` entries, as the gateway's `--prefill` takes."""
    out: list[tuple[str, int | None]] = []
    for entry in values:
        if len(entry) not in (1, 2):
            raise CompareError(f"--prefill-url takes URL [BOOTSTRAP_PORT|none], got {list(entry)}")
        url = _worker_url("--prefill-url", entry[0])
        port: int | None = None
        if len(entry) == 2 and entry[1].lower() != "none":
            try:
                port = int(entry[1])
            except ValueError:
                raise CompareError(
                    f"--prefill-url {url}: bootstrap port {entry[1]!r} is not an integer or none"
                ) from None
            if not 0 < port < 65536:
                raise CompareError(f"--prefill-url {url}: bootstrap port {port} out of range")
        out.append((url, port))
    return out


def _worker_url(flag: str, url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise CompareError(f"{flag} {url!r} must be an http:// or https:// URL")
    return url.rstrip("/")


def options_from_args(args: argparse.Namespace) -> CompareOptions:
    opts = CompareOptions(out=args.out)
    if args.quick:
        for key, value in QUICK_OVERRIDES.items():
            setattr(opts, key, value)
    if args.rates is not None:
        opts.batches = None  # explicit rates win over a preset's planned ones
    explicit = {
        "workload": args.workload,
        "rates": args.rates,
        "batches": args.batches,
        "routers": args.routers,
        "prefill": args.prefill,
        "decode": args.decode,
        "model": args.model,
        "time_scale": args.time_scale,
        "num_requests": args.num_requests,
        "calibration_requests": args.calibration_requests,
        "seed": args.seed,
        "turns": args.turns,
        "warmup": args.warmup,
        "max_output_tokens": args.max_output_tokens,
        "prefill_policy": args.prefill_policy,
        "zones": args.zones,
        "endpoint": args.endpoint,
        "calibration_via": args.calibration_via,
        "gateway_replicas": args.gateway_replicas,
    }
    for key, value in explicit.items():
        if value is not None:
            setattr(opts, key, value)
    opts.progress = not args.no_progress
    prefill_urls = getattr(args, "prefill_url", None)
    decode_urls = getattr(args, "decode_url", None)
    if (prefill_urls is None) != (decode_urls is None):
        raise CompareError("--prefill-url and --decode-url must be given together")
    if prefill_urls is not None and decode_urls is not None:
        if args.prefill is not None or args.decode is not None:
            raise CompareError("--prefill/--decode count emulated workers; not with --*-url")
        opts.prefill_urls = parse_prefill_urls(prefill_urls)
        opts.decode_urls = [_worker_url("--decode-url", u) for u in decode_urls]
        # The counts describe the cluster in the report and size closed-loop concurrency.
        opts.prefill = len(opts.prefill_urls)
        opts.decode = len(opts.decode_urls)
    if opts.max_output_tokens < opts.min_output_tokens:
        opts.min_output_tokens = opts.max_output_tokens
    if opts.prefill < 1 or opts.decode < 1:
        raise CompareError("--prefill and --decode must be >= 1")
    if any(r <= 0 for r in opts.rates):
        raise CompareError("--rates must all be > 0")
    if opts.turns < 1 or opts.warmup < 0 or opts.num_requests < 1:
        raise CompareError("--turns and --num-requests must be >= 1, --warmup >= 0")
    if opts.gateway_replicas < 1:
        raise CompareError("--gateway-replicas must be >= 1")
    if opts.time_scale <= 0:
        raise CompareError("--time-scale must be > 0")
    for name in opts.routers:
        RouterSpec.parse(name)
    if args.model is None:
        # The trace workload replays DeepSeek-V2-Lite routing (esft_routing_shared.npz).
        opts.model = "DeepSeek-V2-Lite" if opts.workload == "trace" else DEFAULT_MODEL
    try:
        geometry_by_name(opts.model)
    except GeometryError as exc:
        raise CompareError(f"--model: {exc}") from exc
    if opts.batches is not None:
        if any(b < 1 for b in opts.batches):
            raise CompareError("--batches must all be >= 1")
        plans = rate_plans(opts, workload_routing_sample(opts))
        opts.rates = [round(p.rate, 3) for p in plans]
        opts.plans = [{**asdict(p), "rate": r} for p, r in zip(plans, opts.rates, strict=True)]
        for p in plans:
            print(f"plan: batch {p.batch} -> {p.rate:.3g} req/s (step {p.step_seconds * 1e3:.0f} "
                  f"ms with {p.distinct_experts:.1f} distinct experts per layer)",
                  file=sys.stderr)
            if not p.arrival_window_ok(opts.num_requests):
                print(
                    f"warning: batch {p.batch}: {opts.num_requests} requests at {p.rate:.3g} "
                    f"req/s arrive within {opts.num_requests / p.rate:.0f}s, less than "
                    f"{STEADY_STATE_LIFETIMES:g} request lifetimes ({p.request_seconds:.0f}s "
                    f"each): the decode batch will not reach the planned one; "
                    f"--num-requests {p.requests_for_steady_state()} would",
                    file=sys.stderr,
                )
        if any(r <= 0 for r in opts.rates):
            raise CompareError(f"--batches planned non-positive rates {opts.rates}")
    return opts


def main(args: argparse.Namespace) -> int:
    try:
        opts = options_from_args(args)
        argv_text = "python -m loadtest compare " + shlex.join(sys.argv[2:])
        if args.seeds:
            return _main_seeds(opts, args.seeds, argv_text, report=not args.no_report)
        results = asyncio.run(Experiment(opts).run(argv_text))
    except (CompareError, ProcessStartError, WorkloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.no_report:
        from loadtest.report import render_report

        path = render_report(opts.out)
        print(f"report: {path}")
    ok = [r for r in results["runs"] if not r.get("error")]
    return 0 if ok else 1


def _main_seeds(opts: CompareOptions, seeds: Sequence[int], argv_text: str, report: bool) -> int:
    """One full comparison per seed (its own calibration and zone fit: nothing is tuned on an
    evaluation seed), then the multi-seed summary."""
    from loadtest.multiseed import summarize
    from loadtest.report import render_report

    dirs = []
    any_ok = False
    for seed in seeds:
        one = replace(opts, seed=seed, out=opts.out / f"seed-{seed}")
        results = asyncio.run(Experiment(one).run(f"{argv_text}  # seed {seed}"))
        any_ok = any_ok or any(not r.get("error") for r in results["runs"])
        if report:
            print(f"report: {render_report(one.out)}")
        dirs.append(one.out)
    print(f"summary: {summarize(dirs, opts.out, plot=report)}")
    return 0 if any_ok else 1

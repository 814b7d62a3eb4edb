"""`python -m loadtest cluster`: many emulated workers in ONE process and event loop.

A 2-core machine cannot run 24 Python server processes next to a gateway and a load generator,
so every worker of the cluster shares one uvloop event loop. In-process API for tests:

    async with run_cluster(ClusterConfig(prefill=2, decode=2)) as cluster:
        cluster.prefill[0].url, cluster.prefill[0].bootstrap_port, cluster.decode_urls, ...

Port layout with `--base-port P` (N prefill, M decode): prefill i on P+i, decode j on P+N+j,
prefill i's bootstrap server on P+N+M+i. `--base-port 0` lets the OS pick every port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from loadtest.emulator import blas  # noqa: F401  (before numpy: single-threaded BLAS)
from loadtest.emulator.config import (
    ConfigError,
    EngineOptions,
    WorkerConfig,
    add_engine_arguments,
    engine_options_from_args,
)
from loadtest.emulator.server import WorkerServer


@dataclass(frozen=True)
class ClusterConfig:
    prefill: int = 1
    decode: int = 1
    host: str = "127.0.0.1"
    base_port: int = 0
    engine: EngineOptions = field(default_factory=EngineOptions)

    def __post_init__(self) -> None:
        if self.prefill < 1 or self.decode < 1:
            raise ConfigError("a PD cluster needs prefill >= 1 and decode >= 1")
        if self.base_port and not 1 <= self.base_port <= 65535 - 2 * self.prefill - self.decode:
            raise ConfigError(f"base_port {self.base_port} leaves no room for the worker ports")

    def worker_configs(self) -> list[WorkerConfig]:
        p, n, m = self.base_port, self.prefill, self.decode
        out = [WorkerConfig(role="prefill", host=self.host, port=p + i if p else 0,
                            bootstrap_port=p + n + m + i if p else None, engine=self.engine)
               for i in range(n)]
        out += [WorkerConfig(role="decode", host=self.host, port=p + n + j if p else 0,
                             engine=self.engine) for j in range(m)]
        return out


@dataclass
class Cluster:
    prefill: list[WorkerServer]
    decode: list[WorkerServer]

    @property
    def prefill_urls(self) -> list[str]:
        return [w.url for w in self.prefill]

    @property
    def decode_urls(self) -> list[str]:
        return [w.url for w in self.decode]

    def to_json(self) -> dict[str, Any]:
        return {"prefill": [{"url": w.url, "bootstrap_port": w.bootstrap_port}
                            for w in self.prefill],
                "decode": [{"url": w.url} for w in self.decode]}

    def _pd_args(self) -> list[str]:
        args = ["--pd-disaggregation"]
        for w in self.prefill:
            args += ["--prefill", w.url, str(w.bootstrap_port)]
        for w in self.decode:
            args += ["--decode", w.url]
        return args

    def gateway_command(self, port: int = 8000) -> list[str]:
        return [sys.executable, "-m", "gateway", *self._pd_args(),
                "--host", "127.0.0.1", "--port", str(port)]

    def router_command(self, port: int = 30000) -> list[str]:
        return [sys.executable, "-m", "sglang_router.launch_router", *self._pd_args(),
                "--host", "127.0.0.1", "--port", str(port)]


@contextlib.asynccontextmanager
async def run_cluster(config: ClusterConfig) -> AsyncIterator[Cluster]:
    servers: list[WorkerServer] = []
    try:
        for wc in config.worker_configs():
            server = WorkerServer(wc)
            await server.start()
            servers.append(server)
        yield Cluster(prefill=servers[:config.prefill], decode=servers[config.prefill:])
    finally:
        for server in reversed(servers):
            await server.stop()


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Run an emulated SGLang PD cluster in one process."
    parser.add_argument("--prefill", type=int, default=1, help="number of prefill workers")
    parser.add_argument("--decode", type=int, default=1, help="number of decode workers")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--base-port", type=int, default=31000,
                        help="first port (see layout in the module doc); 0 = OS-chosen ports")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON line with the worker addresses (for tools)")
    parser.add_argument("--duration-secs", type=float, default=None,
                        help="stop after this many seconds (default: until SIGINT/SIGTERM)")
    add_engine_arguments(parser)


async def serve(config: ClusterConfig, *, as_json: bool, duration: float | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with run_cluster(config) as cluster:
        if as_json:
            print(orjson.dumps(cluster.to_json()).decode(), flush=True)
        else:
            for w in cluster.prefill:
                print(f"prefill {w.url} bootstrap_port {w.bootstrap_port}")
            for w in cluster.decode:
                print(f"decode  {w.url}")
            print("gateway:      " + shlex.join(cluster.gateway_command()))
            print("sglang-router: " + shlex.join(cluster.router_command()), flush=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), duration)


def main(args: argparse.Namespace) -> int:
    try:
        config = ClusterConfig(prefill=args.prefill, decode=args.decode, host=args.host,
                               base_port=args.base_port, engine=engine_options_from_args(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_event_loop(serve(config, as_json=args.json, duration=args.duration_secs))
    return 0


def run_event_loop(coro: Any) -> None:
    """uvloop when available (Linux/macOS), else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)

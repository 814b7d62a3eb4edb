"""`python -m loadtest.emulator --role prefill|decode|regular ...`: one emulated SGLang worker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence

from loadtest.emulator import blas  # noqa: F401  (before numpy: single-threaded BLAS)
from loadtest.emulator.cluster import run_event_loop
from loadtest.emulator.config import (
    ROLES,
    ConfigError,
    WorkerConfig,
    add_engine_arguments,
    engine_options_from_args,
)
from loadtest.emulator.server import WorkerServer
from loadtest.emulator.worker import SGLANG_DEFAULT_BOOTSTRAP_PORT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.emulator", description=__doc__)
    parser.add_argument("--role", choices=ROLES, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--bootstrap-port", type=int, default=None,
                        help="prefill only: KV bootstrap port (SGLang's default is 8998)")
    parser.add_argument("--duration-secs", type=float, default=None,
                        help="stop after this many seconds (default: until SIGINT/SIGTERM)")
    add_engine_arguments(parser)
    return parser


async def serve(config: WorkerConfig, duration: float | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with WorkerServer(config) as server:
        extra = f" bootstrap_port {server.bootstrap_port}" if server.bootstrap_port else ""
        print(f"{config.role} {server.url}{extra}", flush=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), duration)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bootstrap = args.bootstrap_port
    if args.role == "prefill" and bootstrap is None:
        bootstrap = SGLANG_DEFAULT_BOOTSTRAP_PORT
    try:
        config = WorkerConfig(role=args.role, host=args.host, port=args.port,
                              bootstrap_port=bootstrap, engine=engine_options_from_args(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_event_loop(serve(config, args.duration_secs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

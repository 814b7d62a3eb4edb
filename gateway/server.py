"""Run the gateway: uvloop, aiohttp, optional multi-process via SO_REUSEPORT.

With `--processes N > 1`, N independent processes bind the same port (the kernel spreads
connections). Each process has its own registry, in-flight counts, health state and metrics, so
load-aware policies see only their own process's in-flight requests; worker-reported load (from
`/v1/loads`) is shared truth. The Prometheus site is bound by process 0 only.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing as mp
import signal
import sys

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.app import create_app
from gateway.config import Settings
from gateway.state import STATE
from gateway.tls import server_context

# Cyclic GC tuning for the serving process, applied once the app is built (see `_tune_gc`).
# Measured with the gateway under closed-loop load on the instant fake PD upstream: at CPython's
# default (700, 10, 10) the collector ran ~115 gen-0 collections/s and a full collection every
# ~1 s that took ~40 ms (it scans every object imported at start-up: numpy, prometheus, aiohttp),
# about 70 us of CPU per request (~15%) plus 40 ms stalls of every in-flight request. Request
# objects are freed by reference counting, so with start-up objects frozen and a larger gen-0
# threshold no collection ran in a 7 s run; cycles still get collected, only less often.
GC_THRESHOLDS = (20_000, 20, 100)

# aiohttp server options, shared with the tests' in-process servers (tests/gateway_server.py):
# handler_cancellation: a client disconnect cancels the handler, which cancels both upstream
#   legs and releases the in-flight guards (aiohttp >= 3.9 defaults this off);
# auto_decompress off: the parser would inflate a compressed request body as it arrives, before
#   any handler can refuse it (a 400 KiB gzip bomb took ~800 MiB); the app answers 415 to
#   compressed bodies instead (gateway/app.py).
HANDLER_CANCELLATION = True
RUNNER_SHUTDOWN_SECS = 5.0
AUTO_DECOMPRESS = False

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
              "error": logging.ERROR}


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs every request it cannot parse (bad request line, bad header bytes, smuggling
    shapes) as an ERROR with a traceback, although the client got its 400: anyone could fill the
    error log. Such records become one INFO line; real server errors are untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            # str() is "400, message:\n  <what>\n\n  <the bytes>": keep the <what>.
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            what = lines[1] if len(lines) > 1 else type(exc).__name__
            record.msg, record.args = "malformed request answered %s: %s", (exc.code, what)
            record.exc_info = record.exc_text = None
        return True


def _run_one(settings: Settings, index: int) -> None:
    logging.basicConfig(level=LOG_LEVELS[settings.log_level],
                        format=f"%(asctime)s [gw{index}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.server").addFilter(MalformedRequestFilter())
    if index > 0:
        settings = settings.replace(prometheus_port=0)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        asyncio.run(_serve_async(settings))
    else:
        uvloop.run(_serve_async(settings))


async def _serve_async(settings: Settings) -> None:
    app = create_app(settings)
    # The generation requests' grace period is the dispatcher's (`drain` below); aiohttp's own
    # shutdown only has what is left: other requests, which it waits for up to twice.
    # keepalive_timeout: aiohttp (>= 3.10) arms it when a connection opens and closes the
    # connection when it fires while no request is being handled, which also bounds a client
    # that never finishes its request head (slowloris); aiohttp's default is an hour.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=HANDLER_CANCELLATION,
                           auto_decompress=AUTO_DECOMPRESS,
                           keepalive_timeout=settings.client_idle_timeout_secs,
                           shutdown_timeout=min(settings.shutdown_grace_period_secs,
                                                RUNNER_SHUTDOWN_SECS))
    await runner.setup()
    _tune_gc()
    tls = server_context(settings)  # --tls-cert-path/--tls-key-path: HTTPS (gateway/tls.py)
    site = web.TCPSite(runner, settings.host, settings.port, backlog=2048,
                       reuse_port=settings.processes > 1, ssl_context=tls)
    await site.start()
    logging.getLogger("gateway").info("listening on %s://%s:%d", "http" if tls is None else
                                      "https", settings.host, settings.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if not settings.zones:
        # With --zones the zone runtime reloads on SIGHUP; without, SIGHUP's default action
        # would end the process, so an operator's routine `kill -HUP` must be harmless here.
        loop.add_signal_handler(signal.SIGHUP, lambda: logging.getLogger("gateway").info(
            "SIGHUP: no zone table configured, nothing to reload"))
    await stop.wait()
    # Stop accepting, then give requests in progress the grace period; aiohttp's own shutdown
    # would wait for them twice (once, cancel the request, once again) and cut streams silently.
    await site.stop()
    dispatcher = app[STATE].dispatcher
    if dispatcher is not None:
        cut = await dispatcher.drain(settings.shutdown_grace_period_secs)
        if cut:
            logging.getLogger("gateway").warning(
                "shutdown: %d request(s) still in progress after the %.0f s grace period were "
                "cut", cut, settings.shutdown_grace_period_secs)
    await runner.cleanup()


def _tune_gc() -> None:
    """Freeze start-up objects out of the collector's reach and collect young objects less often.

    `gc.freeze()` (CPython >= 3.7) moves every tracked object to a permanent generation that
    collections skip; the preceding `gc.collect()` keeps start-up garbage out of it.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def serve(settings: Settings) -> None:
    if settings.processes == 1:
        _run_one(settings, 0)
        return
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_run_one, args=(settings, i), daemon=False)
             for i in range(settings.processes)]
    for proc in procs:
        proc.start()

    def forward(signum: int, _: object) -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                import os

                os.kill(proc.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for proc in procs:
        proc.join()
    sys.exit(max((p.exitcode or 0) for p in procs))

"""The per-app state every route and background task shares, under one typed app key.

Built by `gateway.app.create_app` (clients and tasks in its lifecycle); handlers read it with
`request.app[STATE]`. No module-level state: tests build apps freely.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.config import Settings
from gateway.dispatch import Dispatcher
from gateway.health import HealthChecker
from gateway.http1 import Http1Pool
from gateway.metrics import GatewayMetrics
from gateway.workers import Worker, WorkerRegistry

if TYPE_CHECKING:
    from gateway.eldr.locality import Locality


@dataclass
class GatewayState:
    settings: Settings
    registry: CollectorRegistry  # Prometheus registry of this app
    metrics: GatewayMetrics
    workers: WorkerRegistry
    session: aiohttp.ClientSession | None = None  # health checks, load polls, info fan-out
    client: Http1Pool | None = None  # generation legs (gateway/http1.py)
    dispatcher: Dispatcher | None = None
    health: HealthChecker | None = None
    locality: Locality | None = None  # expert locality, with --zones (gateway/eldr)
    metrics_port: int | None = None  # the bound Prometheus port (useful when configured as 0)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def activate(self, worker: Worker, probe_now: bool = True) -> None:
        """Bring a worker that is out of rotation in once a health check passes (background
        task, bounded by worker_startup_timeout_secs; gateway/health.py)."""
        assert self.health is not None, "the health checker is built in the app lifecycle"
        task = asyncio.ensure_future(self.health.activate(
            worker, self.settings.worker_startup_timeout_secs,
            self.settings.worker_startup_check_interval, probe_now))
        self.tasks.append(task)
        task.add_done_callback(lambda t: self.tasks.remove(t) if t in self.tasks else None)

    def decode_workers_changed(self) -> None:
        """Re-map zones onto the registered decode workers (after a join or a leave)."""
        if self.locality is not None:
            self.locality.runtime.set_workers([(w.worker_id, w.url)
                                               for w in self.workers.by_role("decode")])

    def upstream_headers(self) -> dict[str, str]:
        if self.settings.api_key:
            return {"Authorization": f"Bearer {self.settings.api_key}"}
        return {}


STATE = web.AppKey("gateway_state", GatewayState)

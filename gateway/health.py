"""Background health checks (sgl-router `HealthConfig` semantics).

Each round GETs `health_check_endpoint` on every worker with `health_check_timeout_secs`; a worker
leaves rotation after `health_failure_threshold` consecutive failures and returns after
`health_success_threshold` consecutive successes. A 2xx answer is a success.

A new worker (from the command line or `POST /workers`) is out of rotation until it passes one
health check: `activate` probes it at once and then every `worker_startup_check_interval` seconds
for up to `worker_startup_timeout_secs` (the Rust router's flags and defaults: 30 s, 1,800 s;
large models take minutes to load). One that never passes stays out of rotation, logged; the
periodic rounds can still bring it in.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from gateway.metrics import GatewayMetrics
from gateway.workers import Worker, WorkerRegistry

log = logging.getLogger(__name__)


def apply_health_result(worker: Worker, ok: bool, failure_threshold: int,
                        success_threshold: int) -> bool:
    """Update the consecutive counters; return True when `healthy` flipped. Pure."""
    if ok:
        worker.health_failures = 0
        worker.health_successes += 1
        if not worker.healthy and worker.health_successes >= success_threshold:
            worker.healthy = True
            return True
    else:
        worker.health_successes = 0
        worker.health_failures += 1
        if worker.healthy and worker.health_failures >= failure_threshold:
            worker.healthy = False
            return True
    return False


class HealthChecker:
    def __init__(self, registry: WorkerRegistry, session: aiohttp.ClientSession,
                 metrics: GatewayMetrics, endpoint: str, interval: float, timeout: float,
                 failure_threshold: int, success_threshold: int,
                 headers: dict[str, str]) -> None:
        self._registry = registry
        self._session = session
        self._metrics = metrics
        self._endpoint = endpoint
        self._interval = interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._failure_threshold = failure_threshold
        self._success_threshold = success_threshold
        self._headers = headers

    async def probe(self, worker: Worker) -> bool:
        try:
            async with self._session.get(worker.url + self._endpoint, timeout=self._timeout,
                                         headers=self._headers) as resp:
                await resp.read()
                return 200 <= resp.status < 300
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def admit(self, worker: Worker) -> bool:
        """One probe of a worker out of rotation; a pass puts it in rotation."""
        ok = await self.probe(worker)
        if not ok or self._registry.find(worker.worker_id) is not worker:
            return False
        if not worker.healthy:
            worker.healthy = True
            worker.health_failures = 0
            worker.health_successes = max(worker.health_successes, self._success_threshold)
            log.info("worker %s passed a health check: in rotation", worker.worker_id)
        self._metrics.record_health(worker.worker_id, worker.role, True, True)
        return True

    async def activate(self, worker: Worker, timeout: float, interval: float,
                       probe_now: bool = True) -> bool:
        """`admit` every `interval` seconds until `worker` passes (True) or `timeout` elapses or
        it is removed (False). `probe_now=False` waits one interval first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if not probe_now:
            await asyncio.sleep(interval)
        while self._registry.find(worker.worker_id) is worker:
            if worker.healthy or await self.admit(worker):
                return True
            if loop.time() + interval > deadline:
                log.error("worker %s did not pass a health check within %.0f s of joining; "
                          "it stays out of rotation until it does", worker.worker_id, timeout)
                return False
            await asyncio.sleep(interval)
        return False

    async def check_once(self) -> None:
        workers = list(self._registry)
        results = await asyncio.gather(*(self.probe(w) for w in workers))
        for worker, ok in zip(workers, results, strict=True):
            if self._registry.find(worker.worker_id) is not worker:
                continue  # removed while being probed
            if apply_health_result(worker, ok, self._failure_threshold, self._success_threshold):
                log.warning("worker %s is now %s", worker.worker_id,
                            "healthy" if worker.healthy else "UNHEALTHY")
            self._metrics.record_health(worker.worker_id, worker.role, worker.healthy, ok)

    async def run(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:  # a bug here must not stop health checking for good
                log.exception("health check round failed")
            await asyncio.sleep(self._interval)

"""Background health checks (sgl-router `HealthConfig` semantics).

Each round GETs `health_check_endpoint` on every worker with `health_check_timeout_secs`; a worker
leaves rotation after `health_failure_threshold` consecutive failures and returns after
`health_success_threshold` consecutive successes. A 2xx answer is a success.
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

"""Load tracking: the in-flight guard and the worker-reported load poller.

`InFlight` is the SGLang router's load guard: a context manager that counts a request against a
worker for its whole lifetime, including streaming to the end, and always gives the count back
(in `__exit__`, so cancellation on client disconnect and exceptions release it too).

`LoadPoller` reads `GET /v1/loads` (sglang >= 0.5: `loads[]` per DP rank with
`num_total_tokens`; see sglang `srt/entrypoints/v1_loads.py`) and sums over DP ranks. Workers
that do not have it (404) are asked the deprecated `GET /get_load` (a list of per-rank dicts with
`num_tokens`) instead. A failed poll clears the report; policies ignore reports older than
`load_stale_secs` (see `Worker.view`). It also reads the requests each worker holds
(`num_running_reqs + num_waiting_reqs`) for the shared load view (`--load-view reported`,
`Worker.view`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from types import TracebackType
from typing import Any

import aiohttp

from gateway.metrics import GatewayMetrics
from gateway.routing import LoadReport
from gateway.workers import Worker, WorkerRegistry

log = logging.getLogger(__name__)


class InFlight:
    __slots__ = ("_entered", "_metrics", "_worker")

    def __init__(self, worker: Worker, metrics: GatewayMetrics) -> None:
        self._worker = worker
        self._metrics = metrics
        self._entered = False

    def __enter__(self) -> InFlight:
        self._worker.in_flight += 1
        self._metrics.record_active(self._worker.worker_id, self._worker.role, 1)
        self._entered = True
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def release(self) -> None:
        """Idempotent early release (e.g. the prefill leg finished before the decode stream)."""
        if self._entered:
            self._entered = False
            self._worker.in_flight -= 1
            self._metrics.record_active(self._worker.worker_id, self._worker.role, -1)


def _v1_ranks(payload: Any, dp_rank: int | None) -> list[dict[str, Any]]:
    """The per-rank entries of a `/v1/loads` answer (only rank `dp_rank`'s for a `--dp-aware`
    rank worker); empty when the answer has no `loads` list."""
    if not isinstance(payload, dict) or not isinstance(payload.get("loads"), list):
        return []
    return [r for r in payload["loads"] if isinstance(r, dict)
            and (dp_rank is None or r.get("dp_rank") == dp_rank)]


def parse_v1_loads(payload: Any, dp_rank: int | None = None) -> int | None:
    """Sum `num_total_tokens` over DP ranks of a `/v1/loads` answer (only rank `dp_rank`'s
    entry for a `--dp-aware` rank worker); None if absent."""
    values = [r["num_total_tokens"] for r in _v1_ranks(payload, dp_rank)
              if isinstance(r.get("num_total_tokens"), int | float)]
    return sum(int(v) for v in values) if values else None


def _requests_in(ranks: list[dict[str, Any]]) -> int | None:
    """Requests on the worker from `/v1/loads` rank entries: `num_running_reqs +
    num_waiting_reqs` summed over them; None if no entry carries both. SGLang counts a PD
    decode's requests still waiting for their KV among the waiting ones (scheduler_components/
    load_inquirer.py), so this is every request the worker holds, whichever router sent it."""
    total, seen = 0, False
    for rank in ranks:
        running, waiting = rank.get("num_running_reqs"), rank.get("num_waiting_reqs")
        if isinstance(running, int | float) and isinstance(waiting, int | float):
            total += int(running) + int(waiting)
            seen = True
    return total if seen else None


def parse_load_report(payload: Any, seq: int, dp_rank: int | None = None) -> LoadReport | None:
    """The report of a `/v1/loads` answer (what smg's least_load reads, and the requests the
    worker holds); None if absent."""
    ranks = _v1_ranks(payload, dp_rank)
    if not ranks:
        return None

    def num(rank: dict[str, Any], key: str) -> float:
        value = rank.get(key)
        return float(value) if isinstance(value, int | float) else 0.0

    return LoadReport(
        waiting_reqs=int(sum(num(r, "num_waiting_reqs") for r in ranks)),
        waiting_uncached_tokens=int(sum(num(r, "num_waiting_uncached_tokens") for r in ranks)),
        gen_throughput=sum(num(r, "gen_throughput") for r in ranks),
        token_usage=sum(num(r, "token_usage") for r in ranks) / len(ranks),
        seq=seq, requests=_requests_in(ranks))


def parse_get_load(payload: Any, dp_rank: int | None = None) -> int | None:
    """Sum `num_tokens` of the deprecated `/get_load` answer (list of per-rank dicts or one),
    or only rank `dp_rank`'s."""
    ranks = payload if isinstance(payload, list) else [payload]
    total, seen = 0, False
    for rank in ranks:
        if dp_rank is not None and (not isinstance(rank, dict) or rank.get("dp_rank") != dp_rank):
            continue
        if isinstance(rank, dict):
            value = rank.get("num_tokens", rank.get("load"))
            if isinstance(value, int | float):
                total += int(value)
                seen = True
    return total if seen else None


class LoadPoller:
    def __init__(self, registry: WorkerRegistry, session: aiohttp.ClientSession,
                 metrics: GatewayMetrics, interval: float, timeout: float,
                 headers: dict[str, str]) -> None:
        self._registry = registry
        self._session = session
        self._metrics = metrics
        self._interval = interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = headers

    async def poll_once(self) -> None:
        workers = list(self._registry)
        await asyncio.gather(*(self._poll(w) for w in workers))

    async def _poll(self, worker: Worker) -> None:
        load: int | None = None
        report: LoadReport | None = None
        try:
            rank = worker.dp_rank
            payload = await self._fetch(worker.url + "/v1/loads")
            load = parse_v1_loads(payload, rank)
            report = parse_load_report(payload, worker.report_seq + 1, rank)
            if load is None:
                load = parse_get_load(await self._fetch(worker.url + "/get_load"), rank)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            log.debug("load poll of %s failed: %s", worker.worker_id, exc)
        now = time.monotonic()
        worker.reported_load = load
        if load is not None:
            worker.load_updated_at = now
        worker.note_load_report(report, now)
        self._metrics.record_worker_load(worker.worker_id, load)

    async def _fetch(self, url: str) -> Any:
        """The JSON answer, or None for a non-200 answer."""
        async with self._session.get(url, timeout=self._timeout, headers=self._headers) as resp:
            if resp.status != 200:
                return None
            return await resp.json(content_type=None)

    async def run(self) -> None:
        """Poll forever (cancelled by the app's cleanup)."""
        while True:
            with contextlib.suppress(Exception):
                await self.poll_once()
            await asyncio.sleep(self._interval)

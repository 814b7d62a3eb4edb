"""Worker registry: the gateway's view of its prefill, decode and regular workers.

A `Worker` is mutable runtime state (health, circuit, in-flight, reported load) owned by the
registry; policies only ever see immutable `WorkerView` snapshots of the available ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from gateway.circuit import BreakerConfig, CircuitBreaker
from gateway.errors import BadRequestError, ConflictError, NotFoundError
from gateway.routing import LoadReport, WorkerView
from gateway.urls import redact_url

ROLES = ("prefill", "decode", "regular")


@dataclass(eq=False)
class Worker:
    worker_id: str
    url: str
    role: str
    bootstrap_port: int | None
    breaker: CircuitBreaker
    healthy: bool = True
    in_flight: int = 0
    reported_load: int | None = None
    load_updated_at: float = 0.0
    health_failures: int = 0
    health_successes: int = 0
    added_at: float = field(default_factory=time.time)
    # --dp-aware: this worker is one DP rank of the server at `url` (id `url@rank`, as smg
    # names them); requests to it carry `routed_dp_rank`. None: the server balances its ranks.
    dp_rank: int | None = None
    dp_size: int | None = None
    # The last /v1/loads report (None: the last poll failed or had none), when it came
    # (monotonic), and this process's in-flight count at that moment: smg's least_load score
    # (--least-load-metric expected_wait) reads the report, the shared load view
    # (--load-view reported) its request count. `report_seq` numbers fresh reports.
    load_report: LoadReport | None = None
    report_at: float = 0.0
    in_flight_at_report: int = 0
    report_seq: int = 0
    # The last snapshot handed out: dispatch asks every available worker for one on every
    # request, and building a frozen WorkerView costs ~0.4 us (29 us per request at 64 decode
    # workers); between requests only the few workers whose counts moved need a new one.
    _view: WorkerView | None = field(default=None, init=False, repr=False)

    def note_load_report(self, report: LoadReport | None, now: float) -> None:
        """A load poll's answer (None: failed or without a `/v1/loads` report)."""
        self.load_report = report
        if report is not None:
            self.report_seq = report.seq
            self.report_at = now
            self.in_flight_at_report = self.in_flight

    def fresh_report(self, now: float, stale_secs: float) -> LoadReport | None:
        report = self.load_report
        if report is None or now - self.report_at > stale_secs:
            return None
        return report

    def shared_load(self, now: float, stale_secs: float) -> int:
        """The worker's requests as several gateway replicas can agree on them: what it last
        reported holding plus this process's net change since (dispatched minus finished).
        Other replicas' changes since the report are the error, bounded by one poll interval
        of their traffic. Falls back to this process's in-flight count without a fresh report.
        """
        report = self.fresh_report(now, stale_secs)
        if report is None or report.requests is None:
            return self.in_flight
        return max(0, report.requests + self.in_flight - self.in_flight_at_report)

    def view(self, now: float, stale_secs: float, shared: bool = False) -> WorkerView:
        load = self.reported_load
        if load is not None and now - self.load_updated_at > stale_secs:
            load = None  # stale: policies treat the worker's load as unknown
        in_flight = self.shared_load(now, stale_secs) if shared else self.in_flight
        report = self.fresh_report(now, stale_secs)
        last = self._view
        if last is not None and last.in_flight == in_flight and last.reported_load == load \
                and last.report is report:
            return last  # immutable, so sharing it is safe; id and URL never change
        last = self._view = WorkerView(self.worker_id, self.url, in_flight, load, report)
        return last

    @property
    def display_id(self) -> str:
        """The id without credentials. A DP rank's `URL@RANK` keeps its suffix: redacting the
        whole id would read `host:port@rank` as `user:password@host`."""
        if self.dp_rank is not None and self.worker_id.endswith(f"@{self.dp_rank}"):
            base = self.worker_id[: -len(f"@{self.dp_rank}")]
            return f"{redact_url(base)}@{self.dp_rank}"
        return redact_url(self.worker_id)

    @property
    def available(self) -> bool:
        return self.healthy and self.breaker.allows()

    def to_json(self) -> dict[str, Any]:
        # Redacted although `check_url` refuses credentials: a display path never echoes them.
        # smg 1.13's fields first (`status`, `connection_mode`, `load`: its in-flight count),
        # then ours.
        return {
            "id": self.display_id, "url": redact_url(self.url), "worker_type": self.role,
            "connection_mode": "http", "is_healthy": self.healthy,
            "status": "ready" if self.healthy else "unhealthy", "load": self.in_flight,
            "bootstrap_port": self.bootstrap_port, "dp_rank": self.dp_rank,
            "dp_size": self.dp_size, "circuit_state": self.breaker.state,
            "in_flight": self.in_flight,
            "reported_load": self.reported_load, "available": self.available,
        }


class WorkerRegistry:
    def __init__(self, breaker_config: BreakerConfig, load_stale_secs: float,
                 shared_load: bool = False) -> None:
        self._breaker_config = breaker_config
        self._stale = load_stale_secs
        # --load-view reported: views carry `Worker.shared_load` as their in-flight count.
        self._shared_load = shared_load
        self._workers: dict[str, Worker] = {}

    def add(self, url: str, role: str, bootstrap_port: int | None = None,
            worker_id: str | None = None, dp_rank: int | None = None,
            dp_size: int | None = None) -> Worker:
        if role not in ROLES:
            raise BadRequestError(f"worker_type must be one of {', '.join(ROLES)}; got {role!r}")
        url = url.rstrip("/")
        wid = worker_id or url
        if wid in self._workers:
            raise ConflictError(f"worker {wid!r} is already registered")
        if role != "prefill" and bootstrap_port is not None:
            raise BadRequestError("bootstrap_port: only prefill workers have a bootstrap port")
        worker = Worker(wid, url, role, bootstrap_port, CircuitBreaker(self._breaker_config),
                        dp_rank=dp_rank, dp_size=dp_size)
        self._workers[wid] = worker
        return worker

    def remove(self, worker_id: str) -> Worker:
        try:
            return self._workers.pop(worker_id)
        except KeyError:
            raise NotFoundError(f"worker {worker_id!r} is not registered") from None

    def get(self, worker_id: str) -> Worker:
        try:
            return self._workers[worker_id]
        except KeyError:
            raise NotFoundError(f"worker {worker_id!r} is not registered") from None

    def find(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)

    def by_role(self, role: str) -> list[Worker]:
        return [w for w in self._workers.values() if w.role == role]

    def available(self, role: str) -> list[Worker]:
        return [w for w in self._workers.values() if w.role == role and w.available]

    def views(self, workers: list[Worker]) -> list[WorkerView]:
        now = time.monotonic()
        return [w.view(now, self._stale, self._shared_load) for w in workers]

    def has_healthy(self, role: str) -> bool:
        return any(w.healthy for w in self._workers.values() if w.role == role)

"""Prometheus metrics for the gateway: a per-app registry and a thin `record_*` facade.

Every metric is registered on the app's own `CollectorRegistry` (no global default registry, so
tests can build many apps in one process). Names carry the `eldr_` prefix; counters end in
`_total`, durations are `_seconds` histograms. Request-duration buckets reach 30 minutes because
LLM requests with long outputs legitimately run for minutes (the Rust router's request timeout
default is 1800 s); TTFT and inter-token buckets are finer at the low end where they live.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.circuit import STATE_CODES

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120,
                   300, 600, 1200, 1800)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5,
               5, 10)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter("eldr_requests_total", "Client requests by endpoint and status",
                                ["endpoint", "status"], registry=registry)
        self.request_duration = Histogram(
            "eldr_request_duration_seconds", "Client request duration (through stream end)",
            ["endpoint"], buckets=REQUEST_BUCKETS, registry=registry)
        self.active = Gauge("eldr_worker_active_requests",
                            "Gateway-counted in-flight requests per worker", ["worker", "role"],
                            registry=registry)
        self.selections = Counter("eldr_worker_selections_total",
                                  "Worker selections by role, policy and worker",
                                  ["role", "policy", "worker"], registry=registry)
        self.retries = Counter("eldr_retries_total", "Retried attempts by endpoint",
                               ["endpoint"], registry=registry)
        self.circuit_state = Gauge("eldr_worker_circuit_state",
                                   "Circuit state per worker: 0 closed, 1 open, 2 half-open",
                                   ["worker"], registry=registry)
        self.worker_healthy = Gauge("eldr_worker_healthy", "1 when the worker is healthy",
                                    ["worker", "role"], registry=registry)
        self.health_checks = Counter("eldr_health_checks_total", "Health checks by result",
                                     ["worker", "result"], registry=registry)
        self.upstream_errors = Counter("eldr_upstream_errors_total",
                                       "Upstream failures by worker, role and kind",
                                       ["worker", "role", "kind"], registry=registry)
        self.ttft = Histogram("eldr_time_to_first_token_seconds",
                              "Gateway-measured time to first streamed chunk", ["endpoint"],
                              buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("eldr_inter_token_latency_seconds",
                             "Gateway-measured gap between streamed chunks", ["endpoint"],
                             buckets=ITL_BUCKETS, registry=registry)
        self.worker_load = Gauge("eldr_worker_reported_load_tokens",
                                 "Worker-reported num_total_tokens (sum over DP ranks)",
                                 ["worker"], registry=registry)
        self.queue_rejections = Counter("eldr_rate_limit_rejections_total",
                                        "Requests rejected by the concurrency limiter",
                                        ["reason"], registry=registry)

        # Labelled children are cached: `labels()` takes a lock and builds a key on every call,
        # which profiling showed as a visible share of per-request CPU on the hot path.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._circuit_seen: dict[str, str] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def record_request(self, endpoint: str, status: int, seconds: float) -> None:
        self._child(self.requests, endpoint, str(status)).inc()
        self._child(self.request_duration, endpoint).observe(seconds)

    def record_selection(self, role: str, policy: str, worker: str) -> None:
        self._child(self.selections, role, policy, worker).inc()

    def record_active(self, worker: str, role: str, delta: int) -> None:
        self._child(self.active, worker, role).inc(delta)

    def record_retry(self, endpoint: str) -> None:
        self.retries.labels(endpoint).inc()

    def record_circuit_state(self, worker: str, state: str) -> None:
        if self._circuit_seen.get(worker) != state:
            self._circuit_seen[worker] = state
            self.circuit_state.labels(worker).set(STATE_CODES[state])

    def record_health(self, worker: str, role: str, healthy: bool, check_ok: bool) -> None:
        self.worker_healthy.labels(worker, role).set(1 if healthy else 0)
        self.health_checks.labels(worker, "ok" if check_ok else "fail").inc()

    def record_upstream_error(self, worker: str, role: str, kind: str) -> None:
        self.upstream_errors.labels(worker, role, kind).inc()

    def record_ttft(self, endpoint: str, seconds: float) -> None:
        self._child(self.ttft, endpoint).observe(seconds)

    def record_itl(self, endpoint: str, seconds: float) -> None:
        self._child(self.itl, endpoint).observe(seconds)

    def record_worker_load(self, worker: str, tokens: int | None) -> None:
        self.worker_load.labels(worker).set(-1 if tokens is None else tokens)

    def record_rejection(self, reason: str) -> None:
        self.queue_rejections.labels(reason).inc()

    def forget_worker(self, worker: str, role: str) -> None:
        """Drop a removed worker's labelled series so dashboards do not show ghosts."""
        self._children = {k: v for k, v in self._children.items() if worker not in k[1]}
        self._circuit_seen.pop(worker, None)
        for gauge, labels in ((self.active, (worker, role)), (self.circuit_state, (worker,)),
                              (self.worker_healthy, (worker, role)), (self.worker_load, (worker,))):
            try:
                gauge.remove(*labels)
            except KeyError:
                continue

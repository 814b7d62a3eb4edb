"""`/metrics` of one emulated worker: SGLang's `sglang:` names plus `emulator_` step statistics.

Names, label sets and histogram buckets follow sglang 0.5.23
`srt/observability/metrics_collector.py` (SchedulerMetricsCollector, TokenizerMetricsCollector):
gauges `sglang:num_running_reqs`, `num_queue_reqs`, `gen_throughput`, `cache_hit_rate`,
`token_usage`, `num_used_tokens`, `num_prefill_bootstrap_queue_reqs`,
`num_decode_prealloc_queue_reqs`; counters
`sglang:prompt_tokens_total`, `generation_tokens_total`, `num_requests_total`,
`cached_tokens_total` (label `cache_source`: "device", as SGLang reports a plain radix-cache
hit via `cached_tokens_details` {"device": N, "host": 0}),
`num_bootstrap_failed_reqs_total`, `num_transfer_failed_reqs_total`; histograms
`sglang:time_to_first_token_seconds`, `inter_token_latency_seconds`,
`request_time_per_output_token_seconds`, `e2e_request_latency_seconds`. Labels: `model_name`
(+ `is_streaming` where SGLang has it).

One registry per worker (no globals), so many workers share a process. Engine statistics are read
at scrape time by a custom collector, so the decode loop does no metric bookkeeping.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from loadtest.emulator.worker import Worker

# sglang 0.5.23 metrics_collector.py default buckets (seconds), trimmed of sub-ms detail.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 15.0, 20.0, 25.0, 30.0, 60.0, 120.0, 300.0)
_ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.06,
                0.08, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 60, 80, 100, 150, 200, 300, 600)
_THROUGHPUT_WINDOW_S = 10.0


class WorkerMetrics:
    """Thin facade: `on_*` hooks from the request path, `render()` for `/metrics`."""

    def __init__(self, worker: Worker) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._worker = worker
        model = worker.config.engine.model if worker.config.engine.routing != "trace" \
            else worker.geometry.name
        self._labels = {"model_name": model}
        names = ["model_name"]
        stream_names = [*names, "is_streaming"]
        r = self.registry
        self.prompt_tokens = Counter("sglang:prompt_tokens", "Number of prefill tokens processed.",
                                     stream_names, registry=r)
        self.generation_tokens = Counter("sglang:generation_tokens",
                                         "Number of generation tokens processed.",
                                         stream_names, registry=r)
        self.requests = Counter("sglang:num_requests", "The number of processed requests.",
                                stream_names, registry=r)
        self.cached_tokens = Counter("sglang:cached_tokens",
                                     "Number of cached prompt tokens by source "
                                     "(device/host/storage).", [*names, "cache_source"],
                                     registry=r)
        self.bootstrap_failures = Counter("sglang:num_bootstrap_failed_reqs",
                                          "Number of bootstrap failed requests.", names, registry=r)
        self.transfer_failures = Counter("sglang:num_transfer_failed_reqs",
                                         "Number of transfer failed requests.", names, registry=r)
        self.ttft = Histogram("sglang:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", stream_names,
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("sglang:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", names,
                             buckets=_ITL_BUCKETS, registry=r)
        self.tpot = Histogram("sglang:request_time_per_output_token_seconds",
                              "Per-request TPOT in seconds.", stream_names,
                              buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("sglang:e2e_request_latency_seconds",
                             "Histogram of End-to-end request latency in seconds", stream_names,
                             buckets=_E2E_BUCKETS, registry=r)
        # on_inter_token runs once per emitted token: resolve its labelled child once here
        # (`.labels()` hashes and looks up the label values on every call).
        self._itl_child = self.itl.labels(**self._labels)
        self._generated: deque[tuple[float, int, int]] = deque()   # (time, tokens, dp rank)
        r.register(_LoadCollector(worker, self))

    def _s(self, stream: bool) -> dict[str, str]:
        return {**self._labels, "is_streaming": str(stream).lower()}

    def on_arrival(self, prompt_tokens: int, stream: bool) -> None:
        self.prompt_tokens.labels(**self._s(stream)).inc(prompt_tokens)

    def on_first_token(self, stream: bool, seconds: float) -> None:
        self.ttft.labels(**self._s(stream)).observe(seconds)

    def on_inter_token(self, seconds: float) -> None:
        self._itl_child.observe(seconds)

    def on_finish(self, stream: bool, arrival: float, completion_tokens: int,
                  first_at: float | None, last_at: float | None, cached_tokens: int = 0,
                  dp_rank: int = 0) -> None:
        now = time.perf_counter()
        s = self._s(stream)
        if cached_tokens > 0:
            # metrics_collector.py observe_one_finished_request -> report_cache_source.
            self.cached_tokens.labels(**self._labels, cache_source="device").inc(cached_tokens)
        self.requests.labels(**s).inc()
        self.generation_tokens.labels(**s).inc(completion_tokens)
        self.e2e.labels(**s).observe(now - arrival)
        if first_at is not None and last_at is not None and completion_tokens > 1:
            self.tpot.labels(**s).observe((last_at - first_at) / (completion_tokens - 1))
        self._generated.append((time.monotonic(), completion_tokens, dp_rank))

    def bootstrap_failed(self) -> None:
        self.bootstrap_failures.labels(**self._labels).inc()

    def transfer_failed(self) -> None:
        self.transfer_failures.labels(**self._labels).inc()

    def gen_throughput(self, dp_rank: int | None = None) -> float:
        """Generated tokens per second over the last window (SGLang logs the same per interval),
        of the whole worker or of one DP rank's requests."""
        now = time.monotonic()
        while self._generated and now - self._generated[0][0] > _THROUGHPUT_WINDOW_S:
            self._generated.popleft()
        return sum(n for _, n, r in self._generated
                   if dp_rank is None or r == dp_rank) / _THROUGHPUT_WINDOW_S

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LoadCollector(Collector):
    """Scrape-time gauges from the engines, and the emulator's decode-step statistics."""

    def __init__(self, worker: Worker, metrics: WorkerMetrics) -> None:
        self._worker = worker
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        # Scrape-time values only: nothing to describe up front (and the worker may not be
        # fully constructed when the collector is registered).
        return []

    def collect(self) -> Iterator[Metric]:
        w = self._worker
        labels = list(self._metrics._labels)
        values = list(self._metrics._labels.values())
        snaps = w.load_snapshots()
        snap = snaps[0] if len(snaps) == 1 else _summed(snaps, w.prefix_stats.last_hit_rate)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        yield gauge("sglang:num_running_reqs", "The number of running requests.",
                    snap["num_running_reqs"])
        yield gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.",
                    snap["num_waiting_reqs"])
        yield gauge("sglang:num_used_tokens", "The number of used tokens.",
                    snap["num_used_tokens"])
        yield gauge("sglang:token_usage", "The token usage.", snap["token_usage"])
        yield gauge("sglang:gen_throughput", "The generation throughput (token/s).",
                    snap["gen_throughput"])
        yield gauge("sglang:cache_hit_rate", "The prefix cache hit rate.",
                    snap["cache_hit_rate"])
        yield gauge("sglang:num_prefill_bootstrap_queue_reqs",
                    "The number of requests in the prefill bootstrap queue.", w.bootstrap_queue)
        yield gauge("sglang:num_decode_prealloc_queue_reqs",
                    "The number of requests in the decode prealloc queue.", w.transfer_queue)
        yield gauge("emulator_held_kv_rooms",
                    "Prefill-first rooms whose KV is held for a decode.", w.registry.held_rooms)
        stats = w.decode_engine.stats()
        fields: dict[str, Any] = {
            "emulator_decode_steps": ("Decode steps run.", stats.steps),
            "emulator_decode_tokens": ("Tokens emitted by decode steps.", stats.tokens),
            "emulator_decode_batch_size_sum": ("Sum over steps of the batch size.",
                                               stats.batch_size_sum),
            "emulator_distinct_experts_per_layer_sum": (
                "Sum over steps of the mean-over-layers number of distinct experts.",
                stats.distinct_experts_sum),
            "emulator_step_seconds_sum": ("Sum over steps of the emulated step time.",
                                          stats.step_seconds_sum),
            "emulator_host_lag_seconds": (
                "Sum over steps of wall time beyond the modelled step time (host overload).",
                stats.host_lag_seconds_sum),
            "emulator_lagged_steps": ("Steps whose wall time overran the modelled time.",
                                      stats.lagged_steps),
        }
        for name, (doc, value) in fields.items():
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, float(value))
            yield c
        for name, doc, snap_h in (
            ("emulator_distinct_experts_per_layer",
             "Distinct experts activated per MoE layer per decode step.",
             stats.distinct_experts_per_layer),
            ("emulator_batch_size", "Decode batch size per step.", stats.batch_size),
            ("emulator_step_seconds", "Modelled decode step time in seconds.",
             stats.step_seconds),
        ):
            h = HistogramMetricFamily(name, doc, labels=labels)
            h.add_metric(values, [(_le(b), float(c)) for b, c in snap_h.cumulative()],
                         sum_value=float(snap_h.sum))
            yield h
        steps = max(stats.steps, 1)
        yield gauge("emulator_mean_batch_size", "Mean decode batch size over all steps.",
                    stats.batch_size_sum / steps)
        yield gauge("emulator_mean_distinct_experts_per_layer",
                    "Mean over steps of distinct experts per MoE layer.",
                    stats.distinct_experts_sum / steps)
        yield gauge("emulator_mean_step_seconds", "Mean emulated decode step time.",
                    stats.step_seconds_sum / steps)


def _summed(snaps: list[dict[str, Any]], hit_rate: float) -> dict[str, Any]:
    """One worker-wide view of several DP ranks' loads for the unlabelled gauges."""
    out = {k: sum(s[k] for s in snaps) for k in ("num_running_reqs", "num_waiting_reqs",
                                                  "num_used_tokens", "gen_throughput")}
    capacity = sum(s["max_total_num_tokens"] for s in snaps)
    out["token_usage"] = out["num_used_tokens"] / capacity
    out["cache_hit_rate"] = hit_rate
    return out


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))

"""smg 1.13's `least_load`: least expected wait from worker-reported work (`--least-load-metric
expected_wait`).

smg (model_gateway/src/policies/least_load.rs) routes to the worker with the lowest

    score = (queued_tokens + inflight_tokens) / throughput + kv_pressure_weight * k / (1 - k)

- `queued_tokens`: the worker's reported `num_waiting_uncached_tokens`, or, when it reports
  none, `num_waiting_reqs * mean_prefill_tokens`;
- `inflight_tokens`: token work this router dispatched to the worker since its last report (the
  HTTP path does not tokenize, so each request counts `mean_prefill_tokens`); reset by every
  fresh report, so a burst between polls water-fills instead of herding onto one worker;
- `throughput`: the reported `gen_throughput`, or `default_throughput` when it is 0;
- `k`: the reported KV `token_usage` (mean over DP ranks), clamped to [0, 0.999]: the M/M/1
  occupancy barrier, steep near a full KV cache.

A worker without a fresh report while others have one is scored `in_flight * mean_prefill_tokens
/ nominal_throughput` (nominal = mean reported throughput of the candidates); with no report at
all, join-shortest-queue on in-flight requests. Ties are broken uniformly at random, as smg's
reservoir sampling does. `max_waiting_requests` > 0 vetoes workers whose reported waiting
requests plus requests dispatched since the report reached it; smg then returns no worker (the
request waits in its admission queue), here the veto is dropped when it would leave no candidate
(this gateway's admission queue sits before selection, not after).

Differences kept on purpose: our reports come every `--load-poll-interval-secs` (0.25 s; smg:
`--load-monitor-interval`, 10 s), so the since-poll term is smaller; everything else is smg's
arithmetic with smg's defaults.
"""

from __future__ import annotations

import random as _random
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.config import Settings
from gateway.routing import LoadReport, RoutingInput, Selection, WorkerView

KV_BARRIER_CLAMP = 0.999  # smg clamps k to [0, 0.999] so the barrier stays finite


@dataclass(slots=True)
class _SincePoll:
    seq: int  # the report this tally counts from
    tokens: float = 0.0
    requests: int = 0


class ExpectedWaitPolicy:
    name = "least_load"
    needs_signature = False
    needs_request = False

    def __init__(self, *, kv_pressure_weight: float, default_throughput: float,
                 mean_prefill_tokens: int, max_waiting_requests: int,
                 rng: _random.Random | None = None) -> None:
        self._kv_weight = kv_pressure_weight
        self._default_tp = default_throughput
        self._mean_tokens = float(max(1, mean_prefill_tokens))
        self._max_waiting = max_waiting_requests
        self._rng = rng or _random.Random()
        self._since: dict[str, _SincePoll] = {}

    @classmethod
    def from_settings(cls, settings: Settings,
                      rng: _random.Random | None = None) -> ExpectedWaitPolicy:
        return cls(kv_pressure_weight=settings.least_load_kv_pressure_weight,
                   default_throughput=settings.least_load_default_throughput,
                   mean_prefill_tokens=settings.least_load_mean_prefill_tokens,
                   max_waiting_requests=settings.least_load_max_waiting_requests, rng=rng)

    def _tally(self, view: WorkerView) -> _SincePoll:
        """This worker's since-report dispatches, reset when a newer report arrived."""
        seq = view.report.seq if view.report is not None else -1
        tally = self._since.get(view.worker_id)
        if tally is None or tally.seq != seq:
            tally = self._since[view.worker_id] = _SincePoll(seq)
        return tally

    def _queued_tokens(self, report: LoadReport) -> float:
        if report.waiting_uncached_tokens > 0:
            return float(report.waiting_uncached_tokens)
        return max(0, report.waiting_reqs) * self._mean_tokens

    def score(self, view: WorkerView, nominal_tp: float, fleet_reports: bool) -> float:
        report = view.report
        if report is not None:
            tp = report.gen_throughput if report.gen_throughput > 0 else self._default_tp
            k = min(max(report.token_usage, 0.0), KV_BARRIER_CLAMP)
            work = self._queued_tokens(report) + self._tally(view).tokens
            return work / tp + self._kv_weight * k / (1.0 - k)
        if fleet_reports:
            return view.in_flight * self._mean_tokens / nominal_tp
        return float(view.in_flight)

    def select(self, candidates: Sequence[WorkerView], routing: RoutingInput) -> Selection:
        pool = list(candidates)
        if len(self._since) > 2 * len(pool) + 16:  # workers that left: forget their tallies
            ids = {v.worker_id for v in pool}
            self._since = {k: t for k, t in self._since.items() if k in ids}
        if self._max_waiting > 0:
            kept = [v for v in pool if v.report is None
                    or v.report.waiting_reqs + self._tally(v).requests < self._max_waiting]
            pool = kept or pool  # all at the cap: choose among all (module docstring)
        throughputs = [v.report.gen_throughput for v in pool
                       if v.report is not None and v.report.gen_throughput > 0]
        nominal = sum(throughputs) / len(throughputs) if throughputs else self._default_tp
        fleet_reports = any(v.report is not None for v in pool)
        best: WorkerView = pool[0]
        best_score = self.score(best, nominal, fleet_reports)
        tied = 1
        for view in pool[1:]:
            s = self.score(view, nominal, fleet_reports)
            if s < best_score:
                best, best_score, tied = view, s, 1
            elif s == best_score:
                tied += 1  # reservoir sampling: uniform over all tied workers
                if self._rng.randrange(tied) == 0:
                    best = view
        tally = self._tally(best)
        tally.tokens += self._mean_tokens
        tally.requests += 1
        return Selection(worker=best)

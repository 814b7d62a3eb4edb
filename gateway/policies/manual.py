"""Sticky routing by routing key (smg 1.13 `ManualPolicy`).

A request's routing key (the first `--routing-key-headers` header present, `x-smg-routing-key` by
default) pins to a worker. A new key gets a worker by `--assignment-mode`: `random`, or
`min_load` (fewest in-flight requests, ties at random). A key remembers up to two workers, the
newest last: when none of them is a candidate the key gets a new worker, which joins the list
(dropping the oldest), so when the first recovers the key goes back to it, as in Rust. Workers
joining never move existing keys. A request without a key is assigned by the same mode and pins
nothing.

Keys unused for `max_idle_secs` are dropped by a sweep that runs lazily inside `select`, at most
once per `eviction_interval_secs` (smg's periodic task). Each policy instance is one role's, so
prefill and decode keys stick independently (smg namespaces its PD legs' keys to the same end).
smg's other modes (`min_group`, `delegate`) are not offered.
"""

from __future__ import annotations

import random as _random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.config import Settings
from gateway.routing import Policy, RoutingInput, Selection, WorkerView

MAX_CANDIDATE_WORKERS = 2
ASSIGNMENT_MODES = ("random", "min_load")


@dataclass(slots=True)
class _Pin:
    workers: list[str]  # worker ids, oldest first
    last_access: float


class ManualPolicy:
    name = "manual"
    needs_signature = False
    needs_request = True

    def __init__(self, *, assignment_mode: str = "random", max_idle_secs: float = 14400,
                 eviction_interval_secs: float = 60,
                 clock: Callable[[], float] = time.monotonic,
                 rng: _random.Random | None = None) -> None:
        if assignment_mode not in ASSIGNMENT_MODES:
            raise ValueError(f"assignment_mode must be one of {ASSIGNMENT_MODES}")
        self.assignment_mode = assignment_mode
        self.max_idle_secs = max_idle_secs
        self.eviction_interval_secs = eviction_interval_secs
        self._clock = clock
        self._rng = rng or _random.Random()
        self._pins: dict[str, _Pin] = {}
        self._last_sweep = clock()

    @classmethod
    def from_settings(cls, settings: Settings, *, rng: _random.Random | None = None,
                      clock: Callable[[], float] = time.monotonic) -> ManualPolicy:
        return cls(assignment_mode=settings.assignment_mode,
                   max_idle_secs=settings.max_idle_secs,
                   eviction_interval_secs=settings.eviction_interval_secs, clock=clock, rng=rng)

    def __len__(self) -> int:
        return len(self._pins)

    def select(self, candidates: Sequence[WorkerView], routing: RoutingInput) -> Selection:
        now = self._clock()
        if (self.eviction_interval_secs > 0 and self.max_idle_secs > 0
                and now - self._last_sweep >= self.eviction_interval_secs):
            self.sweep(now)
        key = routing.routing_key
        if not key:
            return self._choose(candidates, routing)
        pin = self._pins.get(key)
        if pin is None:
            chosen = self._choose(candidates, routing)
            self._pins[key] = _Pin([chosen.worker.worker_id], now)
            return chosen
        pin.last_access = now
        by_id = {view.worker_id: view for view in candidates}
        for worker_id in pin.workers:
            found = by_id.get(worker_id)
            if found is not None:
                return Selection(worker=found)
        chosen = self._choose(candidates, routing)
        del pin.workers[:len(pin.workers) - MAX_CANDIDATE_WORKERS + 1]
        pin.workers.append(chosen.worker.worker_id)
        return chosen

    def pinned(self, key: str) -> tuple[str, ...]:
        """The workers a key remembers, oldest first (empty when unknown)."""
        pin = self._pins.get(key)
        return tuple(pin.workers) if pin else ()

    def sweep(self, now: float | None = None) -> int:
        """Drop keys idle for `max_idle_secs` or more; returns how many."""
        now = self._clock() if now is None else now
        self._last_sweep = now
        idle = [k for k, pin in self._pins.items() if now - pin.last_access >= self.max_idle_secs]
        for key in idle:
            del self._pins[key]
        return len(idle)

    def _choose(self, candidates: Sequence[WorkerView], routing: RoutingInput) -> Selection:
        """A worker for a request without a key, or for a key that has none available."""
        return Selection(worker=self._assign(candidates))

    def _assign(self, candidates: Sequence[WorkerView]) -> WorkerView:
        if self.assignment_mode == "min_load":
            low = min(view.in_flight for view in candidates)
            ties = [view for view in candidates if view.in_flight == low]
            return ties[0] if len(ties) == 1 else ties[self._rng.randrange(len(ties))]
        return candidates[self._rng.randrange(len(candidates))]


class StickyPolicy(ManualPolicy):
    """`--routing-key-override` / `--sticky-sessions` (smg 1.13): on any policy, every request
    with the same routing key goes to the same worker. The wrapped policy chooses for requests
    without a key and for a key's first request (or when its workers are unavailable), so its
    own decision (an `eldr` zone, a `cache_aware` hit) is kept there; pins then work as in
    `ManualPolicy`."""

    def __init__(self, inner: Policy, *, max_idle_secs: float = 14400,
                 eviction_interval_secs: float = 60,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(max_idle_secs=max_idle_secs,
                         eviction_interval_secs=eviction_interval_secs, clock=clock)
        self.inner = inner
        self.name = inner.name
        self.needs_signature = inner.needs_signature

    def _choose(self, candidates: Sequence[WorkerView], routing: RoutingInput) -> Selection:
        return self.inner.select(candidates, routing)

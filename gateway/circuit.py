"""Per-worker circuit breaker (sgl-router `core/circuit_breaker.rs` semantics).

closed --(failure_threshold failures within window)--> open
open --(timeout elapsed; next check)--> half_open
half_open --(success_threshold successes)--> closed;  half_open --(any failure)--> open
Defaults (10 / 3 / 60 s / 120 s) are the Rust router's CircuitBreakerConfig defaults. Pure: the
clock is injected so tests drive it without sleeping.

Half-open admits trial requests one at a time, at most one per `HALF_OPEN_TRIAL_SECS`
(dispatch calls `trial_started` when it picks a half-open worker): a worker that is still
broken costs one request, not every request that arrives while its circuit is half-open. Gated
by time rather than by counting outcomes, so a trial whose outcome is never reported (its client
left) cannot keep the worker out of rotation.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
HALF_OPEN_TRIAL_SECS = 1.0
STATE_CODES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failure_threshold: int = 10
    success_threshold: int = 3
    timeout_secs: float = 60.0
    window_secs: float = 120.0
    enabled: bool = True


class CircuitBreaker:
    def __init__(self, config: BreakerConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._state = CLOSED
        self._failures: deque[float] = deque()
        self._opened_at = 0.0
        self._half_open_successes = 0
        self._trial_at = float("-inf")  # when the last half-open trial request was admitted

    @property
    def state(self) -> str:
        """Current state; an open circuit whose timeout elapsed reads (and becomes) half-open."""
        if self._state == OPEN and self._clock() - self._opened_at >= self._config.timeout_secs:
            self._state = HALF_OPEN
            self._half_open_successes = 0
        return self._state

    def allows(self) -> bool:
        if not self._config.enabled:
            return True
        state = self.state
        if state == HALF_OPEN:
            return self._clock() - self._trial_at >= HALF_OPEN_TRIAL_SECS
        return state != OPEN

    def trial_started(self) -> None:
        """A request was sent to this worker; while half-open, the next trial must wait."""
        if self._state == HALF_OPEN:
            self._trial_at = self._clock()

    def record_success(self) -> None:
        state = self.state
        if state == HALF_OPEN:
            self._half_open_successes += 1
            if self._half_open_successes >= self._config.success_threshold:
                self._state = CLOSED
                self._failures.clear()
        elif state == CLOSED:
            # A success breaks a run of failures, as the Rust breaker's consecutive-failure count.
            self._failures.clear()

    def record_failure(self) -> None:
        if not self._config.enabled:
            return
        now = self._clock()
        state = self.state
        if state == HALF_OPEN:
            self._open(now)
            return
        if state == OPEN:
            return
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self._config.window_secs:
            self._failures.popleft()
        if len(self._failures) >= self._config.failure_threshold:
            self._open(now)

    def _open(self, now: float) -> None:
        self._state = OPEN
        self._opened_at = now
        self._failures.clear()
        self._half_open_successes = 0

"""Retry decisions and backoff (sgl-router `core/retry.rs`).

Retryable statuses are the Rust router's `is_retryable_status`: 408, 429, 500, 502, 503, 504.
`max_attempts` counts the first try (the Rust launcher documents --disable-retries as
"equivalent to setting retry_max_retries=1"). Delay for retry n (0-based) is
`min(initial * multiplier**n, max)` scaled by a uniform factor in [1 - jitter, 1 + jitter].
"""

from __future__ import annotations

import random
from dataclasses import dataclass

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUSES


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_attempts: int = 5
    initial_backoff_ms: int = 50
    max_backoff_ms: int = 30000
    multiplier: float = 1.5
    jitter_factor: float = 0.2

    def backoff_secs(self, retry_index: int, rng: random.Random) -> float:
        base = min(self.initial_backoff_ms * self.multiplier ** retry_index, self.max_backoff_ms)
        if self.jitter_factor > 0:
            base *= 1.0 + self.jitter_factor * rng.uniform(-1.0, 1.0)
        return max(base, 0.0) / 1000.0

"""Concurrency limit with a bounded wait queue (the Rust router's `--max-concurrent-requests`,
`--queue-size`, `--queue-timeout-secs`).

-1 disables the limit. When all slots are taken, up to `queue_size` requests wait (FIFO) for at
most `queue_timeout_secs`; a full queue is answered 429, an expired wait 503 (smg 1.13's codes).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from gateway.errors import OverloadedError, QueueTimeoutError


class ConcurrencyLimiter:
    def __init__(self, max_concurrent: int, queue_size: int, queue_timeout: float) -> None:
        self._max = max_concurrent
        self._queue_size = queue_size
        self._timeout = queue_timeout
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def enabled(self) -> bool:
        return self._max > 0

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if not self.enabled:
            yield
            return
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self._active < self._max and not self._waiters:
            self._active += 1
            return
        if len(self._waiters) >= self._queue_size:
            raise OverloadedError(
                f"too many concurrent requests: {self._max} active and the queue "
                f"(queue_size={self._queue_size}) is full")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self._timeout)
        except asyncio.TimeoutError:
            if fut.done():  # the slot was handed over just as the wait expired: give it back
                self._release()
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise QueueTimeoutError(
                f"request waited longer than queue_timeout_secs={self._timeout} for a slot"
            ) from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def _release(self) -> None:
        # Hand the slot straight to the oldest live waiter (active count unchanged), else free it.
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self._active -= 1


class AdmissionRate:
    """`--rate-limit-tokens-per-second` (smg 1.13: a sustained admission rate in requests per
    second, bursting up to `--max-concurrent-requests`): a token bucket in front of the
    concurrency limit.

    A request that finds the bucket empty reserves the next token (the count goes negative), so
    waiters are served in arrival order, and sleeps until it is due; a wait longer than
    `queue_timeout` is answered 503 at once rather than after the timeout, and more than
    `queue_size` sleepers 429, as the concurrency queue answers.
    """

    def __init__(self, rate: float, burst: int, queue_size: int, queue_timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._burst = float(max(1, burst))
        self._queue_size = queue_size
        self._timeout = queue_timeout
        self._clock = clock
        self._tokens = self._burst
        self._last = clock()
        self._sleeping = 0

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now

    async def admit(self) -> None:
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return
        if self._sleeping >= self._queue_size:
            raise OverloadedError(f"admission rate ({self._rate:g}/s) exceeded and "
                                  f"{self._sleeping} requests already wait (queue_size)")
        wait = (1.0 - self._tokens) / self._rate
        if wait > self._timeout:
            raise QueueTimeoutError(f"admission rate ({self._rate:g}/s): the next slot is "
                                    f"{wait:.1f}s away, over queue_timeout_secs={self._timeout}")
        self._tokens -= 1.0  # reserved: later arrivals queue behind this one
        self._sleeping += 1
        try:
            await asyncio.sleep(wait)
        except asyncio.CancelledError:
            self._tokens += 1.0  # the client left: its reservation goes to the next one
            raise
        finally:
            self._sleeping -= 1

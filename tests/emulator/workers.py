"""Shared helpers of the emulator tests: one emulated worker over HTTP, and polling."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from loadtest.emulator.config import EngineOptions, WorkerConfig
from loadtest.emulator.server import WorkerServer


@contextlib.asynccontextmanager
async def worker(role: str = "regular", **engine: Any) -> AsyncIterator[WorkerServer]:
    """One emulated worker on a loopback port; instant (no modelled time) unless overridden."""
    opts = EngineOptions(**{"instant": True, **engine})
    async with WorkerServer(WorkerConfig(role=role, engine=opts)) as server:  # type: ignore[arg-type]
        yield server


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)

"""Subprocess management for experiments: start, wait until ready, sample CPU, always stop.

Every child is started in its own session (process group) so that stopping it also stops any
helper processes it spawned, and only those. Every wait is bounded. Output goes to a log file
next to the results so a failed start can be diagnosed from the error message alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson
import psutil

STOP_GRACE_SECONDS = 10.0
LOG_TAIL_CHARS = 2000


class ProcessStartError(RuntimeError):
    """A child process exited or did not become ready in time; the message has its log tail."""


def free_port() -> int:
    """A currently free loopback TCP port (bind to 0). Racy by nature, so callers retry."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_block(count: int, start: int = 20000, end: int = 60000) -> int:
    """First port P in [start, end) with P..P+count-1 all bindable on loopback."""
    port = start
    while port + count <= end:
        for offset in range(count):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port + offset))
                except OSError:
                    port += offset + 1
                    break
        else:
            return port
    raise ProcessStartError(f"no block of {count} free ports in [{start}, {end})")


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-LOG_TAIL_CHARS:].decode("utf-8", errors="replace")


@dataclass(slots=True)
class ManagedProcess:
    """A child process with its log file; use `async with` or call `stop()` in a finally."""

    name: str
    argv: list[str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)
    _pump: asyncio.Task[None] | None = field(default=None, repr=False)

    async def start(
        self, *, capture_stdout: bool = False, env: dict[str, str] | None = None
    ) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._log.write(f"$ {' '.join(self.argv)}\n".encode())
        self._log.flush()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdout=asyncio.subprocess.PIPE if capture_stdout else self._log,
            stderr=self._log,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ProcessStartError(f"{self.name} was not started")
        return self.proc.pid

    def failure(self, what: str) -> ProcessStartError:
        return ProcessStartError(
            f"{self.name} {what}; log {self.log_path}:\n{_tail(self.log_path)}"
        )

    async def read_json_line(self, timeout: float) -> dict[str, Any]:
        """The first stdout line that is a JSON object (the rest of stdout goes to the log)."""
        if self.proc is None or self.proc.stdout is None:
            raise ProcessStartError(f"{self.name}: stdout is not captured")
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.failure(f"printed no JSON line within {timeout:.0f}s")
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
            except asyncio.TimeoutError:
                continue
            if not line:
                raise self.failure("exited before printing its JSON line")
            if self._log is not None:
                self._log.write(line)
                self._log.flush()
            with contextlib.suppress(orjson.JSONDecodeError):
                obj = orjson.loads(line)
                if isinstance(obj, dict):
                    self._drain_stdout()
                    return obj

    def _drain_stdout(self) -> None:
        """Keep copying stdout to the log so the child never blocks on a full pipe."""
        if self.proc is None or self.proc.stdout is None:
            return
        reader, log = self.proc.stdout, self._log

        async def pump() -> None:
            while line := await reader.readline():
                if log is not None and not log.closed:
                    log.write(line)
                    log.flush()

        self._pump = asyncio.get_running_loop().create_task(pump())

    async def wait_http_ok(self, url: str, timeout: float, interval: float = 0.2) -> None:
        """Poll `url` until it answers 200; fail early when the child exits."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.returncode is not None:
                    raise self.failure(f"exited with code {self.proc.returncode} while starting")
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                # Readiness is polled: the child offers no other signal.
                await asyncio.sleep(interval)
        raise self.failure(f"did not answer 200 at {url} within {timeout:.0f}s")

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> int | None:
        """SIGTERM the child's process group, SIGKILL after `grace`; returns the exit code."""
        proc = self.proc
        try:
            if proc is None:
                return None
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), grace)
                except asyncio.TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await asyncio.wait_for(proc.wait(), grace)
            return proc.returncode
        finally:
            if self._pump is not None:
                self._pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._pump
                self._pump = None
            if self._log is not None:
                self._log.close()

    async def __aenter__(self) -> ManagedProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def python_argv(module: str, args: Sequence[str]) -> list[str]:
    """Run a module with this interpreter, so the venv's packages are the ones used."""
    return [sys.executable, "-m", module, *args]


@dataclass(frozen=True, slots=True)
class CpuUsage:
    """CPU used over an interval: per watched process (in cores) and for the whole machine."""

    wall_s: float
    process_cores: dict[str, float]  # name -> CPU seconds / wall seconds (children included)
    system_percent_mean: float  # all cores, 0..100
    system_percent_max: float
    cpu_count: int


class CpuSampler:
    """Samples machine CPU periodically and process CPU times at start and stop."""

    def __init__(self, pids: dict[str, int], interval: float = 0.5) -> None:
        self._procs: dict[str, psutil.Process] = {}
        for name, pid in pids.items():
            with contextlib.suppress(psutil.Error):
                self._procs[name] = psutil.Process(pid)
        self._interval = interval
        self._start_times: dict[str, float] = {}
        self._samples: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._t0 = 0.0
        self._wall = 0.0
        self._end_times: dict[str, float] = {}

    def _cpu_seconds(self, proc: psutil.Process) -> float:
        try:
            total = sum(proc.cpu_times()[:2])
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += sum(child.cpu_times()[:2])
            return float(total)
        except psutil.Error:
            return 0.0

    async def __aenter__(self) -> CpuSampler:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        """Begin the interval (call from a running event loop)."""
        self._t0 = time.monotonic()
        self._start_times = {n: self._cpu_seconds(p) for n, p in self._procs.items()}
        psutil.cpu_percent(interval=None)  # primes the system counter

        async def sample() -> None:
            while True:
                await asyncio.sleep(self._interval)
                self._samples.append(psutil.cpu_percent(interval=None))

        self._task = asyncio.get_running_loop().create_task(sample())

    async def stop(self) -> None:
        """End the interval; harmless when never started."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        self._wall = time.monotonic() - self._t0
        self._end_times = {n: self._cpu_seconds(p) for n, p in self._procs.items()}

    def usage(self) -> CpuUsage:
        wall = max(self._wall, 1e-9)
        cores = {
            n: (self._end_times.get(n, 0.0) - self._start_times.get(n, 0.0)) / wall
            for n in self._procs
        }
        samples = self._samples or [psutil.cpu_percent(interval=None)]
        return CpuUsage(
            wall_s=wall,
            process_cores=cores,
            system_percent_mean=sum(samples) / len(samples),
            system_percent_max=max(samples),
            cpu_count=psutil.cpu_count() or 1,
        )

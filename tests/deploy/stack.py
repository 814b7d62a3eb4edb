"""Start an emulated PD cluster (one process per worker) and the gateway as subprocesses on
loopback, for end-to-end deploy tests. Every wait is bounded; `close()` kills what it started."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.procs import free_port

HOST = "127.0.0.1"


def wait_ok(url: str, timeout_s: float, procs: list[subprocess.Popen[bytes]]) -> None:
    """Poll url until HTTP 200; raise early (with the reason) if a process died."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args!r} exited with {p.returncode} before {url} was up")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.2)  # polling a condition
    raise RuntimeError(f"{url} not ready after {timeout_s}s: {last}")


@dataclass
class Stack:
    log_dir: Path
    gateway_args: list[str] = field(default_factory=list)
    emulator_args: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    gateway_port: int = 0
    metrics_port: int = 0
    prefill_port: int = 0
    decode_port: int = 0

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.gateway_port}"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.log_dir / f"{name}.log").open("wb") as log:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, env=self.env)
        self.procs.append(p)
        return p

    def start(self, timeout_s: float = 90.0) -> Stack:
        py = sys.executable
        pport, bport, dport = free_port(), free_port(), free_port()
        self.prefill_port, self.decode_port = pport, dport
        self._spawn("prefill", [py, "-m", "loadtest.emulator", "--role", "prefill", "--host",
                                HOST, "--port", str(pport), "--bootstrap-port", str(bport),
                                *self.emulator_args])
        self._spawn("decode", [py, "-m", "loadtest.emulator", "--role", "decode", "--host", HOST,
                               "--port", str(dport), *self.emulator_args])
        self.gateway_port, self.metrics_port = free_port(), free_port()
        self._spawn("gateway", [
            py, "-m", "gateway", "--pd-disaggregation",
            "--prefill", f"http://{HOST}:{pport}", str(bport), "--decode", f"http://{HOST}:{dport}",
            "--host", HOST, "--port", str(self.gateway_port),
            "--prometheus-host", HOST, "--prometheus-port", str(self.metrics_port),
            *self.gateway_args,
        ])
        try:
            for port in (pport, dport):
                wait_ok(f"http://{HOST}:{port}/health", timeout_s, self.procs)
            wait_ok(self.base + "/readiness", timeout_s, self.procs)
        except Exception:
            self.close()
            raise
        return self

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}"
                         for f in sorted(self.log_dir.glob("*.log")))

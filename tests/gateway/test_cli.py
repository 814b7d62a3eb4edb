"""The real entry point: bad configuration exits 2 naming the key, before binding anything."""

from __future__ import annotations

import os
import subprocess
import sys


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_bad_flag_value_exits_2_naming_the_key():
    proc = _run("--pd-disaggregation", "--retry-jitter-factor", "3")
    assert proc.returncode == 2
    assert "retry_jitter_factor" in proc.stderr


def test_bad_env_var_exits_2_naming_the_variable():
    proc = _run(env={"GATEWAY_PROMETHEUS_PORT": "not-a-port"})
    assert proc.returncode == 2
    assert "GATEWAY_PROMETHEUS_PORT" in proc.stderr

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


def test_unloadable_zone_table_exits_2_naming_file_and_field(tmp_path):
    bad = tmp_path / "zones.json"
    bad.write_text('{"schema_version": 99}')
    out = _run("--pd-disaggregation", "--prefill", "http://127.0.0.1:9", "none",
               "--decode", "http://127.0.0.1:10", "--zones", str(bad))
    assert out.returncode == 2
    assert str(bad) in out.stderr and "schema_version" in out.stderr
    assert "Traceback" not in out.stderr

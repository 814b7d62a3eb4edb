"""Prometheus alert rules: promtool unit tests (alerts_test.yml) and metric names that exist."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY, load_yaml_docs
from tests.deploy.metric_names import METRIC_TOKEN

ALERTS = DEPLOY / "compose" / "prometheus" / "alerts.yml"
ALERT_TESTS = Path(__file__).parent / "alerts_test.yml"


def _rules() -> list[dict[str, str]]:
    return [r for g in load_yaml_docs(ALERTS)[0]["groups"] for r in g["rules"]]


def test_every_alert_has_a_unit_test() -> None:
    tests = load_yaml_docs(ALERT_TESTS)[0]["tests"]
    tested = {t["alertname"] for case in tests for t in case["alert_rule_test"]
              if t.get("exp_alerts")}
    assert {r["alert"] for r in _rules()} <= tested


def test_promtool_unit_tests_pass() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    r = subprocess.run([promtool, "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_metrics_exist(gateway_series: dict[str, set[str]]) -> None:
    missing = [name for r in _rules() for name in METRIC_TOKEN.findall(r["expr"])
               if name not in gateway_series]
    assert not missing, f"alerts use metrics the gateway does not expose: {missing}"

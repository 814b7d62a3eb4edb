"""Grafana dashboard: loads, and every PromQL expression is valid PromQL (promtool) and refers
only to metric names and labels that exist: `eldr_*` names in the gateway's own metric modules
(built on a fresh registry), `sglang:*` names in SGLang's collector."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import DEPLOY
from tests.deploy.metric_names import GATEWAY_METRIC_MODULES, METRIC_TOKEN

DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
# Names the dashboard uses from SGLang 0.5.23, srt/observability/metrics_collector.py
# (SchedulerMetricsCollector / TokenizerMetricsCollector), served with --enable-metrics.
SGLANG_METRICS = {
    "sglang:num_running_reqs": "gauge",
    "sglang:num_queue_reqs": "gauge",
    "sglang:time_to_first_token_seconds": "histogram",
    "sglang:inter_token_latency_seconds": "histogram",
}
# Labels Prometheus attaches to every scraped series: job/instance, plus the static target
# labels in deploy/compose/prometheus/prometheus.yml.
TARGET_LABELS = {"job", "instance", "component", "role"}
SELECTOR = re.compile(r"((?:eldr_|sglang:)[A-Za-z0-9_:]*)\{([^}]*)\}")
GROUPING = re.compile(r"\b(?:by|without|ignoring|on)\s*\(([^)]*)\)")
LEGEND = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def _targets(path: Path) -> list[dict[str, Any]]:
    dash = json.loads(path.read_text())
    return [t for p in dash["panels"] for t in p.get("targets", [])]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_loads_with_unique_panel_ids(path: Path) -> None:
    dash = json.loads(path.read_text())
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["targets"], f"panel {p['title']!r} has no queries"
        for t in p["targets"]:
            assert METRIC_TOKEN.search(t["expr"]), f"{p['title']!r}: no metric in {t['expr']}"


def test_dashboard_covers_the_required_topics() -> None:
    exprs = " ".join(t["expr"] for path in DASHBOARDS for t in _targets(path))
    for name in (
        "eldr_inter_token_latency_seconds",  # TPOT / ITL
        "eldr_time_to_first_token_seconds",  # TTFT
        "eldr_worker_active_requests",  # per-worker load
        "eldr_decisions_total",  # zone decisions by signature source
        "eldr_band_size",
        "eldr_zone_reloads_total",
        "eldr_signature_cache_lookups_total",
        "eldr_upstream_errors_total",
    ):
        assert name in exprs, f"dashboard lacks {name}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_metric_and_label_exists(path: Path, gateway_series: dict[str, set[str]]) -> None:
    problems: list[str] = []
    for t in _targets(path):
        expr = t["expr"]
        allowed_labels = set(TARGET_LABELS)
        for name in METRIC_TOKEN.findall(expr):
            if name.startswith("sglang:"):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                if base not in SGLANG_METRICS:
                    problems.append(f"{name}: not an SGLang 0.5.23 metric we know of")
                allowed_labels |= {"le"}
                continue
            if name not in gateway_series:
                problems.append(f"{name}: not exposed by {GATEWAY_METRIC_MODULES}")
                continue
            allowed_labels |= gateway_series[name]
        for name, body in SELECTOR.findall(expr):
            for label in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", body):
                if name.startswith("eldr_") and label not in gateway_series.get(name, set()) | (
                    TARGET_LABELS
                ):
                    problems.append(f"{name}{{{label}=...}}: no such label")
        grouped: set[str] = set()
        for group in GROUPING.findall(expr):
            for label in filter(None, (s.strip() for s in group.split(","))):
                grouped.add(label)
                if label not in allowed_labels:
                    problems.append(f"by/on ({label}) in {expr}: no such label")
        # A legend label must survive the aggregation: it has to be grouped by, or the
        # expression must not aggregate at all.
        aggregated = bool(re.search(r"\b(sum|min|max|avg|count)\b", expr))
        for label in LEGEND.findall(t.get("legendFormat", "")):
            ok = label in grouped if aggregated else label in allowed_labels
            if not ok:
                problems.append(f"legend {{{{{label}}}}} not available from {expr}")
    assert not problems, "\n".join(problems)


def test_promql_parses_with_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    rules = []
    for path in DASHBOARDS:
        for i, t in enumerate(_targets(path)):
            # Grafana's $__rate_interval is substituted before the query reaches Prometheus.
            expr = t["expr"].replace("$__rate_interval", "1m")
            rules.append({"record": f"dashboard:{path.stem.replace('-', '_')}:{i}", "expr": expr})
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr

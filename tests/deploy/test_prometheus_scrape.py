"""A real Prometheus server scrapes a real gateway (in front of emulated workers), and every
dashboard query runs against the scraped data without error."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from loadtest.procs import free_port
from tests.deploy.conftest import DEPLOY
from tests.deploy.stack import HOST, Stack, wait_ok

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("prometheus server not installed (Debian package `prometheus`; "
                    ".ci/run installs it)")
    return path


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _query(prom: str, expr: str) -> dict[str, Any]:
    q = urllib.parse.urlencode({"query": expr})
    try:
        return dict(_get_json(f"{prom}/api/v1/query?{q}"))
    except urllib.error.HTTPError as e:  # 400 carries the PromQL error as JSON
        return dict(json.loads(e.read()))


def _wait_for_series(prom: str, expr: str, timeout_s: float = 60) -> list[Any]:
    """Query until the expression has data (scrapes run every second) or the time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        result: list[Any] = _query(prom, expr)["data"]["result"]
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path).start()
    try:
        yield s
    finally:
        s.close()


def test_prometheus_scrapes_the_gateway(stack: Stack, tmp_path: Path) -> None:
    binary = _prometheus_binary()
    # Send traffic first so counters and histograms have series to scrape.
    for i in range(5):
        body = json.dumps({"text": f"hello {i}", "sampling_params": {"max_new_tokens": 4}})
        req = urllib.request.Request(stack.base + "/generate", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200

    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "eldr-gateway",
             "static_configs": [{"targets": [f"{HOST}:{stack.metrics_port}"],
                                 "labels": {"component": "gateway"}}]},
            # The emulated workers expose SGLang's metric names, labelled as in
            # deploy/compose/prometheus/prometheus.yml.
            {"job_name": "sglang",
             "static_configs": [
                 {"targets": [f"{HOST}:{stack.prefill_port}"],
                  "labels": {"component": "worker", "role": "prefill"}},
                 {"targets": [f"{HOST}:{stack.decode_port}"],
                  "labels": {"component": "worker", "role": "decode"}}]},
        ],
    }
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    port = free_port()
    prom = f"http://{HOST}:{port}"
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address={HOST}:{port}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ok(prom + "/-/ready", 60, [proc])
        result = _wait_for_series(prom, 'sum(eldr_requests_total{job="eldr-gateway"})')
        assert result, "no eldr_requests_total scraped:\n" + stack.logs()
        assert float(result[0]["value"][1]) >= 5
        up = _query(prom, 'up{job="eldr-gateway"}')["data"]["result"]
        assert up and up[0]["value"][1] == "1"
        # The dashboard's worker panels select decode workers by the role target label.
        running = _wait_for_series(prom, 'sglang:num_running_reqs{role="decode"}')
        assert running, "no sglang:num_running_reqs scraped from the decode worker"

        # Every dashboard query is accepted by a real Prometheus over real gateway series.
        errors = []
        for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
            for panel in json.loads(path.read_text())["panels"]:
                for t in panel.get("targets", []):
                    expr = t["expr"].replace("$__rate_interval", "1m")
                    answer = _query(prom, expr)
                    if answer.get("status") != "success":
                        errors.append(f"{panel['title']}: {expr}: {answer.get('error')}")
        assert not errors, "\n".join(errors)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()

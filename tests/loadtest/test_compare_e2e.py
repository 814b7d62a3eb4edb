"""End to end: `python -m loadtest compare` on a tiny emulated cluster, as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_compare_tiny_cluster_calibrates_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    cmd = [
        sys.executable, "-m", "loadtest", "compare", "--quick", "--prefill", "1", "--decode", "2",
        "--num-requests", "6", "--calibration-requests", "16", "--rates", "8",
        "--max-output-tokens", "8", "--time-scale", "2", "--no-progress",
        "--routers", "gateway:round_robin", "gateway:eldr", "sglang:round_robin",
        "--out", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=360, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = orjson.loads((out / "results.json").read_bytes())
    runs = {r["router"]: r for r in results["runs"]}
    assert set(runs) == {"gateway:round_robin", "gateway:eldr", "sglang:round_robin"}
    for name, run in runs.items():
        assert "error" not in run, (name, run.get("error"))
        assert run["summary"]["completed"] == 6
        # The emulator counters see exactly the measured requests (snapshots after warm-up).
        assert sum(run["cluster"]["requests_per_decode"]) == 6  # warm-up excluded
        assert run["cluster"]["distinct_experts_per_step"] > 0
    assert (out / "calibration" / "zones.json").is_file()
    report = (out / "report.md").read_text()
    assert "| gateway:eldr |" in report
    assert (out / "plots" / "tpot_p50.png").is_file()


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_compare_with_two_gateway_replicas(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    cmd = [
        sys.executable, "-m", "loadtest", "compare", "--quick", "--prefill", "1", "--decode", "2",
        "--num-requests", "8", "--rates", "8", "--max-output-tokens", "8", "--time-scale", "2",
        "--no-progress", "--no-report", "--routers", "gateway:least_load",
        "--gateway-replicas", "2", "--out", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = orjson.loads((out / "results.json").read_bytes())["runs"]
    assert run["summary"]["completed"] == 8
    # Both processes ran and were measured; "router" is their sum.
    cores = run["cpu"]["process_cores"]
    assert {"router", "router-1"} <= set(cores) and cores["router"] >= cores["router-1"]
    assert (out / "logs" / "gateway_least_load-8-r1.log").is_file()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_prefill_first_routers_get_a_table_fitted_on_prompt_counts(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    cmd = [
        sys.executable, "-m", "loadtest", "compare", "--quick", "--prefill", "1", "--decode", "2",
        "--num-requests", "6", "--calibration-requests", "16", "--rates", "8",
        "--max-output-tokens", "8", "--time-scale", "2", "--no-progress", "--no-report",
        "--routers", "gateway:eldr", "gateway:eldr-prefill-first", "--out", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = orjson.loads((out / "results.json").read_bytes())
    assert all("error" not in r for r in results["runs"])
    dual = orjson.loads((out / "calibration" / "zones.json").read_bytes())
    pf = orjson.loads((out / "calibration" / "zones-prefill-first.json").read_bytes())
    # The dual flow's table from output counts (what a stock PD decode returns), the
    # prefill-first one from the prompt counts its flow routes on.
    assert dual["provenance"]["signature_from"] == "output"
    assert pf["provenance"]["signature_from"] == "prompt"
    assert results["meta"]["zones_prefill_first"].endswith("zones-prefill-first.json")

"""Report rendering from a small synthetic results set, and the run-analysis helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from loadtest.cluster_stats import (
    coefficient_of_variation,
    counters,
    decode_run_stats,
    void_reasons,
)
from loadtest.report import (
    ReportError,
    eldr_comparisons,
    render_report,
    rows_from_results,
)


def _run(
    router: str,
    rate: float,
    tpot50: float,
    tpot99: float,
    ttft50: float,
    void: bool = False,
    experts: float = 40.0,
) -> dict[str, Any]:
    return {
        "router": router,
        "rate": rate,
        "workload": "task",
        "void": void,
        "void_reasons": ["emulator host lag: 9.0% of decode steps overran"] if void else [],
        "summary": {
            "requests": 10,
            "completed": 10,
            "failed": 0,
            "output_throughput": 123.0,
            "request_throughput": 1.5,
            "tpot_ms": {"p50": tpot50, "p99": tpot99},
            "ttft_ms": {"p50": ttft50, "p99": 900.0},
        },
        "cluster": {"distinct_experts_per_step": experts, "load_cv": 0.12},
        "cpu": {"process_cores": {"router": 0.2, "emulator": 0.6}, "system_percent_mean": 55.0},
    }


RESULTS = {
    "meta": {
        "command": "python -m loadtest compare --quick --out X",
        "options": {
            "prefill": 2,
            "decode": 4,
            "model": "Qwen3-30B-A3B",
            "time_scale": 10,
            "workload": "task",
            "num_requests": 10,
            "min_output_tokens": 8,
            "max_output_tokens": 16,
            "seed": 0,
        },
        "load_only_routers": ["gateway:round_robin", "gateway:least_load", "sglang:round_robin"],
    },
    "runs": [
        _run("gateway:round_robin", 2, 100.0, 150.0, 300.0),
        _run("gateway:least_load", 2, 90.0, 140.0, 310.0),
        _run("sglang:round_robin", 2, 80.0, 200.0, 305.0, void=True),  # VOID: not a baseline
        _run("gateway:eldr", 2, 72.0, 126.0, 310.0, experts=30.0),
        _run("gateway:round_robin", 4, 120.0, 180.0, 400.0),
        _run("gateway:eldr", 4, 132.0, 200.0, 380.0),
        {
            "router": "sglang:round_robin",
            "rate": 4,
            "error": "did not start",
            "void": True,
            "void_reasons": ["did not start"],
        },
    ],
}


def test_eldr_is_compared_with_the_best_non_void_load_only_router() -> None:
    comps = eldr_comparisons(rows_from_results(RESULTS), RESULTS["meta"]["load_only_routers"])
    by_rate = {c.rate: c for c in comps}
    assert by_rate[2].baseline_router == "gateway:least_load"  # sglang's 80 ms run is VOID
    assert by_rate[2].tpot_p50_change == pytest.approx(72 / 90 - 1)
    assert by_rate[2].tpot_p99_change == pytest.approx(126 / 140 - 1)
    assert by_rate[2].ttft_p50_change == pytest.approx(0.0)
    assert by_rate[4].baseline_router == "gateway:round_robin"
    assert by_rate[4].tpot_p50_change == pytest.approx(0.1)


def test_report_markdown_and_plots(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_bytes(orjson.dumps(RESULTS))
    path = render_report(tmp_path)
    text = path.read_text()
    assert "| 2 | gateway:eldr | gateway:least_load | -20.0% | -10.0% | +0.0% |" in text
    assert "| 4 | gateway:eldr | gateway:round_robin | +10.0% |" in text
    assert "sglang:round_robin at 2 req/s: emulator host lag" in text
    assert "sglang:round_robin at 4 req/s: did not start" in text
    assert "python -m loadtest compare --quick --out X" in text
    for name in ("tpot_p50.png", "tpot_p99.png", "distinct_experts.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{name}" in text


def test_report_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"no results\.json"):
        render_report(tmp_path)
    (tmp_path / "results.json").write_text('{"runs": [{"rate": 1}]}')
    with pytest.raises(ReportError, match=r"runs\[0\]"):
        render_report(tmp_path)


def test_counters_found_anywhere_and_histograms_ignored() -> None:
    doc = {
        "role": "decode",
        "decode": {
            "steps": 10,
            "distinct_experts_sum": 400.0,
            "distinct_experts_per_layer": {"count": 99, "sum": 5.0},
            "requests_finished": 3,
            "lagged_steps": 0,
        },
    }
    c = counters(doc)
    assert c == {
        "steps": 10.0,
        "distinct_experts_sum": 400.0,
        "requests_finished": 3.0,
        "lagged_steps": 0.0,
    }


def test_decode_run_stats_diff_snapshots() -> None:
    before = [
        {
            "steps": 10,
            "distinct_experts_sum": 100,
            "requests_finished": 1,
            "lagged_steps": 0,
            "host_lag_seconds_sum": 0.0,
            "step_seconds_sum": 1.0,
        }
    ] * 2
    after = [
        {
            "steps": 30,
            "distinct_experts_sum": 900,
            "requests_finished": 5,
            "lagged_steps": 2,
            "host_lag_seconds_sum": 0.5,
            "step_seconds_sum": 3.0,
        },
        {
            "steps": 20,
            "distinct_experts_sum": 400,
            "requests_finished": 3,
            "lagged_steps": 0,
            "host_lag_seconds_sum": 0.0,
            "step_seconds_sum": 2.0,
        },
    ]
    s = decode_run_stats(before, after)
    assert s.decode_steps == 30
    assert s.distinct_experts_per_step == pytest.approx(1100 / 30)
    assert s.requests_per_decode == [4, 2]
    assert s.load_cv == pytest.approx(1 / 3)
    assert s.lagged_step_fraction == pytest.approx(2 / 30)
    assert s.host_lag_fraction == pytest.approx(0.5 / 3.0)
    reasons = void_reasons(s, 50.0)
    assert len(reasons) == 1 and "overrun 16.7% of modelled decode time" in reasons[0]
    assert "machine CPU" in void_reasons(s, 97.0)[-1]


def test_quiet_run_is_not_void() -> None:
    snap = [{"steps": 0, "step_seconds_sum": 0.0}]
    after = [
        {"steps": 100, "step_seconds_sum": 2.0, "lagged_steps": 1, "host_lag_seconds_sum": 0.01}
    ]
    assert void_reasons(decode_run_stats(snap, after), 40.0) == []
    lagging = [{"steps": 100, "step_seconds_sum": 2.0, "host_lag_seconds_sum": 0.05}]
    assert void_reasons(decode_run_stats(snap, lagging), 40.0)  # 2.5% > 2% limit
    assert coefficient_of_variation([]) is None
    assert coefficient_of_variation([2.0, 2.0]) == 0.0


def test_calibration_capture_skips_prompt_rows() -> None:
    import numpy as np

    from loadtest.calibration_capture import calibration_records
    from loadtest.driver import RequestRecord
    from zones.geometry import ModelGeometry
    from zones.routed_experts import encode_routed_experts

    g = ModelGeometry("tiny", num_layers=2, num_experts=4, top_k=1)
    # 3 prompt rows (zeros: the decode never forwarded them) then 2 output rows.
    rows = np.array([[[0], [0]]] * 3 + [[[1], [2]], [[3], [2]]], dtype=np.int32)
    ok = RequestRecord(
        "r0",
        "c0",
        0,
        "code",
        "d",
        None,
        0.0,
        0.1,
        10,
        3,
        success=True,
        prompt_tokens=3,
        output_tokens=3,
        latency=1.0,
    )
    ok.routed_experts = encode_routed_experts(rows)
    ok.prompt_text = "hello"
    missing = RequestRecord("r1", "c1", 0, "code", "d", None, 0.0, 0.1, 10, 3, success=True)
    failed = RequestRecord("r2", "c2", 0, "code", "d", None, 0.0, 0.1, 10, 3, success=False)
    recs, stats = calibration_records([ok, missing, failed], g, now=1000.0)
    assert (stats.records, stats.skipped_no_rows, stats.skipped_failed) == (1, 1, 1)
    counts = recs[0].output_counts
    assert counts is not None
    assert counts.tolist() == [[0, 1, 0, 1], [0, 0, 2, 0]]
    assert recs[0].text == "hello" and recs[0].received_at == pytest.approx(1000.1)

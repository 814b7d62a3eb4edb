"""compare's pure parts (router specs, cluster line, argv) and process management."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import psutil
import pytest

from loadtest.compare import (
    ALL_ROUTERS,
    LOAD_ONLY_ROUTERS,
    SMG_ROUTERS,
    ClusterInfo,
    CompareError,
    RouterSpec,
    configure_parser,
    options_from_args,
    parse_cluster_info,
    router_argv,
)
from loadtest.procs import ManagedProcess, ProcessStartError


def test_router_specs() -> None:
    assert RouterSpec.parse("gateway:eldr-prefill-first").pd_flow == "prefill-first"
    assert RouterSpec.parse("sglang:cache_aware").kind == "sglang"
    assert RouterSpec.parse("smg:least_load").kind == "smg"
    for bad in (
        "gateway", "nginx:random", "gateway:cache_aware", "sglang:eldr", "sglang:least_load",
        "smg:eldr", "smg",
    ):
        with pytest.raises(CompareError, match="--routers"):
            RouterSpec.parse(bad)
    assert all(RouterSpec.parse(r) for r in (*ALL_ROUTERS, *SMG_ROUTERS))
    assert not set(SMG_ROUTERS) & set(ALL_ROUTERS)  # opt-in: each router costs a full run
    assert "smg:least_load" in LOAD_ONLY_ROUTERS and "smg:cache_aware" not in LOAD_ONLY_ROUTERS


def test_cluster_line_shapes() -> None:
    a = parse_cluster_info(
        {
            "prefill": [{"url": "http://127.0.0.1:1", "bootstrap_port": 9}],
            "decode": [{"url": "http://127.0.0.1:2"}],
        }
    )
    b = parse_cluster_info({"prefill": ["http://127.0.0.1:1"], "decode": ["http://127.0.0.1:2"]})
    assert a.prefill == [("http://127.0.0.1:1", 9)] and a.decode == ["http://127.0.0.1:2"]
    assert b.prefill == [("http://127.0.0.1:1", None)]
    with pytest.raises(CompareError, match="decode"):
        parse_cluster_info({"prefill": ["http://x:1"]})


def test_router_argv_same_workers_same_prefill_policy() -> None:
    cluster = ClusterInfo([("http://127.0.0.1:1", 9)], ["http://127.0.0.1:2", "http://127.0.0.1:3"])
    g = router_argv(RouterSpec.parse("gateway:eldr"), cluster, 5000, "round_robin", Path("z.json"))
    s = router_argv(RouterSpec.parse("sglang:power_of_two"), cluster, 5001, "round_robin", None)
    assert g[1:3] == ["-m", "gateway"] and s[1:3] == ["-m", "sglang_router.launch_router"]
    for argv in (g, s):
        joined = " ".join(argv)
        assert (
            "--pd-disaggregation --prefill http://127.0.0.1:1 9 --decode http://127.0.0.1:2 "
            "--decode http://127.0.0.1:3" in joined
        )
        assert "--prefill-policy round_robin" in joined
    assert "--zones z.json" in " ".join(g) and "--pd-flow dual" in " ".join(g)
    with pytest.raises(CompareError, match="zone table"):
        router_argv(RouterSpec.parse("gateway:eldr"), cluster, 5000, "round_robin", None)


def test_router_argv_smg() -> None:
    cluster = ClusterInfo([("http://127.0.0.1:1", 9)], ["http://127.0.0.1:2", "http://127.0.0.1:3"])
    spec = RouterSpec.parse("smg:power_of_two")
    argv = router_argv(spec, cluster, 5002, "round_robin", None)
    assert argv[1:3] == ["-m", "smg.launch_router"]
    joined = " ".join(argv)
    assert (
        "--pd-disaggregation --prefill http://127.0.0.1:1 9 --decode http://127.0.0.1:2 "
        "--decode http://127.0.0.1:3 --host 127.0.0.1 --port 5002 "
        "--prefill-policy round_robin --decode-policy power_of_two" in joined
    )
    assert "--prometheus-host 127.0.0.1" in joined and "--disable-tokenizer-autoload" in argv
    # Gateway-only flags never reach a Rust router.
    for flag in ("--pd-flow", "--zones", "--model-geometry", "--calibration-log"):
        assert flag not in argv
    # smg's /health answers before its workers are registered; /readiness after.
    assert spec.ready_path == "/readiness"
    assert RouterSpec.parse("sglang:random").ready_path == "/health"


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    configure_parser(p)
    return p.parse_args(list(argv))


def test_quick_preset_and_overrides() -> None:
    o = options_from_args(_parse("--out", "x", "--quick", "--rates", "1", "3"))
    assert (o.prefill, o.decode, o.rates, o.num_requests) == (4, 8, [1.0, 3.0], 320)
    assert o.batches is None  # explicit rates win over the preset's planned rate
    planned = options_from_args(_parse("--out", "x", "--quick"))
    assert planned.batches == [12] and len(planned.rates) == 1 and planned.rates[0] > 0
    full = options_from_args(_parse("--out", "x"))
    assert (full.prefill, full.decode, full.model) == (8, 16, "Qwen3-30B-A3B")
    with pytest.raises(CompareError, match="--rates"):
        options_from_args(_parse("--out", "x", "--rates", "0"))


async def test_managed_process_json_line_and_stop(tmp_path: Path) -> None:
    code = (
        "import json,time; print('booting'); print(json.dumps({'ok': 1}), flush=True); "
        "time.sleep(60)"
    )
    proc = ManagedProcess("child", [sys.executable, "-c", code], tmp_path / "child.log")
    await proc.start(capture_stdout=True)
    try:
        assert await proc.read_json_line(30) == {"ok": 1}
        pid = proc.pid
        assert psutil.pid_exists(pid)
    finally:
        await proc.stop(grace=5)
    assert proc.proc is not None and proc.proc.returncode is not None
    assert "booting" in (tmp_path / "child.log").read_text()


async def test_managed_process_early_exit_is_reported(tmp_path: Path) -> None:
    code = "import sys; print('bad flag', file=sys.stderr); sys.exit(3)"
    proc = ManagedProcess("child", [sys.executable, "-c", code], tmp_path / "c.log")
    await proc.start(capture_stdout=True)
    try:
        with pytest.raises(ProcessStartError, match="bad flag"):
            await proc.read_json_line(30)
    finally:
        await proc.stop(grace=5)


def test_rate_plan_is_littles_law_on_the_cost_model() -> None:
    from loadtest.emulator.costmodel import CostModel
    from loadtest.rate_plan import plan_for_batch, uniform_distinct_experts
    from zones.geometry import geometry_by_name

    g = geometry_by_name("Qwen3-30B-A3B")
    # Fixed 0.1 s steps: 100-token requests decode for 10 s; 8 per worker on 4 workers
    # means 32 in flight, so 3.2 req/s.
    plan = plan_for_batch(
        CostModel.fixed(0.1, g),
        g,
        decode_workers=4,
        batch=8,
        mean_output_tokens=100,
        mean_prompt_tokens=0,
    )
    assert plan.rate == pytest.approx(3.2)
    assert plan.request_seconds == pytest.approx(10.0)
    # Arrivals of 128 requests at 3.2 req/s last 40 s: 4 request lifetimes.
    assert plan.requests_for_steady_state() == 128
    assert plan.arrival_window_ok(num_requests=128)
    assert not plan.arrival_window_ok(num_requests=120)
    # Real cost model: bigger batches need more req/s, but less than proportionally (steps
    # get slower as the expert union grows).
    cost = CostModel.for_geometry(g, time_scale=1.0)
    rates = [
        plan_for_batch(
            cost, g, decode_workers=16, batch=b, mean_output_tokens=128, mean_prompt_tokens=250
        ).rate
        for b in (1, 8, 64)
    ]
    assert rates[0] < rates[1] < rates[2] < 64 * rates[0]
    assert uniform_distinct_experts(1, g) == pytest.approx(8.0)
    assert uniform_distinct_experts(1000, g) == pytest.approx(128.0)


def test_batches_flag_plans_rates() -> None:
    o = options_from_args(_parse("--out", "x", "--quick", "--batches", "2", "8"))
    assert len(o.rates) == 2 and 0 < o.rates[0] < o.rates[1]
    with pytest.raises(SystemExit):
        _parse("--out", "x", "--rates", "1", "--batches", "2")


def test_sampled_distinct_experts_on_hand_made_routing() -> None:
    import numpy as np

    from loadtest.rate_plan import sampled_distinct_experts

    layers, k, experts = 3, 2, 16
    same = [np.tile(np.array([0, 1]), (5, layers, 1)) for _ in range(10)]
    # Every request routes every token to experts {0, 1}: any batch activates 2 per layer.
    assert sampled_distinct_experts(same, 6, experts) == pytest.approx(2.0)
    # Request r always uses {2r, 2r+1}: disjoint, so a batch of b distinct requests has b*k.
    disjoint = [np.tile(np.array([2 * r, 2 * r + 1]), (4, layers, 1)) for r in range(8)]
    assert sampled_distinct_experts(disjoint, 3, experts) == pytest.approx(3 * k)
    assert sampled_distinct_experts(disjoint, 8, experts) == pytest.approx(8 * k)
    # More slots than requests: drawn with replacement, so fewer than 12 * 2 distinct.
    assert sampled_distinct_experts(disjoint, 12, experts) < 16
    with pytest.raises(ValueError, match="at least one request"):
        sampled_distinct_experts([], 4, experts)


def test_planning_with_the_workload_routing_and_the_steady_window() -> None:
    from loadtest.compare import steady_window

    o = options_from_args(_parse("--out", "x", "--quick", "--workload", "trace"))
    assert o.plans is not None and len(o.plans) == 1
    plan = o.plans[0]
    # Measured on the trace's routing: at most the uniform bound (tokens of one batch share
    # experts) and well above top_k.
    from loadtest.rate_plan import uniform_distinct_experts
    from zones.geometry import geometry_by_name

    g = geometry_by_name("DeepSeek-V2-Lite")
    assert g.top_k < plan["distinct_experts"] <= uniform_distinct_experts(12, g) + 1.0
    from dataclasses import replace

    from loadtest.driver import arrival_offsets

    lifetime = plan["request_seconds"]
    rate = o.rates[0]
    # Arrivals lasting 5 lifetimes: from two lifetimes (the ramp) to the last arrival.
    long_run = replace(o, num_requests=math.ceil(5 * lifetime * rate))
    start, end = steady_window(long_run, rate) or (0.0, 0.0)
    assert start == pytest.approx(2 * lifetime)
    assert end == pytest.approx(arrival_offsets(long_run.num_requests, rate, o.seed)[-1])
    # Arrivals lasting 2.5 lifetimes leave half a lifetime after the ramp: no steady state.
    short_run = replace(o, num_requests=math.ceil(2.5 * lifetime * rate))
    assert steady_window(short_run, rate) is None
    assert steady_window(o, 1e6) is None  # all arrivals within a second: no steady state

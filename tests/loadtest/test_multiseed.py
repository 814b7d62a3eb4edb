"""The multi-seed headline: hand-checked changes, bootstrap intervals, per-seed baselines, I/O."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from loadtest.compare import ClusterInfo, CompareError, RouterSpec, router_argv
from loadtest.multiseed import (
    RunSamples,
    SeedsError,
    bootstrap_interval,
    headline_rows,
    relative_change,
    summarize,
)

LOAD_ONLY = ("gateway:least_load", "gateway:round_robin")


def run(router: str, tpot: list[float] | np.ndarray, *, rate: float = 4.0, void: bool = False,
        ttft: list[float] | np.ndarray | None = None, load_cv: float | None = None) -> RunSamples:
    t = np.asarray(tpot, dtype=np.float64)
    return RunSamples(router, rate, void, t, np.asarray(ttft if ttft is not None else t),
                      load_cv, None)


def test_relative_change_is_the_percentile_ratio() -> None:
    # medians 2 and 4: -50%; p99 of 1..100 is 99.01 (linear), of 2..200 is 198.02.
    assert relative_change(np.array([1.0, 2, 3]), np.array([3.0, 4, 5]), 50) == pytest.approx(-0.5)
    a = np.arange(1, 101, dtype=float)
    assert relative_change(a, 2 * a, 99) == pytest.approx(-0.5)


def test_interval_is_tight_when_seeds_agree_and_wide_when_they_do_not() -> None:
    rng = np.random.default_rng(1)
    base = [rng.normal(100, 5, 400) for _ in range(3)]
    agree = [(0.9 * b, b) for b in base]  # every seed -10%, exactly, on the same requests
    i = bootstrap_interval(agree, 50, np.random.default_rng(0), replicates=500)
    assert i.per_seed == pytest.approx((-0.1, -0.1, -0.1))
    assert i.median == pytest.approx(-0.1)
    # The runs are independent, so each side is resampled on its own: request noise (sd 5%,
    # 400 requests: the median's standard error is ~0.3% per side) gives a narrow interval.
    assert i.low < -0.1 < i.high and i.high - i.low < 0.03
    # Seeds disagree (-10%, -10%, +20%): the median stays -10% but the interval must reach the
    # disagreeing seed, since a third of the seed draws are dominated by it.
    fresh = [rng.normal(100, 5, 400) for _ in range(3)]
    mixed = [(0.9 * fresh[0], fresh[0]), (0.9 * fresh[1], fresh[1]), (1.2 * fresh[2], fresh[2])]
    j = bootstrap_interval(mixed, 50, np.random.default_rng(0), replicates=500)
    assert j.median == pytest.approx(-0.1)
    assert j.low < -0.09 and j.high > 0.15
    # Independent noisy samples: request-level noise alone gives a non-zero width around 0.
    noisy = [(rng.normal(100, 20, 300), rng.normal(100, 20, 300)) for _ in range(3)]
    k = bootstrap_interval(noisy, 99, np.random.default_rng(0), replicates=500)
    assert k.low < k.median < k.high and k.high - k.low > 0.02
    with pytest.raises(ValueError, match="samples"):
        bootstrap_interval([(np.array([]), np.array([1.0]))], 50, np.random.default_rng(0))


def test_each_seed_uses_its_own_best_load_only_baseline() -> None:
    seed_a = [run("gateway:eldr", [90.0] * 5), run("gateway:least_load", [100.0] * 5),
              run("gateway:round_robin", [120.0] * 5),
              run("sglang:cache_aware", [50.0] * 5)]  # not load-only: never the baseline
    seed_b = [run("gateway:eldr", [90.0] * 5), run("gateway:least_load", [110.0] * 5),
              run("gateway:round_robin", [100.0] * 5)]
    # Seed c: the eldr run is VOID, so it is left out of the row.
    seed_c = [run("gateway:eldr", [10.0] * 5, void=True), run("gateway:least_load", [100.0] * 5)]
    rows = headline_rows([seed_a, seed_b, seed_c], LOAD_ONLY, np.random.default_rng(0),
                         replicates=50)
    assert len(rows) == 1
    r = rows[0]
    assert r.seeds == 2 and r.baselines == ("gateway:least_load", "gateway:round_robin")
    assert r.changes["tpot_p50"].per_seed == pytest.approx((-0.1, -0.1))


def test_a_void_baseline_is_skipped_for_the_next_best() -> None:
    seed = [run("gateway:eldr", [90.0] * 5), run("gateway:least_load", [50.0] * 5, void=True),
            run("gateway:round_robin", [100.0] * 5)]
    (row,) = headline_rows([seed], LOAD_ONLY, np.random.default_rng(0), replicates=20)
    assert row.baselines == ("gateway:round_robin",)


def _write_comparison(d: Path, seed: int, eldr_scale: float) -> None:
    runs = []
    base = np.random.default_rng(seed).normal(0.1, 0.01, 200)  # one draw: eldr = scale x base
    for router, scale, batch in (("gateway:eldr", eldr_scale, 7.5),
                                 ("gateway:least_load", 1.0, 7.9)):
        rdir = d / "runs" / router.replace(":", "_") / "rate_4"
        rdir.mkdir(parents=True)
        lines = [orjson.dumps({"success": True, "tpot": float(t) * scale, "ttft": 0.2})
                 for t in base]
        lines.append(orjson.dumps({"success": False, "tpot": None, "ttft": None}))
        (rdir / "requests.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        runs.append({"router": router, "rate": 4.0, "void": False,
                     "cluster": {"load_cv": 0.05, "mean_batch_size": 6.0,
                                 "steady_mean_batch_size": batch}})
    meta = {"load_only_routers": list(LOAD_ONLY),
            "options": {"seed": seed, "rates": [4.0], "batches": [8]}}
    (d / "results.json").write_bytes(orjson.dumps({"meta": meta, "runs": runs}))


def test_summarize_reads_seed_directories_and_writes_the_table(tmp_path: Path) -> None:
    dirs = []
    for seed, scale in ((0, 0.9), (1, 0.85), (2, 0.95)):
        d = tmp_path / f"seed-{seed}"
        _write_comparison(d, seed, scale)
        dirs.append(d)
    path = summarize(dirs, tmp_path, plot=False)
    text = path.read_text()
    assert "| 4 | gateway:eldr | 3 |" in text
    assert "| 7.5 / 7.9 (8) |" in text  # achieved batches (eldr / baseline) beside the plan
    doc = orjson.loads((tmp_path / "summary.json").read_bytes())
    (row,) = doc["rows"]
    assert row["changes"]["tpot_p50"]["median"] == pytest.approx(-0.1, abs=0.02)
    assert row["changes"]["ttft_p50"]["median"] == pytest.approx(0.0)
    assert row["eldr_mean_batch"] == 7.5 and row["planned_batch"] == 8.0
    assert row["baseline_mean_batch"] == 7.9
    # A run without its per-request records cannot give an interval: a clear error.
    (dirs[0] / "runs" / "gateway_eldr" / "rate_4" / "requests.jsonl").unlink()
    with pytest.raises(SeedsError, match=r"requests\.jsonl"):
        summarize(dirs, tmp_path, plot=False)


def test_gateway_variants_carry_their_flags() -> None:
    spec = RouterSpec.parse("gateway:eldr+eldr-load-bound=2+no-signature-cache")
    assert spec.policy == "eldr"
    assert spec.name == "gateway:eldr+eldr-load-bound=2+no-signature-cache"
    assert spec.extra_args == ("--eldr-load-bound", "2", "--no-signature-cache")
    pf = RouterSpec.parse("gateway:eldr-prefill-first+eldr-tau=0.1")
    assert pf.pd_flow == "prefill-first" and pf.extra_args == ("--eldr-tau", "0.1")
    cluster = ClusterInfo([("http://127.0.0.1:1", 9)], ["http://127.0.0.1:2"])
    argv = router_argv(spec, cluster, 5000, "round_robin", Path("z.json"))
    assert "--eldr-load-bound 2 --no-signature-cache" in " ".join(argv)
    smg = RouterSpec.parse("smg:least_load+prefill-policy=cache_aware")
    smg_argv = router_argv(smg, cluster, 5001, "round_robin", None)
    assert smg_argv[-3:-1] == ["--prefill-policy", "cache_aware"]  # after compare's own: wins
    for bad in ("gateway:eldr+", "gateway:eldr+--x=1", "gateway:eldr+x="):
        with pytest.raises(CompareError, match="--routers"):
            RouterSpec.parse(bad)


def test_each_statistic_is_measured_against_the_router_best_on_it() -> None:
    body = [100.0] * 99
    # least_load has the best median but a long tail; round_robin the best tail.
    seed = [run("gateway:eldr", [*([90.0] * 97), 150.0, 150.0, 150.0]),
            run("gateway:least_load", [*([95.0] * 97), 1000.0, 1000.0, 1000.0]),
            run("gateway:round_robin", [*body, 120.0])]
    (row,) = headline_rows([seed], LOAD_ONLY, np.random.default_rng(0), replicates=20)
    assert row.baselines == ("gateway:least_load",)
    assert row.changes["tpot_p50"].per_seed[0] == pytest.approx(90 / 95 - 1)
    # p99 against round_robin's (the best p99), not least_load's 1000 ms tail.
    p99 = relative_change(seed[0].tpot, seed[2].tpot, 99)
    assert row.changes["tpot_p99"].per_seed[0] == pytest.approx(p99) and p99 > 0

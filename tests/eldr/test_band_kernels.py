"""The two similarity kernels of gateway/band.py make the same decisions.

The C kernel (gateway/_simkernel.c) screens zones with 8-bit centroids and gives exact float32
products only to zones that can affect the choice; the numpy kernel computes every product.
Their choices, band sizes and ranks must be identical on any input, and the C kernel's three
instruction-set paths must return bit-identical results.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from gateway.band import BandPlan, build_plan, c_kernel_available, choose, default_kernel
from gateway.errors import ConfigError
from gateway.policies.eldr import make_eldr_policy

needs_c = pytest.mark.skipif(not c_kernel_available(), reason="gateway._simkernel not built")


def test_extension_is_built_in_ci() -> None:
    # CI machines have a C compiler, so a missing extension there is a build regression that
    # would otherwise pass unnoticed (every test below would skip).
    if os.environ.get("CI"):
        assert c_kernel_available()


def _unit_rows(m: np.ndarray) -> np.ndarray:
    m = m.astype(np.float32)
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)


def _instance(rng: np.random.Generator, kind: str, zones: int, dim: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Centroids [zones, dim] and 40 signatures, non-negative unit rows."""
    if kind == "clustered":  # each zone favours its own dims, like fitted tables
        pref = rng.random((zones, dim)) < 0.1
        rates = np.where(pref, 3.0, 0.3)
        centroids = _unit_rows(rates * 100)
        sigs = _unit_rows(rng.poisson(rates[rng.integers(0, zones, 40)]) + 1e-3)
    elif kind == "uniform":  # no structure: every zone about equally similar (worst case)
        centroids = _unit_rows(rng.gamma(2.0, 1.0, (zones, dim)))
        sigs = _unit_rows(rng.gamma(2.0, 1.0, (40, dim)))
    elif kind == "ties":  # duplicated centroids: exact similarity ties between zones
        base = _unit_rows(rng.gamma(1.0, 1.0, (max(2, zones // 3), dim)))
        centroids = base[rng.integers(0, len(base), zones)]
        sigs = np.concatenate([base[rng.integers(0, len(base), 20)],
                               _unit_rows(rng.gamma(1.0, 1.0, (20, dim)))])
    else:  # sparse: many exact zeros in centroids and signatures
        centroids = _unit_rows(rng.gamma(1.0, 1.0, (zones, dim)) * (rng.random((zones, dim)) < 0.2)
                               + 1e-9)
        sigs = _unit_rows(rng.gamma(1.0, 1.0, (40, dim)) * (rng.random((40, dim)) < 0.2) + 1e-9)
    return np.ascontiguousarray(centroids), np.ascontiguousarray(sigs.astype(np.float32))


@needs_c
@pytest.mark.parametrize("kind", ["clustered", "uniform", "ties", "sparse"])
@pytest.mark.parametrize("layout", ["one_zone_each", "shared_workers", "zoneless"])
def test_c_and_numpy_kernels_make_identical_decisions(kind: str, layout: str) -> None:
    rng = np.random.default_rng(abs(hash((kind, layout))) % 2**32)
    zones, dim = 24, 300  # dim not a multiple of 64: exercises every tail loop
    centroids, sigs = _instance(rng, kind, zones, dim)
    if layout == "one_zone_each":
        zone_workers = [f"w{k}" for k in range(zones)]
        available = [f"w{k}" for k in range(zones)]
    elif layout == "shared_workers":  # up to 3 zones per worker: min-candidates counts workers
        zone_workers = [f"w{k % 9}" for k in range(zones)]
        available = [f"w{k}" for k in range(9)]
    else:  # two workers without a zone, and zones whose worker is gone
        zone_workers = [f"w{k}" for k in range(zones)]
        available = [f"w{k}" for k in range(0, zones, 2)] + ["new1", "new2"]
    keys = [(w,) for w in available]
    c_plan = build_plan(centroids, zone_workers, keys, kernel="c")
    np_plan = build_plan(centroids, zone_workers, keys, kernel="numpy")
    assert c_plan.kernel.startswith("c-") and np_plan.kernel == "numpy"
    # Float32 products summed in another order (BLAS vs the extension) can differ in the last
    # bit, so two zones whose similarities are within rounding of each other may swap order.
    # That is the only difference allowed: every mismatch must be such a tie, and rare.
    near = 2e-6
    checked = mismatched = 0
    for tau in (0.0, 0.02, 0.1, 0.3, 1.0):
        for min_candidates in (1, 2, 3):
            for i, sig in enumerate(sigs):
                loads = rng.integers(0, 4, len(available)).tolist()  # many load ties
                a = choose(c_plan, sig, loads, tau, min_candidates)
                b = choose(np_plan, sig, loads, tau, min_candidates)
                checked += 1
                assert (a is None) == (b is None)
                assert a is not None and b is not None
                if (a.position, a.zone, a.band_size, a.rank) == (
                        b.position, b.zone, b.band_size, b.rank):
                    if a.similarity is None or b.similarity is None:
                        assert a.similarity is None and b.similarity is None
                    else:
                        assert a.similarity == pytest.approx(b.similarity, abs=near)
                    continue
                mismatched += 1
                sims = np_plan.similarities(sig)
                gaps = np.abs(sims[:, None] - sims[None, :])
                np.fill_diagonal(gaps, np.inf)
                assert gaps.min() <= near, (tau, min_candidates, i, a, b)
    assert checked == 5 * 3 * len(sigs)
    assert mismatched <= checked // 100


@needs_c
def test_c_kernel_examines_few_zones_on_structured_tables() -> None:
    # The point of the screening pass: on clustered data only a handful of the 64 zones need an
    # exact product at tau 0.1 (the benchmark reports the same count at 6,144 dims).
    rng = np.random.default_rng(7)
    centroids, sigs = _instance(rng, "clustered", 64, 1024)
    plan = build_plan(centroids, [f"w{k}" for k in range(64)], [(f"w{k}",) for k in range(64)],
                      kernel="c")
    examined = [len(plan.ranked(s, 0.1, 2)[1]) for s in sigs]  # type: ignore[index]
    assert max(examined) < 16
    assert float(np.mean(examined)) < 8


@needs_c
def test_instruction_set_paths_are_bit_identical() -> None:
    from gateway import _simkernel

    rng = np.random.default_rng(3)
    centroids, sigs = _instance(rng, "uniform", 20, 4100 + 37)  # crosses the 4,096 int32 block
    indexes = [_simkernel.Index(centroids, *centroids.shape, isa=isa)
               for isa in ("auto", "avx2", "scalar")]
    assert indexes[2].isa == "scalar"
    for sig in sigs:
        exact = [ix.exact(sig) for ix in indexes]
        assert exact[0] == exact[1] == exact[2]
        np.testing.assert_allclose(exact[0], centroids @ sig, rtol=0, atol=2e-6)
        got = [ix.candidates(sig, 0.05, 2) for ix in indexes]
        assert got[0] == got[1] == got[2]


@needs_c
def test_candidates_are_sorted_and_exact() -> None:
    from gateway import _simkernel

    rng = np.random.default_rng(11)
    centroids, sigs = _instance(rng, "ties", 7, 256)  # < 8 zones: never handed back
    index = _simkernel.Index(centroids, *centroids.shape)
    for sig in sigs:
        got = index.candidates(sig, 1.0, 2)  # tau 1: every zone can matter
        assert got is not None and got is not False
        negated, zones = got
        assert sorted(zones) == list(range(7))
        exact = index.exact(sig)
        assert negated == [-exact[z] for z in zones]
        assert list(zip(negated, zones, strict=True)) == sorted(zip(negated, zones, strict=True))


@needs_c
def test_unstructured_signatures_are_handed_to_the_full_product() -> None:
    # Uniform tables put most zones within tau of the best; visiting them one by one would cost
    # more than one sgemv, so the screening pass says so and the plan uses the numpy product.
    from gateway import _simkernel

    rng = np.random.default_rng(13)
    centroids, sigs = _instance(rng, "uniform", 32, 512)
    index = _simkernel.Index(centroids, *centroids.shape)
    assert all(index.candidates(sig, 1.0, 2) is False for sig in sigs)
    plan = build_plan(centroids, [f"w{k}" for k in range(32)], [(f"w{k}",) for k in range(32)],
                      kernel="c")
    got = plan.ranked(sigs[0], 1.0, 2)
    assert got is not None and len(got[1]) == 32  # every zone, from the full product


@needs_c
def test_non_finite_signature_gives_no_candidates_and_band_falls_back() -> None:
    rng = np.random.default_rng(5)
    centroids, sigs = _instance(rng, "uniform", 4, 64)
    plan = build_plan(centroids, ["a", "b", "c", "d"], [("a",), ("b",), ("c",), ("d",)],
                      kernel="c")
    bad = sigs[0].copy()
    bad[3] = np.nan
    assert choose(plan, bad, [0, 0, 0, 0], 0.1, 2) is None
    bad[3] = np.inf
    assert choose(plan, bad, [0, 0, 0, 0], 0.1, 2) is None


def test_negative_centroids_use_numpy_and_strict_c_refuses() -> None:
    centroids = np.array([[1.0, -0.1], [0.0, 1.0]], dtype=np.float32)
    plan = build_plan(centroids, ["a", "b"], [("a",), ("b",)])
    assert plan.kernel == "numpy"
    choice = choose(plan, np.array([1.0, 0.0], dtype=np.float32), [0, 0], 0.1, 1)
    assert choice is not None and choice.zone == 0
    if c_kernel_available():
        with pytest.raises(ValueError, match="non-negative"):
            build_plan(centroids, ["a", "b"], [("a",), ("b",)], kernel="c")


def test_operator_switch_selects_numpy_and_rejects_unknown_values(
        monkeypatch: pytest.MonkeyPatch) -> None:
    centroids = np.eye(3, dtype=np.float32)
    monkeypatch.setenv("ELDR_BAND_KERNEL", "numpy")
    assert build_plan(centroids, ["a", "b", "c"], [("a",)]).kernel == "numpy"
    monkeypatch.setenv("ELDR_BAND_KERNEL", "gpu")
    with pytest.raises(ValueError, match="ELDR_BAND_KERNEL"):
        default_kernel()

    class _Settings:
        eldr_tau = None
        eldr_min_candidates = None

    with pytest.raises(ConfigError, match="ELDR_BAND_KERNEL"):  # refused at start-up
        make_eldr_policy(_Settings(), zone_runtime=object())


def test_empty_plan_needs_no_kernel() -> None:
    plan = BandPlan(np.zeros((0, 5), dtype=np.float32), [], [], [0], "auto")
    assert plan.size == 0
    assert choose(plan, np.ones(5, dtype=np.float32), [0], 0.1, 2) is None


@needs_c
@pytest.mark.parametrize("layout", ["shared_workers", "zoneless"])
def test_c_band_walk_matches_the_python_walk_over_the_same_zones(layout: str) -> None:
    # `choose` runs the band walk inside the extension when given a list of loads, and in Python
    # over `BandPlan.ranked` otherwise: both walks see the same zones and must agree exactly.
    rng = np.random.default_rng(17)
    centroids, sigs = _instance(rng, "clustered", 18, 200)
    if layout == "shared_workers":
        zone_workers = [f"w{k % 7}" for k in range(18)]
        available = [f"w{k}" for k in range(7)]
    else:
        zone_workers = [f"w{k}" for k in range(18)]
        available = [f"w{k}" for k in range(0, 18, 3)] + ["new"]
    plan = build_plan(centroids, zone_workers, [(w,) for w in available], kernel="c")
    for tau in (0.0, 0.1, 0.5):
        for m in (1, 2, 3):
            for sig in sigs:
                loads = rng.integers(0, 3, len(available)).tolist()
                in_c = choose(plan, sig, loads, tau, m)
                in_python = choose(plan, sig, tuple(loads), tau, m)
                assert in_c == in_python


@needs_c
def test_set_workers_rejects_inconsistent_input() -> None:
    from gateway import _simkernel

    index = _simkernel.Index(np.eye(3, dtype=np.float32), 3, 3)
    assert index.candidates_count == -1
    with pytest.raises(RuntimeError, match="set_workers"):
        index.choose(np.ones(3, dtype=np.float32), [0, 0, 0], 0.1, 2)
    with pytest.raises(ValueError, match="one position per zone row"):
        index.set_workers((0, 1), (), 3)
    with pytest.raises(ValueError, match="out of range"):
        index.set_workers((0, 1, 5), (), 3)
    index.set_workers((0, 0, 1), (2,), 3)
    assert (index.rank_depth, index.candidates_count) == (2, 3)  # candidate 0 serves two rows
    index.set_workers((0, 1, 2), (), 3)
    assert index.rank_depth == 1
    with pytest.raises(ValueError, match="one int per candidate"):
        index.choose(np.ones(3, dtype=np.float32), [0, 0], 0.1, 2)
    got = index.choose(np.array([0, 0, 1], dtype=np.float32), [0, 0, 0], 0.1, 1)
    assert got == (2, 2, 1, 1, 1.0)

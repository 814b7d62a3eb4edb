"""The two similarity kernels of gateway/band.py make the same decisions.

The C kernel (gateway/_simkernel.c) screens zones with 8-bit centroids and gives exact float32
products only to zones that can affect the choice; the numpy kernel computes every product.
Their choices, band sizes and ranks must be identical on any input, and the C kernel's three
instruction-set paths must return bit-identical results.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence

import numpy as np
import pytest

from gateway.band import (
    BandChoice,
    BandPlan,
    build_plan,
    c_kernel_available,
    choose,
    default_kernel,
)
from gateway.errors import ConfigError
from gateway.policies.base import WorkerView
from gateway.policies.eldr import make_eldr_policy
from tests.eldr.helpers import view

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


Decision = tuple[int, int | None, int, int | None, float | None]


def _reference(plan: BandPlan, sims: Sequence[float], loads: Sequence[int], tau: float,
               min_candidates: int) -> Decision:
    """The band rule written out literally over given similarities (one per plan row):
    (position, zone, band_size, rank, similarity)."""
    order = sorted(range(plan.size), key=lambda r: (-sims[r], r))
    best = sims[order[0]]
    band = [r for r in order if -sims[r] <= tau + (-best)]  # as the walks compute the edge
    workers = {plan.positions[r] for r in band}
    for r in order[len(band):]:
        if len(workers) >= min_candidates:
            break
        if plan.positions[r] not in workers:
            band.append(r)
            workers.add(plan.positions[r])
    chosen = min(band, key=lambda r: (loads[plan.positions[r]], -sims[r], r))
    band_size = len(workers) + len(plan.zoneless)
    spare = [p for p in plan.zoneless if loads[p] < loads[plan.positions[chosen]]]
    if spare:
        least = min(loads[p] for p in spare)
        return next(p for p in spare if loads[p] == least), None, band_size, None, None
    rank = 1 + sum(1 for r in range(plan.size) if sims[r] > sims[chosen])
    return plan.positions[chosen], plan.zones[chosen], band_size, rank, sims[chosen]


def _decision(choice: BandChoice | None) -> Decision:
    assert choice is not None
    return choice.position, choice.zone, choice.band_size, choice.rank, choice.similarity


@needs_c
@pytest.mark.parametrize("kind", ["clustered", "uniform", "ties", "sparse"])
@pytest.mark.parametrize("layout", ["one_zone_each", "shared_workers", "zoneless"])
def test_c_and_numpy_kernels_make_identical_decisions(kind: str, layout: str) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{kind}/{layout}".encode()))
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
    index = c_plan._index
    assert index is not None
    # Each kernel must make exactly the literal rule's decision over its own products: the C
    # kernel over the extension's (`Index.exact`), unless it hands the signature to the sgemv;
    # the numpy kernel over BLAS's.
    # Between the kernels, float32 products summed in another order can differ in the last
    # bit, so two zones within rounding of each other may swap order: that is the only
    # difference allowed, and it must involve the chosen zone.
    near = 2e-6
    checked = mismatched = 0
    for tau in (0.0, 0.02, 0.1, 0.3, 1.0):
        for min_candidates in (1, 2, 3):
            for sig in sigs:
                loads = rng.integers(0, 4, len(available)).tolist()  # many load ties
                np_sims = np_plan.similarities(sig).tolist()
                own = index.choose(sig, loads, tau, min_candidates) is not False
                c_sims = index.exact(sig) if own else np_sims
                a = _decision(choose(c_plan, sig, loads, tau, min_candidates))
                b = _decision(choose(np_plan, sig, loads, tau, min_candidates))
                assert a == _reference(c_plan, c_sims, loads, tau, min_candidates)
                assert b == _reference(np_plan, np_sims, loads, tau, min_candidates)
                checked += 1
                if a[:4] == b[:4]:
                    if a[4] is not None and b[4] is not None:
                        assert a[4] == pytest.approx(b[4], abs=near)
                    continue
                mismatched += 1
                rows = [r for r in range(np_plan.size) if np_plan.zones[r] in (a[1], b[1])]
                assert rows, (tau, min_candidates, a, b)
                sims = np.array(np_sims)
                gaps = np.abs(sims[:, None] - sims[rows][None, :])
                gaps[rows, range(len(rows))] = np.inf
                assert gaps.min() <= near, (tau, min_candidates, a, b)
    assert checked == 5 * 3 * len(sigs)
    assert mismatched <= checked // 20


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
    # (Signatures the screening cannot narrow are decided load-first in the extension on its
    # own products, and on the sgemv's in Python, which may differ in the last bit: there, and
    # only where two zones are within rounding of each other, the rank may differ.)
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
                assert in_c is not None and in_python is not None
                assert (in_c.position, in_c.zone, in_c.band_size) == (
                    in_python.position, in_python.zone, in_python.band_size)
                if in_c.rank != in_python.rank:
                    exact = np.array(plan._index.exact(sig))  # type: ignore[union-attr]
                    assert plan._index.candidates(sig, tau, 2) is False  # type: ignore[union-attr]
                    assert in_c.zone is not None
                    gaps = np.abs(np.delete(exact, in_c.zone) - exact[in_c.zone])
                    assert gaps.min() <= 2e-6
                if in_c.similarity is None or in_python.similarity is None:
                    assert in_c.similarity is None and in_python.similarity is None
                else:
                    assert in_c.similarity == pytest.approx(in_python.similarity, abs=2e-6)


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
    with pytest.raises(ValueError, match="one item per candidate"):
        index.choose(np.ones(3, dtype=np.float32), [0, 0], 0.1, 2)
    got = index.choose(np.array([0, 0, 1], dtype=np.float32), [0, 0, 0], 0.1, 1)
    assert got == (2, 2, 1, 1, 1.0)


KERNELS = ["c", "numpy"] if c_kernel_available() else ["numpy"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_plan_matches_only_its_own_candidate_list(kernel: str) -> None:
    centroids, _ = _instance(np.random.default_rng(19), "clustered", 4, 64)
    ids = ["w0", "w1", "w2", "w3"]
    plan = build_plan(centroids, ids, [(w,) for w in ids], kernel=kernel, ids=ids)
    same = [view(w) for w in ids]
    assert plan.matches(same)
    # equal ids that are other str objects (a registry rebuilt from config) still match
    assert plan.matches([view("".join(list(w))) for w in ids])
    assert plan.matches(tuple(same))  # not a list: the Python comparison
    assert not plan.matches(same[::-1])  # same workers, other positions
    assert not plan.matches(same[:3])
    assert not plan.matches([*same, view("w4")])
    assert not plan.matches([*same[:3], view("w9")])
    no_ids = build_plan(centroids, ids, [(w,) for w in ids], kernel=kernel)
    assert not no_ids.matches(same)  # a plan built without ids never claims a list
    with pytest.raises(ValueError, match="3 ids for 4 candidates"):
        build_plan(centroids, ids, [(w,) for w in ids], kernel=kernel, ids=ids[:3])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["clustered", "uniform"])
def test_loads_read_from_candidates_give_the_same_choice(kernel: str, kind: str) -> None:
    rng = np.random.default_rng(23)
    centroids, sigs = _instance(rng, kind, 16, 300)
    ids = [f"w{k}" for k in range(16)] + ["new"]  # one zone-less overflow worker
    plan = build_plan(centroids, ids[:16], [(w,) for w in ids], kernel=kernel, ids=ids)
    for sig in sigs:
        loads = rng.integers(0, 3, len(ids)).tolist()
        views = [view(w, load) for w, load in zip(ids, loads, strict=True)]
        for tau, m in ((0.0, 1), (0.1, 2), (1.0, 3)):
            assert choose(plan, sig, views, tau, m) == choose(plan, sig, loads, tau, m)


@needs_c
def test_choose_all_walks_given_similarities_like_the_python_walk() -> None:
    # The hand-back path: one sgemv for every zone, then the extension sorts and walks. Same
    # similarities in, same decision out as the Python walk over the numpy kernel's ranking.
    rng = np.random.default_rng(29)
    centroids, sigs = _instance(rng, "ties", 21, 128)
    zone_workers = [f"w{k % 8}" for k in range(21)]  # up to 3 zones per worker
    available = [f"w{k}" for k in range(8)] + ["new"]
    keys = [(w,) for w in available]
    c_plan = build_plan(centroids, zone_workers, keys, kernel="c")
    np_plan = build_plan(centroids, zone_workers, keys, kernel="numpy")
    index = c_plan._index
    assert index is not None
    for tau in (0.0, 0.05, 1.0):
        for m in (1, 2, 4):
            for sig in sigs:
                loads = rng.integers(0, 3, len(available)).tolist()
                neg = np_plan.negated_similarities(sig).copy()
                got = index.choose_all(neg, loads, tau, m)
                want = choose(np_plan, sig, tuple(loads), tau, m)
                assert got is not None and want is not None
                position, row, band_size, rank, similarity = got
                assert (position, band_size) == (want.position, want.band_size)
                if row < 0:
                    assert want.zone is None
                else:
                    assert (c_plan.zones[row], rank, similarity) == (
                        want.zone, want.rank, want.similarity)


@needs_c
def test_choose_all_never_admits_a_nan_similarity() -> None:
    from gateway import _simkernel

    index = _simkernel.Index(np.eye(3, dtype=np.float32), 3, 3)
    index.set_workers((0, 1, 2), (), 3)
    neg = np.array([np.nan, -0.5, -0.4], dtype=np.float32)
    # zone 0 is idle but its similarity is NaN: min-2 admits zones 1 and 2 only
    got = index.choose_all(neg, [0, 5, 6], 0.0, 2)
    assert got is not None and got[:4] == (1, 1, 2, 1)
    assert index.choose_all(np.full(3, np.nan, dtype=np.float32), [0, 0, 0], 0.1, 2) is None
    with pytest.raises(ValueError, match="float32, one per zone row"):
        index.choose_all(np.zeros(3, dtype=np.float64), [0, 0, 0], 0.1, 2)
    with pytest.raises(ValueError, match="float32, one per zone row"):
        index.choose_all(np.zeros(4, dtype=np.float32), [0, 0, 0], 0.1, 2)


@needs_c
@pytest.mark.parametrize("zones", [7, 20])  # 7: never handed back, the bounds alone decide
@pytest.mark.parametrize("case", ["zeros", "tiny", "huge", "negative", "one_hot", "subnormal"])
def test_signature_quantization_edge_cases(case: str, zones: int) -> None:
    # The screening pass quantizes each signature with a power-of-two scale; these inputs hit
    # its special cases (no scale at all, scales at the ends of the float range, negative
    # levels, a single level). Every instruction-set path must agree bit for bit, and the
    # decisions must be the numpy kernel's.
    from gateway import _simkernel

    rng = np.random.default_rng(31)
    centroids, sigs = _instance(rng, "clustered", zones, 300)
    base = sigs[0]
    sig = {
        "zeros": np.zeros_like(base),
        "tiny": base * np.float32(1e-33),  # peak under 2^-100: the exact fallback
        "huge": base * np.float32(1e30),
        "negative": base - np.float32(0.5) * sigs[1],
        "one_hot": np.eye(1, 300, 7, dtype=np.float32)[0],
        "subnormal": np.where(np.arange(300) % 2 == 0, base, np.float32(1e-42)),
    }[case].astype(np.float32)
    indexes = [_simkernel.Index(centroids, *centroids.shape, isa=isa)
               for isa in ("auto", "avx2", "scalar")]
    got = [ix.candidates(sig, 0.05, 2) for ix in indexes]
    assert got[0] == got[1] == got[2]
    bounds = [ix.bounds(sig) for ix in indexes]
    assert bounds[0] == bounds[1] == bounds[2] and bounds[0] is not None
    exact = np.array(indexes[0].exact(sig))
    lo, hi, lo2, hi2 = (np.array(v) for v in bounds[0])
    assert np.all(lo <= exact) and np.all(exact <= hi)
    assert np.all(lo2 <= exact) and np.all(exact <= hi2)
    ids = [f"w{k}" for k in range(zones)]
    c_plan = build_plan(centroids, ids, [(w,) for w in ids], kernel="c")
    np_plan = build_plan(centroids, ids, [(w,) for w in ids], kernel="numpy")
    for tau, m in ((0.0, 1), (0.05, 2), (1.0, 2)):
        loads = rng.integers(0, 3, zones).tolist()
        a = choose(c_plan, sig, loads, tau, m)
        b = choose(np_plan, sig, loads, tau, m)
        assert a is not None and b is not None
        assert (a.position, a.zone, a.band_size, a.rank) == (
            b.position, b.zone, b.band_size, b.rank)


@needs_c
def test_undecidable_screens_with_a_short_band_take_the_full_product() -> None:
    # Near-identical zones: every screening interval overlaps the best, so the signature cannot
    # be narrowed; at tau 0 the band is one zone and min-2 must admit the runner-up, which
    # needs every zone ranked. The extension hands the signature back (choose -> False), and
    # `band.choose` decides on one sgemv through `Index.choose_all`.
    rng = np.random.default_rng(37)
    base = rng.gamma(2.0, 1.0, 300)
    centroids = _unit_rows(base[None, :] + rng.normal(0.0, 1e-3, (16, 300)).clip(0.0))
    sig = _unit_rows(base[None, :])[0]
    ids = [f"w{k}" for k in range(16)]
    plan = build_plan(centroids, ids, [(w,) for w in ids], kernel="c", ids=ids)
    np_plan = build_plan(centroids, ids, [(w,) for w in ids], kernel="numpy")
    index = plan._index
    assert index is not None
    loads = rng.integers(0, 3, 16).tolist()
    assert index.choose(sig, loads, 0.0, 2) is False
    got = _decision(choose(plan, sig, loads, 0.0, 2))
    assert got == _reference(np_plan, np_plan.similarities(sig).tolist(), loads, 0.0, 2)
    assert got[2] == 2  # the band was widened to two workers
    views = [view(w, load) for w, load in zip(ids, loads, strict=True)]
    assert _decision(choose(plan, sig, views, 0.0, 2)) == got  # and the same from views


@needs_c
def test_auto_prefers_numpy_where_the_extension_has_no_simd(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Without AVX2 the extension runs plain C, measured 2.5x slower than BLAS's sgemv: `auto`
    # must not pick it there, while an explicit "c" still gets it (tests compare the paths).
    import types

    from gateway import _simkernel, band

    def scalar_index(centroids: np.ndarray, rows: int, dim: int) -> _simkernel.Index:
        return _simkernel.Index(centroids, rows, dim, isa="scalar")

    monkeypatch.setattr(band, "_simkernel", types.SimpleNamespace(Index=scalar_index))
    centroids, _ = _instance(np.random.default_rng(41), "clustered", 4, 64)
    ids = ["a", "b", "c", "d"]
    assert build_plan(centroids, ids, [(w,) for w in ids], kernel="auto").kernel == "numpy"
    assert build_plan(centroids, ids, [(w,) for w in ids], kernel="c").kernel == "c-scalar"


@needs_c
@pytest.mark.parametrize("kind", ["clustered", "uniform", "ties", "sparse"])
def test_screening_intervals_hold_the_exact_products(kind: str) -> None:
    # Both levels of the screening (uint8 centroids; then their int8 residual) must bound the
    # float32 product the extension would compute, on every instruction-set path identically;
    # the second level is what makes load-first decisions cheap, so it must also be narrower.
    from gateway import _simkernel

    rng = np.random.default_rng(zlib.crc32(kind.encode()))
    centroids, sigs = _instance(rng, kind, 12, 1500 + 37)
    indexes = [_simkernel.Index(centroids, *centroids.shape, isa=isa)
               for isa in ("auto", "avx2", "scalar")]
    widths: list[float] = []
    for sig in sigs:
        got = [ix.bounds(sig) for ix in indexes]
        assert got[0] == got[1] == got[2]
        assert got[0] is not None
        lo, hi, lo2, hi2 = (np.array(v) for v in got[0])
        exact = np.array(indexes[0].exact(sig))
        assert np.all(lo <= exact) and np.all(exact <= hi)
        assert np.all(lo2 <= exact) and np.all(exact <= hi2)
        widths.append(float(np.mean(hi - lo) / np.mean(hi2 - lo2)))
    assert min(widths) > 5.0


@needs_c
def test_candidate_attributes_read_in_c_follow_python_semantics() -> None:
    # The extension reads `worker_id` / `in_flight` straight from a slots class's slots; the
    # result must stay what attribute access gives, also after the class is changed, for
    # subclasses and plain objects, and an unset slot must raise as Python would.
    from dataclasses import dataclass

    from gateway import _simkernel

    @dataclass(slots=True)
    class Cand:
        worker_id: str
        in_flight: int

    index = _simkernel.Index(np.eye(2, dtype=np.float32), 2, 2)
    index.set_workers((0, 1), (), 2, ("a", "b"))
    sig = np.array([1.0, 0.0], dtype=np.float32)
    cands = [Cand("a", 5), Cand("b", 1)]
    assert index.matches(cands)
    assert index.choose(sig, cands, 1.0, 2)[0] == 1  # type: ignore[index]
    Cand.in_flight = property(lambda self: 0 if self.worker_id == "a" else 9)  # type: ignore[assignment,method-assign]
    assert index.choose(sig, cands, 1.0, 2)[0] == 0  # type: ignore[index]
    Cand.worker_id = property(lambda self: "x")  # type: ignore[assignment,method-assign]
    assert not index.matches(cands)

    class Sub(WorkerView):  # another type with the same slots: the cache follows the type
        __slots__ = ()

    mixed = [Sub("a", "http://a", 3, None), WorkerView("b", "http://b", 2, None)]
    assert index.matches(mixed)
    assert index.choose(sig, mixed, 1.0, 2)[0] == 1  # type: ignore[index]
    mixed = [WorkerView("a", "http://a", 1, None), Sub("b", "http://b", 2, None)]
    assert index.choose(sig, mixed, 1.0, 2)[0] == 0  # type: ignore[index]

    class Plain:
        def __init__(self, worker_id: str, in_flight: int) -> None:
            self.worker_id = worker_id
            self.in_flight = in_flight

    assert index.matches([Plain("a", 0), Plain("b", 0)])
    assert index.choose(sig, [Plain("a", 4), Plain("b", 2)], 1.0, 2)[0] == 1  # type: ignore[index]
    unset = WorkerView.__new__(WorkerView)
    with pytest.raises(AttributeError):
        index.choose(sig, [unset, unset], 1.0, 2)

"""Hand-worked band examples (DESIGN.md "Locality band").

Zones (unit centroids) c0=(1,0,0), c1=(.8,.6,0), c2=(0,1,0), c3=(0,0,1); signature s=(1,0,0):
similarities s_k = c_k . s = 1.0, 0.8, 0.0, 0.0.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.eldr.band import BandChoice, BandPlan, build_plan, choose
from gateway.routing import LowRankSignature

CENTROIDS = np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
WORKERS = ("w0", "w1", "w2", "w3")
S = np.array([1, 0, 0], dtype=np.float32)


def plan_for(available: list[str], zone_workers: tuple[str | None, ...] = WORKERS) -> BandPlan:
    return build_plan(CENTROIDS, zone_workers, [(w, f"http://{w}:1/") for w in available])


def test_tau_0_1_band_of_one_widened_by_min_2_picks_less_loaded_second() -> None:
    # band = {k: s_k >= 1.0 - 0.1} = {0}; min-2 admits zone 1 (0.8); loads 5 vs 3 -> zone 1.
    plan = plan_for(list(WORKERS))
    choice = choose(plan, S, [5, 3, 0, 0], tau=0.1, min_candidates=2)
    assert choice is not None
    assert (choice.position, choice.zone, choice.band_size, choice.rank) == (1, 1, 2, 2)
    assert choice.similarity == pytest.approx(0.8)


def test_tau_0_1_stays_local_when_most_similar_is_least_loaded() -> None:
    choice = choose(plan_for(list(WORKERS)), S, [1, 3, 0, 0], tau=0.1, min_candidates=2)
    assert choice is not None and (choice.zone, choice.rank, choice.band_size) == (0, 1, 2)


def test_tau_0_pure_locality_ignores_load_without_min_2() -> None:
    choice = choose(plan_for(list(WORKERS)), S, [9, 0, 0, 0], tau=0.0, min_candidates=1)
    assert choice is not None and (choice.zone, choice.band_size, choice.rank) == (0, 1, 1)


def test_tau_0_with_min_2_is_locality_plus_second_choice() -> None:
    choice = choose(plan_for(list(WORKERS)), S, [9, 4, 0, 0], tau=0.0, min_candidates=2)
    assert choice is not None and (choice.zone, choice.band_size) == (1, 2)


def test_wider_tau_admits_more_zones() -> None:
    # tau 0.25: band = {0, 1} already (0.8 >= 0.75); min-2 adds nothing.
    choice = choose(plan_for(list(WORKERS)), S, [5, 3, 0, 0], tau=0.25, min_candidates=2)
    assert choice is not None and (choice.zone, choice.band_size) == (1, 2)


def test_tau_1_is_join_shortest_queue_with_lowest_zone_tie_break() -> None:
    # every s_k >= 0 = 1.0 - 1, so all four zones; w2 and w3 tie at load 0 and similarity 0
    # -> lowest zone index 2.
    choice = choose(plan_for(list(WORKERS)), S, [5, 3, 0, 0], tau=1.0, min_candidates=2)
    assert choice == BandChoice(position=2, zone=2, band_size=4, rank=3, similarity=0.0)


def test_unavailable_zone_is_excluded_and_next_similar_zones_take_over() -> None:
    # w0 unhealthy: available zones 1, 2, 3 with sims .8, 0, 0; band = {1}; min-2 adds the
    # next most similar, zones 2 and 3 tie at 0.0 -> lower index 2. Loads 3 vs 1 -> zone 2.
    plan = plan_for(["w1", "w2", "w3"])
    assert plan.zones == (1, 2, 3)
    choice = choose(plan, S, [3, 1, 0], tau=0.1, min_candidates=2)
    assert choice == BandChoice(position=1, zone=2, band_size=2, rank=2, similarity=0.0)


def test_zone_with_no_worker_is_skipped() -> None:
    plan = plan_for(list(WORKERS), zone_workers=(None, "w1", "w2", "w3"))
    assert plan.zones == (1, 2, 3)
    assert plan.zoneless == (0,)  # w0 is available but serves no zone


def test_equal_similarity_and_load_break_ties_by_zone_index_not_candidate_order() -> None:
    centroids = np.array([[0, 1, 0], [0, 1, 0], [1, 0, 0]], dtype=np.float32)
    plan = build_plan(centroids, ("a", "b", "c"), [("c",), ("b",), ("a",)])  # reversed order
    sig = np.array([0, 1, 0], dtype=np.float32)
    choice = choose(plan, sig, [0, 2, 2], tau=0.1, min_candidates=2)
    # zones 0 (a, position 2) and 1 (b, position 1) tie on similarity 1 and load 2 -> zone 0.
    assert choice is not None and (choice.zone, choice.position, choice.rank) == (0, 2, 1)


def test_equal_load_prefers_more_similar_zone_over_lower_index() -> None:
    # s = (0,0,1): zone 3 sim 1.0, band {3}; min-2 adds zone 0 (zones 0-2 tie at 0.0, lowest
    # index). All idle: the tie on load goes to the more similar zone 3, not to zone 0.
    choice = choose(plan_for(list(WORKERS)), np.array([0, 0, 1], dtype=np.float32),
                    [0, 0, 0, 0], tau=0.1, min_candidates=2)
    assert choice == BandChoice(position=3, zone=3, band_size=2, rank=1, similarity=1.0)
    # Within the natural band too: sims 1.0 and 0.8 with tau 0.25, equal load -> zone 0.
    choice = choose(plan_for(list(WORKERS)), S, [1, 1, 0, 0], tau=0.25, min_candidates=2)
    assert choice is not None and choice.zone == 0


def test_zoneless_worker_takes_overflow_only_when_strictly_less_loaded() -> None:
    plan = plan_for(["w0", "w1", "w2", "w3", "new"])
    assert plan.zoneless == (4,)
    tie = choose(plan, S, [2, 3, 0, 0, 2], tau=0.1, min_candidates=2)
    assert tie is not None and (tie.zone, tie.position, tie.band_size) == (0, 0, 3)
    less = choose(plan, S, [2, 3, 0, 0, 1], tau=0.1, min_candidates=2)
    assert less == BandChoice(position=4, zone=None, band_size=3, rank=None, similarity=None)


def test_no_available_zone_returns_none_for_fallback() -> None:
    plan = plan_for(["stranger"])
    assert plan.size == 0
    assert choose(plan, S, [0], tau=0.1, min_candidates=2) is None


def test_non_finite_signature_returns_none() -> None:
    sig = np.array([np.nan, 0, 0], dtype=np.float32)
    assert choose(plan_for(list(WORKERS)), sig, [0, 0, 0, 0], tau=0.1, min_candidates=2) is None


def test_worker_matched_by_url_ignoring_trailing_slash() -> None:
    plan = build_plan(CENTROIDS, ("http://w0:1", "w1", "w2", "w3"), [("id0", "http://w0:1/")])
    assert plan.zones == (0,) and plan.positions == (0,)


def test_min_candidates_never_exceeds_available_workers() -> None:
    choice = choose(plan_for(["w0"]), S, [7], tau=0.0, min_candidates=2)
    assert choice is not None and (choice.zone, choice.band_size) == (0, 1)


def test_mismatched_zone_workers_rejected() -> None:
    with pytest.raises(ValueError, match="zone workers"):
        build_plan(CENTROIDS, ("w0",), [("w0",)])


def test_similarities_reuse_one_buffer() -> None:
    plan = plan_for(list(WORKERS))
    first = plan.negated_similarities(S)
    second = plan.negated_similarities(np.array([0, 1, 0], dtype=np.float32))
    assert first is second
    np.testing.assert_allclose(second, [0, -0.6, -1, 0], atol=1e-6)
    np.testing.assert_allclose(plan.similarities(S), [1, 0.8, 0, 0], atol=1e-6)


def reference_choice(
    sims: dict[int, float], zone_workers: list[str], available: list[str], loads: list[int],
    tau: float, min_candidates: int,
) -> tuple[int, int]:
    """The band rule written out literally (slow, obvious) over given zone similarities."""
    avail = sorted(sims)
    best = max(sims.values())
    band = [k for k in avail if sims[k] >= best - tau]
    for k in sorted(avail, key=lambda k: (-sims[k], k)):
        if len(band) >= min_candidates:
            break
        if k not in band:
            band.append(k)
    pos = {w: i for i, w in enumerate(available)}
    chosen = min(band, key=lambda k: (loads[pos[zone_workers[k]]], -sims[k], k))
    rank = 1 + sum(1 for k in avail if sims[k] > sims[chosen])
    return chosen, rank


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 12), st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.05, 0.1, 0.3, 1.0]),
    st.integers(1, 3), st.data(),
)
def test_matches_literal_reference(
    k: int, seed: int, tau: float, min_candidates: int, data: st.DataObject
) -> None:
    rng = np.random.default_rng(seed)
    dim = 8
    # Coarse values make exact similarity ties common, exercising the tie-breaks.
    centroids = rng.integers(0, 3, size=(k, dim)).astype(np.float32)
    centroids[centroids.sum(axis=1) == 0, 0] = 1
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    sig = rng.integers(0, 3, size=dim).astype(np.float32)
    sig[0] += 1
    sig /= np.linalg.norm(sig)
    workers = [f"w{i}" for i in range(k)]
    available = data.draw(st.lists(st.sampled_from(workers), min_size=1, unique=True))
    loads = data.draw(st.lists(st.integers(0, 3), min_size=len(available), max_size=len(available)))
    plan = build_plan(centroids, tuple(workers), [(w,) for w in available])
    # The reference uses the very float32 similarities the plan computes, so every comparison
    # (band edge, ties) must come out identically.
    values = plan.similarities(sig).tolist()
    sims = dict(zip(plan.zones, values, strict=True))
    got = choose(plan, sig, loads, tau, min_candidates)
    zone, rank = reference_choice(sims, workers, available, loads, tau, min_candidates)
    assert got is not None and (got.zone, got.rank) == (zone, rank)
    assert available[got.position] == workers[zone]
    assert got.similarity == sims[zone]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_low_rank_signature_ranks_like_the_vector_it_stands_for(
    k: int, rank: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    dim = 10
    centroids = rng.random((k, dim)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    basis = rng.standard_normal((rank, dim)).astype(np.float32)  # not orthonormal on purpose
    coords = rng.standard_normal(rank).astype(np.float32)
    if float(np.linalg.norm(coords @ basis)) < 1e-3:
        return
    workers = [f"w{i}" for i in range(k)]
    plan = build_plan(centroids, tuple(workers), [(w,) for w in workers], basis=basis)
    low = LowRankSignature(coords, basis)
    np.testing.assert_allclose(plan.similarities(low), plan.similarities(low.vector()),
                               atol=2e-5)
    # Another table's predictor: the coordinates mean nothing to this plan's projection, so
    # the plan builds the vector and ranks it exactly as a plain signature.
    foreign = LowRankSignature(coords, basis.copy())
    np.testing.assert_array_equal(plan.similarities(foreign), plan.similarities(low.vector()))


def test_low_rank_choice_matches_hand_worked_example() -> None:
    # basis = identity rows of the first two axes: coords (1, 0) stand for s = (1, 0, 0), the
    # module example: band {0} widened by min-2 to zone 1, the less loaded.
    basis = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
    plan = build_plan(CENTROIDS, WORKERS, [(w, f"http://{w}:1/") for w in WORKERS], basis=basis)
    coords = np.array([2, 0], dtype=np.float32)  # scale does not matter: normalised away
    choice = choose(plan, LowRankSignature(coords, basis), [5, 3, 0, 0], tau=0.1,
                    min_candidates=2)
    assert choice is not None
    assert (choice.position, choice.zone, choice.band_size, choice.rank) == (1, 1, 2, 2)
    assert choice.similarity == pytest.approx(0.8)

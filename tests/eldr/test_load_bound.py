"""The band's load bound (gateway/eldr/band.py, "Load bound"): hand-worked decisions, the
randomised equivalences (bound=None is the paper's rule; a bound nobody exceeds changes
nothing; the bounded rule matches a literal reference), the policy/table/metrics plumbing and
the zone-table field.

Zones (unit centroids) c0=(1,0,0), c1=(.8,.6,0), c2=(.6,.8,0), c3=(0,1,0), c4=(0,0,1);
signature s=(1,0,0): similarities s_k = 1.0, 0.8, 0.6, 0.0, 0.0 (zones 3 and 4 tie).
"""

from __future__ import annotations

import bisect
import json
import math
import time
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway.eldr.band import BandChoice, BandPlan, build_plan, choose
from gateway.eldr.metrics import EldrMetrics
from gateway.eldr.policy import EldrPolicy
from gateway.eldr.runtime import ActiveZones
from gateway.errors import ConfigError
from gateway.routing import RoutingInput
from tests.eldr.helpers import table, unit, view
from zones.cli import _options, build_parser
from zones.fit import DEFAULT_LOAD_BOUND
from zones.table import ZoneTableError, make_table, parse_table, table_to_json

CENTROIDS = np.array(
    [[1, 0, 0], [0.8, 0.6, 0], [0.6, 0.8, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
WORKERS = ("w0", "w1", "w2", "w3", "w4")
S = np.array([1, 0, 0], dtype=np.float32)


def plan_for(available: Sequence[str]) -> BandPlan:
    return build_plan(CENTROIDS, WORKERS, [(w,) for w in available])


ALL = plan_for(WORKERS)


# --- hand-worked decisions -----------------------------------------------------------------------


def test_full_band_member_is_skipped_for_the_next_most_similar_eligible_zone() -> None:
    # Loads 7, 3, 5, 1, 9; bound 2: min_load 1, cap 3. Zone 0 (7) is over: skipped. Eligible
    # zones 1 (3) and 3 (1). s* = 0.8 (zone 1), tau 0.1: band {1}; min 1 is met. Zone 1 wins
    # although zone 3 is idler: within the bound, locality still decides.
    loads = [7, 3, 5, 1, 9]
    assert choose(ALL, S, loads, tau=0.1, min_candidates=1) == BandChoice(0, 0, 1, 1, 1.0)
    got = choose(ALL, S, loads, tau=0.1, min_candidates=1, bound=2)
    assert got is not None
    assert (got.position, got.zone, got.band_size, got.rank, got.load_skipped) == (1, 1, 1, 2, 1)
    assert got.similarity == pytest.approx(0.8)


def test_min_candidates_neighbours_are_taken_from_eligible_zones_only() -> None:
    # Loads 6, 5, 3, 4, 4; bound 2: cap 5. Zone 0 over. Eligible band: s* = 0.8 -> {1}
    # (0.6 < 0.7); min-2 admits the next ELIGIBLE zone, 2 (0.6). Loads 5 vs 3 -> zone 2.
    # Unbounded: band {0} + min-2 zone 1, loads 6 vs 5 -> zone 1.
    loads = [6, 5, 3, 4, 4]
    old = choose(ALL, S, loads, tau=0.1, min_candidates=2)
    assert old is not None and (old.zone, old.load_skipped) == (1, 0)
    got = choose(ALL, S, loads, tau=0.1, min_candidates=2, bound=2)
    assert got is not None
    assert (got.zone, got.band_size, got.rank, got.load_skipped) == (2, 2, 3, 1)
    # Loads 6, 4, 5, 3, 4; bound 1: cap 4. Zones 0 and 2 over: band {1}, and min-2 passes
    # zone 2 to admit zone 3 (0.0, before zone 4 by index). Loads 4 vs 3 -> zone 3; zones 0
    # and 2 were skipped above it.
    got = choose(ALL, S, [6, 4, 5, 3, 4], tau=0.1, min_candidates=2, bound=1)
    assert got is not None
    assert (got.zone, got.band_size, got.rank, got.load_skipped) == (3, 2, 4, 2)


def test_a_load_exactly_at_the_bound_is_eligible() -> None:
    # min_load 0 (zone 4); zone 0 at 2 = 0 + 2 stays; at bound 1 zones 0-3 go and zone 4
    # takes it: rank 4 (zone 3 ties with it on similarity), four zones skipped above it
    # (zone 3 ranks above zone 4 by index).
    kept = choose(ALL, S, [2, 2, 2, 2, 0], tau=0.1, min_candidates=1, bound=2)
    assert kept is not None and (kept.zone, kept.load_skipped) == (0, 0)
    gone = choose(ALL, S, [2, 2, 2, 2, 0], tau=0.1, min_candidates=1, bound=1)
    assert gone is not None and (gone.zone, gone.rank, gone.load_skipped) == (4, 4, 4)


def test_equal_loads_exclude_nothing() -> None:
    # Everyone at min_load: every zone is eligible even at bound 0, and the paper's rule runs:
    # band {0} + min-2 zone 1, load tie -> the more similar zone 0.
    for bound in (0, 1, 5):
        got = choose(ALL, S, [4, 4, 4, 4, 4], tau=0.1, min_candidates=2, bound=bound)
        assert got == BandChoice(0, 0, 2, 1, 1.0, 0)


def test_equal_similarities_keep_zone_order_among_eligible_zones() -> None:
    # Zones a, b share a centroid (similarity 1.0 both); c is orthogonal (0.0).
    centroids = np.array([[0, 1, 0], [0, 1, 0], [1, 0, 0]], dtype=np.float32)
    plan = build_plan(centroids, ("a", "b", "c"), [("a",), ("b",), ("c",)])
    sig = np.array([0, 1, 0], dtype=np.float32)
    # bound 1, loads 3, 1, 0: cap 1; zone 0 over (it ranks first: same similarity, lower
    # index). s* = 1.0 from zone 1: band {1}; min-2 admits zone 2. Loads 1 vs 0 -> zone 2;
    # one over-bound zone (0) ranks above it.
    got = choose(plan, sig, [3, 1, 0], tau=0.1, min_candidates=2, bound=1)
    assert got == BandChoice(2, 2, 2, 3, 0.0, 1)
    # Equal similarity AND equal load among eligible zones: the lower zone index wins.
    got = choose(plan, sig, [1, 1, 0], tau=0.1, min_candidates=2, bound=1)
    assert got == BandChoice(0, 0, 2, 1, 1.0, 0)
    # Zones 3 and 4 of the module example tie at 0.0: with zones 0-2 over, zone 3 (lower
    # index) leads the band; zone 4 joins by tau (0.0 >= 0.0 - 0.1); loads 2 vs 2 -> zone 3.
    got = choose(ALL, S, [9, 9, 9, 2, 2], tau=0.1, min_candidates=1, bound=3)
    assert got is not None and (got.zone, got.band_size, got.rank, got.load_skipped) == (
        3, 2, 4, 3)


def test_whole_band_over_the_bound_re_forms_among_eligible_zones() -> None:
    # tau 0.25: unbounded band {0, 1}. Loads 8, 8, 2, 3, 9, bound 3: cap 5, zones 0, 1, 4
    # over. Eligible: s* = 0.6 (zone 2), band {2} (0.0 < 0.35); min-2 admits zone 3 (0.0).
    # Loads 2 vs 3 -> zone 2, rank 3, two zones skipped above it.
    got = choose(ALL, S, [8, 8, 2, 3, 9], tau=0.25, min_candidates=2, bound=3)
    assert got is not None
    assert (got.zone, got.band_size, got.rank, got.load_skipped) == (2, 2, 3, 2)
    assert got.similarity == pytest.approx(0.6)


def test_least_loaded_worker_is_chosen_when_it_is_the_only_eligible() -> None:
    # bound 2: cap 3; only zone 3 (load 1) qualifies, however dissimilar (0.0, rank 4).
    got = choose(ALL, S, [8, 8, 8, 1, 8], tau=0.1, min_candidates=2, bound=2)
    assert got == BandChoice(3, 3, 1, 4, 0.0, 3)


def test_bound_0_is_join_shortest_queue_over_least_loaded_workers_by_similarity() -> None:
    # Least-loaded workers (1 in flight): zones 1, 3, 4; the most similar of them, zone 1.
    got = choose(ALL, S, [3, 1, 2, 1, 1], tau=0.1, min_candidates=2, bound=0)
    assert got is not None and (got.zone, got.rank, got.load_skipped, got.band_size) == (
        1, 2, 1, 2)
    # Only zones 3 and 4 at the minimum: tie on similarity -> zone 3.
    got = choose(ALL, S, [3, 2, 2, 0, 0], tau=1.0, min_candidates=2, bound=0)
    assert got is not None and (got.zone, got.load_skipped) == (3, 3)


# --- zone-less overflow --------------------------------------------------------------------------


def test_zoneless_least_loaded_worker_is_chosen_when_no_zone_is_eligible() -> None:
    # "new" serves no zone. Every zone over min_load (1) + 2 -> empty band, overflow to "new";
    # every zone was skipped.
    plan = plan_for([*WORKERS, "new"])
    assert plan.zoneless == (5,)
    got = choose(plan, S, [5, 4, 4, 6, 7, 1], tau=0.1, min_candidates=2, bound=2)
    assert got == BandChoice(5, None, 1, None, None, 5)


def test_zoneless_worker_still_needs_strictly_fewer_requests_than_the_band() -> None:
    plan = plan_for([*WORKERS, "new"])
    # Zones 5, 3, 9, 9, 9, new 2; bound 1: cap 3; zone 0 over; band {1} (min-2 finds no other
    # eligible zone). "new" (2) < zone 1 (3): overflow; zone 0 was skipped above zone 1.
    got = choose(plan, S, [5, 3, 9, 9, 9, 2], tau=0.1, min_candidates=2, bound=1)
    assert got == BandChoice(5, None, 2, None, None, 1)
    # "new" at the band's load: the zone keeps it (ties never go to overflow).
    got = choose(plan, S, [5, 2, 9, 9, 9, 2], tau=0.1, min_candidates=2, bound=1)
    assert got is not None and (got.zone, got.position, got.load_skipped) == (1, 1, 1)


def test_zoneless_workers_count_towards_the_minimum() -> None:
    # Zones at 3, 2, 1, 5, 5, bound 1, min 1. Without "new": min_load 1, cap 2; zone 0 goes,
    # zone 1 (0.8) keeps the request.
    zones_only = [3, 2, 1, 5, 5]
    got = choose(ALL, S, zones_only, tau=0.1, min_candidates=1, bound=1)
    assert got is not None and (got.zone, got.load_skipped) == (1, 1)
    # "new" idle: min_load 0, cap 1; zones 0 and 1 go, the band re-forms at zone 2 (load 1),
    # and "new" (0) is strictly less loaded: overflow, two zones skipped.
    plan = plan_for([*WORKERS, "new"])
    got = choose(plan, S, [*zones_only, 0], tau=0.1, min_candidates=1, bound=1)
    assert got == BandChoice(5, None, 2, None, None, 2)
    # "new" busy: the minimum is the zones' again and zone 1 keeps the request.
    got = choose(plan, S, [*zones_only, 5], tau=0.1, min_candidates=1, bound=1)
    assert got is not None and (got.position, got.zone, got.load_skipped) == (1, 1, 1)


# --- randomised equivalences ---------------------------------------------------------------------


def old_choose(
    plan: BandPlan, signature: np.ndarray, in_flight: Sequence[int], tau: float,
    min_candidates: int,
) -> BandChoice | None:
    """The band rule as it was before the load bound (verbatim copy): the reference bound=None
    must reproduce."""
    if plan.size == 0:
        return None
    got = plan.ranked(signature)
    if got is None:
        return None
    load_of = in_flight.__getitem__
    ranked, rows = got
    best_neg = ranked[0]
    limit = tau + best_neg
    positions = plan.positions
    count = len(rows)
    band: list[int] = []
    workers: set[int] = set()
    j = 0
    while j < count and ranked[j] <= limit:
        band.append(j)
        workers.add(positions[rows[j]])
        j += 1
    while len(workers) < min_candidates and j < count and math.isfinite(ranked[j]):
        if positions[rows[j]] not in workers:
            band.append(j)
            workers.add(positions[rows[j]])
        j += 1
    band_loads = [load_of(positions[rows[j]]) for j in band]
    chosen_load = min(band_loads)
    best_j = band[band_loads.index(chosen_load)]
    chosen = rows[best_j]
    overflow: int | None = None
    for position in plan.zoneless:
        load = load_of(position)
        if load < chosen_load:
            chosen_load = load
            overflow = position
    band_size = len(workers) + len(plan.zoneless)
    if overflow is not None:
        return BandChoice(overflow, None, band_size, None, None)
    similarity = -ranked[best_j]
    rank = 1 + bisect.bisect_left(ranked, ranked[best_j])
    return BandChoice(positions[chosen], plan.zones[chosen], band_size, rank, similarity)


def reference_bounded(
    sims: dict[int, float], owner: dict[int, int], zoneless: Sequence[int], loads: Sequence[int],
    tau: float, min_candidates: int, bound: int,
) -> tuple[int, int | None, int]:
    """The bounded rule written out literally: (chosen position, zone, load_skipped)."""
    cap = min(loads) + bound
    order = sorted(sims, key=lambda k: (-sims[k], k))
    eligible = [k for k in order if loads[owner[k]] <= cap]
    band: list[int] = []
    if eligible:
        best = sims[eligible[0]]
        band = [k for k in eligible if sims[k] >= best - tau]
        for k in eligible:
            if len({owner[b] for b in band}) >= min_candidates:
                break
            if k not in band and owner[k] not in {owner[b] for b in band}:
                band.append(k)
    over = [k for k in order if loads[owner[k]] > cap]
    if band:
        zone = min(band, key=lambda k: (loads[owner[k]], -sims[k], k))
        above = sum(1 for k in over if (-sims[k], k) < (-sims[zone], zone))
        light = [p for p in zoneless if loads[p] < loads[owner[zone]]]
        if light:
            return min(light, key=lambda p: (loads[p], p)), None, above
        return owner[zone], zone, above
    return min(zoneless, key=lambda p: (loads[p], p)), None, len(over)


def random_case(seed: int, data: st.DataObject) -> tuple[
        BandPlan, np.ndarray, list[int], list[str], list[str]]:
    """A plan over K random coarse centroids (exact ties common) and a random available list,
    possibly with zone-less workers, plus loads."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 10))
    dim = 6
    centroids = rng.integers(0, 3, size=(k, dim)).astype(np.float32)
    centroids[centroids.sum(axis=1) == 0, 0] = 1
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    sig = rng.integers(0, 3, size=dim).astype(np.float32)
    sig[0] += 1
    sig /= np.linalg.norm(sig)
    workers = [f"w{i}" for i in range(k)]
    pool = [*workers, "x0", "x1"]  # x*: zone-less when available
    available = data.draw(st.lists(st.sampled_from(pool), min_size=1, unique=True))
    if not any(w in workers for w in available):
        available.append(workers[0])
    loads = data.draw(st.lists(st.integers(0, 6), min_size=len(available),
                               max_size=len(available)))
    plan = build_plan(centroids, tuple(workers), [(w,) for w in available])
    return plan, sig, loads, workers, available


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.05, 0.1, 0.3, 1.0]),
       st.integers(1, 3), st.data())
def test_bound_none_is_the_old_rule(
    seed: int, tau: float, min_candidates: int, data: st.DataObject
) -> None:
    plan, sig, loads, _, _ = random_case(seed, data)
    old = old_choose(plan, sig, loads, tau, min_candidates)
    assert choose(plan, sig, loads, tau, min_candidates) == old
    assert choose(plan, sig, loads, tau, min_candidates, bound=None) == old
    # A bound no worker exceeds changes nothing either.
    assert choose(plan, sig, loads, tau, min_candidates, bound=max(loads) - min(loads)) == old


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.05, 0.1, 0.3, 1.0]),
       st.integers(1, 3), st.integers(0, 4), st.data())
def test_bounded_rule_matches_literal_reference(
    seed: int, tau: float, min_candidates: int, bound: int, data: st.DataObject
) -> None:
    plan, sig, loads, _, _ = random_case(seed, data)
    sims = dict(zip(plan.zones, plan.similarities(sig).tolist(), strict=True))
    owner = dict(zip(plan.zones, plan.positions, strict=True))
    got = choose(plan, sig, loads, tau, min_candidates, bound=bound)
    assert got is not None
    assert (got.position, got.zone, got.load_skipped) == reference_bounded(
        sims, owner, plan.zoneless, loads, tau, min_candidates, bound)
    # Never a long queue: the choice is within the bound of the least-loaded worker.
    assert loads[got.position] <= min(loads) + bound
    if bound == 0:  # join-shortest-queue
        assert loads[got.position] == min(loads)


def test_views_and_plain_loads_decide_alike() -> None:
    views = [view(w, n) for w, n in zip(WORKERS, [6, 5, 3, 4, 4], strict=True)]
    assert choose(ALL, S, views, 0.1, 2, bound=2) == choose(ALL, S, [6, 5, 3, 4, 4], 0.1, 2, 2)


# --- policy, table, metrics ----------------------------------------------------------------------


def _snapshot(load_bound: int | None) -> ActiveZones:
    rows = [c.tolist() for c in CENTROIDS]
    base = table(rows, list(WORKERS), tau=0.1, min_candidates=1)
    t = make_table(base.spec, base.centroids, list(WORKERS), tau=0.1, min_candidates=1,
                   load_bound=load_bound)
    return ActiveZones(t, tuple(t.workers), 1, time.time(), "test")


def test_policy_takes_the_table_bound_and_the_override_wins() -> None:
    cands = [view(w, n) for w, n in zip(WORKERS, [7, 3, 5, 1, 9], strict=True)]

    def pick(table_bound: int | None, setting: int | None = None) -> tuple[str, int]:
        routing = RoutingInput(unit([1, 0, 0]), "cache", _snapshot(table_bound))
        sel = EldrPolicy(load_bound=setting).select(cands, routing)
        return sel.worker.worker_id, sel.load_skipped

    assert pick(None) == ("w0", 0)  # no bound anywhere: the paper's rule
    assert pick(2) == ("w1", 1)  # the table's bound (first example above)
    assert pick(None, 2) == ("w1", 1)  # the setting alone
    assert pick(100, 0) == ("w3", 3)  # the setting overrides the table
    assert pick(0, 100) == ("w0", 0)
    assert pick(2, -1) == ("w0", 0)  # -1: off, whatever the table says
    with pytest.raises(ConfigError, match="load_bound"):
        EldrPolicy(load_bound=-2)


def test_metrics_count_decisions_where_the_bound_skipped_a_more_similar_zone() -> None:
    registry = CollectorRegistry()
    metrics = EldrMetrics(registry)
    cands = [view(w, n) for w, n in zip(WORKERS, [7, 3, 5, 1, 9], strict=True)]
    policy = EldrPolicy(load_bound=2)
    routing = RoutingInput(unit([1, 0, 0]), "cache", _snapshot(None))
    metrics.record_decision("eldr", "cache", policy.select(cands, routing))
    idle = [view(w) for w in WORKERS]
    metrics.record_decision("eldr", "cache", policy.select(idle, routing))
    assert registry.get_sample_value("eldr_load_bound_skips_total") == 1
    assert registry.get_sample_value("eldr_band_size_count") == 2


def test_table_load_bound_round_trips_and_is_absent_when_unset() -> None:
    base = table([c.tolist() for c in CENTROIDS], list(WORKERS))
    unset = make_table(base.spec, base.centroids, list(WORKERS))
    assert unset.load_bound is None
    assert b"load_bound" not in table_to_json(unset)
    assert unset.checksum == base.checksum  # tables without it keep their checksum
    assert parse_table(table_to_json(unset)).load_bound is None
    bounded = make_table(base.spec, base.centroids, list(WORKERS), load_bound=3)
    assert bounded.checksum != unset.checksum
    back = parse_table(table_to_json(bounded))
    assert back.load_bound == 3 and back.checksum == bounded.checksum
    assert table_to_json(back) == table_to_json(bounded)
    # Edited without resealing: the checksum catches it.
    doc = json.loads(table_to_json(bounded))
    doc["load_bound"] = 4
    with pytest.raises(ZoneTableError, match="checksum"):
        parse_table(json.dumps(doc))


@pytest.mark.parametrize("value", [-1, True, 1.5, "2"])
def test_table_load_bound_must_be_a_non_negative_integer(value: object) -> None:
    base = table([c.tolist() for c in CENTROIDS], list(WORKERS))
    with pytest.raises(ZoneTableError, match=r"^load_bound:"):
        make_table(base.spec, base.centroids, list(WORKERS), load_bound=value)  # type: ignore[arg-type]


def test_zones_fit_and_refit_load_bound_option() -> None:
    parser = build_parser()
    fit = ["fit", "-i", "calib.jsonl", "--num-workers", "2", "-o", "t.json"]
    assert _options(parser.parse_args(fit)).load_bound == DEFAULT_LOAD_BOUND == 4
    assert _options(parser.parse_args([*fit, "--load-bound", "2"])).load_bound == 2
    assert _options(parser.parse_args([*fit, "--load-bound", "none"])).load_bound is None
    base = table([c.tolist() for c in CENTROIDS], list(WORKERS))
    old = make_table(base.spec, base.centroids, list(WORKERS), load_bound=2)
    refit = ["refit", "--old", "t.json", "-i", "calib.jsonl", "-o", "u.json"]
    assert _options(parser.parse_args(refit), old).load_bound == 2  # refit keeps it
    assert _options(parser.parse_args([*refit, "--load-bound", "0"]), old).load_bound == 0
    assert _options(parser.parse_args([*refit, "--load-bound", "none"]), old).load_bound is None
    with pytest.raises(SystemExit):
        parser.parse_args([*fit, "--load-bound", "-1"])

"""The `eldr` policy over real zone tables: band choice, fallbacks, plan cache, JSQ at tau = 1."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway.config import Settings
from gateway.eldr.locality import Locality
from gateway.eldr.metrics import EldrMetrics
from gateway.eldr.policy import EldrPolicy
from gateway.eldr.resolver import LocalityResolver, SignatureResolver
from gateway.eldr.runtime import ActiveZones, ZoneRuntime
from gateway.errors import ConfigError
from gateway.policies.least_load import LeastLoadPolicy
from gateway.policies.registry import make_policy
from gateway.policies.round_robin import RoundRobinPolicy
from gateway.routing import RoutingInput, Selection, WorkerView
from tests.eldr.helpers import table, unit, view

CENTROIDS: list[list[float]] = [[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0, 1]]
WORKERS = ["w0", "w1", "w2", "w3"]


@dataclass
class Source:
    active: ActiveZones | None


class Resolving:
    """An `EldrPolicy` fed the way dispatch feeds it: each request's routing input carries the
    snapshot that was active when its signature was resolved (here: `source.active` now)."""

    def __init__(self, source: Source, **overrides: Any) -> None:
        self.source = source
        self.policy = EldrPolicy(**overrides)

    def select(self, candidates: list[WorkerView], routing: RoutingInput) -> Selection:
        return self.policy.select(candidates, replace(routing, zones=self.source.active))


def snapshot(
    tau: float = 0.1, min_candidates: int = 2, workers: list[str] = WORKERS
) -> ActiveZones:
    t = table(CENTROIDS, workers, tau=tau, min_candidates=min_candidates)
    return ActiveZones(t, tuple(t.workers), 1, time.time(), "test")


def routed(sig: list[float] | None, source: str = "predictor") -> RoutingInput:
    return RoutingInput(None if sig is None else unit(sig), source if sig else "none")


def test_band_choice_reported_in_selection() -> None:
    policy = Resolving(Source(snapshot()))
    cands = [view("w0", 5), view("w1", 3), view("w2", 0), view("w3", 0)]
    sel = policy.select(cands, routed([1, 0, 0]))
    assert sel.worker.worker_id == "w1"
    assert (sel.zone, sel.band_size, sel.rank) == (1, 2, 2)
    assert sel.similarity == pytest.approx(0.8)


def test_table_tau_is_used_and_override_wins() -> None:
    cands = [view("w0", 5), view("w1", 3), view("w2", 0), view("w3", 0)]
    jsq_table = Resolving(Source(snapshot(tau=1.0)))
    assert jsq_table.select(cands, routed([1, 0, 0])).worker.worker_id == "w2"
    local = Resolving(Source(snapshot(tau=1.0)), tau=0.0, min_candidates=1)
    assert local.select(cands, routed([1, 0, 0])).worker.worker_id == "w0"


@pytest.mark.parametrize(
    ("source", "sig", "reason"),
    [
        (Source(None), [1, 0, 0], "no_table"),
        (Source(snapshot()), None, "no_signature"),
        (Source(snapshot()), [1, 0, 0, 0], "dim_mismatch"),
    ],
)
def test_fallbacks_are_least_load_and_reported(
    source: Source, sig: list[float] | None, reason: str
) -> None:
    reasons: list[str] = []
    policy = Resolving(source, on_fallback=reasons.append)
    cands = [view("w0", 5), view("w1", 3), view("w2", 1), view("w3", 4)]
    sel = policy.select(cands, routed(sig))
    assert sel.worker.worker_id == "w2" and sel.zone is None and sel.band_size is None
    assert reasons == [reason]


def test_no_zoned_candidate_falls_back() -> None:
    reasons: list[str] = []
    policy = Resolving(Source(snapshot()), on_fallback=reasons.append)
    sel = policy.select([view("x", 2), view("y", 1)], routed([1, 0, 0]))
    assert sel.worker.worker_id == "y" and reasons == ["no_zone"]


def test_unhealthy_worker_never_chosen() -> None:
    policy = Resolving(Source(snapshot()))
    # w0 (the most similar zone) is not a candidate: it is unhealthy or its circuit is open.
    cands = [view("w1", 9), view("w2", 0), view("w3", 0)]
    for _ in range(3):
        assert policy.select(cands, routed([1, 0, 0])).worker.worker_id != "w0"


def test_plan_cache_follows_snapshot_and_available_set() -> None:
    source = Source(snapshot())
    policy = Resolving(source)
    full = [view("w0", 0), view("w1", 0), view("w2", 0), view("w3", 0)]
    assert policy.select(full, routed([0, 0, 1])).zone == 3
    # w3 gone: sims to zones 0-2 are all 0; band {0} widened by min-2 to {0, 1}; idle -> zone 0.
    assert policy.select(full[:3], routed([0, 0, 1])).zone == 0
    # A table swap (new snapshot) must not reuse plans built for the old one.
    source.active = snapshot(workers=["w3", "w2", "w1", "w0"])
    sel = policy.select(full, routed([1, 0, 0]))
    assert sel.zone == 0 and sel.worker.worker_id == "w3"


def test_plan_reused_for_equal_lists_and_rebuilt_for_reordered_ones() -> None:
    policy = Resolving(Source(snapshot()))
    full = [view("w0", 0), view("w1", 0), view("w2", 0), view("w3", 0)]
    assert policy.select(full, routed([0, 0, 1])).worker.worker_id == "w3"
    plan = policy.policy._last_plan
    # dispatch builds a fresh list of fresh views for every request: the plan is kept
    fresh = [view("w0", 1), view("w1", 1), view("w2", 1), view("w3", 1)]
    assert policy.select(fresh, routed([0, 0, 1])).worker.worker_id == "w3"
    assert policy.policy._last_plan is plan
    # the same workers in another order: positions change, so does the plan
    sel = policy.select(full[::-1], routed([0, 0, 1]))
    assert sel.worker.worker_id == "w3" and sel.zone == 3
    assert policy.policy._last_plan is not plan
    # and back: the first plan again, from the cache
    policy.select(full, routed([0, 0, 1]))
    assert policy.policy._last_plan is plan


def test_remapped_zone_worker_is_used() -> None:
    snap = snapshot()
    remapped = ActiveZones(snap.table, (None, "w1", "w2", "new"), 1, snap.loaded_at, "t")
    policy = Resolving(Source(remapped))
    sel = policy.select([view("w1", 0), view("w2", 0), view("new", 0)], routed([0, 0, 1]))
    # zone 3's table worker w3 left; the runtime handed zone 3 to "new".
    assert sel.worker.worker_id == "new" and sel.zone == 3


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=4, max_size=4), st.sampled_from(range(4)))
def test_tau_1_is_join_shortest_queue(loads: list[int], zone: int) -> None:
    # Signatures and centroids are non-negative, so tau = 1 admits every zone: the choice is a
    # least-loaded worker; among equally loaded ones, the most similar.
    policy = Resolving(Source(snapshot(tau=1.0)))
    cands = [view(w, n) for w, n in zip(WORKERS, loads, strict=True)]
    sig = [float(c) + 0.01 for c in CENTROIDS[zone]]
    ours = policy.select(cands, routed(sig))
    assert ours.worker.in_flight == min(loads)
    if loads.count(min(loads)) == 1:
        assert ours.worker == LeastLoadPolicy().select(cands, routed(sig)).worker
    if loads[zone] == min(loads):
        assert ours.zone == zone


def test_invalid_overrides_rejected() -> None:
    with pytest.raises(ConfigError, match="tau"):
        EldrPolicy(tau=-0.1)
    with pytest.raises(ConfigError, match="min_candidates"):
        EldrPolicy(min_candidates=0)


def test_registry_needs_locality_and_wires_settings_into_the_policy() -> None:
    cfg = Settings(eldr_fallback_policy="round_robin", eldr_tau=0.0, eldr_min_candidates=1)
    with pytest.raises(ConfigError, match="zone table"):
        make_policy("eldr", cfg)
    locality = Locality(ZoneRuntime(None), EldrMetrics(CollectorRegistry()),
                        LocalityResolver(SignatureResolver(Source(None))), None)
    policy = make_policy("eldr", cfg, locality=locality)
    assert isinstance(policy, EldrPolicy) and policy.needs_signature
    assert isinstance(policy.fallback, RoundRobinPolicy)
    # tau 0 + min 1 from settings override the table's 0.1 / 2: pure locality despite load.
    cands = [view("w0", 5), view("w1", 0), view("w2", 0), view("w3", 0)]
    assert policy.select(cands, replace(routed([1, 0, 0]), zones=snapshot())).zone == 0
    # no signature: the configured fallback (round robin), counted by reason
    picks = {policy.select(cands, routed(None)).worker.worker_id for _ in range(4)}
    assert picks == set(WORKERS)
    assert locality.metrics.fallbacks.labels("no_table")._value.get() == 4


def test_float64_signature_accepted() -> None:
    policy = Resolving(Source(snapshot()))
    sig = np.array([0, 0, 1], dtype=np.float64)
    assert policy.select([view(w) for w in WORKERS], RoutingInput(sig, "cache")).zone == 3

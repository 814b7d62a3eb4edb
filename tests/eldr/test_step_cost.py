"""The step-cost decision (gateway/eldr/step_cost.py): activations, the in-flight tracker, the
choice on hand-worked cases, the policy, and dispatch releasing what it admitted.

Geometry for the hand-worked cases: one MoE layer, three experts, top-1 unless said otherwise,
IDF of ones and every layer masked, so a signature is the normalised prompt count vector and
the layer scale is 1.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import aiohttp
import numpy as np
import pytest

from gateway.config import PrefillSpec, Settings
from gateway.eldr.policy import EldrPolicy
from gateway.eldr.runtime import ActiveZones
from gateway.eldr.step_cost import EPS, InFlightExperts, StepCostModel
from gateway.errors import ConfigError
from gateway.routing import RoutingInput, Selection, WorkerView
from tests.eldr.helpers import TINY, table, tiny_spec, unit, view
from tests.gateway.fakes import start_workers
from tests.gateway_server import running_gateway
from zones.geometry import ModelGeometry
from zones.signature import SignatureSpec

EXPERTS_ONLY = StepCostModel(fixed=0.0, expert=1.0, token=0.0)


def act_of(tracker: InFlightExperts, counts: Sequence[float]) -> np.ndarray:
    return tracker.activation(unit(counts))


# --- activations ---------------------------------------------------------------------------------


def test_activation_is_the_per_step_probability_of_each_expert() -> None:
    tracker = InFlightExperts(tiny_spec())
    np.testing.assert_allclose(act_of(tracker, [1, 0, 0]), [1 - EPS, 0, 0], atol=1e-7)
    # Half the mass on each of two experts, one expert per token: each is used half the time.
    np.testing.assert_allclose(act_of(tracker, [1, 1, 0]), [0.5, 0.5, 0], atol=1e-6)
    # top-2: 1 - (1 - 0.5)^2 = 0.75 each (independent draws).
    top2 = InFlightExperts(tiny_spec(ModelGeometry("tiny2", 1, 3, 2)))
    np.testing.assert_allclose(act_of(top2, [1, 1, 0]), [0.75, 0.75, 0], atol=1e-6)


def test_activation_undoes_the_idf_weighting() -> None:
    # IDF (2, 1, 1): counts (1, 1, 0) give the signature ~ (2, 1, 0); the mass is still even.
    spec = SignatureSpec(TINY, np.array([[2, 1, 1]], np.float32), np.ones(1, bool))
    sig = spec.build(np.array([[1, 1, 0]]))
    assert sig is not None
    np.testing.assert_allclose(InFlightExperts(spec).activation(sig), [0.5, 0.5, 0], atol=1e-6)


def test_masked_layers_scale_to_all_moe_layers() -> None:
    # Two layers, one masked: the masked layer's distinct experts count twice.
    geometry = ModelGeometry("two", 2, 3, 1)
    spec = SignatureSpec(geometry, np.ones((2, 3), np.float32), np.array([True, False]))
    tracker = InFlightExperts(spec)
    tracker.admit("w", tracker.activation(unit([1, 1, 0])))
    assert tracker.distinct("w") == pytest.approx(2 * 1.0, abs=1e-5)


# --- the tracker -------------------------------------------------------------------------------


def test_admit_and_release_are_exact_inverses() -> None:
    tracker = InFlightExperts(tiny_spec())
    a, b = act_of(tracker, [1, 1, 0]), act_of(tracker, [0, 1, 1])
    release_a = tracker.admit("w", a)
    release_b = tracker.admit("w", b)
    # Idle probabilities (0.5, 0.25, 0.5): expected distinct experts 3 - 1.25.
    assert tracker.distinct("w") == pytest.approx(1.75, abs=1e-6)
    assert tracker.tracked("w") == 2
    release_a()
    release_a()  # a second call does nothing
    assert tracker.distinct("w") == pytest.approx(1.0, abs=1e-6)
    release_b()
    assert (tracker.distinct("w"), tracker.tracked("w")) == (0.0, 0)


def test_many_workers_grow_the_tracker() -> None:
    tracker = InFlightExperts(tiny_spec())
    act = act_of(tracker, [1, 0, 0])
    releases = [tracker.admit(f"w{i}", act) for i in range(20)]
    assert all(tracker.tracked(f"w{i}") == 1 for i in range(20))
    for release in releases:
        release()
    assert all(tracker.distinct(f"w{i}") == 0.0 for i in range(20))


# --- the choice -------------------------------------------------------------------------------


def test_request_joins_the_worker_already_streaming_its_experts() -> None:
    # w0 runs a request on expert 0, w1 one on expert 2; a new expert-0 request adds ~0
    # experts on w0 and 1 on w1. Expert time only: cost = (n + 1) x added + distinct
    # -> w0: 2 x 0 + 1 = 1, w1: 2 x 1 + 1 = 3.
    tracker = InFlightExperts(tiny_spec())
    tracker.admit("w0", act_of(tracker, [1, 0, 0]))
    tracker.admit("w1", act_of(tracker, [0, 0, 1]))
    choice = tracker.choose(EXPERTS_ONLY, [view("w0", 1), view("w1", 1)],
                            act_of(tracker, [1, 0, 0]))
    assert choice.position == 0
    assert choice.cost == pytest.approx(1.0, abs=1e-4)
    assert choice.added == pytest.approx(0.0, abs=1e-4)


def test_queue_length_outweighs_locality_when_tokens_cost_enough() -> None:
    # w0 holds three expert-0 requests, w1 one expert-2 request; expert 1 s, token 1 s.
    # w0: delta = 0 + 1, step = 1 + 3 -> cost 4 x 1 + 4 = 8.
    # w1: delta = 1 + 1, step = 1 + 1 -> cost 2 x 2 + 2 = 6: w1, although w0 is local.
    tracker = InFlightExperts(tiny_spec())
    for _ in range(3):
        tracker.admit("w0", act_of(tracker, [1, 0, 0]))
    tracker.admit("w1", act_of(tracker, [0, 0, 1]))
    model = StepCostModel(fixed=0.0, expert=1.0, token=1.0)
    cands = [view("w0", 3), view("w1", 1)]
    choice = tracker.choose(model, cands, act_of(tracker, [1, 0, 0]))
    assert choice.position == 1 and choice.cost == pytest.approx(6.0, abs=1e-4)
    # With expert time ten times dearer, locality wins: w0 = 4 x 1 + 13 = 17, w1 = 2 x 11 + 11.
    model = StepCostModel(fixed=0.0, expert=10.0, token=1.0)
    assert tracker.choose(model, cands, act_of(tracker, [1, 0, 0])).position == 0


def test_ties_go_to_fewer_in_flight_then_candidate_order() -> None:
    tracker = InFlightExperts(tiny_spec())
    act = act_of(tracker, [1, 0, 0])
    # Nothing tracked, expert time only, equal loads: equal costs -> first candidate.
    assert tracker.choose(EXPERTS_ONLY, [view("a", 2), view("b", 2)], act).position == 0
    # Expert time only, loads 2 and 1: (n + 1) x added = 3 vs 2 -> the less loaded.
    assert tracker.choose(EXPERTS_ONLY, [view("a", 2), view("b", 1)], act).position == 1
    # A model where nothing costs anything: every cost 0, the fewer in flight wins the tie.
    free = StepCostModel(fixed=0.0, expert=0.0, token=0.0)
    assert tracker.choose(free, [view("a", 2), view("b", 1), view("c", 1)], act).position == 1


def test_fixed_time_never_changes_the_choice() -> None:
    rng = np.random.default_rng(0)
    spec = tiny_spec(ModelGeometry("wide", 2, 8, 2))
    for _ in range(50):
        tracker = InFlightExperts(spec)
        loads = rng.integers(0, 4, size=5).tolist()
        for w, n in enumerate(loads):
            for _ in range(n):
                tracker.admit(f"w{w}", tracker.activation(unit(rng.random(16) ** 4)))
        cands = [view(f"w{w}", n) for w, n in enumerate(loads)]
        act = tracker.activation(unit(rng.random(16) ** 4))
        picks = {tracker.choose(StepCostModel(fixed, 6.4e-6, 25e-6), cands, act).position
                 for fixed in (0.0, 3e-3, 1.0)}
        assert len(picks) == 1


def test_step_cost_model_rejects_negative_or_non_finite_constants() -> None:
    with pytest.raises(ValueError, match="expert"):
        StepCostModel(fixed=0.0, expert=-1.0, token=0.0)
    with pytest.raises(ValueError, match="token"):
        StepCostModel(fixed=0.0, expert=0.0, token=float("nan"))


# --- the policy --------------------------------------------------------------------------------


def _active() -> ActiveZones:
    t = table([[1, 0, 0], [0, 1, 0], [0, 0, 1]], ["w0", "w1", "w2"])
    return ActiveZones(t, tuple(t.workers), 1, time.time(), "test")


def test_policy_step_cost_admits_on_select_and_releases_on_demand() -> None:
    policy = EldrPolicy(decision="step-cost", step_cost=EXPERTS_ONLY)
    active = _active()
    cands = [view("w0"), view("w1"), view("w2")]
    first = policy.select(cands, RoutingInput(unit([0, 0, 1]), "cache", active))
    assert first.worker.worker_id == "w0" and first.release is not None  # idle: first
    assert (first.zone, first.band_size) == (None, None)  # no band statistics to report
    # An expert-0 request: w0 (1 in flight, expert 2 streaming) costs 2 x 1 + 1 = 3; the idle
    # w1 and w2 cost 1 each -> w1. With idle workers around, spreading is cheapest.
    cands = [view("w0", 1), view("w1"), view("w2")]
    second = policy.select(cands, RoutingInput(unit([1, 0, 0]), "cache", active))
    assert second.worker.worker_id == "w1" and second.release is not None
    # Everyone busy (w2 gone): another expert-2 request adds ~0 experts on w0 (cost ~1) and
    # one on w1 (2 x 1 + 1 = 3) -> w0, the worker already streaming its expert.
    cands = [view("w0", 1), view("w1", 1)]
    third = policy.select(cands, RoutingInput(unit([0, 0, 1]), "cache", active))
    assert third.worker.worker_id == "w0" and third.release is not None
    for sel in (first, second, third):
        sel.release()
    tracker = policy._tracker
    assert tracker is not None and all(tracker.tracked(w) == 0 for w in ("w0", "w1", "w2"))


def test_policy_step_cost_starts_a_new_tracker_for_a_new_table() -> None:
    policy = EldrPolicy(decision="step-cost", step_cost=EXPERTS_ONLY)
    cands = [view("w0"), view("w1")]
    old = policy.select(cands, RoutingInput(unit([1, 0, 0]), "cache", _active()))
    old_tracker = policy._tracker
    policy.select(cands, RoutingInput(unit([1, 0, 0]), "cache", _active()))
    assert policy._tracker is not old_tracker
    assert old.release is not None
    old.release()  # goes to the old tracker, harmlessly
    assert old_tracker is not None and old_tracker.tracked("w0") == 0


def test_policy_band_selections_carry_no_release_and_bad_decision_is_refused() -> None:
    sel = EldrPolicy().select([view("w0"), view("w1")],
                              RoutingInput(unit([1, 0, 0]), "cache", _active()))
    assert sel.release is None
    with pytest.raises(ConfigError, match="decision"):
        EldrPolicy(decision="fastest")


# --- dispatch ----------------------------------------------------------------------------------


class Releasing:
    """A decode policy that counts its admissions and releases, like step-cost does."""

    name = "releasing"
    needs_signature = False
    needs_request = False

    def __init__(self) -> None:
        self.admitted = 0
        self.released = 0

    def select(self, candidates: Sequence[WorkerView], routing: RoutingInput) -> Selection:
        self.admitted += 1

        def release() -> None:
            self.released += 1

        return Selection(candidates[0], release=release)


@pytest.mark.parametrize("flow", ["dual", "prefill-first"])
@pytest.mark.parametrize("status", [200, 500])
async def test_dispatch_releases_every_admitted_decode(flow: str, status: int) -> None:
    prefill = (await start_workers("prefill"))[0]
    decode = (await start_workers("decode", status=status))[0]
    settings = Settings(
        pd_disaggregation=True, prefill=[PrefillSpec(prefill.url, 8998)], decode=[decode.url],
        pd_flow=flow, prometheus_port=0, retry_max_retries=2, retry_initial_backoff_ms=1,
        retry_max_backoff_ms=5, disable_circuit_breaker=True, health_check_interval_secs=60,
        load_poll_interval_secs=0, request_timeout_secs=10.0)
    policy = Releasing()
    try:
        async with running_gateway(settings) as (url, state), aiohttp.ClientSession() as s:
            assert state.dispatcher is not None
            state.dispatcher.policies["decode"] = policy
            for _ in range(3):
                async with s.post(url + "/generate", json={"text": "hi"}) as r:
                    assert r.status == status
                    await r.read()
        # Failed attempts are retried: every attempt admitted once and released once.
        assert policy.admitted == (3 if status == 200 else 6)
        assert policy.released == policy.admitted
    finally:
        await prefill.close()
        await decode.close()

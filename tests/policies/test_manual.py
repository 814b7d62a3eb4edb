from __future__ import annotations

import random

import pytest

from gateway.config import Settings
from gateway.policies.manual import ManualPolicy
from gateway.policies.registry import make_policy
from gateway.routing import WorkerView
from tests.policies.helpers import FakeClock, text_input, views


def _pick(policy: ManualPolicy, candidates: list[WorkerView], key: str | None) -> str:
    return policy.select(candidates, text_input("some text", key)).worker.worker_id


def test_a_key_sticks_and_keys_spread():
    policy = ManualPolicy(rng=random.Random(1))
    workers = views(0, 0, 0)
    first = _pick(policy, workers, "user-1")
    assert all(_pick(policy, workers, "user-1") == first for _ in range(20))
    assert len({_pick(policy, workers, f"user-{i}") for i in range(30)}) == 3
    # a worker joining moves no key
    assert _pick(policy, views(0, 0, 0, 0), "user-1") == first


def test_unavailable_pin_is_reassigned_and_the_original_wins_back():
    policy = ManualPolicy(rng=random.Random(2))
    w0, w1, w2 = views(0, 0, 0)
    first = _pick(policy, [w0, w1, w2], "k")
    rest = [w for w in (w0, w1, w2) if w.worker_id != first]
    second = _pick(policy, rest, "k")
    assert second != first
    assert _pick(policy, rest, "k") == second  # sticks to the replacement
    assert _pick(policy, [w0, w1, w2], "k") == first  # the original is remembered first
    assert policy.pinned("k") == (first, second)
    third_only = [w for w in rest if w.worker_id != second]
    third = _pick(policy, third_only, "k")
    assert policy.pinned("k") == (second, third)  # at most two, the oldest dropped


def test_idle_keys_are_swept_each_interval():
    clock = FakeClock()
    policy = ManualPolicy(max_idle_secs=100, eviction_interval_secs=10, clock=clock,
                          rng=random.Random(0))
    workers = views(0, 0)
    _pick(policy, workers, "idle")
    _pick(policy, workers, "busy")
    clock.now = 90
    _pick(policy, workers, "busy")  # sweep runs (idle for 90 < 100), busy refreshed
    assert len(policy) == 2
    clock.now = 105
    _pick(policy, workers, None)  # "idle" unused for 105 s: dropped; "busy" for 15 s: kept
    assert policy.pinned("idle") == () and policy.pinned("busy") != ()
    assert len(policy) == 1


def test_min_load_assignment_and_requests_without_a_key():
    policy = ManualPolicy(assignment_mode="min_load", rng=random.Random(0))
    assert _pick(policy, views(3, 1, 2), "k") == "w1"
    assert _pick(policy, views(0, 9, 0), "k") == "w1"  # pinned: load no longer matters
    assert _pick(policy, views(3, 2, 1), None) == "w2"  # no key: assigned by mode, not pinned
    assert len(policy) == 1
    ties = {_pick(policy, views(1, 0, 0), None) for _ in range(30)}
    assert ties == {"w1", "w2"}


def test_random_assignment_without_a_key_pins_nothing():
    policy = ManualPolicy(rng=random.Random(5))
    assert len({_pick(policy, views(0, 0, 0), None) for _ in range(40)}) == 3
    assert len(policy) == 0


def test_settings_and_validation():
    policy = make_policy("manual", Settings(assignment_mode="min_load", max_idle_secs=77))
    assert isinstance(policy, ManualPolicy)
    assert (policy.assignment_mode, policy.max_idle_secs) == ("min_load", 77)
    with pytest.raises(ValueError):
        ManualPolicy(assignment_mode="min_group")


def test_sticky_sessions_pin_keys_over_any_policy_and_keep_its_choice_otherwise():
    from gateway.config import Settings
    from gateway.policies.registry import make_policy

    sticky = make_policy("round_robin", Settings(routing_key_override=True))
    assert sticky.name == "round_robin" and sticky.needs_request
    workers = views(0, 0, 0)
    first = sticky.select(workers, text_input(key="conv-1")).worker.worker_id
    # Without a key the wrapped round_robin decides: it moves on every request.
    unkeyed = {sticky.select(workers, text_input()).worker.worker_id for _ in range(3)}
    assert len(unkeyed) == 3
    assert {sticky.select(workers, text_input(key="conv-1")).worker.worker_id
            for _ in range(5)} == {first}
    # The pinned worker leaves: the wrapped policy picks a new one, which then sticks.
    others = [w for w in workers if w.worker_id != first]
    second = sticky.select(others, text_input(key="conv-1")).worker.worker_id
    assert second != first
    assert sticky.select(others, text_input(key="conv-1")).worker.worker_id == second
    plain = make_policy("round_robin", Settings())
    assert not plain.needs_request  # no wrapper without the flag


def test_sticky_sessions_flag_spellings():
    from gateway.cli import settings_from_args

    for flag in ("--routing-key-override", "--sticky-sessions"):
        assert settings_from_args([flag], env={}).routing_key_override

from __future__ import annotations

import random

from gateway.config import Settings
from gateway.policies.cache_aware import CacheAwarePolicy
from gateway.policies.registry import make_policy
from tests.policies.helpers import FakeClock, text_input, views

SYSTEM = "You are a helpful assistant. " * 40  # ~1.1 KB shared prefix


def _policy(**kw) -> CacheAwarePolicy:
    kw.setdefault("rng", random.Random(0))
    return CacheAwarePolicy(**kw)


def _pick(policy: CacheAwarePolicy, loads: tuple[int, ...], text: str | None) -> str:
    return policy.select(views(*loads), text_input(text)).worker.worker_id


def test_hit_routes_to_the_holder_and_misses_spread():
    policy = _policy()
    assert _pick(policy, (0, 0, 0), SYSTEM + "question one") == "w0"
    assert _pick(policy, (0, 0, 0), "something else entirely") == "w1"  # miss: fewest processed
    assert _pick(policy, (0, 0, 0), "a third unrelated prompt") == "w2"
    for i in range(5):
        assert _pick(policy, (0, 0, 0), SYSTEM + f"question {i + 2}") == "w0"


def test_below_threshold_goes_to_the_least_loaded():
    policy = _policy(cache_threshold=0.5)
    policy.tree.insert("0123456789", "w0")
    # 4 of 10 characters match (0.4 <= 0.5): a miss, so the least loaded, not the holder.
    assert _pick(policy, (0, 3, 1), "0123abcdef") == "w0"  # w0 is least loaded anyway
    assert _pick(policy, (2, 3, 1), "0123uvwxyz") == "w2"
    # 6 of 10 match: a hit, the holder despite its load (within the spill margin).
    assert _pick(policy, (2, 0, 0), "012345zzzz") == "w0"


def test_holders_are_chosen_by_load_with_random_ties():
    policy = _policy()
    policy.tree.insert(SYSTEM, "w1")
    policy.tree.insert(SYSTEM, "w2")
    assert _pick(policy, (0, 3, 1), SYSTEM) == "w2"
    picks = {_pick(policy, (0, 1, 1), SYSTEM) for _ in range(30)}
    assert picks == {"w1", "w2"}


def test_overloaded_holder_spills_to_the_least_loaded_which_becomes_a_holder():
    policy = _policy()
    policy.tree.insert(SYSTEM, "w0")
    # mean 2, margin 4 (the floor): 6 is not above 2 + 4, so no spill...
    assert _pick(policy, (6, 0, 0), SYSTEM + "a") == "w0"
    # ...7 is above 7/3 * 1.5 and 7/3 + 4: spill to the least loaded.
    assert _pick(policy, (7, 0, 0), SYSTEM + "b") == "w1"
    assert set(policy.tree.prefix_match(SYSTEM).tenants) == {"w0", "w1"}
    # both hold it now: the less loaded holder takes it, no spill needed
    assert _pick(policy, (50, 1, 0), SYSTEM + "c") == "w1"


def test_spill_margin_is_capped_by_balance_abs_threshold_and_needs_the_relative_one():
    policy = _policy(balance_abs_threshold=1, balance_rel_threshold=1.5)
    policy.tree.insert(SYSTEM, "w0")
    assert _pick(policy, (3, 1, 1), SYSTEM) == "w1"  # 3 > 1.67 * 1.5 and 3 > 1.67 + 1
    policy = _policy(balance_abs_threshold=1, balance_rel_threshold=4.0)
    policy.tree.insert(SYSTEM, "w0")
    assert _pick(policy, (3, 1, 1), SYSTEM) == "w0"  # relative margin not met
    policy = _policy()  # large loads: the margin is 2 * sqrt(mean)
    policy.tree.insert(SYSTEM, "w0")
    assert _pick(policy, (219, 200, 200), SYSTEM) == "w0"  # mean 206.3 x 1.5 > 219
    assert _pick(policy, (400, 100, 100), SYSTEM) == "w1"  # 400 > 300 and > 200 + 28.3


def test_hit_on_unavailable_holder_goes_to_the_least_loaded_and_inserts():
    policy = _policy()
    policy.tree.insert(SYSTEM, "w9")
    assert _pick(policy, (2, 1, 0), SYSTEM + "x") == "w2"
    assert "w2" in policy.tree.prefix_match(SYSTEM).tenants


def test_no_text_goes_to_the_least_loaded_and_leaves_the_tree_alone():
    policy = _policy()
    assert _pick(policy, (3, 1, 2), "") == "w1"
    assert _pick(policy, (3, 1, 2), None) == "w1"
    assert policy.tree.total_size == 0


def test_eviction_runs_lazily_each_interval_and_keeps_the_bound():
    clock = FakeClock()
    policy = _policy(max_tree_size=200, eviction_interval_secs=10, clock=clock)
    rng = random.Random(1)
    # distinct first characters: every prompt is its own 50-character branch
    prompts = [chr(0x4E00 + i) + "".join(rng.choices("abcdefgh", k=49)) for i in range(20)]
    for p in prompts:
        _pick(policy, (0, 0, 0), p)
    assert policy.tree.total_size == 1000  # no eviction before the interval
    clock.now = 9.9
    _pick(policy, (0, 0, 0), "z" * 50)
    assert policy.tree.total_size == 1050
    clock.now = 10.0
    _pick(policy, (0, 0, 0), "y" * 50)  # evicts first, then inserts
    assert policy.tree.total_size <= 200 + 50
    # the most recent texts survive, the oldest are gone
    assert policy.tree.prefix_match("z" * 50).matched_chars == 50
    assert policy.tree.prefix_match(prompts[0]).matched_chars < 50


def test_workers_absent_for_a_whole_interval_leave_the_tree():
    clock = FakeClock()
    policy = _policy(eviction_interval_secs=10, clock=clock)
    policy.select(views(0, 0, 0, 0), text_input("x"))
    policy.tree.insert(SYSTEM, "w3")
    clock.now = 10
    _pick(policy, (0, 0), "y")  # w3 was seen in this interval: kept
    assert "w3" in policy.tree.tenants()
    clock.now = 20
    _pick(policy, (0, 0), "z")  # absent for the whole interval: removed
    assert "w3" not in policy.tree.tenants()


def test_registry_builds_fresh_request_policies_from_settings():
    settings = Settings(cache_threshold=0.6, max_tree_size=1234)
    a = make_policy("cache_aware", settings)
    b = make_policy("cache_aware", settings)
    assert isinstance(a, CacheAwarePolicy) and a is not b and a.tree is not b.tree
    assert (a.cache_threshold, a.max_tree_size) == (0.6, 1234)
    for name in ("cache_aware", "manual", "consistent_hashing", "prefix_hash"):
        policy = make_policy(name, settings)
        assert policy.name == name and policy.needs_request and not policy.needs_signature

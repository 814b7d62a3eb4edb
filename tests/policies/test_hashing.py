from __future__ import annotations

import random
from collections import Counter

from gateway.config import Settings
from gateway.policies.consistent_hashing import ConsistentHashingPolicy
from gateway.policies.hash_ring import HashRing
from gateway.policies.prefix_hash import PrefixHashPolicy
from gateway.policies.registry import make_policy
from gateway.routing import WorkerView
from tests.policies.helpers import text_input, views

KEYS = [f"session-{i}" for i in range(600)]


def _owner(policy: ConsistentHashingPolicy, candidates: list[WorkerView], key: str) -> str:
    return policy.select(candidates, text_input("ignored", key)).worker.worker_id


def test_consistent_hashing_is_stable_and_spreads():
    policy = ConsistentHashingPolicy()
    workers = views(0, 0, 0, 0)
    owners = {k: _owner(policy, workers, k) for k in KEYS}
    assert owners == {k: _owner(ConsistentHashingPolicy(), workers, k) for k in KEYS}
    counts = Counter(owners.values())
    assert set(counts) == {"w0", "w1", "w2", "w3"}
    assert min(counts.values()) > len(KEYS) / 4 * 0.6  # 150 virtual nodes: roughly even
    # load does not move keys
    assert all(_owner(policy, views(9, 0, 5, 1), k) == owners[k] for k in KEYS[:50])


def test_removing_a_worker_moves_only_its_keys_and_adding_it_back_restores_them():
    policy = ConsistentHashingPolicy()
    workers = views(0, 0, 0, 0)
    owners = {k: _owner(policy, workers, k) for k in KEYS}
    without_w2 = [w for w in workers if w.worker_id != "w2"]
    moved = {k: _owner(policy, without_w2, k) for k in KEYS}
    for k in KEYS:
        if owners[k] == "w2":
            assert moved[k] != "w2"
        else:
            assert moved[k] == owners[k]
    assert {k: _owner(policy, workers, k) for k in KEYS} == owners
    # candidate order does not matter
    assert {k: _owner(policy, workers[::-1], k) for k in KEYS} == owners


def test_consistent_hashing_without_a_key_is_random():
    policy = ConsistentHashingPolicy(random.Random(0))
    picks = {policy.select(views(0, 0, 0), text_input("same text")).worker.worker_id
             for _ in range(40)}
    assert picks == {"w0", "w1", "w2"}
    assert _owner(policy, views(5), "k") == "w0"


def test_hash_ring_walks_clockwise():
    ring = HashRing(["a", "b"])
    assert ring.owner(b"x") in {"a", "b"}
    assert HashRing(["a"]).owner(b"anything") == "a"


def _ph(policy: PrefixHashPolicy, loads: tuple[int, ...], text: str | None,
        key: str | None = None) -> str:
    return policy.select(views(*loads), text_input(text, key)).worker.worker_id


def test_prefix_hash_groups_by_the_text_prefix():
    policy = PrefixHashPolicy(prefix_token_count=4)  # 16 characters
    heads = [f"{i:04d}-shared-head" for i in range(60)]
    for head in heads:
        owner = _ph(policy, (0, 0, 0), head + " tail one")
        assert _ph(policy, (0, 0, 0), head + " a different tail") == owner
    assert len({_ph(policy, (0, 0, 0), h) for h in heads}) == 3


def test_prefix_hash_routing_key_wins_over_text():
    policy = PrefixHashPolicy()
    owners = {_ph(policy, (0, 0, 0), f"text {i}", key="user-7") for i in range(20)}
    assert len(owners) == 1


def test_prefix_hash_sheds_an_overloaded_owner():
    policy = PrefixHashPolicy()
    text = "a prompt"
    owner = int(_ph(policy, (0, 0, 0), text)[1:])

    def loads(owner_load: int) -> tuple[int, ...]:
        return tuple(owner_load if i == owner else 0 for i in range(3))

    # 3 workers, the owner alone loaded: avg = (load + 1) / 3, limit = max(avg * 1.25, avg + 10)
    assert _ph(policy, loads(15), text) == f"w{owner}"  # limit 15.33
    assert _ph(policy, loads(17), text) != f"w{owner}"  # limit 16
    other = [i for i in range(3) if i != owner]
    assert _ph(policy, loads(17), text) == f"w{other[0]}"  # least loaded, first in order


def test_prefix_hash_without_key_or_text_takes_the_least_loaded():
    policy = PrefixHashPolicy()
    assert _ph(policy, (2, 0, 1), "") == "w1"
    assert _ph(policy, (2, 3, 1), None) == "w2"


def test_prefix_hash_settings():
    policy = make_policy("prefix_hash", Settings(prefix_token_count=8,
                                                 prefix_hash_load_factor=2.0))
    assert isinstance(policy, PrefixHashPolicy)
    assert (policy.prefix_chars, policy.load_factor) == (32, 2.0)

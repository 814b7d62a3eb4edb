from __future__ import annotations

import random

from gateway.policies.prefix_tree import PrefixTree


def _holdings(tree: PrefixTree) -> dict[str, int]:
    """Characters per tenant recomputed from the nodes, checking holders(child) <= holders."""
    sizes: dict[str, int] = {}
    for node in tree._nodes():
        assert node.tenants, "an empty node was left attached"
        if node.parent is not None and node.parent.parent is not None:
            assert set(node.tenants) <= set(node.parent.tenants)
        for tenant in node.tenants:
            sizes[tenant] = sizes.get(tenant, 0) + len(node.text)
    return sizes


def _lcp(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_insert_and_match():
    tree = PrefixTree()
    tree.insert("hello world", "a")
    m = tree.prefix_match("hello there")
    assert (m.matched_chars, m.input_chars, m.tenant) == (6, 11, "a")
    assert tree.prefix_match("hello world, again").matched_chars == 11
    assert tree.prefix_match("goodbye").matched_chars == 0
    assert tree.prefix_match("goodbye").tenant is None
    assert tree.prefix_match("").rate == 0.0


def test_split_shares_the_prefix_and_counts_chars_per_tenant():
    tree = PrefixTree()
    tree.insert("hello world", "a")
    tree.insert("hello there", "b")
    assert tree.tenant_sizes() == {"a": 11, "b": 11}
    assert tree.total_size == 22
    m = tree.prefix_match("hello world!")
    assert (m.matched_chars, m.tenants) == (11, ("a",))
    m = tree.prefix_match("hello")  # ends inside the shared node: both hold it
    assert m.matched_chars == 5 and set(m.tenants) == {"a", "b"}
    assert m.tenant == "b"  # the most recent holder first
    tree.insert("hello world", "a")  # again: no growth, refreshes a
    assert tree.total_size == 22
    assert tree.prefix_match("hello").tenant == "a"
    assert _holdings(tree) == tree.tenant_sizes()


def test_insert_that_ends_inside_an_edge_splits_it():
    tree = PrefixTree()
    tree.insert("abcdef", "a")
    tree.insert("abc", "b")
    assert tree.prefix_match("abcxyz").tenants == ("b", "a")
    assert tree.prefix_match("abcdxyz").tenants == ("a",)
    assert tree.tenant_sizes() == {"a": 6, "b": 3}
    assert _holdings(tree) == tree.tenant_sizes()


def test_unicode_is_matched_by_characters():
    tree = PrefixTree()
    tree.insert("héllo wörld 🌍", "a")
    assert tree.prefix_match("héllo wörld 🌍!").matched_chars == 13
    assert tree.prefix_match("héllo wörd").matched_chars == 9
    assert tree.tenant_size("a") == 13


def test_match_and_insert_sees_the_tree_before_the_insert():
    tree = PrefixTree()
    seen = []
    tree.match_and_insert("abc", lambda m: seen.append(m.matched_chars) or "a")
    tree.match_and_insert("abc", lambda m: seen.append(m.matched_chars) or None)
    assert seen == [0, 3]
    assert tree.prefix_match("abc").tenants == ("a",)


def test_random_inserts_agree_with_brute_force():
    rng = random.Random(7)
    tree = PrefixTree()
    texts: dict[str, list[str]] = {"a": [], "b": [], "c": []}
    for _ in range(400):
        tenant = rng.choice("abc")
        text = "".join(rng.choices("ab c", k=rng.randint(1, 12)))
        tree.insert(text, tenant)
        texts[tenant].append(text)
    for tenant, mine in texts.items():  # a tenant holds every distinct prefix of its texts
        assert tree.tenant_size(tenant) == len({s[:i] for s in mine for i in range(1, len(s) + 1)})
    assert _holdings(tree) == tree.tenant_sizes()
    for _ in range(300):
        query = "".join(rng.choices("ab c", k=rng.randint(0, 14)))
        best = {t: max(_lcp(query, s) for s in mine) for t, mine in texts.items()}
        m = tree.prefix_match(query)
        assert m.matched_chars == max(best.values())
        if m.matched_chars:
            assert set(m.tenants) == {t for t, n in best.items() if n == m.matched_chars}


def test_evict_removes_least_recently_used_leaves_first():
    tree = PrefixTree()
    tree.insert("apple", "a")
    tree.insert("banana", "b")
    tree.insert("cherry", "a")
    assert tree.total_size == 17
    assert tree.evict_to(12) == 5
    assert tree.prefix_match("apple").matched_chars == 0
    assert tree.prefix_match("banana").tenant == "b"
    assert tree.prefix_match("cherry").tenant == "a"
    assert tree.tenant_sizes() == {"a": 6, "b": 6}
    assert tree.evict_to(100) == 0


def test_evict_takes_a_shared_node_from_one_tenant_at_a_time():
    tree = PrefixTree()
    tree.insert("hello world", "a")
    tree.insert("hello world", "b")
    tree.evict_to(11)
    assert tree.prefix_match("hello world").tenants == ("b",)
    assert tree.tenant_sizes() == {"a": 0, "b": 11}


def test_evict_walks_up_to_parents_that_become_leaves():
    tree = PrefixTree()
    tree.insert("abcdef", "a")
    tree.insert("abcxyz", "a")
    tree.insert("zzz", "b")  # most recent: survives
    tree.evict_to(3)
    assert tree.total_size == 3
    assert tree.prefix_match("abc").matched_chars == 0
    assert tree.prefix_match("zzz").tenant == "b"
    assert not list(n for n in tree._nodes() if "a" in n.tenants)


def test_evict_respects_the_budget_on_a_random_tree():
    rng = random.Random(3)
    tree = PrefixTree()
    for i in range(300):
        tree.insert("".join(rng.choices("abcd", k=rng.randint(5, 40))), f"w{i % 4}")
    tree.evict_to(500)
    assert tree.total_size <= 500
    assert _holdings(tree) == {t: n for t, n in tree.tenant_sizes().items() if n}


def test_remove_tenant():
    tree = PrefixTree()
    tree.insert("shared prefix / mine", "a")
    tree.insert("shared prefix / yours", "b")
    tree.remove_tenant("a")
    assert tree.tenants() == {"b"}
    assert tree.total_size == tree.tenant_size("b") == 21
    m = tree.prefix_match("shared prefix / mine")
    assert m.matched_chars == len("shared prefix / ") and m.tenants == ("b",)
    assert _holdings(tree) == tree.tenant_sizes()
    tree.remove_tenant("nobody")  # unknown: a no-op

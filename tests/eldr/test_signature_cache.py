"""Signature cache: exact hits, conversation continuation, partial coverage, LRU bounds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.eldr.signature_cache import ENTRY_OVERHEAD_BYTES, SignatureCache, Units, units_of
from zones.geometry import ModelGeometry

G = ModelGeometry("t", num_layers=2, num_experts=4, top_k=1)


def counts(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int32).reshape(2, 4)


def text(s: str) -> Units:
    u = units_of(text=s)
    assert u is not None
    return u


def ids(xs: list[int]) -> Units:
    u = units_of(input_ids=xs)
    assert u is not None
    return u


def test_exact_hit_for_a_learned_prompt_and_miss_for_others() -> None:
    cache = SignatureCache(G, block_bytes=8)
    c = counts(1, 2, 3, 4, 5, 6, 7, 8)
    cache.learn_prompt(text("hello wonderful world"), c)
    hit = cache.lookup(text("hello wonderful world"))
    assert hit is not None and hit.exact
    np.testing.assert_array_equal(hit.counts, c)
    assert cache.lookup(text("hello wonderful worle")) is None
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)


def test_continued_conversation_hits_unaligned_learned_prefix() -> None:
    # Turn 1: prompt (21 bytes, not block-aligned) + output; turn 2 = prompt + output + new text.
    cache = SignatureCache(G, block_bytes=8)
    p1, o1 = "hello wonderful world", " and the answer is 42."
    cache.learn_prompt(text(p1), counts(1, 0, 0, 0, 1, 0, 0, 0))
    cache.learn_output(text(p1), text(o1), counts(0, 2, 0, 0, 0, 2, 0, 0))
    prompt2 = p1 + o1 + " Why?"
    hit = cache.lookup(text(prompt2))
    assert hit is not None and not hit.exact
    assert (hit.covered, hit.observed, hit.total) == (len(p1 + o1), len(p1 + o1), len(prompt2))
    np.testing.assert_array_equal(hit.counts, counts(1, 2, 0, 0, 1, 2, 0, 0))
    assert cache.stats.partial == 1


def test_dual_flow_observes_only_outputs() -> None:
    # Prompt counts were never seen: the entry covers prompt + output but observed only the output.
    cache = SignatureCache(G, block_tokens=4)
    p1, o1 = list(range(10)), [100, 101, 102]
    cache.learn_output(ids(p1), ids(o1), counts(0, 0, 3, 0, 0, 0, 3, 0))
    hit = cache.lookup(ids(p1 + o1 + [7, 8]))
    assert hit is not None
    assert (hit.covered, hit.observed, hit.total) == (13, 3, 15)
    # Turn 2's output builds on turn 1's entry: observed accumulates.
    cache.learn_output(ids(p1 + o1 + [7, 8]), ids([200, 201]), counts(1, 0, 0, 0, 1, 0, 0, 0))
    hit2 = cache.lookup(ids(p1 + o1 + [7, 8, 200, 201, 9]))
    assert hit2 is not None and (hit2.covered, hit2.observed) == (17, 5)
    np.testing.assert_array_equal(hit2.counts, counts(1, 0, 3, 0, 1, 0, 3, 0))


def test_prefill_then_decode_is_exact_for_next_turn_prefix() -> None:
    cache = SignatureCache(G, block_tokens=4)
    prompt, out = [5, 6, 7, 8, 9], [1, 2]
    cache.learn_prompt(ids(prompt), counts(5, 0, 0, 0, 5, 0, 0, 0))
    cache.learn_output(ids(prompt), ids(out), counts(0, 2, 0, 0, 0, 2, 0, 0))
    hit = cache.lookup(ids(prompt + out))
    assert hit is not None and hit.exact
    np.testing.assert_array_equal(hit.counts, counts(5, 2, 0, 0, 5, 2, 0, 0))


def test_longest_learned_prefix_wins() -> None:
    cache = SignatureCache(G, block_tokens=4)
    cache.learn_prompt(ids([1, 2, 3]), counts(1, 0, 0, 0, 0, 0, 0, 0))
    cache.learn_prompt(ids([1, 2, 3, 4, 5, 6]), counts(2, 0, 0, 0, 0, 0, 0, 0))
    cache.learn_prompt(ids([1, 2, 3, 4, 5, 6, 7, 8, 9]), counts(3, 0, 0, 0, 0, 0, 0, 0))
    hit = cache.lookup(ids([1, 2, 3, 4, 5, 6, 7, 0, 0]))
    assert hit is not None and hit.covered == 6 and int(hit.counts[0, 0]) == 2
    hit = cache.lookup(ids([1, 2, 3, 9]))
    assert hit is not None and hit.covered == 3


def test_token_and_text_keys_do_not_collide() -> None:
    cache = SignatureCache(G, block_tokens=1, block_bytes=4)
    u = ids([0x64636261])  # the bytes "abcd" as one little-endian uint32
    cache.learn_prompt(u, counts(1, 0, 0, 0, 0, 0, 0, 0))
    assert cache.lookup(text("abcd")) is None


def test_lru_evicts_by_entries_and_bytes() -> None:
    per_entry = counts(0, 0, 0, 0, 0, 0, 0, 0).nbytes + ENTRY_OVERHEAD_BYTES
    cache = SignatureCache(G, block_bytes=8, max_entries=3, max_bytes=10 * per_entry)
    for i in range(3):
        cache.learn_prompt(text(f"prompt {i}"), counts(i, 0, 0, 0, 0, 0, 0, 0))
    assert cache.lookup(text("prompt 0")) is not None  # touch 0: now 1 is least recent
    cache.learn_prompt(text("prompt 3"), counts(3, 0, 0, 0, 0, 0, 0, 0))
    assert len(cache) == 3 and cache.stats.evictions == 1
    assert cache.lookup(text("prompt 1")) is None
    assert cache.lookup(text("prompt 0")) is not None
    small = SignatureCache(G, block_bytes=8, max_bytes=2 * per_entry)
    for i in range(5):
        small.learn_prompt(text(f"p{i}"), counts(1, 0, 0, 0, 0, 0, 0, 0))
    assert len(small) == 2 and small.nbytes <= 2 * per_entry


def test_eviction_keeps_tail_index_consistent() -> None:
    cache = SignatureCache(G, block_bytes=4, max_entries=1)
    cache.learn_prompt(text("abcdefg"), counts(1, 0, 0, 0, 0, 0, 0, 0))
    cache.learn_prompt(text("abcdefgh"), counts(2, 0, 0, 0, 0, 0, 0, 0))  # evicts the first
    assert cache.lookup(text("abcdefg")) is None
    hit = cache.lookup(text("abcdefghij"))
    assert hit is not None and hit.covered == 8
    assert sum(len(t) for t in cache._tails.values()) == 1


def test_relearning_replaces_without_leaking_bytes() -> None:
    cache = SignatureCache(G, block_bytes=8)
    cache.learn_prompt(text("same"), counts(1, 0, 0, 0, 0, 0, 0, 0))
    before = cache.nbytes
    cache.learn_prompt(text("same"), counts(2, 0, 0, 0, 0, 0, 0, 0))
    hit = cache.lookup(text("same"))
    assert cache.nbytes == before and len(cache) == 1
    assert hit is not None and int(hit.counts[0, 0]) == 2


def test_hit_counts_are_read_only() -> None:
    cache = SignatureCache(G)
    cache.learn_prompt(text("x"), counts(1, 0, 0, 0, 0, 0, 0, 0))
    hit = cache.lookup(text("x"))
    assert hit is not None
    with pytest.raises(ValueError):
        hit.counts[0, 0] = 9


@pytest.mark.parametrize(
    "bad", [np.zeros((3, 4), np.int32), np.zeros((2, 4), np.float32), -np.ones((2, 4), np.int32)]
)
def test_bad_counts_rejected_with_clear_error(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="counts"):
        SignatureCache(G).learn_prompt(text("x"), bad)


def test_unusable_prompts_give_no_units() -> None:
    assert units_of() is None
    assert units_of(input_ids=[-1, 2]) is None
    assert units_of(input_ids=[[1, 2]]) is None  # type: ignore[list-item]
    assert units_of(input_ids=["a"]) is None  # type: ignore[list-item]
    assert units_of(text="\ud800 lone surrogate") is not None


def test_invalid_settings_rejected() -> None:
    with pytest.raises(ValueError, match="block_tokens"):
        SignatureCache(G, block_tokens=0)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 3), max_size=14), min_size=1, max_size=6),
    st.lists(st.integers(0, 3), max_size=16),
    st.integers(1, 5),
)
def test_lookup_finds_the_longest_learned_prefix(
    learned: list[list[int]], query: list[int], block: int
) -> None:
    # Small alphabet and lengths make shared prefixes and unaligned ends the common case.
    cache = SignatureCache(G, block_tokens=block)
    for n, seq in enumerate(learned):
        if seq:
            cache.learn_prompt(ids(seq), counts(n, 0, 0, 0, 0, 0, 0, 0))
    prefixes = {tuple(seq): n for n, seq in enumerate(learned) if seq}  # later learn wins
    best = max(
        (p for p in prefixes if len(p) <= len(query) and tuple(query[: len(p)]) == p),
        key=len, default=None,
    )
    hit = cache.lookup(ids(query)) if query else None
    if best is None:
        assert hit is None
    else:
        assert hit is not None and hit.covered == len(best)
        assert int(hit.counts[0, 0]) == prefixes[best]

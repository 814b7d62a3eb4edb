"""A worker's prefix cache of token ids: SGLang's RadixCache in miniature (pure, no I/O).

What it follows (sglang 0.5.23, `srt/mem_cache/radix_cache.py` unless named otherwise):

- A radix tree over token ids at token granularity: `page_size` resolves to 1 by default on
  CUDA (`srt/arg_groups/overrides.py` `_page_size_default`), so a match can end on any token.
- `match(ids)` is the length of the longest cached prefix of `ids`; it refreshes the recency of
  every node it walks (`_match_prefix_helper` sets `last_access_time`). The scheduler caps a
  request's usable prefix at `input_len - 1` (`managers/schedule_batch.py`
  `_compute_max_prefix_len`: one token must be forwarded to get logits); that cap is the
  caller's, not the tree's.
- `insert(ids)` adds a sequence, splitting an edge where it diverges, and refreshes the path.
- Eviction is least-recently-used over *leaves*, whole leaves at a time; a parent whose last
  child went becomes a leaf candidate (`evict`; default `--radix-eviction-policy lru`,
  `mem_cache/evict_policy.py` `LRUStrategy`: priority = `last_access_time`).
- Capacity in tokens: SGLang's tree lives in the KV pool (`max_total_num_tokens` slots) and is
  evicted when an allocation needs room. Here the tree is cut back to `capacity_tokens` after
  each insert; the path just inserted is never evicted by its own insert (SGLang holds a lock
  reference on a running request's nodes), and an insert longer than the capacity keeps only
  its first `capacity_tokens` tokens.

Recency is a logical clock (one tick per match/insert), so behaviour is deterministic.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


class _Node:
    __slots__ = ("children", "key", "last_access", "parent")

    def __init__(self, key: tuple[int, ...], parent: _Node | None, tick: int) -> None:
        self.key = key                                   # the edge label into this node
        self.parent = parent
        self.children: dict[int, _Node] = {}             # first token of the edge -> child
        self.last_access = tick


def _common_prefix(key: tuple[int, ...], ids: tuple[int, ...], pos: int) -> int:
    """How many leading tokens of `key` equal `ids[pos:]`."""
    n = min(len(key), len(ids) - pos)
    if ids[pos:pos + n] == key[:n]:
        return n
    i = 0
    while i < n and key[i] == ids[pos + i]:
        i += 1
    return i


class PrefixCache:
    """Token-id radix tree with a capacity in tokens and LRU leaf eviction."""

    def __init__(self, capacity_tokens: int) -> None:
        if not isinstance(capacity_tokens, int) or capacity_tokens < 0:
            raise ValueError(
                f"capacity_tokens must be a non-negative integer, got {capacity_tokens!r}")
        self.capacity_tokens = capacity_tokens
        self._tick = 0
        self._root = _Node((), None, 0)
        self._leaves: set[_Node] = set()
        self._size = 0
        self.evicted_tokens = 0   # cumulative
        self.inserted_tokens = 0  # cumulative, tokens that were not already cached

    @property
    def size(self) -> int:
        """Tokens held (the sum of all edge lengths)."""
        return self._size

    def reset(self) -> None:
        """Drop everything (SGLang `/flush_cache` -> `tree_cache.reset()`); counters stay."""
        self._root = _Node((), None, self._tick)
        self._leaves.clear()
        self._size = 0

    def match(self, ids: Sequence[int]) -> int:
        """Length of the longest cached prefix of `ids`; refreshes the matched path."""
        self._tick += 1
        tick = self._tick
        seq = tuple(ids)
        node = self._root
        pos = 0
        while pos < len(seq):
            child = node.children.get(seq[pos])
            if child is None:
                break
            k = _common_prefix(child.key, seq, pos)
            child.last_access = tick
            pos += k
            if k < len(child.key):
                break
            node = child
        return pos

    def insert(self, ids: Sequence[int]) -> int:
        """Cache `ids` (its first `capacity_tokens` tokens); returns the tokens newly added.

        Then evicts least-recently-used leaves until the tree fits its capacity again.
        """
        self._tick += 1
        tick = self._tick
        seq = tuple(ids[:self.capacity_tokens])
        node = self._root
        path: list[_Node] = []
        pos = 0
        added = 0
        while pos < len(seq):
            child = node.children.get(seq[pos])
            if child is None:
                leaf = _Node(seq[pos:], node, tick)
                if not node.children and node is not self._root:
                    self._leaves.discard(node)
                node.children[seq[pos]] = leaf
                self._leaves.add(leaf)
                added = len(seq) - pos
                self._size += added
                path.append(leaf)
                break
            k = _common_prefix(child.key, seq, pos)
            if k < len(child.key):
                child = self._split(child, k)
            child.last_access = tick
            path.append(child)
            pos += k
            node = child
        self.inserted_tokens += added
        if self._size > self.capacity_tokens:
            self._evict(self._size - self.capacity_tokens, protected=set(path))
        return added

    def _split(self, child: _Node, k: int) -> _Node:
        """Cut `child`'s edge after `k` tokens; returns the new upper node (not a leaf)."""
        parent = child.parent
        assert parent is not None and 0 < k < len(child.key)
        upper = _Node(child.key[:k], parent, child.last_access)
        parent.children[child.key[0]] = upper
        child.key = child.key[k:]
        child.parent = upper
        upper.children[child.key[0]] = child
        return upper

    def _evict(self, num_tokens: int, protected: set[_Node]) -> None:
        heap = [(leaf.last_access, id(leaf), leaf) for leaf in self._leaves
                if leaf not in protected]
        heapq.heapify(heap)
        evicted = 0
        while evicted < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]
            self._leaves.discard(leaf)
            evicted += len(leaf.key)
            if parent is not self._root and not parent.children:
                self._leaves.add(parent)
                if parent not in protected:
                    heapq.heappush(heap, (parent.last_access, id(parent), parent))
        self._size -= evicted
        self.evicted_tokens += evicted

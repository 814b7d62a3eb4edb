"""The approximate prefix tree behind `cache_aware` (smg's `kv_index::Tree`, the HTTP string tree).

A character-level radix tree shared by every worker ("tenant") of one policy instance: a node's
edge is a string, children are keyed by their edge's first character, and each node records
which tenants hold it with a last-access stamp. Inserting a text for a tenant attaches the
tenant to every node on the text's path (splitting an edge where the text leaves it) and adds
the node lengths it did not hold yet to the tenant's character count; the tree's size is the sum
of those counts, so a node held by three tenants counts three times, as in Rust.

Differences from the Rust tree, all deliberate:
  * stamps come from a logical clock (a counter, like Rust's epoch counter) and an insert
    refreshes the stamp of every node on the path (Rust refreshes only the last one and attaches
    new intermediate nodes at epoch 0), so a path a worker just used is never the eviction
    victim; a match alone refreshes nothing (Rust refreshes the matched node 1 time in 8);
  * `MatchResult.tenants` lists every holder of the deepest matched node, most recent first
    (Rust hands back up to 8 in map order);
  * single-threaded (the gateway's event loop), so no locks and match + insert share one walk.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass


class _Node:
    __slots__ = ("children", "parent", "tenants", "text")

    def __init__(self, text: str, parent: _Node | None) -> None:
        self.text = text
        self.parent = parent
        self.children: dict[str, _Node] = {}
        self.tenants: dict[str, int] = {}  # tenant -> last-access stamp


@dataclass(frozen=True, slots=True)
class MatchResult:
    matched_chars: int  # characters of the text found on a path of the tree
    input_chars: int  # len(text)
    tenants: tuple[str, ...]  # holders of the deepest matched node, most recent first

    @property
    def tenant(self) -> str | None:
        """The most recent holder of the longest match (None when nothing matched)."""
        return self.tenants[0] if self.tenants else None

    @property
    def rate(self) -> float:
        return self.matched_chars / self.input_chars if self.input_chars else 0.0


def _shared_len(text: str, pos: int, edge: str) -> int:
    """Length of the common prefix of text[pos:] and edge (edge[0] is known to match)."""
    lo, hi = 1, min(len(edge), len(text) - pos)
    if text.startswith(edge[:hi], pos):
        return hi
    hi -= 1  # invariant: edge[:lo] matches, edge[:hi + 1] does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(edge[:mid], pos):
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixTree:
    """Multi-tenant radix tree over characters with per-tenant LRU eviction."""

    def __init__(self) -> None:
        self._root = _Node("", None)
        self._sizes: dict[str, int] = {}  # tenant -> characters held
        self._total = 0
        self._tick = itertools.count(1)

    # ------------------------------------------------------------------ queries
    @property
    def total_size(self) -> int:
        """Sum over tenants of the characters each holds (the eviction budget's measure)."""
        return self._total

    def tenant_size(self, tenant: str) -> int:
        return self._sizes.get(tenant, 0)

    def tenant_sizes(self) -> dict[str, int]:
        return dict(self._sizes)

    def tenants(self) -> set[str]:
        return set(self._sizes)

    def prefix_match(self, text: str) -> MatchResult:
        """The longest prefix of `text` on a path of the tree and who holds it (no side effects)."""
        return self._walk(text)[0]

    # ------------------------------------------------------------------ updates
    def insert(self, text: str, tenant: str) -> None:
        self.match_and_insert(text, lambda _: tenant)

    def match_and_insert(self, text: str,
                         choose: Callable[[MatchResult], str | None]) -> MatchResult:
        """Match `text`, let `choose` pick a tenant from the result, insert the text for it
        (None inserts nothing), in one walk: the match sees the tree before the insert."""
        result, path, pos = self._walk(text)
        tenant = choose(result)
        if tenant is not None:
            self._insert_along(text, tenant, path, pos)
        return result

    def _walk(self, text: str) -> tuple[MatchResult, list[_Node], int]:
        """Follow `text` down the tree: the match, the fully matched nodes, and the position in
        `text` after them (a partially matched edge is not on the path; it shows in the count)."""
        node = self._root
        path: list[_Node] = []
        pos = 0
        n = len(text)
        deepest = node
        matched = 0
        while pos < n:
            child = node.children.get(text[pos])
            if child is None:
                break
            edge = child.text
            if text.startswith(edge, pos):
                pos += len(edge)
                path.append(child)
                node = deepest = child
                matched = pos
            else:
                matched = pos + _shared_len(text, pos, edge)
                deepest = child
                break
        tenants: tuple[str, ...] = ()
        if matched and deepest.tenants:
            holders = deepest.tenants
            tenants = (tuple(holders) if len(holders) == 1
                       else tuple(sorted(holders, key=holders.__getitem__, reverse=True)))
        return MatchResult(matched, n, tenants), path, pos

    def _insert_along(self, text: str, tenant: str, path: list[_Node], pos: int) -> None:
        stamp = next(self._tick)
        sizes = self._sizes
        added = 0
        for node in path:
            if tenant not in node.tenants:
                added += len(node.text)
            node.tenants[tenant] = stamp
        node = path[-1] if path else self._root
        n = len(text)
        while pos < n:
            child = node.children.get(text[pos])
            if child is None:
                leaf = _Node(text[pos:], node)
                leaf.tenants[tenant] = stamp
                node.children[text[pos]] = leaf
                added += n - pos
                break
            edge = child.text
            if text.startswith(edge, pos):  # only after a split below; kept for safety
                if tenant not in child.tenants:
                    added += len(edge)
                child.tenants[tenant] = stamp
                pos += len(edge)
                node = child
                continue
            # Split `child` where the text leaves it: a new node holds the shared part.
            k = _shared_len(text, pos, edge)
            mid = _Node(edge[:k], node)
            mid.tenants = dict(child.tenants)
            node.children[text[pos]] = mid
            child.text = edge[k:]
            child.parent = mid
            mid.children[child.text[0]] = child
            if tenant not in mid.tenants:
                added += k
            mid.tenants[tenant] = stamp
            pos += k
            node = mid
        if added or tenant not in sizes:
            sizes[tenant] = sizes.get(tenant, 0) + added
            self._total += added

    # ------------------------------------------------------------------ eviction
    def evict_to(self, max_size: int) -> int:
        """Evict least-recently-used leaves, across tenants, until `total_size` is at most
        `max_size` (smg 1.13: `--max-tree-size` is one budget shared by every worker of the
        tree). A leaf of a tenant is a node it holds that none of the node's children hold;
        removing it can make the parent a leaf. Returns the characters evicted."""
        if self._total <= max_size:
            return 0
        heap: list[tuple[int, int, str, _Node]] = []
        order = itertools.count()  # tie-break so nodes are never compared
        for node in self._nodes():
            for tenant, stamp in node.tenants.items():
                if not any(tenant in c.tenants for c in node.children.values()):
                    heap.append((stamp, next(order), tenant, node))
        heapq.heapify(heap)
        before = self._total
        while self._total > max_size and heap:
            _, _, tenant, node = heapq.heappop(heap)
            if tenant not in node.tenants or any(tenant in c.tenants
                                                 for c in node.children.values()):
                continue  # no longer a leaf of this tenant
            del node.tenants[tenant]
            self._sub(tenant, len(node.text))
            parent = node.parent
            if not node.children and not node.tenants and parent is not None:
                del parent.children[node.text[0]]
            if (parent is not None and parent is not self._root and tenant in parent.tenants
                    and not any(tenant in c.tenants for c in parent.children.values())):
                heapq.heappush(heap, (parent.tenants[tenant], next(order), tenant, parent))
        return before - self._total

    def remove_tenant(self, tenant: str) -> None:
        """Drop a tenant from every node (a worker gone for good), detaching emptied nodes."""
        if tenant not in self._sizes:
            return
        for node in list(self._nodes()):
            if node.tenants.pop(tenant, None) is not None:
                self._detach_if_empty(node)
        self._total -= self._sizes.pop(tenant)

    def _detach_if_empty(self, node: _Node) -> None:
        while not node.children and not node.tenants and node.parent is not None:
            parent = node.parent
            if parent.children.get(node.text[0]) is node:
                del parent.children[node.text[0]]
            node = parent

    def _sub(self, tenant: str, chars: int) -> None:
        have = self._sizes.get(tenant, 0)
        removed = min(chars, have)
        self._sizes[tenant] = have - removed
        self._total -= removed

    def _nodes(self) -> Iterator[_Node]:
        """Every node but the root, parents before children."""
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

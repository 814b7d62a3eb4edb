"""A consistent hash ring over worker ids (smg's `HashRing`), shared by `consistent_hashing` and
`prefix_hash`.

Each worker sits at 150 virtual positions, `hash(f"{worker_id}#{i}")`; a key goes to the first
position at or after `hash(key)`, clockwise. smg builds one ring over every registered worker and
skips unavailable ones while walking; building the ring over the candidates gives the same answer
(positions depend only on the id), and removing a worker moves only the keys it owned. smg hashes
with blake3; the standard library has none, so this uses blake2b (first 8 bytes, little-endian):
the same properties, different positions.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

VIRTUAL_NODES_PER_WORKER = 150
_MAX_CACHED_RINGS = 16


def ring_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class HashRing:
    """An immutable ring over a set of worker ids."""

    __slots__ = ("_owners", "_positions")

    def __init__(self, worker_ids: Sequence[str]) -> None:
        entries = sorted((ring_hash(f"{wid}#{i}".encode()), wid)
                         for wid in dict.fromkeys(worker_ids)
                         for i in range(VIRTUAL_NODES_PER_WORKER))
        self._positions = [pos for pos, _ in entries]
        self._owners = [wid for _, wid in entries]

    def owner(self, key: bytes) -> str:
        """The worker a key maps to (the ring must not be empty)."""
        i = bisect.bisect_left(self._positions, ring_hash(key))
        return self._owners[i % len(self._owners)]


class RingCache:
    """Rings by candidate set: a policy rebuilds its ring only when the available workers
    change (a few rings stay cached, so a flapping worker does not rebuild every request)."""

    def __init__(self) -> None:
        self._rings: dict[frozenset[str], HashRing] = {}

    def ring(self, worker_ids: Sequence[str]) -> HashRing:
        key = frozenset(worker_ids)
        ring = self._rings.get(key)
        if ring is None:
            if len(self._rings) >= _MAX_CACHED_RINGS:
                self._rings.clear()
            ring = self._rings[key] = HashRing(sorted(key))
        return ring

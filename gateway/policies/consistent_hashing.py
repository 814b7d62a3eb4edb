"""Consistent hashing on the routing key (smg 1.13 `ConsistentHashingPolicy`).

A request with a routing key goes to the key's owner on a hash ring of the available workers
(gateway/policies/hash_ring.py): the same key keeps its worker while that worker is available,
and a worker leaving or joining moves only about 1/N of the keys. A request without a key goes
to a random candidate. Like smg, the request text is not used (prefix_hash hashes text).

Differences from smg: smg also honours `X-SMG-Target-Worker` (a worker index) and, without a
routing key, hashes the `authorization`, `x-forwarded-for` or `cookie` header before falling back
to random; the gateway hands policies only the routing key (`--routing-key-headers`).
"""

from __future__ import annotations

import random as _random
from collections.abc import Sequence

from gateway.policies.hash_ring import RingCache
from gateway.routing import RoutingInput, Selection, WorkerView


class ConsistentHashingPolicy:
    name = "consistent_hashing"
    needs_signature = False
    needs_request = True

    def __init__(self, rng: _random.Random | None = None) -> None:
        self._rng = rng or _random.Random()
        self._rings = RingCache()

    def select(self, candidates: Sequence[WorkerView], routing: RoutingInput) -> Selection:
        key = routing.routing_key
        if not key:
            return Selection(worker=candidates[self._rng.randrange(len(candidates))])
        if len(candidates) == 1:
            return Selection(worker=candidates[0])
        owner = self._rings.ring([v.worker_id for v in candidates]).owner(key.encode())
        return Selection(worker=next(v for v in candidates if v.worker_id == owner))

"""Prefix hashing with bounded load (smg 1.13 `PrefixHashPolicy`, untokenized requests).

The key is the routing key when the request has one, else the first `prefix_token_count * 4`
characters of its routing text (4 characters per token). The key's owner on a hash ring of the
available workers (gateway/policies/hash_ring.py) takes the request unless it is overloaded:
with `avg = (sum of in-flight + 1) / candidates` (the +1 is the incoming request), a worker is
overloaded when its in-flight count exceeds both `avg * prefix_hash_load_factor` and
`avg + PREFIX_HASH_BALANCE_ABS_THRESHOLD`. An overloaded owner hands the request to the
least-loaded worker that is not overloaded (the first such in candidate order), or keeps it when
every worker is. A request with neither key nor text goes to the least-loaded candidate.

Differences from smg: `--prefix-hash-balance-abs-threshold` is not a gateway setting yet, so the
absolute margin is smg's default, 10; `--cache-boundaries` is not supported; pre-tokenized
`/generate` requests hash the text rendering of their ids (see request_text.py), not the ids.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.config import Settings
from gateway.policies.hash_ring import RingCache
from gateway.routing import RoutingInput, Selection, WorkerView

CHARS_PER_TOKEN = 4
PREFIX_HASH_BALANCE_ABS_THRESHOLD = 10  # smg 1.13's --prefix-hash-balance-abs-threshold default


class PrefixHashPolicy:
    name = "prefix_hash"
    needs_signature = False
    needs_request = True

    def __init__(self, *, prefix_token_count: int = 256, load_factor: float = 1.25,
                 balance_abs_threshold: int = PREFIX_HASH_BALANCE_ABS_THRESHOLD) -> None:
        self.prefix_chars = max(prefix_token_count, 0) * CHARS_PER_TOKEN
        self.load_factor = load_factor
        self.balance_abs_threshold = balance_abs_threshold
        self._rings = RingCache()

    @classmethod
    def from_settings(cls, settings: Settings) -> PrefixHashPolicy:
        return cls(prefix_token_count=settings.prefix_token_count,
                   load_factor=settings.prefix_hash_load_factor,
                   balance_abs_threshold=settings.prefix_hash_balance_abs_threshold)

    def key(self, routing: RoutingInput) -> bytes | None:
        if routing.routing_key:
            return routing.routing_key.encode()
        if routing.text:
            return routing.text[:self.prefix_chars].encode("utf-8", "surrogatepass")
        return None

    def select(self, candidates: Sequence[WorkerView], routing: RoutingInput) -> Selection:
        key = self.key(routing)
        if key is None:
            return Selection(worker=min(candidates, key=_in_flight))
        if len(candidates) == 1:
            return Selection(worker=candidates[0])
        owner_id = self._rings.ring([v.worker_id for v in candidates]).owner(key)
        owner = next(v for v in candidates if v.worker_id == owner_id)
        total = sum(v.in_flight for v in candidates)
        if total == 0:
            return Selection(worker=owner)
        avg = (total + 1) / len(candidates)
        limit = max(avg * self.load_factor, avg + self.balance_abs_threshold)
        if owner.in_flight <= limit:
            return Selection(worker=owner)
        acceptable = [v for v in candidates if v.in_flight <= limit]
        return Selection(worker=min(acceptable, key=_in_flight) if acceptable else owner)


def _in_flight(view: WorkerView) -> int:
    return view.in_flight

"""Cache-aware routing (smg 1.13 `CacheAwarePolicy`, HTTP string-tree mode).

Each policy instance (one per role) keeps a `PrefixTree` of the texts it routed, per worker. For a
request with routing text:

  * match the text against the tree; `rate = matched_chars / len(text)`;
  * a hit (`rate > cache_threshold`): among the candidates holding the matched prefix, the one
    with the fewest in-flight requests (ties at random). Then the spill gate: when that worker's
    in-flight count exceeds the candidates' mean by `balance_rel_threshold` times AND by an
    absolute margin, the request spills to the least-loaded candidate instead. The margin is
    `balance_abs_threshold` capped at two standard deviations of a Poisson in-flight count at
    the mean, `2 * sqrt(mean)`, but never under 4 unless the threshold itself is lower (smg
    1.13's help text: "capped at the in-flight count's natural swing at the pool's current
    mean");
  * a miss: the least-loaded candidate (fewest in-flight, then fewest requests this policy sent
    it, then candidate order: the Rust `(load, processed, index)` key);
  * the text is then inserted for the chosen worker, so a spill makes a second holder.

No text ("") goes to the least-loaded candidate. Load is the gateway's own in-flight count
(`WorkerView.in_flight`), as the Rust routers count theirs.

Eviction runs lazily inside `select`, at most once per `eviction_interval_secs` (<= 0: never):
the tree is cut back to `max_tree_size` characters in total (one budget shared by the workers,
least recently used leaves first), and workers that were not a candidate at all since the
previous eviction are removed from the tree (smg purges a worker's entries when it leaves the
registry; the policy sees only candidates, so "absent for a whole interval" stands in for that).

Differences from smg 1.13, deliberate: a hit whose holders are all unavailable is treated as a
miss (least loaded, then inserted for it; smg routes to the first healthy worker without
inserting); the backend KV-usage triggers (`--balance-token-usage-threshold`,
`--overload-token-usage-threshold`, off by default in smg) are not implemented; the miss branch
uses in-flight counts where smg 1.13 can estimate expected wait from backend throughput.
"""

from __future__ import annotations

import math
import random as _random
import time
from collections.abc import Callable, Sequence

from gateway.config import Settings
from gateway.policies.prefix_tree import MatchResult, PrefixTree
from gateway.routing import RoutingInput, Selection, WorkerView

SPILL_MARGIN_FLOOR = 4.0  # smg 1.13: the spill margin is "never under four" (unless abs is lower)


class CacheAwarePolicy:
    name = "cache_aware"
    needs_signature = False
    needs_request = True

    def __init__(self, *, cache_threshold: float = 0.3, balance_abs_threshold: int = 64,
                 balance_rel_threshold: float = 1.5, eviction_interval_secs: float = 60,
                 max_tree_size: int = 1 << 26, clock: Callable[[], float] = time.monotonic,
                 rng: _random.Random | None = None) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.eviction_interval_secs = eviction_interval_secs
        self.max_tree_size = max_tree_size
        self.tree = PrefixTree()
        self._clock = clock
        self._rng = rng or _random.Random()
        self._processed: dict[str, int] = {}
        self._last_eviction = clock()
        self._seen: set[str] = set()  # candidates since the last eviction

    @classmethod
    def from_settings(cls, settings: Settings, *, rng: _random.Random | None = None,
                      clock: Callable[[], float] = time.monotonic) -> CacheAwarePolicy:
        return cls(cache_threshold=settings.cache_threshold,
                   balance_abs_threshold=settings.balance_abs_threshold,
                   balance_rel_threshold=settings.balance_rel_threshold,
                   eviction_interval_secs=settings.eviction_interval_secs,
                   max_tree_size=settings.max_tree_size, clock=clock, rng=rng)

    def select(self, candidates: Sequence[WorkerView], routing: RoutingInput) -> Selection:
        self._seen.update(view.worker_id for view in candidates)
        if self.eviction_interval_secs > 0:
            now = self._clock()
            if now - self._last_eviction >= self.eviction_interval_secs:
                self.evict(candidates)
                self._last_eviction = now

        processed = self._processed
        least = candidates[0]
        least_key = (least.in_flight, processed.get(least.worker_id, 0))
        total = 0
        for view in candidates:
            total += view.in_flight
            key = (view.in_flight, processed.get(view.worker_id, 0))
            if key < least_key:
                least, least_key = view, key
        mean = total / len(candidates)

        text = routing.text or ""
        if not text:
            chosen = least
        else:
            picked: list[WorkerView] = []

            def choose(match: MatchResult) -> str:
                view = least
                if match.rate > self.cache_threshold:
                    holder = self._least_loaded_holder(candidates, match.tenants)
                    if holder is not None:
                        view = least if self._spills(holder.in_flight, mean) else holder
                picked.append(view)
                return view.worker_id

            self.tree.match_and_insert(text, choose)
            chosen = picked[0]
        processed[chosen.worker_id] = processed.get(chosen.worker_id, 0) + 1
        return Selection(worker=chosen)

    def _least_loaded_holder(self, candidates: Sequence[WorkerView],
                             holders: tuple[str, ...]) -> WorkerView | None:
        held = set(holders)
        best: list[WorkerView] = []
        for view in candidates:
            if view.worker_id in held:
                if not best or view.in_flight < best[0].in_flight:
                    best = [view]
                elif view.in_flight == best[0].in_flight:
                    best.append(view)
        if not best:
            return None
        return best[0] if len(best) == 1 else best[self._rng.randrange(len(best))]

    def _spills(self, load: int, mean: float) -> bool:
        margin = min(float(self.balance_abs_threshold),
                     max(SPILL_MARGIN_FLOOR, 2.0 * math.sqrt(mean)))
        return load > mean * self.balance_rel_threshold and load > mean + margin

    def evict(self, candidates: Sequence[WorkerView] = ()) -> None:
        """One eviction pass: drop workers unseen since the last pass, then cut the tree back
        to `max_tree_size`."""
        for tenant in self.tree.tenants() - self._seen:
            self.tree.remove_tenant(tenant)
            self._processed.pop(tenant, None)
        self._seen = {view.worker_id for view in candidates}
        self.tree.evict_to(self.max_tree_size)

"""Power of two choices (sgl-router `PowerOfTwoPolicy`).

Sample two distinct candidates, keep the less loaded. Load is the worker-reported
`num_total_tokens` when both samples have a fresh report (the Rust policy uses its cached
`/get_load` values), else gateway-counted in-flight requests, so a stale or missing report never
compares tokens against request counts.
"""

from __future__ import annotations

import random as _random
from collections.abc import Sequence

from gateway.routing import RoutingInput, Selection, WorkerView


class PowerOfTwoPolicy:
    name = "power_of_two"
    needs_signature = False
    needs_request = False

    def __init__(self, rng: _random.Random | None = None) -> None:
        self._rng = rng or _random.Random()

    def select(self, candidates: Sequence[WorkerView], routing: RoutingInput) -> Selection:
        if len(candidates) == 1:
            return Selection(worker=candidates[0])
        i, j = self._rng.sample(range(len(candidates)), 2)
        a, b = candidates[i], candidates[j]
        if a.reported_load is not None and b.reported_load is not None:
            load_a, load_b = a.reported_load, b.reported_load
        else:
            load_a, load_b = a.in_flight, b.in_flight
        return Selection(worker=a if load_a <= load_b else b)

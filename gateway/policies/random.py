"""Uniform random choice (sgl-router `RandomPolicy`)."""

from __future__ import annotations

import random as _random
from collections.abc import Sequence

from gateway.routing import RoutingInput, Selection, WorkerView


class RandomPolicy:
    name = "random"
    needs_signature = False
    needs_request = False

    def __init__(self, rng: _random.Random | None = None) -> None:
        self._rng = rng or _random.Random()

    def select(self, candidates: Sequence[WorkerView], routing: RoutingInput) -> Selection:
        return Selection(worker=candidates[self._rng.randrange(len(candidates))])

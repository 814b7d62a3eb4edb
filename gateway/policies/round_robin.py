"""Round robin over the available candidates (sgl-router `RoundRobinPolicy`).

The counter advances once per selection and indexes the current candidate list modulo its length,
as the Rust policy does, so a worker leaving rotation shifts the cycle rather than stalling it.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.routing import RoutingInput, Selection, WorkerView


class RoundRobinPolicy:
    name = "round_robin"
    needs_signature = False
    needs_request = False

    def __init__(self) -> None:
        self._counter = 0

    def select(self, candidates: Sequence[WorkerView], routing: RoutingInput) -> Selection:
        index = self._counter % len(candidates)
        self._counter += 1
        return Selection(worker=candidates[index])

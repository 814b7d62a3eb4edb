"""Join-shortest-queue on gateway-counted in-flight requests; ties go to the lowest index.

Lowest-index tie-breaking matches the ELDR band rule (DESIGN.md) so that `eldr` with tau = 1 and
`least_load` make identical choices, which keeps the baseline comparison fair.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.routing import RoutingInput, Selection, WorkerView


class LeastLoadPolicy:
    name = "least_load"
    needs_signature = False
    needs_request = False

    def select(self, candidates: Sequence[WorkerView], routing: RoutingInput) -> Selection:
        best = candidates[0]
        for view in candidates[1:]:
            if view.in_flight < best.in_flight:
                best = view
        return Selection(worker=best)

"""`eldr`: expert-locality decode routing (arXiv 2607.00466) over the active zone table.

The choice itself is `gateway.band` (pure numpy); this policy adapts it to the policy interface:
it reads the zone runtime's current snapshot once per decision, caches one `BandPlan` per
(snapshot, ordered available-worker list) so the per-request work is a single matrix-vector
product and a scan, and falls back to least-load when there is nothing to be local about:

    reason "no_table"       no zone table is loaded
    reason "no_signature"   the request has no signature (source "none")
    reason "dim_mismatch"   the signature was built for a table of another shape (a reload
                            landed between resolving the signature and choosing)
    reason "no_zone"        no available worker serves a zone, or similarities are not finite

Band width and min-candidates come from the table (`tau`, `min_candidates`) unless the policy
was built with overrides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from gateway.band import BandPlan, build_plan, choose, default_kernel
from gateway.errors import ConfigError
from gateway.policies.base import Policy, RoutingInput, Selection, WorkerView
from gateway.policies.least_load import LeastLoadPolicy
from gateway.zone_runtime import ActiveZones

# Available-set changes are rare (health flips, joins), so a few plans cover the churn between
# table swaps; each holds a copy of the available centroid rows (1.5 MiB at 64 x 6,144 float32),
# so the bound is also a memory bound. Dropped whole when full rather than tracked per entry.
MAX_PLANS = 8


class ZoneSource(Protocol):
    """Anything with the current snapshot (a `ZoneRuntime`, or a stub in tests)."""

    @property
    def active(self) -> ActiveZones | None: ...


class EldrPolicy:
    name = "eldr"
    needs_signature = True

    def __init__(
        self,
        zones: ZoneSource,
        *,
        tau: float | None = None,
        min_candidates: int | None = None,
        fallback: Policy | None = None,
        on_fallback: Callable[[str], None] | None = None,
    ) -> None:
        if tau is not None and not (0.0 <= tau <= 2.0):
            raise ConfigError(f"eldr tau must be in [0, 2], got {tau!r}")
        if min_candidates is not None and min_candidates < 1:
            raise ConfigError(f"eldr min_candidates must be >= 1, got {min_candidates!r}")
        self._zones = zones
        self._tau = tau
        self._min_candidates = min_candidates
        self._fallback: Policy = fallback if fallback is not None else LeastLoadPolicy()
        self._on_fallback = on_fallback
        self._plans: dict[tuple[str, ...], BandPlan] = {}
        self._plans_for: ActiveZones | None = None
        # The plan of the last decision: the available set rarely changes between requests, and
        # `BandPlan.matches` checks a fresh candidate list against it without building a key.
        self._last_plan: BandPlan | None = None

    def select(self, candidates: Sequence[WorkerView], routing: RoutingInput) -> Selection:
        active = self._zones.active
        if active is None:
            return self._fall_back("no_table", candidates, routing)
        signature = routing.signature
        if signature is None:
            return self._fall_back("no_signature", candidates, routing)
        table = active.table
        plan = self._last_plan
        if plan is None or active is not self._plans_for or not plan.matches(candidates):
            plan = self._plan(active, candidates)
        # plan.dim, not table.spec.dim: the spec computes it from the layer mask on every call.
        if signature.shape != (plan.dim,):
            return self._fall_back("dim_mismatch", candidates, routing)
        choice = choose(
            plan,
            # A no-op for the float32 contiguous vectors SignatureSpec builds.
            np.ascontiguousarray(signature, dtype=np.float32),
            candidates,  # the band reads the loads of its members only
            table.tau if self._tau is None else self._tau,
            table.min_candidates if self._min_candidates is None else self._min_candidates,
        )
        if choice is None:
            return self._fall_back("no_zone", candidates, routing)
        return Selection(
            candidates[choice.position], choice.zone, choice.band_size, choice.rank,
            choice.similarity,
        )

    def _plan(self, active: ActiveZones, candidates: Sequence[WorkerView]) -> BandPlan:
        if active is not self._plans_for:
            self._plans = {}
            self._plans_for = active
        ids = tuple(c.worker_id for c in candidates)
        plan = self._plans.get(ids)
        if plan is None:
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            plan = build_plan(
                active.table.centroids,
                active.zone_workers,
                [(c.worker_id, c.url) for c in candidates],
                ids=ids,
            )
            self._plans[ids] = plan
        self._last_plan = plan
        return plan

    def _fall_back(
        self, reason: str, candidates: Sequence[WorkerView], routing: RoutingInput
    ) -> Selection:
        if self._on_fallback is not None:
            self._on_fallback(reason)
        return self._fallback.select(candidates, routing)


def make_eldr_policy(settings: Any, **deps: Any) -> EldrPolicy:
    """Registry hook (`gateway.policies.registry`): needs `zone_runtime=`; optional
    `eldr_metrics=` (an `EldrMetrics`) counts fallbacks. `settings.eldr_tau` /
    `settings.eldr_min_candidates`, when the config defines them and they are not None,
    override the table's values."""
    try:
        default_kernel()  # fail at start-up, not at the first decision
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    runtime = deps.get("zone_runtime")
    if runtime is None:
        raise ConfigError("decode_policy eldr needs a zone runtime (--zones PATH)")
    metrics = deps.get("eldr_metrics")
    return EldrPolicy(
        runtime,
        tau=getattr(settings, "eldr_tau", None),
        min_candidates=getattr(settings, "eldr_min_candidates", None),
        on_fallback=None if metrics is None else metrics.record_fallback,
    )

"""`eldr`: expert-locality decode routing (arXiv 2607.00466) over the request's zone snapshot.

The choice itself is `gateway.eldr.band` (pure numpy); this policy adapts it to the policy
interface. It decides against the snapshot the signature was resolved in (`RoutingInput.zones`),
caches one `BandPlan` per (snapshot, ordered available-worker list) so the per-request work is a
single matrix-vector product and a scan, and falls back to its load-only policy (least_load by
default, `--eldr-fallback-policy`) when there is nothing to be local about:

    reason "no_table"       no zone table is loaded
    reason "no_signature"   the request has no signature (source "none")
    reason "dim_mismatch"   the signature does not have the snapshot's dimension (a bug
                            upstream of the policy; routed on load rather than failed)
    reason "no_zone"        no available worker serves a zone, or similarities are not finite

`decision="step-cost"` (`--eldr-decision step-cost`) replaces the band with
`gateway.eldr.step_cost`: the worker whose decode step grows least, per output token, from the
experts of the requests in flight there. Its selections carry `release`, which dispatch calls
when the decode ends; one `InFlightExperts` tracker per table (a reload starts an empty one).

Band width, min-candidates and the load bound come from the table (`tau`, `min_candidates`,
`load_bound`) unless the policy was built with overrides (`--eldr-tau`,
`--eldr-min-candidates`, `--eldr-load-bound`; -1 there turns a table's bound off). No bound in
either place means the paper's rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from gateway.config import Settings
from gateway.eldr.band import BandPlan, build_plan, choose
from gateway.eldr.runtime import ActiveZones
from gateway.eldr.step_cost import InFlightExperts, StepCostModel
from gateway.errors import ConfigError
from gateway.policies.least_load import LeastLoadPolicy
from gateway.routing import (
    LowRankSignature,
    Policy,
    RoutingInput,
    Selection,
    Signature,
    WorkerView,
)

# Available-set changes are rare (health flips, joins), so a few plans cover the churn between
# table swaps; each holds a copy of the available centroid rows (1.5 MiB at 64 x 6,144 float32),
# so the bound is also a memory bound. Dropped whole when full rather than tracked per entry.
MAX_PLANS = 8
# `--eldr-load-bound -1`: no bound even where the zone table sets one (the paper's rule).
LOAD_BOUND_OFF = -1
TAU_RANGE = (0.0, 2.0)  # similarities lie in [0, 1] (module gateway.eldr.band); 2 is a safe cap
DECISIONS = ("band", "step-cost")


class EldrPolicy:
    name = "eldr"
    needs_signature = True
    needs_request = False

    def __init__(
        self,
        *,
        tau: float | None = None,
        min_candidates: int | None = None,
        load_bound: int | None = None,
        decision: str = "band",
        step_cost: StepCostModel | None = None,
        fallback: Policy | None = None,
        on_fallback: Callable[[str], None] | None = None,
    ) -> None:
        if tau is not None and not (TAU_RANGE[0] <= tau <= TAU_RANGE[1]):
            raise ConfigError(f"eldr tau must be in [0, 2], got {tau!r}")
        if min_candidates is not None and min_candidates < 1:
            raise ConfigError(f"eldr min_candidates must be >= 1, got {min_candidates!r}")
        if load_bound is not None and load_bound < LOAD_BOUND_OFF:
            raise ConfigError(f"eldr load_bound must be >= 0, or -1 for off, got {load_bound!r}")
        if decision not in DECISIONS:
            raise ConfigError(f"eldr decision must be one of {', '.join(DECISIONS)}, "
                              f"got {decision!r}")
        self.decision = decision
        # Without a model, Settings' defaults (gateway.config documents their derivation).
        self._step_cost = StepCostModel.from_settings(Settings()) if step_cost is None \
            else step_cost
        self._tracker: InFlightExperts | None = None
        self._tracker_for: object = None  # the ZoneTable the tracker's space belongs to
        self._tau = tau
        self._min_candidates = min_candidates
        self._load_bound = load_bound
        self.fallback: Policy = fallback if fallback is not None else LeastLoadPolicy()
        self._on_fallback = on_fallback
        self._plans: dict[tuple[str, ...], BandPlan] = {}
        self._plans_for: ActiveZones | None = None
        # The plan of the last decision: the available set rarely changes between requests, and
        # `BandPlan.matches` checks a fresh candidate list against it without building a key.
        self._last_plan: BandPlan | None = None

    def select(self, candidates: Sequence[WorkerView], routing: RoutingInput) -> Selection:
        active = routing.zones
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
        if isinstance(signature, LowRankSignature):
            if signature.dim != plan.dim:
                return self._fall_back("dim_mismatch", candidates, routing)
        elif signature.shape != (plan.dim,):
            return self._fall_back("dim_mismatch", candidates, routing)
        else:
            # A no-op for the float32 contiguous vectors SignatureSpec builds.
            signature = np.ascontiguousarray(signature, dtype=np.float32)
        if self.decision == "step-cost":
            return self._step_cost_select(active, candidates, signature, routing)
        choice = choose(
            plan,
            signature,
            candidates,  # read lazily: only the loads the band needs (all, with a bound)
            table.tau if self._tau is None else self._tau,
            table.min_candidates if self._min_candidates is None else self._min_candidates,
            self._bound_for(table.load_bound),
        )
        if choice is None:
            return self._fall_back("no_zone", candidates, routing)
        return Selection(
            candidates[choice.position], choice.zone, choice.band_size, choice.rank,
            choice.similarity, choice.load_skipped,
        )

    def _step_cost_select(
        self, active: ActiveZones, candidates: Sequence[WorkerView], signature: Signature,
        routing: RoutingInput,
    ) -> Selection:
        tracker = self._tracker
        if tracker is None or self._tracker_for is not active.table:
            # Activations live in one table's signature space: a new table starts empty, and
            # releases of requests admitted under the old one go to the old tracker.
            tracker = self._tracker = InFlightExperts(active.table.spec)
            self._tracker_for = active.table
        vector = signature.vector() if isinstance(signature, LowRankSignature) else signature
        act = tracker.activation(vector)
        if not np.isfinite(act).all():
            return self._fall_back("no_zone", candidates, routing)
        choice = tracker.choose(self._step_cost, candidates, act)
        worker = candidates[choice.position]
        return Selection(worker, release=tracker.admit(worker.worker_id, act))

    def _bound_for(self, table_bound: int | None) -> int | None:
        """The override when set (-1: off whatever the table says), else the table's."""
        if self._load_bound is None:
            return table_bound
        return None if self._load_bound == LOAD_BOUND_OFF else self._load_bound

    def _plan(self, active: ActiveZones, candidates: Sequence[WorkerView]) -> BandPlan:
        if active is not self._plans_for:
            self._plans = {}
            self._plans_for = active
        ids = tuple(c.worker_id for c in candidates)
        plan = self._plans.get(ids)
        if plan is None:
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            predictor = active.table.predictor
            plan = build_plan(
                active.table.centroids,
                active.zone_workers,
                [(c.worker_id, c.url) for c in candidates],
                ids=ids,
                basis=None if predictor is None else predictor.basis,
            )
            self._plans[ids] = plan
        self._last_plan = plan
        return plan

    def _fall_back(
        self, reason: str, candidates: Sequence[WorkerView], routing: RoutingInput
    ) -> Selection:
        if self._on_fallback is not None:
            self._on_fallback(reason)
        return self.fallback.select(candidates, routing)

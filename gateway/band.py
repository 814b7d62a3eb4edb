"""Locality band selection (ELDR, arXiv 2607.00466): pure numpy, no I/O.

For a request signature `s` (a unit vector) and zone centroids `c_k` (unit rows), the similarity
of zone k is `s_k = c_k . s`. Only zones whose decode worker is *available* take part; a zone
whose worker is gone or unhealthy is left out of the plan explicitly, so its traffic flows to
the next most similar zones through the band and the min-candidates rule.

    s*   = max_k s_k
    band = {k : s_k >= s* - tau}
    if the band holds fewer than `min_candidates` distinct workers, the next most similar zones
    are admitted (ties: lower zone index first) until it does: the paper's "min-2" recipe,
    because pure locality (tau = 0, one candidate) regressed tail TPOT.
    choose the band member with the fewest in-flight decode requests; ties go to the more
    similar zone, then to the lowest zone index.

Why similarity before index on load ties: at low load every band member has 0 or 1 requests in
flight, so ties are the common case, and a bare lowest-index rule would send a request whose
own zone is 3 to a min-2 neighbour zone 0 just because 0 < 3, giving up locality for nothing.
The result is still deterministic, and tau = 1 is still join-shortest-queue (only the tie-break
among equally loaded workers differs from `least_load`'s lowest position).

Signatures and centroids are non-negative (IDF-weighted counts and their means), so every
`s_k` lies in [0, 1]: `tau >= 1` admits every available zone and the choice is plain
join-shortest-queue; `tau = 0` is pure locality plus min-candidates.

Zone-less workers: an available worker that serves no zone (it joined after the table was fitted
and no orphaned zone was left to hand it; see `gateway.zone_runtime`) has no centroid and so no
similarity. It joins every band as *overflow* capacity: it is chosen only when it has strictly
fewer in-flight requests than the best band member. Excluding it would leave a new worker idle
until the next fit; admitting it on equal terms would dilute locality. Such a choice reports
`zone=None`, `rank=None`, `similarity=None`.

The work per decision is one matrix-vector product into a preallocated buffer plus a scan over
the available zones; everything else (row gather, worker matching) is done once per
(table, available-set) in `build_plan`. See benchmarks/eldr_decision.py for measured cost.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class BandChoice:
    """The outcome of one band decision, in terms of the candidate list the plan was built for."""

    position: int  # index of the chosen worker in the candidate list
    zone: int | None  # zone index in the table; None for a zone-less (overflow) worker
    band_size: int  # distinct workers eligible (band after min-candidates, plus zone-less)
    rank: int | None  # 1 = the most similar available zone
    similarity: float | None


def normalize_worker_key(key: str) -> str:
    """Worker ids and URLs compare without a trailing slash (`http://h:1/` == `http://h:1`)."""
    return key.rstrip("/")


class BandPlan:
    """Everything about one (zone table, available candidate list) pair that does not change
    per request: the centroid rows of available zones (contiguous, zone order), which candidate
    serves each of them, the zone-less candidates, and the similarity output buffer."""

    __slots__ = ("_sims", "centroids", "dim", "positions", "zoneless", "zones")

    def __init__(
        self,
        centroids: FloatArray,
        zones: Sequence[int],
        positions: Sequence[int],
        zoneless: Sequence[int],
    ) -> None:
        self.centroids = centroids
        self.zones: tuple[int, ...] = tuple(zones)
        self.positions: tuple[int, ...] = tuple(positions)
        self.zoneless: tuple[int, ...] = tuple(zoneless)
        self.dim = int(centroids.shape[1])
        self._sims: FloatArray = np.empty(len(self.zones), dtype=np.float32)

    @property
    def size(self) -> int:
        """Number of available zones."""
        return len(self.zones)

    def similarities(self, signature: FloatArray) -> FloatArray:
        """`c_k . s` for the available zones, written into the plan's buffer (no allocation).

        The buffer is reused by the next call: copy it if you keep it. Callers run on one
        event loop thread, so a plan is never used concurrently.
        """
        np.dot(self.centroids, signature, out=self._sims)
        return self._sims


def build_plan(
    centroids: FloatArray,
    zone_workers: Sequence[str | None],
    candidate_keys: Sequence[Collection[str]],
) -> BandPlan:
    """Precompute the band plan for one table and one ordered list of available candidates.

    `zone_workers[k]` is the worker serving zone k (an id or URL; None when the zone has no
    worker). `candidate_keys[i]` holds the names candidate i answers to (its id and URL). A zone
    joins the plan when its worker is among the candidates; candidates that serve no zone become
    zone-less overflow workers.
    """
    matrix = np.asarray(centroids)
    if matrix.ndim != 2 or matrix.shape[0] != len(zone_workers):
        raise ValueError(
            f"centroids shaped {matrix.shape} do not match {len(zone_workers)} zone workers"
        )
    owner: dict[str, int] = {}
    for position, keys in enumerate(candidate_keys):
        for key in keys:
            owner.setdefault(normalize_worker_key(key), position)
    zones: list[int] = []
    positions: list[int] = []
    for zone, worker in enumerate(zone_workers):
        if worker is None:
            continue
        match = owner.get(normalize_worker_key(worker))
        if match is not None:
            zones.append(zone)
            positions.append(match)
    served = set(positions)
    zoneless = [p for p in range(len(candidate_keys)) if p not in served]
    rows = np.ascontiguousarray(matrix[zones], dtype=np.float32)
    return BandPlan(rows, zones, positions, zoneless)


def choose(
    plan: BandPlan,
    signature: FloatArray,
    in_flight: Sequence[int],
    tau: float,
    min_candidates: int,
) -> BandChoice | None:
    """Pick a worker for `signature` (a float32 vector of length `plan.dim`).

    `in_flight[i]` is candidate i's in-flight decode count. Returns None when no available zone
    exists or the similarities are not finite; the caller then falls back to least-load.
    """
    if plan.size == 0:
        return None
    sims: list[float] = plan.similarities(signature).tolist()
    best = max(sims)
    if not math.isfinite(best):
        return None
    floor = best - tau
    band = [i for i, s in enumerate(sims) if s >= floor]
    positions = plan.positions
    workers = {positions[i] for i in band}
    if len(workers) < min_candidates:
        # sorted() is stable under reverse=True, so equal similarities keep zone order.
        for i in sorted(range(len(sims)), key=sims.__getitem__, reverse=True):
            if positions[i] not in workers:
                band.append(i)
                workers.add(positions[i])
                if len(workers) >= min_candidates:
                    break
    zones = plan.zones
    chosen = min(band, key=lambda i: (in_flight[positions[i]], -sims[i], zones[i]))
    chosen_load = in_flight[positions[chosen]]
    overflow: int | None = None
    for position in plan.zoneless:
        load = in_flight[position]
        if load < chosen_load:
            chosen_load = load
            overflow = position
    band_size = len(workers) + len(plan.zoneless)
    if overflow is not None:
        return BandChoice(overflow, None, band_size, None, None)
    similarity = sims[chosen]
    rank = 1 + sum(1 for s in sims if s > similarity)
    return BandChoice(positions[chosen], zones[chosen], band_size, rank, similarity)

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

Load bound (optional, `bound`; None = off, the paper's rule above exactly): a static band keeps
sending one zone's traffic to the same few workers, so locality can buy a long queue and worse
tail TPOT than load-only routing. With a bound B >= 0:

    min_load = min over ALL available candidates (zoned and zone-less) of in-flight
    a zone is *eligible* when its worker's in-flight <= min_load + B
    s*   = max s_k over eligible zones
    band = {eligible k : s_k >= s* - tau}
    min-candidates admits the next most similar *eligible* zones (ties: lower zone index)
    choose as above (fewest in-flight, then more similar, then lower zone index)

Over-bound zones are skipped both when forming the band and when admitting min-candidates
neighbours, so the band re-forms among eligible zones in similarity order. The least-loaded
worker is always eligible, so there is always a choice: when it serves no zone and no zone is
eligible, the band is empty and the least-loaded zone-less worker is chosen as overflow (a
zone-less worker over the bound never wins, since it would need fewer requests than an
eligible member). B = 0 is join-shortest-queue restricted to the least-loaded workers, the most
similar zone among them winning. `BandChoice.load_skipped` counts the over-bound zones that
rank above the zone the band settled on (strictly more similar, or as similar with a lower
zone index), even when a zone-less worker then takes the request; all over-bound zones when
none was eligible. It counts exclusions, not changed decisions: an over-bound zone above the
choice might have lost on load anyway. Cost: one pass reading every candidate's load
(N <= 64) on top of the unbounded walk.

Zone-less workers: an available worker that serves no zone (it joined after the table was fitted
and no orphaned zone was left to hand it; see `gateway.eldr.runtime`) has no centroid and so no
similarity. It joins every band as *overflow* capacity: it is chosen only when it has strictly
fewer in-flight requests than the best band member. Excluding it would leave a new worker idle
until the next fit; admitting it on equal terms would dilute locality. Such a choice reports
`zone=None`, `rank=None`, `similarity=None`.

Cost: everything that does not change per request (row gather of the available zones, their
negation, worker matching, their projection onto the table predictor's basis) is done once per
(table, available set) in `build_plan`; a decision is one BLAS matrix-vector product into a
preallocated buffer, one stable argsort and a walk of the band. A predicted signature
(`gateway.routing.LowRankSignature`) is ranked in the predictor's R coordinates instead:
`s_k = (P y)_k / sqrt(y . G y)` with `P = centroids @ basis.T` and `G = basis @ basis.T`, the
same similarities up to float32 rounding from K x R floats. Measured cost:
benchmarks/eldr_decision.py, docs/benchmarks.md.
"""

from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
import numpy.typing as npt

from gateway.routing import LowRankSignature, Signature

FloatArray = npt.NDArray[np.float32]
_WORKER_ID = operator.attrgetter("worker_id")


class Candidate(Protocol):
    """What the band reads of a candidate worker (a `WorkerView` has both)."""

    @property
    def worker_id(self) -> str: ...

    @property
    def in_flight(self) -> int: ...


@dataclass(frozen=True, slots=True)
class BandChoice:
    """The outcome of one band decision, in terms of the candidate list the plan was built for."""

    position: int  # index of the chosen worker in the candidate list
    zone: int | None  # zone index in the table; None for a zone-less (overflow) worker
    band_size: int  # distinct workers eligible (band after min-candidates, plus zone-less)
    rank: int | None  # 1 = the most similar available zone
    similarity: float | None
    # Zones the load bound excluded that rank above the choice (module docstring); 0 unbounded.
    load_skipped: int = 0


def normalize_worker_key(key: str) -> str:
    """Worker ids and URLs compare without a trailing slash (`http://h:1/` == `http://h:1`)."""
    return key.rstrip("/")


class BandPlan:
    """Everything about one (zone table, available candidate list) pair that does not change
    per request: which candidate serves each available zone, the zone-less candidates, and the
    centroid rows of available zones NEGATED (so that one stable ascending argsort orders zones
    by descending similarity with ties in zone order) plus the product's output buffer."""

    __slots__ = ("_buffer", "basis", "dim", "gram", "ids", "neg_centroids", "neg_projected",
                 "positions", "zoneless", "zones")

    def __init__(
        self,
        centroids: FloatArray,
        zones: Sequence[int],
        positions: Sequence[int],
        zoneless: Sequence[int],
        ids: Sequence[str] | None = None,
        basis: FloatArray | None = None,
    ) -> None:
        rows = np.ascontiguousarray(centroids, dtype=np.float32)
        self.zones: tuple[int, ...] = tuple(zones)
        self.positions: tuple[int, ...] = tuple(positions)
        self.zoneless: tuple[int, ...] = tuple(zoneless)
        # The worker id of each candidate the plan was built for, when known: `matches`.
        self.ids: tuple[str, ...] | None = None if ids is None else tuple(ids)
        self.dim = int(rows.shape[1])
        self.neg_centroids: FloatArray = np.ascontiguousarray(-rows)
        self._buffer: FloatArray = np.empty(len(self.zones), dtype=np.float32)
        # The table predictor's basis (identity-compared with a LowRankSignature's), the
        # centroids projected onto it, and its Gram matrix; None without a predictor.
        self.basis = basis
        self.neg_projected: FloatArray | None = None
        self.gram: FloatArray | None = None
        if basis is not None:
            self.neg_projected = np.ascontiguousarray(self.neg_centroids @ basis.T,
                                                      dtype=np.float32)
            self.gram = np.ascontiguousarray(basis @ basis.T, dtype=np.float32)

    @property
    def size(self) -> int:
        """Number of available zones."""
        return len(self.zones)

    def matches(self, candidates: Sequence[Candidate]) -> bool:
        """Whether `candidates` is the worker list this plan was built for (same ids, same
        order), so that its positions are valid for it. Dispatch builds a fresh list for every
        request while the available set rarely changes, so this runs on every decision."""
        # map + attrgetter + tuple equality run in C: ~1.5 us for 64 candidates, against ~4 us
        # for a generator comparing them one by one.
        return self.ids is not None and tuple(map(_WORKER_ID, candidates)) == self.ids

    def ranked(self, signature: Signature) -> tuple[list[float], list[int]] | None:
        """Every available zone, most similar first (ties in zone order), as (negated
        similarities, plan rows); None when the similarities are not finite."""
        # Four numpy calls (product, argsort, gather, two tolist): each extra numpy call on a
        # 64-vector costs about a microsecond of overhead, more than the work it does.
        neg = self.negated_similarities(signature)
        order = np.argsort(neg, kind="stable")  # most similar first; ties in zone order
        ranked: list[float] = neg[order].tolist()  # ascending -s_k
        if not math.isfinite(ranked[0]):  # NaN sorts last, so a NaN here means all are NaN
            return None
        return ranked, order.tolist()

    def negated_similarities(self, signature: Signature) -> FloatArray:
        """`-(c_k . s)` for every available zone, written into the plan's buffer.

        The buffer is reused by the next call. Callers run on one event loop thread, so a plan
        is never used concurrently.
        """
        if isinstance(signature, LowRankSignature):
            if signature.basis is self.basis and self.neg_projected is not None \
                    and self.gram is not None:
                y = signature.coords
                np.dot(self.neg_projected, y, out=self._buffer)
                self._buffer /= np.float32(np.sqrt(y @ self.gram @ y))
                return self._buffer
            signature = signature.vector()  # another predictor's coordinates: build it
        np.dot(self.neg_centroids, signature, out=self._buffer)
        return self._buffer

    def similarities(self, signature: Signature) -> FloatArray:
        """`c_k . s` for the available zones (a new array; for inspection, not the hot path)."""
        return -self.negated_similarities(signature)


def build_plan(
    centroids: FloatArray,
    zone_workers: Sequence[str | None],
    candidate_keys: Sequence[Collection[str]],
    ids: Sequence[str] | None = None,
    basis: FloatArray | None = None,
) -> BandPlan:
    """Precompute the band plan for one table and one ordered list of available candidates.

    `zone_workers[k]` is the worker serving zone k (an id or URL; None when the zone has no
    worker). `candidate_keys[i]` holds the names candidate i answers to (its id and URL). A zone
    joins the plan when its worker is among the candidates; candidates that serve no zone become
    zone-less overflow workers. `ids[i]`, when given, is candidate i's worker id, which
    `BandPlan.matches` checks later lists against. `basis` is the table predictor's, for
    ranking `LowRankSignature`s.
    """
    if ids is not None and len(ids) != len(candidate_keys):
        raise ValueError(f"{len(ids)} ids for {len(candidate_keys)} candidates")
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
    return BandPlan(matrix[zones], zones, positions, zoneless, ids, basis)


def choose(
    plan: BandPlan,
    signature: Signature,
    in_flight: Sequence[int] | Sequence[Candidate],
    tau: float,
    min_candidates: int,
    bound: int | None = None,
) -> BandChoice | None:
    """Pick a worker for `signature` (a float32 vector of length `plan.dim`, or its low-rank
    coordinates).

    `in_flight[i]` is candidate i's in-flight decode count, or candidate i itself (anything
    with an int `in_flight`, such as a `WorkerView`: then, without a bound, only the loads the
    band needs are read). `bound` is the load bound (module docstring; None: off). Returns None
    when no available zone exists or the similarities are not finite; the caller then falls
    back to its load-only policy.
    """
    if plan.size == 0:
        return None
    got = plan.ranked(signature)
    if got is None:
        return None
    if bound is not None:
        return _choose_bounded(plan, got, in_flight, tau, min_candidates, bound)
    load_of = _load_reader(in_flight)
    ranked, rows = got  # ascending -s_k, and the plan row of each
    best_neg = ranked[0]
    limit = tau + best_neg  # s_k >= s* - tau  <=>  -s_k <= tau - s*
    positions = plan.positions
    count = len(rows)
    band: list[int] = []  # indices into `rows`, most similar first
    workers: set[int] = set()
    j = 0
    while j < count and ranked[j] <= limit:
        band.append(j)
        workers.add(positions[rows[j]])
        j += 1
    while len(workers) < min_candidates and j < count and math.isfinite(ranked[j]):
        if positions[rows[j]] not in workers:
            band.append(j)
            workers.add(positions[rows[j]])
        j += 1
    # `band` is in (descending similarity, ascending zone) order, so the first member with the
    # fewest in-flight requests is exactly the (load, -similarity, zone) minimum.
    band_loads = [load_of(positions[rows[j]]) for j in band]
    chosen_load = min(band_loads)
    best_j = band[band_loads.index(chosen_load)]
    chosen = rows[best_j]
    overflow: int | None = None
    for position in plan.zoneless:
        load = load_of(position)
        if load < chosen_load:
            chosen_load = load
            overflow = position
    band_size = len(workers) + len(plan.zoneless)
    if overflow is not None:
        return BandChoice(overflow, None, band_size, None, None)
    similarity = -ranked[best_j]
    rank = 1 + bisect.bisect_left(ranked, ranked[best_j])  # zones strictly more similar
    return BandChoice(positions[chosen], plan.zones[chosen], band_size, rank, similarity)


def _choose_bounded(
    plan: BandPlan,
    got: tuple[list[float], list[int]],
    in_flight: Sequence[int] | Sequence[Candidate],
    tau: float,
    min_candidates: int,
    bound: int,
) -> BandChoice | None:
    """`choose` with the load bound (module docstring). Kept apart from the unbounded walk so
    that `bound=None` runs exactly the paper's code path."""
    # The one pass: the minimum is over every candidate (the plan's zones and zone-less
    # workers together cover the whole list), so the least-loaded worker is always eligible.
    loads = _all_loads(in_flight)
    cap = min(loads) + bound
    ranked, rows = got  # ascending -s_k, and the plan row of each
    positions = plan.positions
    count = len(rows)
    skipped: list[int] = []  # indices into `rows` of over-bound zones met by the walk
    band: list[int] = []  # indices into `rows` of eligible members, most similar first
    workers: set[int] = set()
    j = 0
    while j < count and loads[positions[rows[j]]] > cap:  # s* is the best ELIGIBLE zone's
        skipped.append(j)
        j += 1
    if j < count:
        limit = tau + ranked[j]  # s_k >= s* - tau  <=>  -s_k <= tau - s*
        while j < count and ranked[j] <= limit:
            position = positions[rows[j]]
            if loads[position] > cap:
                skipped.append(j)
            else:
                band.append(j)
                workers.add(position)
            j += 1
        while len(workers) < min_candidates and j < count and math.isfinite(ranked[j]):
            position = positions[rows[j]]
            if loads[position] > cap:
                skipped.append(j)
            elif position not in workers:
                band.append(j)
                workers.add(position)
            j += 1
    best_j = -1
    chosen_load = math.inf
    for j in band:  # most similar first: the first minimum wins ties
        load = loads[positions[rows[j]]]
        if load < chosen_load:
            chosen_load = load
            best_j = j
    overflow: int | None = None
    for position in plan.zoneless:
        load = loads[position]
        if load < chosen_load:
            chosen_load = load
            overflow = position
    band_size = len(workers) + len(plan.zoneless)
    # Over-bound zones ranked above the zone the band settled on; with an empty band, all of
    # them (every zone was over the bound). `skipped` is ascending, so bisect counts them.
    load_skipped = len(skipped) if best_j < 0 else bisect.bisect_left(skipped, best_j)
    if overflow is not None:
        return BandChoice(overflow, None, band_size, None, None, load_skipped)
    if best_j < 0:  # no eligible zone and no zone-less worker: only non-finite similarities
        return None
    chosen = rows[best_j]
    similarity = -ranked[best_j]
    rank = 1 + bisect.bisect_left(ranked, ranked[best_j])  # zones strictly more similar
    return BandChoice(positions[chosen], plan.zones[chosen], band_size, rank, similarity,
                      load_skipped)


def _all_loads(in_flight: Sequence[int] | Sequence[Candidate]) -> list[int]:
    """Every candidate's in-flight count, in candidate order."""
    if len(in_flight) and not isinstance(in_flight[0], int):
        return [c.in_flight for c in cast("Sequence[Candidate]", in_flight)]
    return list(cast("Sequence[int]", in_flight))


def _load_reader(in_flight: Sequence[int] | Sequence[Candidate]) -> _LoadOf:
    """Candidate position -> in-flight count, reading only the positions the band asks for."""
    if len(in_flight) and not isinstance(in_flight[0], int):
        candidates = cast("Sequence[Candidate]", in_flight)
        return lambda position: candidates[position].in_flight
    return cast("Sequence[int]", in_flight).__getitem__


class _LoadOf(Protocol):
    def __call__(self, position: int, /) -> int: ...

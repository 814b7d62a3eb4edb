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

Two ways to get the similarities, same decisions:
- `c` (default where the `gateway._simkernel` extension was built): a screening pass over 8-bit
  copies of the centroids gives every zone a provable interval around its float32 similarity;
  only zones whose interval reaches the band, the min-candidates admission or the chosen zone's
  rank get an exact float32 product (usually 2-5 of 64). The band then runs over those zones
  only, which gives the same choice, band size, rank and similarity as running it over all of
  them (the argument is in gateway/_simkernel.c). With loads (or the candidates themselves)
  given as a list, `choose` makes the whole decision in one call of the extension
  (`Index.choose`, the walk below written in C; signatures the screening cannot narrow are
  decided load-first there, or, when min-candidates must widen their band, through one sgemv
  and `Index.choose_all`); otherwise it walks `BandPlan.ranked` here.
- `numpy`: one BLAS matrix-vector product over every available zone into a preallocated buffer
  and one argsort. Used where the extension is missing, on CPUs without AVX2 (where its plain-C
  loops lose to BLAS), for centroids it cannot take (negative entries), and when
  `ELDR_BAND_KERNEL=numpy` is set (an operator's switch back).
Why two: at 64 zones x 6,144 dimensions the float32 centroids are 1.5 MiB and the product is
bound by cache bandwidth (p50 ~24 us, p99 ~50 us on the 2-core CI machine); the 8-bit copy is
384 KiB. Everything else (row gather, quantization, worker matching) is done once per (table,
available-set) in `build_plan`. Measured cost: benchmarks/eldr_decision.py and docs/eldr.md.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]

try:  # built by setup.py where a C compiler exists; optional by design
    from gateway import _simkernel
except ImportError:  # pragma: no cover - depends on the build machine
    _simkernel = None  # type: ignore[assignment]

# auto: c where the extension is built and the centroids suit it, else numpy. c: the extension
# or an error (tests, benchmarks). numpy: always numpy.
KERNELS = ("auto", "c", "numpy")
ENV_KERNELS = ("auto", "numpy")


def default_kernel() -> str:
    """`ELDR_BAND_KERNEL` (auto | numpy), read when a plan is built. An operator's switch, so it
    cannot ask for something that may fail at request time; `make_eldr_policy` checks it at
    start-up."""
    value = os.environ.get("ELDR_BAND_KERNEL", "auto").strip().lower() or "auto"
    if value not in ENV_KERNELS:
        raise ValueError(
            f"ELDR_BAND_KERNEL must be one of {', '.join(ENV_KERNELS)}, got {value!r}")
    return value


def c_kernel_available() -> bool:
    return _simkernel is not None


class _Candidate(Protocol):
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


def normalize_worker_key(key: str) -> str:
    """Worker ids and URLs compare without a trailing slash (`http://h:1/` == `http://h:1`)."""
    return key.rstrip("/")


class BandPlan:
    """Everything about one (zone table, available candidate list) pair that does not change
    per request: which candidate serves each available zone, the zone-less candidates, the C
    screening index (C kernel), and the centroid rows of available zones NEGATED (so that one
    stable ascending argsort orders zones by descending similarity with ties in zone order)
    plus the product's output buffer (numpy kernel, and the C kernel's hand-back)."""

    __slots__ = ("_buffer", "_index", "dim", "ids", "neg_centroids", "positions", "zoneless",
                 "zones")

    def __init__(
        self,
        centroids: FloatArray,
        zones: Sequence[int],
        positions: Sequence[int],
        zoneless: Sequence[int],
        kernel: str = "auto",
        ids: Sequence[str] | None = None,
    ) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        rows = np.ascontiguousarray(centroids, dtype=np.float32)
        self.zones: tuple[int, ...] = tuple(zones)
        self.positions: tuple[int, ...] = tuple(positions)
        self.zoneless: tuple[int, ...] = tuple(zoneless)
        # The worker id of each candidate the plan was built for, when known: `matches`.
        self.ids: tuple[str, ...] | None = None if ids is None else tuple(ids)
        self.dim = int(rows.shape[1])
        self._index: _simkernel.Index | None = None
        usable = bool(np.all(rows >= 0)) and bool(np.all(np.isfinite(rows)))
        if kernel == "c" and _simkernel is None:
            raise ValueError("kernel 'c' requested but gateway._simkernel is not built")
        if kernel == "c" and not usable:
            raise ValueError("kernel 'c' needs finite, non-negative centroids")
        if kernel != "numpy" and _simkernel is not None and usable and rows.size:
            self._index = _simkernel.Index(rows, rows.shape[0], rows.shape[1])
            if kernel == "auto" and self._index.isa == "scalar":
                # Without AVX2 the extension's plain-C loops were 2.5x slower than the sgemv
                # (select p50 75 vs 30 us at 64 x 6,144, docs/eldr.md): auto means numpy there.
                self._index = None
        if self._index is not None:
            candidates = 1 + max((*self.positions, *self.zoneless), default=-1)
            if self.ids is not None:
                candidates = max(candidates, len(self.ids))
            self._index.set_workers(self.positions, self.zoneless, candidates, self.ids)
        # Kept with the C kernel too: it hands back signatures that need every zone ranked
        # (most zones within tau of the best, and a band min-candidates must widen), for which
        # one sgemv is cheaper than exact products one by one.
        self.neg_centroids: FloatArray = np.ascontiguousarray(-rows)
        self._buffer: FloatArray = np.empty(len(self.zones), dtype=np.float32)

    @property
    def size(self) -> int:
        """Number of available zones."""
        return len(self.zones)

    def matches(self, candidates: Sequence[_Candidate]) -> bool:
        """Whether `candidates` is the worker list this plan was built for (same ids, same
        order), so that its positions are valid for it. Dispatch builds a fresh list for every
        request while the available set rarely changes, so this runs on every decision: in the
        extension, a pointer comparison per candidate."""
        if self.ids is None:
            return False
        if self._index is not None and isinstance(candidates, list):
            return self._index.matches(candidates)
        return tuple([c.worker_id for c in candidates]) == self.ids

    @property
    def kernel(self) -> str:
        """Which product this plan runs: `c-avx512vnni`, `c-avx2`, `c-scalar` or `numpy`."""
        if self._index is None:
            return "numpy"
        return f"c-{self._index.isa}"

    def ranked(self, signature: FloatArray, tau: float,
               min_candidates: int) -> tuple[list[float], list[int]] | None:
        """The zones that can affect the decision, most similar first (ties in zone order), as
        (negated similarities, plan rows); None when the similarities are not finite.

        The numpy kernel returns every available zone; the C kernel only those whose interval
        reaches the band, the min-candidates admission or the chosen zone's rank.
        """
        if self._index is not None:
            # Min-candidates counts distinct workers: with at most z zones per worker (the
            # index's rank_depth), the top min_candidates x z zones span enough of them.
            got = self._index.candidates(signature, tau,
                                         min_candidates * self._index.rank_depth)
            if got is not False:
                return got
        return self.ranked_all(signature)

    def ranked_all(self, signature: FloatArray) -> tuple[list[float], list[int]] | None:
        """Every available zone, most similar first, from one BLAS product (the numpy kernel,
        and the C kernel's hand-back for unstructured signatures)."""
        # Four numpy calls (product, argsort, gather, two tolist): each extra numpy call on a
        # 64-vector costs about a microsecond of overhead, more than the work it does.
        neg = self.negated_similarities(signature)
        order = np.argsort(neg, kind="stable")  # most similar first; ties in zone order
        ranked: list[float] = neg[order].tolist()  # ascending -s_k
        if not math.isfinite(ranked[0]):  # NaN sorts last, so a NaN here means all are NaN
            return None
        return ranked, order.tolist()

    def negated_similarities(self, signature: FloatArray) -> FloatArray:
        """`-(c_k . s)` for every available zone, written into the plan's buffer.

        The buffer is reused by the next call. Callers run on one event loop thread, so a plan
        is never used concurrently.
        """
        np.dot(self.neg_centroids, signature, out=self._buffer)
        return self._buffer

    def similarities(self, signature: FloatArray) -> FloatArray:
        """`c_k . s` for the available zones (a new array; for inspection, not the hot path)."""
        return -self.negated_similarities(signature)


def build_plan(
    centroids: FloatArray,
    zone_workers: Sequence[str | None],
    candidate_keys: Sequence[Collection[str]],
    kernel: str | None = None,
    ids: Sequence[str] | None = None,
) -> BandPlan:
    """Precompute the band plan for one table and one ordered list of available candidates.

    `zone_workers[k]` is the worker serving zone k (an id or URL; None when the zone has no
    worker). `candidate_keys[i]` holds the names candidate i answers to (its id and URL). A zone
    joins the plan when its worker is among the candidates; candidates that serve no zone become
    zone-less overflow workers. `ids[i]`, when given, is candidate i's worker id, which
    `BandPlan.matches` checks later lists against.
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
    return BandPlan(matrix[zones], zones, positions, zoneless,
                    default_kernel() if kernel is None else kernel, ids)


def choose(
    plan: BandPlan,
    signature: FloatArray,
    in_flight: Sequence[int] | Sequence[_Candidate],
    tau: float,
    min_candidates: int,
) -> BandChoice | None:
    """Pick a worker for `signature` (a float32 vector of length `plan.dim`).

    `in_flight[i]` is candidate i's in-flight decode count, or candidate i itself (anything
    with an int `in_flight`, such as a `WorkerView`: then only the loads the band needs are
    read). Returns None when no available zone exists or the similarities are not finite; the
    caller then falls back to least-load.
    """
    if plan.size == 0:
        return None
    index = plan._index
    if index is not None and isinstance(in_flight, list) and \
            len(in_flight) == index.candidates_count:
        # The whole decision in one call (same walk as below, in C). False: most zones are near
        # the best and min-candidates must widen the band, so every zone needs ranking; one
        # sgemv over all of them is cheaper than exact products one by one, and the extension
        # then sorts and walks its result.
        decided = index.choose(signature, in_flight, tau, min_candidates)
        if decided is False:
            decided = index.choose_all(plan.negated_similarities(signature), in_flight, tau,
                                       min_candidates)
        if decided is None:
            return None
        position, row, band_size, rank, similarity = decided
        if row < 0:
            return BandChoice(position, None, band_size, None, None)
        return BandChoice(position, plan.zones[row], band_size, rank, similarity)
    got = plan.ranked(signature, tau, min_candidates)
    if got is None:
        return None
    loads = _loads(in_flight)
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
    band_loads = [loads[positions[rows[j]]] for j in band]
    chosen_load = min(band_loads)
    best_j = band[band_loads.index(chosen_load)]
    chosen = rows[best_j]
    overflow: int | None = None
    for position in plan.zoneless:
        load = loads[position]
        if load < chosen_load:
            chosen_load = load
            overflow = position
    band_size = len(workers) + len(plan.zoneless)
    if overflow is not None:
        return BandChoice(overflow, None, band_size, None, None)
    similarity = -ranked[best_j]
    rank = 1 + bisect.bisect_left(ranked, ranked[best_j])  # zones strictly more similar
    return BandChoice(positions[chosen], plan.zones[chosen], band_size, rank, similarity)


def _loads(in_flight: Sequence[int] | Sequence[_Candidate]) -> Sequence[int]:
    if len(in_flight) and hasattr(in_flight[0], "in_flight"):
        return [c.in_flight for c in in_flight]  # type: ignore[union-attr]
    return in_flight  # type: ignore[return-value]

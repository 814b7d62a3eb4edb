"""The routing types every policy shares: the bottom module of the gateway's routing layer.

A policy gets the AVAILABLE candidate workers (healthy, circuit not open; never empty) as
`WorkerView` snapshots and a small `RoutingInput`, and returns a `Selection`. It does no I/O and
raises nothing HTTP, so it can be unit tested with plain objects. Dispatch resolves a signature
only for policies with `needs_signature = True`, and fills the request's routing text and key
(`RoutingInput.text`, `.routing_key`) only for policies with `needs_request = True`. Both
`gateway.policies` (load and prefix policies) and `gateway.eldr` (expert locality) import this
module; it imports neither.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # a type only: the snapshot is built by gateway.eldr, which imports us
    from gateway.eldr.runtime import ActiveZones

SignatureSource = Literal["prefill", "cache", "predictor", "none"]
SIGNATURE_SOURCES: tuple[SignatureSource, ...] = ("prefill", "cache", "predictor", "none")


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a worker's last `/v1/loads` answer said: summed over DP ranks (or this rank's),
    token usage the mean over ranks, as smg's `WorkerLoadResponse` helpers compute them. The
    waiting work, throughput and usage feed smg's least_load score
    (gateway.policies.expected_wait); `requests` feeds the shared load view
    (`Worker.shared_load`, --load-view reported)."""

    waiting_reqs: int
    waiting_uncached_tokens: int
    gen_throughput: float  # tokens/s
    token_usage: float  # KV usage, 0..1
    seq: int  # increases with every fresh report of this worker
    # running + waiting requests (gateway.loads._requests_in); None when the answer lacks
    # either field
    requests: int | None = None


@dataclass(frozen=True, slots=True)
class WorkerView:
    """An available worker as a policy sees it (a snapshot, immutable)."""

    worker_id: str  # stable id (the URL unless the operator named it)
    url: str
    # The request load policies compare: this process's in-flight requests, or with
    # `--load-view reported` the worker's own count plus this process's change since
    # (`Worker.shared_load`), which stays right with several gateway replicas.
    in_flight: int
    reported_load: int | None  # worker-reported num_total_tokens; None when unknown/stale
    report: LoadReport | None = None  # the last fresh `/v1/loads` report; None when stale


@dataclass(frozen=True, slots=True)
class LowRankSignature:
    """A predicted signature kept in the predictor's coordinates: the signature is
    `normalise(coords @ basis)` (zones/predictor.py), never built. The locality band ranks zones
    from `coords` through the centroids projected onto the same basis, touching K x R floats
    instead of the K x D centroids and the R x D basis (at 64 zones x 6,144 dims, R = 32:
    8 KiB instead of 2.3 MiB, which a busy gateway has mostly evicted from cache)."""

    coords: npt.NDArray[np.float32]  # [R]
    basis: npt.NDArray[np.float32]  # [R, D], the active table predictor's (shared, read-only)

    @property
    def dim(self) -> int:
        return int(self.basis.shape[1])

    def vector(self) -> npt.NDArray[np.float32]:
        """The unit signature itself (for inspection and mixing, not the hot path)."""
        vec = (self.coords @ self.basis).astype(np.float32)
        return vec / np.float32(np.sqrt(np.dot(vec, vec)))


Signature = npt.NDArray[np.float32] | LowRankSignature


@dataclass(frozen=True, slots=True)
class RoutingInput:
    """What a decode policy may use beyond load. `zones` is the zone-table snapshot the
    signature was built in: the resolver reads the active table once per request and the
    locality policy decides against that same snapshot, so a reload landing in between cannot
    pair a signature with another table's centroids."""

    signature: Signature | None  # a unit vector in `zones`' signature space, or its coords
    signature_source: SignatureSource
    zones: ActiveZones | None = None
    # For prefix and key policies (cache_aware, prefix_hash, consistent_hashing, manual): the
    # request's text as the Rust routers extract it, and its routing key header's value.
    text: str | None = None
    routing_key: str | None = None


NO_ROUTING_INPUT = RoutingInput(None, "none")


@dataclass(frozen=True, slots=True)
class Selection:
    worker: WorkerView
    zone: int | None = None
    band_size: int | None = None
    rank: int | None = None
    similarity: float | None = None
    # Zones the eldr load bound excluded that rank above the choice (gateway.eldr.band).
    load_skipped: int = 0
    # Set by policies that track what is in flight per worker (eldr's step-cost decision):
    # dispatch calls it once when the chosen worker's leg ends, on every exit path.
    release: Callable[[], None] | None = None


@runtime_checkable
class Policy(Protocol):
    name: str
    needs_signature: bool  # dispatch resolves a signature only when True
    needs_request: bool  # dispatch fills RoutingInput.text / .routing_key only when True

    def select(self, candidates: Sequence[WorkerView], routing: RoutingInput) -> Selection: ...

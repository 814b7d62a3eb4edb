"""The narrow, pure policy interface every routing policy implements.

A policy gets the AVAILABLE candidate workers (healthy, circuit not open; never empty) and a small
routing input, and returns a `Selection`. It does no I/O and raises nothing HTTP, so it can be unit
tested with plain objects. Dispatch resolves a signature only for policies with
`needs_signature = True`. Contract: docs/ARCHITECTURE.md, "gateway/".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True, slots=True)
class WorkerView:
    """An available worker as a policy sees it (a snapshot, immutable)."""

    worker_id: str  # stable id (the URL unless the operator named it)
    url: str
    in_flight: int  # gateway-counted in-flight requests
    reported_load: int | None  # worker-reported num_total_tokens; None when unknown/stale


@dataclass(frozen=True, slots=True)
class RoutingInput:
    signature: np.ndarray | None  # unit float32 vector in the active zone table's space
    signature_source: str  # "prefill" | "cache" | "predictor" | "none"


NO_ROUTING_INPUT = RoutingInput(None, "none")


@dataclass(frozen=True, slots=True)
class Selection:
    worker: WorkerView
    zone: int | None = None
    band_size: int | None = None
    rank: int | None = None
    similarity: float | None = None


@runtime_checkable
class Policy(Protocol):
    name: str
    needs_signature: bool  # dispatch resolves a signature only when True

    def select(self, candidates: Sequence[WorkerView], routing: RoutingInput) -> Selection: ...

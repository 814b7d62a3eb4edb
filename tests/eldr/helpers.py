"""Small real zone tables for the ELDR tests, built with zones' own API (no hand-made JSON)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from gateway.routing import WorkerView
from zones.geometry import ModelGeometry
from zones.signature import SignatureSpec
from zones.table import ZoneTable, make_table

TINY = ModelGeometry("tiny", num_layers=1, num_experts=3, top_k=1)


def tiny_spec(geometry: ModelGeometry = TINY) -> SignatureSpec:
    """IDF of ones and every layer kept: a signature is the normalised count vector."""
    return SignatureSpec(
        geometry,
        np.ones((geometry.num_layers, geometry.num_experts), dtype=np.float32),
        np.ones(geometry.num_layers, dtype=bool),
    )


def unit(v: Sequence[float]) -> npt.NDArray[np.float32]:
    a = np.asarray(v, dtype=np.float32)
    return a / np.float32(np.linalg.norm(a))


def table(
    centroids: Sequence[Sequence[float]],
    workers: Sequence[str],
    *,
    tau: float = 0.1,
    min_candidates: int = 2,
    geometry: ModelGeometry = TINY,
    provenance: dict[str, object] | None = None,
) -> ZoneTable:
    rows = np.stack([unit(c) for c in centroids])
    return make_table(
        tiny_spec(geometry), rows, list(workers), tau=tau, min_candidates=min_candidates,
        provenance=provenance,
    )


def view(worker_id: str, in_flight: int = 0, url: str | None = None) -> WorkerView:
    return WorkerView(worker_id, url or f"http://{worker_id}:8000", in_flight, None)

"""Small builders shared by the zones tests."""

from __future__ import annotations

import numpy as np

from zones.geometry import ModelGeometry
from zones.signature import SignatureSpec, idf_weights
from zones.table import ZoneTable, make_table

SMALL = ModelGeometry("tiny", num_layers=4, num_experts=8, top_k=2)


def random_counts(n: int, geometry: ModelGeometry = SMALL, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.poisson(1.0, size=(n, geometry.num_layers, geometry.num_experts)).astype(np.int32)


def small_table(k: int = 3, seed: int = 0, **kwargs: object) -> ZoneTable:
    counts = random_counts(20, seed=seed)
    spec = SignatureSpec(SMALL, idf_weights(counts), np.array([True, False, True, True]))
    sigs, _ = spec.build_many(counts)
    return make_table(spec, sigs[:k], [f"http://decode-{i}:30000" for i in range(k)], **kwargs)  # type: ignore[arg-type]


def clustered_counts(
    n: int, groups: int, geometry: ModelGeometry = SMALL, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt counts, decode counts, group) where each group prefers its own experts."""
    rng = np.random.default_rng(seed)
    layers, experts = geometry.num_layers, geometry.num_experts
    # Fixed per-group preferences (independent of `seed`, so refits see the same groups).
    prefs = np.random.default_rng(1234).random((groups, layers, experts)) ** 4 * 6
    group = rng.integers(0, groups, size=n)
    prompt = rng.poisson(prefs[group] + 0.2).astype(np.int32)
    decode = rng.poisson(prefs[group] + 0.2).astype(np.int32)
    return prompt, decode, group

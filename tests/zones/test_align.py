"""Refit and align: zone -> worker identity survives refits and pool changes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from zones.align import match_zones, refit
from zones.fit import FitOptions, fit_zones
from zones.inputs import CalibrationSet

from .helpers import SMALL, clustered_counts


def _calib(n: int, seed: int) -> CalibrationSet:
    prompt, decode, _ = clustered_counts(n, groups=4, seed=seed)
    return CalibrationSet(SMALL, prompt, decode)


def test_match_zones_recovers_a_permutation() -> None:
    rng = np.random.default_rng(0)
    old = rng.standard_normal((6, 10))
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    perm = rng.permutation(6)
    new = old[perm] + 0.05 * rng.standard_normal((6, 10))
    match = match_zones(old, new)
    np.testing.assert_array_equal(perm[match], np.arange(6))
    # Fewer new than old: every new row used once, the rest unmatched.
    short = match_zones(old, new[:4])
    assert sorted(short[short >= 0].tolist()) == [0, 1, 2, 3] and (short < 0).sum() == 2


def _nearest_old(old: np.ndarray, new: np.ndarray) -> list[int]:
    return np.argmax(new @ old.T, axis=1).tolist()


def test_refit_same_pool_keeps_identity() -> None:
    workers = ["a", "b", "c", "d"]
    old, _ = fit_zones(_calib(200, seed=1), workers, FitOptions(seed=0, use_mask=False))
    # New traffic sample and a different k-means seed: the raw zone order is arbitrary.
    new = refit(old, _calib(200, seed=2), None, FitOptions(seed=5, use_mask=False))
    assert new.workers == old.workers
    assert _nearest_old(old.centroids, new.centroids) == [0, 1, 2, 3]
    assert new.fit_stats["kept_workers"] == 4 and new.fit_stats["aligned_to"] == old.checksum
    assert new.fit_stats["alignment_cosine_mean"] > 0.9
    sizes = new.fit_stats["zone_sizes"]
    assert max(sizes) - min(sizes) <= 1


def test_refit_with_changed_mask_compares_in_old_space() -> None:
    old, _ = fit_zones(_calib(200, seed=1), ["a", "b", "c", "d"], FitOptions(use_mask=False))
    new = refit(old, _calib(200, seed=3), None, FitOptions(seed=1, use_mask=True))
    assert new.fit_stats["alignment_cosine_mean"] > 0.8
    # Re-express old centroids in the new space via the new table's own assignment.
    calib = _calib(200, seed=3)
    old_sigs, _ = old.spec.build_many(calib.signature_counts)
    new_sigs, _ = new.spec.build_many(calib.signature_counts)
    old_zone = np.argmax(old_sigs @ old.centroids.T, axis=1)
    new_zone = np.argmax(new_sigs @ new.centroids.T, axis=1)
    assert np.mean(old_zone == new_zone) > 0.8


def test_add_and_remove_workers() -> None:
    old, _ = fit_zones(_calib(240, seed=1), ["a", "b", "c", "d"], FitOptions(use_mask=False))
    grown = refit(old, _calib(240, seed=2), ["a", "b", "c", "d", "e"], FitOptions(use_mask=False))
    assert grown.workers == ("a", "b", "c", "d", "e")
    assert grown.fit_stats["added_workers"] == ["e"] and grown.fit_stats["kept_workers"] == 4
    sizes = grown.fit_stats["zone_sizes"]
    assert len(sizes) == 5 and max(sizes) - min(sizes) <= 1
    shrunk = refit(old, _calib(240, seed=2), ["d", "a", "b"], FitOptions(use_mask=False))
    assert shrunk.workers == ("d", "a", "b")
    assert shrunk.fit_stats["removed_workers"] == ["c"]
    # Survivors get the optimal matching: no other injective choice of zones for them has a
    # higher total cosine to their old centroids (brute force over all choices).
    for table in (grown, shrunk):
        kept = [w for w in table.workers if w in old.workers]
        sim = np.array(
            [
                [float(c @ old.centroids[old.workers.index(w)]) for c in table.centroids]
                for w in kept
            ]
        )
        chosen = sum(sim[i, table.workers.index(w)] for i, w in enumerate(kept))
        best = max(
            sum(sim[i, z] for i, z in enumerate(choice))
            for choice in itertools.permutations(range(len(table.workers)), len(kept))
        )
        assert chosen == pytest.approx(best, abs=1e-6)

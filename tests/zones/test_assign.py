"""Balanced assignment: exact optimum, scalable heuristic's gap, hard balance constraint."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from zones.assign import (
    AssignmentError,
    exact_assign,
    is_balanced,
    scalable_assign,
    total_similarity,
)


def _problem(n: int, k: int, seed: int, d: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = x[rng.choice(n, size=k, replace=False)]
    return (x @ c.T).astype(np.float32)


def _brute_force(sim: np.ndarray) -> float:
    n, k = sim.shape
    best = -np.inf
    for labels in itertools.product(range(k), repeat=n):
        if is_balanced(np.array(labels), k):
            best = max(best, total_similarity(sim, labels))
    return best


@pytest.mark.parametrize(("n", "k", "seed"), [(6, 2, 0), (7, 3, 1), (8, 3, 2), (7, 2, 3)])
def test_exact_matches_brute_force(n: int, k: int, seed: int) -> None:
    sim = _problem(n, k, seed)
    labels = exact_assign(sim)
    assert is_balanced(labels, k)
    assert total_similarity(sim, labels) == pytest.approx(_brute_force(sim), abs=1e-5)


@pytest.mark.parametrize(
    ("n", "k"), [(100, 7), (101, 7), (500, 4), (999, 16), (1000, 16), (1500, 64), (64, 64)]
)
def test_sizes_differ_by_at_most_one(n: int, k: int) -> None:
    sim = _problem(n, k, seed=n + k)
    for labels in (exact_assign(sim), scalable_assign(sim)):
        sizes = np.bincount(labels, minlength=k)
        assert sizes.max() - sizes.min() <= 1
        assert sizes.sum() == n
        assert set(sizes.tolist()) <= {n // k, n // k + (1 if n % k else 0)}


def test_scalable_is_near_exact() -> None:
    """Measured gap on problems both solve: cost sum(1 - cos) within 0.5% of the optimum."""
    gaps = []
    for seed, (n, k) in enumerate([(300, 4), (800, 8), (1200, 16), (1000, 32)]):
        sim = _problem(n, k, seed)
        exact = total_similarity(sim, exact_assign(sim))
        scal = total_similarity(sim, scalable_assign(sim))
        assert scal <= exact + 1e-4  # the exact one is optimal
        gaps.append((exact - scal) / (n - exact))
    print("relative cost gap scalable vs exact:", [f"{g:.4%}" for g in gaps])
    assert max(gaps) < 0.005


def test_skewed_preferences_still_balanced() -> None:
    """Everyone prefers zone 0: the constraint, not the preference, decides sizes."""
    rng = np.random.default_rng(0)
    sim = rng.random((303, 5)).astype(np.float32) * 0.1
    sim[:, 0] += 1.0
    for labels in (exact_assign(sim), scalable_assign(sim)):
        assert is_balanced(labels, 5)


def test_bad_inputs() -> None:
    with pytest.raises(AssignmentError, match="at least one point per zone"):
        scalable_assign(np.zeros((2, 3)))
    with pytest.raises(AssignmentError, match="NaN"):
        exact_assign(np.full((4, 2), np.nan))
    with pytest.raises(AssignmentError, match=r"\[N, K\]"):
        exact_assign(np.zeros(4))

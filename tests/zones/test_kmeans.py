"""Balanced spherical k-means: balance, recovery of clear clusters, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from zones.kmeans import KMeansError, balanced_spherical_kmeans


def _clusters(
    n: int, k: int, d: int, seed: int, noise: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d))
    truth = rng.integers(0, k, size=n)
    x = centres[truth] + noise * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), truth


def _purity(labels: np.ndarray, truth: np.ndarray) -> float:
    table = np.zeros((labels.max() + 1, truth.max() + 1), int)
    np.add.at(table, (labels, truth), 1)
    return table.max(axis=1).sum() / len(labels)


@pytest.mark.parametrize(("n", "k", "exact_max"), [(203, 5, 2000), (3001, 8, 1000)])
def test_balanced_and_recovers_clusters(n: int, k: int, exact_max: int) -> None:
    x, truth = _clusters(n, k, 32, seed=n)
    res = balanced_spherical_kmeans(x, k, seed=0, exact_max_points=exact_max, warm_sample=2000)
    sizes = np.bincount(res.labels, minlength=k)
    assert sizes.max() - sizes.min() <= 1
    assert res.assigner == ("exact" if n <= exact_max else "scalable")
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, atol=1e-5)
    # Ground-truth clusters are unequal in size, so balance forces a few mixed members.
    assert _purity(res.labels, truth) > 0.8
    # Inertia is the cost of the returned labels against the returned centroids.
    cos = np.einsum("nd,nd->n", x, res.centroids[res.labels])
    assert res.inertia == pytest.approx(float((1 - cos).sum()), rel=1e-4)


def test_deterministic_for_a_seed() -> None:
    x, _ = _clusters(400, 6, 16, seed=1, noise=1.0)
    a = balanced_spherical_kmeans(x, 6, seed=7)
    b = balanced_spherical_kmeans(x, 6, seed=7)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)


def test_bad_inputs() -> None:
    x, _ = _clusters(10, 2, 4, seed=0)
    with pytest.raises(KMeansError, match="1 <= K <= N"):
        balanced_spherical_kmeans(x, 11, seed=0)
    with pytest.raises(KMeansError, match="unit rows"):
        balanced_spherical_kmeans(x * 3, 2, seed=0)
    with pytest.raises(KMeansError, match=r"\[N, D\]"):
        balanced_spherical_kmeans(x[0], 1, seed=0)

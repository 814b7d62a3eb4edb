"""Balanced spherical k-means: unit vectors, cosine cost, every cluster of size N//K or N//K + 1.

Lloyd iterations where the assignment step is the balanced assignment of `zones.assign`
(exact for small N, scalable for large N) and the update step is the normalised member sum
(the spherical k-means centroid). k-means++ seeding with the D^2 weighting of the chordal
distance (||x - c||^2 = 2 - 2 cos for unit vectors).

Scale (benchmarks/zones_fit.py: 100,000 x 6,144 into 64 zones): similarities are chunked
float32 GEMMs (N x K result only, never N x N), the update is a sparse one-hot product, and
large inputs first converge on a seeded subsample (`warm_sample`) so that only a few
iterations touch all N rows. k-means++ runs on a subsample too: it is K sequential passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from zones.assign import exact_assign, scalable_assign

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
Progress = Callable[[str, int, int], None]  # (stage, step, total)

_CHUNK = 8192  # rows per GEMM chunk: bounds temporaries to CHUNK x K


class KMeansError(ValueError):
    """Input to k-means is malformed (shape, non-unit rows, K out of range)."""


@dataclass(frozen=True)
class KMeansResult:
    centroids: FloatArray  # [K, D] unit rows
    labels: IntArray  # [N]
    inertia: float  # sum over points of (1 - cos(point, its returned centroid))
    iterations: int  # full-data iterations
    warm_iterations: int  # subsample iterations before them
    converged: bool
    assigner: str  # "exact" or "scalable"


def similarities(x: np.ndarray, centroids: np.ndarray) -> FloatArray:
    """x @ centroids.T in row chunks (float32)."""
    out = np.empty((x.shape[0], centroids.shape[0]), dtype=np.float32)
    ct = np.ascontiguousarray(centroids.T, dtype=np.float32)
    for start in range(0, x.shape[0], _CHUNK):
        out[start : start + _CHUNK] = x[start : start + _CHUNK] @ ct
    return out


def update_centroids(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[FloatArray, float]:
    """(normalised member sums, inertia of `labels` against them).

    A zone whose members sum to zero gets a zero row (the caller keeps its old centroid).
    With c_k = sum_k / ||sum_k||, sum over members of (1 - x . c_k) = n_k - ||sum_k||, so the
    inertia against the NEW centroids is N - sum_k ||sum_k|| at no extra cost.
    """
    from scipy.sparse import csr_matrix

    n = x.shape[0]
    onehot = csr_matrix(
        (np.ones(n, dtype=np.float32), (labels, np.arange(n))), shape=(k, n), dtype=np.float32
    )
    sums = np.asarray(onehot @ x, dtype=np.float32)
    norms = np.sqrt(np.einsum("kd,kd->k", sums, sums))
    nz = norms > 0
    sums[nz] /= norms[nz, None]
    return sums, float(n - norms.astype(np.float64).sum())


def kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> FloatArray:
    """k-means++ seeding on the rows of x (cosine geometry)."""
    n = x.shape[0]
    first = int(rng.integers(n))
    centers = [first]
    best = x @ x[first]  # max similarity to any chosen center
    for _ in range(1, k):
        weight = np.clip(2.0 - 2.0 * best.astype(np.float64), 0.0, None)
        total = weight.sum()
        if total <= 0:  # all remaining points coincide with centers: pick unchosen ones
            remaining = np.setdiff1d(np.arange(n), centers)
            nxt = int(rng.choice(remaining))
        else:
            nxt = int(rng.choice(n, p=weight / total))
        centers.append(nxt)
        np.maximum(best, x @ x[nxt], out=best)
    return np.ascontiguousarray(x[centers], dtype=np.float32)


def _lloyd(
    x: np.ndarray,
    centroids: FloatArray,
    assign: Callable[[np.ndarray], IntArray],
    max_iter: int,
    tol: float,
    progress: Progress | None,
    stage: str,
) -> tuple[FloatArray, IntArray, float, int, bool]:
    k = centroids.shape[0]
    labels = np.full(x.shape[0], -1, dtype=np.int64)
    prev = np.inf
    inertia = np.inf
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        sim = similarities(x, centroids)
        new = assign(sim)
        stable = np.array_equal(new, labels)
        labels = new
        fresh, inertia = update_centroids(x, labels, k)
        empty = ~np.any(fresh != 0, axis=1)
        fresh[empty] = centroids[empty]  # a zone whose members sum to zero keeps its centroid
        centroids = fresh
        if progress:
            progress(stage, it, max_iter)
        if stable or (np.isfinite(prev) and prev - inertia <= tol * max(prev, 1e-12)):
            converged = True
            break
        prev = inertia
    return centroids, labels, inertia, it, converged


def balanced_spherical_kmeans(
    x: npt.ArrayLike,
    k: int,
    *,
    seed: int,
    max_iter: int = 50,
    tol: float = 1e-4,
    exact_max_points: int = 2000,
    warm_sample: int = 20_000,
    init_sample: int = 4096,
    full_max_iter: int | None = None,
    progress: Progress | None = None,
) -> KMeansResult:
    """Fit K balanced spherical clusters to unit rows of x (float32 [N, D]).

    `exact_max_points`: use the exact assignment up to this N, the scalable one above it.
    `warm_sample`: above this N, first run Lloyd on a seeded subsample of that size, then at
    most `full_max_iter` (default: max_iter) iterations on all rows.
    """
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise KMeansError(f"signatures must be [N, D], got {arr.shape}")
    n = arr.shape[0]
    if not 1 <= k <= n:
        raise KMeansError(f"K={k} zones needs 1 <= K <= N={n} signatures")
    xs = np.ascontiguousarray(arr, dtype=np.float32)
    norms = np.sqrt(np.einsum("nd,nd->n", xs[: min(n, 4096)], xs[: min(n, 4096)]))
    if not np.all(np.isfinite(norms)) or np.any(np.abs(norms - 1.0) > 1e-3):
        raise KMeansError("signatures must be finite unit rows")
    rng = np.random.default_rng(seed)

    def make_assign(points: int) -> Callable[[np.ndarray], IntArray]:
        if points <= exact_max_points:
            return exact_assign
        return scalable_assign

    pool = np.sort(rng.choice(n, size=min(n, init_sample), replace=False))
    centroids = kmeans_pp(xs[pool], k, rng)
    warm_iters = 0
    if n > warm_sample:
        sub = xs[np.sort(rng.choice(n, size=warm_sample, replace=False))]
        centroids, _, _, warm_iters, _ = _lloyd(
            sub, centroids, make_assign(len(sub)), max_iter, tol, progress, "warm-start"
        )
    centroids, labels, inertia, iters, converged = _lloyd(
        xs, centroids, make_assign(n), full_max_iter or max_iter, tol, progress, "k-means"
    )
    return KMeansResult(
        centroids=centroids,
        labels=labels,
        inertia=inertia,
        iterations=iters,
        warm_iterations=warm_iters,
        converged=converged,
        assigner="exact" if n <= exact_max_points else "scalable",
    )

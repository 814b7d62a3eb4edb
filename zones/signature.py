"""Expert signatures: count matrices -> IDF-weighted, layer-masked, unit float32 vectors.

This is the only signature implementation in the project: `zones fit` builds calibration
signatures with it and the gateway builds per-request signatures with it, so the two can never
drift apart. The pipeline (DESIGN.md, "The algorithm"; ELDR arXiv 2607.00466):

1. counts `[L, E]`: how many prompt tokens the model's router sent to each (layer, expert);
2. multiply by IDF weights `w = log((N + 1) / (df + 1))`, df = calibration requests that used
   the expert at that layer, so experts every request uses carry no locality information;
3. keep only the layers in the mask (chosen greedily to maximise rho, see `greedy_layer_mask`);
4. L2-normalise the whole concatenated vector (one global norm, not per layer, so layers with
   more routing mass keep their weight), as float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from zones.geometry import ModelGeometry

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


class SignatureError(ValueError):
    """Counts or signature parameters do not match the geometry they are used with."""


@dataclass(frozen=True, eq=False)
class SignatureSpec:
    """How to turn a count matrix into a signature: geometry, IDF weights and layer mask."""

    geometry: ModelGeometry
    idf: FloatArray  # float32 [L, E], finite, >= 0
    layer_mask: BoolArray  # bool [L], at least one True
    # Derived once so that `build` is a gather + multiply + norm (it runs per request).
    _weights: FloatArray = field(init=False, repr=False)
    _dim: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        g = self.geometry
        idf = np.asarray(self.idf)
        mask = np.asarray(self.layer_mask)
        if idf.shape != (g.num_layers, g.num_experts):
            raise SignatureError(
                f"idf shape {idf.shape} does not match geometry [{g.num_layers}, {g.num_experts}]"
            )
        if not np.all(np.isfinite(idf)) or np.any(idf < 0):
            raise SignatureError("idf must be finite and non-negative")
        if mask.shape != (g.num_layers,) or mask.dtype != np.bool_:
            raise SignatureError(
                f"layer_mask must be bool [{g.num_layers}], got {mask.dtype} {mask.shape}"
            )
        if not mask.any():
            raise SignatureError("layer_mask selects no layer")
        idf = np.ascontiguousarray(idf, dtype=np.float32)
        mask = np.ascontiguousarray(mask)
        idf.setflags(write=False)
        mask.setflags(write=False)
        object.__setattr__(self, "idf", idf)
        object.__setattr__(self, "layer_mask", mask)
        weights = np.ascontiguousarray(idf[mask].ravel())
        weights.setflags(write=False)
        object.__setattr__(self, "_weights", weights)
        object.__setattr__(self, "_dim", int(weights.size))

    @property
    def dim(self) -> int:
        """Signature length D = masked layers x experts."""
        return self._dim

    def _check_counts(self, counts: np.ndarray, batched: bool) -> None:
        g = self.geometry
        expected = (g.num_layers, g.num_experts)
        shape = counts.shape[1:] if batched else counts.shape
        if counts.ndim != (3 if batched else 2) or shape != expected:
            want = "[N, L, E]" if batched else "[L, E]"
            raise SignatureError(
                f"counts shaped {counts.shape}, expected {want} with [L, E]={expected}"
            )

    def build(self, counts: npt.ArrayLike) -> FloatArray | None:
        """Signature of one request's `[L, E]` counts; None when nothing masked was routed."""
        arr = np.asarray(counts)
        self._check_counts(arr, batched=False)
        vec = arr[self.layer_mask].ravel().astype(np.float32) * self._weights
        norm = float(np.sqrt(np.dot(vec, vec)))
        if not np.isfinite(norm) or norm == 0.0:
            return None
        vec /= norm
        return vec

    def build_many(self, counts: npt.ArrayLike) -> tuple[FloatArray, BoolArray]:
        """Signatures of `[N, L, E]` counts: (float32 [N, D], valid bool [N]).

        Rows with no masked routing mass are zero vectors and marked invalid.
        """
        arr = np.asarray(counts)
        self._check_counts(arr, batched=True)
        n = arr.shape[0]
        out = arr[:, self.layer_mask, :].reshape(n, -1).astype(np.float32) * self._weights
        norms = np.sqrt(np.einsum("nd,nd->n", out, out))
        valid = np.isfinite(norms) & (norms > 0)
        out[valid] /= norms[valid, None]
        out[~valid] = 0.0
        return out, valid


def idf_weights(counts: npt.ArrayLike) -> FloatArray:
    """IDF `log((N + 1) / (df + 1))` per (layer, expert) from calibration counts `[N, L, E]`.

    The +1 smoothing keeps weights finite for experts no calibration request used and
    makes an expert that every request used weigh exactly zero.
    """
    arr = np.asarray(counts)
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise SignatureError(f"calibration counts must be [N>0, L, E], got {arr.shape}")
    n = arr.shape[0]
    df = np.count_nonzero(arr > 0, axis=0)
    return np.log((n + 1.0) / (df + 1.0)).astype(np.float32)


def _cosine_distances(a: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """1 - cosine between rows pairs[:,0] and pairs[:,1] of `a` [N, D] (zero rows: distance 1)."""
    norms = np.sqrt(np.einsum("nd,nd->n", a, a))
    safe = np.where(norms > 0, norms, 1.0)
    unit = a / safe[:, None]
    dots = np.einsum("pd,pd->p", unit[pairs[:, 0]], unit[pairs[:, 1]])
    return 1.0 - dots


def sample_pairs(n: int, max_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """Distinct unordered index pairs (i < j): all of them when few, else a seeded sample."""
    if n < 2:
        raise SignatureError(f"need at least 2 requests to sample pairs, got {n}")
    total = n * (n - 1) // 2
    if total <= max_pairs:
        i, j = np.triu_indices(n, k=1)
        return np.stack([i, j], axis=1)
    i = rng.integers(0, n, size=max_pairs)
    j = rng.integers(0, n - 1, size=max_pairs)
    j = np.where(j >= i, j + 1, j)  # uniform over j != i
    return np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); 0 when either side is constant."""
    from scipy.stats import rankdata  # offline-only dependency; the gateway never calls this

    rx = rankdata(x)
    ry = rankdata(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = float(np.sqrt(np.dot(rx, rx) * np.dot(ry, ry)))
    return 0.0 if denom == 0.0 else float(np.dot(rx, ry) / denom)


@dataclass(frozen=True)
class MaskSearch:
    """Result of the greedy layer-mask search."""

    layer_mask: BoolArray
    rho: float  # rho of the chosen mask on the sampled pairs
    rho_all_layers: float  # rho with every layer kept, for comparison
    trace: tuple[tuple[int, float], ...]  # (layer added, rho after adding it), in order
    num_pairs: int


def greedy_layer_mask(
    prompt_counts: npt.ArrayLike,
    decode_counts: npt.ArrayLike,
    idf: npt.ArrayLike,
    *,
    seed: int,
    max_pairs: int = 20_000,
    progress: Callable[[str, int, int], None] | None = None,
) -> MaskSearch:
    """Greedy forward selection of layers maximising rho.

    rho = Spearman correlation, over sampled request pairs, between the cosine distance of the
    signatures (prompt counts, IDF-weighted, masked) and the cosine distance of decode-time expert
    usage (decode counts over all layers: what the decode step actually streams). Layers are
    added one at a time, each time the one that raises rho most; the search stops when no
    layer raises it.

    Cosine of a masked, globally normalised vector decomposes per layer, so per-pair per-layer
    dot products and per-request per-layer squared norms are computed once and every candidate
    mask is scored with sums over layers (O(pairs x L) per candidate, no rebuilds).
    """
    p = np.asarray(prompt_counts, dtype=np.float32)
    d = np.asarray(decode_counts, dtype=np.float32)
    w = np.asarray(idf, dtype=np.float32)
    if p.ndim != 3 or d.shape != p.shape or w.shape != p.shape[1:]:
        raise SignatureError(
            f"prompt counts {p.shape}, decode counts {d.shape} and idf {w.shape} must be "
            "[N, L, E], [N, L, E] and [L, E]"
        )
    n, num_layers, _ = p.shape
    rng = np.random.default_rng(seed)
    pairs = sample_pairs(n, max_pairs, rng)
    target = _cosine_distances(d.reshape(n, -1), pairs)

    weighted = p * w[None]
    sq_norms = np.einsum("nle,nle->nl", weighted, weighted).astype(np.float64)  # [N, L]
    layer_dots = np.empty((len(pairs), num_layers), dtype=np.float64)
    chunk = 4096
    for start in range(0, len(pairs), chunk):
        sel = pairs[start : start + chunk]
        layer_dots[start : start + chunk] = np.einsum(
            "ple,ple->pl", weighted[sel[:, 0]], weighted[sel[:, 1]]
        )

    def rho_of(mask: np.ndarray) -> float:
        dots = layer_dots[:, mask].sum(axis=1)
        na = sq_norms[pairs[:, 0]][:, mask].sum(axis=1)
        nb = sq_norms[pairs[:, 1]][:, mask].sum(axis=1)
        denom = np.sqrt(na * nb)
        cos = np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)
        return spearman(1.0 - cos, target)

    mask = np.zeros(num_layers, dtype=bool)
    best = -np.inf
    trace: list[tuple[int, float]] = []
    while not mask.all():
        scores = []
        for layer in np.flatnonzero(~mask):
            trial = mask.copy()
            trial[layer] = True
            scores.append((rho_of(trial), -int(layer)))  # ties: lowest layer index
        score, neg_layer = max(scores)
        if score <= best:
            break
        mask[-neg_layer] = True
        best = score
        trace.append((-neg_layer, float(score)))
        if progress:
            progress("layer-mask", int(mask.sum()), num_layers)
    rho_all = rho_of(np.ones(num_layers, dtype=bool))
    return MaskSearch(mask, float(best), float(rho_all), tuple(trace), len(pairs))


def signature_rho(
    spec: SignatureSpec,
    signatures: npt.ArrayLike,
    decode_counts: npt.ArrayLike,
    *,
    seed: int,
    max_pairs: int = 20_000,
) -> float:
    """rho of given signatures [N, D] (exact or predicted) against decode usage [N, L, E]."""
    s = np.asarray(signatures, dtype=np.float32)
    d = np.asarray(decode_counts, dtype=np.float32)
    if s.ndim != 2 or s.shape[1] != spec.dim or d.ndim != 3 or d.shape[0] != s.shape[0]:
        raise SignatureError(f"signatures {s.shape} / decode counts {d.shape} do not match")
    pairs = sample_pairs(s.shape[0], max_pairs, np.random.default_rng(seed))
    return spearman(_cosine_distances(s, pairs), _cosine_distances(d.reshape(len(d), -1), pairs))

"""Calibration set -> zone table: IDF, greedy layer mask, balanced k-means, predictor.

Pure core (no files): `fit_spec` and `fit_zones` take a `CalibrationSet` and return a
`SignatureSpec` / `ZoneTable`. Deterministic for a given input and seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from zones.inputs import CalibrationSet
from zones.kmeans import KMeansResult, Progress, balanced_spherical_kmeans
from zones.predictor import Predictor, train_predictor
from zones.signature import MaskSearch, SignatureSpec, greedy_layer_mask, idf_weights
from zones.table import DEFAULT_MIN_CANDIDATES, DEFAULT_TAU, ZoneTable, make_table

TOOL_VERSION = "eldr-zones 0.1.0"


class FitError(ValueError):
    """The calibration data cannot produce the requested table."""


# The load bound new tables carry (gateway.eldr.band): chosen on a tuning seed that no
# evaluation uses (`loadtest compare --quick --seed 100`, workloads trace and task, bounds 1, 2,
# 4 and none, 2026-12-03): 4 had the lowest p99 TPOT on both (-4.8% and -7.7% against
# least_load, vs -4.1% and -6.9% unbounded) for 1-3 points of median TPOT; 1 and 2 gave up
# 3-7 points of median. One seed at 4P+8D: docs/benchmarks.md has the multi-seed evaluation.
DEFAULT_LOAD_BOUND = 4


@dataclass(frozen=True)
class FitOptions:
    seed: int = 0
    tau: float = DEFAULT_TAU
    min_candidates: int = DEFAULT_MIN_CANDIDATES
    load_bound: int | None = DEFAULT_LOAD_BOUND  # the gateway's load bound; None: off
    use_mask: bool = True  # greedy rho layer mask; False keeps every layer
    max_pairs: int = 20_000
    max_iter: int = 50
    exact_max_points: int = 2000
    predictor: bool = True  # train one when the calibration set has prompts
    predictor_buckets: int = 2048
    predictor_rank: int = 32
    predictor_max_words: int = 128
    predictor_ridge: float = 1.0


def fit_spec(
    calib: CalibrationSet, opts: FitOptions, progress: Progress | None = None
) -> tuple[SignatureSpec, MaskSearch | None]:
    """IDF from all calibration requests, then the greedy mask when decode usage is known."""
    if len(calib) < 2:
        raise FitError(f"need at least 2 calibration requests, got {len(calib)}")
    idf = idf_weights(calib.signature_counts)
    search = None
    mask = np.ones(calib.geometry.num_layers, dtype=bool)
    rows = calib.independent_rows()
    if (
        opts.use_mask
        and calib.decode_counts is not None
        and len(rows) >= 2
        and calib.decode_counts[rows].any()
    ):
        # Only prompt-based rows: an output-count signature IS the decode usage it would be
        # scored against, so including it would reward whatever layers it happens to have.
        search = greedy_layer_mask(
            calib.signature_counts[rows],
            calib.decode_counts[rows],
            idf,
            seed=opts.seed,
            max_pairs=opts.max_pairs,
            progress=progress,
        )
        mask = search.layer_mask
    return SignatureSpec(calib.geometry, idf, mask), search


def fit_zones(
    calib: CalibrationSet,
    workers: Sequence[str],
    opts: FitOptions,
    *,
    provenance: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> tuple[ZoneTable, KMeansResult]:
    """Fit a table with one zone per worker (zone k -> workers[k])."""
    k = len(workers)
    if k < 1:
        raise FitError("need at least one decode worker")
    if len(set(workers)) != k:
        raise FitError("workers must be unique")
    spec, search = fit_spec(calib, opts, progress)
    sigs, valid = spec.build_many(calib.signature_counts)
    if int(valid.sum()) < k:
        raise FitError(
            f"only {int(valid.sum())} requests have a non-empty signature, need >= K={k}"
        )
    result = balanced_spherical_kmeans(
        sigs[valid],
        k,
        seed=opts.seed,
        max_iter=opts.max_iter,
        exact_max_points=opts.exact_max_points,
        progress=progress,
    )
    predictor = _train_predictor(calib, sigs, valid, opts)
    sizes = np.bincount(result.labels, minlength=k)
    stats: dict[str, Any] = {
        "num_requests": len(calib),
        "num_signatures": int(valid.sum()),
        "signature_from": calib.signature_from,
        "zone_sizes": sizes.tolist(),
        "inertia": round(result.inertia, 6),
        "mean_cosine_to_centroid": round(1.0 - result.inertia / max(1, int(valid.sum())), 6),
        "iterations": result.iterations,
        "warm_iterations": result.warm_iterations,
        "converged": result.converged,
        "assignment": result.assigner,
        "seed": opts.seed,
    }
    if search is None:
        stats["rho_note"] = (
            "not measured: no prompt-based signatures with decode usage; every layer kept"
            if opts.use_mask
            else "layer mask disabled"
        )
    else:
        stats.update(
            rho=round(search.rho, 6),
            rho_all_layers=round(search.rho_all_layers, 6),
            rho_pairs=search.num_pairs,
            mask_trace=[[layer, round(r, 6)] for layer, r in search.trace],
        )
    table = make_table(
        spec,
        result.centroids,
        list(workers),
        tau=opts.tau,
        min_candidates=opts.min_candidates,
        predictor=predictor,
        fit_stats=stats,
        provenance=dict(provenance or {}),
        load_bound=opts.load_bound,
    )
    return table, result


def _train_predictor(
    calib: CalibrationSet, sigs: np.ndarray, valid: np.ndarray, opts: FitOptions
) -> Predictor | None:
    if not opts.predictor or not calib.has_prompts:
        return None
    texts = calib.texts or [None] * len(calib)
    ids = calib.input_ids or [None] * len(calib)
    keep = [i for i in np.flatnonzero(valid).tolist() if texts[i] or ids[i]]
    if len(keep) < 2:
        return None
    return train_predictor(
        [texts[i] for i in keep],
        [ids[i] for i in keep] if calib.input_ids is not None else None,
        sigs[keep],
        num_buckets=opts.predictor_buckets,
        max_words=opts.predictor_max_words,
        rank=opts.predictor_rank,
        ridge=opts.predictor_ridge,
    )

"""Refit and align: keep zone -> decode worker identity stable across refits and pool changes.

A decode worker's KV and its warm expert working set belong to the requests it has been
serving; if a refit shuffled zone numbers, every worker would change its traffic at once.
So new centroids are matched to old ones by an optimal assignment (Hungarian,
`scipy.optimize.linear_sum_assignment`) on cosine similarity, and each surviving worker keeps
the new zone closest to its old one. Workers added to the pool take the unmatched zones in the
order given; removed workers simply lose their zone (the refit has one zone per new worker).

Similarity is measured in the OLD table's signature space: when the refit changed IDF or the
layer mask, the new zones are re-expressed there as the normalised mean of their members'
old-space signatures, so the comparison is like with like.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from zones.fit import FitError, FitOptions, fit_zones
from zones.inputs import CalibrationSet
from zones.kmeans import Progress, update_centroids
from zones.table import ZoneTable, make_table


def match_zones(old_centroids: np.ndarray, new_centroids: np.ndarray) -> np.ndarray:
    """For each old row, the index of its matched new row (-1 when there are fewer new rows)."""
    sim = np.asarray(old_centroids, np.float64) @ np.asarray(new_centroids, np.float64).T
    rows, cols = linear_sum_assignment(-sim)
    match = np.full(sim.shape[0], -1, dtype=np.int64)
    match[rows] = cols
    return match


def _same_space(a: ZoneTable, spec_b: Any) -> bool:
    return bool(
        np.array_equal(a.spec.layer_mask, spec_b.layer_mask)
        and np.array_equal(a.spec.idf, spec_b.idf)
    )


def refit(
    old: ZoneTable,
    calib: CalibrationSet,
    workers: Sequence[str] | None,
    opts: FitOptions,
    *,
    provenance: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> ZoneTable:
    """Fit on new calibration data for `workers` (default: the old pool), aligned to `old`."""
    g_old, g_new = old.geometry, calib.geometry
    if (g_old.num_layers, g_old.num_experts, g_old.top_k) != (
        g_new.num_layers,
        g_new.num_experts,
        g_new.top_k,
    ):
        raise FitError(f"calibration geometry {g_new} differs from the old table's {g_old}")
    pool = list(old.workers) if workers is None else list(workers)
    fitted, result = fit_zones(calib, pool, opts, provenance=provenance, progress=progress)
    new_c = fitted.centroids
    if not _same_space(old, fitted.spec):
        _, valid = fitted.spec.build_many(calib.signature_counts)
        sigs_old, _ = old.spec.build_many(calib.signature_counts[valid])
        new_c_old_space, _ = update_centroids(sigs_old, result.labels, len(pool))
    else:
        new_c_old_space = new_c

    survivors = [i for i, w in enumerate(old.workers) if w in pool]
    order = np.full(len(pool), -1, dtype=np.int64)  # order[slot in pool] = new zone index
    used: set[int] = set()
    if survivors:
        match = match_zones(old.centroids[survivors], new_c_old_space)
        for old_idx, new_idx in zip(survivors, match.tolist(), strict=True):
            if new_idx >= 0:
                order[pool.index(old.workers[old_idx])] = new_idx
                used.add(new_idx)
    spare = iter(z for z in range(len(pool)) if z not in used)
    for slot in range(len(pool)):
        if order[slot] < 0:
            order[slot] = next(spare)
    sizes = np.asarray(fitted.fit_stats["zone_sizes"])[order].tolist()
    sim_kept = [
        float(old.centroids[i] @ new_c_old_space[order[pool.index(old.workers[i])]])
        for i in survivors
    ]
    stats = dict(fitted.fit_stats)
    stats.update(
        zone_sizes=sizes,
        aligned_to=old.checksum,
        kept_workers=len(survivors),
        added_workers=[w for w in pool if w not in old.workers],
        removed_workers=[w for w in old.workers if w not in pool],
        alignment_cosine_mean=round(float(np.mean(sim_kept)), 6) if sim_kept else None,
    )
    return make_table(
        fitted.spec,
        new_c[order],
        pool,
        tau=opts.tau,
        min_candidates=opts.min_candidates,
        predictor=fitted.predictor,
        fit_stats=stats,
        provenance=fitted.provenance,
        load_bound=opts.load_bound,
    )

"""Cumulative decode-step statistics of one engine, as plain data for /metrics and experiments.

Histograms keep non-cumulative bucket counts with explicit upper bounds (the last bucket is
+Inf); Prometheus exposition wants cumulative `le` buckets, which `cumulative()` gives.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

# Batch sizes: powers of two up to SGLang's usual max-running-requests range.
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def distinct_expert_buckets(num_experts: int) -> tuple[float, ...]:
    """Buckets for 'distinct experts in one layer in one step': fine at the low end, up to E."""
    edges = [1, 2, 4, 6, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 256]
    return (*(float(e) for e in edges if e < num_experts), float(num_experts))


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    upper_bounds: tuple[float, ...]   # finite bounds; one more bucket (+Inf) follows
    counts: tuple[int, ...]           # len(upper_bounds) + 1, non-cumulative
    sum: float
    count: int

    def cumulative(self) -> list[tuple[float, int]]:
        """(le, cumulative count) pairs including (+inf, count), for Prometheus buckets."""
        out, running = [], 0
        for bound, n in zip((*self.upper_bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass(slots=True)
class Histogram:
    upper_bounds: tuple[float, ...]
    counts: npt.NDArray[np.int64] = field(init=False)
    total: float = 0.0
    count: int = 0
    _bounds: npt.NDArray[np.float64] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if list(self.upper_bounds) != sorted(set(self.upper_bounds)):
            raise ValueError("histogram upper_bounds must be strictly increasing")
        # Counts as a numpy array so observe_many is one searchsorted + one bincount (a decode
        # step observes one value per MoE layer; a Python loop over np.unique's output cost
        # ~5x more per step).
        self.counts = np.zeros(len(self.upper_bounds) + 1, dtype=np.int64)
        self._bounds = np.asarray(self.upper_bounds, dtype=np.float64)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.upper_bounds, value)] += 1
        self.total += value
        self.count += 1

    def observe_many(self, values: Sequence[float] | npt.NDArray[np.number]) -> None:
        arr = np.asarray(values, dtype=np.float64).ravel()
        idx = np.searchsorted(self._bounds, arr, side="left")
        self.counts += np.bincount(idx, minlength=len(self.counts))
        self.total += float(arr.sum())
        self.count += int(arr.size)

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.upper_bounds, tuple(int(c) for c in self.counts),
                                 self.total, self.count)

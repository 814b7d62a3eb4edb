"""Histogram bookkeeping behind the engine's /metrics histograms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadtest.emulator.stats import Histogram, distinct_expert_buckets


def test_buckets_are_upper_inclusive_and_cumulative_ends_at_count():
    h = Histogram((1.0, 2.0, 4.0))
    for v in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 9.0):
        h.observe(v)
    snap = h.snapshot()
    assert snap.counts == (2, 2, 2, 1)            # le=1: 0.5,1.0  le=2: 1.5,2.0  le=4: 3,4  +Inf: 9
    assert snap.cumulative() == [(1.0, 2), (2.0, 4), (4.0, 6), (math.inf, 7)]
    assert snap.count == 7 and snap.sum == pytest.approx(21.0)


def test_observe_many_matches_observe():
    values = np.array([0, 1, 1, 2, 7, 8, 8, 8, 100, 128], dtype=np.int32)
    one, many = Histogram((1.0, 8.0, 64.0)), Histogram((1.0, 8.0, 64.0))
    for v in values:
        one.observe(float(v))
    many.observe_many(values)
    assert one.snapshot() == many.snapshot()


def test_snapshot_is_a_copy():
    h = Histogram((1.0,))
    snap = h.snapshot()
    h.observe(0.5)
    assert snap.count == 0 and h.snapshot().count == 1


def test_distinct_expert_buckets_end_at_the_expert_count():
    assert distinct_expert_buckets(64)[-1] == 64.0
    assert distinct_expert_buckets(128)[-1] == 128.0
    assert distinct_expert_buckets(6) == (1.0, 2.0, 4.0, 6.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram((2.0, 1.0))

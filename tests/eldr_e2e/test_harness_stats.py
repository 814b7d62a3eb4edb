"""The statistics the end-to-end assertions rest on, against cases worked by hand."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.eldr_e2e.harness import (
    batch_adjusted_distinct,
    chance_majority_share,
    mean_majority_share,
)


def test_batch_adjustment_is_exact_for_independent_uniform_requests() -> None:
    # Each request touches 8 of 128 experts at random: a batch of b touches 128(1 - (120/128)^b).
    def uniform(b: float) -> float:
        return 128 * (1 - (120 / 128) ** b)

    assert batch_adjusted_distinct(uniform(4), 4, 6, 128) == pytest.approx(uniform(6))
    assert batch_adjusted_distinct(uniform(4), 4, 3.5, 128) == pytest.approx(uniform(3.5))
    assert batch_adjusted_distinct(20.0, 3.7, 3.7, 128) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="distinct"):
        batch_adjusted_distinct(0.0, 4, 4, 128)


def test_mean_majority_share_weights_domains_by_requests() -> None:
    per_domain = {"a": Counter({"w0": 6, "w1": 2}), "b": Counter({"w1": 1, "w2": 1})}
    assert mean_majority_share(per_domain) == pytest.approx((6 + 1) / 10)


def test_chance_share_matches_the_uniform_null() -> None:
    # One worker: every request lands on it. Two workers, one request per domain: share 1.
    assert chance_majority_share([10, 10], 1, 0.5) == 1.0
    assert chance_majority_share([1, 1, 1], 2, 0.5) == 1.0
    # Many requests spread evenly: the majority share approaches 1/workers from above.
    q = chance_majority_share([4000], 4, 0.999, trials=200)
    assert 0.25 < q < 0.28

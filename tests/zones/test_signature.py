"""Signature pipeline: IDF, build/build_many, greedy rho layer mask."""

from __future__ import annotations

import numpy as np
import pytest

from zones.geometry import ModelGeometry
from zones.signature import (
    SignatureError,
    SignatureSpec,
    greedy_layer_mask,
    idf_weights,
    sample_pairs,
    signature_rho,
    spearman,
)

from .helpers import SMALL, random_counts


def test_idf_formula() -> None:
    counts = np.zeros((4, 1, 3), np.int32)
    counts[:, 0, 0] = 1  # used by all 4 requests
    counts[0, 0, 1] = 5  # used by one
    idf = idf_weights(counts)
    np.testing.assert_allclose(idf[0], np.log(np.array([5 / 5, 5 / 2, 5 / 1])), rtol=1e-6)


def test_build_is_masked_weighted_unit_float32() -> None:
    counts = random_counts(10)
    mask = np.array([True, False, True, False])
    spec = SignatureSpec(SMALL, idf_weights(counts), mask)
    sig = spec.build(counts[3])
    assert sig is not None and sig.dtype == np.float32 and sig.shape == (spec.dim,)
    assert spec.dim == 2 * SMALL.num_experts
    expected = (counts[3][mask] * spec.idf[mask]).ravel()
    np.testing.assert_allclose(sig, expected / np.linalg.norm(expected), rtol=1e-5)


def test_build_many_matches_build_and_flags_empty_rows() -> None:
    counts = random_counts(6)
    counts[2] = 0
    spec = SignatureSpec(SMALL, idf_weights(counts), np.ones(4, bool))
    sigs, valid = spec.build_many(counts)
    assert valid.tolist() == [True, True, False, True, True, True]
    assert spec.build(counts[2]) is None
    for i in (0, 5):
        one = spec.build(counts[i])
        assert one is not None
        np.testing.assert_allclose(sigs[i], one, rtol=1e-6)


def test_counts_outside_the_mask_only_give_none() -> None:
    spec = SignatureSpec(SMALL, np.ones((4, 8), np.float32), np.array([True, False, False, False]))
    counts = np.zeros((4, 8), np.int32)
    counts[1, 3] = 7
    assert spec.build(counts) is None


@pytest.mark.parametrize(
    ("idf", "mask", "message"),
    [
        (np.ones((4, 7), np.float32), np.ones(4, bool), "idf shape"),
        (np.full((4, 8), np.nan, np.float32), np.ones(4, bool), "idf must be finite"),
        (np.ones((4, 8), np.float32), np.ones(3, bool), "layer_mask must be bool"),
        (np.ones((4, 8), np.float32), np.zeros(4, bool), "selects no layer"),
    ],
)
def test_spec_rejects_bad_parameters(idf: np.ndarray, mask: np.ndarray, message: str) -> None:
    with pytest.raises(SignatureError, match=message):
        SignatureSpec(SMALL, idf, mask)


def test_build_rejects_wrong_shape() -> None:
    spec = SignatureSpec(SMALL, np.ones((4, 8), np.float32), np.ones(4, bool))
    with pytest.raises(SignatureError, match="counts shaped"):
        spec.build(np.ones((4, 9)))
    with pytest.raises(SignatureError, match="counts shaped"):
        spec.build_many(np.ones((4, 8)))


def test_spearman_and_pairs() -> None:
    x = np.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, np.ones(10)) == 0.0
    rng = np.random.default_rng(0)
    assert len(sample_pairs(5, 100, rng)) == 10
    pairs = sample_pairs(1000, 500, rng)
    assert len(pairs) == 500 and np.all(pairs[:, 0] < pairs[:, 1])


def test_greedy_mask_picks_the_layer_that_predicts_decode_usage() -> None:
    """Layer 2's prompt routing mirrors decode routing; the other layers are noise."""
    g = ModelGeometry("toy", num_layers=5, num_experts=16, top_k=2)
    rng = np.random.default_rng(3)
    n = 120
    group = rng.integers(0, 4, size=n)
    prompt = rng.poisson(1.0, size=(n, 5, 16)).astype(np.int32)
    decode = rng.poisson(0.3, size=(n, 5, 16)).astype(np.int32)
    for i in range(n):
        experts = np.arange(4) + 4 * group[i]
        prompt[i, 2, experts] += 6
        decode[i, :, experts] += 5
    search = greedy_layer_mask(prompt, decode, idf_weights(prompt), seed=0)
    assert search.trace[0][0] == 2
    assert search.layer_mask[2]
    assert search.rho > search.rho_all_layers
    # Deterministic for a seed.
    again = greedy_layer_mask(prompt, decode, idf_weights(prompt), seed=0)
    assert again.trace == search.trace
    spec = SignatureSpec(g, idf_weights(prompt), search.layer_mask)
    sigs, _ = spec.build_many(prompt)
    assert signature_rho(spec, sigs, decode, seed=0) == pytest.approx(search.rho, abs=1e-6)

"""Prompt predictor: features, training, serialisation, malformed payloads."""

from __future__ import annotations

import numpy as np
import pytest

from zones.predictor import Predictor, PredictorError, train_predictor


def _topics(n: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Texts from 3 vocabularies; each vocabulary has its own signature direction."""
    rng = np.random.default_rng(seed)
    vocab = [[f"t{t}w{i}" for i in range(40)] for t in range(3)]
    shared = [f"common{i}" for i in range(40)]
    directions = np.abs(rng.standard_normal((3, 24)))
    topic = rng.integers(0, 3, size=n)
    texts, sigs = [], []
    for t in topic:
        words = list(rng.choice(vocab[t], size=20)) + list(rng.choice(shared, size=20))
        rng.shuffle(words)
        texts.append(" ".join(words) + ".")
        s = directions[t] + 0.3 * np.abs(rng.standard_normal(24))
        sigs.append(s / np.linalg.norm(s))
    return texts, np.array(sigs, np.float32), topic


def test_learns_topic_signal_on_held_out_prompts() -> None:
    texts, sigs, topic = _topics(300, seed=0)
    pred = train_predictor(texts[:200], None, sigs[:200], num_buckets=512, rank=8)
    centres = np.stack([sigs[:200][topic[:200] == t].mean(0) for t in range(3)])
    hits = 0
    for text, t in zip(texts[200:], topic[200:], strict=True):
        p = pred.predict(text, None)
        assert p is not None and p.dtype == np.float32 and p.shape == (24,)
        assert np.linalg.norm(p) == pytest.approx(1.0, abs=1e-5)
        hits += int(np.argmax(centres @ p) == t)
    assert hits / 100 > 0.9  # chance is ~1/3


def test_token_ids_path_and_empty_prompts() -> None:
    rng = np.random.default_rng(1)
    ids = [list(rng.integers(0, 50, size=30) + 100 * (i % 2)) for i in range(60)]
    sigs = np.zeros((60, 4), np.float32)
    sigs[np.arange(60) % 2 == 0, 0] = 1.0
    sigs[np.arange(60) % 2 == 1, 1] = 1.0
    pred = train_predictor([None] * 60, ids, sigs, num_buckets=256, rank=2)
    p0 = pred.predict(None, list(rng.integers(0, 50, size=30)))
    p1 = pred.predict(None, list(rng.integers(0, 50, size=30) + 100))
    assert p0 is not None and p1 is not None
    assert p0[0] > p0[1] and p1[1] > p1[0]
    assert pred.predict(None, None) is None
    assert pred.predict("", []) is None
    assert pred.predict("...!!", None) is None


def test_cost_is_bounded_by_max_words() -> None:
    texts, sigs, _ = _topics(20, seed=2)
    pred = train_predictor(texts, None, sigs, num_buckets=64, rank=2, max_words=5)
    long_text = texts[0] + " " + " ".join(["zzz"] * 100_000)
    a, b = pred.predict(long_text, None), pred.predict(texts[0], None)
    assert a is not None and b is not None
    np.testing.assert_array_equal(a, b)  # only the first 5 words count


def test_serialisation_round_trip_and_errors() -> None:
    texts, sigs, _ = _topics(30, seed=3)
    pred = train_predictor(texts, None, sigs, num_buckets=64, rank=3)
    back = Predictor.from_dict(pred.to_dict())
    a, b = back.predict(texts[1], None), pred.predict(texts[1], None)
    assert a is not None and b is not None
    np.testing.assert_array_equal(a, b)
    bad = pred.to_dict()
    bad["kind"] = "neural"
    with pytest.raises(PredictorError, match=r"predictor\.kind"):
        Predictor.from_dict(bad)
    bad = pred.to_dict()
    bad["num_buckets"] = 65
    with pytest.raises(PredictorError, match=r"predictor\.weights must be"):
        Predictor.from_dict(bad)
    bad = pred.to_dict()
    del bad["basis"]
    with pytest.raises(PredictorError, match=r"predictor\.basis"):
        Predictor.from_dict(bad)
    with pytest.raises(PredictorError, match="NaN"):
        Predictor(
            4,
            8,
            np.full((4, 2), np.nan, np.float32),
            np.zeros(2, np.float32),
            np.eye(2, 3, dtype=np.float32),
        )

"""Routing sources: shape, range, determinism, in-domain continuation, trace replay."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from loadtest.emulator.routing import (
    MIN_TOKENS_BEFORE_EOS,
    TRACE_PATH_ENV,
    BigramWalk,
    RoutingError,
    RoutingTrace,
    TokenHashRouting,
    TraceRouting,
    default_trace_path,
    make_routing_source,
)
from loadtest.emulator.tokenizer import Tokenizer
from zones.geometry import KNOWN_GEOMETRIES, ModelGeometry

QWEN = KNOWN_GEOMETRIES["Qwen3-30B-A3B"]
TEXT = ("The server reads the request, parses the header and writes the response. "
        "If the header is missing, the server writes an error and closes the connection.")


def _check_rows(rows: np.ndarray, geometry: ModelGeometry) -> None:
    assert rows.dtype == np.int32
    assert rows.shape[-2:] == (geometry.num_layers, geometry.top_k)
    assert rows.min() >= 0 and rows.max() < geometry.num_experts
    # top-k picks k different experts in each layer
    flat = rows.reshape(-1, geometry.top_k)
    assert all(len(set(r)) == geometry.top_k for r in flat.tolist())


@pytest.mark.parametrize("geometry", list(KNOWN_GEOMETRIES.values()), ids=lambda g: g.name)
def test_token_hash_shapes_and_ranges(geometry):
    tok = Tokenizer()
    source = make_routing_source("token-hash", geometry, tok, seed=3)
    ids = tok.encode(TEXT)
    rows = source.route_prompt(ids, TEXT)
    assert rows.shape[0] == len(ids)
    _check_rows(rows, geometry)
    decode = [e for _, e in itertools.islice(source.continuation(ids, TEXT, 0), 40)]
    _check_rows(np.stack(decode), geometry)


def test_token_hash_is_deterministic_and_seeded():
    ids = Tokenizer().encode(TEXT)
    a = TokenHashRouting(QWEN, Tokenizer(), seed=1).route_prompt(ids, TEXT)
    b = TokenHashRouting(QWEN, Tokenizer(), seed=1).route_prompt(ids, TEXT)
    c = TokenHashRouting(QWEN, Tokenizer(), seed=2).route_prompt(ids, TEXT)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_token_identity_dominates_routing():
    # The same token in two different contexts shares most of its experts; two different
    # tokens share about what chance gives (top_k / num_experts).
    tok = Tokenizer()
    source = TokenHashRouting(QWEN, tok, seed=0)
    ids = tok.encode("alpha beta gamma server delta epsilon zeta server")
    rows = source.route_prompt(ids, None)

    def overlap(i: int, j: int) -> float:
        return float(np.mean([len(set(rows[i, layer]) & set(rows[j, layer])) / QWEN.top_k
                              for layer in range(QWEN.num_layers)]))

    same_token = overlap(3, 7)
    different = np.mean([overlap(i, j) for i, j in itertools.combinations(range(6), 2)
                         if ids[i] != ids[j]])
    assert same_token > 0.5
    assert different < 0.25


def test_continuation_is_deterministic_in_domain_and_seed_dependent():
    tok = Tokenizer()
    source = TokenHashRouting(QWEN, tok, seed=0)
    ids = tok.encode(TEXT)
    first = [t for t, _ in itertools.islice(source.continuation(ids, TEXT, 5), 200)]
    again = [t for t, _ in itertools.islice(source.continuation(ids, TEXT, 5), 200)]
    other = [t for t, _ in itertools.islice(source.continuation(ids, TEXT, 6), 200)]
    assert first == again
    assert first != other
    vocabulary = set(ids) | {tok.eos_token_id}
    assert set(first) <= vocabulary
    # every step follows a bigram of the prompt, except restarts from a dead end
    bigrams = set(itertools.pairwise(ids))
    has_successor = {a for a, _ in bigrams}
    for a, b in itertools.pairwise(first):
        assert (a, b) in bigrams or a not in has_successor


def test_bigram_walk_emits_eos_only_after_the_minimum():
    walk = BigramWalk([10, 11, 12], seed=0, eos_token_id=1)
    out = [walk.next_token() for _ in range(200)]
    assert 1 in out
    assert out.index(1) >= MIN_TOKENS_BEFORE_EOS
    no_eos = BigramWalk([10, 11, 12], seed=0, eos_token_id=None)
    assert 1 not in [no_eos.next_token() for _ in range(200)]
    assert BigramWalk([], seed=0, eos_token_id=1).next_token() == 1


def _synthetic_trace(tmp_path, lengths=(10, 6, 8)):
    rng = np.random.default_rng(0)
    geometry = KNOWN_GEOMETRIES["DeepSeek-V2-Lite"]
    total = sum(lengths)
    ids = np.stack([np.stack([rng.choice(64, 6, replace=False) for _ in range(26)])
                    for _ in range(total)]).astype(np.int8)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    path = tmp_path / "trace.npz"
    np.savez(path, expert_ids=ids, seq_offsets=offsets,
             domain=np.array(["a", "b", "a"][: len(lengths)]),
             num_layers=26, num_experts=64, top_k=6)
    return path, ids, offsets, geometry


def test_trace_marker_selects_the_request_and_splits_prefill_from_decode(tmp_path):
    path, ids, offsets, geometry = _synthetic_trace(tmp_path)
    tok = Tokenizer()
    source = make_routing_source("trace", QWEN, tok, trace_path=str(path))
    assert source.geometry == geometry   # the trace's geometry, not the one passed
    text = "[trace:2] please summarise this"
    prompt = tok.encode(text)
    rows = source.route_prompt(prompt, text)
    req = ids[offsets[2]:offsets[3]].astype(np.int32)   # 8 rows: 4 prefill, 4 decode
    assert rows.shape == (len(prompt), 26, 6)
    assert np.array_equal(rows[:4], req[:4])
    assert np.array_equal(rows[4:8], req[:4])            # cycled to the real prompt length
    decode = [e for _, e in itertools.islice(source.continuation(prompt, text, 0), 8)]
    assert np.array_equal(np.stack(decode[:4]), req[4:])
    assert np.array_equal(np.stack(decode[4:]), req[4:])
    _check_rows(rows, geometry)


def test_trace_without_marker_uses_a_stable_hash(tmp_path):
    path, *_ = _synthetic_trace(tmp_path)
    trace = RoutingTrace.load(path)
    a = TraceRouting(trace, Tokenizer())
    b = TraceRouting(RoutingTrace.load(path), Tokenizer())
    texts = [f"prompt number {i}" for i in range(30)]
    picks = [a.request_index([], t) for t in texts]
    assert picks == [b.request_index([], t) for t in texts]
    assert len(set(picks)) == 3           # all requests get used
    assert a.request_index([5, 6], None) == b.request_index([5, 6], None)
    assert a.request_index([], "[trace:7]") == 7 % 3


def test_trace_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(RoutingError, match="trace_path"):
        make_routing_source("trace", QWEN, Tokenizer(), trace_path=str(tmp_path / "nope.npz"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, expert_ids=np.zeros((4, 2, 1), np.int8))
    with pytest.raises(RoutingError, match="seq_offsets"):
        RoutingTrace.load(bad)
    path, *_ = _synthetic_trace(tmp_path)
    with pytest.raises(RoutingError, match="prefill_fraction"):
        TraceRouting(RoutingTrace.load(path), Tokenizer(), prefill_fraction=1.0)
    with pytest.raises(RoutingError, match="routing must be one of"):
        make_routing_source("magic", QWEN, Tokenizer())
    monkeypatch.setenv(TRACE_PATH_ENV, str(path))
    assert default_trace_path() == path


def test_default_trace_path_points_at_shared_data(monkeypatch):
    monkeypatch.delenv(TRACE_PATH_ENV, raising=False)
    p = default_trace_path()
    assert p.parts[-3:] == ("shared", "data", "esft_routing_shared.npz")

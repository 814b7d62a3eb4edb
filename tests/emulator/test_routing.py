"""Routing sources: shape, range, determinism, in-domain continuation, trace replay."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from loadtest.emulator.routing import (
    ANSWER_SHIFT_MIX,
    MIN_TOKENS_BEFORE_EOS,
    TOPIC_MIX,
    TRACE_PATH_ENV,
    BigramWalk,
    RoutingError,
    RoutingTrace,
    TokenHashRouting,
    TraceRouting,
    _ContextState,
    default_trace_path,
    make_routing_source,
)
from loadtest.emulator.tokenizer import Tokenizer
from zones.geometry import KNOWN_GEOMETRIES, ModelGeometry
from zones.routed_experts import counts_from_expert_ids

QWEN = KNOWN_GEOMETRIES["Qwen3-30B-A3B"]
TEXT = ("The server reads the request, parses the header and writes the response. "
        "If the header is missing, the server writes an error and closes the connection.")
OTHER_TEXT = ("Der Benutzer öffnet die Datei und speichert die Änderungen, bevor er das Fenster "
              "schließt. Wenn die Datei fehlt, zeigt das Programm eine Meldung an.")


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


def _overlap(a: np.ndarray, b: np.ndarray, geometry: ModelGeometry) -> float:
    """Mean over layers of the fraction of top-k experts two tokens share."""
    return float(np.mean([len(set(a[layer]) & set(b[layer])) / geometry.top_k
                          for layer in range(geometry.num_layers)]))


def test_without_topic_token_identity_dominates_routing():
    # topic_mix=0 and no per-token noise leave token embedding + short context: the same token
    # in two different contexts shares most of its experts; two different tokens share about
    # what chance gives (top_k / num_experts).
    tok = Tokenizer()
    source = TokenHashRouting(QWEN, tok, seed=0, topic_mix=0.0, token_noise_mix=0.0)
    ids = tok.encode("alpha beta gamma server delta epsilon zeta server")
    rows = source.route_prompt(ids, None)
    same_token = _overlap(rows[3], rows[7], QWEN)
    different = np.mean([_overlap(rows[i], rows[j], QWEN)
                         for i, j in itertools.combinations(range(6), 2) if ids[i] != ids[j]])
    assert same_token > 0.5
    assert different < 0.25


def test_topic_makes_one_texts_tokens_share_experts_but_not_another_texts():
    # With the fitted weights, once a text has established its topic: the same token still
    # shares the most experts, different tokens of the SAME text share above chance (the topic)
    # but only modestly, as real tokens of one request do (ESFT trace: 16% vs 10% across
    # domains; this router shared 71% here before the per-token noise), and tokens of an
    # unrelated text share about chance (0.0625 for 8 of 128).
    tok = Tokenizer()
    source = TokenHashRouting(QWEN, tok, seed=0)
    assert source.topic_mix == TOPIC_MIX > 0.0 and source.token_noise_mix > 0.0
    ids = tok.encode(TEXT * 3)
    other_ids = tok.encode(OTHER_TEXT * 3)
    rows, other = source.route_prompt(ids, None), source.route_prompt(other_ids, None)
    late = range(len(ids) // 2, len(ids))          # topic established
    pairs = list(itertools.combinations(late, 2))
    same_token = np.mean([_overlap(rows[i], rows[j], QWEN) for i, j in pairs if ids[i] == ids[j]])
    same_text = np.mean([_overlap(rows[i], rows[j], QWEN) for i, j in pairs if ids[i] != ids[j]])
    other_text = np.mean([_overlap(rows[i], other[j], QWEN)
                          for i in late for j in range(len(other_ids) // 2, len(other_ids))])
    assert same_token > same_text + 0.15
    assert 1.5 * other_text < same_text < 0.3
    assert other_text < 0.1


def test_topic_reaches_back_past_the_short_context_and_into_decode():
    # Two prompts that differ only in their first 40 tokens, then share 120: the short context
    # (decay 0.8) has forgotten the difference (0.8**120 ~ 2e-12), the topic has not.
    tok = Tokenizer()
    head_a = tok.encode(" ".join(f"alpha{i}" for i in range(40)))
    head_b = tok.encode(" ".join(f"omega{i}" for i in range(40)))
    tail = tok.encode(" ".join(f"word{i % 60}" for i in range(120)))
    # (No per-token noise here: it is keyed by the whole prefix, so it reaches back too.)
    for topic_mix, expect_equal in ((0.0, True), (0.7, False)):
        source = TokenHashRouting(QWEN, tok, seed=0, topic_mix=topic_mix, token_noise_mix=0.0,
                                  opening_share=0.0)
        a = source.route_prompt(head_a + tail, None)[-20:]
        b = source.route_prompt(head_b + tail, None)[-20:]
        assert np.array_equal(a, b) == expect_equal
    # Decode continues the prompt's topic: the same decode token ids route differently after
    # the two prompts only because of the carried topic (the walk depends on the whole prompt,
    # so compare the first decode step of each with the same forced token instead).
    source = TokenHashRouting(QWEN, tok, seed=0, token_noise_mix=0.0)
    _, state_a = source._hidden(head_a + tail, _ContextState.empty())
    _, state_b = source._hidden(head_b + tail, _ContextState.empty())
    probe = tail[:16]
    hid_a, _ = source._hidden(probe, state_a)
    hid_b, _ = source._hidden(probe, state_b)
    assert not np.array_equal(source._top_k(hid_a), source._top_k(hid_b))


def test_topic_mix_out_of_range_is_rejected():
    with pytest.raises(RoutingError, match="topic_mix"):
        TokenHashRouting(QWEN, Tokenizer(), topic_mix=1.0)
    with pytest.raises(RoutingError, match="topic_mix"):
        TokenHashRouting(QWEN, Tokenizer(), topic_mix=-0.1)


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


def test_answer_shift_is_one_direction_per_task_on_output_tokens_only():
    tok = Tokenizer()
    source = TokenHashRouting(QWEN, tok, seed=0)
    assert ANSWER_SHIFT_MIX > 0 and source.answer_shift_mix == ANSWER_SHIFT_MIX
    instruction = tok.encode("Answer the question about the contract below:")
    a = instruction + tok.encode(TEXT)
    b = instruction + tok.encode(OTHER_TEXT)
    other_task = tok.encode("Translate into French: " + TEXT)
    # keyed by the opening (the task's instruction), as the opening topic is
    assert np.array_equal(source.answer_shift(a), source.answer_shift(b))
    assert abs(float(source.answer_shift(a) @ source.answer_shift(other_task))) < 0.5
    assert np.isclose(np.linalg.norm(source.answer_shift(a)), 1.0)
    # the same text, the experts moved: only output tokens carry the shift
    plain = TokenHashRouting(QWEN, tok, seed=0, answer_shift_mix=0.0)
    assert np.array_equal(source.route_prompt(a, None), plain.route_prompt(a, None))
    shifted = list(itertools.islice(source.continuation(a, None, 3), 64))
    unshifted = list(itertools.islice(plain.continuation(a, None, 3), 64))
    assert [t for t, _ in shifted] == [t for t, _ in unshifted]
    moved = np.mean([not np.array_equal(x, y)
                     for (_, x), (_, y) in zip(shifted, unshifted, strict=True)])
    assert moved > 0.5
    with pytest.raises(RoutingError, match="answer_shift_mix"):
        TokenHashRouting(QWEN, tok, answer_shift_mix=-0.1)


def test_answer_shift_makes_output_route_less_like_its_prompt():
    """What it is for (docs/emulator-cost-model.md section 4): on the real trace a request's
    second half routes less like its first half than the emulator's walk over the prompt's own
    words did."""
    tok = Tokenizer()
    ids = tok.encode(TEXT * 4)

    def prompt_vs_output_cosine(mix: float) -> float:
        source = TokenHashRouting(QWEN, tok, seed=1, answer_shift_mix=mix)
        prompt = counts_from_expert_ids(source.route_prompt(ids, None), QWEN).ravel()
        output = counts_from_expert_ids(np.stack([e for _, e in itertools.islice(
            source.continuation(ids, None, 0), len(ids))]), QWEN).ravel()
        return float(prompt @ output / np.linalg.norm(prompt) / np.linalg.norm(output))

    assert prompt_vs_output_cosine(ANSWER_SHIFT_MIX) < prompt_vs_output_cosine(0.0) - 0.03


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

"""The vectorised token-hash router gives exactly the experts of its one-token-at-a-time definition.

`reference_hidden` and `reference_top_k` are the original loop implementations of
`TokenHashRouting._hidden` / `_top_k`, kept here as the specification (verbatim, plus the
opening topic, the per-token noise keyed by a 64-bit FNV-1a hash of the prefix and the core
term, added with the refit of docs/emulator-cost-model.md section 4; the answer shift of output
tokens in `reference_continuation`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from loadtest.emulator.routing import (
    _CONTINUATION_CHUNK,
    EMBED_DIM,
    BigramWalk,
    TokenHashRouting,
    _ContextState,
)
from loadtest.emulator.tokenizer import Tokenizer
from zones.geometry import KNOWN_GEOMETRIES, ModelGeometry

REPO = Path(__file__).resolve().parents[2]


def reference_hidden(r: TokenHashRouting, token_ids: Sequence[int], state: _ContextState
                     ) -> tuple[np.ndarray, _ContextState]:
    n = len(token_ids)
    embs = np.empty((n, EMBED_DIM), dtype=np.float32)
    local = np.empty((n, EMBED_DIM), dtype=np.float32)
    noise = np.empty((n, EMBED_DIM), dtype=np.float32)
    ctx = state.short.copy()
    prefix = state.prefix_hash
    mix, decay = r.context_mix, r.context_decay
    for i, tid in enumerate(token_ids):
        emb = r.embedding(int(tid))
        embs[i] = emb
        local[i] = (1.0 - mix) * emb + mix * ctx
        ctx = decay * ctx + (1.0 - decay) * emb
        prefix = ((prefix ^ int(tid)) * 0x100000001B3) % 2**64          # FNV-1a, 64-bit
        noise[i] = r._noise_table[((prefix * 0x9E3779B97F4A7C15) % 2**64) >> 52]
    sums = np.cumsum(embs, axis=0)
    total = state.topic_sum + (sums[-1] if n else 0.0)
    before = state.topic_sum + sums - embs
    # The opening topic: the same sums over the request's first `opening_tokens` tokens only.
    opening_sum = (state.opening_sum if state.opening_sum is not None
                   else np.zeros(EMBED_DIM, dtype=np.float32))
    k = max(0, min(n, r.opening_tokens - state.position))
    open_sums = np.cumsum(embs[:k], axis=0)
    open_before = np.empty_like(before)
    open_before[:k] = opening_sum + open_sums - embs[:k]
    open_total = opening_sum + (open_sums[-1] if k else 0.0)
    open_before[k:] = open_total
    if r.topic_mix > 0.0 and n:
        norms = np.linalg.norm(before, axis=1, keepdims=True)
        topic = np.divide(before, norms, out=np.zeros_like(before), where=norms > 1e-6)
        if r.opening_share > 0.0:
            norms = np.linalg.norm(open_before, axis=1, keepdims=True)
            opening = np.divide(open_before, norms, out=np.zeros_like(open_before),
                                where=norms > 1e-6)
            topic = (1.0 - r.opening_share) * topic + r.opening_share * opening
        local *= 1.0 - r.topic_mix
        local += r.topic_mix * topic
    if r.token_noise_mix > 0.0 and n:
        local += r.token_noise_mix * noise
    if r.core_mix > 0.0 and n:
        local += r.core_mix * r._core
    return local, _ContextState(ctx, total.astype(np.float32), prefix, state.position + n,
                                np.asarray(open_total, dtype=np.float32))


def reference_top_k(r: TokenHashRouting, hidden: np.ndarray) -> np.ndarray:
    g = r.geometry
    logits = (hidden @ r._projection).reshape(len(hidden), g.num_layers, g.num_experts)
    top = np.empty((len(hidden), g.num_layers, g.top_k), dtype=np.int32)
    for k in range(g.top_k):
        best = logits.argmax(axis=2)
        top[:, :, k] = best
        np.put_along_axis(logits, best[:, :, None], -np.inf, axis=2)
    return top


def reference_continuation(r: TokenHashRouting, prompt_ids: Sequence[int], seed: int
                           ) -> Iterator[tuple[int, np.ndarray]]:
    _, context = reference_hidden(r, prompt_ids, _ContextState.empty())
    walk = BigramWalk(prompt_ids, seed, r.tokenizer.eos_token_id)
    shift = r.answer_shift_mix * r.answer_shift(prompt_ids)
    while True:
        chunk = [walk.next_token() for _ in range(_CONTINUATION_CHUNK)]
        hidden, context = reference_hidden(r, chunk, context)
        experts = reference_top_k(r, hidden + shift)
        for i, token in enumerate(chunk):
            yield token, experts[i]


def real_texts() -> list[str]:
    """Text of several kinds that exists on every checkout: this repo's code and docs."""
    paths = [REPO / "docs" / "wire-format.md", REPO / "loadtest" / "emulator" / "worker.py",
             REPO / "zones" / "geometry.py"]
    return [p.read_text(encoding="utf-8")[:12_000] for p in paths if p.is_file()]


GEOMETRIES = [*KNOWN_GEOMETRIES.values(), ModelGeometry("odd", 3, 5, 2)]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: g.name)
@pytest.mark.parametrize("weights", [(0.0, 0.0, 0.0, 0.0, 8), (0.7, 0.0, 0.0, 0.0, 8),
                                     "defaults", (0.5, 1.0, 0.3, 0.6, 40)], ids=str)
def test_route_prompt_matches_the_reference_on_random_ids(geometry: ModelGeometry,
                                                          weights) -> None:
    tok = Tokenizer()
    r = (TokenHashRouting(geometry, tok, seed=3) if weights == "defaults" else
         TokenHashRouting(geometry, tok, seed=3, topic_mix=weights[0],
                          token_noise_mix=weights[1], core_mix=weights[2],
                          opening_share=weights[3], opening_tokens=weights[4]))
    rng = np.random.default_rng(11)
    # Lengths around the top-k block size and 0/1-token edge cases; ids repeat (a small
    # vocabulary) so the EMA/topic see recurring tokens, as in text.
    for n in (0, 1, 2, 31, 700, 2100):
        ids = rng.integers(2, 400, n).tolist()
        hidden, state = r._hidden(ids, _ContextState.empty())
        ref_hidden, ref_state = reference_hidden(r, ids, _ContextState.empty())
        assert np.array_equal(hidden, ref_hidden)
        assert np.array_equal(state.short, ref_state.short)
        assert np.array_equal(state.topic_sum, ref_state.topic_sum)
        assert state.prefix_hash == ref_state.prefix_hash
        assert state.position == ref_state.position == n
        assert np.array_equal(state.opening_sum, ref_state.opening_sum)
        assert np.array_equal(r.route_prompt(ids, None), reference_top_k(r, ref_hidden))
        # Carried state: the rest of the tokens continue from the state (the opening window of
        # 40 tokens straddles the 31-token boundary).
        more = rng.integers(2, 400, 33).tolist()
        hidden, _ = r._hidden(more, state)
        ref_hidden, _ = reference_hidden(r, more, ref_state)
        assert np.array_equal(hidden, ref_hidden)


@pytest.mark.parametrize("geometry", list(KNOWN_GEOMETRIES.values()), ids=lambda g: g.name)
def test_route_prompt_and_continuation_match_the_reference_on_real_text(
        geometry: ModelGeometry) -> None:
    texts = real_texts()
    assert texts, "no text files found in the repository"
    tok = Tokenizer()
    r = TokenHashRouting(geometry, tok, seed=0)
    for seed, text in enumerate(texts):
        ids = tok.encode(text)
        ref_hidden, _ = reference_hidden(r, ids, _ContextState.empty())
        assert np.array_equal(r.route_prompt(ids, text), reference_top_k(r, ref_hidden))
        got = list(itertools.islice(r.continuation(ids, text, seed), 3 * _CONTINUATION_CHUNK))
        want = list(itertools.islice(reference_continuation(r, ids, seed),
                                     3 * _CONTINUATION_CHUNK))
        assert [t for t, _ in got] == [t for t, _ in want]
        assert np.array_equal(np.stack([e for _, e in got]), np.stack([e for _, e in want]))


def test_top_k_breaks_ties_towards_the_lowest_expert_like_the_reference() -> None:
    # Equal logits are where a different top-k algorithm would disagree: make every logit of
    # a row tie by projecting a zero hidden state, and some rows partially tie.
    g = ModelGeometry("tie", 2, 8, 3)
    r = TokenHashRouting(g, Tokenizer(), seed=1)
    r._projection = np.repeat(r._projection[:, :4], 4, axis=1)   # each logit appears 4 times
    hidden = np.vstack([np.zeros((1, EMBED_DIM), np.float32),
                        np.random.default_rng(2).standard_normal((5000, EMBED_DIM),
                                                                 dtype=np.float32)])
    got = r._top_k(hidden.copy())
    assert np.array_equal(got, reference_top_k(r, hidden.copy()))
    assert got[0].tolist() == [[0, 1, 2], [0, 1, 2]]

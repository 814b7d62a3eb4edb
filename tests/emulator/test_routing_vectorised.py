"""The vectorised token-hash router gives exactly the experts of its one-token-at-a-time definition.

`reference_hidden` and `reference_top_k` are the original loop implementations of
`TokenHashRouting._hidden` / `_top_k`, kept here verbatim as the specification.
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
    ctx = state.short.copy()
    mix, decay = r.context_mix, r.context_decay
    for i, tid in enumerate(token_ids):
        emb = r.embedding(int(tid))
        embs[i] = emb
        local[i] = (1.0 - mix) * emb + mix * ctx
        ctx = decay * ctx + (1.0 - decay) * emb
    sums = np.cumsum(embs, axis=0)
    total = state.topic_sum + (sums[-1] if n else 0.0)
    before = state.topic_sum + sums - embs
    if r.topic_mix > 0.0 and n:
        norms = np.linalg.norm(before, axis=1, keepdims=True)
        topic = np.divide(before, norms, out=np.zeros_like(before), where=norms > 1e-6)
        local *= 1.0 - r.topic_mix
        local += r.topic_mix * topic
    return local, _ContextState(ctx, total.astype(np.float32))


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
    while True:
        chunk = [walk.next_token() for _ in range(_CONTINUATION_CHUNK)]
        hidden, context = reference_hidden(r, chunk, context)
        experts = reference_top_k(r, hidden)
        for i, token in enumerate(chunk):
            yield token, experts[i]


def real_texts() -> list[str]:
    """Text of several kinds that exists on every checkout: this repo's code and docs."""
    paths = [REPO / "docs" / "wire-format.md", REPO / "loadtest" / "emulator" / "worker.py",
             REPO / "zones" / "geometry.py"]
    return [p.read_text(encoding="utf-8")[:12_000] for p in paths if p.is_file()]


GEOMETRIES = [*KNOWN_GEOMETRIES.values(), ModelGeometry("odd", 3, 5, 2)]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: g.name)
@pytest.mark.parametrize("topic_mix", [0.0, 0.7])
def test_route_prompt_matches_the_reference_on_random_ids(geometry: ModelGeometry,
                                                          topic_mix: float) -> None:
    tok = Tokenizer()
    r = TokenHashRouting(geometry, tok, seed=3, topic_mix=topic_mix)
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
        assert np.array_equal(r.route_prompt(ids, None), reference_top_k(r, ref_hidden))


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

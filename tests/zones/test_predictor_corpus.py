"""Predictor zone accuracy on held-out prompts: real text, emulated routing.

ESFT (the real routing trace) carries no prompt text, so the predictor is measured here on
the project's text corpus (loadtest/corpus: Python source, licences, translated UI strings)
routed by the emulator's `token-hash` router, an independently written stand-in for a trained
MoE router (loadtest/emulator/routing.py). Prompts are 120-word passages; the split is by
DOCUMENT (no passage of a held-out document is seen in training), so the predictor cannot
succeed by memorising passages. What this measures is the predictor on this routing model,
not on a production model; the numbers are printed for the report.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from zones.evaluate import evaluate
from zones.fit import FitOptions, fit_zones
from zones.geometry import KNOWN_GEOMETRIES
from zones.inputs import CalibrationSet
from zones.routed_experts import counts_from_expert_ids

pytestmark = pytest.mark.slow

_WORDS = 120
_DECODE_TOKENS = 32
# Up to 5 passages per document (most are shorter): with routing fitted to the real trace the
# predictor's edge over chance is smaller, and 2 passages per document left too few held-out
# passages (64) for a 3-standard-error test to see it.
_CHUNKS_PER_DOC = 5


@pytest.fixture(scope="module")
def corpus_set() -> tuple[CalibrationSet, np.ndarray]:
    workloads = pytest.importorskip("loadtest.workloads")
    routing = pytest.importorskip("loadtest.emulator.routing")
    tokenizer_mod = pytest.importorskip("loadtest.emulator.tokenizer")
    g = KNOWN_GEOMETRIES["DeepSeek-V2-Lite"]
    tok = tokenizer_mod.Tokenizer()
    router = routing.TokenHashRouting(g, tok, seed=0)
    texts: list[str | None] = []
    prompt, decode, rows, doc_of = [], [], [], []
    for d, doc in enumerate(workloads.load_corpus()):
        words = doc.text.split()
        for c in range(_CHUNKS_PER_DOC):
            chunk = words[c * _WORDS : (c + 1) * _WORDS]
            if len(chunk) < 40:
                break
            text = " ".join(chunk)
            ids = tok.encode(text)
            dec = np.stack(
                [r for _, r in itertools.islice(router.continuation(ids, text, 0), _DECODE_TOKENS)]
            )
            texts.append(text)
            prompt.append(counts_from_expert_ids(router.route_prompt(ids, text), g))
            decode.append(counts_from_expert_ids(dec, g))
            rows.append(dec)
            doc_of.append(d)
    calib = CalibrationSet(g, np.stack(prompt), np.stack(decode), texts=texts, decode_tokens=rows)
    return calib, np.array(doc_of)


def test_predictor_beats_chance_on_held_out_documents(
    corpus_set: tuple[CalibrationSet, np.ndarray],
) -> None:
    """Three document splits, pooled: one split's zone fit can be lopsided (its largest zone
    holding half the passages makes "chance" high), so the verdict is on all three."""
    calib, doc_of = corpus_set
    docs = np.unique(doc_of)
    k = 4
    correct = chance = n = 0.0
    for split in range(3):
        test_docs = np.random.default_rng(split).permutation(docs)[: len(docs) // 3]
        test = np.isin(doc_of, test_docs)
        table, _ = fit_zones(
            calib.subset(np.flatnonzero(~test)), [f"decode-{i}" for i in range(k)], FitOptions()
        )
        assert table.predictor is not None
        ev = evaluate(
            table, calib.subset(np.flatnonzero(test)), batch_sizes=(16,), steps=1000, bootstrap=20
        )
        assert ev.predictor_accuracy is not None and ev.chance_accuracy is not None
        b = ev.batches[0]
        print(
            f"\ncorpus + token-hash routing, K={k}, split {split}: {int(test.sum())} held-out "
            f"passages from {len(test_docs)} unseen documents: predictor zone accuracy "
            f"{ev.predictor_accuracy:.3f} vs chance {ev.chance_accuracy:.3f} (largest zone "
            f"share); distinct-expert reduction at batch 16: exact {b.reduction['exact']:+.1%}, "
            f"predictor {b.reduction['predictor']:+.1%}"
        )
        m = int(test.sum())
        correct += ev.predictor_accuracy * m
        chance += ev.chance_accuracy * m
        n += m
    # Binomial one-sided check that pooled accuracy exceeds the pooled chance rate: 3 standard
    # errors.
    p0 = chance / n
    se = np.sqrt(p0 * (1 - p0) / n)
    assert correct / n > p0 + 3 * se, (correct / n, p0, se)

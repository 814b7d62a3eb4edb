"""benchmarks/routing_stats.py: its statistics on tiny inputs with known answers, and token-hash's
fitted statistics against the real trace on a seeded subsample."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtest.emulator.routing import (
    RoutingTrace,
    TokenHashRouting,
    TraceRouting,
    default_trace_path,
)
from loadtest.emulator.tokenizer import Tokenizer
from zones.geometry import KNOWN_GEOMETRIES, ModelGeometry

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import routing_stats as rs  # noqa: E402  (a script directory, not a package)

TINY = ModelGeometry("tiny", num_layers=2, num_experts=8, top_k=2)
# Every token of a request routes the same way; A and B (domain x) share layer 0 only, C and D
# (domain y) share nothing with x.
ROUTE = {"A": [[0, 1], [2, 3]], "B": [[0, 1], [4, 5]], "C": [[6, 7], [6, 7]],
         "D": [[6, 7], [6, 7]]}
DOMAIN = {"A": "x", "B": "x", "C": "y", "D": "y"}


def _routed(names: str, tokens: int = 6) -> rs.Routed:
    requests = [np.array([ROUTE[n]] * tokens, dtype=np.int64) for n in names]
    return rs.Routed(requests, [DOMAIN[n] for n in names], [tokens // 2] * len(names), TINY)


def test_token_pair_overlap_known_answers():
    same_req, same_dom, other = rs.token_pair_overlap(_routed("ABC"), 4000,
                                                      np.random.default_rng(0))
    assert same_req == 1.0           # identical tokens share all experts
    assert same_dom == 0.5           # A-B: 2 of 2 in layer 0, 0 of 2 in layer 1
    assert other == 0.0


def test_signature_cosines_known_answers():
    routed = _routed("ABC")
    cos = rs.random_half_cosines(routed, np.random.default_rng(0))
    assert cos == pytest.approx((1.0, 0.5, 0.0))
    # M: prefill routed as A, decode as B (cosine 0.5); B and C alike throughout (1.0). Same
    # domain: M's prefill vs B's decode 0.5, B's prefill vs M's decode 1.0.
    m = np.array([ROUTE["A"]] * 3 + [ROUTE["B"]] * 3, dtype=np.int64)
    pd = rs.prefill_decode_cosines(rs.Routed([m, *routed.requests[1:]], ["x", "x", "y"],
                                             [3, 3, 3], TINY))
    assert pd == pytest.approx(((0.5 + 1 + 1) / 3, 0.75, 0.0))


def test_batch_distinct_experts_known_answers():
    # batch 2: same-domain A+B uses 2 experts in layer 0 and 4 in layer 1 (mean 3), C+D 2 and
    # 2 (mean 2); every mixed batch (one of A/B + one of C/D) uses 4 and 4.
    same, mixed = rs.batch_distinct_experts(_routed("ABCD"), 2, 50, np.random.default_rng(0))
    assert same == pytest.approx(2.5)
    assert mixed == pytest.approx(4.0)
    with pytest.raises(ValueError, match="batches of 4"):
        rs.batch_distinct_experts(_routed("ABC"), 4, 5, np.random.default_rng(0))


def test_top_load_share_known_answers():
    # 8 experts: the busiest 1/8 is one expert; A puts half of each layer's slots on expert 0/2.
    assert rs.top_load_share(_routed("A")) == pytest.approx(0.5)
    uniform = np.array([[[e, (e + 1) % 8], [e, (e + 1) % 8]] for e in range(8)], np.int64)
    assert rs.top_load_share(rs.Routed([uniform], ["x"], [4], TINY)) == pytest.approx(1 / 8)


def test_compute_stats_and_loss_on_a_tiny_set():
    stats = rs.compute_stats(_routed("ABCD"), seed=0, pairs=4000, trials=10, batch=2)
    assert set(stats) == {k for k, _ in rs.STATS} | {k for k, _ in rs.INFO}
    assert stats["distinct_gain"] == pytest.approx(1.5)
    assert rs.fit_loss(stats, stats) == 0.0
    doubled = {k: 2 * v for k, v in stats.items()}
    assert rs.fit_loss(doubled, stats, keys=["distinct_gain"]) == pytest.approx(1.0)
    assert rs.mean_stats([stats, doubled])["distinct_gain"] == pytest.approx(2.25)


def test_prefill_cut_is_the_trace_replay_split(tmp_path):
    lengths = (2, 3, 7, 64, 65)
    ids = np.zeros((sum(lengths), 26, 6), dtype=np.int8)
    for row in ids:
        row[:] = np.arange(6)
    path = tmp_path / "t.npz"
    np.savez(path, expert_ids=ids, seq_offsets=np.concatenate([[0], np.cumsum(lengths)]),
             domain=np.array(["a"] * len(lengths)))
    replay = TraceRouting(RoutingTrace.load(path), Tokenizer())
    for i, n in enumerate(lengths):
        assert len(replay.split(i)[0]) == rs.prefill_cut(n)


def test_twin_parts_recombine_to_the_routing_api():
    # The fit's shortcut (one pass over prompt + decode tokens, weights applied afterwards)
    # gives the experts the emulator's route_prompt + continuation give.
    geometry = KNOWN_GEOMETRIES["DeepSeek-V2-Lite"]
    tok = Tokenizer()
    text = (REPO / "docs" / "emulator-cost-model.md").read_text(encoding="utf-8")[:4000]
    ids = tok.encode(text)
    twins = [rs.Twin("x", ids[:40], 50), rs.Twin("y", ids[100:130], 33)]
    source = TokenHashRouting(geometry, tok, seed=2)
    api = rs.route_twins(source, twins)
    parts = rs.TwinParts(source, twins).routed(rs.Weights())
    for a, b in zip(api.requests, parts.requests, strict=True):
        assert a.shape == b.shape
        assert np.mean(np.all(a == b, axis=(1, 2))) >= 0.98   # float rounding of running sums
    assert api.cuts == parts.cuts == [40, 30]


def _trace_or_skip() -> RoutingTrace:
    path = default_trace_path()
    if not path.is_file():
        pytest.skip(f"routing trace not at {path}")
    return RoutingTrace.load(path)


# The full fit has every row within 15% (benchmarks/routing_stats.py --seeds 0,1,2: worst -7%).
# On this test's 55-request subsample with 40 batches, "mixed - same" distinct experts (a
# difference of two ~45-expert means, ~5.5) is the noisy row: +25% on this seed, +3% on the
# full data; it gets a looser bound here.
KNOWN_GAPS = {"distinct_gain": 0.3}


def test_token_hash_matches_the_trace_on_its_geometry_within_15_percent():
    # A seeded subsample (16 requests per domain at most, 55 requests, ~1 s).
    trace = _trace_or_skip()
    target = rs.trace_routed(trace, per_domain=16, seed=3)
    tok = Tokenizer()
    twins = rs.workload_twins(target, tok, seed=3)
    source = TokenHashRouting(trace.geometry, tok, seed=3)
    want = rs.compute_stats(target, seed=3, pairs=30_000, trials=40)
    got = rs.compute_stats(rs.route_twins(source, twins), seed=3, pairs=30_000, trials=40)
    errors = {k: round(rs.rel_err(got[k], want[k]), 3) for k in rs.FITTED}
    assert all(abs(e) <= KNOWN_GAPS.get(k, rs.PASS_REL_ERR) for k, e in errors.items()), errors
    # and the flattering statistic the fit was for: within-request overlap, 54% before
    assert got["overlap_same_req"] < 0.2


@pytest.mark.parametrize("model", ["Qwen3-30B-A3B", "GPT-OSS-120B"])
def test_fitted_weights_carry_over_to_the_other_geometries(model):
    # Untuned on these geometries: templated prompts (the trace-length workload twins) still
    # form local same-domain batches, and two tokens of one request share few experts (about
    # twice chance; 8x chance with the weights before the refit).
    trace = _trace_or_skip()
    target = rs.trace_routed(trace, per_domain=16, seed=3)
    tok = Tokenizer()
    geometry = KNOWN_GEOMETRIES[model]
    routed = rs.route_twins(TokenHashRouting(geometry, tok, seed=3),
                            rs.workload_twins(target, tok, seed=3))
    same, mixed = rs.batch_distinct_experts(routed, 16, 40, np.random.default_rng(1))
    assert mixed / same > 1.06
    within, _, other = rs.token_pair_overlap(routed, 30_000, np.random.default_rng(2))
    chance = geometry.top_k / geometry.num_experts
    assert within < 3 * chance and other < 1.3 * chance


def test_benchmark_prints_the_table_on_a_synthetic_trace(tmp_path, capsys):
    # End to end through main() on a tiny synthetic trace with the trace's domain names.
    rng = np.random.default_rng(0)
    names, lengths = [], []
    for dom, n in (("intent", 16), ("law", 4), ("summary", 4), ("translation", 4)):
        names += [dom] * n
        lengths += rng.integers(6, 20, n).tolist()
    ids = np.stack([rng.permuted(np.arange(64))[:6] for _ in range(sum(lengths) * 26)])
    path = tmp_path / "trace.npz"
    np.savez(path, expert_ids=ids.reshape(sum(lengths), 26, 6).astype(np.int8),
             seq_offsets=np.concatenate([[0], np.cumsum(lengths)]), domain=np.array(names))
    assert rs.main(["--trace-path", str(path), "--pairs", "2000", "--trials", "3",
                    "--compare", "0.7,0,0"]) == 0
    out = capsys.readouterr().out
    for key_label in (label for _, label in rs.STATS):
        assert key_label in out
    assert "t0.7 n0" in out and "rows within 15%" in out
    # the fit runs on the same setup, over every grid point
    assert rs.main(["--trace-path", str(path), "--pairs", "2000", "--trials", "3", "--fit",
                    "--fit-topic", "0.3", "--fit-opening-share", "0,1", "--fit-opening-tokens",
                    "4,8", "--fit-noise", "0,0.6", "--fit-core", "0", "--fit-answer-shift",
                    "0,0.3"]) == 0
    out = capsys.readouterr().out
    assert "fit: 12 grid points x 1 seeds" in out and "best grid points" in out
    assert "t0.3 o1/4 n0.6" in out and "t0.3 n0" in out and "t0.3 o1/8 n0.6 s0.3" in out


def test_noise_term_breaks_within_request_self_consistency():
    # The same text with and without the per-token noise: tokens of one request share far fewer
    # experts with it, and the routing stays a deterministic function of the text.
    geometry = KNOWN_GEOMETRIES["DeepSeek-V2-Lite"]
    tok = Tokenizer()
    ids = tok.encode((REPO / "docs" / "emulator-cost-model.md").read_text()[:3000])

    def within(source: TokenHashRouting) -> float:
        rows = source.route_prompt(ids, None)
        pairs = list(itertools.combinations(range(len(ids) // 2, len(ids), 7), 2))
        shared = [np.mean([len(set(rows[i, layer]) & set(rows[j, layer])) / geometry.top_k
                           for layer in range(geometry.num_layers)]) for i, j in pairs]
        return float(np.mean(shared))

    quiet = TokenHashRouting(geometry, tok, topic_mix=0.7, token_noise_mix=0.0)
    noisy = TokenHashRouting(geometry, tok, topic_mix=0.7, token_noise_mix=1.0)
    assert within(noisy) < within(quiet) - 0.15
    assert np.array_equal(noisy.route_prompt(ids, None), noisy.route_prompt(ids, None))


def test_core_term_skews_expert_popularity():
    geometry = KNOWN_GEOMETRIES["DeepSeek-V2-Lite"]
    tok = Tokenizer()
    ids = list(range(2, 1500))          # all different tokens: no topic or repetition skew

    def share(core: float) -> float:
        source = TokenHashRouting(geometry, tok, topic_mix=0.0, token_noise_mix=0.0,
                                  core_mix=core)
        rows = source.route_prompt(ids, None).astype(np.int64)
        return rs.top_load_share(rs.Routed([rows], ["x"], [1], geometry))

    assert share(0.0) < 0.2 < share(1.0)

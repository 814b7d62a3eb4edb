"""Routing statistics of the real ESFT trace and of token-hash at its geometry, side by side.

The trace (../shared/data/esft_routing_shared.npz, DeepSeek-V2-Lite: 26 MoE layers, 64 routed
experts, top-6; 108 requests in 4 task domains) has no token ids, so token-hash cannot route the
same text. Instead every trace request gets a token-hash *twin* of the same length and split:
its leading `int(0.5 * length)` tokens are a prompt (routed with `route_prompt`) and the rest
are the emulator's own decode continuation of that prompt (routed with `continuation`), exactly
as the trace is split for replay (`TraceRouting.split`, prefill_fraction 0.5). Twin prompts come
from the load generator's workloads (`--text workload`, default: loadtest.workloads, each task
with its instruction; trace domain -> task per `TWIN_TASK`) or from the offline corpora of
benchmarks/emulator_locality.py (`--text corpora`, random chunks, `CORPORA_TEXT`). Both sides
then go through the same statistics:

- token-pair overlap: mean share of top-k experts two random tokens have in common, averaged
  over layers, for two tokens of the same request / of other requests of the same domain / of
  other domains (`calibrate_token_hash.pair_overlap`, the function behind the 54% vs 16% in
  docs/emulator-cost-model.md; pairs are uniform over all tokens, so long requests weigh more,
  on both sides alike);
- signature cosine: per-request expert-count vectors (all layers x experts) of two random
  halves of a request's tokens: same request / other request of the same domain / other domain
  (`emulator_locality.correlation_rows`);
- prefill-vs-decode cosine: the same for the first `int(0.5 * length)` tokens against the rest.
  Trace: first half vs second half (it has no prefill/decode boundary: prompts were
  teacher-forced with their answers). Token-hash: prompt tokens vs emulator output tokens;
- distinct experts per layer in one decode step of 16 requests, one random decode-part token
  each (`emulator_locality.batch_distinct`): same-domain batches (domains with >= 16 requests)
  vs mixed batches (4 requests from each domain), and the difference mixed - same (the experts
  a locality policy can save; the ratio is printed for reference);
- load share of the busiest 1/8 of each layer's experts over all tokens (popularity skew).

The same-domain rows also depend on how alike one domain's prompts are: the workload twins
share their task's instruction, as ESFT prompts share theirs; random corpus chunks share nothing
(docs/emulator-cost-model.md section 4 shows both).

PASS when |relative error| <= 15% (token-hash vs trace). `--fit` grid-searches token-hash's
topic_mix, opening_share, opening_tokens, token_noise_mix, core_mix and answer_shift_mix on all
13 rows at this geometry (least mean squared relative error; routing statistics only: no policy
or TPOT result enters), each grid point on the same twins' weight-free router parts
(`TokenHashRouting._parts`, recombined with `TokenHashRouting.mix`, plus the answer shift on
decode rows); its default grid is the last of the grids that fitted the emulator's constants.

    python benchmarks/routing_stats.py [--seeds 0,1,2] [--per-domain N] [--compare 0.7,0,0]
    python benchmarks/routing_stats.py --fit [--seeds 0,1,2] [--fit-topic ...]
"""

from __future__ import annotations

import os

# Before numpy loads (see emulator_locality.py): one BLAS thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import itertools
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from calibrate_token_hash import pair_overlap  # same directory
from emulator_locality import batch_distinct, chunk_requests, correlation_rows, domain_texts

from loadtest.emulator.routing import (
    ANSWER_SHIFT_MIX,
    CORE_MIX,
    EMBED_DIM,
    TOKEN_NOISE_MIX,
    TOPIC_MIX,
    TOPIC_OPENING_SHARE,
    TOPIC_OPENING_TOKENS,
    BigramWalk,
    RouterParts,
    RoutingTrace,
    TokenHashRouting,
    _ContextState,
    default_trace_path,
)
from loadtest.emulator.tokenizer import Tokenizer
from loadtest.workloads import WorkloadSpec, build_workload, load_corpus
from zones.geometry import ModelGeometry, geometry_by_name
from zones.routed_experts import counts_from_expert_ids

PASS_REL_ERR = 0.15
BATCH = 16
PREFILL_FRACTION = 0.5          # TraceRouting's default split
TOP_LOAD_FRACTION = 1 / 8
# Trace domain -> (workload kind, task or language) of its twins' prompts: the load generator's
# own mapping for `trace` workloads (loadtest.workloads.TRACE_DOMAIN_TASK), except summary,
# which that maps to legal like law: here Russian messages, so the four twin domains are four
# different texts (in the trace, law and summary are no more alike than any two domains:
# token-pair overlap 0.099 vs 0.093-0.114 for the other cross-domain pairs).
TWIN_TASK = {"intent": ("task", "code"), "law": ("task", "legal"),
             "translation": ("task", "translation"), "summary": ("language", "ru")}
# `--text corpora`: trace domain -> offline text domain of benchmarks/emulator_locality.py.
CORPORA_TEXT = {"intent": "german-ui", "law": "licenses", "summary": "python-code",
                "translation": "french-ui"}


@dataclass
class Routed:
    """Per-request routed experts `[tokens, layers, top_k]`, domain labels, prefill lengths."""

    requests: list[np.ndarray]
    domains: list[str]
    cuts: list[int]
    geometry: ModelGeometry


def prefill_cut(length: int, fraction: float = PREFILL_FRACTION) -> int:
    """Prefill length of a request of `length` tokens, as `TraceRouting.split` computes it."""
    return min(max(1, int(length * fraction)), length - 1)


# -- statistics ----------------------------------------------------------------------------
def token_pair_overlap(routed: Routed, pairs: int, rng: np.random.Generator
                       ) -> tuple[float, float, float]:
    """(same request, other request of the same domain, other domain): mean share of top-k
    experts two random tokens have in common, averaged over layers."""
    lengths = [len(r) for r in routed.requests]
    request = np.repeat(np.arange(len(lengths)), lengths)
    domain = np.array(routed.domains)[request]
    rows = np.concatenate(routed.requests).astype(np.int64)
    return pair_overlap(rows, request, domain, pairs, rng)


def _cosines(first: list[np.ndarray], second: list[np.ndarray], domains: list[str]
             ) -> tuple[float, float, float]:
    rows = correlation_rows("", first, second, domains)
    cos = next(r for r in rows if r[1] == "cosine")
    return cos[2], cos[3], cos[4]


def random_half_cosines(routed: Routed, rng: np.random.Generator) -> tuple[float, float, float]:
    """Cosine of the expert-count signatures of two random halves of each request's tokens:
    (same request, other request of the same domain, other domain)."""
    g = routed.geometry
    first, second = [], []
    for rows in routed.requests:
        order = rng.permutation(len(rows))
        half = len(rows) // 2
        first.append(counts_from_expert_ids(rows[order[:half]], g))
        second.append(counts_from_expert_ids(rows[order[half:]], g))
    return _cosines(first, second, routed.domains)


def prefill_decode_cosines(routed: Routed) -> tuple[float, float, float]:
    """The same for the prefill part against the decode part (split at `routed.cuts`)."""
    g = routed.geometry
    pairs = list(zip(routed.requests, routed.cuts, strict=True))
    return _cosines([counts_from_expert_ids(r[:c], g) for r, c in pairs],
                    [counts_from_expert_ids(r[c:], g) for r, c in pairs], routed.domains)


def batch_distinct_experts(routed: Routed, batch: int, trials: int, rng: np.random.Generator
                           ) -> tuple[float, float]:
    """Mean distinct experts per layer of one decode step of `batch` requests, one random
    decode-part token each: (same-domain batches, mixed-domain batches)."""
    by_domain: dict[str, list[np.ndarray]] = {}
    for rows, cut, dom in zip(routed.requests, routed.cuts, routed.domains, strict=True):
        by_domain.setdefault(dom, []).append(rows[cut:])
    per = batch // len(by_domain)
    if per < 1 or any(len(r) < per for r in by_domain.values()) or all(
            len(r) < batch for r in by_domain.values()):
        raise ValueError(f"batches of {batch} need a domain with >= {batch} requests and "
                         f">= {max(per, 1)} in every domain")

    def step(reqs: list[np.ndarray]) -> float:
        tokens = [r[rng.integers(len(r))][None] for r in reqs]      # each [1, L, K]
        return float(batch_distinct(tokens, routed.geometry).mean())

    same = [step([reqs[i] for i in rng.choice(len(reqs), batch, replace=False)])
            for reqs in by_domain.values() if len(reqs) >= batch for _ in range(trials)]
    mixed = [step([reqs[i] for reqs in by_domain.values()
                   for i in rng.choice(len(reqs), per, replace=False)])
             for _ in range(trials)]
    return float(np.mean(same)), float(np.mean(mixed))


def top_load_share(routed: Routed, fraction: float = TOP_LOAD_FRACTION) -> float:
    """Share of all routed slots that go to each layer's busiest `fraction` of experts (mean
    over layers; uniform routing gives `fraction`)."""
    g = routed.geometry
    counts = counts_from_expert_ids(np.concatenate(routed.requests), g).astype(np.float64)
    top = max(1, round(fraction * g.num_experts))
    busiest = np.sort(counts, axis=1)[:, ::-1][:, :top].sum(axis=1)
    return float(np.mean(busiest / counts.sum(axis=1)))


# (key, label): the rows of the table, in order; `--fit` fits all of them.
STATS = (
    ("overlap_same_req", "token-pair overlap: same request"),
    ("overlap_same_dom", "token-pair overlap: other req, same domain"),
    ("overlap_other_dom", "token-pair overlap: other domain"),
    ("cos_same_req", "signature cosine: random halves, same req"),
    ("cos_same_dom", "signature cosine: other req, same domain"),
    ("cos_other_dom", "signature cosine: other domain"),
    ("pd_same_req", "prefill-vs-decode cosine: same request"),
    ("pd_same_dom", "prefill-vs-decode cosine: other req, same dom"),
    ("pd_other_dom", "prefill-vs-decode cosine: other domain"),
    ("distinct_same", "distinct experts/layer: 16 same-domain"),
    ("distinct_mixed", "distinct experts/layer: 16 mixed-domain"),
    ("distinct_gain", "distinct experts/layer: mixed - same"),
    ("top_load", "load share of busiest 1/8 experts"),
)
INFO = (("distinct_ratio", "distinct experts: ratio mixed / same"),)
FITTED = tuple(k for k, _ in STATS)


def compute_stats(routed: Routed, seed: int, pairs: int, trials: int, batch: int = BATCH
                  ) -> dict[str, float]:
    """Every statistic of the table; the same `seed` draws the same pairs/halves/batches."""
    out: dict[str, float] = {}
    rng = np.random.default_rng([seed, 1])
    (out["overlap_same_req"], out["overlap_same_dom"],
     out["overlap_other_dom"]) = token_pair_overlap(routed, pairs, rng)
    rng = np.random.default_rng([seed, 2])
    (out["cos_same_req"], out["cos_same_dom"],
     out["cos_other_dom"]) = random_half_cosines(routed, rng)
    out["pd_same_req"], out["pd_same_dom"], out["pd_other_dom"] = prefill_decode_cosines(routed)
    rng = np.random.default_rng([seed, 3])
    out["distinct_same"], out["distinct_mixed"] = batch_distinct_experts(
        routed, batch, trials, rng)
    out["distinct_gain"] = out["distinct_mixed"] - out["distinct_same"]
    out["distinct_ratio"] = out["distinct_mixed"] / out["distinct_same"]
    out["top_load"] = top_load_share(routed)
    return out


def mean_stats(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}


def rel_err(value: float, target: float) -> float:
    if target == 0:
        return 0.0 if value == 0 else float("inf")
    return (value - target) / target


def fit_loss(stats: dict[str, float], target: dict[str, float],
             keys: Sequence[str] = FITTED) -> float:
    """Mean squared relative error over `keys` (default: every row)."""
    return float(np.mean([rel_err(stats[k], target[k]) ** 2 for k in keys]))


# -- the trace and its token-hash twins ------------------------------------------------------
def trace_routed(trace: RoutingTrace, per_domain: int | None, seed: int) -> Routed:
    """The trace's requests (optionally at most `per_domain` per domain, a seeded choice)."""
    rng = np.random.default_rng([seed, 0])
    chosen: list[int] = []
    for dom in sorted(set(trace.domains)):
        idx = [i for i, d in enumerate(trace.domains) if d == dom]
        if per_domain is not None and len(idx) > per_domain:
            idx = sorted(rng.choice(idx, per_domain, replace=False).tolist())
        chosen += idx
    requests = [trace.request(i).astype(np.int64) for i in chosen]
    return Routed(requests, [trace.domains[i] for i in chosen],
                  [prefill_cut(len(r)) for r in requests], trace.geometry)


@dataclass
class Twin:
    """A token-hash twin of one trace request: its domain, prompt ids, decode token count."""

    domain: str
    prompt: list[int]
    decode_tokens: int


def workload_twins(target: Routed, tok: Tokenizer, seed: int, split: str = "calibration"
                   ) -> list[Twin]:
    """Twin prompts from the load generator's workloads (the committed corpus; calibration
    split by default), truncated to each trace request's prefill length."""
    docs = load_corpus()
    twins = []
    for i, (dom, cut) in enumerate(zip(target.domains, target.cuts, strict=True)):
        kind, task = TWIN_TASK.get(dom, ("task", "code"))
        chars = 8 * cut + 64
        for attempt in range(6):
            spec = WorkloadSpec(kind=kind, split=split, num_conversations=1,
                                seed=int(np.random.default_rng([seed, i, attempt]).integers(2**31)),
                                min_prompt_chars=chars, max_prompt_chars=chars,
                                mix={task: 1.0})
            ids = tok.encode(build_workload(spec, docs)[0].turns[0].text)
            if len(ids) >= cut:
                break
            chars *= 2
        else:
            raise ValueError(f"could not build a {cut}-token {task!r} prompt")
        twins.append(Twin(dom, ids[:cut], len(target.requests[i]) - cut))
    return twins


def corpora_twins(target: Routed, tok: Tokenizer, seed: int) -> list[Twin]:
    """Twin prompts cut at random places of the offline corpora (`CORPORA_TEXT`)."""
    texts = domain_texts()
    names = sorted(set(target.domains))
    mapping = {d: CORPORA_TEXT.get(d, sorted(texts)[i % len(texts)])
               for i, d in enumerate(names)}
    missing = {d: t for d, t in mapping.items() if t not in texts}
    if missing:
        raise ValueError(f"text domains not on this machine: {missing} (have {sorted(texts)})")
    rng = np.random.default_rng([seed, 4])
    twins: dict[int, Twin] = {}
    for dom in names:
        idx = [i for i, d in enumerate(target.domains) if d == dom]
        longest = max(target.cuts[i] for i in idx)
        prompts = chunk_requests(mapping[dom], texts[mapping[dom]], tok, len(idx), longest, rng)
        for i, req in zip(idx, prompts, strict=True):
            twins[i] = Twin(dom, req.ids[: target.cuts[i]],
                            len(target.requests[i]) - target.cuts[i])
    return [twins[i] for i in range(len(target.requests))]


def route_twins(source: TokenHashRouting, twins: Sequence[Twin]) -> Routed:
    """Route each twin through the emulator's own API: route_prompt, then continuation."""
    requests = []
    for i, twin in enumerate(twins):
        prompt = source.route_prompt(twin.prompt, None)
        stream = source.continuation(twin.prompt, None, seed=i)
        decode = np.stack([e for _, e in itertools.islice(stream, twin.decode_tokens)])
        requests.append(np.concatenate([prompt, decode]).astype(np.int64))
    return Routed(requests, [t.domain for t in twins], [len(t.prompt) for t in twins],
                  source.geometry)


# -- fit -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Weights:
    """The token-hash weights a column or grid point uses (see TokenHashRouting._hidden)."""

    topic_mix: float = TOPIC_MIX
    opening_share: float = TOPIC_OPENING_SHARE
    opening_tokens: int = TOPIC_OPENING_TOKENS
    token_noise_mix: float = TOKEN_NOISE_MIX
    core_mix: float = CORE_MIX
    answer_shift_mix: float = ANSWER_SHIFT_MIX

    @classmethod
    def parse(cls, spec: str) -> Weights:
        """`topic,noise,core[,opening_share,opening_tokens[,answer_shift]]`; e.g. 0.7,0,0 =
        the router before the noise, opening and answer terms."""
        v = _floats(spec)
        if len(v) not in (3, 5, 6):
            raise ValueError(f"weights {spec!r}: want topic,noise,core[,share,tokens[,shift]]")
        share, tokens = (v[3], int(v[4])) if len(v) >= 5 else (0.0, TOPIC_OPENING_TOKENS)
        return cls(v[0], share, tokens, v[1], v[2], v[5] if len(v) == 6 else 0.0)

    def router(self, geometry: ModelGeometry, tok: Tokenizer, seed: int) -> TokenHashRouting:
        return TokenHashRouting(geometry, tok, seed=seed, topic_mix=self.topic_mix,
                                opening_share=self.opening_share,
                                opening_tokens=self.opening_tokens,
                                token_noise_mix=self.token_noise_mix, core_mix=self.core_mix,
                                answer_shift_mix=self.answer_shift_mix)

    def label(self) -> str:
        opening = (f" o{self.opening_share:g}/{self.opening_tokens}" if self.opening_share
                   else "")
        return (f"t{self.topic_mix:g}{opening} n{self.token_noise_mix:g}"
                f"{f' c{self.core_mix:g}' if self.core_mix else ''}"
                f"{f' s{self.answer_shift_mix:g}' if self.answer_shift_mix else ''}")


class TwinParts:
    """A router's weight-free parts (`RouterParts`) for every twin's prompt + decode tokens
    (the continuation's own bigram walk), so that each candidate weighting costs one `mix` +
    top-k. Equal to the API's routing up to the float rounding of running sums taken in one
    pass instead of per 32-token chunk. The opening length is the router's."""

    def __init__(self, source: TokenHashRouting, twins: Sequence[Twin]) -> None:
        self.source = source
        parts = []
        for i, twin in enumerate(twins):
            walk = BigramWalk(twin.prompt, i, source.tokenizer.eos_token_id)
            ids = twin.prompt + [walk.next_token() for _ in range(twin.decode_tokens)]
            parts.append(source._parts(ids, _ContextState.empty())[0])
        self.parts = RouterParts(*(np.concatenate(p) for p in zip(*parts, strict=True)))
        # Each decode row's task direction (TokenHashRouting.answer_shift), 0 on prompt rows.
        self.shift_rows = np.concatenate([
            np.concatenate([np.zeros((len(t.prompt), EMBED_DIM), dtype=np.float32),
                            np.repeat(source.answer_shift(t.prompt)[None, :], t.decode_tokens,
                                      axis=0)]) for t in twins])
        self.bounds = np.cumsum([0, *(len(p.local) for p in parts)])
        self.cuts = [len(t.prompt) for t in twins]
        self.domains = [t.domain for t in twins]

    def routed(self, w: Weights) -> Routed:
        if w.opening_tokens != self.source.opening_tokens:
            raise ValueError("parts were computed for another opening length")
        parts = self.parts._replace(local=self.parts.local.copy())
        hidden = self.source.mix(parts, w.topic_mix, w.opening_share, w.token_noise_mix,
                                 w.core_mix)
        if w.answer_shift_mix:
            hidden += w.answer_shift_mix * self.shift_rows
        experts = self.source._top_k(hidden).astype(np.int64)
        return Routed([experts[a:b] for a, b in itertools.pairwise(self.bounds)],
                      self.domains, self.cuts, self.source.geometry)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@dataclass
class Setup:
    """One seed's trace subsample, its statistics and its token-hash twins."""

    seed: int
    target: Routed
    target_stats: dict[str, float]
    twins: list[Twin]


def make_setups(args: argparse.Namespace, trace: RoutingTrace, tok: Tokenizer) -> list[Setup]:
    out = []
    for seed in _ints(args.seeds):
        target = trace_routed(trace, args.per_domain, seed)
        twins = (workload_twins(target, tok, seed) if args.text == "workload"
                 else corpora_twins(target, tok, seed))
        out.append(Setup(seed, target, compute_stats(target, seed, args.pairs, args.trials),
                         twins))
    return out


def run_fit(args: argparse.Namespace, setups: list[Setup], tok: Tokenizer) -> None:
    """Every grid point on every seed (the router seed = the seed); loss of the seed-averaged
    statistics against the seed-averaged trace statistics."""
    target = mean_stats([s.target_stats for s in setups])
    lengths = [int(x) for x in _floats(args.fit_opening_tokens)]
    grid = [Weights(t, b, w, n, c, a) for w in lengths for t in _floats(args.fit_topic)
            for b in _floats(args.fit_opening_share) for n in _floats(args.fit_noise)
            for c in _floats(args.fit_core) for a in _floats(args.fit_answer_shift)
            if b > 0 or w == lengths[0]]   # with no opening share its length is moot
    print(f"fit: {len(grid)} grid points x {len(setups)} seeds; loss = mean squared relative "
          f"error over the {len(FITTED)} rows")
    results = []
    parts: dict[int, list[TwinParts]] = {}
    for point in grid:
        if point.opening_tokens not in parts:
            parts[point.opening_tokens] = [
                TwinParts(Weights(opening_tokens=point.opening_tokens).router(
                    s.target.geometry, tok, s.seed), s.twins) for s in setups]
        stats = mean_stats([compute_stats(p.routed(point), s.seed, args.pairs, args.trials)
                            for p, s in zip(parts[point.opening_tokens], setups, strict=True)])
        loss = fit_loss(stats, target)
        worst = max((abs(rel_err(stats[k], target[k])), k) for k in FITTED)
        results.append((loss, point, worst))
        print(f"  {point.label():28} loss {loss:.4f}  worst {worst[1]} {worst[0]:.3f}",
              flush=True)
    print("\nbest grid points (t topic_mix, o opening_share/opening_tokens, n token_noise_mix, "
          "c core_mix, s answer_shift_mix):")
    for loss, point, worst in sorted(results, key=lambda r: r[0])[:8]:
        print(f"  {point.label():28} loss {loss:.4f}  worst {worst[1]} {worst[0]:.3f}")


# -- report --------------------------------------------------------------------------------
def print_table(columns: list[tuple[str, dict[str, float]]], target: dict[str, float]) -> int:
    """Trace, then each token-hash column with its relative error; the verdict is for the
    last column. Returns how many rows fail."""
    head = f"{'statistic':46} {'trace':>7}"
    for name, _ in columns:
        head += f" {name:>11} {'rel err':>8}"
    print(head + "  verdict")
    fails = 0
    for key, label in STATS:
        line = f"{label:46} {target[key]:7.3f}"
        err = 0.0
        for _, stats in columns:
            err = rel_err(stats[key], target[key])
            line += f" {stats[key]:11.3f} {err:+8.1%}"
        ok = abs(err) <= PASS_REL_ERR
        fails += not ok
        print(line + ("  PASS" if ok else "  FAIL"))
    for key, label in INFO:
        line = f"{label:46} {target[key]:7.3f}"
        for _, stats in columns:
            line += f" {stats[key]:11.3f} {rel_err(stats[key], target[key]):+8.1%}"
        print(line)
    return fails


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace-path", default=None)
    ap.add_argument("--per-domain", type=int, default=None,
                    help="at most this many trace requests per domain (seeded subsample)")
    ap.add_argument("--seeds", default="0",
                    help="comma-separated; each draws the subsample, the twin prompts, the "
                         "router, pairs, halves and batches; statistics are averaged")
    ap.add_argument("--pairs", type=int, default=60_000, help="random token pairs per seed")
    ap.add_argument("--trials", type=int, default=100, help="batches per domain and mixed")
    ap.add_argument("--text", choices=("workload", "corpora"), default="workload",
                    help="twin prompts: the load generator's workloads or the offline corpora")
    ap.add_argument("--geometry", default=None,
                    help="route the token-hash twins on this geometry instead of the trace's "
                         "(e.g. Qwen3-30B-A3B: how the fitted weights carry over; relative "
                         "errors then compare different models)")
    ap.add_argument("--weights", type=Weights.parse, default=Weights(),
                    metavar="T,N,C[,B,W[,S]]", help="the token-hash column's topic_mix, "
                    "token_noise_mix, core_mix[, opening_share, opening_tokens[, "
                    "answer_shift_mix]]; default: the emulator's constants")
    ap.add_argument("--compare", action="append", type=Weights.parse, default=[],
                    metavar="T,N,C[,B,W[,S]]", help="an extra token-hash column (repeatable); "
                    "0.7,0,0 is the router before the noise and opening terms")
    ap.add_argument("--fit", action="store_true", help="grid-search the weights")
    # Default grid: the one that fitted the emulator's constants (routing.TOPIC_MIX).
    ap.add_argument("--fit-topic", default="0.2,0.25,0.3")
    ap.add_argument("--fit-opening-share", default="0.9,1")
    ap.add_argument("--fit-opening-tokens", default="6,8")
    ap.add_argument("--fit-noise", default="0.4,0.45,0.5")
    ap.add_argument("--fit-core", default="0")
    ap.add_argument("--fit-answer-shift", default="0,0.25,0.3,0.35")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fit and args.geometry:
        parser.error("--fit fits at the trace's own geometry; drop --geometry")
    started = time.perf_counter()
    trace = RoutingTrace.load(Path(args.trace_path) if args.trace_path else default_trace_path())
    geometry = geometry_by_name(args.geometry) if args.geometry else trace.geometry
    tok = Tokenizer()
    setups = make_setups(args, trace, tok)
    first = setups[0].target
    g = trace.geometry
    print(f"trace geometry {g.name} ({g.num_layers} layers x {g.num_experts} experts, "
          f"top-{g.top_k}); token-hash geometry {geometry.name} ({geometry.num_layers} x "
          f"{geometry.num_experts}, top-{geometry.top_k}; chance overlap "
          f"{geometry.top_k / geometry.num_experts:.3f}); {len(first.requests)} trace requests, "
          f"{sum(len(r) for r in first.requests)} tokens (seed {setups[0].seed}); domains "
          f"{ {d: first.domains.count(d) for d in sorted(set(first.domains))} }; seeds "
          f"{args.seeds}; {args.pairs} pairs, {args.trials} batches per row; twin text: "
          f"{args.text}")
    print("prefill-vs-decode: trace = first int(0.5 x length) tokens vs the rest (the trace has "
          "no boundary); token-hash = prompt tokens vs emulator output tokens")
    if args.fit:
        run_fit(args, setups, tok)
        return 0
    columns = []
    for i, w in enumerate([*args.compare, args.weights]):
        runs = [compute_stats(route_twins(w.router(geometry, tok, s.seed), s.twins), s.seed,
                              args.pairs, args.trials) for s in setups]
        columns.append((w.label() if i < len(args.compare) else "token-hash", mean_stats(runs)))
    w = args.weights
    print(f"token-hash = topic_mix {w.topic_mix:g}, opening_share {w.opening_share:g} of the "
          f"first {w.opening_tokens} tokens, token_noise_mix {w.token_noise_mix:g}, core_mix "
          f"{w.core_mix:g}, answer_shift_mix {w.answer_shift_mix:g}"
          f"{' (the emulator defaults)' if w == Weights() else ''}\n")
    fails = print_table(columns, mean_stats([s.target_stats for s in setups]))
    print(f"\ntoken-hash: {len(STATS) - fails}/{len(STATS)} rows within {PASS_REL_ERR:.0%}; "
          f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

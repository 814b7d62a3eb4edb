"""Calibrate the token-hash router's topic weight against real routing. Rerunnable; prints the grid.

The real routing trace (DeepSeek-V2-Lite on the ESFT data, 4 task domains) is the only real
routing we have, so the locality of `token-hash` is fitted on that geometry and then applied
unchanged to every other geometry. Both sides go through the SAME measurement as
benchmarks/emulator_locality.py (its functions, not a copy):

- target: the trace, decode batches of 16 (the smaller ESFT domains hold 17-20 requests),
  mixed-domain / same-domain distinct experts per layer (primary), and the prefill-vs-decode
  cosine for the same request / another request of the same domain / another domain
  (secondary check, printed, not fitted);
- candidate: token-hash on the DeepSeek-V2-Lite geometry (26 layers, 64 experts, top-6) over
  the 4 offline text domains, batch 16, for each `topic_mix` in the grid, averaged over
  `--seeds` seeds (each seed draws other prompts, other batches and another router).

The chosen value is the grid point whose mean ratio is nearest the target. Only routing
statistics are used: no gateway or routing-policy result enters the fit.

    python benchmarks/calibrate_token_hash.py [--grid 0,0.1,...] [--seeds 3] [--trials 5]
"""

from __future__ import annotations

import os

# Before numpy loads (see emulator_locality.py): one BLAS thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from emulator_locality import (  # same directory
    build_parser,
    chunk_requests,
    domain_texts,
    run_token_hash,
    run_trace,
)

from loadtest.emulator.routing import RoutingTrace, TokenHashRouting, default_trace_path
from loadtest.emulator.tokenizer import Tokenizer
from zones.geometry import geometry_by_name

CALIBRATION_GEOMETRY = "DeepSeek-V2-Lite"   # the geometry of the real trace
CALIBRATION_BATCH = 16                      # the largest batch the trace's domains allow
DEFAULT_GRID = (0.0, 0.2, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)


@dataclass(frozen=True)
class Stats:
    """One source's calibration statistics."""

    same: float              # distinct experts per layer, same-domain batches
    mixed: float             # distinct experts per layer, mixed-domain batches
    cos_same_req: float
    cos_same_dom: float
    cos_other_dom: float

    @property
    def ratio(self) -> float:
        return self.mixed / self.same


def _stats(loc: list[tuple], corr: list[tuple]) -> Stats:
    by_label = {row[1]: row for row in loc}
    same = by_label["same-domain (all)"][2]
    mixed = next(row[2] for row in loc if row[1].startswith("mixed"))
    cos = next(row for row in corr if row[1] == "cosine")
    return Stats(same, mixed, cos[2], cos[3], cos[4])


def measure_trace(base: argparse.Namespace, seeds: Sequence[int]) -> Stats:
    runs = []
    for seed in seeds:
        args = argparse.Namespace(**{**vars(base), "seed": seed})
        loc, corr, _ = run_trace(args, np.random.default_rng(seed))
        runs.append(_stats(loc, corr))
    return _mean(runs)


def measure_token_hash(base: argparse.Namespace, topic_mix: float, seeds: Sequence[int]
                       ) -> tuple[Stats, float]:
    """Mean stats over seeds, and the standard deviation of the ratio across seeds."""
    runs = []
    for seed in seeds:
        args = argparse.Namespace(**{**vars(base), "seed": seed, "topic_mix": topic_mix})
        loc, corr, _ = run_token_hash(args, np.random.default_rng(seed))
        runs.append(_stats(loc, corr))
    return _mean(runs), float(np.std([r.ratio for r in runs]))


def _mean(runs: list[Stats]) -> Stats:
    return Stats(*(float(np.mean([getattr(r, f) for r in runs]))
                   for f in ("same", "mixed", "cos_same_req", "cos_same_dom", "cos_other_dom")))


def pair_overlap(rows: np.ndarray, request: np.ndarray, domain: np.ndarray, pairs: int,
                 rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean share of top-k experts two random tokens have in common (over layers), for token
    pairs of the same request / other requests of the same domain / other domains."""
    tokens, layers, k = rows.shape
    used = np.zeros((tokens, layers, int(rows.max()) + 1), dtype=bool)
    used[np.arange(tokens)[:, None, None], np.arange(layers)[None, :, None], rows] = True
    flat = used.reshape(tokens, -1)
    a, b = rng.integers(tokens, size=pairs), rng.integers(tokens, size=pairs)
    shared = (flat[a] & flat[b]).sum(axis=1) / (layers * k)
    same_req = (request[a] == request[b]) & (a != b)
    same_dom = (domain[a] == domain[b]) & (request[a] != request[b])
    return (float(shared[same_req].mean()), float(shared[same_dom].mean()),
            float(shared[domain[a] != domain[b]].mean()))


def trace_pair_overlap(trace_path: str | None, rng: np.random.Generator
                       ) -> tuple[float, float, float]:
    trace = RoutingTrace.load(trace_path or default_trace_path())
    lengths = np.diff(trace.offsets)
    request = np.repeat(np.arange(trace.num_requests), lengths)
    domain = np.array(trace.domains)[request]
    return pair_overlap(trace.expert_ids.astype(np.int64), request, domain, 200_000, rng)


def token_hash_pair_overlap(topic_mix: float, prompt_tokens: int, rng: np.random.Generator
                            ) -> tuple[float, float, float]:
    """The same statistic over token-hash prompt routing, 8 prompts per text domain."""
    tok = Tokenizer()
    source = TokenHashRouting(geometry_by_name(CALIBRATION_GEOMETRY), tok, topic_mix=topic_mix)
    rows, request, domain = [], [], []
    for name, text in domain_texts().items():
        for req in chunk_requests(name, text, tok, 8, prompt_tokens, rng):
            routed = source.route_prompt(req.ids, None)
            rows.append(routed)
            request += [len(rows)] * len(routed)
            domain += [name] * len(routed)
    return pair_overlap(np.concatenate(rows).astype(np.int64), np.array(request),
                        np.array(domain), 200_000, rng)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", default=",".join(str(g) for g in DEFAULT_GRID),
                    help="comma-separated topic_mix values to try, each in [0, 1)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per grid point (0..n-1)")
    ap.add_argument("--trials", type=int, default=5, help="random batches per row and seed")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--trace-path", default=None)
    args = ap.parse_args(argv)
    try:
        grid = [float(g) for g in args.grid.split(",") if g.strip()]
    except ValueError:
        ap.error(f"--grid must be comma-separated numbers, got {args.grid!r}")
    if not grid or any(not 0.0 <= g < 1.0 for g in grid):
        ap.error(f"--grid values must be in [0, 1), got {args.grid!r}")
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    base = build_parser().parse_args([
        "--model", CALIBRATION_GEOMETRY, "--batch", str(CALIBRATION_BATCH),
        "--trace-batch", str(CALIBRATION_BATCH), "--trials", str(args.trials),
        "--steps", str(args.steps),
        *(["--trace-path", args.trace_path] if args.trace_path else [])])
    seeds = list(range(args.seeds))

    target = measure_trace(base, seeds)
    print(f"geometry {CALIBRATION_GEOMETRY}, decode batch {CALIBRATION_BATCH}, {args.steps} steps, "
          f"{args.trials} batches per row, seeds {seeds}")
    header = (f"{'source':22} {'same':>7} {'mixed':>7} {'ratio':>7} {'+-sd':>6}   "
              f"{'cos same req':>12} {'same dom':>9} {'other dom':>10}")
    print(header)

    def line(name: str, s: Stats, sd: float | None) -> str:
        sd_text = f"{sd:6.3f}" if sd is not None else f"{'':6}"
        return (f"{name:22} {s.same:7.2f} {s.mixed:7.2f} {s.ratio:6.3f}x {sd_text}   "
                f"{s.cos_same_req:12.3f} {s.cos_same_dom:9.3f} {s.cos_other_dom:10.3f}")

    print(line("TARGET trace", target, None))
    results = []
    for t in grid:
        stats, sd = measure_token_hash(base, t, seeds)
        results.append((t, stats))
        print(line(f"token-hash topic={t:g}", stats, sd), flush=True)
    best_t, best = min(results, key=lambda r: abs(r[1].ratio - target.ratio))
    print(f"\nchosen topic_mix = {best_t:g}: ratio {best.ratio:.3f}x vs target "
          f"{target.ratio:.3f}x; cosine {best.cos_same_req:.3f} / {best.cos_same_dom:.3f} / "
          f"{best.cos_other_dom:.3f} vs target {target.cos_same_req:.3f} / "
          f"{target.cos_same_dom:.3f} / {target.cos_other_dom:.3f}")

    # Diagnostic, not fitted: do two tokens share experts the way real routing's tokens do?
    # (trace requests are short, median 70 tokens; token-hash prompts use 128 tokens here)
    g = geometry_by_name(CALIBRATION_GEOMETRY)
    print("\ntoken-pair expert overlap (share of top-k in common; chance = top_k / experts = "
          f"{g.top_k / g.num_experts:.3f})")
    print(f"{'source':22} {'same req':>9} {'same dom':>9} {'other dom':>10}")
    rng = np.random.default_rng(0)
    for name, values in (("trace", trace_pair_overlap(args.trace_path, rng)),
                         ("token-hash topic=0", token_hash_pair_overlap(0.0, 128, rng)),
                         (f"token-hash topic={best_t:g}",
                          token_hash_pair_overlap(best_t, 128, rng))):
        print(f"{name:22} {values[0]:9.3f} {values[1]:9.3f} {values[2]:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

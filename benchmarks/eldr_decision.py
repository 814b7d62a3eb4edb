"""Cost of one `eldr` decode decision: p50/p99 per decision, measured with perf_counter_ns.

Setup (target: select p99 < 100 us): 64 decode workers, one zone each, Qwen3-30B-A3B geometry
with every layer kept, so signatures have 48 x 128 = 6,144 dimensions. Centroids and signatures
are built from random non-negative count matrices through zones' real `SignatureSpec` /
`make_table`, so they have the same shape and sparsity class as real ones. Each timed call is the
whole `EldrPolicy.select` (snapshot read, plan-cache lookup, similarity product, band, Selection)
on a fresh in-flight vector; the candidate list and all 64 views are new every call (dispatch
reuses a worker's view while its counts are unchanged, so this is the costlier case).

Four measurements run interleaved in short rounds with the same signatures and loads: the
whole `select` for a full signature (cache and prefill sources) and for a predicted one (kept as
coordinates in the table predictor's rank-32 basis, `LowRankSignature`), the band alone
(`gateway.eldr.band.choose` on a prebuilt plan) and the BLAS sgemv alone (the similarity product
inside it), so the report shows where the time goes. The verdict is on full signatures, the
costlier case.

    python benchmarks/eldr_decision.py                 # defaults below
    python benchmarks/eldr_decision.py --decisions 200000 --json out.json
    python benchmarks/eldr_decision.py --blas-threads default   # BLAS picks its thread count
    python benchmarks/eldr_decision.py --data uniform   # every zone within tau: the worst case

Numbers depend on the machine and on how busy it is; report the machine with them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any

# BLAS threads must be fixed before numpy loads its BLAS. A decision is one small matrix-vector
# product on the event loop's thread; letting OpenBLAS fan it out to every core adds thread
# wake-up jitter to the tail (measured: see docs/benchmarks.md), so the gateway should run with one.
if __name__ == "__main__":
    _threads = "1"
    for _i, _a in enumerate(sys.argv):
        if _a == "--blas-threads" and _i + 1 < len(sys.argv):
            _threads = sys.argv[_i + 1]
        elif _a.startswith("--blas-threads="):
            _threads = _a.split("=", 1)[1]
    if _threads != "default":
        for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[_var] = _threads

import numpy as np

from gateway.eldr.band import build_plan, choose
from gateway.eldr.policy import EldrPolicy
from gateway.eldr.prompts import Prompt
from gateway.eldr.resolver import SignatureResolver
from gateway.eldr.runtime import ActiveZones
from gateway.routing import LowRankSignature, RoutingInput, WorkerView
from zones.geometry import KNOWN_GEOMETRIES
from zones.predictor import Predictor
from zones.signature import SignatureSpec
from zones.table import make_table

# A decision is a small share of a request's gateway CPU (~300 us) and nothing next to a decode
# step (tens of ms); 100 us at p99 keeps it that way on a loaded 2-core machine.
TARGET_P99_US = 100.0


@dataclass
class _Source:
    active: ActiveZones | None


def _percentiles(ns: Any) -> dict[str, float]:
    us = ns / 1000.0
    return {
        "p50_us": float(np.percentile(us, 50)),
        "p90_us": float(np.percentile(us, 90)),
        "p99_us": float(np.percentile(us, 99)),
        "p999_us": float(np.percentile(us, 99.9)),
        "max_us": float(us.max()),
        "mean_us": float(us.mean()),
    }


def _resolve_costs(
    active: ActiveZones, g: Any, rng: np.random.Generator, n: int
) -> dict[str, dict[str, float]]:
    """Cost of resolving a signature before the decision (gateway.eldr.resolver), per source:
    an exact cache hit and a partial hit (no predictor in this table, so the observed counts
    are used alone) for a 2,000-token prompt, and building a signature from prefill counts."""
    prompt_ids = rng.integers(0, 150_000, size=2_000).tolist()
    counts = rng.poisson(8.0, size=(g.num_layers, g.num_experts)).astype(np.int32)
    resolver = SignatureResolver(_Source(active))
    exact = Prompt("generate", input_ids=tuple(prompt_ids))
    resolver.learn_prefill(exact, counts)
    partial = Prompt("generate", input_ids=tuple(prompt_ids + [7] * 100))
    cases: dict[str, tuple[Prompt, Any]] = {
        "cache_exact_2k_tokens": (exact, None),
        "cache_partial_2k_tokens": (partial, None),
        "prefill_counts": (exact, counts),
    }
    out: dict[str, dict[str, float]] = {}
    for name, (prompt, prefill) in cases.items():
        expected = "prefill" if prefill is not None else "cache"
        assert resolver.resolve(prompt, prefill).signature_source == expected
        ns = np.empty(n, dtype=np.int64)
        for i in range(n):
            t0 = time.perf_counter_ns()
            resolver.resolve(prompt, prefill)
            ns[i] = time.perf_counter_ns() - t0
        out[name] = _percentiles(ns)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--geometry", default="Qwen3-30B-A3B", choices=sorted(KNOWN_GEOMETRIES))
    ap.add_argument("--decisions", type=int, default=50_000)
    ap.add_argument("--warmup", type=int, default=2_000)
    ap.add_argument("--signatures", type=int, default=512, help="distinct request signatures")
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument(
        "--data", choices=("clustered", "uniform"), default="clustered",
        help="signature structure (see the code); uniform is the band-size worst case",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument(
        "--blas-threads", default="1",
        help="OPENBLAS/OMP/MKL_NUM_THREADS for this run ('default' leaves them alone)",
    )
    args = ap.parse_args(argv)
    if args.workers < 1 or args.decisions < 1 or args.signatures < 1:
        ap.error("--workers, --decisions and --signatures must be >= 1")

    rng = np.random.default_rng(args.seed)
    g = KNOWN_GEOMETRIES[args.geometry]
    spec = SignatureSpec(
        g,
        rng.uniform(0.1, 3.0, size=(g.num_layers, g.num_experts)).astype(np.float32),
        np.ones(g.num_layers, dtype=bool),
    )

    if args.data == "uniform":
        # No structure: every signature is about equally similar to every centroid, so the band
        # (within tau of the best) holds most zones. The worst case for the band walk.
        def draw(n: int) -> np.ndarray:
            return rng.poisson(rng.gamma(0.5, 4.0, size=(n, g.num_layers, g.num_experts)))

        centroids, valid = spec.build_many(draw(args.workers))
        sig_counts = draw(args.signatures)
    else:
        # Clustered like real traffic: each zone's requests favour their own 16 experts per
        # layer (rate 3.0 vs 0.3 elsewhere); centroids are the zones' expected signatures.
        pref = np.zeros((args.workers, g.num_layers, g.num_experts), dtype=bool)
        for zone in range(args.workers):
            for layer in range(g.num_layers):
                pref[zone, layer, rng.choice(g.num_experts, size=16, replace=False)] = True
        rates = np.where(pref, 3.0, 0.3)
        centroids, valid = spec.build_many((rates * 100).astype(np.int64))
        zone_of = rng.integers(0, args.workers, size=args.signatures)
        sig_counts = rng.poisson(rates[zone_of])
    assert valid.all()
    workers = [f"http://10.0.0.{i}:30001" for i in range(args.workers)]
    # A predictor of the production shape (2,048 buckets, rank 32) with an orthonormal basis:
    # predicted signatures reach the policy as coordinates in it (LowRankSignature).
    rank = 32
    basis = np.linalg.qr(rng.standard_normal((spec.dim, rank)))[0].T.astype(np.float32)
    predictor = Predictor(2048, 128, rng.standard_normal((2048, rank)).astype(np.float32),
                          rng.standard_normal(rank).astype(np.float32), basis)
    table = make_table(spec, centroids, workers, tau=args.tau, predictor=predictor)
    sigs, ok = spec.build_many(sig_counts)
    sigs = sigs[ok]
    active = ActiveZones(table, tuple(workers), 1, time.time(), "bench")
    loads = rng.integers(0, 32, size=(args.decisions + args.warmup, args.workers)).tolist()
    policy = EldrPolicy()
    plan = build_plan(table.centroids, workers, [(w,) for w in workers])

    # Coordinates whose signatures lie near the centroids, like real predictions.
    low_rank = [LowRankSignature((basis @ sig).astype(np.float32), predictor.basis)
                for sig in sigs[: min(len(sigs), 512)]]

    def run_policy(n: int, offset: int, predicted: bool = False) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        for i in range(n):
            row = loads[offset + i]
            cands = [WorkerView(w, w, row[k], None) for k, w in enumerate(workers)]
            sig: Any = low_rank[i % len(low_rank)] if predicted else sigs[i % len(sigs)]
            routing = RoutingInput(sig, "predictor" if predicted else "cache", active)
            t0 = time.perf_counter_ns()
            policy.select(cands, routing)
            out[i] = time.perf_counter_ns() - t0
        return out

    def run_band(n: int, offset: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        for i in range(n):
            row = loads[offset + i]
            sig = sigs[i % len(sigs)]
            t0 = time.perf_counter_ns()
            choose(plan, sig, row, args.tau, 2)
            out[i] = time.perf_counter_ns() - t0
        return out

    def run_product(n: int, offset: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        for i in range(n):
            sig = sigs[(offset + i) % len(sigs)]
            t0 = time.perf_counter_ns()
            plan.negated_similarities(sig)
            out[i] = time.perf_counter_ns() - t0
        return out

    band_sizes = np.array([
        c.band_size for i in range(min(len(sigs), 2000))
        if (c := choose(plan, sigs[i], loads[i], args.tau, 2)) is not None
    ])
    run_policy(args.warmup, 0)
    run_band(args.warmup, 0)
    run_product(args.warmup, 0)
    gc.collect()
    # Interleave the measurements in short rounds (~1,000 decisions, tens of ms each) so that a
    # burst of machine noise lands on all of them alike rather than on whichever one happened
    # to be running.
    rounds = 50
    per = max(1, args.decisions // rounds)
    parts: dict[str, list[np.ndarray]] = {"select": [], "select_predicted": [],
                                          "band_core": [], "sgemv": []}
    for rnd in range(rounds):
        offset = args.warmup + rnd * per
        parts["select"].append(run_policy(per, offset))
        parts["select_predicted"].append(run_policy(per, offset, predicted=True))
        parts["band_core"].append(run_band(per, offset))
        parts["sgemv"].append(run_product(per, offset))
    resolve = _resolve_costs(active, g, rng, min(args.decisions, 5_000))
    timings = {name: _percentiles(np.concatenate(chunks)) for name, chunks in parts.items()}
    result: dict[str, Any] = {
        "workers": args.workers,
        "dim": int(spec.dim),
        "decisions": per * rounds,
        "tau": args.tau,
        "data": args.data,
        "band_size_mean": float(band_sizes.mean()),
        "band_size_p99": float(np.percentile(band_sizes, 99)),
        "blas_threads": args.blas_threads,
        **timings,
        "resolve": resolve,
        "target_p99_us": TARGET_P99_US,
        "machine": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
    }

    def line(name: str, r: dict[str, float]) -> str:
        return (f"{name:>28}: p50 {r['p50_us']:.1f} us  p90 {r['p90_us']:.1f}  "
                f"p99 {r['p99_us']:.1f}  p99.9 {r['p999_us']:.1f}  max {r['max_us']:.0f}")

    print(f"# {args.workers} workers, D={spec.dim}, {per * rounds} decisions, "
          f"{args.data} signatures, tau {args.tau}")
    print(line("select (whole policy)", timings["select"]))
    print(line("select, predicted (low-rank)", timings["select_predicted"]))
    print(line("band_core (choose)", timings["band_core"]))
    print(line("sgemv alone", timings["sgemv"]))
    for name, r in resolve.items():
        print(f"{'resolve ' + name:>28}: p50 {r['p50_us']:.1f} us  p99 {r['p99_us']:.1f}")
    print(f"band size: mean {band_sizes.mean():.1f}, p99 {np.percentile(band_sizes, 99):.0f}")
    p99 = timings["select"]["p99_us"]
    print(f"target select p99 < {TARGET_P99_US:.0f} us: "
          f"{'met' if p99 < TARGET_P99_US else 'NOT met'} (p99 {p99:.1f} us)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Several gateway replicas against one: TPOT and load balance, per router, over seeds.

Reads `loadtest compare --gateway-replicas N --seeds ...` output directories (one per N, the
same seeds, workload and routers) and prints, per router and N, the median over seeds of
TPOT p50 / p99 relative to the same router and seed with 1 replica (two-level bootstrap 95%
interval, loadtest.multiseed.bootstrap_interval), and the median load CV:

    python benchmarks/replicas_summary.py --base results/replicas/r1 \
        results/replicas/r2 results/replicas/r4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import orjson

from loadtest.multiseed import RunSamples, bootstrap_interval, read_comparison


def _seed_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("seed-*") if (p / "results.json").is_file())


def _runs(root: Path) -> tuple[int, dict[tuple[int, str], RunSamples]]:
    """(replicas, {(seed, router): run}) of one --gateway-replicas directory."""
    out: dict[tuple[int, str], RunSamples] = {}
    replicas = 1
    for d in _seed_dirs(root):
        meta, runs = read_comparison(d)
        opts = meta.get("options") or {}
        replicas = int(opts.get("gateway_replicas") or 1)
        for r in runs:
            out[(int(opts.get("seed") or 0), r.router)] = r
    return replicas, out


def _pct(v: float) -> str:
    return f"{v * 100:+.1f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="the 1-replica directory")
    ap.add_argument("dirs", type=Path, nargs="+", help="N-replica directories")
    args = ap.parse_args(argv)
    _, base = _runs(args.base)
    rng = np.random.default_rng(0)
    rows = ["| router | replicas | seeds | TPOT p50 vs 1 replica | TPOT p99 vs 1 replica "
            "| load CV (1 replica) | VOID |", "|---|---|---|---|---|---|---|"]
    for d in [args.base, *args.dirs]:
        replicas, runs = _runs(d)
        for router in sorted({r for _, r in runs}):
            pairs = [(runs[k].tpot, base[k].tpot) for k in sorted(runs)
                     if k[1] == router and k in base]
            if not pairs:
                continue
            p50 = bootstrap_interval(pairs, 50, rng)
            p99 = bootstrap_interval(pairs, 99, rng)
            cv = np.median([runs[k].load_cv or 0.0 for k in runs if k[1] == router])
            cv1 = np.median([base[k].load_cv or 0.0 for k in base if k[1] == router])
            void = sum(runs[k].void for k in runs if k[1] == router)
            rows.append(
                f"| {router} | {replicas} | {len(pairs)} | {_pct(p50.median)} "
                f"[{_pct(p50.low)}, {_pct(p50.high)}] | {_pct(p99.median)} "
                f"[{_pct(p99.low)}, {_pct(p99.high)}] | {cv:.3f} ({cv1:.3f}) | {void} |")
    print("\n".join(rows))
    absolute = {str(d): {f"{k[0]}:{k[1]}": [float(np.median(v.tpot)) * 1e3,
                                            float(np.percentile(v.tpot, 99)) * 1e3]
                         for k, v in _runs(d)[1].items()}
                for d in [args.base, *args.dirs]}
    print(orjson.dumps(absolute).decode(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

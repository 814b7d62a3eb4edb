"""One router against another over seeds: TTFT and TPOT, median change and 95% interval.

For comparisons the eldr headline (`python -m loadtest seeds`) does not make, e.g. two prefill
policies in front of the same decode policy:

    python benchmarks/pair_summary.py results/multiturn/seed-* \
        --a gateway:eldr+prefill-policy=cache_aware --b gateway:eldr

prints, for each statistic, the median over seeds of stat(A) / stat(B) - 1 with the two-level
bootstrap interval of loadtest/multiseed.py (negative: A lower).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from loadtest.multiseed import STATS, bootstrap_interval, read_comparison


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", type=Path, nargs="+", help="loadtest compare seed directories")
    ap.add_argument("--a", required=True, help="router name, as in --routers")
    ap.add_argument("--b", required=True, help="router name, as in --routers")
    args = ap.parse_args(argv)
    pairs = []
    for d in args.dirs:
        _, runs = read_comparison(d)
        by_name = {r.router: r for r in runs}
        if args.a in by_name and args.b in by_name:
            pairs.append((by_name[args.a], by_name[args.b]))
    if not pairs:
        print(f"error: no directory has both {args.a} and {args.b}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    print(f"{args.a} vs {args.b}, {len(pairs)} seeds")
    for name, (field, q) in STATS.items():
        i = bootstrap_interval([(a.values(field), b.values(field)) for a, b in pairs], q, rng)
        per = ", ".join(f"{v * 100:+.1f}%" for v in i.per_seed)
        print(f"  {name}: {i.median * 100:+.1f}% [{i.low * 100:+.1f}%, {i.high * 100:+.1f}%]"
              f"  (per seed {per})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ELDR vs least_load on the emulated PD cluster, identical arrivals: where do domains go, and
how many distinct experts does a decode step touch?

    python benchmarks/eldr_e2e_locality.py                       # both flows, test settings
    python benchmarks/eldr_e2e_locality.py --flows dual --requests 128 --max-batch-size 8

One in-process cluster (2 prefill + 4 decode by default): calibration traffic through a
least_load gateway with routed experts -> calibration log -> `zones fit` (one zone per decode
worker + text predictor), then for each flow one least_load and one eldr gateway on the same
conversations, all starting at t=0, with decode batches capped so both policies run (nearly)
the same batch sizes. Prints, per run, the requests per decode worker per domain (from the
gateway's own calibration log), the emulator's distinct experts per layer per decode step and
mean batch (`/emulator/stats` deltas), and the eldr / least_load ratios. Nothing here is tuned;
it is the harness of `tests/eldr_e2e/test_locality_e2e.py` with its settings as defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.eldr_e2e

from tests.eldr_e2e.harness import (
    E2EConfig,
    batch_adjusted_distinct,
    chance_majority_share,
    format_outcome,
    locality_experiment,
    mean_majority_share,
)
from zones.geometry import geometry_by_name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = E2EConfig()
    for f in fields(E2EConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                            default=getattr(defaults, f.name))
    parser.add_argument("--flows", nargs="+", default=["dual", "prefill-first"],
                        choices=["dual", "prefill-first"])
    parser.add_argument("--out", type=Path, default=None, help="keep logs and table here")
    args = parser.parse_args()
    cfg = E2EConfig(**{f.name: getattr(args, f.name) for f in fields(E2EConfig)})
    out = args.out or Path(tempfile.mkdtemp(prefix="eldr-e2e-"))
    started = time.perf_counter()
    outcomes = asyncio.run(locality_experiment(cfg, out, args.flows))
    print(f"config: {cfg}")
    for o in outcomes.values():
        print(format_outcome(o))
    for flow in args.flows:
        base, eldr = outcomes[(flow, "least_load")], outcomes[(flow, "eldr")]
        sizes = [sum(c.values()) for c in eldr.per_domain.values()]
        chance = chance_majority_share(sizes, cfg.decode, quantile=0.999)
        d0, d1 = base.cluster.distinct_experts_per_step, eldr.cluster.distinct_experts_per_step
        b0, b1 = base.cluster.mean_batch_size, eldr.cluster.mean_batch_size
        ref = batch_adjusted_distinct(d0, b0, b1, geometry_by_name(cfg.model).num_experts) \
            if d0 and b0 and b1 else float("nan")
        print(f"RATIO {flow}: eldr / least_load distinct experts per step "
              f"{(d1 or 0) / (d0 or 1):.3f}, mean batch {(b1 or 0) / (b0 or 1):.3f}, "
              f"batch-adjusted {(d1 or 0) / ref:.3f}; "
              f"majority share eldr {mean_majority_share(eldr.per_domain):.2f}, least_load "
              f"{mean_majority_share(base.per_domain):.2f}, chance q99.9 {chance:.2f}")
    print(f"wall {time.perf_counter() - started:.0f}s; logs and table in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m loadtest seeds DIR...`: the eldr headline over several seeds, with 95% intervals.

One `loadtest compare` run is worth about +-5% on TPOT (the same code and seed measured -10.4%
and then -8.2%), so no headline may rest on one. This module reads several comparison
directories that differ only in `--seed` (`loadtest compare --seeds 0 1 2` writes them as
OUT/seed-N) and reports, per point (rate) and eldr variant, the relative change against the best
load-only router *of that seed at that point, for that statistic* (the non-VOID load-only run
lowest on it: a router with the best median can have the worst tail, and measuring eldr's p99
against it would flatter eldr):

    change_s = stat(eldr requests of seed s) / stat(baseline requests of seed s) - 1
    headline = median over seeds of change_s

The 95% interval is a two-level (hierarchical) percentile bootstrap: each replicate draws the
seeds with replacement, then each drawn run's requests with replacement, and takes the median
over seeds of the per-seed changes. It carries both sources of noise, seed to seed (workload,
arrivals, zone fit) and request to request within a run (what makes a p99 of 300 requests
shaky). With 3 seeds the seed level is coarse; the interval is then wider than a t-interval on
three numbers would suggest only when the seeds disagree, which is the point.

Stats: median and p99 TPOT, median TTFT, from each run's `requests.jsonl` (successful requests;
`tpot` and `ttft` as `sglang.bench_serving` defines them, see loadtest/driver.py). Also shown,
median over seeds: finished-requests CV per decode worker (load CV) and the achieved steady-state
mean decode batch (loadtest.compare.steady_window) next to the planned one. The pure core
(`relative_change`, `bootstrap_interval`, `headline_rows`) takes arrays; the shell reads
directories and writes summary.md/summary.json.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

FloatArray = npt.NDArray[np.float64]

# name -> (request field, percentile)
STATS: dict[str, tuple[str, float]] = {
    "tpot_p50": ("tpot", 50.0),
    "tpot_p99": ("tpot", 99.0),
    "ttft_p50": ("ttft", 50.0),
}
BOOTSTRAP_REPLICATES = 2000
CONFIDENCE = 0.95


class SeedsError(ValueError):
    """A comparison directory is missing or malformed; the message names the file."""


@dataclass(frozen=True, slots=True)
class RunSamples:
    """One router at one point of one seed."""

    router: str
    rate: float
    void: bool
    tpot: FloatArray  # seconds, successful requests
    ttft: FloatArray
    load_cv: float | None
    mean_batch: float | None  # steady-state mean decode batch (ramp-up and drain excluded)

    def values(self, field: str) -> FloatArray:
        return self.tpot if field == "tpot" else self.ttft


@dataclass(frozen=True, slots=True)
class Interval:
    median: float  # median over seeds of the per-seed relative change
    low: float
    high: float
    per_seed: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class HeadlineRow:
    rate: float
    eldr_router: str
    seeds: int
    baselines: tuple[str, ...]  # each seed's load-only router best on median TPOT
    changes: dict[str, Interval]
    eldr_load_cv: float | None  # median over seeds
    baseline_load_cv: float | None
    eldr_mean_batch: float | None
    # The baseline's (best on median TPOT) steady batch: what the rate plan aims at. eldr's is
    # lower at the same rate when its steps are shorter (requests leave sooner).
    baseline_mean_batch: float | None
    planned_batch: float | None


# ------------------------------------------------------------------ pure core


def relative_change(new: FloatArray, base: FloatArray, q: float) -> float:
    """percentile_q(new) / percentile_q(base) - 1 (numpy's linear percentile, as the driver)."""
    b = float(np.percentile(base, q))
    return float(np.percentile(new, q)) / b - 1.0 if b > 0 else math.nan


def bootstrap_interval(
    pairs: Sequence[tuple[FloatArray, FloatArray]],
    q: float,
    rng: np.random.Generator,
    replicates: int = BOOTSTRAP_REPLICATES,
    confidence: float = CONFIDENCE,
) -> Interval:
    """Median over seeds of the relative change of percentile `q`, and its two-level bootstrap
    interval. `pairs[s]` = (eldr samples, baseline samples) of seed s; each needs >= 1 value."""
    if not pairs or any(len(a) == 0 or len(b) == 0 for a, b in pairs):
        raise ValueError("every seed needs samples for both routers")
    per_seed = tuple(relative_change(a, b, q) for a, b in pairs)
    # Per seed and per side, `replicates` resampled percentiles (vectorised: one fancy index).
    boot = np.empty((len(pairs), replicates))
    for s, (a, b) in enumerate(pairs):
        pa = np.percentile(a[rng.integers(0, len(a), (replicates, len(a)))], q, axis=1)
        pb = np.percentile(b[rng.integers(0, len(b), (replicates, len(b)))], q, axis=1)
        boot[s] = pa / pb - 1.0
    # Seed level: replicate r uses seeds drawn with replacement (their request-level draw r).
    drawn = rng.integers(0, len(pairs), (replicates, len(pairs)))
    medians = np.median(boot[drawn, np.arange(replicates)[:, None]], axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(medians, [tail, 1.0 - tail])
    return Interval(float(np.median(per_seed)), float(low), float(high), per_seed)


def best_load_only(runs: Sequence[RunSamples], load_only: Sequence[str],
                   stat: str = "tpot_p50") -> RunSamples | None:
    """The non-VOID load-only run with samples that is best (lowest) on `stat`."""
    field, q = STATS[stat]
    pool = [r for r in runs if r.router in load_only and not r.void and len(r.tpot)]
    return min(pool, key=lambda r: float(np.percentile(r.values(field), q))) if pool else None


def _median(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return float(np.median(got)) if got else None


def headline_rows(
    seeds: Sequence[Sequence[RunSamples]],
    load_only: Sequence[str],
    rng: np.random.Generator,
    planned_batch: dict[float, float] | None = None,
    replicates: int = BOOTSTRAP_REPLICATES,
) -> list[HeadlineRow]:
    """Per (rate, eldr variant) present in every seed: each stat's median change and interval.

    A seed where the eldr run is VOID, or no load-only baseline exists, is left out of that
    row (its `seeds` count says how many remained)."""
    rows = []
    rates = sorted(set.intersection(*({r.rate for r in s} for s in seeds))) if seeds else []
    for rate in rates:
        variants = sorted({r.router for s in seeds for r in s if r.rate == rate
                           and "eldr" in r.router})
        for variant in variants:
            # Per seed: the eldr run and, for each stat, the load-only run best on THAT stat
            # (a router with the best median can have the worst tail; comparing eldr's p99 to
            # it would flatter eldr).
            per_seed: list[tuple[RunSamples, dict[str, RunSamples]]] = []
            for runs in seeds:
                at = [r for r in runs if r.rate == rate]
                eldr = next((r for r in at if r.router == variant), None)
                bases = {stat: best_load_only(at, load_only, stat) for stat in STATS}
                if eldr is None or eldr.void or not len(eldr.tpot):
                    continue
                if any(b is None for b in bases.values()):
                    continue
                per_seed.append((eldr, {k: b for k, b in bases.items() if b is not None}))
            if not per_seed:
                continue
            changes = {
                name: bootstrap_interval(
                    [(e.values(field), b[name].values(field)) for e, b in per_seed], q, rng,
                    replicates)
                for name, (field, q) in STATS.items()
            }
            rows.append(HeadlineRow(
                rate, variant, len(per_seed),
                tuple(b["tpot_p50"].router for _, b in per_seed), changes,
                _median([e.load_cv for e, _ in per_seed]),
                _median([b["tpot_p50"].load_cv for _, b in per_seed]),
                _median([e.mean_batch for e, _ in per_seed]),
                _median([b["tpot_p50"].mean_batch for _, b in per_seed]),
                (planned_batch or {}).get(rate),
            ))
    return rows


# ------------------------------------------------------------------ I/O shell


def _samples(path: Path, field: str) -> FloatArray:
    values = []
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        rec = orjson.loads(line)
        v = rec.get(field)
        if rec.get("success") and isinstance(v, (int, float)):
            values.append(float(v))
    return np.asarray(values, dtype=np.float64)


def read_comparison(directory: Path) -> tuple[dict[str, Any], list[RunSamples]]:
    """`results.json` and every run's requests of one `loadtest compare --out` directory."""
    path = directory / "results.json"
    if not path.is_file():
        raise SeedsError(f"no results.json in {directory}")
    doc = orjson.loads(path.read_bytes())
    runs = []
    for i, run in enumerate(doc.get("runs") or []):
        if not isinstance(run, dict) or "router" not in run or "rate" not in run:
            raise SeedsError(f"{path}: runs[{i}] needs 'router' and 'rate'")
        if run.get("error"):
            continue
        router, rate = str(run["router"]), float(run["rate"])
        req = directory / "runs" / router.replace(":", "_") / f"rate_{rate:g}" / "requests.jsonl"
        if not req.is_file():
            raise SeedsError(f"{req} is missing (per-request records are needed for intervals)")
        cluster = run.get("cluster") or {}
        runs.append(RunSamples(router, rate, bool(run.get("void")), _samples(req, "tpot"),
                               _samples(req, "ttft"), cluster.get("load_cv"),
                               cluster.get("steady_mean_batch_size")))
    return doc.get("meta") or {}, runs


def _pct(v: float) -> str:
    return f"{v * 100:+.1f}%"


def _cell(i: Interval) -> str:
    return f"{_pct(i.median)} [{_pct(i.low)}, {_pct(i.high)}]"


def _num(v: float | None, fmt: str) -> str:
    return "–" if v is None else fmt.format(v)


def render_markdown(rows: Sequence[HeadlineRow], dirs: Sequence[Path],
                    seeds: Sequence[Any]) -> str:
    lines = [
        "# eldr vs the best load-only router, over seeds",
        "",
        f"Seeds {', '.join(str(s) for s in seeds)} ({len(dirs)} comparison runs: "
        f"{', '.join(str(d) for d in dirs)}). Cell: median over seeds of the relative change "
        f"(negative = eldr lower), [95% interval] from a two-level bootstrap (seeds, then "
        f"requests; loadtest/multiseed.py). Baseline: each seed's load-only router best on that "
        f"statistic at that rate (the baselines column names the best on median TPOT).",
        "",
        "| rate (req/s) | eldr variant | seeds | median TPOT | p99 TPOT | median TTFT "
        "| load CV eldr / base | steady batch eldr / base (planned) | baselines |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = ", ".join(sorted(set(r.baselines)))
        lines.append(
            f"| {r.rate:g} | {r.eldr_router} | {r.seeds} | {_cell(r.changes['tpot_p50'])} | "
            f"{_cell(r.changes['tpot_p99'])} | {_cell(r.changes['ttft_p50'])} | "
            f"{_num(r.eldr_load_cv, '{:.3f}')} / {_num(r.baseline_load_cv, '{:.3f}')} | "
            f"{_num(r.eldr_mean_batch, '{:.1f}')} / {_num(r.baseline_mean_batch, '{:.1f}')} "
            f"({_num(r.planned_batch, '{:g}')}) | {base} |")
    lines += ["", "Per-seed changes (median TPOT / p99 TPOT / median TTFT):", ""]
    for r in rows:
        per = zip(*(r.changes[k].per_seed for k in STATS), strict=True)
        cells = "; ".join(" / ".join(_pct(v) for v in seed) for seed in per)
        lines.append(f"- {r.rate:g} req/s, {r.eldr_router}: {cells}")
    lines.append("")
    return "\n".join(lines)


def render_plot(rows: Sequence[HeadlineRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(STATS), figsize=(12, 4), sharey=True)
    for ax, name in zip(axes, STATS, strict=True):
        for variant in sorted({r.eldr_router for r in rows}):
            mine = sorted((r for r in rows if r.eldr_router == variant), key=lambda r: r.rate)
            xs = [r.rate for r in mine]
            mid = np.array([100 * r.changes[name].median for r in mine])
            lo = np.array([100 * r.changes[name].low for r in mine])
            hi = np.array([100 * r.changes[name].high for r in mine])
            ax.errorbar(xs, mid, yerr=[mid - lo, hi - mid], marker="o", capsize=3,
                        label=variant)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{name} change vs best load-only (%)")
        ax.set_xlabel("request rate (req/s)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(dirs: Sequence[Path], out: Path, *, seed: int = 0, plot: bool = True) -> Path:
    """Read the seed directories, write OUT/summary.md, summary.json (and a plot)."""
    if not dirs:
        raise SeedsError("no comparison directories given")
    metas, seeds = [], []
    for d in dirs:
        meta, runs = read_comparison(d)
        metas.append(meta)
        seeds.append(runs)
    load_only = metas[0].get("load_only_routers") or []
    options = metas[0].get("options") or {}
    planned: dict[float, float] = {}
    for rate, batch in zip(options.get("rates") or [], options.get("batches") or [],
                           strict=False):
        planned[float(rate)] = float(batch)
    rows = headline_rows(seeds, load_only, np.random.default_rng(seed), planned)
    out.mkdir(parents=True, exist_ok=True)
    seed_ids = [(m.get("options") or {}).get("seed") for m in metas]
    (out / "summary.json").write_bytes(orjson.dumps(
        {"dirs": [str(d) for d in dirs], "seeds": seed_ids,
         "rows": [asdict(r) for r in rows]}, option=orjson.OPT_INDENT_2))
    text = render_markdown(rows, dirs, seed_ids)
    if plot and rows:
        render_plot(rows, out / "plots" / "seeds.png")
        text += "\n![changes over seeds](plots/seeds.png)\n"
    path = out / "summary.md"
    path.write_text(text, encoding="utf-8")
    return path


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0] if __doc__ else None
    parser.add_argument("dirs", type=Path, nargs="+", help="loadtest compare --out directories")
    parser.add_argument("--out", type=Path, required=True, help="where summary.md goes")
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    parser.add_argument("--no-plots", action="store_true")


def main(args: argparse.Namespace) -> int:
    try:
        path = summarize(args.dirs, args.out, seed=args.bootstrap_seed, plot=not args.no_plots)
    except SeedsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0

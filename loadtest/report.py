"""`python -m loadtest report DIR`: markdown tables and PNG plots from a comparison's results.

Input: `DIR/results.json` as written by `loadtest compare` (`{"meta": {...}, "runs": [...]}`,
one run per router and rate: the driver summary, decode-cluster statistics, CPU usage and the
VOID verdict). Output: `DIR/report.md` and `DIR/plots/*.png`.

The headline number is, per rate, `eldr` against the *best load-only router* at that rate (the
lowest median TPOT among non-VOID runs of random, round_robin, least_load, power_of_two, ours and
SGLang's), reported as a relative change (negative = eldr is faster). VOID runs are listed with
their reasons and never used as a baseline or a winner.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson


class ReportError(ValueError):
    """The results file is missing or malformed; the message names the field."""


@dataclass(frozen=True, slots=True)
class RunRow:
    router: str
    rate: float
    void: bool
    void_reasons: tuple[str, ...]
    error: str | None
    tpot_p50: float | None
    tpot_p99: float | None
    ttft_p50: float | None
    ttft_p99: float | None
    output_throughput: float | None
    request_throughput: float | None
    completed: int
    failed: int
    distinct_experts: float | None
    load_cv: float | None
    host_lag: float | None
    mean_batch: float | None
    steady_batch: float | None  # between ramp-up and drain (what a rate plan aims at)
    router_cores: float | None
    emulator_cores: float | None
    system_cpu: float | None
    # False when the workers had no `/emulator/stats`: the emulator columns print "n/a".
    stats_available: bool = True


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def rows_from_results(results: dict[str, Any]) -> list[RunRow]:
    runs = results.get("runs")
    if not isinstance(runs, list):
        raise ReportError("results.runs must be a list")
    rows = []
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or "router" not in run or "rate" not in run:
            raise ReportError(f"results.runs[{i}] needs 'router' and 'rate'")
        s = run.get("summary") or {}
        rows.append(
            RunRow(
                router=str(run["router"]),
                rate=float(run["rate"]),
                void=bool(run.get("void")),
                void_reasons=tuple(run.get("void_reasons") or ()),
                error=run.get("error"),
                tpot_p50=_get(s, "tpot_ms", "p50"),
                tpot_p99=_get(s, "tpot_ms", "p99"),
                ttft_p50=_get(s, "ttft_ms", "p50"),
                ttft_p99=_get(s, "ttft_ms", "p99"),
                output_throughput=s.get("output_throughput"),
                request_throughput=s.get("request_throughput"),
                completed=int(s.get("completed") or 0),
                failed=int(s.get("failed") or 0),
                distinct_experts=_get(run, "cluster", "distinct_experts_per_step"),
                load_cv=_get(run, "cluster", "load_cv"),
                host_lag=_get(run, "cluster", "host_lag_fraction"),
                mean_batch=_get(run, "cluster", "mean_batch_size"),
                steady_batch=_get(run, "cluster", "steady_mean_batch_size"),
                router_cores=_get(run, "cpu", "process_cores", "router"),
                emulator_cores=_get(run, "cpu", "process_cores", "emulator"),
                system_cpu=_get(run, "cpu", "system_percent_mean"),
                stats_available=_get(run, "cluster", "stats_available") is not False,
            )
        )
    return rows


@dataclass(frozen=True, slots=True)
class EldrComparison:
    rate: float
    eldr_router: str
    baseline_router: str | None
    tpot_p50_change: float | None  # eldr / baseline - 1
    tpot_p99_change: float | None
    ttft_p50_change: float | None
    eldr_void: bool


def _change(new: float | None, base: float | None) -> float | None:
    if new is None or base is None or base == 0:
        return None
    return new / base - 1.0


def eldr_comparisons(rows: Sequence[RunRow], load_only: Sequence[str]) -> list[EldrComparison]:
    """Per rate and eldr variant: change vs the best non-VOID load-only router at that rate."""
    out = []
    for rate in sorted({r.rate for r in rows}):
        at_rate = [r for r in rows if r.rate == rate and r.error is None]
        baselines = [
            r for r in at_rate if r.router in load_only and not r.void and r.tpot_p50 is not None
        ]
        best = min(baselines, key=lambda r: r.tpot_p50 or 0.0) if baselines else None
        for e in (r for r in at_rate if "eldr" in r.router):
            out.append(
                EldrComparison(
                    rate=rate,
                    eldr_router=e.router,
                    baseline_router=best.router if best else None,
                    tpot_p50_change=_change(e.tpot_p50, best.tpot_p50 if best else None),
                    tpot_p99_change=_change(e.tpot_p99, best.tpot_p99 if best else None),
                    ttft_p50_change=_change(e.ttft_p50, best.ttft_p50 if best else None),
                    eldr_void=e.void,
                )
            )
    return out


def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v * 100:+.1f}%"


def _emu(r: RunRow, v: float | None, fmt: str = "{:.1f}") -> str:
    """An emulator-counter cell: "n/a" where the workers expose no counters at all."""
    return _f(v, fmt) if r.stats_available else "n/a"


def render_markdown(results: dict[str, Any], plot_names: Sequence[str] = ()) -> str:
    meta = results.get("meta") or {}
    opts = meta.get("options") or {}
    rows = rows_from_results(results)
    load_only = meta.get("load_only_routers") or [r.router for r in rows if "eldr" not in r.router]
    lines = ["# Router comparison", ""]
    if meta.get("command"):
        lines += ["Command:", "", "```", str(meta["command"]), "```", ""]
    external = bool(meta.get("external_workers"))
    if opts and external:
        lines.append(
            f"Cluster: {opts.get('prefill')} prefill + {opts.get('decode')} decode external "
            f"workers (`--prefill-url/--decode-url`), model geometry {opts.get('model')}. "
            f"Workload: `{opts.get('workload')}`, {opts.get('num_requests')} measured "
            f"conversations per run ({opts.get('turns', 1)} turn(s) each), outputs "
            f"{opts.get('min_output_tokens')}–{opts.get('max_output_tokens')} tokens, seed "
            f"{opts.get('seed')}: every router sees the identical prompts and Poisson arrival "
            f"times."
        )
        lines.append("")
    elif opts:
        lines.append(
            f"Cluster: {opts.get('prefill')} prefill + {opts.get('decode')} decode emulated "
            f"workers, model geometry {opts.get('model')}, time scale {opts.get('time_scale')} "
            f"(measured times are the emulator's modelled times x time scale; ratios are "
            f"unaffected). Workload: `{opts.get('workload')}`, {opts.get('num_requests')} "
            f"measured conversations per run ({opts.get('turns', 1)} turn(s) each), outputs "
            f"{opts.get('min_output_tokens')}–"
            f"{opts.get('max_output_tokens')} tokens, seed {opts.get('seed')}: every router "
            f"sees the identical prompts and Poisson arrival times."
        )
        lines.append("")
    lines += [
        "## eldr vs the best load-only router",
        "",
        "Relative change, negative = eldr lower (better). Baseline: lowest median TPOT "
        "among non-VOID load-only runs at that rate.",
        "",
        "| rate (req/s) | eldr variant | baseline | median TPOT | p99 TPOT | median TTFT |",
        "|---|---|---|---|---|---|",
    ]
    for c in eldr_comparisons(rows, load_only):
        flag = " (VOID)" if c.eldr_void else ""
        lines.append(
            f"| {c.rate:g} | {c.eldr_router}{flag} | {c.baseline_router or '–'} | "
            f"{_pct(c.tpot_p50_change)} | {_pct(c.tpot_p99_change)} | "
            f"{_pct(c.ttft_p50_change)} |"
        )
    lines.append("")
    planned = {float(p["rate"]): p for p in opts.get("plans") or []}
    for rate in sorted({r.rate for r in rows}):
        plan = planned.get(rate)
        title = f"## Rate {rate:g} req/s"
        if plan:
            title += (f" (planned decode batch {plan['batch']} per worker, modelled step "
                      f"{plan['step_seconds'] * 1e3:.0f} ms)")
        lines += [
            title,
            "",
            "| router | TPOT p50 ms | TPOT p99 ms | TTFT p50 ms | TTFT p99 ms | out tok/s "
            "| req/s | ok/failed | distinct experts/step | mean batch (steady) | load CV "
            "| router cores "
            "| emulator cores | machine CPU % | host lag % | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted((r for r in rows if r.rate == rate), key=lambda r: r.router):
            verdict = "error" if r.error else ("VOID" if r.void else "ok")
            lines.append(
                f"| {r.router} | {_f(r.tpot_p50)} | {_f(r.tpot_p99)} | {_f(r.ttft_p50)} | "
                f"{_f(r.ttft_p99)} | {_f(r.output_throughput)} | "
                f"{_f(r.request_throughput, '{:.2f}')} | {r.completed}/{r.failed} | "
                f"{_emu(r, r.distinct_experts)} | {_emu(r, r.mean_batch, '{:.1f}')} "
                f"({_emu(r, r.steady_batch, '{:.1f}')}) | "
                f"{_emu(r, r.load_cv, '{:.3f}')} | "
                f"{_f(r.router_cores, '{:.2f}')} | {_f(r.emulator_cores, '{:.2f}')} | "
                f"{_f(r.system_cpu, '{:.0f}')} | "
                f"{_emu(r, None if r.host_lag is None else 100 * r.host_lag, '{:.1f}')} | "
                f"{verdict} |"
            )
        lines.append("")
    void = [r for r in rows if r.void or r.error]
    if void:
        lines += [
            "## VOID and failed runs",
            "",
            "A run is VOID when this machine, not the modelled cluster, limited it "
            "(emulator host lag or CPU saturation) or too many requests failed; its "
            "numbers are shown but never ranked.",
            "",
        ]
        for r in void:
            reasons = "; ".join(r.void_reasons) or (r.error or "")
            lines.append(f"- {r.router} at {r.rate:g} req/s: {reasons}")
        lines.append("")
    if any(not r.stats_available for r in rows if r.error is None):
        lines += [
            "## Notes",
            "",
            "The workers expose no `/emulator/stats` (real SGLang workers do not), so "
            "distinct experts/step, mean batch, load CV and host lag are n/a and the "
            "distinct-experts plot has no points. The host-lag VOID rule does not apply; "
            "a run is VOID only for machine CPU saturation or failed requests.",
            "",
        ]
    if plot_names:
        lines += ["## Plots", ""]
        lines += [f"![{name}](plots/{name})" for name in plot_names]
        lines.append("")
    lines += [
        "Definitions: TTFT, TPOT and ITL as `sglang.bench_serving` computes them "
        "(TPOT = (latency - TTFT) / (output tokens - 1)); distinct experts/step = mean "
        "over decode steps of the per-layer number of distinct experts the batch "
        "activated (emulator counters); mean batch = mean decode batch size per step over the "
        "measured window, (steady) = the same between the end of ramp-up and the last arrival; "
        "load CV = coefficient of variation of finished requests per decode worker.",
        "",
    ]
    return "\n".join(lines)


PLOTS = (
    ("tpot_p50.png", "tpot_p50", "median TPOT (ms)"),
    ("tpot_p99.png", "tpot_p99", "p99 TPOT (ms)"),
    ("distinct_experts.png", "distinct_experts", "distinct experts per layer per step"),
)


def render_plots(rows: Sequence[RunRow], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    routers = sorted({r.router for r in rows})
    for filename, attr, label in PLOTS:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = False
        for router in routers:
            pts = sorted(
                (r.rate, getattr(r, attr), r.void)
                for r in rows
                if r.router == router and getattr(r, attr) is not None
            )
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            style = "-" if "eldr" in router else "--"
            (line,) = ax.plot(xs, ys, style, marker="o", label=router)
            void_pts = [(x, y) for x, y, v in pts if v]
            if void_pts:  # VOID points: hollow markers
                ax.plot(
                    [p[0] for p in void_pts],
                    [p[1] for p in void_pts],
                    "o",
                    mfc="white",
                    mec=line.get_color(),
                )
            drawn = True
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs rate (hollow: VOID)")
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=110)
        plt.close(fig)
        names.append(filename)
    return names


def load_results(directory: Path) -> dict[str, Any]:
    path = directory / "results.json"
    if not path.is_file():
        raise ReportError(f"no results.json in {directory} (run `python -m loadtest compare`)")
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ReportError(f"{path} must hold a JSON object")
    return data


def render_report(directory: Path, plots: bool = True) -> Path:
    results = load_results(directory)
    names = render_plots(rows_from_results(results), directory / "plots") if plots else []
    path = directory / "report.md"
    path.write_text(render_markdown(results, names), encoding="utf-8")
    return path


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Render report.md and plots/*.png from a comparison's results.json."
    parser.add_argument("directory", type=Path, help="the compare --out directory")
    parser.add_argument("--no-plots", action="store_true")


def main(args: argparse.Namespace) -> int:
    try:
        path = render_report(args.directory, plots=not args.no_plots)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0

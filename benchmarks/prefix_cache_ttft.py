"""Does a prefix-aware prefill policy lower TTFT on the emulator? (issue 14, prefix cache)

For each prefill policy (default: round_robin, then cache_aware) this starts a fresh emulated PD
cluster (so every policy starts from cold prefix caches), our gateway with
`--prefill-policy POLICY --decode-policy least_load`, and drives the same multi-turn workload
(identical prompts and Poisson conversation arrivals; turn k+1 is sent when turn k finishes and
resends the history) with the load driver. It prints, per policy: TTFT median/p90 over all
requests and over follow-up turns only, the mean per-request share of prompt tokens the
prefill workers served from their prefix cache, the token-weighted share, and the decode host
lag (a run whose host lag exceeds 2% of the modelled decode time measured this machine, not the
model: see loadtest/cluster_stats.py).

`loadtest compare` runs every router with one `--prefill-policy`, hence this script; it reuses
compare's cluster, gateway and driver plumbing (loadtest/compare.py `Experiment`).

    python benchmarks/prefix_cache_ttft.py --out /tmp/prefix-ttft
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import aiohttp
import numpy as np
import orjson

from loadtest.cluster_stats import decode_run_stats, void_reasons
from loadtest.compare import CompareOptions, Experiment, RouterSpec, fetch_stats
from loadtest.driver import run_load, write_run
from loadtest.procs import CpuSampler


async def prefix_stats(session: aiohttp.ClientSession, urls: list[str]) -> list[dict[str, Any]]:
    async def one(url: str) -> dict[str, Any]:
        async with session.get(url.rstrip("/") + "/emulator/stats") as r:
            doc = await r.json(loads=orjson.loads)
            pc: dict[str, Any] = doc["prefix_cache"]
            return pc
    return list(await asyncio.gather(*(one(u) for u in urls)))


def delta(before: list[dict[str, Any]], after: list[dict[str, Any]], key: str) -> float:
    return float(sum(a[key] - b[key] for b, a in zip(before, after, strict=True)))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def run_policy(opts: CompareOptions, policy: str, rate: float) -> dict[str, Any]:
    exp = Experiment(replace(opts, prefill_policy=policy, out=opts.out / policy))
    try:
        cluster = await exp.start_cluster()
        prefill_urls = [u for u, _ in cluster.prefill]
        convs = exp.workload("evaluation", opts.num_requests + opts.warmup)
        spec = RouterSpec.parse("gateway:least_load")
        proc, url = await exp.start_router(spec, None, f"gateway-prefill-{policy}")
        try:
            assert exp.cluster_proc is not None
            sampler = CpuSampler({"router": proc.pid, "driver": os.getpid(),
                                  "emulator": exp.cluster_proc.pid})
            p_before: list[dict[str, Any]] = []
            d_before: list[dict[str, float]] = []
            async with aiohttp.ClientSession() as session:
                async def measurement_starts() -> None:
                    p_before.extend(await prefix_stats(session, prefill_urls))
                    d_before.extend(await fetch_stats(session, cluster.decode))
                    sampler.start()
                try:
                    result = await run_load(exp.driver_config(url, rate, opts.num_requests),
                                            convs, measurement_starts)
                finally:
                    await sampler.stop()
                p_after = await prefix_stats(session, prefill_urls)
                d_after = await fetch_stats(session, cluster.decode)
        finally:
            await proc.stop()
    finally:
        if exp.cluster_proc is not None:
            await exp.cluster_proc.stop()
    write_run(result, opts.out / policy / "run")
    ok = [r for r in result.records if r.success and r.ttft is not None]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    follow = [r.ttft for r in ok if r.turn > 0 and r.ttft is not None]
    prefills = delta(p_before, p_after, "prefills")
    dstats = decode_run_stats(d_before, d_after)
    cpu = sampler.usage()
    return {
        "policy": policy,
        "requests": len(result.records),
        "completed": len(ok),
        "ttft_p50_ms": 1e3 * statistics.median(ttft) if ttft else float("nan"),
        "ttft_p90_ms": 1e3 * pct(ttft, 90),
        "followup_ttft_p50_ms": 1e3 * statistics.median(follow) if follow else float("nan"),
        "followup_ttft_p90_ms": 1e3 * pct(follow, 90),
        "mean_cached_share": delta(p_before, p_after, "cached_share_sum") / max(prefills, 1),
        "token_cached_share": delta(p_before, p_after, "cached_tokens")
        / max(delta(p_before, p_after, "prompt_tokens"), 1),
        "prefills": prefills,
        "evicted_tokens": delta(p_before, p_after, "evicted_tokens"),
        "host_lag_fraction": dstats.host_lag_fraction,
        "cpu_percent_mean": cpu.system_percent_mean,
        "void_reasons": void_reasons(dstats, cpu.system_percent_mean),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ("prefill policy", "done", "TTFT p50", "TTFT p90", "follow-up p50", "follow-up p90",
            "cached share (mean/req)", "cached share (tokens)", "host lag", "void")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        lag = r["host_lag_fraction"]
        print(" | ".join([
            r["policy"], f"{r['completed']}/{r['requests']}",
            f"{r['ttft_p50_ms']:.0f} ms", f"{r['ttft_p90_ms']:.0f} ms",
            f"{r['followup_ttft_p50_ms']:.0f} ms", f"{r['followup_ttft_p90_ms']:.0f} ms",
            f"{r['mean_cached_share']:.1%}", f"{r['token_cached_share']:.1%}",
            "n/a" if lag is None else f"{lag:.1%}",
            "; ".join(r["void_reasons"]) or "no",
        ]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--policies", nargs="+", default=["round_robin", "cache_aware"])
    p.add_argument("--prefill", type=int, default=2)
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--conversations", type=int, default=100)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--rate", type=float, default=2.5, help="conversations per second")
    p.add_argument("--time-scale", type=float, default=10.0)
    p.add_argument("--min-prompt-chars", type=int, default=2000)
    p.add_argument("--max-prompt-chars", type=int, default=6000)
    p.add_argument("--min-output-tokens", type=int, default=8)
    p.add_argument("--max-output-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    opts = CompareOptions(
        out=args.out, workload="task", prefill=args.prefill, decode=args.decode,
        time_scale=args.time_scale, num_requests=args.conversations, warmup=args.warmup,
        seed=args.seed, turns=args.turns, min_prompt_chars=args.min_prompt_chars,
        max_prompt_chars=args.max_prompt_chars, min_output_tokens=args.min_output_tokens,
        max_output_tokens=args.max_output_tokens, max_duration=600.0, request_timeout=120.0,
        progress=False, routers=["gateway:least_load"])
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for policy in args.policies:
        started = time.monotonic()
        rows.append(asyncio.run(run_policy(opts, policy, args.rate)))
        print(f"{policy}: {time.monotonic() - started:.0f}s", file=sys.stderr)
    (args.out / "prefix_cache_ttft.json").write_bytes(
        orjson.dumps({"command": sys.argv, "rows": rows}, option=orjson.OPT_INDENT_2))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How much load an emulated cluster in one process can carry before its host CPU distorts TPOT.

    python -m loadtest.emulator.capacity --prefill 8 --decode 16 --time-scale 1 \\
        --concurrency 64 --requests 256 --max-new-tokens 64

Starts `python -m loadtest cluster --json` as a subprocess (its own process and event loop, as in
an experiment), drives PD streaming `/generate` requests directly at the workers (no router: this
measures the emulator, not a proxy), then reads every decode worker's `/emulator/stats`.
Reports client-measured TPOT next to the modelled step time, and the host lag the decode loops
recorded (wall time beyond the modelled step time). A lag fraction near 0 means the cluster
keeps the cost model's clock at this load and time scale; raise `--time-scale` until it does.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from typing import Any

import aiohttp
import orjson

WORDS = ["court", "contract", "judge", "appeal", "statute", "translate", "sentence", "grammar",
         "summary", "article", "intent", "booking", "flight", "weather", "music", "recipe"]


async def one_request(session: aiohttp.ClientSession, prefill: dict[str, Any], decode: str,
                      room: int, max_new: int, rng: random.Random) -> tuple[float, float, int]:
    """(ttft, tpot, tokens) of one PD streaming request, measured at the client."""
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))
    body = {"text": text, "stream": True, "bootstrap_host": "127.0.0.1",
            "bootstrap_port": prefill["bootstrap_port"], "bootstrap_room": room,
            "sampling_params": {"max_new_tokens": max_new, "ignore_eos": True}}
    start = time.perf_counter()

    async def run_prefill() -> None:
        async with session.post(prefill["url"] + "/generate",
                                json={**body, "stream": False}) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(f"prefill {r.status}")

    ptask = asyncio.ensure_future(run_prefill())
    stamps: list[float] = []
    async with session.post(decode + "/generate", json=body) as resp:
        async for line in resp.content:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                stamps.append(time.perf_counter())
    await ptask
    if not stamps:
        raise RuntimeError("decode returned no tokens")
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return stamps[0] - start, tpot, len(stamps)


async def drive(info: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    sem = asyncio.Semaphore(args.concurrency)
    results: list[tuple[float, float, int]] = []
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async def worker(i: int) -> None:
            async with sem:
                p = info["prefill"][i % len(info["prefill"])]
                d = info["decode"][i % len(info["decode"])]["url"]
                results.append(await one_request(session, p, d, 1000 + i, args.max_new_tokens,
                                                 rng))
        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(args.requests)))
        wall = time.perf_counter() - start
        stats = []
        for d in info["decode"]:
            async with session.get(d["url"] + "/emulator/stats") as r:
                stats.append(await r.json())
    steps = sum(s["steps"] for s in stats)
    modelled = sum(s["step_seconds_sum"] for s in stats)
    lag = sum(s["host_lag_seconds_sum"] for s in stats)
    tpots = [r[1] for r in results if r[2] > 1]
    return {
        "requests": len(results), "wall_s": round(wall, 2),
        "tokens_per_s": round(sum(r[2] for r in results) / wall, 1),
        "ttft_median_s": round(statistics.median(r[0] for r in results), 4),
        "tpot_median_s": round(statistics.median(tpots), 5) if tpots else None,
        "tpot_p90_s": round(statistics.quantiles(tpots, n=10)[-1], 5) if len(tpots) > 1
        else None,
        "modelled_step_mean_s": round(modelled / steps, 5) if steps else None,
        "mean_batch_size": round(sum(s["batch_size_sum"] for s in stats) / steps, 2)
        if steps else None,
        "host_lag_fraction": round(lag / modelled, 4) if modelled else None,
        "lagged_steps_fraction": round(sum(s["lagged_steps"] for s in stats) / steps, 4)
        if steps else None,
        "host_lag_max_s": max(s["host_lag_max_seconds"] for s in stats),
    }


async def main_async(args: argparse.Namespace) -> int:
    cmd = [sys.executable, "-m", "loadtest", "cluster", "--prefill", str(args.prefill),
           "--decode", str(args.decode), "--base-port", "0", "--json",
           "--time-scale", str(args.time_scale), "--model", args.model,
           "--routing", args.routing, "--max-batch-size", str(args.max_batch_size)]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        info = orjson.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
        report = await drive(info, args)
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
    config = {k: getattr(args, k) for k in ("prefill", "decode", "time_scale", "model",
                                              "routing", "concurrency", "requests",
                                              "max_new_tokens", "max_batch_size")}
    print(orjson.dumps({"config": config, "result": report}, option=orjson.OPT_INDENT_2).decode())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.emulator.capacity",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--prefill", type=int, default=8)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--model", default="Qwen3-30B-A3B")
    parser.add_argument("--routing", default="token-hash", choices=("token-hash", "trace"))
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.prefill, args.decode, args.concurrency, args.requests,
           args.max_new_tokens) < 1:
        parser.error("--prefill, --decode, --concurrency, --requests and --max-new-tokens "
                     "must be >= 1")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())

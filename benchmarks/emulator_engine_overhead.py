"""Host CPU cost of one emulated decode step, to choose --time-scale for a many-worker cluster.

Runs the real DecodeEngine with an instant cost model (no sleeping), so every second measured is
host work: pulling each request's next token from its routing source, counting distinct experts,
bookkeeping, and waking the consumers. Compare the host time per step with the modelled step time:
W decode workers sharing C cores keep up only if time_scale >= W * host_step / (C * modelled_step).

    python benchmarks/emulator_engine_overhead.py [--batch 64] [--tokens 256] [--routing token-hash]
"""

from __future__ import annotations

import os

# Before numpy loads: the routing matmuls are small ([32, 64] x [64, L*E]); multi-threaded
# OpenBLAS spends ~9x more CPU on them than one thread on this 2-core machine (0.5 ms vs 4.6 ms
# CPU per [32,64]x[64,6144] product, measured), and an emulator runs many workers anyway.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

import numpy as np

from loadtest.emulator.costmodel import CostModel
from loadtest.emulator.engine import DecodeEngine
from loadtest.emulator.routing import make_routing_source
from loadtest.emulator.tokenizer import Tokenizer
from zones.geometry import geometry_by_name

PROMPT = ("The scheduler admits new requests at step boundaries, runs one forward pass for the "
          "whole batch, and streams a token to every request; the gateway measures the time "
          "between tokens. ")


async def measure(args: argparse.Namespace) -> None:
    tok = Tokenizer()
    geometry = geometry_by_name(args.model)
    source = make_routing_source(args.routing, geometry, tok)
    geometry = source.geometry
    prompts = [f"[trace:{i}] " + PROMPT * (1 + i % 4) for i in range(args.batch)]
    ids = [tok.encode(p) for p in prompts]
    engine = DecodeEngine(CostModel.instant(), geometry, max_batch_size=args.batch)
    await engine.start()
    try:
        handles = [engine.submit(str(i), len(ids[i]), args.tokens,
                                 source.continuation(ids[i], prompts[i], i))
                   for i in range(args.batch)]

        async def drain(h) -> int:
            return sum([1 async for _ in h])

        cpu0, wall0 = time.process_time(), time.perf_counter()
        counts = await asyncio.gather(*(drain(h) for h in handles))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        stats = engine.stats()
    finally:
        await engine.stop()
    model = CostModel.for_geometry(geometry)
    mean_distinct = stats.distinct_experts_sum / max(stats.steps, 1)
    modelled = model.decode_step_seconds(args.batch, np.full(geometry.num_layers, mean_distinct),
                                         args.batch * 1024)
    host_step = cpu / stats.steps
    print(f"routing={args.routing} geometry={geometry.name} batch={args.batch} "
          f"tokens/request={args.tokens} (received {sum(counts)})")
    print(f"steps={stats.steps}  host CPU {cpu:.3f}s  wall {wall:.3f}s")
    per_token = host_step / args.batch * 1e6
    print(f"host CPU per step      {host_step * 1e3:8.3f} ms ({per_token:.1f} us per token)")
    print(f"modelled step (H100)   {modelled * 1e3:8.3f} ms at {mean_distinct:.1f} distinct/layer")
    for workers in (4, 16, 24):
        need = workers * host_step / (args.cores * modelled)
        print(f"  {workers:2d} decode workers on {args.cores} core(s): time_scale >= {need:6.1f} "
              "(engine work only; HTTP, gateway and load generator need more)")

    # Prefill side: routing a prompt (route_prompt) is host work too; compare per token.
    long_prompt = PROMPT * 40
    prompt_ids = tok.encode(long_prompt)
    source.route_prompt(prompt_ids, long_prompt)          # warm the embedding cache
    reps = 5
    cpu0 = time.process_time()
    for _ in range(reps):
        source.route_prompt(prompt_ids, long_prompt)
    route_per_token = (time.process_time() - cpu0) / reps / len(prompt_ids)
    prefill_per_token = model.prefill_seconds(len(prompt_ids)) / len(prompt_ids)
    print(f"route_prompt host CPU  {route_per_token * 1e6:8.1f} us per prompt token "
          f"({len(prompt_ids)}-token prompt); modelled prefill {prefill_per_token * 1e6:.1f} us "
          f"per token")
    for workers in (2, 8):
        need = workers * route_per_token / (args.cores * prefill_per_token)
        print(f"  {workers:2d} busy prefill workers on {args.cores} core(s): time_scale >= "
              f"{need:6.1f} (prompt routing only)")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="Qwen3-30B-A3B")
    ap.add_argument("--routing", default="token-hash", choices=("token-hash", "trace"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--cores", type=int, default=1, help="cores available to the emulator")
    args = ap.parse_args(argv)
    asyncio.run(measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Host CPU cost of one emulated decode step, to choose --time-scale for a many-worker cluster.

Runs the real DecodeEngine with an instant cost model (no sleeping), so every second measured is
host work: pulling each request's next token from its routing source, counting distinct experts,
bookkeeping, and waking the consumers. Compare the host time per step with the modelled step time:
W decode workers sharing C cores keep up only if time_scale >= W * host_step / (C * modelled_step).

    python benchmarks/emulator_engine_overhead.py [--batch 64] [--tokens 256] [--routing token-hash]
    python benchmarks/emulator_engine_overhead.py --distinct-variants   # engine.distinct_experts

`--distinct-variants` instead times ways of counting the distinct experts per layer of one
decode batch (the engine's per-step numpy work) on random `[batch, layers, top_k]` ids, checks
they agree, and prints microseconds per call.
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


def distinct_variants(args: argparse.Namespace) -> None:
    """Time candidate implementations of DecodeEngine.distinct_experts on one random batch."""
    import timeit

    g = geometry_by_name(args.model)
    L, E, K, B = g.num_layers, g.num_experts, g.top_k, args.batch
    ids = np.random.default_rng(0).integers(0, E, (B, L, K)).astype(np.int32)
    offsets = (np.arange(L, dtype=np.int64) * E)[:, None]

    def boolean_scatter() -> np.ndarray:
        used = np.zeros(L * E, dtype=bool)
        used[(offsets[None] + ids.astype(np.int64)).ravel()] = True
        return used.reshape(L, E).sum(axis=1)

    def bincount_layer_times_e() -> np.ndarray:
        counts = np.bincount((offsets[None] + ids).ravel(), minlength=L * E).reshape(L, E)
        return np.count_nonzero(counts, axis=1)

    def unique_per_layer() -> np.ndarray:
        return np.array([len(np.unique(ids[:, layer])) for layer in range(L)])

    def sort_and_count_changes() -> np.ndarray:
        s = np.sort(ids.transpose(1, 0, 2).reshape(L, -1), axis=1)
        return np.count_nonzero(s[:, 1:] != s[:, :-1], axis=1) + 1

    engine = DecodeEngine(CostModel.instant(), g, max_batch_size=B)
    variants = {"engine.distinct_experts": lambda: engine.distinct_experts(ids),
                "boolean scatter (standalone copy)": boolean_scatter,
                "bincount on layer*E+expert": bincount_layer_times_e,
                "np.unique per layer": unique_per_layer,
                "sort + count changes": sort_and_count_changes}
    want = boolean_scatter()
    print(f"distinct experts per layer, batch {B} x {L} layers x top-{K} of {E}")
    for name, fn in variants.items():
        assert np.array_equal(np.asarray(fn()), want), name
        best = min(timeit.repeat(fn, number=200, repeat=5)) / 200
        print(f"  {name:36s} {best * 1e6:8.1f} us")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="Qwen3-30B-A3B")
    ap.add_argument("--routing", default="token-hash", choices=("token-hash", "trace"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--cores", type=int, default=1, help="cores available to the emulator")
    ap.add_argument("--distinct-variants", action="store_true",
                    help="time distinct-expert counting variants instead")
    args = ap.parse_args(argv)
    if args.distinct_variants:
        distinct_variants(args)
        return 0
    asyncio.run(measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

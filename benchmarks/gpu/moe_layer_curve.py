"""Measure one MoE layer's expert time versus distinct active experts on a real GPU.

Cross-check for the emulator's cost model (docs/emulator-cost-model.md), which is derived from
public numbers: this script needs a CUDA GPU and PyTorch with `torch._grouped_mm` (2.8+), and is
never run by the test suite. It times the expert part of one Qwen3-30B-A3B MoE layer (hidden 2048,
moe_intermediate_size 768, gate+up fused then down, bf16) for a decode batch of 64 tokens whose
top-8 choices are spread over the first `n` experts, as a single grouped GEMM per projection (the
way fused MoE kernels read each active expert's weights once per step).

Usage: python benchmarks/gpu/moe_layer_curve.py [--batch 64] [--out curve.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

HIDDEN = 2048  # Qwen3-30B-A3B config.json hidden_size
INTERMEDIATE = 768  # Qwen3-30B-A3B config.json moe_intermediate_size
NUM_EXPERTS = 128  # num_experts
TOP_K = 8  # num_experts_per_tok


def _routing(batch: int, n_active: int, gen: torch.Generator) -> torch.Tensor:
    """Expert id per (token, slot): each token picks TOP_K distinct experts among the first n."""
    k = min(TOP_K, n_active)
    scores = torch.rand(batch, n_active, generator=gen)
    ids = scores.topk(k, dim=1).indices
    # Make sure every one of the n experts is used at least once when batch*k >= n.
    flat = ids.flatten()
    if batch * k >= n_active:
        flat[:n_active] = torch.randperm(n_active, generator=gen)
    return flat.sort().values


def _offsets(expert_ids: torch.Tensor, n_groups: int) -> torch.Tensor:
    counts = torch.bincount(expert_ids, minlength=n_groups)
    return torch.cumsum(counts, 0).to(torch.int32)


def time_layer(batch: int, n_active: int, reps: int, gen: torch.Generator) -> float:
    dev = torch.device("cuda")
    n_sets = 4  # rotate weight sets so repeated runs do not measure the L2 cache
    w13 = [
        torch.randn(n_active, HIDDEN, 2 * INTERMEDIATE, device=dev, dtype=torch.bfloat16) * 0.02
        for _ in range(n_sets)
    ]
    w2 = [
        torch.randn(n_active, INTERMEDIATE, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.02
        for _ in range(n_sets)
    ]
    ids = _routing(batch, n_active, gen)
    offs = _offsets(ids, n_active).to(dev)
    x = torch.randn(ids.numel(), HIDDEN, device=dev, dtype=torch.bfloat16)

    def layer(i: int) -> torch.Tensor:
        h = torch._grouped_mm(x, w13[i % n_sets], offs=offs)
        gate, up = h.chunk(2, dim=-1)
        a = torch.nn.functional.silu(gate) * up
        return torch._grouped_mm(a.contiguous(), w2[i % n_sets], offs=offs)

    for i in range(10):
        layer(i)
    torch.cuda.synchronize()
    # Decode in SGLang runs under CUDA graphs, so launch gaps are not part of a step: capture one
    # graph per weight set and time replays.
    graphs = []
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for i in range(n_sets):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream):
                layer(i)
            graphs.append(g)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graphs[i % n_sets].replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)  # microseconds
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    end.synchronize()
    return 2 * n * 10 / (start.elapsed_time(end) / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 128])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    expert_bytes = 3 * HIDDEN * INTERMEDIATE * 2
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "copy_bandwidth_bytes_per_s": copy_bandwidth(),
        "expert_bytes": expert_bytes,
        "curves": {},
    }
    bandwidth_tb = float(result["copy_bandwidth_bytes_per_s"]) / 1e12  # type: ignore[arg-type]
    print(f"device {result['device']}  copy bandwidth {bandwidth_tb:.2f} TB/s")
    for batch in args.batch:
        curve = {}
        for n in (8, 16, 24, 32, 48, 64, 96, 128):
            if n > batch * TOP_K:
                continue
            us = time_layer(batch, n, args.reps, gen)
            curve[n] = us
            eff = n * expert_bytes / (us * 1e-6) / 1e12
            print(
                f"batch {batch:4d}  active {n:4d}  layer {us:8.1f} us  "
                f"weight-stream {eff:5.2f} TB/s"
            )
        base = curve.get(16)
        if base and 128 in curve:
            print(f"batch {batch}: t(128)/t(16) = {curve[128] / base:.2f}")
        result["curves"][str(batch)] = curve  # type: ignore[index]
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()

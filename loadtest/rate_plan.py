"""Pick request rates that put a target decode batch on every worker of the emulated cluster.

Expert locality only matters when decode batches are large enough for their expert union to
grow (the paper measured at batch 64), so rates are best chosen by the batch they produce, not
by guessing req/s. By Little's law, in steady state

    requests in decode per worker = rate / decode_workers * decode time per request
    decode time per request       = mean output tokens * decode step time at that batch

and the emulator's cost model (loadtest/emulator/costmodel.py) gives the step time, which grows
with the distinct experts per layer the batch activates. That term decides the plan:

- `uniform_distinct_experts` is the expectation when every token picks its top-k uniformly,
  `E * (1 - (1 - k/E)^B)`. It is an upper bound and far off: at batch 8 on Qwen3-30B-A3B it
  says 51.6 distinct experts per layer where the committed runs measured about 25, so the
  modelled step was 1.7x too long, requests were planned to live 1.7x longer than they did,
  and the achieved batch came out about half the target (planned 8 and 16, measured 4.2 and
  6.3; results/compare/task).
- `sampled_distinct_experts` measures it instead on the workload's own routing (decode tokens
  of real workload requests, routed by the same source the emulated cluster uses): a step of a
  load-only router holds one token each of B requests drawn at random. compare plans with it
  (`compare.workload_routing_sample`); the report prints the achieved batch beside the plan.

The plan is for steady state, which a run reaches late: a request admitted while batches are
small decodes fast and leaves early, so the batch keeps growing for about two planned request
lifetimes (`RAMP_LIFETIMES`). Measured on the 600-request sweeps of results/seeds, whose
arrivals lasted 1.2-2.3 lifetimes: the decode batch was still rising at the last arrival, and
its mean from one lifetime on was 55-85% of the plan. So the achieved batch is measured only
after the ramp (`compare.steady_window`, none when under one lifetime is left), and compare
asks for arrivals lasting `STEADY_STATE_LIFETIMES` lifetimes, the ramp plus two measured
(`RatePlan.arrival_window_ok`, `RatePlan.requests_for_steady_state`). Prefill is ignored: it
runs on other workers and delays decode entry without changing how many requests decode
concurrently in steady state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from loadtest.emulator.costmodel import CostModel
from zones.geometry import ModelGeometry

# Random batches drawn per batch size by `sampled_distinct_experts`: the mean's standard error
# is then well under 1% of its value for the sample sizes compare uses.
SAMPLE_DRAWS = 256

# Planned request lifetimes after the first arrival until the decode batch is in steady state
# (see the module docstring), and the lifetimes of arrivals a run should have: that ramp plus
# two lifetimes measured at steady state.
RAMP_LIFETIMES = 2.0
STEADY_STATE_LIFETIMES = 4.0


def uniform_distinct_experts(batch: int, geometry: ModelGeometry) -> float:
    """Expected distinct experts per layer when `batch` tokens each pick top_k uniformly."""
    e, k = geometry.num_experts, geometry.top_k
    return e * (1.0 - (1.0 - k / e) ** batch)


def sampled_distinct_experts(
    decode_rows: Sequence[npt.NDArray[np.integer]],
    batch: int,
    num_experts: int,
    *,
    seed: int = 0,
    draws: int = SAMPLE_DRAWS,
) -> float:
    """Mean distinct experts per layer of a decode step holding one token each of `batch`
    requests drawn at random (without replacement while there are enough requests).

    `decode_rows[r]` is request r's decode routing, [tokens, layers, top_k] expert ids.
    """
    rows = [r for r in decode_rows if len(r)]
    if not rows or batch < 1:
        raise ValueError("need at least one request with decode tokens, and batch >= 1")
    layers = rows[0].shape[1]
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(draws):
        picks = rng.choice(len(rows), size=batch, replace=batch > len(rows))
        step = np.stack([rows[p][rng.integers(len(rows[p]))] for p in picks])  # [B, L, k]
        mask = np.zeros((layers, num_experts), dtype=bool)
        mask[np.arange(layers)[None, :, None], step] = True
        total += mask.sum() / layers
    return float(total / draws)


@dataclass(frozen=True, slots=True)
class RatePlan:
    batch: int
    rate: float  # requests per second over the whole cluster
    step_seconds: float  # modelled decode step at that batch (time scale included)
    request_seconds: float  # decode time of a mean-length request
    distinct_experts: float | None = None  # per layer at this batch, as planned with

    def arrival_window_ok(self, num_requests: int,
                          factor: float = STEADY_STATE_LIFETIMES) -> bool:
        """Whether arrivals last `factor` request lifetimes, so the run reaches steady state and
        stays there a while (a burst shorter than one lifetime never fills batches)."""
        return num_requests / self.rate >= factor * self.request_seconds

    def requests_for_steady_state(self, factor: float = STEADY_STATE_LIFETIMES) -> int:
        """The fewest requests whose arrivals last `factor` request lifetimes at this rate."""
        return math.ceil(factor * self.request_seconds * self.rate)


def plan_for_batch(
    cost: CostModel,
    geometry: ModelGeometry,
    *,
    decode_workers: int,
    batch: int,
    mean_output_tokens: float,
    mean_prompt_tokens: float,
    distinct_experts: float | None = None,
) -> RatePlan:
    """Requests per second that keep about `batch` requests decoding on every worker.

    `distinct_experts`: expected distinct experts per layer at this batch (e.g. from
    `sampled_distinct_experts`); the uniform-routing upper bound when None."""
    if decode_workers < 1 or batch < 1:
        raise ValueError("decode_workers and batch must be >= 1")
    if mean_output_tokens <= 0 or mean_prompt_tokens < 0:
        raise ValueError("mean_output_tokens must be > 0 and mean_prompt_tokens >= 0")
    layers = cost.num_moe_layers or geometry.num_layers
    per_layer = (uniform_distinct_experts(batch, geometry) if distinct_experts is None
                 else distinct_experts)
    distinct = [per_layer] * layers
    # On average a decoding request is half-way through its output.
    kv_tokens = int(batch * (mean_prompt_tokens + mean_output_tokens / 2))
    step = cost.decode_step_seconds(batch, distinct, kv_tokens)
    if step <= 0:
        raise ValueError("the cost model gives zero-length decode steps; no rate follows")
    request = mean_output_tokens * step
    return RatePlan(batch, batch * decode_workers / request, step, request, per_layer)

"""Pick request rates that put a target decode batch on every worker of the emulated cluster.

Expert locality only matters when decode batches are large enough for their expert union to
grow (the paper measured at batch 64), so rates are best chosen by the batch they produce, not
by guessing req/s. By Little's law, in steady state

    requests in decode per worker = rate / decode_workers * decode time per request
    decode time per request       = mean output tokens * decode step time at that batch

and the emulator's cost model (loadtest/emulator/costmodel.py) gives the step time. The
distinct-experts term uses the uniform-routing expectation `E * (1 - (1 - k/E)^B)`, an upper
bound: real traffic has locality, so its steps are shorter, requests finish sooner and the
achieved batch is SMALLER than the target (measured on 2P+4D, time scale 20: target 16 gave a
mean batch of about 6). Treat the plan as a starting point and read the achieved batch from the
report's "mean batch" column. Prefill is ignored: it runs on other workers and
delays decode entry without changing how many requests decode concurrently in steady state.
"""

from __future__ import annotations

from dataclasses import dataclass

from loadtest.emulator.costmodel import CostModel
from zones.geometry import ModelGeometry


def uniform_distinct_experts(batch: int, geometry: ModelGeometry) -> float:
    """Expected distinct experts per layer when `batch` tokens each pick top_k uniformly."""
    e, k = geometry.num_experts, geometry.top_k
    return e * (1.0 - (1.0 - k / e) ** batch)


@dataclass(frozen=True, slots=True)
class RatePlan:
    batch: int
    rate: float  # requests per second over the whole cluster
    step_seconds: float  # modelled decode step at that batch (time scale included)
    request_seconds: float  # decode time of a mean-length request

    def arrival_window_ok(self, num_requests: int, factor: float = 3.0) -> bool:
        """Whether arrivals last `factor` request lifetimes, so most of the run is steady state
        rather than ramp-up and drain (a burst shorter than one lifetime never fills batches)."""
        return num_requests / self.rate >= factor * self.request_seconds


def plan_for_batch(
    cost: CostModel,
    geometry: ModelGeometry,
    *,
    decode_workers: int,
    batch: int,
    mean_output_tokens: float,
    mean_prompt_tokens: float,
) -> RatePlan:
    """Requests per second that keep about `batch` requests decoding on every worker."""
    if decode_workers < 1 or batch < 1:
        raise ValueError("decode_workers and batch must be >= 1")
    if mean_output_tokens <= 0 or mean_prompt_tokens < 0:
        raise ValueError("mean_output_tokens must be > 0 and mean_prompt_tokens >= 0")
    layers = cost.num_moe_layers or geometry.num_layers
    distinct = [uniform_distinct_experts(batch, geometry)] * layers
    # On average a decoding request is half-way through its output.
    kv_tokens = int(batch * (mean_prompt_tokens + mean_output_tokens / 2))
    step = cost.decode_step_seconds(batch, distinct, kv_tokens)
    if step <= 0:
        raise ValueError("the cost model gives zero-length decode steps; no rate follows")
    request = mean_output_tokens * step
    return RatePlan(batch, batch * decode_workers / request, step, request)

"""Per-request latency metrics from stream events, and percentile summaries.

Definitions follow `sglang.benchmark.serving` (sglang 0.5.23, `calculate_metrics` and the
`async_request_*` stream readers) so numbers are comparable with `sglang.bench_serving`:

- TTFT: time from sending the request to the first stream chunk that carries output text.
- ITL: the gaps between later text-carrying chunks. When one chunk carries several new tokens
  (`/generate` reports a cumulative `meta_info.completion_tokens`), the gap is split evenly over
  them, as `async_request_sglang_generate` does (`adjust_itl = chunk_gap / num_new_tokens`).
- E2E latency: time from sending to the last chunk received (any chunk, `[DONE]` included: the
  reader updates `latency` on every chunk).
- TPOT: `(latency - ttft) / (output_tokens - 1)`, defined only when output_tokens > 1
  (`calculate_metrics`: `if output_len > 1: tpots.append(...)`). This is the issue's "sum of
  inter-token gaps over output tokens minus one" except that it also counts the tail between the
  last token and the end of the stream, exactly as SGLang's benchmark does.

Everything here is pure: the driver feeds it timestamps, tests feed it hand-made sequences.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One received stream chunk: seconds since the request was sent, and what it carried.

    `tokens_total` is the cumulative output-token count when the server reports one
    (`/generate`'s `meta_info.completion_tokens`, OpenAI `usage.completion_tokens`), else None.
    `has_text` is whether the chunk carried non-empty output text.
    """

    t: float
    has_text: bool
    tokens_total: int | None = None


@dataclass(frozen=True, slots=True)
class RequestTiming:
    ttft: float | None
    latency: float | None
    output_tokens: int
    itl: tuple[float, ...] = field(default_factory=tuple)

    @property
    def tpot(self) -> float | None:
        """SGLang bench_serving's TPOT; None when it is undefined (fewer than 2 tokens)."""
        if self.ttft is None or self.latency is None or self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def timing_from_events(
    events: Sequence[StreamEvent], fallback_output_tokens: int | None = None
) -> RequestTiming:
    """Compute TTFT, ITL, latency and the output-token count from a request's stream events.

    The output-token count is the last server-reported cumulative count when there is one,
    else the number of text chunks (one token per chunk, as OpenAI streams deliver them), else
    `fallback_output_tokens` (bench_serving falls back to the requested length the same way).
    """
    ttft: float | None = None
    latency: float | None = None
    itl: list[float] = []
    last_text_t = 0.0
    last_tokens = 0
    reported: int | None = None
    text_chunks = 0
    for ev in events:
        if ev.t < 0 or not math.isfinite(ev.t):
            raise ValueError(f"stream event time must be finite and >= 0, got {ev.t!r}")
        if latency is not None and ev.t < latency:
            raise ValueError("stream events must be in time order")
        latency = ev.t
        if ev.tokens_total is not None:
            reported = ev.tokens_total
        if not ev.has_text:
            continue
        text_chunks += 1
        current = ev.tokens_total if ev.tokens_total is not None else last_tokens + 1
        if ttft is None:
            ttft = ev.t
        else:
            new_tokens = current - last_tokens
            if new_tokens <= 0:
                # bench_serving skips a text chunk that adds no tokens without moving its clock.
                continue
            gap = (ev.t - last_text_t) / new_tokens
            itl.extend([gap] * new_tokens)
        last_text_t = ev.t
        last_tokens = current
    if reported is not None:
        output_tokens = reported
    elif text_chunks:
        output_tokens = text_chunks
    else:
        output_tokens = fallback_output_tokens or 0
    return RequestTiming(ttft=ttft, latency=latency, output_tokens=output_tokens, itl=tuple(itl))


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True)
class Distribution:
    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, values: Iterable[float]) -> Distribution:
        vals = [float(v) for v in values]
        if not vals:
            return cls(0, None, None, None, None, None)
        return cls(
            count=len(vals),
            mean=sum(vals) / len(vals),
            p50=percentile(vals, 50),
            p90=percentile(vals, 90),
            p99=percentile(vals, 99),
            max=max(vals),
        )

    def scaled(self, factor: float) -> Distribution:
        """The same distribution in other units (seconds -> milliseconds: 1000)."""

        def s(v: float | None) -> float | None:
            return None if v is None else v * factor

        return Distribution(
            self.count, s(self.mean), s(self.p50), s(self.p90), s(self.p99), s(self.max)
        )

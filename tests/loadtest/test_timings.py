"""TTFT/TPOT/ITL against hand-made stream event sequences (definitions: sglang bench_serving)."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.timings import Distribution, StreamEvent, percentile, timing_from_events


def test_one_token_per_chunk_stream() -> None:
    # OpenAI-style: one token per chunk, then a usage-only chunk and [DONE].
    events = [
        StreamEvent(0.50, True),
        StreamEvent(0.60, True),
        StreamEvent(0.75, True),
        StreamEvent(0.90, True),
        StreamEvent(0.91, False, tokens_total=4),
        StreamEvent(0.92, False),
    ]
    t = timing_from_events(events)
    assert t.ttft == pytest.approx(0.50)
    assert t.latency == pytest.approx(0.92)  # the last chunk of any kind ends the request
    assert t.output_tokens == 4
    assert t.itl == pytest.approx((0.10, 0.15, 0.15))
    # bench_serving: (latency - ttft) / (output_len - 1)
    assert t.tpot == pytest.approx((0.92 - 0.50) / 3)


def test_cumulative_counts_split_chunk_gap_evenly() -> None:
    # /generate-style: cumulative completion_tokens; a 3-token chunk spreads its gap over 3.
    events = [
        StreamEvent(0.2, True, tokens_total=1),
        StreamEvent(0.5, True, tokens_total=4),
        StreamEvent(0.5, True, tokens_total=4),  # no new tokens: skipped, clock not moved
        StreamEvent(0.7, True, tokens_total=5),
    ]
    t = timing_from_events(events)
    assert t.ttft == pytest.approx(0.2)
    assert t.output_tokens == 5
    assert t.itl == pytest.approx((0.1, 0.1, 0.1, 0.2))
    assert t.tpot == pytest.approx((0.7 - 0.2) / 4)


def test_single_token_has_no_tpot() -> None:
    t = timing_from_events([StreamEvent(0.3, True, tokens_total=1)])
    assert t.ttft == pytest.approx(0.3)
    assert t.output_tokens == 1
    assert t.tpot is None
    assert t.itl == ()


def test_no_text_means_no_ttft_and_fallback_count() -> None:
    t = timing_from_events([StreamEvent(0.1, False)], fallback_output_tokens=7)
    assert t.ttft is None
    assert t.tpot is None
    assert t.output_tokens == 7


def test_events_out_of_order_are_rejected() -> None:
    with pytest.raises(ValueError, match="time order"):
        timing_from_events([StreamEvent(0.5, True), StreamEvent(0.4, True)])
    with pytest.raises(ValueError, match="finite"):
        timing_from_events([StreamEvent(float("nan"), True)])


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    values = list(np.random.default_rng(3).exponential(1.0, size=37))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_distribution_empty_and_scaled() -> None:
    assert Distribution.of([]).p50 is None
    d = Distribution.of([0.001, 0.002, 0.003]).scaled(1000.0)
    assert d.count == 3
    assert d.p50 == pytest.approx(2.0)
    assert d.max == pytest.approx(3.0)

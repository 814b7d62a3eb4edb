"""Pure analysis of emulator counters and CPU samples for one experiment run.

`GET /emulator/stats` returns cumulative decode-step counters (see loadtest/emulator/engine.py
`EngineStats`), so a run's numbers are the difference between a snapshot taken before and one
taken after it; nothing needs resetting between runs. The JSON layout may nest the engine
counters (e.g. under `"decode"`), so counters are looked up by their field name anywhere in the
document.

A run is VOID when this machine, not the modelled cluster, limited it: the emulator's decode
loop overran its modelled step times (host lag), or the CPU was saturated. Then the measured
latencies describe the host, not the routing, and the report marks the run instead of ranking it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

COUNTERS = (
    "steps",
    "tokens",
    "batch_size_sum",
    "distinct_experts_sum",
    "step_seconds_sum",
    "wall_seconds_sum",
    "host_lag_seconds_sum",
    "lagged_steps",
    "requests_finished",
    "requests_aborted",
)
# VOID thresholds.
# Host lag: the emulator's decode loop overran its modelled step times by more than 2% of the
# modelled decode time in total. The overrun adds directly to every client-visible inter-token
# gap, so it bounds how much the host inflated TPOT; 2% is well below the 10-15% effects the
# comparison looks for. (Counting steps that overran by more than the emulator's fixed 2 ms
# tolerance proved too strict with time-scaled ~100 ms steps: asyncio wake-ups on a busy host
# are routinely a few ms late. That fraction is still reported, just not used for the verdict.)
# CPU: the machine averaged above 90% of all cores (driver, router and emulator then compete
# for the same cores, and host queueing shows up as TPOT).
MAX_HOST_LAG_FRACTION = 0.02
MAX_SYSTEM_CPU_PERCENT = 90.0


def _walk(doc: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(doc, Mapping):
        for key, value in doc.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, doc


def counters(doc: Any) -> dict[str, float]:
    """The known cumulative counters of one stats document (first match by field name).

    Histogram sub-fields (`...distinct_experts_per_layer.count`) never match because only
    exact field names in COUNTERS are taken.
    """
    out: dict[str, float] = {}
    for path, value in _walk(doc):
        name = path.rsplit(".", 1)[-1]
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if name in COUNTERS and name not in out and numeric:
            out[name] = float(value)
    return out


def diff_counters(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """after - before per counter; a counter that went backwards means the worker restarted,
    and then `after` alone is the best available figure."""
    out = {}
    for name, value in after.items():
        prev = before.get(name, 0.0)
        out[name] = value - prev if value >= prev else value
    return out


def coefficient_of_variation(values: Sequence[float]) -> float | None:
    """Population std / mean; None for no values or a zero mean."""
    if not values:
        return None
    mean = sum(values) / len(values)
    if mean == 0:
        return None
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return math.sqrt(var) / mean


@dataclass(frozen=True, slots=True)
class ClusterRunStats:
    decode_steps: float | None
    distinct_experts_per_step: float | None  # mean over steps of the per-layer mean
    mean_batch_size: float | None
    requests_per_decode: list[float]  # finished requests per decode worker, worker order
    load_cv: float | None  # coefficient of variation of requests_per_decode
    lagged_step_fraction: float | None
    host_lag_fraction: float | None  # host overrun / modelled decode time
    # False when the workers expose no `/emulator/stats` (real SGLang workers): every counter
    # field above is then None or empty, and the host-lag VOID rule cannot apply.
    stats_available: bool = True
    # Mean decode batch between the end of ramp-up and the last arrival (compare's
    # `steady_window`), the batch a rate plan aims at; None when not measured.
    steady_mean_batch_size: float | None = None
    steady_window_s: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decode_run_stats(
    before: Sequence[Mapping[str, float]], after: Sequence[Mapping[str, float]]
) -> ClusterRunStats:
    """Aggregate per-decode-worker counter snapshots (same worker order in both lists)."""
    if len(before) != len(after):
        raise ValueError("before and after snapshots cover different numbers of workers")
    deltas = [diff_counters(b, a) for b, a in zip(before, after, strict=True)]

    def total(name: str) -> float:
        return sum(d.get(name, 0.0) for d in deltas)

    steps = total("steps")
    modelled = total("step_seconds_sum")
    per_worker = [d.get("requests_finished", 0.0) for d in deltas]
    return ClusterRunStats(
        decode_steps=steps,
        distinct_experts_per_step=total("distinct_experts_sum") / steps if steps else None,
        mean_batch_size=total("batch_size_sum") / steps if steps else None,
        requests_per_decode=per_worker,
        load_cv=coefficient_of_variation(per_worker),
        lagged_step_fraction=total("lagged_steps") / steps if steps else None,
        host_lag_fraction=total("host_lag_seconds_sum") / modelled if modelled else None,
    )


def unavailable_run_stats() -> ClusterRunStats:
    """Stats of a run on workers without `/emulator/stats`: nothing measured, nothing guessed."""
    return ClusterRunStats(
        decode_steps=None,
        distinct_experts_per_step=None,
        mean_batch_size=None,
        requests_per_decode=[],
        load_cv=None,
        lagged_step_fraction=None,
        host_lag_fraction=None,
        stats_available=False,
    )


def void_reasons(stats: ClusterRunStats, system_cpu_percent_mean: float | None) -> list[str]:
    """Why the host, not the modelled cluster, limited this run; empty when it did not."""
    reasons = []
    if stats.host_lag_fraction is not None and stats.host_lag_fraction > MAX_HOST_LAG_FRACTION:
        reasons.append(
            f"emulator host lag: overrun {stats.host_lag_fraction:.1%} of modelled decode time "
            f"(limit {MAX_HOST_LAG_FRACTION:.0%})"
        )
    if system_cpu_percent_mean is not None and system_cpu_percent_mean > MAX_SYSTEM_CPU_PERCENT:
        reasons.append(
            f"machine CPU {system_cpu_percent_mean:.0f}% on average "
            f"(limit {MAX_SYSTEM_CPU_PERCENT:.0f}%)"
        )
    return reasons

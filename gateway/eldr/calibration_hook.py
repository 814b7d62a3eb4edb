"""Dispatch hook that feeds the calibration log (`--calibration-log`, `--calibration-sample-rate`).

A sampled request is sent upstream with `return_routed_experts: true`; its non-streaming decode
answer becomes a `zones.calibration` record (routed experts of the output tokens only, token counts,
decode worker, signature source) offered to the non-blocking `CalibrationWriter`, and the routed
experts are stripped from what the client gets unless the client asked for them itself. The
building blocks (sampler, record, writer, strip) live in `calibration_log.py`; this module only
connects them to `Dispatcher`.

Not sampled: streams and batched requests (one record describes one prompt and one output), and
any request while the routing shape is unknown: a record needs the model geometry, which the
active zone table carries or `--model-geometry` gives (the latter lets the first table's data be
collected by the gateway itself).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from gateway.eldr.calibration_log import (
    CalibrationSampler,
    CalibrationWriter,
    client_asked_for_routed_experts,
    make_record,
    request_routed_experts,
    strip_routed_experts,
)
from gateway.eldr.prompts import output_expert_counts, prompt_of, token_counts_of
from gateway.resolver import RequestContext
from gateway.routing import Selection
from zones.geometry import ModelGeometry
from zones.routed_experts import IntArray, RoutedExpertsError, decode_counts


class GeometrySource(Protocol):
    """Where the routing shape comes from (a `ZoneRuntime`, or a stub in tests)."""

    @property
    def geometry(self) -> ModelGeometry | None: ...


def prefill_prompt_counts(prefill: Any, geometry: ModelGeometry) -> IntArray | None:
    """`prompt_expert_counts` of a prefill-first prefill answer (meta_info, or sglext on the
    OpenAI endpoints), decoded for `geometry`; None when absent, malformed or of another shape."""
    if not isinstance(prefill, dict):
        return None
    for holder in ("meta_info", "sglext"):
        meta = prefill.get(holder)
        if isinstance(meta, dict) and "prompt_expert_counts" in meta:
            try:
                return decode_counts(meta["prompt_expert_counts"], geometry)
            except RoutedExpertsError:
                return None
    return None


class CalibrationHook:
    def __init__(self, writer: CalibrationWriter, sampler: CalibrationSampler,
                 zones: GeometrySource) -> None:
        self._writer = writer
        self._sampler = sampler
        self._zones = zones

    def prepare(self, ctx: RequestContext) -> dict[str, Any] | None:
        """The body to send upstream when this request is sampled, else None (unchanged)."""
        if ctx.stream or ctx.batch is not None or self._zones.geometry is None or \
                not self._sampler.sample():
            return None
        ctx.calibration_sampled = True
        ctx.client_asked_routed_experts = client_asked_for_routed_experts(ctx.body)
        return request_routed_experts(ctx.body)

    def on_result(self, ctx: RequestContext, decode_worker_id: str,
                  selection: Selection | None, parsed: Any, prefill: Any = None) -> bool:
        """Record a sampled answer; True when `parsed` was modified (routed experts stripped).

        `prefill`: the prefill's parsed answer in the prefill-first flow. Its
        `prompt_expert_counts` go into the record as `prompt_counts`, so that a table for the
        prefill-first flow, which routes on them, is fitted on them (`zones fit` prefers prompt
        counts as signatures when a record has them)."""
        if not ctx.calibration_sampled or not isinstance(parsed, dict):
            return False
        geometry = self._zones.geometry
        if geometry is not None:
            counts = output_expert_counts(parsed, ctx.body, geometry)
            prompt_tokens, output_tokens = token_counts_of(parsed)
            if counts is not None:
                now = time.time()
                record = make_record(
                    geometry, prompt_of(ctx),
                    received_at=now - (time.perf_counter() - ctx.started),
                    prompt_counts=prefill_prompt_counts(prefill, geometry),
                    output_counts=counts,
                    num_prompt_tokens=prompt_tokens,
                    num_output_tokens=output_tokens,
                    finished_at=now, decode_worker=decode_worker_id,
                    signature_source=ctx.signature_source,
                )
                if record is not None:
                    self._writer.offer(record)
        if ctx.client_asked_routed_experts:
            return False
        return strip_routed_experts(parsed)

    def close(self) -> None:
        self._writer.close()

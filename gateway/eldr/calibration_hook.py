"""Dispatch hook that feeds the calibration log (`--calibration-log`, `--calibration-sample-rate`).

A sampled request is sent upstream with `return_routed_experts: true`; its non-streaming decode
answer becomes a `zones.calibration` record (routed experts of the output tokens only, token counts,
decode worker, signature source) offered to the non-blocking `CalibrationWriter`, and the routed
experts are stripped from what the client gets unless the client asked for them itself. The
building blocks (sampler, record, writer, strip) live in `calibration_log.py`; this module only
connects them to `Dispatcher`.

Not sampled: streams and batched requests (one record describes one prompt and one output), and
any request while no zone table is active (a record needs the model geometry, which the table
carries).
"""

from __future__ import annotations

import time
from typing import Any

from gateway.calibration_log import (
    CalibrationSampler,
    CalibrationWriter,
    client_asked_for_routed_experts,
    make_record,
    request_routed_experts,
    strip_routed_experts,
)
from gateway.policies.base import Selection
from gateway.resolver import RequestContext
from gateway.signatures import prompt_from_request, routed_experts_of
from zones.geometry import ModelGeometry
from zones.routed_experts import (
    IntArray,
    RoutedExpertsError,
    counts_from_expert_ids,
    decode_routed_experts,
)

_SAMPLED = "calibration_sampled"
_CLIENT_ASKED = "calibration_client_asked"


class CalibrationHook:
    def __init__(self, writer: CalibrationWriter, sampler: CalibrationSampler,
                 zone_runtime: Any) -> None:
        self._writer = writer
        self._sampler = sampler
        self._zones = zone_runtime  # anything with `.active` (ActiveZones | None)

    def prepare(self, ctx: RequestContext) -> dict[str, Any] | None:
        """The body to send upstream when this request is sampled, else None (unchanged)."""
        if ctx.stream or ctx.batch is not None or self._zones is None or \
                self._zones.active is None or not self._sampler.sample():
            return None
        ctx.extras[_SAMPLED] = True
        ctx.extras[_CLIENT_ASKED] = client_asked_for_routed_experts(ctx.body)
        return request_routed_experts(ctx.body)

    def on_result(self, ctx: RequestContext, decode_worker_id: str,
                  selection: Selection | None, parsed: Any) -> bool:
        """Record a sampled answer; True when `parsed` was modified (routed experts stripped)."""
        if not ctx.extras.get(_SAMPLED) or not isinstance(parsed, dict):
            return False
        active = self._zones.active
        payload = routed_experts_of(parsed)
        meta = parsed.get("meta_info")
        usage = parsed.get("usage")
        info = meta if isinstance(meta, dict) else usage if isinstance(usage, dict) else {}
        prompt_tokens = _int(info.get("prompt_tokens"))
        if active is not None and payload is not None and prompt_tokens is not None:
            geometry = active.table.geometry
            counts = _output_counts(payload, geometry, prompt_tokens,
                                    ctx.body.get("routed_experts_start_len"))
            if counts is not None:
                now = time.time()
                record = make_record(
                    geometry, prompt_from_request(ctx.endpoint, ctx.body),
                    received_at=now - (time.perf_counter() - ctx.started),
                    output_counts=counts,
                    num_prompt_tokens=prompt_tokens,
                    num_output_tokens=_int(info.get("completion_tokens")),
                    finished_at=now, decode_worker=decode_worker_id,
                    signature_source=ctx.extras.get("signature_source"),
                )
                if record is not None:
                    self._writer.offer(record)
        if ctx.extras.get(_CLIENT_ASKED):
            return False
        return strip_routed_experts(parsed)

    def close(self) -> None:
        self._writer.close()


def _output_counts(payload: str, geometry: ModelGeometry, prompt_tokens: int,
                   start_len: Any) -> IntArray | None:
    """Counts of the output rows only, or None when the rows are malformed or none is left.

    A PD decode returns rows for positions `[start_len, seqlen - 1)` but never forwarded the
    prompt, so its first `prompt_tokens - start_len` rows are not routing (SGLang leaves them
    unset, the emulator zeros them; docs/wire-format.md, "Routed experts"). Counting them would
    credit expert 0 (or garbage) with every prompt token. A regular worker's prompt rows are
    valid but are prompt routing, not output routing, so they are skipped as well.
    """
    start = start_len if isinstance(start_len, int) and not isinstance(start_len, bool) else 0
    try:
        rows = decode_routed_experts(payload, geometry)[max(0, prompt_tokens - start):]
    except RoutedExpertsError:
        return None
    if not len(rows):
        return None
    return counts_from_expert_ids(rows, geometry)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None

"""Turn driver results into a `zones` calibration log, for any router in front of the workers.

The driver asks for `return_routed_experts: true`; SGLang's decode (and the emulator) then
returns `meta_info.routed_experts` (`sglext.routed_experts` on OpenAI endpoints). In PD mode
only rows the decode itself forwarded are valid (docs: DESIGN.md, SGLang facts, item 2): the rows
cover positions `[routed_experts_start_len, seqlen - 1)`, and the decode never forwarded the
prompt positions, so the first `prompt_tokens - start_len` rows are skipped. What remains is the
request's decode-time routing, written as `output_counts` with the prompt text, which is what
`zones fit` needs to fit zones and the text predictor (zones/calibration.py).

This lets `loadtest compare` calibrate through any router, the gateway's own
`--calibration-log` being the other way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loadtest.driver import RequestRecord
from zones.calibration import CalibrationRecord, write_calibration
from zones.geometry import ModelGeometry
from zones.routed_experts import RoutedExpertsError, counts_from_expert_ids, decode_routed_experts

# Body fields that make the decode return routing rows (sglang 0.5.23 GenerateReqInput).
ROUTED_EXPERTS_BODY = {"return_routed_experts": True}


@dataclass(frozen=True, slots=True)
class CaptureStats:
    records: int
    skipped_failed: int
    skipped_no_rows: int
    skipped_bad_rows: int


def output_counts_from_rows(
    payload: str, geometry: ModelGeometry, prompt_tokens: int | None, start_len: int = 0
) -> tuple[int, ...] | None:
    """Decode SGLang rows and count only the decode-forwarded (output) positions.

    Returns the flattened count matrix as a tuple (hashable, for tests) or None when no output
    row remains. Raises RoutedExpertsError for malformed rows.
    """
    ids = decode_routed_experts(payload, geometry)
    skip = max(0, (prompt_tokens or 0) - start_len)
    rows = ids[skip:]
    if not len(rows):
        return None
    return tuple(int(x) for x in counts_from_expert_ids(rows, geometry).ravel())


def calibration_records(
    records: Sequence[RequestRecord], geometry: ModelGeometry, now: float | None = None
) -> tuple[list[CalibrationRecord], CaptureStats]:
    import numpy as np

    out: list[CalibrationRecord] = []
    failed = no_rows = bad = 0
    base = time.time() if now is None else now
    for rec in records:
        if not rec.success:
            failed += 1
            continue
        if not rec.routed_experts:
            no_rows += 1
            continue
        try:
            flat = output_counts_from_rows(rec.routed_experts, geometry, rec.prompt_tokens)
        except RoutedExpertsError:
            bad += 1
            continue
        if flat is None:
            no_rows += 1
            continue
        counts = np.asarray(flat, dtype=np.int32).reshape(geometry.num_layers, geometry.num_experts)
        out.append(
            CalibrationRecord(
                geometry=geometry,
                received_at=base + rec.sent_s,
                finished_at=base + rec.sent_s + (rec.latency or 0.0),
                text=rec.prompt_text or None,
                output_counts=counts,
                num_prompt_tokens=rec.prompt_tokens,
                num_output_tokens=rec.output_tokens,
            )
        )
    return out, CaptureStats(len(out), failed, no_rows, bad)


def write_calibration_log(
    records: Sequence[RequestRecord], geometry: ModelGeometry, path: Path
) -> CaptureStats:
    recs, stats = calibration_records(records, geometry)
    if recs:
        write_calibration(path, recs)
    return stats

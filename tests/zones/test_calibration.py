"""Calibration log: record round trip, validation naming the field, tolerant reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from zones.calibration import (
    CalibrationError,
    CalibrationRecord,
    ReadStats,
    parse_calibration_line,
    read_calibration,
    write_calibration,
)
from zones.geometry import ModelGeometry

from .helpers import SMALL, random_counts


def _record(i: int = 0, **kw: object) -> CalibrationRecord:
    counts = random_counts(2, seed=i)
    fields: dict[str, object] = dict(
        geometry=SMALL,
        received_at=1_700_000_000.0 + i,
        text=f"prompt {i}",
        input_ids=(1, 2, 3),
        prompt_counts=counts[0],
        output_counts=counts[1],
        num_prompt_tokens=3,
        num_output_tokens=9,
        finished_at=1_700_000_001.5 + i,
        prefill_worker="http://p:30000",
        decode_worker="http://d:30001",
        signature_source="prefill",
    )
    fields.update(kw)
    return CalibrationRecord(**fields)  # type: ignore[arg-type]


def test_round_trip() -> None:
    rec = _record()
    line = rec.to_json_line()
    assert line.endswith("\n") and line.count("\n") == 1
    back = parse_calibration_line(line)
    np.testing.assert_array_equal(back.prompt_counts, rec.prompt_counts)
    np.testing.assert_array_equal(back.output_counts, rec.output_counts)
    assert back.to_dict() == rec.to_dict()
    assert json.loads(line)["schema_version"] == 1


def test_signature_counts_prefers_prompt() -> None:
    rec = _record()
    assert rec.signature_counts() is rec.prompt_counts
    only_output = _record(prompt_counts=None)
    assert only_output.signature_counts() is only_output.output_counts


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema_version": 9}, "schema_version: unsupported 9"),
        ({"surprise": 1}, "surprise: unknown field"),
        ({"geometry": {"num_layers": 4}}, "geometry:"),
        ({"prompt_counts": "AAAA"}, "prompt_counts: counts has 3 bytes"),
        ({"output_counts": "not base64!"}, "output_counts: .*not valid base64"),
        ({"received_at": "yesterday"}, "received_at: must be finite"),
        ({"input_ids": [1, -2]}, "input_ids: must be a list of non-negative"),
        ({"signature_source": "magic"}, "signature_source: must be one of"),
        ({"decode_worker": 5}, "decode_worker: must be a string"),
        ({"num_output_tokens": -1}, "num_output_tokens: must be a non-negative"),
        (
            {"text": None, "input_ids": None, "prompt_counts": None, "output_counts": None},
            "record holds none of them",
        ),
    ],
)
def test_bad_records_name_the_field(change: dict[str, object], message: str) -> None:
    doc = _record().to_dict()
    doc.update(change)
    with pytest.raises(CalibrationError, match=message):
        parse_calibration_line(json.dumps(doc))


def test_missing_received_at() -> None:
    doc = _record().to_dict()
    del doc["received_at"]
    with pytest.raises(CalibrationError, match="received_at: missing"):
        parse_calibration_line(json.dumps(doc))


def test_counts_shape_checked_on_construction() -> None:
    with pytest.raises(CalibrationError, match="prompt_counts: must be integer"):
        _record(prompt_counts=np.zeros((3, 8), np.int32))


def test_reader_reports_line_and_skips_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "calib.jsonl"
    write_calibration(path, [_record(0), _record(1)])
    with path.open("a") as fh:
        fh.write("\n")  # blank lines are fine
        fh.write(_record(2).to_json_line()[:40])  # a crash mid-append: truncated last line
    with pytest.raises(CalibrationError, match=r"calib.jsonl:4: record: not valid JSON"):
        list(read_calibration(path))
    stats = ReadStats()
    records = list(read_calibration(path, skip_invalid=True, stats=stats))
    assert len(records) == 2 and stats.records == 2 and stats.skipped == 1
    assert stats.first_error is not None and ":4:" in stats.first_error


def test_reader_rejects_mixed_geometry(tmp_path: Path) -> None:
    other = ModelGeometry("other", 2, 8, 2)
    path = tmp_path / "mixed.jsonl"
    write_calibration(path, [_record(0), CalibrationRecord(other, 1.0, text="x")])
    with pytest.raises(CalibrationError, match=r":2: geometry: .* differs"):
        list(read_calibration(path))

"""The calibration log: one JSON object per line, appended by the gateway, read by `zones fit`.

Each line is one finished request (schema version 1; full description in docs/zones.md):

    schema_version   1 (required)
    geometry         {name, num_layers, num_experts, top_k} (required; never assumed)
    text             prompt text, or null
    input_ids        prompt token ids, or null           (at least one of text/input_ids/counts)
    prompt_counts    base64 int32 [L, E] of prompt-token routing, or null. Only prefill-first
                     workers report it: stock SGLang returns no valid prompt rows in PD mode.
    output_counts    base64 int32 [L, E] of the decode's own routed_experts rows (output
                     tokens), or null
    num_prompt_tokens, num_output_tokens   integers or null
    received_at      unix seconds (float) when the gateway received the request (required)
    finished_at      unix seconds when the response finished, or null
    prefill_worker, decode_worker          worker ids (strings) or null
    signature_source "prefill" | "cache" | "predictor" | "none" | null

Unknown keys are rejected so that a typo does not silently drop data. `zones fit` builds a
request's signature from `prompt_counts` when present, else from `output_counts`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from zones.geometry import GeometryError, ModelGeometry
from zones.routed_experts import RoutedExpertsError, decode_counts, encode_counts

CALIBRATION_SCHEMA_VERSION = 1
SIGNATURE_SOURCES = ("prefill", "cache", "predictor", "none")
_FIELDS = (
    "schema_version",
    "geometry",
    "text",
    "input_ids",
    "prompt_counts",
    "output_counts",
    "num_prompt_tokens",
    "num_output_tokens",
    "received_at",
    "finished_at",
    "prefill_worker",
    "decode_worker",
    "signature_source",
)

IntArray = npt.NDArray[np.int32]


class CalibrationError(ValueError):
    """A calibration record is malformed; the message names the field (and line when reading)."""


@dataclass(frozen=True, eq=False)
class CalibrationRecord:
    geometry: ModelGeometry
    received_at: float
    text: str | None = None
    input_ids: tuple[int, ...] | None = None
    prompt_counts: IntArray | None = None
    output_counts: IntArray | None = None
    num_prompt_tokens: int | None = None
    num_output_tokens: int | None = None
    finished_at: float | None = None
    prefill_worker: str | None = None
    decode_worker: str | None = None
    signature_source: str | None = None

    def __post_init__(self) -> None:
        g = self.geometry
        if not isinstance(g, ModelGeometry):
            raise CalibrationError("geometry: must be a ModelGeometry")
        if not _is_time(self.received_at):
            raise CalibrationError(
                f"received_at: must be finite unix seconds, got {self.received_at!r}"
            )
        if self.finished_at is not None and not _is_time(self.finished_at):
            raise CalibrationError(
                f"finished_at: must be finite unix seconds or null, got {self.finished_at!r}"
            )
        if self.text is not None and not isinstance(self.text, str):
            raise CalibrationError("text: must be a string or null")
        if self.input_ids is not None:
            ids = self.input_ids
            if not all(
                isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in ids
            ):
                raise CalibrationError("input_ids: must be a list of non-negative integers or null")
            object.__setattr__(self, "input_ids", tuple(int(i) for i in ids))
        for name in ("prompt_counts", "output_counts"):
            value = getattr(self, name)
            if value is None:
                continue
            arr = np.asarray(value)
            if arr.shape != (g.num_layers, g.num_experts) or not np.issubdtype(
                arr.dtype, np.integer
            ):
                raise CalibrationError(
                    f"{name}: must be integer [{g.num_layers}, {g.num_experts}], "
                    f"got {arr.dtype} {arr.shape}"
                )
            if arr.size and arr.min() < 0:
                raise CalibrationError(f"{name}: holds negative counts")
            object.__setattr__(self, name, arr.astype(np.int32))
        for name in ("num_prompt_tokens", "num_output_tokens"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0
            ):
                raise CalibrationError(f"{name}: must be a non-negative integer or null")
        for name in ("prefill_worker", "decode_worker"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise CalibrationError(f"{name}: must be a string or null")
        if self.signature_source is not None and self.signature_source not in SIGNATURE_SOURCES:
            raise CalibrationError(f"signature_source: must be one of {SIGNATURE_SOURCES} or null")
        if (
            self.text is None
            and self.input_ids is None
            and self.prompt_counts is None
            and (self.output_counts is None)
        ):
            raise CalibrationError(
                "text/input_ids/prompt_counts/output_counts: record holds none of them"
            )

    def signature_counts(self) -> IntArray | None:
        """The counts `zones fit` builds this request's signature from: prompt, else output."""
        return self.prompt_counts if self.prompt_counts is not None else self.output_counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": CALIBRATION_SCHEMA_VERSION,
            "geometry": self.geometry.to_dict(),
            "text": self.text,
            "input_ids": None if self.input_ids is None else list(self.input_ids),
            "prompt_counts": None
            if self.prompt_counts is None
            else encode_counts(self.prompt_counts),
            "output_counts": None
            if self.output_counts is None
            else encode_counts(self.output_counts),
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_output_tokens": self.num_output_tokens,
            "received_at": self.received_at,
            "finished_at": self.finished_at,
            "prefill_worker": self.prefill_worker,
            "decode_worker": self.decode_worker,
            "signature_source": self.signature_source,
        }

    def to_json_line(self) -> str:
        """One compact JSON line INCLUDING the trailing newline, ready to append to the log."""
        return (
            json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
            + "\n"
        )

    @classmethod
    def from_dict(cls, doc: Any) -> CalibrationRecord:
        if not isinstance(doc, dict):
            raise CalibrationError("record: must be a JSON object")
        version = doc.get("schema_version")
        if version != CALIBRATION_SCHEMA_VERSION or isinstance(version, bool):
            raise CalibrationError(
                f"schema_version: unsupported {version!r}, expected {CALIBRATION_SCHEMA_VERSION}"
            )
        unknown = sorted(set(doc) - set(_FIELDS))
        if unknown:
            raise CalibrationError(f"{unknown[0]}: unknown field")
        try:
            geometry = ModelGeometry.from_dict(doc.get("geometry"))
        except GeometryError as exc:
            raise CalibrationError(f"geometry: {exc}") from exc
        counts: dict[str, IntArray | None] = {}
        for name in ("prompt_counts", "output_counts"):
            payload = doc.get(name)
            if payload is None:
                counts[name] = None
                continue
            try:
                counts[name] = decode_counts(payload, geometry)
            except RoutedExpertsError as exc:
                raise CalibrationError(f"{name}: {exc}") from exc
        ids = doc.get("input_ids")
        if ids is not None and not isinstance(ids, list):
            raise CalibrationError("input_ids: must be a list of non-negative integers or null")
        if "received_at" not in doc:
            raise CalibrationError("received_at: missing")
        return cls(
            geometry=geometry,
            received_at=doc["received_at"],
            text=doc.get("text"),
            input_ids=None if ids is None else tuple(ids),
            prompt_counts=counts["prompt_counts"],
            output_counts=counts["output_counts"],
            num_prompt_tokens=doc.get("num_prompt_tokens"),
            num_output_tokens=doc.get("num_output_tokens"),
            finished_at=doc.get("finished_at"),
            prefill_worker=doc.get("prefill_worker"),
            decode_worker=doc.get("decode_worker"),
            signature_source=doc.get("signature_source"),
        )


def _is_time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_calibration_line(line: str | bytes) -> CalibrationRecord:
    try:
        doc = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"record: not valid JSON: {exc}") from exc
    return CalibrationRecord.from_dict(doc)


@dataclass
class ReadStats:
    """What `read_calibration` skipped, so callers can report it."""

    records: int = 0
    skipped: int = 0
    first_error: str | None = None


def read_calibration(
    path: str | os.PathLike[str], *, skip_invalid: bool = False, stats: ReadStats | None = None
) -> Iterator[CalibrationRecord]:
    """Yield validated records. Errors name the line number and field.

    With `skip_invalid`, bad lines are counted in `stats` and skipped (a gateway killed while
    appending leaves a truncated last line; that must not make the whole log unusable).
    All records of one log must share one geometry.
    """
    stats = stats if stats is not None else ReadStats()
    geometry: ModelGeometry | None = None
    with Path(path).open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                record = parse_calibration_line(raw)
                if geometry is None:
                    geometry = record.geometry
                elif record.geometry != geometry:
                    raise CalibrationError(
                        f"geometry: {record.geometry} differs from the first record's {geometry}"
                    )
            except CalibrationError as exc:
                message = f"{path}:{lineno}: {exc}"
                if not skip_invalid:
                    raise CalibrationError(message) from exc
                stats.skipped += 1
                stats.first_error = stats.first_error or message
                continue
            stats.records += 1
            yield record


def write_calibration(path: str | os.PathLike[str], records: Sequence[CalibrationRecord]) -> None:
    """Append records (used by tests and converters; the gateway appends line by line)."""
    with Path(path).open("a", encoding="utf-8") as fh:
        for record in records:
            fh.write(record.to_json_line())

"""Calibration log: sample requests, ask workers for their routed experts, hide them from clients
who did not ask, and append `zones.calibration` records so operators can fit zones from live
traffic (`python -m zones fit --calibration LOG`).

- `CalibrationSampler`: seeded Bernoulli sampling at a fixed rate.
- `request_routed_experts`: adds `return_routed_experts: true` (SGLang's request field on
  `/generate` and the OpenAI endpoints; sglang 0.5.23 `srt/managers/io_struct.py`,
  `srt/entrypoints/openai/protocol.py`) to a sampled request's body.
- `strip_routed_experts`: removes `meta_info.routed_experts` (`/generate`, also per item of a
  batched response) and `sglext.routed_experts` (OpenAI responses and stream chunks; SGLang omits
  `sglext` when it is empty, so an emptied `sglext` is removed too) from what the client gets.
  A client that asked for routed experts itself gets them untouched.
- `CalibrationWriter`: appends JSON lines from a background thread. `offer()` never blocks and
  never raises: a full queue drops the record and counts it; disk errors are counted, logged
  (first one and then every 1,000th) and the file is reopened on the next record, so a full or
  read-only disk degrades the log, never the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import random
import threading
from collections.abc import Sequence
from typing import IO, Any

import numpy.typing as npt

from gateway.eldr.metrics import EldrMetrics
from gateway.eldr.prompts import Prompt
from zones.calibration import CalibrationError, CalibrationRecord
from zones.geometry import ModelGeometry

log = logging.getLogger(__name__)

__all__ = [
    "CalibrationSampler", "CalibrationWriter", "client_asked_for_routed_experts", "make_record",
    "request_routed_experts", "strip_routed_experts",
]

DEFAULT_QUEUE_SIZE = 4096
# Records written per flush: amortises the syscall without holding many records in memory.
MAX_BATCH = 256
# How often the writer thread checks for shutdown while idle.
POLL_SECS = 0.2
_ERROR_LOG_EVERY = 1000


class CalibrationSampler:
    """Decides which requests are sampled for calibration (`rate` in [0, 1], seeded)."""

    def __init__(self, rate: float, seed: int | None = None) -> None:
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"calibration_sample_rate must be in [0, 1], got {rate!r}")
        self.rate = float(rate)
        self._rng = random.Random(seed)

    def sample(self) -> bool:
        if self.rate >= 1.0:
            return True
        if self.rate <= 0.0:
            return False
        return self._rng.random() < self.rate


def client_asked_for_routed_experts(body: Any) -> bool:
    return isinstance(body, dict) and body.get("return_routed_experts") is True


def request_routed_experts(body: dict[str, Any]) -> dict[str, Any]:
    """A copy of `body` that asks the worker for routed experts (the original is not touched)."""
    if body.get("return_routed_experts") is True:
        return body
    asked = dict(body)
    asked["return_routed_experts"] = True
    return asked


def strip_routed_experts(doc: Any) -> bool:
    """Remove routed experts from a response document in place; True if anything was removed."""
    if isinstance(doc, list):
        removed = False
        for item in doc:
            removed = strip_routed_experts(item) or removed
        return removed
    if not isinstance(doc, dict):
        return False
    removed = False
    meta = doc.get("meta_info")
    if isinstance(meta, dict) and "routed_experts" in meta:
        del meta["routed_experts"]
        removed = True
    ext = doc.get("sglext")
    if isinstance(ext, dict) and "routed_experts" in ext:
        del ext["routed_experts"]
        removed = True
        if not any(v is not None for v in ext.values()):
            del doc["sglext"]
    return removed


def make_record(
    geometry: ModelGeometry,
    prompt: Prompt | None,
    *,
    received_at: float,
    prompt_counts: npt.ArrayLike | None = None,
    output_counts: npt.ArrayLike | None = None,
    num_prompt_tokens: int | None = None,
    num_output_tokens: int | None = None,
    finished_at: float | None = None,
    prefill_worker: str | None = None,
    decode_worker: str | None = None,
    signature_source: str | None = None,
) -> CalibrationRecord | None:
    """A validated record, or None when the result holds nothing a fit could use."""
    try:
        return CalibrationRecord(
            geometry=geometry,
            received_at=received_at,
            text=None if prompt is None else prompt.text,
            input_ids=None if prompt is None else prompt.input_ids,
            prompt_counts=prompt_counts,  # type: ignore[arg-type]  # validated by the record
            output_counts=output_counts,  # type: ignore[arg-type]
            num_prompt_tokens=num_prompt_tokens,
            num_output_tokens=num_output_tokens,
            finished_at=finished_at,
            prefill_worker=prefill_worker,
            decode_worker=decode_worker,
            signature_source=signature_source,
        )
    except CalibrationError as exc:
        log.debug("calibration record skipped: %s", exc)
        return None


_STOP = object()


class CalibrationWriter:
    """Appends records to `path` from one background thread (module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_queue: int = DEFAULT_QUEUE_SIZE,
        metrics: EldrMetrics | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"calibration queue size must be >= 1, got {max_queue!r}")
        self.path = os.fspath(path)
        self._queue: queue.Queue[CalibrationRecord] = queue.Queue(maxsize=max_queue)
        self._metrics = metrics
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._file: IO[str] | None = None
        self.written = 0
        self.dropped = 0
        self.failed = 0
        self.last_error: str | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="calibration-log", daemon=True)
        self._thread.start()

    def offer(self, record: CalibrationRecord) -> bool:
        """Queue a record without blocking; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            if self._metrics is not None:
                self._metrics.record_calibration("dropped")
            return False
        return True

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (bounded by `timeout`), then stop the thread."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    async def aclose(self, timeout: float = 5.0) -> None:
        """`close()` without blocking the event loop (for an aiohttp cleanup context)."""
        await asyncio.get_running_loop().run_in_executor(None, self.close, timeout)

    # --- writer thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                try:
                    first = self._queue.get(timeout=POLL_SECS)
                except queue.Empty:
                    if self._stopping.is_set():
                        return
                    continue
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                self._write(batch)
        finally:
            self._close_file()

    def _write(self, batch: Sequence[CalibrationRecord]) -> None:
        try:
            lines = "".join(r.to_json_line() for r in batch)
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  # kept open
            self._file.write(lines)
            self._file.flush()
        except (OSError, ValueError, CalibrationError) as exc:
            self.failed += len(batch)
            self.last_error = f"{self.path}: {exc}"
            if self.failed <= len(batch) or self.failed % _ERROR_LOG_EVERY < len(batch):
                log.error("calibration log write failed (%d records lost so far): %s",
                          self.failed, exc)
            if self._metrics is not None:
                self._metrics.record_calibration("failed", len(batch))
            self._close_file()  # reopen on the next batch: the disk may come back
            return
        self.written += len(batch)
        if self._metrics is not None:
            self._metrics.record_calibration("written", len(batch))

    def _close_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # closing a file on a failed disk may fail too
                self._file.close()
            self._file = None

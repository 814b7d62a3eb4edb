"""The calibration hook records the decode's OUTPUT rows only (docs/wire-format.md: a PD decode's
first `prompt_tokens - routed_experts_start_len` rows were never forwarded, hence not routing)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.eldr.calibration_hook import CalibrationHook
from gateway.eldr.calibration_log import CalibrationSampler
from gateway.resolver import RequestContext
from tests.eldr.helpers import TINY, table
from zones.calibration import CalibrationRecord
from zones.routed_experts import encode_routed_experts


@dataclass
class FakeWriter:
    records: list[CalibrationRecord] = field(default_factory=list)

    def offer(self, record: CalibrationRecord) -> bool:
        self.records.append(record)
        return True

    def close(self) -> None:
        pass


@dataclass
class FakeActive:
    table: Any


@dataclass
class FakeZones:
    active: FakeActive

    @property
    def geometry(self) -> Any:
        return self.active.table.geometry


def _run(body: dict[str, Any], rows: list[int], prompt_tokens: int | None
         ) -> tuple[FakeWriter, dict[str, Any]]:
    writer = FakeWriter()
    hook = CalibrationHook(writer, CalibrationSampler(1.0, seed=0),  # type: ignore[arg-type]
                           FakeZones(FakeActive(table([[1, 0, 0], [0, 1, 0]], ["d0", "d1"]))))
    ctx = RequestContext("/generate", body, stream=False, return_logprob=False, batch=None,
                         started=time.perf_counter())
    assert hook.prepare(ctx) is not None
    meta: dict[str, Any] = {"routed_experts": encode_routed_experts(
        np.array(rows, np.int32).reshape(len(rows), TINY.num_layers, TINY.top_k))}
    if prompt_tokens is not None:
        meta["prompt_tokens"] = prompt_tokens
    answer = {"text": "out", "meta_info": meta}
    assert hook.on_result(ctx, "http://d0", None, answer) is True  # stripped: client did not ask
    return writer, answer


def test_prompt_rows_of_a_pd_decode_are_skipped() -> None:
    # 3 prompt tokens (zero-filled rows, as the emulator sends them), then output rows 2, 2, 1.
    writer, answer = _run({"text": "abc"}, [0, 0, 0, 2, 2, 1], prompt_tokens=3)
    assert "routed_experts" not in answer["meta_info"]
    (rec,) = writer.records
    assert rec.output_counts is not None
    assert rec.output_counts.tolist() == [[0, 1, 2]]
    assert rec.decode_worker == "http://d0" and rec.num_prompt_tokens == 3


def test_start_len_shortens_the_skip() -> None:
    # routed_experts_start_len = 2: rows start at position 2, so only 1 prompt row is present.
    writer, _ = _run({"text": "abc", "routed_experts_start_len": 2}, [0, 1, 1], prompt_tokens=3)
    (rec,) = writer.records
    assert rec.output_counts is not None and rec.output_counts.tolist() == [[0, 2, 0]]


def test_no_record_without_prompt_tokens_or_output_rows() -> None:
    writer, _ = _run({"text": "abc"}, [1, 2], prompt_tokens=None)  # valid rows unknown
    assert writer.records == []
    writer, _ = _run({"text": "abc"}, [0, 0], prompt_tokens=2)  # only prompt rows
    assert writer.records == []


def test_prefill_first_records_carry_the_prefills_prompt_counts() -> None:
    from gateway.eldr.calibration_hook import prefill_prompt_counts
    from zones.routed_experts import encode_counts

    writer = FakeWriter()
    hook = CalibrationHook(writer, CalibrationSampler(1.0, seed=0),  # type: ignore[arg-type]
                           FakeZones(FakeActive(table([[1, 0, 0], [0, 1, 0]], ["d0", "d1"]))))
    ctx = RequestContext("/generate", {"text": "abc"}, stream=False, return_logprob=False,
                         batch=None, started=time.perf_counter())
    assert hook.prepare(ctx) is not None
    prompt = np.array([[3, 0, 1]], np.int32)  # TINY: 1 layer x 3 experts
    prefill = {"meta_info": {"prompt_expert_counts": encode_counts(prompt)}}
    answer = {"text": "out", "meta_info": {"prompt_tokens": 0, "routed_experts":
                                           encode_routed_experts(np.array([[[2]]], np.int32))}}
    hook.on_result(ctx, "http://d0", None, answer, prefill)
    (rec,) = writer.records
    assert rec.prompt_counts is not None and rec.prompt_counts.tolist() == [[3, 0, 1]]
    assert rec.output_counts is not None and rec.output_counts.tolist() == [[0, 0, 1]]
    # OpenAI answers carry it under sglext; anything malformed is no counts, not an error.
    assert prefill_prompt_counts({"sglext": prefill["meta_info"]}, TINY) is not None
    assert prefill_prompt_counts({"meta_info": {"prompt_expert_counts": "!!"}}, TINY) is None
    assert prefill_prompt_counts(None, TINY) is None

"""Calibration sampling, request/response mutation and the non-blocking JSONL writer."""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from gateway.eldr.calibration_log import (
    CalibrationSampler,
    CalibrationWriter,
    client_asked_for_routed_experts,
    make_record,
    request_routed_experts,
    strip_routed_experts,
)
from gateway.eldr.metrics import EldrMetrics
from gateway.eldr.prompts import Prompt, routed_experts_of
from tests.eldr.helpers import TINY
from zones.calibration import CalibrationRecord, read_calibration


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def record(i: int = 0) -> CalibrationRecord:
    r = make_record(
        TINY, Prompt("generate", text=f"prompt {i}"), received_at=1000.0 + i,
        output_counts=np.array([[i, 1, 0]], np.int32), decode_worker="d0",
        signature_source="predictor",
    )
    assert r is not None
    return r


def test_sampler_rates_and_seed() -> None:
    assert all(CalibrationSampler(1.0).sample() for _ in range(100))
    assert not any(CalibrationSampler(0.0).sample() for _ in range(100))
    a = [CalibrationSampler(0.3, seed=7).sample() for _ in range(1)]
    s1, s2 = CalibrationSampler(0.3, seed=7), CalibrationSampler(0.3, seed=7)
    seq1 = [s1.sample() for _ in range(2000)]
    assert seq1 == [s2.sample() for _ in range(2000)] and a[0] == seq1[0]
    assert 0.25 < sum(seq1) / len(seq1) < 0.35  # binomial sd ~0.01 at n=2000
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="calibration_sample_rate"):
            CalibrationSampler(bad)


def test_request_mutation_leaves_original_alone() -> None:
    body = {"text": "x", "sampling_params": {"max_new_tokens": 4}}
    asked = request_routed_experts(body)
    assert asked["return_routed_experts"] is True and "return_routed_experts" not in body
    assert not client_asked_for_routed_experts(body) and client_asked_for_routed_experts(asked)
    own = {"text": "x", "return_routed_experts": True}
    assert request_routed_experts(own) is own


def test_strip_generate_batched_and_openai() -> None:
    gen = {"text": "a", "meta_info": {"id": "1", "routed_experts": "AAAA"}}
    assert routed_experts_of(gen) == "AAAA"
    assert strip_routed_experts(gen) and gen == {"text": "a", "meta_info": {"id": "1"}}
    batch = [copy.deepcopy({"meta_info": {"routed_experts": "A"}}) for _ in range(2)]
    assert strip_routed_experts(batch) and batch == [{"meta_info": {}}, {"meta_info": {}}]
    chat = {"choices": [], "sglext": {"routed_experts": "BBBB"}}
    assert routed_experts_of(chat) == "BBBB"
    assert strip_routed_experts(chat) and chat == {"choices": []}
    kept = {"sglext": {"routed_experts": "B", "cached_tokens_details": {"device": 3}}}
    strip_routed_experts(kept)
    assert kept == {"sglext": {"cached_tokens_details": {"device": 3}}}
    assert not strip_routed_experts({"text": "no experts"}) and not strip_routed_experts("x")
    assert routed_experts_of({"meta_info": {"routed_experts": None}}) is None


def test_make_record_validates() -> None:
    assert make_record(TINY, None, received_at=1.0) is None  # nothing a fit could use
    assert make_record(TINY, None, received_at=1.0, output_counts=np.zeros((2, 2), int)) is None
    r = make_record(TINY, Prompt("generate", input_ids=(1, 2)), received_at=1.0,
                    prompt_counts=np.array([[1, 0, 1]], np.int32), num_prompt_tokens=2)
    assert r is not None and r.input_ids == (1, 2)


def test_writer_appends_records_zones_can_read(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    path = tmp_path / "calib.jsonl"
    writer = CalibrationWriter(path, metrics=EldrMetrics(registry))
    writer.start()
    try:
        for i in range(50):
            assert writer.offer(record(i))
        wait_for(lambda: writer.written == 50)
    finally:
        writer.close()
    records = list(read_calibration(path))
    assert [r.text for r in records] == [f"prompt {i}" for i in range(50)]
    assert records[3].output_counts is not None and records[3].output_counts.tolist() == [[3, 1, 0]]
    assert registry.get_sample_value("eldr_calibration_records_total", {"result": "written"}) == 50


def test_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    writer = CalibrationWriter(tmp_path / "c.jsonl", max_queue=3)  # not started: nothing drains
    results = [writer.offer(record(i)) for i in range(5)]
    assert results == [True, True, True, False, False] and writer.dropped == 2
    writer.start()
    wait_for(lambda: writer.written == 3)
    writer.close()


def test_disk_errors_are_counted_and_writer_recovers(tmp_path: Path) -> None:
    missing_dir = tmp_path / "not-yet"
    writer = CalibrationWriter(missing_dir / "c.jsonl")
    writer.start()
    try:
        writer.offer(record(1))
        wait_for(lambda: writer.failed == 1)
        assert writer.last_error is not None and "not-yet" in writer.last_error
        os.mkdir(missing_dir)
        writer.offer(record(2))
        wait_for(lambda: writer.written == 1)
    finally:
        writer.close()
    assert [r.text for r in read_calibration(missing_dir / "c.jsonl")] == ["prompt 2"]


def test_close_drains_queue_and_stops_thread(tmp_path: Path) -> None:
    writer = CalibrationWriter(tmp_path / "c.jsonl")
    for i in range(10):
        writer.offer(record(i))
    writer.start()
    writer.close()
    assert writer.written == 10
    assert not any(t.name == "calibration-log" and t.is_alive() for t in threading.enumerate())


async def test_aclose_from_event_loop(tmp_path: Path) -> None:
    writer = CalibrationWriter(tmp_path / "c.jsonl")
    writer.start()
    writer.offer(record(0))
    await writer.aclose()
    assert writer.written == 1

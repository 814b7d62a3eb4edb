"""A zone table fitted for another model is refused (finding: it was accepted and turned every
decision into a fallback), and the table that serves keeps serving."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from gateway.config import Settings
from gateway.eldr.resolver import LocalityResolver, SignatureResolver
from gateway.eldr.runtime import ZoneRuntime
from gateway.errors import ConfigError
from gateway.resolver import RequestContext
from tests.eldr.helpers import TINY, table
from zones.geometry import GeometryError, ModelGeometry, parse_geometry
from zones.table import save_table

CENTROIDS = [[1, 0, 0], [0, 1, 0]]


def _tiny_spec() -> str:
    return f"{TINY.num_layers}x{TINY.num_experts}x{TINY.top_k}"


def test_a_table_of_another_geometry_is_rejected_with_both_shapes_named(tmp_path: Path) -> None:
    path = tmp_path / "zones.json"
    save_table(table(CENTROIDS, ["d0", "d1"]), path)
    other = ModelGeometry("Qwen3-30B-A3B", num_layers=48, num_experts=128, top_k=8)
    rt = ZoneRuntime(path, geometry=other)
    result = asyncio.run(rt.reload())
    assert result.status == "failed" and rt.active is None
    assert result.error is not None
    assert "48 layers x 128 experts, top_k 8" in result.error
    assert f"{TINY.num_layers} layers x {TINY.num_experts} experts" in result.error
    assert "--model-geometry" in result.error


def test_a_mismatched_reload_keeps_the_serving_table(tmp_path: Path) -> None:
    path = tmp_path / "zones.json"
    save_table(table(CENTROIDS, ["d0", "d1"]), path)
    rt = ZoneRuntime(path, geometry=parse_geometry(_tiny_spec()))
    assert asyncio.run(rt.reload()).status == "loaded"
    serving = rt.active
    rt.expected_geometry = ModelGeometry("m", num_layers=TINY.num_layers,
                                         num_experts=TINY.num_experts, top_k=TINY.top_k + 1)
    save_table(table([[0.5, 0.5, 0], [0, 0, 1]], ["d0", "d1"]), path)  # a new checksum
    assert asyncio.run(rt.reload()).status == "failed"
    assert rt.active is serving


def test_names_and_shapes_parse_and_bad_specs_name_the_field() -> None:
    assert parse_geometry("deepseek-v2-lite").num_experts == 64
    assert (parse_geometry("26x64x6").num_layers, parse_geometry("26X64X6").top_k) == (26, 6)
    with pytest.raises(GeometryError, match="LAYERSxEXPERTSxTOP_K"):
        parse_geometry("llama")
    with pytest.raises(GeometryError, match="top_k"):
        parse_geometry("2x4x8")
    with pytest.raises(ConfigError, match="model_geometry"):
        Settings(model_geometry="26x64").validate()
    with pytest.raises(ConfigError, match="calibration_log needs zones or model_geometry"):
        Settings(calibration_log="c.jsonl").validate()
    Settings(calibration_log="c.jsonl", model_geometry="26x64x6").validate()


def test_a_prefill_reporting_another_geometry_is_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "zones.json"
    save_table(table(CENTROIDS, ["d0", "d1"]), path)
    rt = ZoneRuntime(path)
    asyncio.run(rt.reload())
    resolver = LocalityResolver(SignatureResolver(rt))
    answer = {"meta_info": {"prompt_expert_counts": "AAAA",
                            "expert_geometry": {"num_layers": 48, "num_experts": 128,
                                                "top_k": 8}}}
    with caplog.at_level(logging.ERROR, logger="gateway.eldr.resolver"):
        for _ in range(3):
            ctx = RequestContext("/generate", {"text": "x"}, stream=False, return_logprob=False,
                                 batch=None, started=0.0)
            assert resolver.from_prefill(ctx, answer).signature is None
    errors = [r for r in caplog.records if "48 layers x 128 experts" in r.getMessage()]
    assert len(errors) == 1

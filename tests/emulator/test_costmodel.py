"""Derived properties of the H100 MoE cost model (each traced to a cited constant)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from loadtest.emulator.costmodel import (
    MODEL_SPECS,
    PAPER_SLOWDOWN,
    CostModel,
    model_spec,
)
from zones.geometry import KNOWN_GEOMETRIES, ModelGeometry

GEOMETRIES = list(KNOWN_GEOMETRIES.values())


def _full(model: CostModel, value: float) -> np.ndarray:
    return np.full(model.num_moe_layers, value, dtype=np.float64)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: g.name)
def test_one_moe_layer_is_4_7x_slower_at_128_than_16_experts_at_batch_64(geometry):
    model = CostModel.for_geometry(geometry)
    ratio = model.moe_layer_seconds(64, 128) / model.moe_layer_seconds(64, 16)
    assert ratio == pytest.approx(PAPER_SLOWDOWN, rel=1e-9)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: g.name)
def test_step_time_strictly_increases_with_distinct_experts(geometry):
    model = CostModel.for_geometry(geometry)
    times = [model.decode_step_seconds(32, _full(model, d), 32 * 512)
             for d in range(geometry.top_k, geometry.num_experts + 1)]
    assert all(b > a for a, b in itertools.pairwise(times))


def test_batch_size_matters_little_when_experts_are_fixed():
    # The paper: at a given expert count, batch size moves one MoE layer's time only a little.
    model = CostModel.for_geometry(KNOWN_GEOMETRIES["Qwen3-30B-A3B"])
    small, large = model.moe_layer_seconds(16, 128), model.moe_layer_seconds(64, 128)
    assert large > small
    assert large / small < 1.10


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: g.name)
def test_time_scale_multiplies_every_duration(geometry):
    base = CostModel.for_geometry(geometry)
    slow = CostModel.for_geometry(geometry, time_scale=7.5)
    distinct = _full(base, geometry.top_k * 3)
    assert slow.decode_step_seconds(24, distinct, 9000) == pytest.approx(
        7.5 * base.decode_step_seconds(24, distinct, 9000), rel=1e-12)
    assert slow.prefill_seconds(777) == pytest.approx(7.5 * base.prefill_seconds(777), rel=1e-12)
    assert slow.time_scale == 7.5


def test_kv_reads_grow_step_time_and_sliding_window_caps_them():
    qwen = CostModel.for_geometry(KNOWN_GEOMETRIES["Qwen3-30B-A3B"])
    d = _full(qwen, 40)
    assert qwen.decode_step_seconds(8, d, 80_000) > qwen.decode_step_seconds(8, d, 8_000)
    oss = CostModel.for_geometry(KNOWN_GEOMETRIES["GPT-OSS-120B"])
    # Half the GPT-OSS layers attend over at most 128 tokens per request.
    full_only = 8 * 10_000 * 0.5 * oss.kv_seconds_per_token
    windowed = 8 * 128 * 0.5 * oss.kv_seconds_per_token
    assert oss.kv_read_seconds(8, 80_000) == pytest.approx(full_only + windowed)


def test_prefill_is_proportional_to_prompt_tokens():
    model = CostModel.for_geometry(KNOWN_GEOMETRIES["Qwen3-30B-A3B"])
    assert model.prefill_seconds(0) == 0.0
    assert model.prefill_seconds(2048) == pytest.approx(2 * model.prefill_seconds(1024))


def test_published_parameter_counts_are_reproduced_from_the_config_numbers():
    # Published totals: Qwen3-30B-A3B 30.5B total / 3.3B active; DeepSeek-V2-Lite 15.7B / 2.4B;
    # gpt-oss-120b 117B total / 5.1B active (model cards). Reconstructing them from the config
    # numbers checks the byte counts the cost model streams.
    def total(name: str, embedding: float) -> float:
        s = MODEL_SPECS[name]
        experts = s.num_moe_layers * s.num_experts * 3 * s.hidden_size * s.expert_intermediate
        return s.dense_params_read_per_step + experts + embedding

    qwen = MODEL_SPECS["Qwen3-30B-A3B"]
    assert total("Qwen3-30B-A3B", 151936 * 2048) / 1e9 == pytest.approx(30.5, rel=0.03)
    assert qwen.active_params_per_token / 1e9 == pytest.approx(3.3, rel=0.1)
    assert qwen.expert_bytes == 3 * 2048 * 768 * 2
    assert qwen.kv_bytes_per_token == 48 * 2 * 4 * 128 * 2
    ds = MODEL_SPECS["DeepSeek-V2-Lite"]
    assert total("DeepSeek-V2-Lite", 102400 * 2048) / 1e9 == pytest.approx(15.7, rel=0.03)
    assert ds.active_params_per_token / 1e9 == pytest.approx(2.4, rel=0.1)
    oss = MODEL_SPECS["GPT-OSS-120B"]
    assert total("GPT-OSS-120B", 201088 * 2880) / 1e9 == pytest.approx(117, rel=0.03)
    assert oss.active_params_per_token / 1e9 == pytest.approx(5.1, rel=0.1)
    assert oss.expert_bytes == pytest.approx(3 * 2880 * 2880 * 4.25 / 8)


def test_modelled_step_times_are_in_a_realistic_range():
    # Sanity, not calibration: a bf16 Qwen3-30B-A3B decode step on one H100 at batch 64 with
    # 1k-token contexts lies between the pure weight-streaming floor and ~100 ms.
    model = CostModel.for_geometry(KNOWN_GEOMETRIES["Qwen3-30B-A3B"])
    step = model.decode_step_seconds(64, _full(model, 100), 64 * 1024)
    floor = (48 * 100 * model.expert_seconds) + model.dense_seconds
    assert floor < step < 0.1


def test_instant_and_fixed_models():
    g = KNOWN_GEOMETRIES["DeepSeek-V2-Lite"]
    instant = CostModel.instant()
    assert instant.decode_step_seconds(64, np.full(g.num_layers, 64), 10**6) == 0.0
    assert instant.prefill_seconds(10**6) == 0.0
    fixed = CostModel.fixed(0.01, g)
    for d in (1, 30, 64):
        assert fixed.decode_step_seconds(3, np.full(g.num_layers, d), 99) == pytest.approx(0.01)
    assert fixed.decode_step_seconds(0, np.full(g.num_layers, 5), 0) == 0.0


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, "2"])
def test_bad_time_scale_is_rejected_naming_the_field(bad):
    with pytest.raises(ValueError, match="time_scale"):
        CostModel.for_geometry(KNOWN_GEOMETRIES["Qwen3-30B-A3B"], time_scale=bad)


def test_bad_inputs_name_the_field():
    model = CostModel.for_geometry(KNOWN_GEOMETRIES["Qwen3-30B-A3B"])
    with pytest.raises(ValueError, match="distinct_experts_per_layer"):
        model.decode_step_seconds(4, np.ones(3), 10)
    with pytest.raises(ValueError, match="batch_size"):
        model.decode_step_seconds(-1, _full(model, 8), 10)
    with pytest.raises(ValueError, match="kv_tokens"):
        model.decode_step_seconds(1, _full(model, 8), -5)
    with pytest.raises(ValueError, match="num_tokens"):
        model.prefill_seconds(-1)
    with pytest.raises(ValueError, match=r"geometry\.name"):
        model_spec(ModelGeometry("Mixtral", 32, 8, 2))
    with pytest.raises(ValueError, match="published config"):
        model_spec(ModelGeometry("Qwen3-30B-A3B", 48, 64, 8))


def test_model_tracks_the_repo_h100_measurement_of_one_moe_layer():
    # benchmarks/gpu/results: expert GEMMs of one Qwen3-30B-A3B layer measured on an H100 under
    # CUDA graphs. The model's layer adds router/top-k work (inside f), so it sits a little
    # above the measurement but must follow its slope: 0-20 us above at every expert count.
    import json
    from pathlib import Path

    path = (Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "results"
            / "moe_layer_curve_h100_cudagraph.json")
    if not path.is_file():
        pytest.skip(f"no GPU measurement at {path}")
    curve = json.loads(path.read_text())["curves"]["64"]
    model = CostModel.for_geometry(KNOWN_GEOMETRIES["Qwen3-30B-A3B"])
    for experts, measured_us in curve.items():
        modelled_us = model.moe_layer_seconds(64, int(experts)) * 1e6
        assert 0 <= modelled_us - measured_us <= 20, (experts, measured_us, modelled_us)

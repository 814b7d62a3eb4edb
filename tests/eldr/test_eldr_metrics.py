"""ELDR metrics facade on a caller-owned registry."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gateway.eldr.metrics import EldrMetrics
from gateway.routing import Selection
from tests.eldr.helpers import view


def test_decision_records_band_statistics_only_for_band_decisions() -> None:
    reg = CollectorRegistry()
    m = EldrMetrics(reg)
    w = view("w0")
    m.record_decision("eldr", "cache", Selection(w, zone=3, band_size=2, rank=2, similarity=0.83),
                      seconds=32e-6)
    m.record_decision("eldr", "none", Selection(w), seconds=4e-6)
    m.record_decision("eldr", "predictor", Selection(w, zone=None, band_size=3))  # zone-less
    assert reg.get_sample_value("eldr_decisions_total", {"policy": "eldr", "source": "cache"}) == 1
    assert reg.get_sample_value("eldr_decisions_total", {"policy": "eldr", "source": "none"}) == 1
    assert reg.get_sample_value("eldr_band_size_count") == 2
    assert reg.get_sample_value("eldr_band_size_sum") == 5
    assert reg.get_sample_value("eldr_chosen_zone_rank_sum") == 2
    assert reg.get_sample_value("eldr_signature_similarity_sum") == pytest.approx(0.83)
    assert reg.get_sample_value("eldr_zoneless_choices_total") == 1
    # Microsecond buckets: 32 us lands in the 50 us bucket, not only in +Inf.
    assert reg.get_sample_value(
        "eldr_decision_seconds_bucket", {"policy": "eldr", "le": "5e-05"}
    ) == 2
    assert reg.get_sample_value(
        "eldr_decision_seconds_bucket", {"policy": "eldr", "le": "3e-05"}
    ) == 1


def test_active_table_info_shows_exactly_one_table() -> None:
    reg = CollectorRegistry()
    m = EldrMetrics(reg)
    m.set_active_table("v1", "sha256:aa", zones=4, unmapped=1, loaded_at=100.0)
    m.set_active_table("v2", "sha256:bb", zones=8, unmapped=0, loaded_at=200.0)
    info = "eldr_zone_table_info"
    assert reg.get_sample_value(info, {"version": "v1", "checksum": "sha256:aa"}) is None
    assert reg.get_sample_value(info, {"version": "v2", "checksum": "sha256:bb"}) == 1
    assert reg.get_sample_value("eldr_zone_table_zones") == 8
    assert reg.get_sample_value("eldr_zone_table_loaded_timestamp_seconds") == 200.0
    m.set_active_table(None, None, 0, 0, None)
    assert "eldr_zone_table_info{" not in generate_latest(reg).decode()


def test_counters_and_gauges() -> None:
    reg = CollectorRegistry()
    m = EldrMetrics(reg)
    m.record_reload("loaded")
    m.record_reload("failed")
    m.record_cache_lookup("partial")
    m.set_cache_size(3, 4096)
    m.record_calibration("written", 5)
    m.record_calibration("dropped")
    m.record_calibration_sampled()
    m.record_fallback("no_signature")
    m.record_signature_source("prefill")
    get = reg.get_sample_value
    assert get("eldr_zone_reloads_total", {"result": "failed"}) == 1
    assert get("eldr_signature_cache_lookups_total", {"result": "partial"}) == 1
    assert (get("eldr_signature_cache_entries"), get("eldr_signature_cache_bytes")) == (3, 4096)
    assert get("eldr_calibration_records_total", {"result": "written"}) == 5
    assert get("eldr_calibration_records_total", {"result": "dropped"}) == 1
    assert get("eldr_calibration_sampled_total") == 1
    assert get("eldr_fallback_decisions_total", {"reason": "no_signature"}) == 1
    assert get("eldr_signature_resolutions_total", {"source": "prefill"}) == 1


def test_registries_are_independent_and_names_prefixed() -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    EldrMetrics(a).record_reload("loaded")
    EldrMetrics(b)
    assert b.get_sample_value("eldr_zone_reloads_total", {"result": "loaded"}) is None
    names = {metric.name for metric in a.collect()}
    assert names and all(n.startswith("eldr_") for n in names)

"""Prometheus metrics of expert-locality routing, on a registry the app passes in (no globals).

Names carry the `eldr_` prefix; counters end in `_total`, durations in `_seconds`. The decision
latency histogram uses microsecond-scale buckets because a band decision costs tens of
microseconds (benchmarks/eldr_decision.py); LLM-latency buckets would put every sample in the
first bucket.
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# 1 us .. 5 ms: the decision target is p99 < 100 us; the tail buckets catch GC pauses.
DECISION_BUCKETS = (
    1e-6, 2.5e-6, 5e-6, 1e-5, 2e-5, 3e-5, 5e-5, 7.5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3,
)
BAND_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
RANK_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128)
SIMILARITY_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class DecisionLike(Protocol):
    """The band fields of `gateway.routing.Selection` (structural, to keep this module
    importable without the policy layer)."""

    @property
    def zone(self) -> int | None: ...
    @property
    def band_size(self) -> int | None: ...
    @property
    def rank(self) -> int | None: ...
    @property
    def similarity(self) -> float | None: ...
    @property
    def load_skipped(self) -> int: ...


class EldrMetrics:
    """Facade over the ELDR metrics; every recorder is cheap and never raises on valid input."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "eldr_decisions_total",
            "Decode worker decisions by policy and signature source",
            ("policy", "source"),
            registry=registry,
        )
        self.decision_seconds = Histogram(
            "eldr_decision_seconds",
            "Time to choose a decode worker (policy select only)",
            ("policy",),
            buckets=DECISION_BUCKETS,
            registry=registry,
        )
        self.band_size = Histogram(
            "eldr_band_size",
            "Distinct workers eligible in the locality band (after min-candidates)",
            buckets=BAND_SIZE_BUCKETS,
            registry=registry,
        )
        self.zone_rank = Histogram(
            "eldr_chosen_zone_rank",
            "Similarity rank of the chosen zone among available zones (1 = most similar)",
            buckets=RANK_BUCKETS,
            registry=registry,
        )
        self.similarity = Histogram(
            "eldr_signature_similarity",
            "Cosine similarity between the request signature and the chosen zone centroid",
            buckets=SIMILARITY_BUCKETS,
            registry=registry,
        )
        self.zoneless = Counter(
            "eldr_zoneless_choices_total",
            "Decisions that went to an available worker serving no zone (overflow)",
            registry=registry,
        )
        self.load_bound_skips = Counter(
            "eldr_load_bound_skips_total",
            "Decisions where the locality load bound excluded at least one zone ranked above "
            "the chosen one (more similar, or as similar with a lower index)",
            registry=registry,
        )
        self.fallbacks = Counter(
            "eldr_fallback_decisions_total",
            "ELDR decisions that fell back to the load-only fallback policy, by reason",
            ("reason",),
            registry=registry,
        )
        self.signature_sources = Counter(
            "eldr_signature_resolutions_total",
            "Signatures resolved for routing, by source",
            ("source",),
            registry=registry,
        )
        self.cache_lookups = Counter(
            "eldr_signature_cache_lookups_total",
            "Signature cache lookups by result (hit = whole prompt covered exactly)",
            ("result",),
            registry=registry,
        )
        self.cache_entries = Gauge(
            "eldr_signature_cache_entries", "Entries held by the signature cache", registry=registry
        )
        self.cache_bytes = Gauge(
            "eldr_signature_cache_bytes", "Bytes of counts held by the signature cache",
            registry=registry,
        )
        self.reloads = Counter(
            "eldr_zone_reloads_total",
            "Zone table reload attempts by result (loaded, unchanged, failed)",
            ("result",),
            registry=registry,
        )
        self.table_info = Gauge(
            "eldr_zone_table_info",
            "The active zone table (1 for the active version/checksum, absent when none)",
            ("version", "checksum"),
            registry=registry,
        )
        self.table_zones = Gauge(
            "eldr_zone_table_zones", "Zones in the active table (0 when none)", registry=registry
        )
        self.zones_unmapped = Gauge(
            "eldr_zones_unmapped",
            "Zones of the active table with no registered worker after re-mapping",
            registry=registry,
        )
        self.table_loaded = Gauge(
            "eldr_zone_table_loaded_timestamp_seconds",
            "Unix time the active zone table was loaded",
            registry=registry,
        )
        self.calibration_records = Counter(
            "eldr_calibration_records_total",
            "Calibration log records by result (written; dropped: queue full; failed: disk error)",
            ("result",),
            registry=registry,
        )
        self.calibration_sampled = Counter(
            "eldr_calibration_sampled_total",
            "Requests sampled for calibration (routed experts requested from workers)",
            registry=registry,
        )

    def record_decision(
        self, policy: str, source: str, selection: DecisionLike, seconds: float | None = None
    ) -> None:
        """One decode decision. Band statistics are recorded only when a band was used."""
        self.decisions.labels(policy, source).inc()
        if seconds is not None:
            self.decision_seconds.labels(policy).observe(seconds)
        if selection.band_size is not None:
            self.band_size.observe(selection.band_size)
            if selection.zone is None:
                self.zoneless.inc()
            if selection.load_skipped:
                self.load_bound_skips.inc()
        if selection.rank is not None:
            self.zone_rank.observe(selection.rank)
        if selection.similarity is not None:
            self.similarity.observe(selection.similarity)

    def record_fallback(self, reason: str) -> None:
        self.fallbacks.labels(reason).inc()

    def record_signature_source(self, source: str) -> None:
        self.signature_sources.labels(source).inc()

    def record_cache_lookup(self, result: str) -> None:
        self.cache_lookups.labels(result).inc()

    def set_cache_size(self, entries: int, nbytes: int) -> None:
        self.cache_entries.set(entries)
        self.cache_bytes.set(nbytes)

    def record_reload(self, result: str) -> None:
        self.reloads.labels(result).inc()

    def set_active_table(
        self, version: str | None, checksum: str | None, zones: int, unmapped: int,
        loaded_at: float | None,
    ) -> None:
        """Publish the active table; the previous table's info series is removed, not zeroed,
        so a dashboard query for `eldr_zone_table_info == 1` shows exactly one table."""
        self.table_info.clear()
        if version is not None and checksum is not None:
            self.table_info.labels(version, checksum).set(1)
        self.table_zones.set(zones)
        self.zones_unmapped.set(unmapped)
        if loaded_at is not None:
            self.table_loaded.set(loaded_at)

    def record_calibration(self, result: str, n: int = 1) -> None:
        self.calibration_records.labels(result).inc(n)

    def record_calibration_sampled(self) -> None:
        self.calibration_sampled.inc()

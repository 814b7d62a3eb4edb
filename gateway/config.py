"""The gateway's one typed configuration: the single source of every default.

Names and defaults mirror `python -m sglang_router.launch_router --help` (sglang-router 0.3.2)
wherever the option exists there, so an operator can swap the Rust router for this gateway without
changing the command line. `cli.py` derives its flags and `GATEWAY_*` environment variables from
the fields below (field metadata carries the help text); `Settings.validate()` fails fast naming the
offending key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from gateway.eldr.signature_cache import (
    DEFAULT_BLOCK_BYTES,
    DEFAULT_BLOCK_TOKENS,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ENTRIES,
)
from gateway.errors import ConfigError
from gateway.urls import check_url
from zones.geometry import GeometryError, ModelGeometry, parse_geometry

LOAD_POLICIES = ("random", "round_robin", "least_load", "power_of_two")
# Policies that route on the request's prefix or key (gateway/policies), as the Rust routers.
REQUEST_POLICIES = ("cache_aware", "prefix_hash", "consistent_hashing", "manual")
POLICIES = (*LOAD_POLICIES, *REQUEST_POLICIES, "passthrough", "eldr")
PD_FLOWS = ("dual", "prefill-first")
ELDR_DECISIONS = ("band", "step-cost")
LOG_LEVELS = ("debug", "info", "warn", "error")
LOAD_VIEWS = ("local", "reported")
LEAST_LOAD_METRICS = ("requests", "expected_wait")


def _f(default: Any, help: str, **meta: Any) -> Any:
    """A scalar field with its help text (lists use `field(default_factory=list)` directly)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass(slots=True)
class PrefillSpec:
    url: str
    bootstrap_port: int | None = None


@dataclass(slots=True)
class Settings:
    # --- server ---
    host: str = _f("0.0.0.0", "address to bind (IPv4 or IPv6)")
    port: int = _f(30000, "port to bind")
    processes: int = _f(
        1, "server processes sharing the port via SO_REUSEPORT (ours; per-process state)"
    )
    # --- workers ---
    pd_disaggregation: bool = _f(False, "enable prefill/decode disaggregated mode")
    prefill: list[PrefillSpec] = field(default_factory=list, metadata={
        "help": "prefill worker: URL [BOOTSTRAP_PORT|none] (repeatable)", "kind": "prefill"})
    decode: list[str] = field(default_factory=list, metadata={
        "help": "decode worker URL (repeatable)", "kind": "append"})
    worker_urls: list[str] = field(default_factory=list, metadata={
        "help": "regular (non-PD) worker URLs", "kind": "nargs"})
    api_key: str | None = _f(None, "bearer token sent to workers")
    # --- Kubernetes service discovery (the Rust routers' flags and defaults; gateway/discovery.py)
    service_discovery: bool = _f(
        False, "discover workers from Kubernetes pods by label selector (list + watch)")
    selector: list[str] = field(default_factory=list, metadata={
        "help": "service discovery: labels of regular worker pods (key=value ...)",
        "kind": "nargs"})
    prefill_selector: list[str] = field(default_factory=list, metadata={
        "help": "service discovery: labels of prefill pods, PD mode (key=value ...)",
        "kind": "nargs"})
    decode_selector: list[str] = field(default_factory=list, metadata={
        "help": "service discovery: labels of decode pods, PD mode (key=value ...)",
        "kind": "nargs"})
    service_discovery_port: int = _f(
        80, "service discovery: worker port of discovered pods (a pod's smg.ai/worker-ports "
        "annotation overrides it)")
    service_discovery_namespace: str | None = _f(
        None, "service discovery: namespace watched (unset: all namespaces, which needs "
        "cluster-wide list/watch on pods)")
    bootstrap_port_annotation: str = _f(
        "sglang.ai/bootstrap-port", "service discovery: pod annotation holding a prefill's "
        "bootstrap port (ours: the Rust routers fix this name)")
    service_discovery_resync_secs: float = _f(
        60.0, "service discovery: seconds between full re-lists of the pods, reconciling "
        "anything a watch missed (ours; smg reconciles every 60 s)")
    # --- routing ---
    policy: str = _f("round_robin", "routing policy (prefill and decode unless overridden)",
                     choices=POLICIES)
    prefill_policy: str | None = _f(None, "policy for prefill workers", choices=POLICIES)
    decode_policy: str | None = _f(None, "policy for decode workers", choices=POLICIES)
    pd_flow: str = _f("dual", "PD flow: dual (stock SGLang) or prefill-first", choices=PD_FLOWS)
    dp_aware: bool = _f(
        False, "route to DP attention ranks: each worker becomes one worker per rank (count "
        "read from /server_info) and requests carry routed_dp_rank (smg --dp-aware)")
    # --- prefix and key policies (names, defaults and meaning as smg 1.13) ---
    cache_threshold: float = _f(
        0.3, "cache_aware: matched-prefix share (0-1) above which a request goes to the worker "
        "holding the prefix", aliases=("--cache-match-threshold",))
    balance_abs_threshold: int = _f(
        64, "cache_aware: cap on the spill margin: a cache hit's worker is skipped for the "
        "least loaded when above mean load x the relative threshold and mean + the margin",
        aliases=("--spill-abs-threshold",))
    balance_rel_threshold: float = _f(
        1.5, "cache_aware: spill when the matched worker's load exceeds mean load x this (and "
        "the margin)",
        aliases=("--spill-rel-threshold",))
    eviction_interval_secs: int = _f(60, "cache_aware: seconds between prefix tree evictions")
    max_tree_size: int = _f(
        67108864, "cache_aware: characters the prefix tree keeps (all workers) after an eviction")
    routing_key_headers: list[str] = field(default_factory=lambda: ["x-smg-routing-key"],
                                           metadata={
        "help": "headers checked, in order, for a request's routing key (manual policy)",
        "kind": "nargs"})
    routing_key_override: bool = _f(
        False, "sticky sessions on any policy: requests with the same routing key go to the "
        "same worker", aliases=("--sticky-sessions",))
    max_idle_secs: int = _f(14400, "manual: seconds an unused routing key stays pinned",
                            aliases=("--sticky-key-idle-secs",))
    assignment_mode: str = _f("random", "manual: how a new routing key gets its worker",
                              choices=("random", "min_load"))
    prefix_token_count: int = _f(
        256, "prefix_hash: prefix tokens hashed (text requests: 4 characters per token)")
    prefix_hash_load_factor: float = _f(
        1.25, "prefix_hash: load (x the average) above which the prefix's worker is overloaded")
    prefix_hash_balance_abs_threshold: int = _f(
        10, "prefix_hash: load over the average a worker must also exceed to be overloaded")
    # --- expert locality (gateway/eldr; active with --zones) ---
    zones: str | None = _f(None, "zone table path (enables the eldr policy)")
    eldr_tau: float | None = _f(
        None, "locality band width in [0, 2] (default: the zone table's tau; 1 = least-load)")
    eldr_min_candidates: int | None = _f(
        None, "fewest distinct workers in a band (default: the zone table's min_candidates)")
    eldr_load_bound: int | None = _f(
        None, "load bound (>= 0): zones whose worker has more than this many in-flight requests "
        "over the least-loaded worker leave the band (default: the zone table's load_bound, "
        "which zones fit sets to 4; -1 or unset in both: off, the paper's rule; 0: "
        "least-loaded workers only) (ours)")
    eldr_fallback_policy: str = _f(
        "least_load", "load-only policy eldr uses when a request has no signature or table",
        choices=LOAD_POLICIES)
    eldr_decision: str = _f(
        "band", "how eldr chooses a decode worker: band (the paper's locality band) or "
        "step-cost (least decode step time added per output token, from the experts of the "
        "requests in flight on each worker) (ours)", choices=ELDR_DECISIONS)
    # Step-cost model constants (docs/eldr.md, "Step-cost decision", derives them). Defaults:
    # DeepSeek-V2-Lite (hidden 2048, moe_intermediate 1408, bf16) on an H100 SXM5 at 2.71 TB/s
    # achievable HBM bandwidth (3.35 TB/s datasheet x 0.81 measured). Only expert : token
    # decides; the fixed time is the same for every candidate.
    eldr_step_fixed_ms: float = _f(
        3.0, "step-cost: fixed time of a decode step in ms (dense weights, per-layer overheads)")
    eldr_step_expert_us: float = _f(
        6.4, "step-cost: time to stream one expert's weights in one MoE layer, in us "
        "(3 x hidden x moe_intermediate x 2 B / HBM bandwidth)")
    eldr_step_token_us: float = _f(
        25.0, "step-cost: time each request in the batch adds to a decode step, in us (its KV "
        "cache reads and per-token compute)")
    signature_cache: bool = _f(
        True, "learn signatures from results and reuse them for continued prompts")
    signature_predictor: bool = _f(
        True, "predict signatures from the prompt with the zone table's predictor")
    signature_cache_max_entries: int = _f(DEFAULT_MAX_ENTRIES, "signature cache entry limit")
    signature_cache_max_bytes: int = _f(DEFAULT_MAX_BYTES, "signature cache memory limit (bytes)")
    signature_cache_block_tokens: int = _f(
        DEFAULT_BLOCK_TOKENS, "signature cache block length for token-id prompts (tokens)")
    signature_cache_block_bytes: int = _f(
        DEFAULT_BLOCK_BYTES, "signature cache block length for text prompts (UTF-8 bytes)")
    model_geometry: str | None = _f(
        None, "served model's routing shape: a known model name or LAYERSxEXPERTSxTOP_K; zone "
        "tables of another shape are rejected, and --calibration-log records without --zones "
        "(ours)")
    calibration_log: str | None = _f(None, "append decode routing results to this JSONL file")
    calibration_sample_rate: float = _f(1.0, "fraction of requests written to the calibration log")
    # --- TLS (flag names as the Rust routers) ---
    client_cert_path: str | None = _f(
        None, "client certificate (PEM) presented to https workers (mTLS); with "
        "--client-key-path")
    client_key_path: str | None = _f(None, "unencrypted PEM private key of --client-cert-path")
    ca_cert_paths: list[str] = field(default_factory=list, metadata={
        "help": "CA certificates (PEM) trusted for worker TLS, in addition to the system store",
        # The sglang-router README spells it --ca-cert-path (argparse's prefix match took it).
        "kind": "nargs", "aliases": ("--ca-cert-path",)})
    tls_cert_path: str | None = _f(
        None, "serve the gateway over HTTPS with this certificate (PEM); with --tls-key-path")
    tls_key_path: str | None = _f(None, "unencrypted PEM private key of --tls-cert-path")
    # --- request handling ---
    request_timeout_secs: float = _f(1800.0, "upstream request timeout (seconds)")
    client_idle_timeout_secs: float = _f(
        75.0, "seconds a client connection may sit idle, or send an unfinished request head, "
        "before it is closed", aliases=("--idle-connection-timeout-secs",))
    max_payload_size: int = _f(536870912, "maximum request body in bytes")
    max_response_size: int = _f(
        268435456, "maximum worker answer the gateway buffers (non-streaming), in bytes (ours)")
    max_concurrent_requests: int = _f(-1, "concurrent request limit (-1 disables)")
    queue_size: int = _f(100, "requests waiting for a slot when the limit is reached (0: 429 now)")
    queue_timeout_secs: float = _f(60.0, "maximum seconds a request waits in the queue")
    rate_limit_tokens_per_second: float | None = _f(
        None, "sustained admissions per second, bursting up to max_concurrent_requests "
        "(as smg 1.13; unset: no rate limit)")
    cors_allowed_origins: list[str] = field(default_factory=list, metadata={
        "help": "origins browsers may call the gateway from ('*' alone: any)", "kind": "nargs"})
    request_id_headers: list[str] = field(default_factory=list, metadata={
        "help": "headers that carry a request id", "kind": "nargs"})
    shutdown_grace_period_secs: float = _f(180.0, "grace period for in-flight requests on stop")
    # --- retries (defaults from sgl-router RetryConfig) ---
    retry_max_retries: int = _f(5, "maximum attempts per request (1 = no retry)")
    retry_initial_backoff_ms: int = _f(50, "first retry delay (ms)")
    retry_max_backoff_ms: int = _f(30000, "maximum retry delay (ms)")
    retry_backoff_multiplier: float = _f(1.5, "exponential backoff multiplier")
    retry_jitter_factor: float = _f(0.2, "relative jitter added to each delay (0..1)")
    disable_retries: bool = _f(False, "disable retries (same as --retry-max-retries 1)")
    # --- circuit breaker (defaults from sgl-router CircuitBreakerConfig) ---
    cb_failure_threshold: int = _f(10, "failures within the window that open a circuit")
    cb_success_threshold: int = _f(3, "half-open successes that close a circuit")
    cb_timeout_duration_secs: float = _f(60.0, "seconds an open circuit waits before half-open")
    cb_window_duration_secs: float = _f(120.0, "sliding window for counting failures (seconds)")
    disable_circuit_breaker: bool = _f(False, "disable circuit breakers")
    # --- health checks (defaults from sgl-router HealthConfig) ---
    health_failure_threshold: int = _f(3, "consecutive failures that mark a worker unhealthy")
    health_success_threshold: int = _f(2, "consecutive successes that mark it healthy again")
    health_check_timeout_secs: float = _f(5.0, "health check request timeout")
    health_check_interval_secs: float = _f(60.0, "seconds between health checks")
    health_check_endpoint: str = _f("/health", "worker health check path")
    disable_health_check: bool = _f(
        False, "disable health checks (workers are then in rotation from the start)")
    worker_startup_timeout_secs: float = _f(
        1800.0, "seconds a new worker may take to pass its first health check")
    worker_startup_check_interval: float = _f(
        30.0, "seconds between health probes of a new worker until it passes")
    # --- least_load's metric (smg 1.13's flags and defaults, gateway/policies/expected_wait.py)
    least_load_metric: str = _f(
        "requests", "what least_load compares: requests (in-flight requests, lowest index on "
        "ties) or expected_wait (smg 1.13's least_load: reported queue work plus work sent since "
        "the report, over throughput, plus a KV-pressure barrier) (ours)",
        choices=LEAST_LOAD_METRICS)
    least_load_kv_pressure_weight: float = _f(
        0.15, "expected_wait: seconds weight of the KV-pressure barrier k / (1 - k)")
    least_load_default_throughput: float = _f(
        2000.0, "expected_wait: tokens/s assumed for a worker that reports no gen_throughput")
    least_load_mean_prefill_tokens: int = _f(
        1024, "expected_wait: tokens counted per queued or dispatched request when no count is "
        "known")
    least_load_max_waiting_requests: int = _f(
        0, "expected_wait: skip workers whose reported waiting requests plus requests sent "
        "since reach this (0: off)")
    # --- load polling (ours: the Rust router polls loads only for power_of_two) ---
    load_poll_interval_secs: float = _f(0.25, "seconds between /v1/loads polls (0 disables)",
                                        aliases=("--load-monitor-interval",))
    load_stale_secs: float = _f(5.0, "worker-reported load older than this is ignored")
    load_view: str = _f(
        "local", "the request load policies compare: local (this process's in-flight "
        "requests) or reported (each worker's reported running + waiting requests plus this "
        "process's change since; use it with several gateway replicas, with a poll interval "
        "well under a second) (ours)", choices=LOAD_VIEWS)
    # --- observability / admin ---
    prometheus_host: str = _f("0.0.0.0", "address for the Prometheus metrics server")
    prometheus_port: int = _f(29000, "port for the Prometheus metrics server (0: disabled)")
    log_level: str = _f("info", "log level", choices=LOG_LEVELS)
    admin_token: str | None = _f(
        None, "bearer token required by admin endpoints (unset: admin changes from loopback only)")

    # ------------------------------------------------------------------
    @property
    def effective_prefill_policy(self) -> str:
        return self.prefill_policy or self.policy

    @property
    def geometry(self) -> ModelGeometry | None:
        """`model_geometry` parsed (validate() has checked it)."""
        return None if self.model_geometry is None else parse_geometry(self.model_geometry)

    @property
    def effective_decode_policy(self) -> str:
        return self.decode_policy or self.policy

    @property
    def max_attempts(self) -> int:
        return 1 if self.disable_retries else self.retry_max_retries

    def validate(self) -> Settings:
        """Raise ConfigError naming the first invalid key; return self for chaining."""
        positive_ints = ("retry_max_retries", "cb_failure_threshold", "cb_success_threshold",
                         "health_failure_threshold", "health_success_threshold", "processes",
                         "max_payload_size", "max_response_size", "signature_cache_max_entries",
                         "signature_cache_max_bytes", "signature_cache_block_tokens",
                         "signature_cache_block_bytes", "least_load_mean_prefill_tokens")
        for key in positive_ints:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)!r}")
        positive_floats = ("request_timeout_secs", "health_check_timeout_secs",
                           "health_check_interval_secs", "cb_timeout_duration_secs",
                           "cb_window_duration_secs", "retry_backoff_multiplier",
                           "queue_timeout_secs", "load_stale_secs",
                           "worker_startup_timeout_secs", "worker_startup_check_interval",
                           "client_idle_timeout_secs", "service_discovery_resync_secs",
                           "least_load_default_throughput")
        if not self.least_load_kv_pressure_weight >= 0:
            raise ConfigError("least_load_kv_pressure_weight must be >= 0, got "
                              f"{self.least_load_kv_pressure_weight!r}")
        if self.least_load_max_waiting_requests < 0:
            raise ConfigError("least_load_max_waiting_requests must be >= 0, got "
                              f"{self.least_load_max_waiting_requests!r}")
        for key in positive_floats:
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)!r}")
        for key in ("retry_initial_backoff_ms", "retry_max_backoff_ms", "queue_size",
                    "load_poll_interval_secs"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        if not 0.0 <= self.retry_jitter_factor <= 1.0:
            raise ConfigError(
                f"retry_jitter_factor must be in [0, 1], got {self.retry_jitter_factor}"
            )
        if not 0.0 <= self.calibration_sample_rate <= 1.0:
            raise ConfigError(
                f"calibration_sample_rate must be in [0, 1], got {self.calibration_sample_rate}"
            )
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ConfigError(f"cache_threshold must be in [0, 1], got {self.cache_threshold}")
        if not self.balance_rel_threshold >= 1.0 or not self.prefix_hash_load_factor >= 1.0:
            raise ConfigError("balance_rel_threshold and prefix_hash_load_factor must be >= 1")
        for key in ("balance_abs_threshold", "prefix_hash_balance_abs_threshold",
                    "eviction_interval_secs", "max_tree_size", "max_idle_secs",
                    "prefix_token_count"):
            if getattr(self, key) < (0 if "balance" in key else 1):
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)!r}")
        if self.eldr_tau is not None and not 0.0 <= self.eldr_tau <= 2.0:
            raise ConfigError(f"eldr_tau must be in [0, 2], got {self.eldr_tau}")
        if self.eldr_min_candidates is not None and self.eldr_min_candidates < 1:
            raise ConfigError(f"eldr_min_candidates must be >= 1, got {self.eldr_min_candidates}")
        if self.eldr_load_bound is not None and self.eldr_load_bound < -1:
            raise ConfigError(
                f"eldr_load_bound must be >= 0, or -1 for off, got {self.eldr_load_bound}")
        for key in ("eldr_step_fixed_ms", "eldr_step_expert_us", "eldr_step_token_us"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{key} must be a finite number >= 0, got {value!r}")
        rate = self.rate_limit_tokens_per_second
        if rate is not None and not rate > 0:
            raise ConfigError(f"rate_limit_tokens_per_second must be > 0, got {rate!r}")
        if self.max_concurrent_requests == 0 or self.max_concurrent_requests < -1:
            raise ConfigError("max_concurrent_requests must be -1 (unlimited) or >= 1")
        for key in ("port", "prometheus_port"):
            if not 0 <= getattr(self, key) <= 65535:
                raise ConfigError(f"{key} must be a TCP port, got {getattr(self, key)!r}")
        for key, allowed in (("policy", POLICIES), ("prefill_policy", POLICIES),
                             ("decode_policy", POLICIES), ("pd_flow", PD_FLOWS),
                             ("eldr_fallback_policy", LOAD_POLICIES),
                             ("eldr_decision", ELDR_DECISIONS), ("load_view", LOAD_VIEWS),
                             ("least_load_metric", LEAST_LOAD_METRICS),
                             ("log_level", LOG_LEVELS)):
            value = getattr(self, key)
            if value is not None and value not in allowed:
                hint = " (the Rust routers' bucket policy is not implemented)" \
                    if value == "bucket" else ""
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}{hint}")
        if "eldr" in (self.effective_prefill_policy,):
            raise ConfigError("prefill_policy cannot be eldr: expert locality is a decode concern")
        if self.model_geometry is not None:
            try:
                parse_geometry(self.model_geometry)
            except GeometryError as exc:
                raise ConfigError(f"model_geometry: {exc}") from None
        if self.calibration_log and not (self.zones or self.model_geometry):
            raise ConfigError("calibration_log needs zones or model_geometry: a record is stored "
                              "in the served model's routing shape (--model-geometry 26x64x6)")
        if self.effective_decode_policy == "eldr" and not self.zones:
            raise ConfigError("decode_policy eldr needs zones (--zones PATH)")
        if not self.health_check_endpoint.startswith("/"):
            raise ConfigError("health_check_endpoint must start with '/'")
        for spec in self.prefill:
            check_url("prefill", spec.url)
            if spec.bootstrap_port is not None and not 1 <= spec.bootstrap_port <= 65535:
                raise ConfigError(f"prefill bootstrap port must be 1..65535: {spec.bootstrap_port}")
        for url in self.decode:
            check_url("decode", url)
        for url in self.worker_urls:
            check_url("worker_urls", url)
        self._validate_discovery()
        if self.pd_disaggregation and self.worker_urls:
            raise ConfigError("worker_urls is for regular mode; use --prefill/--decode with "
                              "--pd-disaggregation")
        if not self.pd_disaggregation and (self.prefill or self.decode):
            raise ConfigError("prefill/decode workers need --pd-disaggregation")
        from gateway.tls import check_settings  # the TLS files: paired, readable, loadable

        check_settings(self)
        return self

    def _validate_discovery(self) -> None:
        for key in ("selector", "prefill_selector", "decode_selector"):
            parse_selector(key, getattr(self, key))
        if not 1 <= self.service_discovery_port <= 65535:
            raise ConfigError(f"service_discovery_port must be 1..65535, got "
                              f"{self.service_discovery_port!r}")
        if not self.service_discovery:
            return
        # As the Rust routers: PD mode matches pods by the role selectors only, regular mode by
        # --selector only. An empty selector would match no pod (smg only warns); refuse it here.
        if self.pd_disaggregation and not (self.prefill_selector or self.decode_selector):
            raise ConfigError("service_discovery with --pd-disaggregation needs "
                              "--prefill-selector and/or --decode-selector (key=value ...)")
        if not self.pd_disaggregation and not self.selector:
            raise ConfigError("service_discovery needs --selector (key=value ...)")

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def parse_prefill(values: list[str]) -> PrefillSpec:
    """`--prefill URL [BOOTSTRAP_PORT|none]`, as the Rust router's launcher parses it."""
    if not values or len(values) > 2:
        raise ConfigError(f"prefill takes URL [BOOTSTRAP_PORT|none], got {values!r}")
    port: int | None = None
    if len(values) == 2 and values[1].lower() != "none":
        try:
            port = int(values[1])
        except ValueError as exc:
            raise ConfigError(f"prefill bootstrap port must be an integer or 'none': "
                              f"{values[1]!r}") from exc
    return PrefillSpec(url=values[0].rstrip("/"), bootstrap_port=port)


def parse_selector(key: str, values: list[str]) -> dict[str, str]:
    """`key=value` label pairs, as the Rust routers' `--selector` takes them; one item may hold
    several space-separated pairs (smg's launcher allows it). A token without `=` is refused
    (smg's Rust command line refuses it too; its Python launcher skips it silently)."""
    labels: dict[str, str] = {}
    for item in values:
        for token in item.split():
            name, sep, value = token.partition("=")
            if not sep or not name:
                raise ConfigError(f"{key}: expected key=value label pairs, got {token!r}")
            labels[name] = value
    return labels

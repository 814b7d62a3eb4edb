"""The Rust routers' flags that are not `Settings` fields: what this gateway does with each.

Users start the gateway with the command lines they wrote for `sglang_router.launch_router`
0.3.2 or `smg.launch_router` 1.13. A flag with behaviour here is a `Settings` field (or one of
its `aliases`); every other flag of either router is listed below, by exact name or by family
prefix, as one of:

- `accepted`: it configures something this gateway does not have and whose absence changes no
  answer a client gets (tokenizers, gRPC-mode media handling, smg's internal tuning knobs). The
  flag is accepted and start-up logs one line per flag saying it has no effect and why.
- `rejected`: ignoring it would be unsafe or would silently change what the operator asked for
  (authentication, storage, other serving modes). Start-up fails naming the flag
  and the alternative.

`tests/deploy/test_compat_flags.py` parses both routers' `--help` and fails on any flag this
table and `Settings` do not cover, so the table stays complete as the routers change.
docs/gateway.md's compatibility table is generated from it (`python -m gateway.compat`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

Status = Literal["accepted", "rejected"]


@dataclass(frozen=True, slots=True)
class ForeignFlags:
    names: tuple[str, ...]  # exact flags, or family prefixes ending in "-" (e.g. "--oracle-")
    status: Status
    why: str  # for `accepted`: why it has no effect; for `rejected`: the alternative

    def matches(self, flag: str) -> bool:
        return any(flag == n or (n.endswith("-") and flag.startswith(n)) for n in self.names)


_WORKERS_TOKENIZE = ("workers tokenize and parse: the gateway forwards HTTP requests unchanged "
                     "and needs no tokenizer")
_SMG_TUNING = "smg's internal tuning of a mechanism this gateway does not have"

FOREIGN_FLAGS: tuple[ForeignFlags, ...] = (
    # --- accepted: no effect here ---
    ForeignFlags(("--model-path", "--model", "--tokenizer-path", "--chat-template",
                  "--disable-tokenizer-autoload", "--parser", "--reasoning-parser",
                  "--tool-call-parser", "--tokenizer-cache-"), "accepted", _WORKERS_TOKENIZE),
    ForeignFlags(("--mm-", "--multimodal-", "--rdma-", "--log-mm-timing", "--model-alias"),
                 "accepted", "media and model names are handled by the workers (smg's "
                 "router-side media processing is a gRPC-mode feature)"),
    ForeignFlags(("--backend",), "accepted", "SGLang workers are the only backend (HTTP)"),
    ForeignFlags(("--mini-lb",), "accepted", "the gateway is itself the PD load balancer"),
    ForeignFlags(("--upstream-http2", "--upstream-pool-idle-timeout-secs"), "accepted",
                 "workers are spoken to over pooled HTTP/1.1 keep-alive connections"),
    ForeignFlags(("--header-read-timeout-secs",), "accepted",
                 "a request head's deadline is --client-idle-timeout-secs from the connection's "
                 "start (one aiohttp deadline covers both)"),
    ForeignFlags(("--disable-load-monitoring",), "accepted",
                 "loads are polled only while --load-poll-interval-secs > 0 (set it to 0)"),
    ForeignFlags(("--power-of-two-load-metric",), "accepted",
                 "power_of_two here compares worker-reported tokens, else gateway-counted "
                 "in-flight requests (docs/gateway.md); smg's expected_wait is "
                 "--least-load-metric expected_wait"),
    ForeignFlags(("--balance-token-usage-threshold", "--overload-token-usage-threshold",
                  "--worker-overload-", "--disable-worker-overload-protection",
                  "--worker-stall-secs", "--worker-wedge-secs", "--worker-stale-secs",
                  "--worker-warmup-", "--selection-", "--overlap-decay", "--kv-index",
                  "--cache-index", "--cache-ttl-secs", "--cache-boundaries", "--block-size",
                  "--bucket-adjust-interval-secs",
                  "--dp-minimum-tokens-scheduler", "--pd-admission-wait-secs",
                  "--sse-keepalive-secs", "--stream-body-stall-timeout-secs",
                  "--max-buffered-request-bytes", "--job-queue-", "--worker-startup-delay"),
                 "accepted", _SMG_TUNING),
    ForeignFlags(("--remove-unhealthy-workers", "--no-remove-unhealthy-workers",
                  "--worker-auto-recovery", "--no-worker-auto-recovery"), "accepted",
                 "unhealthy workers stay registered and return when their health check passes"),
    ForeignFlags(("--prefill-max-inflight-requests-per-worker", "--prefill-queue-size",
                  "--prefill-queue-timeout-secs"), "accepted",
                 "no per-prefill admission queue: use --max-concurrent-requests and --queue-size"),
    ForeignFlags(("--health-check-port",), "accepted",
                 "probes are served on the main port (/health, /liveness, /readiness)"),
    ForeignFlags(("--enable-trace", "--otlp-traces-endpoint"), "accepted",
                 "no OpenTelemetry export; request ids are forwarded (--request-id-headers)"),
    ForeignFlags(("--prometheus-duration-buckets",), "accepted",
                 "duration histograms use fixed buckets (docs/gateway.md, Metrics)"),
    ForeignFlags(("--log-dir", "--log-json", "--jemalloc-prof-dir"), "accepted",
                 "logs go to stderr as text; collect them there"),
    ForeignFlags(("--control-plane-audit-enabled",), "accepted",
                 "admin mutations are logged at INFO"),
    ForeignFlags(("--kv-connector-annotation", "--kv-engine-id-annotation"), "accepted",
                 "vLLM KV connector metadata of discovered pods; SGLang workers get their KV "
                 "transfer from the bootstrap port (--bootstrap-port-annotation)"),
    # --- rejected: ignoring them would be unsafe or change what was asked for ---
    ForeignFlags(("--jwt-", "--control-plane-api-keys", "--tenant-", "--trust-tenant-header",
                  "--priority-scheduler-"), "rejected",
                 "no client authentication or tenancy here: put an authenticating proxy in "
                 "front; --admin-token protects the admin API"),
    ForeignFlags(("--discovery-",), "rejected",
                 "Kubernetes discovery is --service-discovery (or smg's --discovery-provider "
                 "kubernetes), resynced every --service-discovery-resync-secs; there is no "
                 "file provider: list workers with --prefill/--decode (or --worker-urls) or add "
                 "them with POST /workers"),
    ForeignFlags(("--enable-mesh", "--mesh-", "--router-selector"), "rejected",
                 "no router mesh: replicas share nothing but the zone table and the workers' "
                 "own load reports"),
    ForeignFlags(("--history-", "--oracle-", "--postgres-", "--redis-", "--schema-config",
                  "--storage-", "--max-background-responses", "--mcp-config-path",
                  "--enable-wasm"), "rejected",
                 "the Responses/Conversations APIs, MCP and WASM hooks are not served here; "
                 "send /v1/chat/completions, /v1/completions or /generate"),
    ForeignFlags(("--epd-disaggregation", "--encode", "--encode-policy", "--encode-selector"),
                 "rejected",
                 "encode/prefill/decode (EPD) is not supported: use --pd-disaggregation"),
    ForeignFlags(("--enable-igw", "--model-id-from"), "rejected",
                 "one model per gateway: run one per model"),
    ForeignFlags(("--enable-rl", "--rl-"), "rejected", "no RL control plane here"),
    ForeignFlags(("--zmq-engine-count",), "rejected", "workers are HTTP URLs, not ZMQ sockets"),
)


def classify(flag: str) -> ForeignFlags | None:
    """The entry covering `flag` (`--name`, without `=value`), or None if no router has it."""
    for entry in FOREIGN_FLAGS:
        if entry.matches(flag):
            return entry
    return None


def split_foreign(extras: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Sort what our parser did not know (argparse's extras) into foreign flags with their
    values, and what no router knows (returned second, for the error message)."""
    foreign: dict[str, list[str]] = {}
    unknown: list[str] = []
    current: str | None = None
    for token in extras:
        if token.startswith("--"):
            flag, sep, value = token.partition("=")
            current = flag if classify(flag) is not None else None
            if current is None:
                unknown.append(token)
                continue
            foreign.setdefault(current, [])
            if sep:
                foreign[current].append(value)
        elif current is not None:
            foreign[current].append(token)
        else:
            unknown.append(token)
    return foreign, unknown


def markdown_table() -> str:
    """docs/gateway.md's list of the routers' flags without a `Settings` field."""
    rows = ["| Flags (Rust routers) | Here | Why / instead |", "|---|---|---|"]
    for entry in FOREIGN_FLAGS:
        names = ", ".join(f"`{n}*`" if n.endswith("-") else f"`{n}`" for n in entry.names)
        rows.append(f"| {names} | {entry.status} | {entry.why} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")

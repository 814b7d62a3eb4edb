"""Typed configuration of one emulated SGLang worker, and the CLI flags derived from it.

One source of defaults: `WorkerConfig`'s field defaults. `add_engine_arguments` adds the flags
shared by `python -m loadtest.emulator` (one worker) and `python -m loadtest cluster` (many).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from typing import Literal

Role = Literal["prefill", "decode", "regular"]
ROLES: tuple[Role, ...] = ("prefill", "decode", "regular")

# sglang 0.5.23 `srt/environ.py`: SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT = EnvInt(300) and
# SGLANG_DISAGGREGATION_WAITING_TIMEOUT = EnvInt(300) (seconds).
SGLANG_BOOTSTRAP_TIMEOUT_SECS = 300.0
SGLANG_WAITING_TIMEOUT_SECS = 300.0
# Our prefill-first extension (docs/wire-format.md): how long a prefill holds KV for a decode.
DEFAULT_PREFILL_FIRST_HOLD_SECS = 30.0


class ConfigError(ValueError):
    """A worker setting is invalid; the message names the setting."""


@dataclass(frozen=True)
class EngineOptions:
    """Settings shared by every worker of a cluster (model, routing source, costs, timeouts)."""

    model: str = "Qwen3-30B-A3B"
    routing: str = "token-hash"
    trace_path: str | None = None  # "trace" routing: None = routing.default_trace_path()
    seed: int = 0
    time_scale: float = 1.0
    instant: bool = False
    max_batch_size: int = 64
    prefill_first: bool = True
    bootstrap_timeout_secs: float = SGLANG_BOOTSTRAP_TIMEOUT_SECS
    waiting_timeout_secs: float = SGLANG_WAITING_TIMEOUT_SECS
    prefill_first_hold_secs: float = DEFAULT_PREFILL_FIRST_HOLD_SECS
    # SGLang's --disable-radix-cache (default False): no prefix cache on prefill/regular
    # workers. PD decode workers never have one (SGLang disables it there unless
    # --disaggregation-decode-enable-radix-cache, which the emulator does not model).
    disable_radix_cache: bool = False
    # SGLang's --enable-cache-report (default False): OpenAI answers carry
    # usage.prompt_tokens_details.cached_tokens.
    enable_cache_report: bool = False
    # DP attention ranks per worker (SGLang 0.5.23 `--attn-dp-size N`, or the deprecated
    # `--dp-size N --enable-dp-attention`): each rank has its own batch, queue and KV budget,
    # one decode step serves all ranks (docs/emulator-cost-model.md section 9). 1 = no DP.
    dp_size: int = 1

    def __post_init__(self) -> None:
        if self.routing not in ("token-hash", "trace"):
            raise ConfigError(f"routing must be 'token-hash' or 'trace', got {self.routing!r}")
        if not self.time_scale > 0:
            raise ConfigError(f"time_scale must be > 0, got {self.time_scale!r}")
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size!r}")
        if not isinstance(self.dp_size, int) or isinstance(self.dp_size, bool) \
                or self.dp_size < 1:
            raise ConfigError(f"dp_size must be an integer >= 1, got {self.dp_size!r}")
        for name in ("bootstrap_timeout_secs", "waiting_timeout_secs", "prefill_first_hold_secs"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class WorkerConfig:
    """One worker: its role, where it listens, and the shared engine options."""

    role: Role = "regular"
    host: str = "127.0.0.1"
    port: int = 0  # 0: the OS picks a free port (tests)
    bootstrap_port: int | None = None  # prefill only; None or 0: the OS picks one
    engine: EngineOptions = field(default_factory=EngineOptions)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        for name in ("port", "bootstrap_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ConfigError(f"{name} must be in [0, 65535], got {value!r}")
        if self.role != "prefill" and self.bootstrap_port:
            raise ConfigError("bootstrap_port is only meaningful for role 'prefill'")

    def with_ports(self, port: int, bootstrap_port: int | None) -> WorkerConfig:
        return replace(self, port=port, bootstrap_port=bootstrap_port)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for `EngineOptions`, defaults taken from the dataclass."""
    d = EngineOptions()
    parser.add_argument("--model", default=d.model,
                        help="model geometry for token-hash routing (zones.geometry names)")
    parser.add_argument("--routing", choices=("token-hash", "trace"), default=d.routing,
                        help="expert routing source")
    parser.add_argument("--trace-path", default=d.trace_path,
                        help="routing trace .npz for --routing trace")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--time-scale", type=float, default=d.time_scale,
                        help="multiply every emulated GPU time by this factor")
    parser.add_argument("--instant", action="store_true",
                        help="zero-cost engine (proxy benchmarks); overrides --time-scale")
    parser.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                        help="decode continuous-batching limit (SGLang --max-running-requests)")
    parser.add_argument("--no-prefill-first", dest="prefill_first", action="store_false",
                        help="reject the prefill_first extension (behave like stock SGLang)")
    parser.add_argument("--prefill-first", dest="prefill_first", action="store_true",
                        default=d.prefill_first,
                        help="accept the prefill_first extension field (default)")
    parser.add_argument("--bootstrap-timeout-secs", type=float, default=d.bootstrap_timeout_secs,
                        help="SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT equivalent")
    parser.add_argument("--waiting-timeout-secs", type=float, default=d.waiting_timeout_secs,
                        help="SGLANG_DISAGGREGATION_WAITING_TIMEOUT equivalent")
    parser.add_argument("--prefill-first-hold-secs", type=float,
                        default=d.prefill_first_hold_secs,
                        help="default KV hold time for prefill_first requests")
    parser.add_argument("--disable-radix-cache", action="store_true",
                        default=d.disable_radix_cache,
                        help="no prefix cache: every prefill forwards the whole prompt "
                             "(SGLang --disable-radix-cache)")
    parser.add_argument("--enable-cache-report", action="store_true",
                        default=d.enable_cache_report,
                        help="report cached tokens in OpenAI usage.prompt_tokens_details "
                             "(SGLang --enable-cache-report)")
    parser.add_argument("--dp-size", "--attn-dp-size", dest="dp_size", type=int,
                        default=d.dp_size,
                        help="DP attention ranks per worker (SGLang --attn-dp-size, or "
                             "--dp-size with --enable-dp-attention); --max-batch-size is split "
                             "over the ranks as SGLang splits --max-running-requests")


def engine_options_from_args(args: argparse.Namespace) -> EngineOptions:
    names = {f.name for f in fields(EngineOptions)}
    return EngineOptions(**{k: v for k, v in vars(args).items() if k in names})

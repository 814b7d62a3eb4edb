"""Command line and environment for the gateway, derived from `Settings`.

Every `Settings` field `foo_bar` is flag `--foo-bar` and environment variable `GATEWAY_FOO_BAR`;
precedence is flag > environment > dataclass default. List-valued environment variables are
comma-separated; `GATEWAY_PREFILL` entries are `URL` or `URL BOOTSTRAP_PORT`
(e.g. `GATEWAY_PREFILL="http://p1:8000 8998,http://p2:8000"`).

Rust-router flags we accept but do not act on (cache-aware, tokenizer, service discovery, history
backends, TLS, tracing) are listed in `IGNORED_FLAGS`: they are rejected with a message saying so,
rather than silently ignored, because silently ignoring e.g. TLS settings would be unsafe.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.config import Settings, parse_prefill
from gateway.errors import ConfigError

ENV_PREFIX = "GATEWAY_"
IGNORED_FLAGS = (
    "--cache-threshold", "--balance-abs-threshold", "--balance-rel-threshold",
    "--eviction-interval-secs", "--max-tree-size", "--dp-aware", "--enable-igw", "--mini-lb",
    "--service-discovery", "--model-path", "--tokenizer-path", "--tls-cert-path",
    "--tls-key-path", "--enable-trace", "--history-backend", "--cors-allowed-origins",
    "--rate-limit-tokens-per-second", "--prometheus-duration-buckets",
)


_HINTS = typing.get_type_hints(Settings)


def _base_type(hint: Any) -> type:
    """`int | None` -> int, `list[str]` -> list."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return list
    return typing.cast(type, hint)


def _parse_bool(key: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{key}: expected a boolean (true/false/1/0), got {raw!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eldr-gateway",
        description="ELDR gateway: SGLang PD router with expert-locality decode routing. "
                    f"Every flag also reads {ENV_PREFIX}<FLAG> from the environment.",
    )
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        kind = f.metadata.get("kind")
        help_text = f"{f.metadata.get('help', '')} (env {ENV_PREFIX}{f.name.upper()})"
        base = _base_type(_HINTS[f.name])
        if kind == "prefill":
            parser.add_argument(flag, nargs="+", action="append", metavar="URL_OR_PORT",
                                dest=f.name, default=None, help=help_text)
        elif kind == "append":
            parser.add_argument(flag, action="append", metavar="URL", dest=f.name, default=None,
                                help=help_text)
        elif kind == "nargs":
            parser.add_argument(flag, nargs="*", dest=f.name, default=None, help=help_text)
        elif base is bool and f.default is True:  # on by default: --no-<flag> turns it off
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, dest=f.name,
                                default=None, help=help_text)
        elif base is bool:
            parser.add_argument(flag, action="store_true", dest=f.name, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, type=base, dest=f.name, default=None,
                                choices=f.metadata.get("choices"), help=help_text)
    for flag in IGNORED_FLAGS:
        parser.add_argument(flag, nargs="*", dest="unsupported_" + flag[2:].replace("-", "_"),
                            default=None, help=argparse.SUPPRESS)
    return parser


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        key = ENV_PREFIX + f.name.upper()
        if key not in env:
            continue
        raw = env[key]
        base = _base_type(_HINTS[f.name])
        kind = f.metadata.get("kind")
        try:
            if kind == "prefill":
                values[f.name] = [parse_prefill(item.split()) for item in raw.split(",")
                                  if item.strip()]
            elif base is list:
                values[f.name] = [item.strip() for item in raw.split(",") if item.strip()]
            elif base is bool:
                values[f.name] = _parse_bool(key, raw)
            elif raw == "" and f.default is None:
                values[f.name] = None
            else:
                values[f.name] = base(raw)
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise ConfigError(f"{key}: {exc}") from exc
            raise ConfigError(f"{key}: cannot parse {raw!r} as {base.__name__}") from exc
    return values


def settings_from_args(argv: Sequence[str] | None = None,
                       env: Mapping[str, str] | None = None) -> Settings:
    """Parse flags and environment into validated Settings (ConfigError names the key)."""
    args = build_parser().parse_args(argv)
    used_unsupported = [k for k, v in vars(args).items() if k.startswith("unsupported_") and
                        v is not None]
    if used_unsupported:
        names = ", ".join("--" + k[len("unsupported_"):].replace("_", "-")
                          for k in used_unsupported)
        raise ConfigError(f"not supported by this gateway: {names}")
    values = _from_env(os.environ if env is None else env)
    for f in dataclasses.fields(Settings):
        value = getattr(args, f.name)
        if value is None:
            continue
        if f.metadata.get("kind") == "prefill":
            value = [parse_prefill(v) for v in value]
        values[f.name] = value
    return Settings(**values).validate()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
    except ConfigError as exc:
        print(f"eldr-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    if settings.zones:
        # Fail fast with one line naming the file and the problem, before any socket or client
        # session exists; at run time a bad table is only ever rejected while the old one serves.
        from zones.table import ZoneTableError, load_table

        try:
            load_table(settings.zones)
        except (OSError, ZoneTableError) as exc:
            print(f"eldr-gateway: zones: cannot load {settings.zones}: {exc}", file=sys.stderr)
            return 2
    from gateway.server import serve

    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line and environment for the gateway, derived from `Settings`.

Every `Settings` field `foo_bar` is flag `--foo-bar` and environment variable `GATEWAY_FOO_BAR`;
precedence is flag > environment > dataclass default. List-valued environment variables are
comma-separated; `GATEWAY_PREFILL` entries are `URL` or `URL BOOTSTRAP_PORT`
(e.g. `GATEWAY_PREFILL="http://p1:8000 8998,http://p2:8000"`).

The Rust routers' flags without a `Settings` field are accepted or rejected by name as
`gateway/compat.py` lists them; a flag no router has is an error.
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

from gateway.compat import classify, split_foreign
from gateway.config import Settings, parse_prefill
from gateway.errors import ConfigError

ENV_PREFIX = "GATEWAY_"



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
        prog="eldr-gateway", allow_abbrev=False,  # `--model` must not mean `--model-geometry`
        description="ELDR gateway: SGLang PD router with expert-locality decode routing. "
                    f"Every flag also reads {ENV_PREFIX}<FLAG> from the environment.",
    )
    for f in dataclasses.fields(Settings):
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        kind = f.metadata.get("kind")
        help_text = f"{f.metadata.get('help', '')} (env {ENV_PREFIX}{f.name.upper()})"
        base = _base_type(_HINTS[f.name])
        if kind == "prefill":
            parser.add_argument(*flags, nargs="+", action="append", metavar="URL_OR_PORT",
                                dest=f.name, default=None, help=help_text)
        elif kind == "append":
            parser.add_argument(*flags, action="append", metavar="URL", dest=f.name, default=None,
                                help=help_text)
        elif kind == "nargs":
            # extend: a repeated flag adds to the list, as in the Rust routers' parsers
            parser.add_argument(*flags, nargs="*", action="extend", dest=f.name, default=None,
                                help=help_text)
        elif base is bool and f.default is True:  # on by default: --no-<flag> turns it off
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, dest=f.name,
                                default=None, help=help_text)
        elif base is bool:
            parser.add_argument(*flags, action="store_true", dest=f.name, default=None,
                                help=help_text)
        else:
            parser.add_argument(*flags, type=base, dest=f.name, default=None,
                                choices=f.metadata.get("choices"), help=help_text)
    # smg 1.13's spelling of --service-discovery (its choices: kubernetes, file). Not a
    # Settings field: it names a provider, and Kubernetes is the only one here.
    parser.add_argument("--discovery-provider", choices=("kubernetes", "file"), default=None,
                        help="smg's spelling: kubernetes = --service-discovery; there is no "
                        "file provider")
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


def parse_command_line(argv: Sequence[str] | None = None,
                       env: Mapping[str, str] | None = None
                       ) -> tuple[Settings, dict[str, list[str]]]:
    """Flags and environment -> validated Settings, plus the Rust-router flags accepted without
    effect (flag -> values). ConfigError names the key, or the rejected flag and what to use."""
    args, extras = build_parser().parse_known_args(argv)
    foreign, unknown = split_foreign(extras)
    if unknown:
        raise ConfigError(f"unrecognized arguments: {' '.join(unknown)}")
    rejected = [(flag, entry) for flag in foreign
                if (entry := classify(flag)) is not None and entry.status == "rejected"]
    if rejected:
        raise ConfigError("; ".join(f"{flag} is not supported by this gateway: {entry.why}"
                                    for flag, entry in rejected))
    backend = foreign.get("--backend")
    if backend and backend != ["sglang"]:
        raise ConfigError(f"--backend {' '.join(backend)}: only sglang workers are supported")
    values = _from_env(os.environ if env is None else env)
    if args.discovery_provider == "file":
        raise ConfigError("--discovery-provider file is not supported by this gateway: list "
                          "workers with --prefill/--decode (or --worker-urls), add them with "
                          "POST /workers, or use --discovery-provider kubernetes")
    if args.discovery_provider == "kubernetes":
        values["service_discovery"] = True
    for f in dataclasses.fields(Settings):
        value = getattr(args, f.name)
        if value is None:
            continue
        if f.metadata.get("kind") == "prefill":
            value = [parse_prefill(v) for v in value]
        values[f.name] = value
    return Settings(**values).validate(), foreign


def settings_from_args(argv: Sequence[str] | None = None,
                       env: Mapping[str, str] | None = None) -> Settings:
    """Parse flags and environment into validated Settings (ConfigError names the key)."""
    return parse_command_line(argv, env)[0]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings, accepted = parse_command_line(argv)
    except ConfigError as exc:
        print(f"eldr-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    for flag in accepted:
        entry = classify(flag)
        assert entry is not None
        print(f"eldr-gateway: {flag} accepted with no effect: {entry.why}", file=sys.stderr)
    if settings.zones:
        # Fail fast with one line naming the file and the problem, before any socket or client
        # session exists; at run time a bad table is only ever rejected while the old one serves.
        from zones.table import ZoneTableError, load_table

        try:
            load_table(settings.zones)
        except (OSError, ZoneTableError) as exc:
            print(f"eldr-gateway: zones: cannot load {settings.zones}: {exc}", file=sys.stderr)
            return 2
    if settings.service_discovery:
        # Same: a missing API configuration is one line at start-up, not a traceback later.
        from gateway.discovery import load_kube_configuration

        try:
            load_kube_configuration()
        except ConfigError as exc:
            print(f"eldr-gateway: configuration error: {exc}", file=sys.stderr)
            return 2
    from gateway.server import serve

    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Worker URLs: what the gateway accepts as one, and how one is shown.

A worker URL is a base the gateway appends its own paths to (`url + "/server_info"`), so it is
only `http(s)://host[:port]`, optionally with a trailing `/`. Anything after the authority would
change what that concatenation reads: `http://h:1/admin?` turns `/server_info` into a query
string and `http://h:1#` into a fragment, so `/get_server_info` would read `http://h:1/admin`
or `http://h:1/` instead. Credentials (`user:pass@`) are refused too: workers authenticate with
`--api-key`, and a URL is shown in `/workers`, `/get_loads`, metrics labels and logs.

`redact_url` is for display paths that show strings which did not come through `check_url`
(zone table worker names are free strings) or as defence in depth where a URL is echoed.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from gateway.errors import ConfigError

# Host names as DNS, /etc/hosts, Docker and Kubernetes spell them (underscores occur in Compose
# service names). Anything else (`\`, `%`, spaces) is read differently by different URL parsers.
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")
# Userinfo: everything up to the last `@` of the authority, the part after an optional scheme and
# before the first `/`, `?` or `#`. Scheme-less strings count too: `u:p@h:1` is a plausible
# worker name in a zone table.
_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//|)[^/?#]*@")
REDACTED = "***"


def redact_url(url: str) -> str:
    """`url` with any userinfo replaced by `***` (`http://u:p@h:1` -> `http://***@h:1`)."""
    return _USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", url, count=1)


def check_url(key: str, url: str) -> None:
    """Raise ConfigError, naming `key`, unless `url` is `http(s)://host[:port][/]`."""
    shown = repr(redact_url(url))
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ConfigError(f"{key}: {shown} must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:  # e.g. an unclosed `[` of an IPv6 literal
        raise ConfigError(f"{key}: {shown} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise ConfigError(f"{key}: {shown} is not an http(s) URL with a host")
    if "@" in parts.netloc:
        raise ConfigError(f"{key}: {shown} must not contain credentials (user:pass@); "
                          "workers are authenticated with --api-key")
    # urlsplit reports a bare trailing `?` or `#` as an empty query or fragment: check the text.
    if "#" in url:
        raise ConfigError(f"{key}: {shown} must not have a fragment ('#')")
    if "?" in url:
        raise ConfigError(f"{key}: {shown} must not have a query ('?')")
    if parts.path not in ("", "/"):
        raise ConfigError(f"{key}: {shown} must not have a path")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or parts.netloc.endswith(":"):
        raise ConfigError(f"{key}: {shown} has an invalid port (must be 1..65535)")
    _check_host(key, shown, parts.netloc)


def _check_host(key: str, shown: str, netloc: str) -> None:
    if netloc.startswith("["):
        literal, bracket, rest = netloc[1:].partition("]")
        try:
            valid = (bool(bracket) and ipaddress.ip_address(literal).version == 6
                     and (not rest or rest.startswith(":")))
        except ValueError:
            valid = False
        if not valid:
            raise ConfigError(f"{key}: {shown} has an invalid IPv6 host")
        return
    host = netloc.rpartition(":")[0] if ":" in netloc else netloc
    if not _HOST_NAME.fullmatch(host):
        raise ConfigError(f"{key}: {shown} has an invalid host {host!r}")

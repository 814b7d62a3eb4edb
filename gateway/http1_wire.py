"""HTTP/1.1 wire format for gateway.http1: request targets, request encoding, response heads.

Pure functions and value types, no I/O: `Target` (a worker URL parsed once: pool key, path,
`Host` header, Basic auth from user:password@), `encode_request` (one buffer of head + body),
`parse_head` (status line and headers, strict about framing characters), `media_type`, and
`Http1Error`, the one exception every transport or protocol problem becomes.
"""

from __future__ import annotations

import base64
from urllib.parse import unquote, urlsplit


class Http1Error(ConnectionError):
    """Transport or protocol failure talking to `url`. `stale`: a reused keep-alive connection
    was closed by the server before any byte of the answer arrived (safe to retry once)."""

    def __init__(self, url: str, message: str, *, stale: bool = False) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url
        self.stale = stale


class Target:
    """A parsed request URL: pool key, request path and `Host` header, computed once."""

    __slots__ = ("auth", "host", "host_header", "key", "path", "port", "scheme", "url")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"{url!r}: only http and https URLs are supported")
        host = parts.hostname
        if not host:
            raise ValueError(f"{url!r}: no host")
        default_port = 443 if scheme == "https" else 80
        port = parts.port or default_port
        self.scheme = scheme
        self.host = host
        self.port = port
        self.key = (scheme, host, port)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        name = f"[{host}]" if ":" in host else host
        self.host_header = name if port == default_port else f"{name}:{port}"
        self.url = f"{scheme}://{self.host_header}{self.path}"
        self.auth: str | None = None
        if parts.username is not None:  # as aiohttp does for user:password@ URLs
            user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.auth = "Basic " + base64.b64encode(user_pass.encode()).decode()

    def __repr__(self) -> str:
        return f"Target({self.url!r})"


def encode_request(method: str, target: Target, body: bytes,
                   headers: dict[str, str] | None) -> bytes:
    """Request head + body as one buffer. `Content-Type: application/json` unless given."""
    parts = [f"{method} {target.path} HTTP/1.1\r\n"]
    host = target.host_header
    content_type = False
    auth = target.auth is None
    if headers:
        for name, value in headers.items():
            lname = name.lower()
            if lname == "host":
                host = value
                continue
            if lname == "content-length":
                continue  # always ours
            if lname == "content-type":
                content_type = True
            elif lname == "authorization":
                auth = True
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                raise ValueError(f"header {name!r}: newline or carriage return in header")
            parts.append(f"{name}: {value}\r\n")
    parts.append(f"Host: {host}\r\n")
    if body or method not in ("GET", "HEAD"):
        parts.append(f"Content-Length: {len(body)}\r\n")
    if not content_type and body:
        parts.append("Content-Type: application/json\r\n")
    if not auth:
        parts.append(f"Authorization: {target.auth}\r\n")
    parts.append("\r\n")
    head = "".join(parts).encode()
    return head + body if body else head


_content_types: dict[str, str] = {}


def media_type(raw: str | None) -> str:
    """The media type of a Content-Type value, lower-cased, without parameters; like aiohttp,
    `application/octet-stream` when absent or not of the form type/subtype."""
    if raw is None:
        return "application/octet-stream"
    known = _content_types.get(raw)
    if known is not None:
        return known
    value = raw.partition(";")[0].strip().lower()
    if value.count("/") != 1 or value.startswith("/") or value.endswith("/"):
        value = "application/octet-stream"
    if len(_content_types) < 256:
        _content_types[raw] = value
    return value


def parse_head(head: str, url: str) -> tuple[int, bool, dict[str, str]]:
    """`head` is the status line and header lines (latin-1 text) without the final CRLFCRLF.
    Returns (status, is HTTP/1.1 or later, headers with lower-cased names)."""
    if head.count("\n") != head.count("\r\n") or head.count("\r") != head.count("\r\n"):
        raise Http1Error(url, f"malformed response head (bare CR or LF): {head[:200]!r}")
    lines = head.split("\r\n")
    line = lines[0]
    if (len(line) < 12 or not line.startswith("HTTP/1.") or line[8] != " "
            or not line[7].isdigit() or (len(line) > 12 and line[12] != " ")):
        raise Http1Error(url, f"malformed status line {line[:200]!r}")
    code = line[9:12]
    if not (code.isascii() and code.isdigit()) or code[0] == "0":
        raise Http1Error(url, f"malformed status code in {line[:200]!r}")
    headers: dict[str, str] = {}
    last = ""
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):  # obsolete line folding: continues the previous value
            if not last:
                raise Http1Error(url, f"malformed header line {line[:200]!r}")
            headers[last] = headers[last] + " " + line.strip(" \t")
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name[-1] in " \t":
            raise Http1Error(url, f"malformed header line {line[:200]!r}")
        last = name.lower()
        value = value.strip(" \t")
        old = headers.get(last)
        headers[last] = value if old is None else f"{old}, {value}"
    return int(code), lines[0][7] != "0", headers

"""TLS: the gateway's HTTPS listener and its TLS/mTLS client for https:// workers.

Flags and meaning as the Rust routers (sglang-router 0.3.2, smg 1.13):

- `--client-cert-path` / `--client-key-path`: the certificate the gateway presents to workers
  (mTLS). Both or neither.
- `--ca-cert-paths`: CA certificates trusted for worker certificates *in addition to* the system
  store. smg adds them with reqwest's `add_root_certificate`, which (reqwest 0.13, rustls
  platform verifier) extends the platform's roots rather than replacing them; the system store
  plus these files is what `client_context` trusts. Certificates are always verified, host name
  included (an IP worker URL needs an IP SAN), as smg does.
- `--tls-cert-path` / `--tls-key-path`: serve the gateway over HTTPS (no client certificate
  asked, as smg). Both or neither. The Prometheus listener stays plain HTTP, as smg's.

One client context serves every worker connection: the generation legs (gateway/http1.py) and
the aiohttp session (health checks, load polls, info fan-out). Keys must be unencrypted PEM: an
encrypted key is refused at start-up instead of OpenSSL prompting on the terminal.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.config import Settings

# rustls, which both Rust routers use, speaks TLS 1.2 and 1.3 only.
MIN_VERSION = ssl.TLSVersion.TLSv1_2


def check_settings(settings: Settings) -> None:
    """Raise ConfigError naming the field unless the TLS files are paired, readable and load."""
    for cert_key, key_key in (("client_cert_path", "client_key_path"),
                              ("tls_cert_path", "tls_key_path")):
        cert, key = getattr(settings, cert_key), getattr(settings, key_key)
        if (cert is None) != (key is None):
            raise ConfigError(f"{cert_key} and {key_key} must be given together")
        for name, path in ((cert_key, cert), (key_key, key)):
            if path is not None:
                _check_readable(name, path)
    for path in settings.ca_cert_paths:
        _check_readable("ca_cert_paths", path)
    # Parse them now: a bad PEM or a key that does not match its certificate is a configuration
    # error at start-up, not an ssl traceback when the app or the listener starts.
    client_context(settings)
    server_context(settings)


def client_context(settings: Settings) -> ssl.SSLContext | None:
    """The context for https:// workers, or None when no TLS flag is set (then the clients use
    their default: the system store, verification on)."""
    if settings.client_cert_path is None and not settings.ca_cert_paths:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # system roots, verify, hostname
    ctx.minimum_version = MIN_VERSION
    for path in settings.ca_cert_paths:
        try:
            ctx.load_verify_locations(cafile=path)
        except ssl.SSLError as exc:
            raise ConfigError(f"ca_cert_paths: {path!r} holds no PEM CA certificate "
                              f"({exc.reason or exc})") from None
    if settings.client_cert_path is not None:
        assert settings.client_key_path is not None
        _load_pair(ctx, "client_cert_path/client_key_path", settings.client_cert_path,
                   settings.client_key_path)
    return ctx


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The listener's context (--tls-cert-path/--tls-key-path), or None for plain HTTP."""
    if settings.tls_cert_path is None:
        return None
    assert settings.tls_key_path is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    ctx.set_alpn_protocols(["http/1.1"])  # the listener speaks HTTP/1.1 only
    _load_pair(ctx, "tls_cert_path/tls_key_path", settings.tls_cert_path, settings.tls_key_path)
    return ctx


def _check_readable(key: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path!r}: {exc.strerror or exc}") from None


def _load_pair(ctx: ssl.SSLContext, keys: str, cert: str, key: str) -> None:
    def no_password() -> str:
        raise ConfigError(f"{keys}: {key!r} is an encrypted key; give an unencrypted PEM key")

    try:
        ctx.load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as exc:
        raise ConfigError(f"{keys}: cannot load certificate {cert!r} with key {key!r} "
                          f"({exc.reason or exc})") from None
    except OSError as exc:
        raise ConfigError(f"{keys}: cannot read {cert!r} / {key!r}: "
                          f"{exc.strerror or exc}") from None

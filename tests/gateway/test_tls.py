"""TLS as the Rust routers offer it (gateway/tls.py): mTLS to https workers with extra CAs, and
the gateway's own HTTPS listener.

A throwaway PKI is made per module with the openssl CLI: a CA, a server certificate for
127.0.0.1 (IP SAN), a client certificate, and a second, unrelated CA. The fake workers are real
TLS servers that require a client certificate signed by the CA.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.cli import settings_from_args
from gateway.config import PrefillSpec, Settings
from gateway.errors import ConfigError
from gateway.tls import client_context, server_context
from loadtest.procs import free_port
from tests.gateway.fakes import FakeWorker
from tests.gateway_server import running_gateway

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # an unrelated CA: trusting only it must fail verification


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _new_key_args(name: str) -> list[str]:
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key"]


def _make_ca(d: Path, name: str) -> None:
    _openssl(d, "req", "-x509", "-config", "openssl.cnf", "-extensions", "ca_ext",
             *_new_key_args(name), "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}")


def _make_leaf(d: Path, name: str, cn: str, ext: str, serial: int) -> None:
    _openssl(d, "req", "-new", "-config", "openssl.cnf", *_new_key_args(name),
             "-out", f"{name}.csr", "-subj", f"/CN={cn}")
    _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-set_serial", str(serial), "-days", "2",
             "-extfile", "openssl.cnf", "-extensions", ext, "-out", f"{name}.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    (d / "openssl.cnf").write_text(_OPENSSL_CNF)
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_leaf(d, "server", "127.0.0.1", "server_ext", 2)
    _make_leaf(d, "client", "eldr-gateway", "client_ext", 3)
    return Pki(ca=str(d / "ca.pem"), server_cert=str(d / "server.pem"),
               server_key=str(d / "server.key"), client_cert=str(d / "client.pem"),
               client_key=str(d / "client.key"), other_ca=str(d / "other-ca.pem"))


def worker_context(pki: Pki) -> ssl.SSLContext:
    """A worker's listener that requires a client certificate signed by the test CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    ctx.load_verify_locations(cafile=pki.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass
class TlsWorker(FakeWorker):
    """A FakeWorker served over TLS (mTLS required); counts health checks and load polls."""

    tls: ssl.SSLContext | None = None
    probes: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"https://127.0.0.1:{self.server.port}"

    async def start(self) -> TlsWorker:
        self.server = TestServer(self.app(), host="127.0.0.1")
        await self.server.start_server(ssl=self.tls)
        return self

    async def health(self, request: web.Request) -> web.Response:
        self.probes.append(request.path)
        return await super().health(request)

    async def loads(self, request: web.Request) -> web.Response:
        self.probes.append(request.path)
        return await super().loads(request)


@asynccontextmanager
async def tls_workers(pki: Pki, *roles: str) -> AsyncIterator[list[TlsWorker]]:
    workers = [await TlsWorker(role, tls=worker_context(pki)).start() for role in roles]
    try:
        yield workers
    finally:
        for w in workers:
            await w.close()


def regular(worker: FakeWorker, **kw: Any) -> Settings:
    base: dict[str, Any] = dict(
        worker_urls=[worker.url], prometheus_port=0, retry_initial_backoff_ms=1,
        retry_max_backoff_ms=5, health_check_interval_secs=0.05, health_check_timeout_secs=2.0,
        load_poll_interval_secs=0.05, request_timeout_secs=10.0)
    base.update(kw)
    return Settings(**base)


def mtls(pki: Pki) -> dict[str, Any]:
    return dict(client_cert_path=pki.client_cert, client_key_path=pki.client_key,
                ca_cert_paths=[pki.ca])


async def wait_for(condition: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)  # polling a condition


async def post_generate(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, \
            s.post(url + "/generate", json={"text": "hello", "stream": False}) as r:
        return r.status, await r.json(content_type=None)


# ---------------------------------------------------------------------------------- worker mTLS
async def test_regular_worker_over_mtls(pki: Pki) -> None:
    """Health checks, load polls (the aiohttp session) and the generation leg (Http1Pool) all
    reach an mTLS worker with the configured client certificate and CA."""
    async with tls_workers(pki, "regular") as (worker,), \
            running_gateway(regular(worker, **mtls(pki))) as (url, state):
        assert state.client is not None
        await wait_for(lambda: "/health" in worker.probes and "/v1/loads" in worker.probes,
                       "no health check or load poll reached the TLS worker")
        async with asyncio.timeout(10):
            status, body = await post_generate(url)
        assert status == 200, body
        assert body["text"] == "hi from regular"
        assert [r["text"] for r in worker.received] == ["hello"]


async def test_pd_workers_over_mtls(pki: Pki) -> None:
    async with tls_workers(pki, "prefill", "decode") as (prefill, decode):
        settings = regular(prefill, worker_urls=[], pd_disaggregation=True,
                           prefill=[PrefillSpec(prefill.url, 8998)], decode=[decode.url],
                           **mtls(pki))
        async with running_gateway(settings) as (url, _), asyncio.timeout(10):
            status, body = await post_generate(url)
        assert status == 200, body
        assert len(prefill.received) == 1 and len(decode.received) == 1


async def test_without_client_cert_the_worker_refuses_cleanly(pki: Pki) -> None:
    """The worker requires a client certificate: the leg fails at the TLS layer and the client
    gets a gateway error, never a 200 and never a hang."""
    async with tls_workers(pki, "regular") as (worker,):
        settings = regular(worker, ca_cert_paths=[pki.ca], disable_health_check=True,
                           retry_max_retries=2)
        async with running_gateway(settings) as (url, _), asyncio.timeout(15):
            status, body = await post_generate(url)
        assert 500 <= status < 600 and status != 500, body
        assert "error" in body and "Traceback" not in str(body)
        assert worker.received == []


async def test_without_client_cert_health_checks_keep_the_worker_out(pki: Pki) -> None:
    async with tls_workers(pki, "regular") as (worker,):
        settings = regular(worker, ca_cert_paths=[pki.ca], worker_startup_check_interval=0.05)
        async with running_gateway(settings) as (url, state), asyncio.timeout(15):
            assert not any(w.healthy for w in state.workers)
            status, body = await post_generate(url)
        assert status == 503, body
        assert worker.received == []


async def test_wrong_ca_fails_verification_cleanly(pki: Pki) -> None:
    async with tls_workers(pki, "regular") as (worker,):
        settings = regular(worker, client_cert_path=pki.client_cert,
                           client_key_path=pki.client_key, ca_cert_paths=[pki.other_ca],
                           disable_health_check=True, retry_max_retries=2)
        async with running_gateway(settings) as (url, _), asyncio.timeout(15):
            status, body = await post_generate(url)
        assert 500 <= status < 600 and status != 500, body
        assert "certificate verify failed" in str(body)
        assert "Traceback" not in str(body)
        assert worker.received == []


async def test_ca_cert_paths_add_to_the_system_store(pki: Pki,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """As smg (reqwest's add_root_certificate): --ca-cert-paths extends the system store rather
    than replacing it. The "system store" here is SSL_CERT_FILE, which OpenSSL reads when the
    default paths load; it holds the real CA while --ca-cert-paths names only the unrelated one."""
    monkeypatch.setenv("SSL_CERT_FILE", pki.ca)
    async with tls_workers(pki, "regular") as (worker,):
        settings = regular(worker, client_cert_path=pki.client_cert,
                           client_key_path=pki.client_key, ca_cert_paths=[pki.other_ca],
                           disable_health_check=True)
        async with running_gateway(settings) as (url, _), asyncio.timeout(10):
            status, body = await post_generate(url)
        assert status == 200, body


# ---------------------------------------------------------------------------------- settings
def test_client_flags_parse(pki: Pki) -> None:
    settings = settings_from_args(
        ["--worker-urls", "https://127.0.0.1:1", "--client-cert-path", pki.client_cert,
         "--client-key-path", pki.client_key, "--ca-cert-paths", pki.ca, pki.other_ca], env={})
    assert settings.client_cert_path == pki.client_cert
    assert settings.client_key_path == pki.client_key
    assert settings.ca_cert_paths == [pki.ca, pki.other_ca]
    ctx = client_context(settings)
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert client_context(Settings()) is None and server_context(Settings()) is None


@pytest.mark.parametrize(("changes", "names"), [
    ({"client_cert_path": "CERT"}, "client_cert_path and client_key_path"),
    ({"client_key_path": "KEY"}, "client_cert_path and client_key_path"),
    ({"tls_cert_path": "CERT"}, "tls_cert_path and tls_key_path"),
    ({"tls_key_path": "KEY"}, "tls_cert_path and tls_key_path"),
    ({"client_cert_path": "/nonexistent.pem", "client_key_path": "KEY"}, "client_cert_path"),
    ({"tls_cert_path": "CERT", "tls_key_path": "/nonexistent.key"}, "tls_key_path"),
    ({"ca_cert_paths": ["/nonexistent-ca.pem"]}, "ca_cert_paths"),
    ({"ca_cert_paths": ["KEY"]}, "ca_cert_paths"),  # a key, not a certificate
    ({"client_cert_path": "CERT", "client_key_path": "OTHER_KEY"}, "client_cert_path"),
    ({"tls_cert_path": "/", "tls_key_path": "KEY"}, "tls_cert_path"),  # a directory
])
def test_bad_tls_settings_name_the_field(pki: Pki, changes: dict[str, Any], names: str) -> None:
    paths = {"CERT": pki.client_cert, "KEY": pki.client_key, "OTHER_KEY": pki.server_key}

    def real(value: Any) -> Any:
        return [paths.get(v, v) for v in value] if isinstance(value, list) else \
            paths.get(value, value)

    with pytest.raises(ConfigError, match=names):
        Settings(**{k: real(v) for k, v in changes.items()}).validate()


def test_encrypted_key_is_refused_without_a_prompt(pki: Pki, tmp_path: Path) -> None:
    key = tmp_path / "encrypted.key"
    _openssl(tmp_path, "pkey", "-in", pki.server_key, "-aes256", "-passout", "pass:secret",
             "-out", str(key))
    with pytest.raises(ConfigError, match=r"tls_cert_path/tls_key_path: .* encrypted key"):
        Settings(tls_cert_path=pki.server_cert, tls_key_path=str(key)).validate()


# ---------------------------------------------------------------------------------- listener
@pytest.mark.slow
async def test_gateway_serves_https(pki: Pki) -> None:
    """`python -m gateway --tls-cert-path --tls-key-path`, the real server code path, answers
    over HTTPS to a client trusting the CA, and plain HTTP gets no answer."""
    worker = await FakeWorker("regular").start()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--worker-urls", worker.url, "--host", "127.0.0.1",
         "--port", str(port), "--prometheus-port", "0", "--log-level", "warn",
         "--tls-cert-path", pki.server_cert, "--tls-key-path", pki.server_key],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"https://127.0.0.1:{port}"
    trusting = ssl.create_default_context(cafile=pki.ca)
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with s.get(url + "/health", ssl=trusting) as r:
                        assert r.status == 200
                        break
                except aiohttp.ClientConnectorError:
                    pass
                if proc.poll() is not None:
                    assert proc.stderr is not None
                    pytest.fail(f"gateway exited: {proc.stderr.read().decode()[-2000:]}")
                assert time.monotonic() < deadline, "gateway did not start"
                await asyncio.sleep(0.1)  # polling a condition
            async with s.post(url + "/generate", json={"text": "hi"}, ssl=trusting) as r:
                assert r.status == 200
                assert (await r.json())["text"] == "hi from regular"
            # A client that does not trust the CA fails verification; plain HTTP gets nothing.
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with s.get(url + "/health", ssl=ssl.create_default_context()):
                    pass
            with pytest.raises(aiohttp.ClientError):
                async with s.get(f"http://127.0.0.1:{port}/health") as r:
                    await r.read()
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 15)
        await worker.close()

"""The command lines sglang-router 0.3.2 documents (its README, shipped in the installed wheel's
METADATA) start this gateway unchanged. Each PD or regular-mode example, with its worker URLs
pointed at emulated workers, serves a request; each example of a feature this gateway does not
have (OpenAI backend, gRPC workers, MCP, conversation storage, control-plane auth) is refused at
start-up with exit code 2 and a message naming the flag. TLS examples need certificates and are
covered by tests/gateway/test_tls.py.

smg 1.13's wheel documents no command lines (its README shows none); its flags are covered flag
by flag in test_compat_flags.py."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from importlib import metadata

import aiohttp
import pytest

from loadtest.emulator.cluster import ClusterConfig, run_cluster
from loadtest.emulator.config import EngineOptions, WorkerConfig
from loadtest.emulator.server import WorkerServer
from tests.hostile.helpers import gateway_command

pytestmark = pytest.mark.slow

ENGINE = EngineOptions(instant=True)
URL = re.compile(r"^(https?|grpc)://")
REFUSED_FEATURES = ("--backend", "--mcp-config-path", "--history-backend",
                    "--control-plane-api-keys", "--jwt-issuer")


def documented_examples() -> list[list[str]]:
    """Each `python3 -m sglang_router.launch_router ...` of the README, as an argv (after the
    module), continuation lines joined."""
    text = metadata.distribution("sglang-router").read_text("METADATA") or ""
    lines = text.splitlines()
    out: list[list[str]] = []
    for i, line in enumerate(lines):
        if "python3 -m sglang_router.launch_router" not in line:
            continue
        command = line.strip()
        j = i
        while command.endswith("\\") and j + 1 < len(lines):
            j += 1
            command = command[:-1] + " " + lines[j].strip()
        argv = shlex.split(command.split("#")[0])
        out.append(argv[argv.index("sglang_router.launch_router") + 1:])
    return out


def kind(argv: list[str]) -> str:
    if any(a in REFUSED_FEATURES for a in argv) or any(a.startswith("grpc://") for a in argv):
        return "refused"
    if "--tls-cert-path" in argv or "--client-cert-path" in argv:
        return "tls"
    if "--pd-disaggregation" in argv:
        return "pd"
    return "regular" if "--worker-urls" in argv else "other"


def rewrite(argv: list[str], prefill: list[tuple[str, int]], decode: list[str],
            regular: list[str]) -> list[str]:
    """Point the example's worker URLs at emulated workers, role by role, in order."""
    out: list[str] = []
    role = None
    counters = {"prefill": 0, "decode": 0, "regular": 0}
    skip_port = False
    for token in argv:
        if skip_port:
            skip_port = False
            if token.isdigit():
                continue  # the example's bootstrap port: ours comes with the worker
        if token in ("--prefill", "--decode", "--worker-urls"):
            role = {"--prefill": "prefill", "--decode": "decode"}.get(token, "regular")
            out.append(token)
            continue
        if token.startswith("--"):
            role = None
        if role is not None and URL.match(token):
            n = counters[role]
            counters[role] += 1
            if role == "prefill":
                url, port = prefill[n % len(prefill)]
                out += [url, str(port)]
                skip_port = True
            else:
                pool = decode if role == "decode" else regular
                out.append(pool[n % len(pool)])
            continue
        out.append(token)
    return out


EXAMPLES = documented_examples()


def test_the_readme_still_documents_pd_and_regular_examples() -> None:
    kinds = [kind(a) for a in EXAMPLES]
    assert kinds.count("pd") >= 2 and kinds.count("regular") >= 2, kinds


async def _serve_one(argv: list[str]) -> tuple[int, str]:
    """Start `python -m gateway argv`, send one /generate; (status, body)."""
    async with gateway_command(*argv, "--health-check-interval-secs", "1") as (_, url), \
            aiohttp.ClientSession() as s, s.post(url + "/generate", json={
                "text": "hello", "sampling_params": {"max_new_tokens": 2}}) as r:
        return r.status, await r.text()


@pytest.mark.parametrize("argv", [a for a in EXAMPLES if kind(a) in ("pd", "regular")],
                         ids=shlex.join)
async def test_a_documented_example_serves_a_request(argv: list[str]) -> None:
    async with run_cluster(ClusterConfig(prefill=2, decode=2, engine=ENGINE)) as cluster:
        regular = [WorkerServer(WorkerConfig(role="regular", host="127.0.0.1", port=0,
                                             engine=ENGINE)) for _ in range(2)]
        for server in regular:
            await server.start()
        try:
            rewritten = rewrite(argv, [(w.url, w.bootstrap_port) for w in cluster.prefill],
                                cluster.decode_urls, [w.url for w in regular])
            status, text = await _serve_one(rewritten)
            assert status == 200, (rewritten, text)
        finally:
            for server in regular:
                await server.stop()


@pytest.mark.parametrize("argv", [a for a in EXAMPLES if kind(a) == "refused"], ids=shlex.join)
def test_an_example_of_a_missing_feature_is_refused_by_name(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "gateway", *argv], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    flagged = [a for a in argv if a in REFUSED_FEATURES] or ["worker_urls: 'grpc://"]
    assert any(f in done.stderr for f in flagged), done.stderr

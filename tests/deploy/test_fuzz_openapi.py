"""Property-based fuzzing of the running gateway from its own OpenAPI document (schemathesis):
no generated request, valid or not, may get a 5xx. The gateway runs as a subprocess in front of
emulated workers with instant costs, so every answer is the gateway's own behaviour."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("gateway.openapi", reason="pending: gateway.openapi not written yet")
schemathesis = pytest.importorskip("schemathesis")

from typing import Any  # noqa: E402

from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from gateway.openapi import load_openapi  # noqa: E402
from tests.deploy.stack import Stack  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# An admin token is configured and the fuzzer does not know it: admin operations must answer
# 401/403, never 5xx, and the fuzzer cannot remove the workers the data-plane requests need.
ADMIN_TOKEN = secrets.token_hex(16)
# Bounds the run (about 20 operations x this many examples); raise locally for a deeper search.
MAX_EXAMPLES = 15

schema = schemathesis.openapi.from_dict(load_openapi())

# Output length is the one thing the fuzzer may not choose freely: the document rightly allows
# any positive max_tokens, and a valid request for a million tokens legitimately streams for a
# long time even from an instant emulator. Length caps are clamped so each example finishes
# quickly; everything else (types, missing fields, odd values) is left to the fuzzer.
LENGTH_FIELDS = {"max_tokens": 8, "max_completion_tokens": 8, "max_new_tokens": 8, "n": 2}


def _clamp_lengths(body: Any) -> None:
    if isinstance(body, dict):
        for key, cap in LENGTH_FIELDS.items():
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                body[key] = cap
        for value in body.values():
            _clamp_lengths(value)
    elif isinstance(body, list):
        for item in body:
            _clamp_lengths(item)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import os

    log_dir: Path = tmp_path_factory.mktemp("fuzz-stack")
    s = Stack(log_dir, emulator_args=["--instant"],
              env={**os.environ, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}).start()
    try:
        yield s
    finally:
        s.close()


@schema.parametrize()
# No shrinking: a failing example is reported as found (with a curl line to reproduce it)
# instead of being re-sent dozens of times, which keeps a failing run bounded too.
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True, database=None, phases=[Phase.explicit, Phase.generate])
def test_no_server_errors(case: schemathesis.Case, stack: Stack) -> None:
    _clamp_lengths(case.body)
    response = case.call(base_url=stack.base, timeout=20)
    case.validate_response(response, checks=[not_a_server_error])

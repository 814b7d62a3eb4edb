"""SIGTERM (what Kubernetes and `docker stop` send) drains in-flight streams: a stream that
started before the signal runs to its end, then the gateway exits 0 by itself."""

from __future__ import annotations

import http.client
import json
import signal
import time
from pathlib import Path

import pytest

from tests.deploy.stack import HOST, Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MAX_TOKENS = 64


def test_sigterm_drains_an_in_flight_stream(tmp_path: Path) -> None:
    # A slowed-down cost model so the stream is still running when the signal arrives.
    stack = Stack(tmp_path, emulator_args=["--time-scale", "5"]).start()
    try:
        gateway = stack.procs[-1]
        conn = http.client.HTTPConnection(HOST, stack.gateway_port, timeout=60)
        body = {"model": "default", "stream": True, "max_tokens": MAX_TOKENS,
                "messages": [{"role": "user", "content": "tell me a long story"}]}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        first = resp.readline()
        assert first.startswith(b"data: ")

        gateway.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        lines = [first]
        while True:
            line = resp.readline()
            if not line:
                break
            lines.append(line)
        data = [ln.strip() for ln in lines if ln.strip()]
        assert data[-1] == b"data: [DONE]", f"stream cut short after SIGTERM: {data[-3:]}"
        chunks = [json.loads(d[len(b"data: "):]) for d in data[:-1]]
        finish = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
        # "length" or "stop" (the emulator's EOS): the worker finished the generation; an
        # aborted stream ends without either.
        assert {"length", "stop"} & set(finish), f"stream aborted: {len(chunks)} chunks, {finish}"
        # The stream outlived the signal, so the drain really waited for it.
        assert time.monotonic() - t0 > 0.2, "stream finished before SIGTERM took effect"

        code = gateway.wait(timeout=60)
        assert code == 0, stack.logs()
    finally:
        stack.close()

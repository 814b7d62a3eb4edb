"""`python -m loadtest demo`: option checks, the printed usage, and the whole demo end to end.

The end-to-end tests start the demo exactly as `make demo` does (a subprocess), use only what it
prints (URLs, the curl command, the openai snippet), and check that it stops without leaving
processes behind.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest import demo
from loadtest.compare import ClusterInfo

# --------------------------------------------------------------------------- options


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.configure_parser(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--prefill", "0"], "--prefill"),
        (["--decode", "0"], "--decode"),
        (["--time-scale", "0"], "--time-scale"),
        (["--port", "70000"], "--port"),
        (["--prometheus-port", "-1"], "--prometheus-port"),
        (["--decode", "4", "--calibration-requests", "3"], "--calibration-requests"),
        (["--duration-secs", "0"], "--duration-secs"),
        (["--model", "NoSuchModel"], "--model"),
        (["--port", "31111", "--prometheus-port", "31111"], "--prometheus-port"),
    ],
)
def test_bad_options_exit_2_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = demo.main(parse([*argv, "--workdir", str(tmp_path / "w")]))
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err
    assert not (tmp_path / "w").exists()  # nothing was started or written


def test_a_taken_port_fails_before_anything_starts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        code = demo.main(parse(["--port", str(taken), "--workdir", str(tmp_path / "w")]))
    assert code == 2
    err = capsys.readouterr().err
    assert f"--port {taken} is not free" in err
    assert not (tmp_path / "w").exists()


def test_zero_ports_become_distinct_free_ports() -> None:
    opts = demo.resolve_ports(demo.DemoOptions(port=0, prometheus_port=0))
    assert opts.port > 0 and opts.prometheus_port > 0 and opts.port != opts.prometheus_port


def test_compare_options_follow_routing_and_flow(tmp_path: Path) -> None:
    dual = demo.compare_options(demo.DemoOptions(prefill=3, decode=5), tmp_path)
    assert dual.routers == ["gateway:eldr"] and dual.workload == "task"
    assert (dual.prefill, dual.decode, dual.model) == (3, 5, "Qwen3-30B-A3B")
    assert dual.out == tmp_path and dual.progress is False
    trace = demo.compare_options(
        demo.DemoOptions(routing="trace", pd_flow="prefill-first"), tmp_path
    )
    assert trace.routers == ["gateway:eldr-prefill-first"]
    assert (trace.workload, trace.model) == ("trace", "DeepSeek-V2-Lite")


def test_gateway_argv_is_an_eldr_pd_command_line(tmp_path: Path) -> None:
    cluster = ClusterInfo([("http://127.0.0.1:1", 5)], ["http://127.0.0.1:2", "http://127.0.0.1:3"])
    opts = demo.DemoOptions(pd_flow="prefill-first")
    argv = demo.gateway_argv(cluster, opts, tmp_path / "z.json", 1234, 5678)
    text = shlex.join(argv)
    assert argv[1:3] == ["-m", "gateway"]
    assert "--pd-disaggregation --prefill http://127.0.0.1:1 5" in text
    assert "--decode http://127.0.0.1:2 --decode http://127.0.0.1:3" in text
    assert f"--decode-policy eldr --pd-flow prefill-first --zones {tmp_path / 'z.json'}" in text
    assert "--port 1234" in text and "--prometheus-port 5678" in text


# --------------------------------------------------------------------------- the banner


def ready(url: str = "http://127.0.0.1:30000") -> demo.Ready:
    return demo.Ready(
        gateway_url=url,
        metrics_url="http://127.0.0.1:29000/metrics",
        model_id="Qwen3-30B-A3B",
        zones={"num_zones": 4, "version": "abc123"},
        opts=demo.DemoOptions(),
        workdir=Path("runs/demo-x"),
        table=Path("runs/demo-x/calibration/zones.json"),
        fitted_on=96,
        startup_seconds=12.5,
        steps=(("cluster", 1.0), ("calibration + zone fit", 10.0), ("gateway", 1.5)),
    )


def banner_section(banner: str, heading: str) -> str:
    """The lines after a `# heading` line, up to the next blank line."""
    lines = banner.splitlines()
    start = lines.index(heading) + 1
    end = lines.index("", start)
    return "\n".join(lines[start:end])


def curl_body(command: str) -> tuple[str, Any]:
    """(URL, JSON body) of a printed curl command, split the way a POSIX shell splits it."""
    words = shlex.split(command)
    assert words[0] == "curl"
    url = next(w for w in words if w.startswith("http://"))
    return url, json.loads(words[words.index("-d") + 1])


def test_banner_shows_urls_and_pasteable_requests() -> None:
    banner = demo.render_banner(ready())
    assert "gateway URL   http://127.0.0.1:30000" in banner
    assert "metrics URL   http://127.0.0.1:29000/metrics" in banner
    assert "http://127.0.0.1:30000/zones  (4 zones, version abc123)" in banner
    url, body = curl_body(banner_section(banner, "# SGLang /generate"))
    assert url == "http://127.0.0.1:30000/generate"
    assert body["text"] and body["sampling_params"]["max_new_tokens"] > 0
    url, body = curl_body(banner_section(banner, "# OpenAI-compatible streaming chat"))
    assert url == "http://127.0.0.1:30000/v1/chat/completions"
    assert body["stream"] is True and body["model"] == "Qwen3-30B-A3B"
    assert body["messages"][0]["role"] == "user"
    snippet = banner_section(banner, "# Python (openai package)")
    compile(snippet, "<snippet>", "exec")
    assert 'base_url="http://127.0.0.1:30000/v1"' in snippet
    assert "(fitted on 96 calibration requests)" in banner
    assert "Stop with Ctrl-C." in banner


def test_banner_quotes_a_prompt_with_shell_metacharacters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "EXAMPLE_PROMPT", "it's $HOME; `x` \"y\"")
    banner = demo.render_banner(ready())
    _, body = curl_body(banner_section(banner, "# SGLang /generate"))
    assert body["text"] == "it's $HOME; `x` \"y\""


# --------------------------------------------------------------------------- end to end

STARTUP_TIMEOUT = 150.0  # well above the ~10-20 s measured on a loaded 2-core machine
STOP_TIMEOUT = 60.0  # the demo bounds each child's stop at 2 x 10 s


@dataclass
class RunningDemo:
    proc: subprocess.Popen[str]
    lines: queue.Queue[str | None]
    stdout: list[str]
    stderr_path: Path

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.stdout:
                if line.startswith(prefix):
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {prefix!r} line within {timeout}s:\n{self.diagnose()}")
            try:
                line_or_end = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line_or_end is None:
                raise AssertionError(f"demo exited before printing {prefix!r}:\n{self.diagnose()}")
            self.stdout.append(line_or_end)

    def rest_of_stdout(self, timeout: float = 10.0) -> str:
        """Every stdout line, once the demo has closed its stdout."""
        while (line := self.lines.get(timeout=timeout)) is not None:
            self.stdout.append(line)
        return "\n".join(self.stdout)

    def diagnose(self) -> str:
        err = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return "stdout:\n" + "\n".join(self.stdout) + "\nstderr:\n" + err[-4000:]

    def banner(self) -> str:
        return "\n".join(self.stdout)


@pytest.fixture
def start_demo(tmp_path: Path) -> Iterator[Any]:
    started: list[RunningDemo] = []

    def start(*extra: str) -> RunningDemo:
        cmd = [
            sys.executable, "-m", "loadtest", "demo", "--prefill", "1", "--decode", "2",
            "--calibration-requests", "24", "--port", "0", "--prometheus-port", "0",
            "--workdir", str(tmp_path / "demo"), *extra,
        ]
        stderr_path = tmp_path / "demo-stderr.txt"
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=stderr_path.open("w"), text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        running = RunningDemo(proc, lines, [], stderr_path)
        started.append(running)
        return running

    yield start
    for running in started:  # a failed test must not leave the demo and its children behind
        if running.proc.poll() is None:
            kids = psutil.Process(running.proc.pid).children(recursive=True)
            running.proc.send_signal(signal.SIGTERM)
            try:
                running.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                running.proc.kill()
                running.proc.wait(10)
            for kid in psutil.wait_procs(kids, timeout=10)[1]:
                kid.kill()


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_serves_printed_requests_and_stops_cleanly_on_ctrl_c(start_demo: Any) -> None:
    running: RunningDemo = start_demo("--duration-secs", "240")
    url = running.wait_for_line("  gateway URL", STARTUP_TIMEOUT).split()[-1]
    metrics_url = running.wait_for_line("  metrics URL", 1).split()[-1]
    running.wait_for_line("Stops by itself", 5)
    banner = running.banner()
    assert url.startswith("http://127.0.0.1:")
    sent = 0

    # /generate: the printed curl command as is (through a shell), else the same body.
    generate_cmd = banner_section(banner, "# SGLang /generate")
    if shutil.which("curl"):
        out = subprocess.run(
            ["bash", "-c", generate_cmd], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        answer = json.loads(out)
    else:
        gen_url, body = curl_body(generate_cmd)
        req = urllib.request.Request(
            gen_url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
    sent += 1
    assert answer["text"] and answer["meta_info"]["completion_tokens"] >= 1

    # Streaming chat with the openai client at the printed URL.
    from openai import OpenAI

    model = http_json(url + "/v1/models")["data"][0]["id"]
    client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)
    stream = client.chat.completions.create(
        model=model, stream=True, max_tokens=8,
        messages=[{"role": "user", "content": "Name three prime numbers."}],
    )
    chunks = list(stream)
    sent += 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")

    # The printed openai snippet runs as printed.
    snippet = banner_section(banner, "# Python (openai package)")
    out = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    sent += 1
    assert out.strip()

    # GET /zones: the fitted table is active, one zone per decode worker, each mapped.
    zones = http_json(url + "/zones")
    assert zones["active"] is True and zones["last_error"] is None
    assert zones["num_zones"] == 2 and zones["checksum"].startswith("sha256:")
    assert Path(zones["path"]).is_file()
    assert all(w["worker"] for w in zones["workers"])
    assert "(fitted on 24 calibration requests)" in banner

    # Metrics: the eldr policy chose the decode worker of every request, with a signature.
    with urllib.request.urlopen(metrics_url, timeout=30) as resp:
        metrics = resp.read().decode()
    eldr_decode = [
        v for labels, v in metric_samples(metrics, "eldr_worker_selections_total")
        if labels["policy"] == "eldr" and labels["role"] == "decode"
    ]
    assert sum(eldr_decode) >= sent
    resolved = metric_samples(metrics, "eldr_signature_resolutions_total")
    assert sum(v for labels, v in resolved if labels["source"] != "none") >= sent
    assert metric_samples(metrics, "eldr_zone_table_zones") == [({}, 2.0)]
    decisions = metric_samples(metrics, "eldr_decisions_total")
    assert sum(v for labels, v in decisions if labels.get("policy") == "eldr") >= sent

    # Ctrl-C: everything stops, exit 0, no child left running.
    children = psutil.Process(running.proc.pid).children(recursive=True)
    assert len(children) >= 2  # the emulated cluster and the gateway
    running.proc.send_signal(signal.SIGINT)
    assert running.proc.wait(STOP_TIMEOUT) == 0, running.diagnose()
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"left running: {alive}"
    err = running.stderr_path.read_text()
    assert "gateway exit 0" in err and "cluster exit 0" in err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_stops_by_itself_after_duration(start_demo: Any) -> None:
    running: RunningDemo = start_demo("--duration-secs", "5", "--pd-flow", "prefill-first")
    running.wait_for_line("  gateway URL", STARTUP_TIMEOUT)
    assert "prefill-first PD flow" in running.wait_for_line("  cluster", 1)
    children = psutil.Process(running.proc.pid).children(recursive=True)
    assert running.proc.wait(STOP_TIMEOUT) == 0, running.diagnose()
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"left running: {alive}"
    assert "--duration-secs 5 elapsed" in running.stderr_path.read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_during_calibration_stops_every_child(start_demo: Any) -> None:
    running: RunningDemo = start_demo("--calibration-requests", "400")
    deadline = time.monotonic() + STARTUP_TIMEOUT
    children: list[psutil.Process] = []
    # Interrupt once calibration traffic flows: the cluster and the calibration gateway are up.
    while len(children) < 2:
        assert time.monotonic() < deadline, running.diagnose()
        assert running.proc.poll() is None, running.diagnose()
        if "demo: calibrating" in running.stderr_path.read_text():
            children = psutil.Process(running.proc.pid).children(recursive=True)
        time.sleep(0.1)  # polling the child's progress; it offers no other signal
    running.proc.send_signal(signal.SIGINT)
    assert running.proc.wait(STOP_TIMEOUT) == 130, running.diagnose()
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"left running: {alive}"
    assert "interrupted during start-up" in running.stderr_path.read_text()
    assert "gateway URL" not in running.rest_of_stdout()

"""`compare` against already-running workers (`--prefill-url/--decode-url`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from loadtest.cluster_stats import unavailable_run_stats, void_reasons
from loadtest.compare import (
    CompareError,
    CompareOptions,
    Experiment,
    configure_parser,
    options_from_args,
    parse_cluster_info,
    probe_emulator_stats,
)
from loadtest.procs import ManagedProcess, python_argv
from loadtest.report import render_markdown


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    configure_parser(p)
    return p.parse_args(list(argv))


def test_worker_url_flags_parse_like_the_gateway() -> None:
    opts = options_from_args(
        _parse(
            "--out", "/tmp/x",
            "--prefill-url", "http://127.0.0.1:30000", "8998",
            "--prefill-url", "http://127.0.0.1:30001/", "none",
            "--decode-url", "http://127.0.0.1:30010",
        )
    )  # fmt: skip
    assert opts.external
    assert opts.prefill_urls == [("http://127.0.0.1:30000", 8998), ("http://127.0.0.1:30001", None)]
    assert opts.decode_urls == ["http://127.0.0.1:30010"]
    assert (opts.prefill, opts.decode) == (2, 1)
    assert not options_from_args(_parse("--out", "/tmp/x")).external


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--prefill-url", "http://127.0.0.1:1"], "--decode-url"),
        (["--prefill-url", "http://a:1", "x", "--decode-url", "http://b:2"], "bootstrap port"),
        (["--prefill-url", "http://a:1", "--decode-url", "b:2"], "--decode-url"),
        (["--prefill-url", "http://a:1", "1", "2", "--decode-url", "http://b:2"], "--prefill-url"),
        (["--prefill-url", "http://a", "--decode-url", "http://b", "--decode", "2"], "--decode"),
    ],
)
def test_bad_worker_url_flags_name_the_field(argv: list[str], field: str) -> None:
    with pytest.raises(CompareError, match=field):
        options_from_args(_parse("--out", "/tmp/x", *argv))


@pytest.fixture
async def plain_worker() -> AsyncIterator[str]:
    """A worker with /health but without /emulator/stats, like stock SGLang."""

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def html(_: web.Request) -> web.Response:
        return web.Response(text="<html>not here</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/html/emulator/stats", html)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_worker_without_emulator_stats_yields_none_and_report_says_na(
    plain_worker: str, tmp_path: Path
) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        assert await probe_emulator_stats(session, plain_worker) is False  # 404
        assert await probe_emulator_stats(session, plain_worker + "/html") is False  # not JSON
    opts = CompareOptions(
        out=tmp_path,
        routers=["gateway:least_load"],
        prefill_urls=[(plain_worker, None)],
        decode_urls=[plain_worker],
        startup_timeout=10,
    )
    exp = Experiment(opts)
    await exp.use_external_cluster()
    assert exp.stats_available is False

    stats = unavailable_run_stats()
    assert stats.distinct_experts_per_step is None
    assert stats.mean_batch_size is None and stats.host_lag_fraction is None
    # Without host-lag figures only the CPU rule can void a run.
    assert void_reasons(stats, 50.0) == []
    assert void_reasons(stats, 99.0) != []
    run = {
        "router": "gateway:least_load",
        "rate": 2.0,
        "summary": {"completed": 5, "failed": 0, "tpot_ms": {"p50": 10.0, "p99": 12.0}},
        "cluster": stats.to_dict(),
        "cpu": {"system_percent_mean": 50.0, "process_cores": {"router": 0.1}},
        "void": False,
        "void_reasons": [],
    }
    md = render_markdown({"meta": {"external_workers": True}, "runs": [run]})
    row = next(line for line in md.splitlines() if line.startswith("| gateway:least_load |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells.count("n/a") == 3  # distinct experts, load CV, host lag
    assert "n/a (n/a)" in cells  # mean batch (steady)
    assert cells[1] == "10.0"  # measured latencies still shown
    assert "host-lag VOID rule does not apply" in md


async def test_unreachable_external_worker_is_a_clear_error(tmp_path: Path) -> None:
    from loadtest.procs import free_port

    url = f"http://127.0.0.1:{free_port()}"
    opts = CompareOptions(
        out=tmp_path, prefill_urls=[(url, None)], decode_urls=[url], startup_timeout=1
    )
    with pytest.raises(CompareError, match="not healthy"):
        await Experiment(opts).use_external_cluster()


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_compare_against_external_workers(tmp_path: Path) -> None:
    """An emulated cluster started separately stands in for a real one."""
    cluster = ManagedProcess(
        "external cluster",
        python_argv(
            "loadtest",
            [
                "cluster", "--prefill", "1", "--decode", "2", "--base-port", "0",
                "--time-scale", "2", "--no-prefill-first", "--json", "--duration-secs", "360",
            ],
        ),
        tmp_path / "cluster.log",
    )  # fmt: skip
    await cluster.start(capture_stdout=True)
    try:
        info = parse_cluster_info(await cluster.read_json_line(60))
        worker_args: list[str] = []
        for url, port in info.prefill:
            worker_args += ["--prefill-url", url, str(port) if port is not None else "none"]
        for url in info.decode:
            worker_args += ["--decode-url", url]
        out = tmp_path / "cmp"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtest", "compare", *worker_args,
            "--num-requests", "20", "--calibration-requests", "16", "--rates", "8",
            "--max-output-tokens", "8", "--no-progress",
            "--routers", "gateway:least_load", "gateway:eldr", "--out", str(out),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 330)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        await cluster.stop()
    assert proc.returncode == 0, err.decode()[-3000:]
    results = orjson.loads((out / "results.json").read_bytes())
    assert results["meta"]["external_workers"] is True
    assert results["meta"]["emulator_stats"] is True  # the emulator does serve its counters
    runs = {r["router"]: r for r in results["runs"]}
    assert set(runs) == {"gateway:least_load", "gateway:eldr"}
    for name, run in runs.items():
        assert "error" not in run, (name, run.get("error"))
        assert run["summary"]["completed"] == 20
        assert sum(run["cluster"]["requests_per_decode"]) == 20
    assert (out / "calibration" / "zones.json").is_file()
    assert not (out / "logs" / "cluster.log").exists()  # compare started no emulator
    report = (out / "report.md").read_text()
    assert "| gateway:eldr |" in report and "external" in report

"""ELDR end to end on the in-process emulated PD cluster: calibrate, fit, compare policies.

Shared by `tests/eldr_e2e/` and `benchmarks/eldr_e2e_locality.py`. Every step uses the real code:
- calibration: the load driver (`loadtest.driver.run_load`) sends the calibration split through a
  least_load gateway with `return_routed_experts: true`; `loadtest.calibration_capture` turns the
  decode results into a `zones` calibration log; `python -m zones fit` (`zones.cli.main`) fits
  one zone per decode worker and the text predictor;
- evaluation: one gateway per policy (same cluster, same prompts, same seeded Poisson arrival
  times), `/emulator/stats` snapshots before and after on every decode worker, and the gateway's
  own calibration log (sample rate 1) telling which decode worker served each request.

Requests are non-streaming `/generate` calls (the calibration log records non-streaming answers
only, and it is the gateway's own account of the decode worker it chose). Multi-turn
conversations send turn k+1 after turn k completes, with the history joined as the driver does,
so the signature cache has prefixes to learn.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from gateway.app import GatewayState
from gateway.config import PrefillSpec, Settings
from loadtest.calibration_capture import ROUTED_EXPERTS_BODY, write_calibration_log
from loadtest.cluster_stats import ClusterRunStats, decode_run_stats
from loadtest.compare import fetch_stats, zones_fit_args
from loadtest.driver import DriverConfig, arrival_offsets, run_load
from loadtest.emulator.cluster import Cluster, ClusterConfig, run_cluster
from loadtest.emulator.config import EngineOptions
from loadtest.workloads import Conversation, WorkloadSpec, build_workload, load_corpus
from tests.gateway_server import running_gateway
from zones.calibration import read_calibration
from zones.geometry import geometry_by_name


@dataclass(frozen=True)
class E2EConfig:
    prefill: int = 2
    decode: int = 4
    model: str = "Qwen3-30B-A3B"
    # Modelled GPU time x 0.1: a decode step of a few ms, so runs are short but batches form.
    time_scale: float = 0.1
    seed: int = 0
    calibration_requests: int = 120
    requests: int = 64  # evaluation conversations per run (x turns requests)
    turns: int = 2
    # Every conversation starts at once and decode batches are capped, so that every decode
    # step of either policy runs (nearly) the same batch size: distinct experts per step grows
    # with batch size, and on a busy 2-core host the batches an open-loop run forms depend on
    # host speed, which differs between runs. Comparing at equal batch size isolates locality.
    rate: float = math.inf  # conversations per second (Poisson); inf = all at t=0
    max_batch_size: int = 4
    min_prompt_chars: int = 400
    max_prompt_chars: int = 1200
    min_output_tokens: int = 24
    max_output_tokens: int = 40
    request_timeout: float = 60.0


@dataclass
class RequestResult:
    domain: str
    text: str
    status: int | None = None
    latency: float | None = None
    error: str | None = None
    output_text: str = ""


@dataclass
class RunOutcome:
    policy: str
    flow: str
    results: list[RequestResult]
    cluster: ClusterRunStats
    decode_urls: list[str]
    per_domain: dict[str, Counter[str]]  # domain -> decode worker -> requests
    unattributed: int
    metrics: dict[str, float] = field(default_factory=dict)
    # Gateway-counted in-flight decode requests per worker, averaged over samples taken every
    # 20 ms while any request was in flight (decode_urls order).
    mean_in_flight: list[float] = field(default_factory=list)

    @property
    def failures(self) -> list[RequestResult]:
        return [r for r in self.results if r.status != 200]

    def worker_totals(self) -> list[int]:
        return [sum(c.get(u, 0) for c in self.per_domain.values()) for u in self.decode_urls]


def engine_options(cfg: E2EConfig) -> EngineOptions:
    return EngineOptions(model=cfg.model, seed=cfg.seed, time_scale=cfg.time_scale,
                         max_batch_size=cfg.max_batch_size, bootstrap_timeout_secs=30.0,
                         waiting_timeout_secs=30.0, prefill_first_hold_secs=30.0)


def gateway_settings(cluster: Cluster, **kw: Any) -> Settings:
    base: dict[str, Any] = dict(
        pd_disaggregation=True,
        prefill=[PrefillSpec(w.url, w.bootstrap_port) for w in cluster.prefill],
        decode=cluster.decode_urls, prometheus_port=0, request_timeout_secs=60.0,
        health_check_interval_secs=1.0, health_check_timeout_secs=2.0,
        load_poll_interval_secs=0.5, prefill_policy="round_robin",
        retry_initial_backoff_ms=5, retry_max_backoff_ms=50)
    base.update(kw)
    return Settings(**base)


def workload(cfg: E2EConfig, split: str, num: int, turns: int) -> list[Conversation]:
    spec = WorkloadSpec(kind="task", split=split, num_conversations=num, seed=cfg.seed,
                        turns=turns, min_prompt_chars=cfg.min_prompt_chars,
                        max_prompt_chars=cfg.max_prompt_chars,
                        min_output_tokens=cfg.min_output_tokens,
                        max_output_tokens=cfg.max_output_tokens)
    return build_workload(spec, load_corpus())


async def fit_table(cfg: E2EConfig, cluster: Cluster, out_dir: Path) -> Path:
    """Calibration traffic through a least_load gateway, then `zones fit` on what it returned."""
    from zones.cli import main as zones_main

    log = out_dir / "calibration.jsonl"
    table = out_dir / "zones.json"
    log.unlink(missing_ok=True)  # write_calibration appends
    convs = workload(cfg, "calibration", cfg.calibration_requests + 1, 1)
    settings = gateway_settings(cluster, decode_policy="least_load")
    async with running_gateway(settings) as (url, _state):
        config = DriverConfig(url=url, concurrency=8 * cfg.decode,
                              num_requests=cfg.calibration_requests, warmup=1,
                              request_timeout=cfg.request_timeout, seed=cfg.seed,
                              progress=False, extra_body=dict(ROUTED_EXPERTS_BODY))
        result = await run_load(config, convs)
    stats = write_calibration_log(result.records, geometry_by_name(cfg.model), log)
    if stats.records < cfg.calibration_requests // 2:
        raise AssertionError(f"calibration captured too little: {stats}")
    args = zones_fit_args(log, cluster.decode_urls, table, cfg.model, cfg.seed)
    code = await asyncio.to_thread(zones_main, args)
    if code != 0 or not table.is_file():
        raise AssertionError(f"zones fit exited with {code}")
    return table


async def _send(session: aiohttp.ClientSession, url: str, text: str, max_tokens: int,
                result: RequestResult, timeout: float) -> None:
    body = {"text": text, "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0.0,
                                              "ignore_eos": True}}
    started = time.perf_counter()
    try:
        async with session.post(url + "/generate", data=orjson.dumps(body),
                                headers={"Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            raw = await r.read()
            result.status = r.status
            if r.status == 200:
                result.output_text = str(orjson.loads(raw).get("text", ""))
            else:
                result.error = raw[:300].decode(errors="replace")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency = time.perf_counter() - started


async def send_workload(url: str, convs: Sequence[Conversation], offsets: Sequence[float],
                        timeout: float) -> list[RequestResult]:
    """Open loop: conversation i starts at offsets[i]; its turns run back to back."""
    results: list[RequestResult] = []
    zero = time.perf_counter()

    async def conversation(session: aiohttp.ClientSession, conv: Conversation,
                           at: float) -> None:
        await asyncio.sleep(max(0.0, zero + at - time.perf_counter()))
        text = ""
        for turn in conv.turns:
            # The next prompt continues the previous prompt + answer verbatim (a completion-style
            # conversation), so it starts with the sequence the gateway learned from the answer.
            text = f"{text}\n\n{turn.text}" if text else turn.text
            res = RequestResult(conv.domain, text)
            results.append(res)
            await _send(session, url, text, turn.max_tokens, res, timeout)
            if res.status != 200:
                return
            text += res.output_text

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(conversation(session, c, t)
                               for c, t in zip(convs, offsets, strict=True)))
    return results


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _sample(state: GatewayState, name: str, labels: dict[str, str]) -> float:
    return float(state.registry.get_sample_value(name, labels) or 0.0)


async def run_policy(cfg: E2EConfig, cluster: Cluster, table: Path, policy: str, flow: str,
                     convs: Sequence[Conversation], out_dir: Path) -> RunOutcome:
    """One gateway, one policy, the given conversations at seeded arrival times."""
    log = out_dir / f"decisions-{policy}-{flow}.jsonl"
    log.unlink(missing_ok=True)
    offsets = arrival_offsets(len(convs), cfg.rate, cfg.seed)
    settings = gateway_settings(cluster, decode_policy=policy, pd_flow=flow, zones=str(table),
                                calibration_log=str(log), calibration_sample_rate=1.0)
    expected = sum(len(c.turns) for c in convs)
    async with aiohttp.ClientSession() as stats_session:
        before = await fetch_stats(stats_session, cluster.decode_urls)
        async with running_gateway(settings) as (url, state):
            rows: list[list[int]] = []
            sampler = asyncio.ensure_future(sample_in_flight(state, cluster.decode_urls, rows))
            try:
                results = await send_workload(url, convs, offsets, cfg.request_timeout)
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            metrics = {f"resolutions_{src}": _sample(state, "eldr_signature_resolutions_total",
                                                     {"source": src})
                       for src in ("prefill", "cache", "predictor", "none")}
            for res in ("hit", "partial", "miss"):
                metrics[f"cache_{res}"] = _sample(
                    state, "eldr_signature_cache_lookups_total", {"result": res})
        ok = sum(1 for r in results if r.status == 200)

        async def finished() -> bool:
            after = await fetch_stats(stats_session, cluster.decode_urls)
            done = decode_run_stats(before, after).requests_per_decode
            return sum(done) >= ok

        # The decode worker counts a request finished after the last token left it; wait for
        # the counters rather than assuming they are already there.
        await wait_until(finished, 10.0, "decode counters to cover every answered request")
        after = await fetch_stats(stats_session, cluster.decode_urls)
    assert len(results) == expected
    domain_of = {r.text: r.domain for r in results}
    per_domain: dict[str, Counter[str]] = defaultdict(Counter)
    unattributed = 0
    for rec in read_calibration(log) if log.is_file() else []:
        domain = domain_of.get(rec.text or "")
        if domain is None or rec.decode_worker is None:
            unattributed += 1
            continue
        per_domain[domain][rec.decode_worker] += 1
    return RunOutcome(policy, flow, results, decode_run_stats(before, after),
                      list(cluster.decode_urls), dict(per_domain), unattributed, metrics,
                      column_means(rows))


async def sample_in_flight(state: GatewayState, urls: Sequence[str],
                           rows: list[list[int]]) -> None:
    """Append the gateway's in-flight decode counts (urls order) every 20 ms until cancelled;
    samples where nothing is in flight are skipped (they say nothing about balance)."""
    by_url = {w.url.rstrip("/"): w for w in state.workers.by_role("decode")}
    workers = [by_url[u.rstrip("/")] for u in urls]
    while True:
        counts = [w.in_flight for w in workers]
        if any(counts):
            rows.append(counts)
        await asyncio.sleep(0.02)


def column_means(rows: Sequence[Sequence[int]]) -> list[float]:
    return [float(x) for x in np.asarray(rows, dtype=float).mean(axis=0)] if rows else []


# ---------------------------------------------------------------- locality statistics
def majority_share(counts: Counter[str]) -> float:
    total = sum(counts.values())
    return max(counts.values()) / total if total else 0.0


def mean_majority_share(per_domain: dict[str, Counter[str]]) -> float:
    """Request-weighted mean over domains of the share of the domain's most used worker."""
    total = sum(sum(c.values()) for c in per_domain.values())
    return sum(max(c.values()) for c in per_domain.values()) / total if total else 0.0


def chance_majority_share(domain_sizes: Sequence[int], workers: int, quantile: float,
                          trials: int = 20000, seed: int = 0) -> float:
    """`quantile` of `mean_majority_share` when every request picks a worker uniformly at random.

    The null hypothesis "worker choice ignores the domain" gives this distribution; a routing
    whose share exceeds its 99.9th percentile concentrates domains beyond chance.
    """
    rng = np.random.default_rng(seed)
    total = sum(domain_sizes)
    acc = np.zeros(trials)
    for n in domain_sizes:
        draws = rng.integers(0, workers, size=(trials, n))
        counts = np.stack([(draws == w).sum(axis=1) for w in range(workers)], axis=1)
        acc += counts.max(axis=1)
    return float(np.quantile(acc / total, quantile))


def batch_adjusted_distinct(distinct: float, batch: float, at_batch: float,
                            num_experts: int) -> float:
    """`distinct` experts per layer per step seen at mean batch `batch`, moved to `at_batch`.

    Model: a domain-blind router's batch members are independent draws, each touching a given
    expert of a layer with the same probability q, so a batch of b touches E(1 - (1-q)^b)
    distinct experts; q is solved from the measured (batch, distinct) pair. Used to compare two
    policies whose mean batches differ a little: distinct experts grow with batch size, so a
    policy with smaller batches would otherwise look more local than it is (and one with larger
    batches less). Evaluating at the mean batch ignores the batch-size spread (Jensen); both
    runs have nearly the same spread, so that bias mostly cancels.
    """
    if not 0 < distinct < num_experts or batch <= 0 or at_batch <= 0:
        raise ValueError(f"need 0 < distinct < {num_experts} and positive batches, got "
                         f"{distinct}, {batch}, {at_batch}")
    miss_one = (1.0 - distinct / num_experts) ** (1.0 / batch)  # (1 - q)
    return num_experts * (1.0 - miss_one ** at_batch)


def format_outcome(o: RunOutcome) -> str:
    lines = [f"policy={o.policy} flow={o.flow} requests={len(o.results)} "
             f"failed={len(o.failures)} unattributed={o.unattributed}"]
    short = [u.rsplit(":", 1)[-1] for u in o.decode_urls]
    lines.append("  domain        " + " ".join(f"{s:>6}" for s in short) + "  majority")
    for domain in sorted(o.per_domain):
        c = o.per_domain[domain]
        lines.append(f"  {domain:<13} " + " ".join(f"{c.get(u, 0):>6}" for u in o.decode_urls)
                     + f"  {majority_share(c):.2f}")
    lines.append("  total         " + " ".join(f"{t:>6}" for t in o.worker_totals())
                 + f"  mean {mean_majority_share(o.per_domain):.2f}")
    if o.mean_in_flight:
        lines.append("  in flight     " + " ".join(f"{x:>6.2f}" for x in o.mean_in_flight)
                     + "  (time average)")
    s = o.cluster
    lines.append(f"  decode steps {s.decode_steps:.0f}, mean batch {_fmt(s.mean_batch_size)}, "
                 f"distinct experts/step {_fmt(s.distinct_experts_per_step)}, "
                 f"host lag {_fmt(s.host_lag_fraction)}")
    if o.metrics:
        lines.append("  " + ", ".join(f"{k}={v:g}" for k, v in o.metrics.items()))
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


async def locality_experiment(cfg: E2EConfig, out_dir: Path, flows: Sequence[str],
                              policies: Sequence[str] = ("least_load", "eldr"),
                              ) -> dict[tuple[str, str], RunOutcome]:
    """Calibrate once, then every (flow, policy) on identical conversations and arrivals."""
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes: dict[tuple[str, str], RunOutcome] = {}
    async with run_cluster(ClusterConfig(prefill=cfg.prefill, decode=cfg.decode,
                                         engine=engine_options(cfg))) as cluster:
        table = await fit_table(cfg, cluster, out_dir)
        convs = workload(cfg, "evaluation", cfg.requests, cfg.turns)
        for flow in flows:
            for policy in policies:
                outcomes[(flow, policy)] = await run_policy(cfg, cluster, table, policy, flow,
                                                            convs, out_dir)
    return outcomes


def with_overrides(cfg: E2EConfig, **kw: Any) -> E2EConfig:
    return replace(cfg, **kw)

"""Load driver: stream requests at a router URL and record TTFT, TPOT, ITL and latency.

`python -m loadtest run --url URL --workload task --rate R --num-requests N --out DIR` works
against any SGLang-compatible endpoint (our gateway, SGLang's router, a single SGLang server, the
emulator). Open loop: Poisson arrivals at `--rate` (seeded, so every router under comparison sees
the identical arrival sequence); closed loop: `--concurrency C` clients back to back.

Metric definitions are `sglang.benchmark.serving`'s (see `loadtest/timings.py`). Warm-up
requests run before measurement and are excluded. Every run is bounded: at most `num_requests`
measured requests, no new request after `--max-duration`, and each request cut off after
`--request-timeout`.

Outputs in `--out`: `requests.jsonl` (one record per measured request), `summary.json` and
`summary.csv` (one row: counts, throughput, mean/p50/p90/p99 of TTFT, TPOT, ITL, E2E in ms).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import math
import sys
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
from aiohttp.http_exceptions import HttpProcessingError

from loadtest.timings import Distribution, StreamEvent, timing_from_events
from loadtest.workloads import (
    KINDS,
    Conversation,
    WorkloadError,
    add_workload_arguments,
    workload_from_args,
)

ENDPOINTS = {
    "generate": "/generate",
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
}
ERROR_TEXT_LIMIT = 300
MAX_SSE_LINE_BYTES = 256 * 1024 * 1024


class DriverError(ValueError):
    """Bad driver configuration; the message names the flag."""


@dataclass(frozen=True, slots=True)
class DriverConfig:
    url: str
    endpoint: str = "generate"
    model: str = "default"
    rate: float = math.inf  # requests (conversations) per second, open loop
    concurrency: int | None = None  # closed loop when set
    num_requests: int = 100
    warmup: int = 2
    max_duration: float = 600.0
    request_timeout: float = 300.0
    seed: int = 0
    progress: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    # More routers (gateway replicas) beside `url`: each conversation goes to one of them, as
    # a Kubernetes Service sends each client connection to one replica (see `url_for`).
    replica_urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for u in (self.url, *self.replica_urls):
            if not u.startswith(("http://", "https://")):
                raise DriverError(f"--url must start with http:// or https://, got {u!r}")
        if self.endpoint not in ENDPOINTS:
            raise DriverError(f"--endpoint must be one of {', '.join(ENDPOINTS)}")
        if not (self.rate > 0):
            raise DriverError(f"--rate must be > 0 (inf allowed), got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise DriverError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.num_requests < 1:
            raise DriverError(f"--num-requests must be >= 1, got {self.num_requests}")
        if self.warmup < 0:
            raise DriverError(f"--warmup must be >= 0, got {self.warmup}")
        if not (self.max_duration > 0 and self.request_timeout > 0):
            raise DriverError("--max-duration and --request-timeout must be > 0")


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    conversation_id: str
    turn: int
    domain: str
    doc_id: str
    trace_index: int | None
    scheduled_s: float  # planned send time, seconds since the measured phase began
    sent_s: float  # actual send time, same clock
    prompt_chars: int
    max_tokens: int
    success: bool = False
    error: str | None = None
    status: int | None = None
    ttft: float | None = None
    latency: float | None = None
    tpot: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    itl: list[float] = field(default_factory=list)
    # Kept in memory for multi-turn and calibration capture, not written to requests.jsonl.
    output_text: str = field(default="", repr=False)
    prompt_text: str = field(default="", repr=False)
    routed_experts: str | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("output_text", "prompt_text", "routed_experts"):
            d.pop(key)
        return d


def url_for(config: DriverConfig, conversation_id: str) -> str:
    """The router a conversation talks to: `config.url`, or with replicas one chosen by a CRC of
    the conversation id. Stable (every turn of a conversation and every router under test
    sees the same split) and even in expectation, like a Service balancing client connections;
    a multi-turn conversation stays on its replica as a keep-alive connection would."""
    if not config.replica_urls:
        return config.url
    urls = (config.url, *config.replica_urls)
    return urls[zlib.crc32(conversation_id.encode()) % len(urls)]


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Open-loop send times: the first at 0, then exponential gaps of mean 1/rate (Poisson).

    Seeded with its own generator so the sequence depends only on (n, rate, seed), never on the
    workload or on anything else that consumed random numbers.
    """
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def build_payload(
    endpoint: str, model: str, history: Sequence[str], max_tokens: int, extra: dict[str, Any]
) -> dict[str, Any]:
    """Request body for one turn. `history` alternates user, assistant, ..., user texts.

    Output lengths are pinned with `ignore_eos` as `sglang.bench_serving` does by default, so
    every router is compared on the same number of decode steps.
    """
    if endpoint == "generate":
        body: dict[str, Any] = {
            "text": "\n\n".join(history),
            "sampling_params": {
                "max_new_tokens": max_tokens,
                "temperature": 0.0,
                "ignore_eos": True,
            },
            "stream": True,
        }
    elif endpoint == "chat":
        roles = ("user", "assistant")
        body = {
            "model": model,
            "messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(history)],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    else:
        body = {
            "model": model,
            "prompt": "\n\n".join(history),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    body.update(extra)
    return body


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    text: str  # new output text in this chunk
    cumulative_text: bool  # `/generate` streams the whole text so far
    tokens_total: int | None
    prompt_tokens: int | None
    error: str | None = None
    routed_experts: str | None = None  # SGLang's base64 rows, when the request asked for them


def parse_sse_data(endpoint: str, payload: bytes) -> ChunkInfo | None:
    """Interpret one SSE `data:` payload; None for `[DONE]`. Raises ValueError on bad JSON."""
    if payload == b"[DONE]":
        return None
    data = orjson.loads(payload)
    if not isinstance(data, dict):
        raise ValueError("stream chunk is not a JSON object")
    if "error" in data:
        err = data["error"]
        msg = err.get("message", err) if isinstance(err, dict) else err
        return ChunkInfo("", False, None, None, error=str(msg)[:ERROR_TEXT_LIMIT])
    usage = data.get("usage") or {}
    if endpoint == "generate":
        meta = data.get("meta_info") or {}
        return ChunkInfo(
            text=data.get("text") or "",
            cumulative_text=True,
            tokens_total=meta.get("completion_tokens"),
            prompt_tokens=meta.get("prompt_tokens"),
            routed_experts=meta.get("routed_experts"),
        )
    choices = data.get("choices") or []
    text = ""
    if choices:
        c0 = choices[0]
        if endpoint == "chat":
            delta = c0.get("delta") or c0.get("message") or {}  # message: non-streaming
            # bench_serving counts reasoning text like content (`_combine_openai_chat_content`).
            text = (delta.get("reasoning_content") or "") + (delta.get("content") or "")
        else:
            text = c0.get("text") or ""
    # OpenAI endpoints carry SGLang extras under `sglext` (sglang 0.5.23 serving_chat.py).
    sglext = data.get("sglext") or (choices[0].get("sglext") if choices else None) or {}
    return ChunkInfo(
        text=text,
        cumulative_text=False,
        tokens_total=usage.get("completion_tokens"),
        prompt_tokens=usage.get("prompt_tokens"),
        routed_experts=sglext.get("routed_experts") if isinstance(sglext, dict) else None,
    )


async def _one_line(line: bytes) -> AsyncIterator[bytes]:
    yield line


async def sse_lines(
    stream: aiohttp.StreamReader, max_line: int = MAX_SSE_LINE_BYTES
) -> AsyncIterator[bytes]:
    """Lines of a response body without aiohttp's 512 KiB line cap.

    A final chunk carrying `routed_experts` holds base64 of int32 `[tokens, layers, top_k]`
    rows (Qwen3-30B-A3B: 1.5 KiB per token), which passes 512 KiB for prompts of a few hundred
    tokens. Lines are still capped, at `max_line`, so a broken server cannot exhaust memory.
    """
    buf = bytearray()
    async for chunk in stream.iter_any():
        buf += chunk
        while (nl := buf.find(b"\n")) >= 0:
            yield bytes(buf[: nl + 1])
            del buf[: nl + 1]
        if len(buf) > max_line:
            raise ValueError(f"stream line longer than {max_line} bytes")
    if buf:
        yield bytes(buf)


async def send_request(
    session: aiohttp.ClientSession,
    config: DriverConfig,
    record: RequestRecord,
    history: Sequence[str],
    clock_zero: float,
) -> RequestRecord:
    """Send one streaming request and fill `record`. Never raises (errors land in the record)."""
    url = url_for(config, record.conversation_id).rstrip("/") + ENDPOINTS[config.endpoint]
    body = build_payload(
        config.endpoint, config.model, history, record.max_tokens, config.extra_body
    )
    events: list[StreamEvent] = []
    text = ""
    record.prompt_text = "\n\n".join(history)
    start = time.perf_counter()
    record.sent_s = start - clock_zero
    try:
        timeout = aiohttp.ClientTimeout(total=config.request_timeout)
        async with session.post(
            url,
            data=orjson.dumps(body),
            timeout=timeout,
            headers={"Content-Type": "application/json"},
        ) as resp:
            record.status = resp.status
            if resp.status != 200:
                detail = (await resp.text())[:ERROR_TEXT_LIMIT]
                record.error = f"HTTP {resp.status}: {detail}"
                return record
            if resp.content_type == "application/json":
                # A non-streaming answer (the request asked for `"stream": false`, e.g. so the
                # gateway's calibration log samples it): one chunk, all text at once.
                lines: AsyncIterator[bytes] = _one_line(b"data: " + await resp.read())
            else:
                lines = sse_lines(resp.content)
            async for raw_line in lines:
                line = raw_line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, `event:` lines
                now = time.perf_counter() - start
                info = parse_sse_data(config.endpoint, line[5:].strip())
                if info is None:
                    events.append(StreamEvent(now, has_text=False))
                    continue
                if info.error is not None:
                    record.error = f"stream error: {info.error}"
                    return record
                if info.prompt_tokens is not None:
                    record.prompt_tokens = info.prompt_tokens
                if isinstance(info.routed_experts, str):
                    record.routed_experts = info.routed_experts
                new_text = info.text
                if info.cumulative_text:
                    new_text = info.text[len(text) :] if info.text.startswith(text) else info.text
                    text = info.text
                else:
                    text += new_text
                events.append(StreamEvent(now, bool(new_text), info.tokens_total))
    except asyncio.TimeoutError:
        record.error = f"timeout after {config.request_timeout}s"
        return record
    except (aiohttp.ClientError, HttpProcessingError, ValueError, OSError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_LIMIT]
        return record
    timing = timing_from_events(events)
    if timing.ttft is None:
        record.error = "stream ended without output text"
        return record
    record.success = True
    record.ttft = timing.ttft
    record.latency = timing.latency
    record.output_tokens = timing.output_tokens
    record.tpot = timing.tpot
    record.itl = list(timing.itl)
    record.output_text = text
    return record


@dataclass(slots=True)
class RunResult:
    records: list[RequestRecord]
    duration_s: float
    warmup_errors: int
    config: DriverConfig

    def summary(self) -> dict[str, Any]:
        return summarize(self.records, self.duration_s, self.config)


async def _run_conversation(
    session: aiohttp.ClientSession,
    config: DriverConfig,
    conv: Conversation,
    scheduled: float,
    clock_zero: float,
    out: list[RequestRecord],
    deadline: float,
    on_done: Any,
) -> None:
    history: list[str] = []
    for k, turn in enumerate(conv.turns):
        if k and time.perf_counter() >= deadline:
            return  # no new turn after the run's duration bound
        history.append(turn.text)
        rec = RequestRecord(
            request_id=f"{conv.conversation_id}/{k}",
            conversation_id=conv.conversation_id,
            turn=k,
            domain=conv.domain,
            doc_id=conv.doc_id,
            trace_index=conv.trace_index,
            scheduled_s=scheduled,
            sent_s=0.0,
            prompt_chars=sum(len(h) for h in history),
            max_tokens=turn.max_tokens,
        )
        out.append(rec)
        await send_request(session, config, rec, history, clock_zero)
        on_done()
        if not rec.success:
            return  # a conversation cannot continue without the previous answer
        history.append(rec.output_text)
        scheduled = time.perf_counter() - clock_zero


async def run_load(
    config: DriverConfig,
    conversations: Sequence[Conversation],
    on_measure_start: Callable[[], Awaitable[None]] | None = None,
) -> RunResult:
    """Warm up, then drive the measured conversations; returns every measured request.

    `on_measure_start` runs between warm-up and measurement (experiments snapshot server
    counters there, so warm-up traffic is excluded from them too).
    """
    from tqdm import tqdm

    if len(conversations) < config.warmup + 1:
        raise DriverError(
            f"workload has {len(conversations)} conversations; need --warmup ({config.warmup}) + 1"
        )
    warm = conversations[: config.warmup]
    measured = conversations[config.warmup : config.warmup + config.num_requests]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        warm_records: list[RequestRecord] = []
        zero = time.perf_counter()
        warm_deadline = zero + config.request_timeout
        await asyncio.gather(
            *(
                _run_conversation(
                    session,
                    config,
                    Conversation(
                        c.conversation_id,
                        c.kind,
                        c.domain,
                        c.doc_id,
                        c.split,
                        c.turns[:1],
                        c.trace_index,
                    ),
                    0.0,
                    zero,
                    warm_records,
                    warm_deadline,
                    lambda: None,
                )
                for c in warm
            )
        )
        warmup_errors = sum(1 for r in warm_records if not r.success)
        if on_measure_start is not None:
            await on_measure_start()

        records: list[RequestRecord] = []
        total_requests = sum(len(c.turns) for c in measured)
        bar = tqdm(
            total=total_requests,
            disable=not config.progress,
            unit="req",
            desc=f"rate={config.rate:g}"
            if config.concurrency is None
            else f"concurrency={config.concurrency}",
            file=sys.stderr,
        )
        clock_zero = time.perf_counter()
        stop_new = clock_zero + config.max_duration
        hard_deadline = stop_new + config.request_timeout
        tasks: list[asyncio.Task[None]] = []
        try:
            if config.concurrency is None:
                offsets = arrival_offsets(len(measured), config.rate, config.seed)
                for conv, offset in zip(measured, offsets, strict=False):
                    delay = clock_zero + offset - time.perf_counter()
                    if clock_zero + offset >= stop_new:
                        break
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(
                        asyncio.create_task(
                            _run_conversation(
                                session,
                                config,
                                conv,
                                offset,
                                clock_zero,
                                records,
                                stop_new,
                                bar.update,
                            )
                        )
                    )
            else:
                queue = iter(measured)

                async def client() -> None:
                    for conv in queue:
                        if time.perf_counter() >= stop_new:
                            return
                        await _run_conversation(
                            session,
                            config,
                            conv,
                            time.perf_counter() - clock_zero,
                            clock_zero,
                            records,
                            stop_new,
                            bar.update,
                        )

                tasks = [asyncio.create_task(client()) for _ in range(config.concurrency)]
            if tasks:
                remaining = max(0.0, hard_deadline - time.perf_counter())
                _, pending = await asyncio.wait(tasks, timeout=remaining)
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            # A cancelled run (Ctrl-C, a caller's timeout) must not leave client tasks running
            # against a session that is about to close.
            unfinished = [t for t in tasks if not t.done()]
            for t in unfinished:
                t.cancel()
            if unfinished:
                await asyncio.gather(*unfinished, return_exceptions=True)
            bar.close()
        for rec in records:
            if not rec.success and rec.error is None:
                rec.error = "cancelled at the run's deadline"
        duration = time.perf_counter() - clock_zero
    return RunResult(
        records=records, duration_s=duration, warmup_errors=warmup_errors, config=config
    )


def summarize(
    records: Sequence[RequestRecord], duration_s: float, config: DriverConfig | None = None
) -> dict[str, Any]:
    ok = [r for r in records if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    dists = {
        "ttft_ms": Distribution.of(r.ttft for r in ok if r.ttft is not None),
        "tpot_ms": Distribution.of(r.tpot for r in ok if r.tpot is not None),
        "itl_ms": Distribution.of(x for r in ok for x in r.itl),
        "e2e_ms": Distribution.of(r.latency for r in ok if r.latency is not None),
    }
    errors: dict[str, int] = {}
    for r in records:
        if not r.success:
            key = (r.error or "unknown").split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    summary: dict[str, Any] = {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": errors,
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else None,
        "output_throughput": out_tokens / duration_s if duration_s > 0 else None,
        "output_tokens": out_tokens,
    }
    for name, dist in dists.items():
        summary[name] = asdict(dist.scaled(1000.0))
    if config is not None:
        summary["config"] = {k: v for k, v in asdict(config).items() if k != "extra_body"}
    return summary


def flat_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """One CSV row: scalars as they are, distributions as `ttft_ms_p50` and so on."""
    row: dict[str, Any] = {}
    for key, value in summary.items():
        if key in ("errors", "config"):
            continue
        if isinstance(value, dict):
            for stat in ("count", "mean", "p50", "p90", "p99", "max"):
                row[f"{key}_{stat}"] = value.get(stat)
        else:
            row[key] = value
    return row


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_run(result: RunResult, out_dir: Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "requests.jsonl").write_bytes(
        b"".join(orjson.dumps(r.to_json()) + b"\n" for r in result.records)
    )
    summary = result.summary()
    summary["warmup_errors"] = result.warmup_errors
    (out_dir / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    write_csv([flat_summary(summary)], out_dir / "summary.csv")
    return summary


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Drive streaming load at a router URL and record TTFT/TPOT/ITL."
    parser.add_argument("--url", required=True, help="router or server base URL")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="generate")
    parser.add_argument("--model", default="default", help="model name for OpenAI endpoints")
    parser.add_argument(
        "--workload",
        default="task",
        help=f"one of {', '.join(KINDS)} (built from the corpus) or a workload .jsonl file",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=math.inf,
        help="open-loop Poisson arrivals per second (inf: all at once)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="closed loop with this many clients instead of --rate",
    )
    parser.add_argument(
        "--num-requests",
        type=int,
        default=100,
        help="measured conversations (requests when --turns 1)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="excluded warm-up requests")
    parser.add_argument(
        "--max-duration", type=float, default=600.0, help="no new requests after this many seconds"
    )
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument(
        "--extra-body", default=None, help="JSON object merged into every request body"
    )
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--no-progress", action="store_true")
    add_workload_arguments(parser)


def config_from_args(args: argparse.Namespace) -> DriverConfig:
    extra: dict[str, Any] = {}
    if args.extra_body:
        try:
            extra = orjson.loads(args.extra_body)
        except orjson.JSONDecodeError as exc:
            raise DriverError(f"--extra-body is not valid JSON: {exc}") from exc
        if not isinstance(extra, dict):
            raise DriverError("--extra-body must be a JSON object")
    return DriverConfig(
        url=args.url,
        endpoint=args.endpoint,
        model=args.model,
        rate=args.rate,
        concurrency=args.concurrency,
        num_requests=args.num_requests,
        warmup=args.warmup,
        max_duration=args.max_duration,
        request_timeout=args.request_timeout,
        seed=args.seed,
        progress=not args.no_progress,
        extra_body=extra,
    )


def main(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        convs = workload_from_args(args, args.workload, config.warmup + config.num_requests)
        result = asyncio.run(run_load(config, convs))
    except (DriverError, WorkloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = write_run(result, args.out) if args.out is not None else result.summary()
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    return 0 if summary["completed"] else 1

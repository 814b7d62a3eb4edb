"""Prepend the prefill's input logprobs to the decode's (sgl-router `http/pd_router.rs`
`merge_logprobs_in_json`).

In PD mode the prefill computes the prompt's logprobs, so a client asking `return_logprob` with
`logprob_start_len` inside the prompt gets them only if the router merges
`meta_info.input_token_logprobs` (prefill first, then decode). Batched `/generate` answers are JSON
arrays; they are merged element-wise. Streaming answers are merged per SSE `data:` chunk.
"""

from __future__ import annotations

from typing import Any

import orjson


def merge_logprobs(prefill: Any, decode: Any) -> bool:
    """Merge in place; True when anything was merged."""
    if isinstance(prefill, list) and isinstance(decode, list):
        merged = False
        for p, d in zip(prefill, decode, strict=False):
            merged |= merge_logprobs(p, d)
        return merged
    if not isinstance(prefill, dict) or not isinstance(decode, dict):
        return False
    p_meta, d_meta = prefill.get("meta_info"), decode.get("meta_info")
    if not isinstance(p_meta, dict) or not isinstance(d_meta, dict):
        return False
    p_lp, d_lp = p_meta.get("input_token_logprobs"), d_meta.get("input_token_logprobs")
    if isinstance(p_lp, list) and isinstance(d_lp, list):
        d_meta["input_token_logprobs"] = p_lp + d_lp
        return True
    return False


def prefill_logprobs_from_stream(body: bytes) -> Any:
    """The last `data:` JSON object of a prefill SSE stream (it carries the input logprobs)."""
    last: Any = None
    for line in body.splitlines():
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if payload and payload != b"[DONE]":
                try:
                    last = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    continue
    return last


def merge_sse_line(prefill: Any, line: bytes) -> bytes:
    """Merge one SSE line; lines that are not mergeable JSON data pass through unchanged."""
    if prefill is None or not line.startswith(b"data:"):
        return line
    payload = line[5:].strip()
    if not payload or payload == b"[DONE]":
        return line
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return line
    if not merge_logprobs(prefill, chunk):
        return line
    ending = b"\n" if line.endswith(b"\n") else b""
    return b"data: " + orjson.dumps(chunk) + ending

"""Bootstrap field injection for PD dispatch (sgl-router `routers/bootstrap_injector.rs`).

The prefill and the decode get the same body plus `bootstrap_host` (the prefill URL's host),
`bootstrap_port` (the prefill worker's configured bootstrap port, or null) and `bootstrap_room`
(uniform in [0, 2^63 - 1], matching SGLang's `random.randint(0, 2**63 - 1)`). Batched requests get
arrays of equal length: chat/completions `n > 1`, completions `prompt` arrays, generate `text`
arrays and `input_ids` lists of lists. The batch is detected in that order, as in the Rust
injector. IPv6 hosts are bracketed so SGLang can append `:port` when it builds the bootstrap
address (an unbracketed `::1:8998` is ambiguous).
"""

from __future__ import annotations

import functools
import random
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import BadRequestError

MAX_ROOM = 2**63 - 1
# Upper bound on sequences per request. Bootstrap arrays are built per sequence, so an unbounded
# `n` (e.g. 10**9 from a fuzzer) would make the gateway allocate gigabytes before any worker saw
# the request. 1024 is far above any practical n or batch.
MAX_BATCH = 1024


@functools.lru_cache(maxsize=1024)  # a handful of prefill URLs, parsed on every request
def bootstrap_host(url: str) -> str:
    host = urlsplit(url).hostname or ""
    return f"[{host}]" if ":" in host else host


def batch_size(body: dict[str, Any]) -> int | None:
    """Number of sequences in a batched request, None for a single request."""
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        if n > MAX_BATCH:
            raise BadRequestError(f"n: must be <= {MAX_BATCH}, got {n}")
        return n
    for key in ("prompt", "text"):
        value = body.get(key)
        if isinstance(value, list):
            # A completions prompt may also be ONE tokenised prompt (a list of ints): that is a
            # single request, as SGLang's OpenAI adapter treats it.
            if key == "prompt" and value and all(isinstance(v, int) for v in value):
                return None
            if not value:
                raise BadRequestError(f"{key}: batch array is empty")
            if len(value) > MAX_BATCH:
                raise BadRequestError(f"{key}: batch of {len(value)} exceeds {MAX_BATCH}")
            return len(value)
    ids = body.get("input_ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        if len(ids) > MAX_BATCH:
            raise BadRequestError(f"input_ids: batch of {len(ids)} exceeds {MAX_BATCH}")
        return len(ids)
    if isinstance(ids, list) and not ids:
        raise BadRequestError("input_ids: batch array is empty")
    return None


def new_rooms(count: int | None, rng: random.Random) -> int | list[int]:
    if count is None:
        return rng.randint(0, MAX_ROOM)
    return [rng.randint(0, MAX_ROOM) for _ in range(count)]


def inject(body: dict[str, Any], prefill_url: str, port: int | None,
           room: int | list[int]) -> dict[str, Any]:
    """Return a shallow copy of `body` with the three bootstrap fields set."""
    out = dict(body)
    host = bootstrap_host(prefill_url)
    if isinstance(room, list):
        out["bootstrap_host"] = [host] * len(room)
        out["bootstrap_port"] = [port] * len(room)
    else:
        out["bootstrap_host"] = host
        out["bootstrap_port"] = port
    out["bootstrap_room"] = room
    return out

"""Parse and validate a `/generate` body into one `GenerateItem` per prompt (pure, no I/O).

Field names and defaults follow sglang 0.5.23 `srt/managers/io_struct.py` `GenerateReqInput`
(`normalize_batch_and_arguments`: a scalar `bootstrap_room` on a batch becomes `room + i`) and
`srt/sampling/sampling_params.py` (`max_new_tokens` defaults to 128). Fields the emulator has no
use for (temperature, top_p, stop strings, ...) are accepted and ignored, as a real engine would
accept them. Every rejection raises `RequestError` naming the field.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

# sglang 0.5.23 `srt/sampling/sampling_params.py` SamplingParams.__init__: max_new_tokens=128.
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_PREFILL_FIRST_HOLD_SECS = 30.0


class RequestError(ValueError):
    """The request body is invalid; the message names the offending field."""


@dataclass(frozen=True)
class GenerateItem:
    """One prompt of a (possibly batched) generate request."""

    rid: str
    text: str | None
    input_ids: tuple[int, ...] | None
    max_new_tokens: int
    ignore_eos: bool
    stream: bool
    return_logprob: bool
    return_routed_experts: bool
    routed_experts_start_len: int
    bootstrap_host: str | None
    bootstrap_port: int | None
    bootstrap_room: int | None
    prefill_first: bool
    prefill_first_hold_secs: float | None
    # DP routing (io_struct.py GenerateReqInput): the rank a router assigned, and on a PD
    # decode the prefill's rank that holds the KV. One value for the whole batch, as SGLang
    # copies the scalar to every item (GenerateReqInput.__getitem__).
    routed_dp_rank: int | None = None
    disagg_prefill_dp_rank: int | None = None


def parse_generate(body: Any) -> tuple[list[GenerateItem], bool]:
    """Return the items and whether the request was a batch (list-valued prompt)."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    text = body.get("text")
    input_ids = body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise RequestError("exactly one of 'text' or 'input_ids' must be given")
    prompts: list[tuple[str | None, tuple[int, ...] | None]]
    if text is not None:
        if isinstance(text, str):
            prompts, batched = [(text, None)], False
        elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            prompts, batched = [(t, None) for t in text], True
        else:
            raise RequestError("'text' must be a string or a non-empty list of strings")
    else:
        if _is_id_list(input_ids):
            prompts, batched = [(None, tuple(input_ids or ()))], False
        elif (isinstance(input_ids, list) and input_ids
              and all(_is_id_list(x) for x in input_ids)):
            prompts, batched = [(None, tuple(x)) for x in input_ids], True
        else:
            raise RequestError(
                "'input_ids' must be a non-empty list of non-negative integers or a list of them")
    n = len(prompts)
    sampling = _per_item(body.get("sampling_params"), n, "sampling_params", dict, {})
    rids = _per_item(body.get("rid"), n, "rid", str, None)
    hosts = _per_item(body.get("bootstrap_host"), n, "bootstrap_host", str, None)
    ports = _per_item(body.get("bootstrap_port"), n, "bootstrap_port", int, None)
    rooms = _rooms(body.get("bootstrap_room"), n)
    stream = _bool(body, "stream")
    if stream and batched:
        raise RequestError("'stream' is not supported with a batched 'text'/'input_ids' here")
    start_len = body.get("routed_experts_start_len", 0)
    if not isinstance(start_len, int) or isinstance(start_len, bool):
        raise RequestError("'routed_experts_start_len' must be an integer")
    if start_len < 0:
        # sglang 0.5.23 `srt/managers/scheduler.py` handle_generate_request: same check.
        raise RequestError(
            f"routed_experts_start_len={start_len} is lower than 0. "
            "Please use a non-negative routed_experts_start_len.")
    hold = body.get("prefill_first_hold_secs")
    if hold is not None and (not isinstance(hold, (int, float)) or isinstance(hold, bool)
                             or not hold > 0):
        raise RequestError("'prefill_first_hold_secs' must be a positive number")
    routed_dp_rank = _optional_int(body, "routed_dp_rank")
    if routed_dp_rank is None:
        # io_struct.py normalize_batch_and_arguments: the deprecated `data_parallel_rank`
        # (what sgl-model-gateway's dp-aware mode sends) fills `routed_dp_rank` when unset.
        routed_dp_rank = _optional_int(body, "data_parallel_rank")
    prefill_dp_rank = _optional_int(body, "disagg_prefill_dp_rank")
    items = []
    for i, (t, ids) in enumerate(prompts):
        sp = sampling[i]
        max_new = sp.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if max_new is None:
            max_new = DEFAULT_MAX_NEW_TOKENS
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 0:
            raise RequestError("'sampling_params.max_new_tokens' must be a non-negative integer")
        ignore_eos = sp.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise RequestError("'sampling_params.ignore_eos' must be a boolean")
        items.append(GenerateItem(
            rid=rids[i] or uuid.uuid4().hex,
            text=t,
            input_ids=ids,
            max_new_tokens=max_new,
            ignore_eos=ignore_eos,
            stream=stream,
            return_logprob=_bool(body, "return_logprob"),
            return_routed_experts=_bool(body, "return_routed_experts"),
            routed_experts_start_len=start_len,
            bootstrap_host=hosts[i],
            bootstrap_port=ports[i],
            bootstrap_room=rooms[i],
            prefill_first=_bool(body, "prefill_first"),
            prefill_first_hold_secs=float(hold) if hold is not None else None,
            routed_dp_rank=routed_dp_rank,
            disagg_prefill_dp_rank=prefill_dp_rank,
        ))
    return items, batched


def _is_id_list(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value))


def _optional_int(body: dict[str, Any], name: str) -> int | None:
    # SGLang types these Optional[int]; range checks need the worker's DP size (worker.py).
    value = body.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise RequestError(f"'{name}' must be an integer")
    return value


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be a boolean")
    return value


def _per_item(value: Any, n: int, name: str, kind: type, default: Any) -> list[Any]:
    """A scalar applies to every item; a list must have one entry per item."""
    if value is None:
        return [default] * n
    if isinstance(value, list):
        if len(value) != n:
            raise RequestError(f"'{name}' has {len(value)} entries for {n} prompts")
        values = value
    else:
        values = [value] * n
    for v in values:
        if v is not None and (not isinstance(v, kind) or (kind is int and isinstance(v, bool))):
            raise RequestError(f"'{name}' must be a {kind.__name__} (or a list of them)")
    return [default if v is None else v for v in values]


def _rooms(value: Any, n: int) -> list[int | None]:
    # io_struct.py GenerateReqInput._normalize_...: a scalar room on a batch becomes room + i.
    if value is None:
        return [None] * n
    if isinstance(value, list):
        if len(value) != n:
            raise RequestError(f"'bootstrap_room' has {len(value)} entries for {n} prompts")
        rooms = value
    else:
        rooms = [value + i if isinstance(value, int) and not isinstance(value, bool) else value
                 for i in range(n)]
    for r in rooms:
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 0):
            raise RequestError("'bootstrap_room' must be a non-negative integer (or a list)")
    return rooms

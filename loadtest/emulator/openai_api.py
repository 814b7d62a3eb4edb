"""`/v1/chat/completions` and `/v1/completions` on top of the worker's generate path.

Shapes follow sglang 0.5.23 `srt/entrypoints/openai/protocol.py` (ChatCompletionResponse,
ChatCompletionStreamResponse, CompletionResponse, UsageInfo, SglExt) and `serving_chat.py`
(stream: a first chunk with `delta.role`, content deltas, the finishing chunk, then a response-level
chunk with `choices: []` carrying `sglext.routed_experts` when requested, then the usage chunk if
`stream_options.include_usage`, then `data: [DONE]`).

No chat template (there is no model): messages are joined as "role: content" lines. `n` > 1,
tools and logprobs are not emulated (400 / ignored). PD fields (`bootstrap_host`,
`bootstrap_port`, `bootstrap_room`) and our `prefill_first` extension pass through, as the
sglang-router injects them into OpenAI bodies too.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import orjson
from aiohttp import web

from loadtest.emulator import sse
from loadtest.emulator.generate_input import (
    DEFAULT_MAX_NEW_TOKENS,
    GenerateItem,
    RequestError,
    parse_generate,
)
from loadtest.emulator.worker import WORKER_KEY, GenerationError, Worker

_PASSTHROUGH = ("rid", "bootstrap_host", "bootstrap_port", "bootstrap_room",
                "return_routed_experts", "routed_experts_start_len", "prefill_first",
                "prefill_first_hold_secs",
                # entrypoints/openai/protocol.py PDRoutingFields (+ the deprecated alias).
                "routed_dp_rank", "disagg_prefill_dp_rank", "data_parallel_rank")
_EXTENSION_META = ("prompt_expert_counts", "expert_geometry")


def openai_error(status: int, message: str) -> web.Response:
    # serving_base.py create_error_response: ErrorResponse(object, message, type, param, code).
    kind = "BadRequestError" if status == 400 else "InternalServerError"
    return web.Response(body=orjson.dumps({"object": "error", "message": message, "type": kind,
                                           "param": None, "code": status}),
                        status=status, content_type="application/json")


def _to_generate(body: Any, prompt: str) -> dict[str, Any]:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_NEW_TOKENS
    sampling = {"max_new_tokens": max_tokens, "ignore_eos": body.get("ignore_eos", False)}
    out: dict[str, Any] = {"text": prompt, "sampling_params": sampling,
                           "stream": body.get("stream", False)}
    for key in _PASSTHROUGH:
        if key in body:
            out[key] = body[key]
    return out


def _chat_prompt(body: Any) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    lines = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"'messages[{i}].role' must be a string")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    continue
                text = part.get("text", "")
                if not isinstance(text, str):
                    raise RequestError(f"'messages[{i}].content[{j}].text' must be a string")
                texts.append(text)
            content = " ".join(texts)
        if not isinstance(content, str):
            raise RequestError(f"'messages[{i}].content' must be a string or text parts")
        lines.append(f"{m['role']}: {content}")
    return "\n".join(lines)


def _completion_prompt(body: Any) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("'prompt' must be a non-empty string")
    return prompt


async def _parse(request: web.Request, chat: bool) -> tuple[Any, GenerateItem]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    if body.get("n", 1) != 1:
        raise RequestError("'n' must be 1 on the emulator")
    if not isinstance(body.get("model", ""), str):
        raise RequestError("'model' must be a string")
    prompt = _chat_prompt(body) if chat else _completion_prompt(body)
    items, _ = parse_generate(_to_generate(body, prompt))
    return body, items[0]


def _finish(meta: dict[str, Any]) -> tuple[str | None, Any]:
    reason = meta.get("finish_reason")
    if reason is None:
        return None, None
    return reason.get("type"), reason.get("matched")


def _usage(meta: dict[str, Any], cache_report: bool) -> dict[str, Any]:
    # usage_processor.py: prompt_tokens_details = PromptTokensDetails(cached_tokens=
    # meta_info["cached_tokens"]) only with --enable-cache-report, else None.
    details = {"cached_tokens": meta["cached_tokens"]} if cache_report else None
    return {"prompt_tokens": meta["prompt_tokens"],
            "total_tokens": meta["prompt_tokens"] + meta["completion_tokens"],
            "completion_tokens": meta["completion_tokens"], "prompt_tokens_details": details,
            "reasoning_tokens": 0}


def _sglext(meta: dict[str, Any]) -> dict[str, Any] | None:
    ext = {k: meta[k] for k in ("routed_experts", *_EXTENSION_META) if k in meta}
    return ext or None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=False)


async def _serve(request: web.Request, *, chat: bool) -> web.StreamResponse:
    worker: Worker = request.app[WORKER_KEY]
    try:
        body, item = await _parse(request, chat)
    except RequestError as exc:
        return openai_error(400, str(exc))
    model = body.get("model") or worker.geometry.name
    created = int(time.time())
    if item.stream:
        return await _stream(request, worker, body, item, model, created, chat)
    try:
        out = await worker.complete(item)
    except GenerationError as exc:
        return openai_error(exc.status, exc.message)
    meta = out["meta_info"]
    reason, matched = _finish(meta)
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": out["text"], "reasoning_content": None,
                        "tool_calls": None},
            "logprobs": None, "finish_reason": reason, "matched_stop": matched}
    else:
        choice = {"index": 0, "text": out["text"], "logprobs": None, "finish_reason": reason,
                  "matched_stop": matched}
    resp: dict[str, Any] = {"id": meta["id"],
                            "object": "chat.completion" if chat else "text_completion",
                            "created": created, "model": model, "choices": [choice],
                            "usage": _usage(meta, worker.config.engine.enable_cache_report),
                            "metadata": {"weight_version": "default"}}
    ext = _sglext(meta)
    if ext is not None:
        resp["sglext"] = ext
    return web.Response(body=orjson.dumps(resp), content_type="application/json")


async def _stream(request: web.Request, worker: Worker, body: Any, item: GenerateItem,
                  model: str, created: int, chat: bool) -> web.StreamResponse:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse.event({"id": item.rid, "object": obj, "created": created, "model": model,
                          "choices": choices, "usage": None, **extra})

    def choice(text: str, reason: str | None, matched: Any, role: bool = False
               ) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant" if role else None, "content": text,
                                     "reasoning_content": None}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason,
                    "matched_stop": matched}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason,
                "matched_stop": matched}

    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    resp = await sse.open_stream(request)
    sent = ""
    last_meta: dict[str, Any] | None = None
    try:
        if chat:
            await resp.write(chunk([choice("", None, None, role=True)]))
        async with contextlib.aclosing(worker.generate(item)) as outs:
            async for out in outs:
                last_meta = out["meta_info"]
                text = out["text"]
                delta = text[len(sent):] if text.startswith(sent) else text
                sent = text
                reason, matched = _finish(last_meta)
                if delta or reason is not None:
                    await resp.write(chunk([choice(delta, reason, matched)]))
    except GenerationError as exc:
        # serving_chat.py: an error after the stream started becomes an error data chunk.
        await resp.write(sse.event({"error": {"message": exc.message,
                                              "type": "InternalServerError" if exc.status != 400
                                              else "BadRequestError",
                                              "param": None, "code": exc.status}}))
        last_meta = None
    if last_meta is not None:
        ext = _sglext(last_meta)
        if ext is not None:
            await resp.write(chunk([], sglext=ext))
        if include_usage:
            await resp.write(sse.event({"id": item.rid, "object": obj, "created": created,
                                        "model": model, "choices": [],
                                        "usage": _usage(
                                            last_meta,
                                            worker.config.engine.enable_cache_report)}))
    await resp.write(sse.DONE)
    await resp.write_eof()
    return resp

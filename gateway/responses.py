"""The gateway's own JSON answers: one encoder (orjson) and one error shape for every route."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status,
                        content_type="application/json")


def error_type(status: int) -> str:
    """The OpenAI error category for a status, as smg 1.13 answers them."""
    if status == 429:
        return "rate_limit_error"
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object, which the openai client reads and smg 1.13 answers with:
    `type` the category, `code` a stable slug, `param` the offending field when known."""
    return {"error": {"message": message, "type": error_type(status), "code": code,
                      "param": param}}


def error_response(status: int, message: str, code: str,
                   param: str | None = None) -> web.Response:
    return json_response(error_body(status, message, code, param), status)


def sse_error_event(status: int, message: str, type_: str) -> bytes:
    """An error inside an SSE stream, in SGLang's in-stream shape (`code` is the HTTP status,
    as `create_streaming_error_response` writes it), since stream clients parse workers' too."""
    return b"data: " + orjson.dumps({"error": {"object": "error", "message": message,
                                               "type": type_, "param": None,
                                               "code": status}}) + b"\n\n"

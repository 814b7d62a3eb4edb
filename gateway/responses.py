"""The gateway's own JSON answers: one encoder (orjson) and one error shape for every route."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status,
                        content_type="application/json")


def error_body(status: int, message: str, code: str) -> dict[str, Any]:
    # OpenAI-style error object, which the openai client and SGLang's own errors both use.
    return {"error": {"message": message, "type": code, "code": status}}


def error_response(status: int, message: str, code: str) -> web.Response:
    return json_response(error_body(status, message, code), status)

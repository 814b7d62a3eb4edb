"""Server-sent events exactly as SGLang frames them.

sglang 0.5.23 `srt/entrypoints/http_server.py` serve_generate_request.stream_results: every chunk
is `b"data: " + json + b"\\n\\n"`, and the stream always ends with `data: [DONE]\\n\\n`, after an
error chunk `{"error": {...}}` if the request failed. The OpenAI endpoints
(`srt/entrypoints/openai/serving_chat.py`) use the same framing.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

DONE = b"data: [DONE]\n\n"


def event(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n\n"


async def open_stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(
        status=200,
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
    )
    await resp.prepare(request)
    return resp

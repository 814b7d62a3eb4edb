"""The text prefix and key policies route on, read from a request body.

Provisional rule (to be matched to smg 1.13's `extract_text_for_routing`): `/generate` `text`
(the first prompt of a batch) or its `input_ids` as space-separated numbers; `/v1/completions`
`prompt`; `/v1/chat/completions` the messages' text contents joined by newlines.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def routing_text(endpoint: str, body: Mapping[str, Any]) -> str:
    """The request's routing text; "" when it has none a prefix policy can use."""
    if endpoint == "/v1/chat/completions":
        parts: list[str] = []
        for message in body.get("messages") or ():
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(p["text"] for p in content
                             if isinstance(p, dict) and isinstance(p.get("text"), str))
        return "\n".join(parts)
    value = body.get("prompt") if endpoint == "/v1/completions" else body.get("text")
    if isinstance(value, list) and value:
        value = value[0]
    if isinstance(value, str):
        return value
    ids = body.get("input_ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        ids = ids[0]
    if isinstance(ids, list):
        return " ".join(str(i) for i in ids)
    return ""

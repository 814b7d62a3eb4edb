"""The text prefix and key policies route on, read from a request body, as smg 1.13's HTTP routers
extract it (`GenerationRequest::extract_text_for_routing` / `routing_tokens` in smg's protocols
crate, called from routers/http/router.rs and pd_router.rs).

  * `/v1/chat/completions`: the messages' text in order, one space between messages that have
    any. A message's text is its `content` (a string, or its `{"type": "text"}` parts' non-empty
    texts joined by spaces); an assistant message adds its `reasoning_content`; a `function`
    message's `content` is a string. Tool calls, images and names are not text.
  * `/v1/completions`: `prompt`, a list of prompts joined by spaces.
  * `/generate`: pre-tokenized requests route on their ids (the first sequence of a batch), the
    rest on `text`. smg routes ids on a token tree; the gateway has no tokens, so the ids become
    their decimal text joined by spaces (smg's own text rendering of ids), which keeps their
    prefix relation. A list of texts (a batch, which smg's typed request does not accept) is
    joined by spaces, like completion prompts.

Anything else ("" for a body without usable text) leaves prefix policies to their no-text rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def routing_text(endpoint: str, body: Mapping[str, Any]) -> str:
    """The request's routing text; "" when it has none a prefix policy can use."""
    if endpoint == "/v1/chat/completions":
        return _chat_text(body.get("messages"))
    if endpoint == "/v1/completions":
        return _prompt_text(body.get("prompt"))
    ids = _first_ids(body.get("input_ids"))
    if ids:
        return " ".join(str(i) for i in ids)
    return _prompt_text(body.get("text"))


def _prompt_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return " ".join(value)
        ids = _first_ids(value)  # OpenAI also takes token ids as a prompt
        if ids:
            return " ".join(str(i) for i in ids)
    return ""


def _first_ids(value: Any) -> list[int] | None:
    """A list of ints, or the first of a list of lists of ints; None when it is neither."""
    if not isinstance(value, list) or not value:
        return None
    seq: list[Any] = value[0] if isinstance(value[0], list) else value
    if seq and all(isinstance(i, int) and not isinstance(i, bool) for i in seq):
        return [int(i) for i in seq]
    return None


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part["text"] for part in content
                        if isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str) and part["text"])
    return ""


def _chat_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    pieces: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        text = _content_text(message.get("content"))
        if text:
            pieces.append(text)
        if message.get("role") == "assistant":
            reasoning = message.get("reasoning_content")
            if isinstance(reasoning, str) and reasoning:
                pieces.append(reasoning)
    return " ".join(pieces)

"""What locality reads of a request and of its answer: the prompt, the output, routed experts.

Prompts are taken from the request body the way SGLang reads it (`/generate`: `input_ids` or
`text`; `/v1/completions`: `prompt`; `/v1/chat/completions`: `messages`). Chat messages are
rendered as `\\x1e{role}\\x1f{content}` per message, so the rendering of a conversation's next turn
starts with the rendering of this turn plus the assistant's reply (`output_units`), which is what
makes a continued chat hit the signature cache. Batched requests (lists of prompts) have no
prompt here: one decode worker serves the whole batch and no single signature describes it.

Answers: `routed_experts_of` finds the base64 routed experts in `meta_info` (`/generate`) or
`sglext` (OpenAI endpoints); `prompt_tokens_of` and `output_of` read the token count and the
generated text the same way for both shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from gateway.eldr.signature_cache import Units, units_of
from zones.geometry import ModelGeometry
from zones.routed_experts import (
    IntArray,
    RoutedExpertsError,
    counts_from_expert_ids,
    decode_routed_experts,
)

if TYPE_CHECKING:
    from gateway.resolver import RequestContext

PromptKind = Literal["generate", "completion", "chat"]

_RECORD_SEP = "\x1e"
_UNIT_SEP = "\x1f"


@dataclass(frozen=True, slots=True)
class Prompt:
    """The part of a request a signature is resolved from."""

    kind: PromptKind
    text: str | None = None
    input_ids: tuple[int, ...] | None = None

    def units(self) -> Units | None:
        return units_of(self.text, self.input_ids)


def render_message(role: str, content: Any) -> str:
    """One chat message as the cache and predictor see it (module docstring)."""
    if isinstance(content, str):
        body = content
    elif isinstance(content, list):  # OpenAI content parts: keep the text ones
        body = "\n".join(
            str(part.get("text", "")) for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    else:
        body = ""
    return f"{_RECORD_SEP}{role}{_UNIT_SEP}{body}"


def _int_list(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, list) and value and all(
        isinstance(x, int) and not isinstance(x, bool) for x in value
    ):
        return tuple(value)
    return None


def prompt_from_request(path: str, body: Mapping[str, Any]) -> Prompt | None:
    """The prompt of a single (non-batched) request, or None when there is none to use."""
    if path.endswith("/chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        parts = []
        for m in messages:
            if not isinstance(m, dict):
                return None
            parts.append(render_message(str(m.get("role", "")), m.get("content")))
        return Prompt("chat", text="".join(parts))
    if path.endswith("/completions"):
        p = body.get("prompt")
        if isinstance(p, str):
            return Prompt("completion", text=p)
        ids = _int_list(p)
        if ids is not None:
            return Prompt("completion", input_ids=ids)
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            return Prompt("completion", text=p[0])
        return None
    ids = _int_list(body.get("input_ids"))
    if ids is not None:
        return Prompt("generate", input_ids=ids)
    text = body.get("text")
    if isinstance(text, str):
        return Prompt("generate", text=text)
    return None


def prompt_of(ctx: RequestContext) -> Prompt | None:
    """The request's prompt, parsed once per request (the resolver, the prefill answer, the
    decode answer and the calibration hook all ask)."""
    if not ctx.prompt_parsed:
        ctx.prompt = None if ctx.batch is not None else prompt_from_request(ctx.endpoint, ctx.body)
        ctx.prompt_parsed = True
    return ctx.prompt


def output_units(
    prompt: Prompt, text: str | None, output_ids: Sequence[int] | None
) -> Units | None:
    """What the output adds to the next turn's prompt, in the prompt's own units."""
    if prompt.input_ids is not None:
        return units_of(input_ids=output_ids) if output_ids else None
    if text is None:
        return None
    if prompt.kind == "chat":
        return units_of(text=render_message("assistant", text))
    return units_of(text=text)


def routed_experts_of(doc: Any) -> str | None:
    """The base64 routed experts a response carries (`meta_info` or OpenAI `sglext`)."""
    if not isinstance(doc, dict):
        return None
    for holder in ("meta_info", "sglext"):
        inner = doc.get(holder)
        if isinstance(inner, dict) and isinstance(inner.get("routed_experts"), str):
            value: str = inner["routed_experts"]
            return value
    return None


def int_field(value: Any) -> int | None:
    """`value` when it is a JSON integer (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def token_counts_of(result: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(prompt_tokens, completion_tokens) of a `/generate` (`meta_info`) or OpenAI (`usage`)
    answer; None where absent or not a non-negative integer."""
    for holder in ("meta_info", "usage"):
        inner = result.get(holder)
        if isinstance(inner, dict):
            prompt = int_field(inner.get("prompt_tokens"))
            output = int_field(inner.get("completion_tokens"))
            return (prompt if prompt is not None and prompt >= 0 else None,
                    output if output is not None and output >= 0 else None)
    return None, None


def output_of(result: Mapping[str, Any]) -> tuple[str | None, list[int] | None]:
    """Generated text and token ids of a /generate or OpenAI (first choice) answer."""
    ids = result.get("output_ids")
    output_ids = ids if isinstance(ids, list) else None
    if isinstance(result.get("text"), str):
        return result["text"], output_ids
    choices = result.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        message = choice.get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            return message["content"], output_ids
        if isinstance(choice.get("text"), str):
            return choice["text"], output_ids
    return None, output_ids


def output_expert_counts(
    result: Mapping[str, Any], body: Mapping[str, Any], geometry: ModelGeometry
) -> IntArray | None:
    """Expert counts `[layers, experts]` of the OUTPUT tokens of a decode answer, or None when
    it carries no routed experts, they do not decode for `geometry`, or no output row is left.

    A PD decode returns rows for positions `[routed_experts_start_len, seqlen - 1)` but never
    forwarded the prompt, so its first `prompt_tokens - routed_experts_start_len` rows are not
    routing (SGLang leaves them unset, the emulator zeros them; docs/wire-format.md, "Routed
    experts"); counting them would credit expert 0 (or garbage) with every prompt token. A
    regular worker's prompt rows are valid but are prompt routing, so they are skipped too.
    """
    payload = routed_experts_of(result)
    prompt_tokens, _ = token_counts_of(result)
    if payload is None or prompt_tokens is None:
        return None
    start = int_field(body.get("routed_experts_start_len")) or 0
    try:
        rows = decode_routed_experts(payload, geometry)[max(0, prompt_tokens - start):]
    except RoutedExpertsError:
        return None
    if not len(rows):
        return None
    return counts_from_expert_ids(rows, geometry)

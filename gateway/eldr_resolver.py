"""Adapter from dispatch's `RoutingResolver` hook to the signature resolver in `signatures.py`.

Dispatch speaks in requests (`RequestContext`, parsed worker answers); `SignatureResolver` speaks in
prompts and count matrices. This module translates:
- `resolve(ctx)` (dual flow): the request's prompt -> cache > predictor > none.
- `from_prefill(ctx, result)` (prefill-first flow): `meta_info.prompt_expert_counts` (base64 int32
  `[L, E]`, the emulator extension in docs/wire-format.md) is decoded for the active table's
  geometry, learned into the signature cache, and used as an exact `prefill` signature.
- `observe_decode(...)`: a non-streaming answer carrying routed experts (`meta_info.routed_experts`
  for /generate, `sglext.routed_experts` for OpenAI endpoints; present only when the client asked
  for `return_routed_experts`) is learned as the prefix of the conversation's next turn.
The prompt is extracted once per request and kept in `ctx.extras`.
"""

from __future__ import annotations

from typing import Any

from gateway.policies.base import RoutingInput, Selection
from gateway.resolver import RequestContext
from gateway.signatures import SignatureResolver, prompt_from_request
from zones.routed_experts import RoutedExpertsError, decode_counts

_PROMPT = "prompt"


class EldrRoutingResolver:
    wants_decode_results = True

    def __init__(self, resolver: SignatureResolver, zones: Any) -> None:
        self._resolver = resolver
        self._zones = zones  # anything with `.active` (a ZoneRuntime)

    def _prompt(self, ctx: RequestContext) -> Any:
        if _PROMPT not in ctx.extras:
            ctx.extras[_PROMPT] = (None if ctx.batch is not None
                                   else prompt_from_request(ctx.endpoint, ctx.body))
        return ctx.extras[_PROMPT]

    async def resolve(self, ctx: RequestContext) -> RoutingInput:
        return self._resolver.resolve(self._prompt(ctx))

    def from_prefill(self, ctx: RequestContext, prefill_result: Any) -> RoutingInput:
        prompt = self._prompt(ctx)
        counts = None
        meta = prefill_result.get("meta_info") if isinstance(prefill_result, dict) else None
        payload = meta.get("prompt_expert_counts") if isinstance(meta, dict) else None
        active = self._zones.active
        if isinstance(payload, str) and active is not None:
            try:
                counts = decode_counts(payload, active.table.geometry)
            except RoutedExpertsError:
                counts = None  # wrong geometry for the active table: fall back to the prompt
        if counts is not None:
            self._resolver.observe_prefill(prompt, counts)
        routing: RoutingInput = self._resolver.resolve(prompt, counts)
        return routing

    def observe_decode(self, ctx: RequestContext, decode_worker_id: str,
                       selection: Selection | None, result: Any) -> None:
        if not isinstance(result, dict):
            return
        routed, text, output_ids = None, None, None
        meta = result.get("meta_info")
        if isinstance(meta, dict) and isinstance(meta.get("routed_experts"), str):
            routed = meta["routed_experts"]
            text = result.get("text") if isinstance(result.get("text"), str) else None
            ids = result.get("output_ids")
            output_ids = ids if isinstance(ids, list) else None
        sglext = result.get("sglext")
        if routed is None and isinstance(sglext, dict) and \
                isinstance(sglext.get("routed_experts"), str):
            routed = sglext["routed_experts"]
            choices = result.get("choices")
            if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                message = choices[0].get("message")
                content = message.get("content") if isinstance(message, dict) else \
                    choices[0].get("text")
                text = content if isinstance(content, str) else None
        if routed is not None:
            self._resolver.observe_output(self._prompt(ctx), routed, text=text,
                                          output_ids=output_ids)


def make_default_resolver(zone_runtime: Any, eldr_metrics: Any) -> EldrRoutingResolver:
    return EldrRoutingResolver(SignatureResolver(zone_runtime, metrics=eldr_metrics),
                               zone_runtime)

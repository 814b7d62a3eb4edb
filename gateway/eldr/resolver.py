"""Resolve the routing input of a request: prefill result > signature cache > predictor > none.

Every signature is built by the active zone table's `SignatureSpec` (zones/signature.py, the only
implementation) or predicted by the table's own `Predictor`, so it always lies in the active
table's space. Each resolution is counted by source (`eldr_signature_resolutions_total`).

Sources, in order:
1. `prefill`   the prefill-first flow's `meta_info.prompt_expert_counts`: exact.
2. `cache`     the longest learned prefix of the prompt (gateway.signature_cache).
               Whole prompt covered and observed: the exact signature of the counts.
               Partly: `normalise(f * build(counts) + (1 - f) * predicted)`, f = observed units /
               prompt units. Both terms are unit vectors, so each side weighs in proportion to
               the share of the prompt it speaks for. The predictor sees only the uncovered tail
               when the covered prefix was fully observed (prefill-first history), else the whole
               prompt (dual-flow history observed only outputs, so what is unobserved is
               scattered through the prompt). Without a predictor, the observed counts alone.
3. `predictor` the table's predictor on the prompt text or token ids.
4. `none`      no table, no usable prompt, or nothing predicted: the policy falls back to
               least-load.

Prompts are taken from the request body the way SGLang reads it (`/generate`: `input_ids` or
`text`; `/v1/completions`: `prompt`; `/v1/chat/completions`: `messages`). Chat messages are
rendered as `\\x1e{role}\\x1f{content}` per message, so the rendering of a conversation's next turn
starts with the rendering of this turn plus the assistant's reply (`output_units`), which is what
makes a continued chat hit the cache. Batched requests (lists of prompts) get no signature: one
decode worker serves the whole batch and no single signature describes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from gateway.eldr_metrics import EldrMetrics
from gateway.policies.base import NO_ROUTING_INPUT, RoutingInput, Selection
from gateway.signature_cache import (
    DEFAULT_BLOCK_BYTES,
    DEFAULT_BLOCK_TOKENS,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ENTRIES,
    CacheHit,
    SignatureCache,
    Units,
    units_of,
)
from gateway.zone_runtime import ActiveZones
from zones.geometry import ModelGeometry
from zones.routed_experts import (
    RoutedExpertsError,
    counts_from_expert_ids,
    decode_counts,
    decode_routed_experts,
)
from zones.signature import SignatureError

FloatArray = npt.NDArray[np.float32]
PromptKind = Literal["generate", "completion", "chat"]
SOURCES = ("prefill", "cache", "predictor", "none")

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


class ZoneSource(Protocol):
    @property
    def active(self) -> ActiveZones | None: ...


@dataclass(frozen=True, slots=True)
class CacheSettings:
    block_tokens: int = DEFAULT_BLOCK_TOKENS
    block_bytes: int = DEFAULT_BLOCK_BYTES
    max_entries: int = DEFAULT_MAX_ENTRIES
    max_bytes: int = DEFAULT_MAX_BYTES
    enabled: bool = True


class SignatureResolver:
    """Resolves routing inputs and learns from results; one per app (no globals)."""

    def __init__(
        self,
        zones: ZoneSource,
        *,
        cache: CacheSettings | None = None,
        metrics: EldrMetrics | None = None,
    ) -> None:
        self._zones = zones
        self._cache_settings = cache or CacheSettings()
        self._metrics = metrics
        self._cache: SignatureCache | None = None
        self.counts: dict[str, int] = dict.fromkeys(SOURCES, 0)

    @property
    def active(self) -> ActiveZones | None:
        return self._zones.active

    # --- resolution ----------------------------------------------------------------------------
    def resolve(
        self, prompt: Prompt | None, prefill_counts: npt.ArrayLike | None = None
    ) -> RoutingInput:
        routing = self._resolve(prompt, prefill_counts)
        self.counts[routing.signature_source] += 1
        if self._metrics is not None:
            self._metrics.record_signature_source(routing.signature_source)
        return routing

    def _resolve(self, prompt: Prompt | None, prefill_counts: npt.ArrayLike | None) -> RoutingInput:
        active = self._zones.active
        if active is None:
            return NO_ROUTING_INPUT
        table = active.table
        if prefill_counts is not None:
            sig = _build(table.spec.build, prefill_counts)
            if sig is not None:
                return RoutingInput(sig, "prefill")
        if prompt is None:
            return NO_ROUTING_INPUT
        units = prompt.units()
        cache = self.cache_for(table.geometry)
        if units is not None and cache is not None:
            hit = cache.lookup(units)
            self._record_lookup(hit, cache)
            if hit is not None:
                sig = self._from_hit(active, prompt, hit)
                if sig is not None:
                    return RoutingInput(sig, "cache")
        predicted = _predict(active, prompt.text, prompt.input_ids)
        if predicted is not None:
            return RoutingInput(predicted, "predictor")
        return NO_ROUTING_INPUT

    def _from_hit(self, active: ActiveZones, prompt: Prompt, hit: CacheHit) -> FloatArray | None:
        observed = _build(active.table.spec.build, hit.counts)
        if hit.exact or observed is None:
            return observed
        if hit.observed == hit.covered:
            text, ids = _tail(prompt, hit.covered)
        else:
            text, ids = prompt.text, prompt.input_ids
        predicted = _predict(active, text, ids)
        if predicted is None:
            return observed
        share = np.float32(hit.observed / hit.total)
        mixed = share * observed + (np.float32(1.0) - share) * predicted
        norm = float(np.sqrt(np.dot(mixed, mixed)))
        if not np.isfinite(norm) or norm == 0.0:
            return observed
        return (mixed / np.float32(norm)).astype(np.float32)

    def _record_lookup(self, hit: CacheHit | None, cache: SignatureCache) -> None:
        if self._metrics is None:
            return
        result = "miss" if hit is None else ("hit" if hit.exact else "partial")
        self._metrics.record_cache_lookup(result)
        self._metrics.set_cache_size(len(cache), cache.nbytes)

    def cache_for(self, geometry: ModelGeometry) -> SignatureCache | None:
        """The cache for this geometry; a table of another model starts an empty one, since
        counts of another geometry mean nothing to it."""
        s = self._cache_settings
        if not s.enabled:
            return None
        if self._cache is None or self._cache.geometry != geometry:
            self._cache = SignatureCache(
                geometry, block_tokens=s.block_tokens, block_bytes=s.block_bytes,
                max_entries=s.max_entries, max_bytes=s.max_bytes,
            )
        return self._cache

    # --- learning ------------------------------------------------------------------------------
    def observe_prefill(self, prompt: Prompt | None, prompt_counts: npt.ArrayLike) -> bool:
        """Learn a prefill-first result's prompt counts; False when not usable."""
        active = self._zones.active
        units = None if prompt is None else prompt.units()
        if active is None or units is None:
            return False
        cache = self.cache_for(active.table.geometry)
        if cache is None:
            return False
        try:
            cache.learn_prompt(units, prompt_counts)
        except ValueError:
            return False
        return True

    def observe_output(
        self,
        prompt: Prompt | None,
        routed_experts: str,
        *,
        skip_rows: int = 0,
        text: str | None = None,
        output_ids: Sequence[int] | None = None,
    ) -> npt.NDArray[np.int32] | None:
        """Learn a decode result's `routed_experts` as the prefix of the conversation's next turn.

        A PD decode returns rows for positions `[routed_experts_start_len, seqlen - 1)` but only
        those at positions >= prompt_tokens are valid (it never forwarded the prompt;
        docs/wire-format.md, "Routed experts"), so the caller passes
        `skip_rows = prompt_tokens - routed_experts_start_len`. Returns the output counts (for
        the calibration log), or None when the payload does not decode for the active geometry.
        """
        active = self._zones.active
        if active is None or skip_rows < 0:
            return None
        geometry = active.table.geometry
        try:
            ids = decode_routed_experts(routed_experts, geometry)[skip_rows:]
            counts = counts_from_expert_ids(ids, geometry)
        except RoutedExpertsError:
            return None
        units = None if prompt is None else prompt.units()
        out = None if prompt is None else output_units(prompt, text, output_ids)
        cache = self.cache_for(geometry)
        if units is not None and out is not None and cache is not None:
            cache.learn_output(units, out, counts)
        return counts


def _build(build: Any, counts: npt.ArrayLike) -> FloatArray | None:
    try:
        sig: FloatArray | None = build(counts)
    except (SignatureError, ValueError, TypeError):
        return None
    return sig


def _predict(
    active: ActiveZones, text: str | None, ids: Sequence[int] | None
) -> FloatArray | None:
    predictor = active.table.predictor
    if predictor is None:
        return None
    try:
        return predictor.predict(text, ids)
    except Exception:  # a predictor bug must cost a routing hint, never a request
        return None


def _tail(prompt: Prompt, covered: int) -> tuple[str | None, tuple[int, ...] | None]:
    if prompt.input_ids is not None:
        return None, prompt.input_ids[covered:]
    if prompt.text is None:
        return None, None
    raw = prompt.text.encode("utf-8", "surrogatepass")[covered:]
    return raw.decode("utf-8", "ignore"), None


# --- the dispatch hook (gateway/resolver.py `RoutingResolver`) ---------------------------------


class GatewayResolver:
    """Adapts `SignatureResolver` to dispatch's `RoutingResolver` protocol.

    Per request it keeps the extracted prompt in `ctx.extras` so the prefill answer and the
    decode answer are matched to the prompt they belong to.
    """

    wants_decode_results = True

    def __init__(self, core: SignatureResolver) -> None:
        self.core = core

    def _prompt(self, ctx: Any) -> Prompt | None:
        if "eldr_prompt" not in ctx.extras:
            prompt = None if ctx.batch is not None else prompt_from_request(ctx.endpoint, ctx.body)
            ctx.extras["eldr_prompt"] = prompt
        cached: Prompt | None = ctx.extras["eldr_prompt"]
        return cached

    async def resolve(self, ctx: Any) -> RoutingInput:
        return self.core.resolve(self._prompt(ctx))

    def from_prefill(self, ctx: Any, prefill_result: Any) -> RoutingInput:
        """Prefill-first: read `prompt_expert_counts` (meta_info, or sglext on OpenAI answers),
        learn it, and route on it; anything unusable falls through to cache/predictor."""
        prompt = self._prompt(ctx)
        counts = self._prefill_counts(prefill_result)
        if counts is not None:
            self.core.observe_prefill(prompt, counts)
        return self.core.resolve(prompt, counts)

    def _prefill_counts(self, result: Any) -> npt.NDArray[np.int32] | None:
        active = self.core.active
        if active is None or not isinstance(result, dict):
            return None
        for holder in ("meta_info", "sglext"):
            meta = result.get(holder)
            if not isinstance(meta, dict) or "prompt_expert_counts" not in meta:
                continue
            geometry = active.table.geometry
            reported = meta.get("expert_geometry")
            if isinstance(reported, dict):
                shape = (reported.get("num_layers"), reported.get("num_experts"))
                if shape != (geometry.num_layers, geometry.num_experts):
                    return None  # another model's routing: meaningless for this table
            try:
                return decode_counts(meta["prompt_expert_counts"], geometry)
            except RoutedExpertsError:
                return None
        return None

    def observe_decode(
        self, ctx: Any, decode_worker_id: str, selection: Selection | None, result: Any
    ) -> None:
        if not isinstance(result, dict):
            return
        routed = routed_experts_of(result)
        prompt_tokens = _prompt_tokens(result)
        if routed is None or prompt_tokens is None:
            return
        start = ctx.body.get("routed_experts_start_len", 0)
        start = start if isinstance(start, int) and not isinstance(start, bool) else 0
        text, output_ids = _output_of(result)
        self.core.observe_output(
            self._prompt(ctx), routed, skip_rows=prompt_tokens - start, text=text,
            output_ids=output_ids,
        )


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


def _prompt_tokens(result: dict[str, Any]) -> int | None:
    for holder in ("meta_info", "usage"):
        inner = result.get(holder)
        if isinstance(inner, dict):
            value = inner.get("prompt_tokens")
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
    return None


def _output_of(result: dict[str, Any]) -> tuple[str | None, list[int] | None]:
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


def make_resolver(settings: Any, *, zone_runtime: Any, eldr_metrics: EldrMetrics | None = None,
                  **_: Any) -> GatewayResolver:
    """App hook (`gateway/app.py`). Optional settings, read when the config defines them:
    `signature_cache_max_bytes`, `signature_cache_max_entries`, `signature_cache_block_tokens`,
    `signature_cache_block_bytes`, `signature_cache` (False disables it)."""
    defaults = CacheSettings()
    cache = CacheSettings(
        block_tokens=getattr(settings, "signature_cache_block_tokens", None)
        or defaults.block_tokens,
        block_bytes=getattr(settings, "signature_cache_block_bytes", None) or defaults.block_bytes,
        max_entries=getattr(settings, "signature_cache_max_entries", None)
        or defaults.max_entries,
        max_bytes=getattr(settings, "signature_cache_max_bytes", None) or defaults.max_bytes,
        enabled=getattr(settings, "signature_cache", True) is not False,
    )
    return GatewayResolver(SignatureResolver(zone_runtime, cache=cache, metrics=eldr_metrics))

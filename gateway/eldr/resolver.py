"""Resolve the routing input of a request: prefill result > signature cache > predictor > none.

Every signature is built by the active zone table's `SignatureSpec` (zones/signature.py, the only
implementation) or predicted by the table's own `Predictor`, so it always lies in the active
table's space. Each resolution is counted by source (`eldr_signature_resolutions_total`).

Sources, in order:
1. `prefill`   the prefill-first flow's `meta_info.prompt_expert_counts`: exact.
2. `cache`     the longest learned prefix of the prompt (gateway.eldr.signature_cache;
               off with `--no-signature-cache`).
               Whole prompt covered and observed: the exact signature of the counts.
               Partly: `normalise(f * build(counts) + (1 - f) * predicted)`, f = observed units /
               prompt units. Both terms are unit vectors, so each side weighs in proportion to
               the share of the prompt it speaks for. The predictor sees only the uncovered tail
               when the covered prefix was fully observed (prefill-first history), else the whole
               prompt (dual-flow history observed only outputs, so what is unobserved is
               scattered through the prompt). Without a predictor, the observed counts alone.
3. `predictor` the table's predictor on the prompt text or token ids (off with
               `--no-signature-predictor`), kept in the predictor's coordinates
               (`LowRankSignature`): the band ranks zones from them without building it.
4. `none`      no table, no usable prompt, or nothing predicted: the policy falls back to
               its load-only policy (`--eldr-fallback-policy`).

Prompts and answers are read by `gateway.eldr.prompts`. `LocalityResolver` is the adapter that
dispatch calls (`gateway.resolver.RoutingResolver`); `SignatureResolver` is its I/O-free core.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from gateway.config import Settings
from gateway.eldr.metrics import EldrMetrics
from gateway.eldr.prompts import (
    Prompt,
    output_expert_counts,
    output_of,
    output_units,
    prompt_of,
)
from gateway.eldr.runtime import ActiveZones
from gateway.eldr.signature_cache import (
    DEFAULT_BLOCK_BYTES,
    DEFAULT_BLOCK_TOKENS,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ENTRIES,
    CacheHit,
    SignatureCache,
)
from gateway.resolver import RequestContext
from gateway.routing import (
    NO_ROUTING_INPUT,
    SIGNATURE_SOURCES,
    LowRankSignature,
    RoutingInput,
    Selection,
)
from zones.geometry import ModelGeometry, describe
from zones.routed_experts import RoutedExpertsError, decode_counts
from zones.signature import SignatureError

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int32]
log = logging.getLogger(__name__)


class ZoneSource(Protocol):
    """Anything with the current snapshot (a `ZoneRuntime`, or a stub in tests)."""

    @property
    def active(self) -> ActiveZones | None: ...


@dataclass(frozen=True, slots=True)
class ResolverSettings:
    """The resolver's knobs; `from_settings` reads them from the gateway's `Settings`."""

    cache: bool = True  # learn and use the signature cache
    predictor: bool = True  # use the zone table's predictor when the cache cannot answer
    block_tokens: int = DEFAULT_BLOCK_TOKENS
    block_bytes: int = DEFAULT_BLOCK_BYTES
    max_entries: int = DEFAULT_MAX_ENTRIES
    max_bytes: int = DEFAULT_MAX_BYTES

    @classmethod
    def from_settings(cls, settings: Settings) -> ResolverSettings:
        return cls(
            cache=settings.signature_cache,
            predictor=settings.signature_predictor,
            block_tokens=settings.signature_cache_block_tokens,
            block_bytes=settings.signature_cache_block_bytes,
            max_entries=settings.signature_cache_max_entries,
            max_bytes=settings.signature_cache_max_bytes,
        )


class SignatureResolver:
    """Resolves routing inputs and learns from results; one per app (no globals)."""

    def __init__(
        self,
        zones: ZoneSource,
        settings: ResolverSettings | None = None,
        *,
        metrics: EldrMetrics | None = None,
    ) -> None:
        self._zones = zones
        self._settings = settings or ResolverSettings()
        self._metrics = metrics
        self._cache: SignatureCache | None = None
        self.counts: dict[str, int] = dict.fromkeys(SIGNATURE_SOURCES, 0)

    @property
    def active(self) -> ActiveZones | None:
        return self._zones.active

    # --- resolution ----------------------------------------------------------------------------
    def resolve(
        self, prompt: Prompt | None, prefill_counts: npt.ArrayLike | None = None
    ) -> RoutingInput:
        """The routing input of one request, built in the snapshot active now (which the
        returned input carries, so the policy decides against the same table)."""
        active = self._zones.active
        routing = self._resolve(active, prompt, prefill_counts)
        self.counts[routing.signature_source] += 1
        if self._metrics is not None:
            self._metrics.record_signature_source(routing.signature_source)
        return routing

    def _resolve(self, active: ActiveZones | None, prompt: Prompt | None,
                 prefill_counts: npt.ArrayLike | None) -> RoutingInput:
        if active is None:
            return NO_ROUTING_INPUT
        table = active.table
        if prefill_counts is not None:
            sig = _build(table.spec.build, prefill_counts)
            if sig is not None:
                return RoutingInput(sig, "prefill", active)
        if prompt is None:
            return RoutingInput(None, "none", active)
        units = prompt.units()
        cache = self.cache_for(table.geometry)
        if units is not None and cache is not None:
            hit = cache.lookup(units)
            self._record_lookup(hit)
            if hit is not None:
                sig = self._from_hit(active, prompt, hit)
                if sig is not None:
                    return RoutingInput(sig, "cache", active)
        coords = self._predict_coords(active, prompt)
        if coords is not None:
            return RoutingInput(coords, "predictor", active)
        return RoutingInput(None, "none", active)

    def _from_hit(self, active: ActiveZones, prompt: Prompt, hit: CacheHit) -> FloatArray | None:
        observed = _build(active.table.spec.build, hit.counts)
        if hit.exact or observed is None:
            return observed
        if hit.observed == hit.covered:
            text, ids = _tail(prompt, hit.covered)
        else:
            text, ids = prompt.text, prompt.input_ids
        predicted = self._predict(active, text, ids)
        if predicted is None:
            return observed
        share = np.float32(hit.observed / hit.total)
        mixed = share * observed + (np.float32(1.0) - share) * predicted
        norm = float(np.sqrt(np.dot(mixed, mixed)))
        if not np.isfinite(norm) or norm == 0.0:
            return observed
        return (mixed / np.float32(norm)).astype(np.float32)

    def _predict(
        self, active: ActiveZones, text: str | None, ids: Sequence[int] | None
    ) -> FloatArray | None:
        predictor = active.table.predictor
        if predictor is None or not self._settings.predictor:
            return None
        try:
            return predictor.predict(text, ids)
        except Exception:  # a predictor bug must cost a routing hint, never a request
            return None

    def _predict_coords(self, active: ActiveZones, prompt: Prompt) -> LowRankSignature | None:
        """The predictor source: the prediction in the predictor's coordinates, which the band
        ranks without building the signature (`LowRankSignature`)."""
        predictor = active.table.predictor
        if predictor is None or not self._settings.predictor:
            return None
        try:
            coords = predictor.coords(prompt.text, prompt.input_ids)
        except Exception:  # a predictor bug must cost a routing hint, never a request
            return None
        return None if coords is None else LowRankSignature(coords, predictor.basis)

    def _record_lookup(self, hit: CacheHit | None) -> None:
        if self._metrics is not None:
            self._metrics.record_cache_lookup(
                "miss" if hit is None else ("hit" if hit.exact else "partial"))

    def _record_size(self, cache: SignatureCache) -> None:
        # Only learning changes the cache (entries are added and evicted there).
        if self._metrics is not None:
            self._metrics.set_cache_size(len(cache), cache.nbytes)

    def cache_for(self, geometry: ModelGeometry) -> SignatureCache | None:
        """The cache for this geometry; a table of another model starts an empty one, since
        counts of another geometry mean nothing to it."""
        s = self._settings
        if not s.cache:
            return None
        if self._cache is None or self._cache.geometry != geometry:
            self._cache = SignatureCache(
                geometry, block_tokens=s.block_tokens, block_bytes=s.block_bytes,
                max_entries=s.max_entries, max_bytes=s.max_bytes,
            )
        return self._cache

    # --- learning ------------------------------------------------------------------------------
    def learn_prefill(self, prompt: Prompt | None, prompt_counts: npt.ArrayLike) -> bool:
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
        self._record_size(cache)
        return True

    def learn_output(
        self,
        prompt: Prompt | None,
        output_counts: npt.ArrayLike,
        *,
        text: str | None = None,
        output_ids: Sequence[int] | None = None,
    ) -> bool:
        """Learn a decode result's output counts (`gateway.eldr.prompts.output_expert_counts`)
        as the prefix of the conversation's next turn; False when nothing could be learned."""
        active = self._zones.active
        if active is None or prompt is None:
            return False
        units = prompt.units()
        out = output_units(prompt, text, output_ids)
        cache = self.cache_for(active.table.geometry)
        if units is None or out is None or cache is None:
            return False
        try:
            cache.learn_output(units, out, output_counts)
        except ValueError:
            return False
        self._record_size(cache)
        return True


def _build(build: Callable[[npt.ArrayLike], FloatArray | None], counts: npt.ArrayLike
           ) -> FloatArray | None:
    try:
        return build(counts)
    except (SignatureError, ValueError, TypeError):
        return None


def _tail(prompt: Prompt, covered: int) -> tuple[str | None, tuple[int, ...] | None]:
    if prompt.input_ids is not None:
        return None, prompt.input_ids[covered:]
    if prompt.text is None:
        return None, None
    raw = prompt.text.encode("utf-8", "surrogatepass")[covered:]
    return raw.decode("utf-8", "ignore"), None


class LocalityResolver:
    """Adapts `SignatureResolver` to dispatch's `RoutingResolver` protocol: reads the prompt
    once per request (`prompt_of`), the prefill-first answer's counts, and the decode answer's
    routed experts."""

    wants_decode_results = True

    def __init__(self, core: SignatureResolver) -> None:
        self.core = core
        self._mismatches_logged: set[tuple[Any, Any]] = set()

    async def resolve(self, ctx: RequestContext) -> RoutingInput:
        return self.core.resolve(prompt_of(ctx))

    def from_prefill(self, ctx: RequestContext, prefill_result: Any) -> RoutingInput:
        """Prefill-first: read `prompt_expert_counts` (meta_info, or sglext on OpenAI answers),
        learn it, and route on it; anything unusable falls through to cache/predictor."""
        prompt = prompt_of(ctx)
        counts = self._prefill_counts(prefill_result)
        if counts is not None:
            self.core.learn_prefill(prompt, counts)
        return self.core.resolve(prompt, counts)

    def _prefill_counts(self, result: Any) -> IntArray | None:
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
                    # Another model's routing: meaningless for this table. Said once per
                    # shape, since every request would repeat it.
                    if shape not in self._mismatches_logged:
                        self._mismatches_logged.add(shape)
                        log.error("prefill reports routing of %s layers x %s experts but the zone "
                                  "table is for %s: every decision falls back until a matching "
                                  "table is loaded", shape[0], shape[1], describe(geometry))
                    return None
            try:
                return decode_counts(meta["prompt_expert_counts"], geometry)
            except RoutedExpertsError:
                return None
        return None

    def observe_decode(
        self, ctx: RequestContext, decode_worker_id: str, selection: Selection | None, result: Any
    ) -> None:
        active = self.core.active
        if active is None or not isinstance(result, dict):
            return
        counts = output_expert_counts(result, ctx.body, active.table.geometry)
        if counts is None:
            return
        text, output_ids = output_of(result)
        self.core.learn_output(prompt_of(ctx), counts, text=text, output_ids=output_ids)

"""The single hook where dispatch obtains the decode routing input for a request.

Dispatch calls `routing = await resolver.resolve(ctx)` only when the decode policy has
`needs_signature = True` (dual flow), or `resolver.from_prefill(ctx, prefill_result)` after the
prefill answered (prefill-first flow). The real resolver (signature cache > predictor > none, and
prefill-reported counts) is `gateway.eldr.resolver.LocalityResolver`; `NullResolver` is the
default that always answers "no signature", which every policy accepts.

Results: when `wants_decode_results` is True, dispatch calls `observe_decode` with each parsed
non-streaming decode answer (streams are passed through untouched and are not observed), so a
resolver can learn signatures from `meta_info.routed_experts` and feed the calibration log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from gateway.routing import NO_ROUTING_INPUT, RoutingInput, Selection, SignatureSource

if TYPE_CHECKING:
    from gateway.eldr.prompts import Prompt


@dataclass(slots=True)
class RequestContext:
    endpoint: str  # the client path: "/generate", "/v1/chat/completions", "/v1/completions"
    body: dict[str, Any]  # the client's parsed JSON object; treat as read-only
    stream: bool
    return_logprob: bool  # prefill input logprobs must be merged into the decode answer
    batch: int | None  # batch size from bootstrap.batch_size (None: single request)
    started: float  # time.perf_counter() at arrival
    request_id: str | None = None
    routing_key: str | None = None  # the first --routing-key-headers header present
    upstream_body: dict[str, Any] | None = None  # set by a ResultHook: what workers get instead
    signature_source: SignatureSource = "none"  # how the decode's routing input was resolved
    # Locality's view of the request, parsed once on first use (gateway.eldr.prompts.prompt_of).
    prompt: Prompt | None = None
    prompt_parsed: bool = False
    # Calibration log (gateway.eldr.calibration_hook): sampled, and whether the client itself
    # asked for routed experts (then they are not stripped from its answer).
    calibration_sampled: bool = False
    client_asked_routed_experts: bool = False
    # Workers that failed an earlier attempt of this request: retries go elsewhere if they can.
    failed_workers: set[str] = field(default_factory=set)


class RoutingResolver(Protocol):
    wants_decode_results: bool

    async def resolve(self, ctx: RequestContext) -> RoutingInput: ...

    def from_prefill(self, ctx: RequestContext, prefill_result: Any) -> RoutingInput: ...

    def observe_decode(self, ctx: RequestContext, decode_worker_id: str,
                       selection: Selection | None, result: Any) -> None: ...


class ResultHook(Protocol):
    """Optional dispatch hook (the calibration log): may change the body sent upstream and see
    (and modify, returning True) each parsed non-streaming decode answer."""

    def prepare(self, ctx: RequestContext) -> dict[str, Any] | None: ...

    def on_result(self, ctx: RequestContext, decode_worker_id: str,
                  selection: Selection | None, parsed: Any, prefill: Any = None) -> bool: ...

    def close(self) -> None: ...


class NullResolver:
    """No signature source: every request routes on load alone."""

    wants_decode_results = False

    async def resolve(self, ctx: RequestContext) -> RoutingInput:
        return NO_ROUTING_INPUT

    def from_prefill(self, ctx: RequestContext, prefill_result: Any) -> RoutingInput:
        return NO_ROUTING_INPUT

    def observe_decode(self, ctx: RequestContext, decode_worker_id: str,
                       selection: Selection | None, result: Any) -> None:
        return None

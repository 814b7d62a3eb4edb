"""Signature resolution order, cache/predictor mixing, prompt extraction, learning from results."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from gateway.eldr.metrics import EldrMetrics
from gateway.eldr.prompts import (
    Prompt,
    output_expert_counts,
    output_units,
    prompt_from_request,
    render_message,
)
from gateway.eldr.resolver import LocalityResolver, ResolverSettings, SignatureResolver
from gateway.eldr.runtime import ActiveZones
from gateway.resolver import RequestContext
from gateway.routing import LowRankSignature
from tests.eldr.helpers import TINY, table
from zones.geometry import ModelGeometry
from zones.predictor import train_predictor
from zones.routed_experts import encode_counts, encode_routed_experts
from zones.table import ZoneTable, make_table

CENTROIDS = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


@dataclass
class Source:
    active: ActiveZones | None


def with_predictor() -> ZoneTable:
    base = table(CENTROIDS, ["a", "b", "c"])
    texts = ["alpha apple", "alpha ant", "beta bear", "beta bee", "gamma goat", "gamma gnu"]
    sigs = np.array([[1, 0, 0]] * 2 + [[0, 1, 0]] * 2 + [[0, 0, 1]] * 2, dtype=np.float32)
    pred = train_predictor(texts, None, sigs, num_buckets=64, rank=3, ridge=0.01)
    return make_table(base.spec, base.centroids, list(base.workers), predictor=pred)


def active(t: ZoneTable) -> ActiveZones:
    return ActiveZones(t, tuple(t.workers), 1, time.time(), "test")


def rows(expert: int, n: int) -> str:
    """base64 routed_experts for n output tokens all routed to `expert` (1 layer, top-1)."""
    return encode_routed_experts(np.full((n, 1, 1), expert, dtype=np.int32))


def test_no_table_resolves_none() -> None:
    r = SignatureResolver(Source(None))
    routing = r.resolve(Prompt("generate", text="alpha"), np.ones((1, 3), np.int32))
    assert routing.signature is None and routing.signature_source == "none"
    assert r.counts["none"] == 1


def test_prefill_counts_win_and_use_the_table_spec() -> None:
    t = with_predictor()
    r = SignatureResolver(Source(active(t)))
    counts = np.array([[0, 3, 4]], dtype=np.int32)
    routing = r.resolve(Prompt("generate", text="alpha apple"), counts)
    assert routing.signature_source == "prefill"
    np.testing.assert_allclose(routing.signature, t.spec.build(counts))  # type: ignore[arg-type]
    np.testing.assert_allclose(routing.signature, [0, 0.6, 0.8], atol=1e-6)  # type: ignore[arg-type]


def test_all_zero_prefill_counts_fall_through_to_predictor() -> None:
    r = SignatureResolver(Source(active(with_predictor())))
    routing = r.resolve(Prompt("generate", text="beta bear"), np.zeros((1, 3), np.int32))
    assert routing.signature_source == "predictor"


def test_predictor_used_on_cache_miss() -> None:
    t = with_predictor()
    r = SignatureResolver(Source(active(t)))
    routing = r.resolve(Prompt("generate", text="gamma goat"))
    assert routing.signature_source == "predictor"
    # Kept in the predictor's coordinates; the signature they stand for is the prediction.
    assert isinstance(routing.signature, LowRankSignature)
    assert routing.signature.basis is t.predictor.basis  # type: ignore[union-attr]
    vector = routing.signature.vector()
    np.testing.assert_allclose(vector, t.predictor.predict("gamma goat", None),  # type: ignore[union-attr]
                               atol=1e-6)
    assert int(np.argmax(vector)) == 2


def test_exact_cache_hit_is_the_counts_signature() -> None:
    t = with_predictor()
    r = SignatureResolver(Source(active(t)))
    prompt = Prompt("generate", text="gamma goat")
    assert r.learn_prefill(prompt, np.array([[5, 0, 0]], np.int32))
    routing = r.resolve(prompt)
    assert routing.signature_source == "cache"
    np.testing.assert_allclose(routing.signature, [1, 0, 0], atol=1e-6)  # type: ignore[arg-type]


def test_partial_hit_mixes_observed_and_predicted_tail_by_share() -> None:
    t = with_predictor()
    r = SignatureResolver(Source(active(t)))
    head = "alpha apple alpha ant "  # 22 bytes, observed by a prefill-first result
    assert r.learn_prefill(Prompt("generate", text=head), np.array([[4, 0, 0]], np.int32))
    full = head + "beta bear beta bee"  # 18 more bytes
    routing = r.resolve(Prompt("generate", text=full))
    assert routing.signature_source == "cache"
    f = len(head) / len(full)
    predicted = t.predictor.predict("beta bear beta bee", None)  # type: ignore[union-attr]
    assert predicted is not None
    want = f * np.array([1, 0, 0], np.float32) + (1 - f) * predicted
    want /= np.linalg.norm(want)
    np.testing.assert_allclose(routing.signature, want, atol=1e-5)  # type: ignore[arg-type]


def test_partial_hit_without_predictor_uses_observed_counts() -> None:
    t = table(CENTROIDS, ["a", "b", "c"])
    r = SignatureResolver(Source(active(t)))
    r.learn_prefill(Prompt("generate", input_ids=(1, 2, 3)), np.array([[0, 2, 0]], np.int32))
    routing = r.resolve(Prompt("generate", input_ids=(1, 2, 3, 4)))
    assert routing.signature_source == "cache"
    np.testing.assert_allclose(routing.signature, [0, 1, 0], atol=1e-6)  # type: ignore[arg-type]


def test_nothing_known_resolves_none_and_sources_are_counted() -> None:
    registry = CollectorRegistry()
    metrics = EldrMetrics(registry)
    r = SignatureResolver(Source(active(table(CENTROIDS, ["a", "b", "c"]))), metrics=metrics)
    assert r.resolve(Prompt("generate", text="no predictor here")).signature_source == "none"
    assert r.resolve(None).signature_source == "none"
    assert r.counts == {"prefill": 0, "cache": 0, "predictor": 0, "none": 2}
    assert registry.get_sample_value(
        "eldr_signature_resolutions_total", {"source": "none"}
    ) == 2
    assert registry.get_sample_value(
        "eldr_signature_cache_lookups_total", {"result": "miss"}
    ) == 1


def test_chat_continuation_hits_cache_learned_from_decode_output() -> None:
    t = table(CENTROIDS, ["a", "b", "c"])
    r = SignatureResolver(Source(active(t)), ResolverSettings(block_bytes=16))
    turn1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    p1 = prompt_from_request("/v1/chat/completions", {"messages": turn1})
    assert p1 is not None
    assert r.learn_output(p1, np.array([[0, 0, 5]], np.int32), text="Hello! How can I help?")
    turn2 = [*turn1, {"role": "assistant", "content": "Hello! How can I help?"},
             {"role": "user", "content": "tell me a joke"}]
    p2 = prompt_from_request("/v1/chat/completions", {"messages": turn2})
    routing = r.resolve(p2)
    assert routing.signature_source == "cache"
    np.testing.assert_allclose(routing.signature, [0, 0, 1], atol=1e-6)  # type: ignore[arg-type]


def test_generate_ids_continuation_uses_output_ids() -> None:
    t = table(CENTROIDS, ["a", "b", "c"])
    r = SignatureResolver(Source(active(t)), ResolverSettings(block_tokens=2))
    p1 = Prompt("generate", input_ids=(10, 11, 12))
    assert r.learn_output(p1, np.array([[0, 2, 0]], np.int32), output_ids=[20, 21, 22])
    routing = r.resolve(Prompt("generate", input_ids=(10, 11, 12, 20, 21, 22, 30)))
    assert routing.signature_source == "cache"


def test_bad_routed_experts_payload_is_ignored() -> None:
    def answer(payload: str) -> dict[str, object]:
        return {"text": "y", "meta_info": {"prompt_tokens": 0, "routed_experts": payload}}

    assert output_expert_counts(answer("not base64!"), {}, TINY) is None
    assert output_expert_counts(answer(rows(7, 2)), {}, TINY) is None  # id 7 >= E
    assert output_expert_counts(answer(rows(2, 2)), {}, TINY).tolist() == [[0, 0, 2]]  # type: ignore[union-attr]


def test_learning_needs_a_prompt_and_counts_of_the_geometry() -> None:
    r = SignatureResolver(Source(active(table(CENTROIDS, ["a", "b", "c"]))))
    assert not r.learn_output(None, np.ones((1, 3), np.int32), text="y")
    assert not r.learn_output(Prompt("generate", text="x"), np.ones((2, 3), np.int32), text="y")


def test_new_geometry_starts_a_new_cache() -> None:
    source = Source(active(table(CENTROIDS, ["a", "b", "c"])))
    r = SignatureResolver(source)
    first = r.cache_for(TINY)
    other = ModelGeometry("other", num_layers=1, num_experts=4, top_k=1)
    assert r.cache_for(other) is not first
    assert r.cache_for(other) is r.cache_for(other)


def test_cache_can_be_disabled() -> None:
    r = SignatureResolver(
        Source(active(table(CENTROIDS, ["a", "b", "c"]))), ResolverSettings(cache=False)
    )
    assert not r.learn_prefill(Prompt("generate", text="x"), np.ones((1, 3), np.int32))
    assert r.resolve(Prompt("generate", text="x")).signature_source == "none"


def test_predictor_can_be_disabled() -> None:
    on = SignatureResolver(Source(active(with_predictor())))
    off = SignatureResolver(Source(active(with_predictor())), ResolverSettings(predictor=False))
    assert on.resolve(Prompt("generate", text="gamma goat")).signature_source == "predictor"
    assert off.resolve(Prompt("generate", text="gamma goat")).signature_source == "none"


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/generate", {"text": "hi"}, Prompt("generate", text="hi")),
        ("/generate", {"input_ids": [1, 2], "text": "x"}, Prompt("generate", input_ids=(1, 2))),
        ("/generate", {"text": ["a", "b"]}, None),  # batch
        ("/generate", {"input_ids": [[1], [2]]}, None),  # batch
        ("/generate", {}, None),
        ("/v1/completions", {"prompt": "p"}, Prompt("completion", text="p")),
        ("/v1/completions", {"prompt": [5, 6]}, Prompt("completion", input_ids=(5, 6))),
        ("/v1/completions", {"prompt": ["only"]}, Prompt("completion", text="only")),
        ("/v1/completions", {"prompt": ["a", "b"]}, None),
        ("/v1/chat/completions", {"messages": "nope"}, None),
        ("/v1/chat/completions", {"messages": [1]}, None),
    ],
)
def test_prompt_from_request(path: str, body: dict[str, object], expected: Prompt | None) -> None:
    assert prompt_from_request(path, body) == expected


def test_chat_rendering_has_the_prefix_property() -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}]
    p1 = prompt_from_request("/v1/chat/completions", {"messages": msgs})
    assert p1 is not None and p1.text == render_message("user", "a")
    out = output_units(p1, "reply", None)
    p2 = prompt_from_request(
        "/v1/chat/completions", {"messages": [*msgs, {"role": "assistant", "content": "reply"}]}
    )
    assert p2 is not None and out is not None
    units1 = p1.units()
    assert units1 is not None and (units1 + out).data == p2.text.encode()  # type: ignore[union-attr]


# --- the dispatch adapter ----------------------------------------------------------------------


def ctx(endpoint: str, body: dict[str, object], batch: int | None = None) -> RequestContext:
    return RequestContext(endpoint, body, False, False, batch, 0.0)


async def test_locality_resolver_dual_flow_learns_from_decode_and_hits_next_turn() -> None:
    t = table(CENTROIDS, ["a", "b", "c"])
    resolver = LocalityResolver(SignatureResolver(Source(active(t))))
    assert resolver.wants_decode_results
    first = ctx("/generate", {"text": "What is the capital of France?"})
    assert (await resolver.resolve(first)).signature_source == "none"
    # PD decode answer: rows for the 4 prompt positions are invalid (zeros), then 3 output rows.
    rows_b64 = encode_routed_experts(
        np.array([0, 0, 0, 0, 2, 2, 1], dtype=np.int32).reshape(7, 1, 1)
    )
    answer = {"text": " Paris.", "meta_info": {"prompt_tokens": 4, "routed_experts": rows_b64}}
    resolver.observe_decode(first, "c", None, answer)
    nxt = ctx("/generate", {"text": "What is the capital of France? Paris. And Spain?"})
    routing = await resolver.resolve(nxt)
    assert routing.signature_source == "cache"
    want = np.array([0, 1, 2], np.float32) / np.sqrt(np.float32(5))  # output rows only
    np.testing.assert_allclose(routing.signature, want, atol=1e-6)  # type: ignore[arg-type]


async def test_locality_resolver_prefill_first_uses_and_learns_prompt_counts() -> None:
    t = table(CENTROIDS, ["a", "b", "c"])
    resolver = LocalityResolver(SignatureResolver(Source(active(t))))
    c = ctx("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    prefill = {"sglext": {"prompt_expert_counts": encode_counts(np.array([[0, 0, 7]], np.int32)),
                          "expert_geometry": TINY.to_dict()}}
    routing = resolver.from_prefill(c, prefill)
    assert routing.signature_source == "prefill"
    np.testing.assert_allclose(routing.signature, [0, 0, 1], atol=1e-6)  # type: ignore[arg-type]
    again = ctx("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert (await resolver.resolve(again)).signature_source == "cache"


def test_locality_resolver_ignores_unusable_prefill_answers() -> None:
    t = table(CENTROIDS, ["a", "b", "c"])
    resolver = LocalityResolver(SignatureResolver(Source(active(t))))
    other = {"num_layers": 2, "num_experts": 3, "top_k": 1, "name": "x"}
    answers: list[object] = [
        None, "text", {"meta_info": {}},
        {"meta_info": {"prompt_expert_counts": "!!"}},
        {"meta_info": {"prompt_expert_counts": encode_counts(np.ones((1, 3), np.int32)),
                       "expert_geometry": other}},
    ]
    for answer in answers:
        routing = resolver.from_prefill(ctx("/generate", {"text": "x"}), answer)
        assert routing.signature_source == "none"


async def test_locality_resolver_skips_batches_and_answers_without_prompt_tokens() -> None:
    t = table(CENTROIDS, ["a", "b", "c"])
    resolver = LocalityResolver(SignatureResolver(Source(active(t))))
    batch = ctx("/generate", {"text": ["a", "b"]}, batch=2)
    assert (await resolver.resolve(batch)).signature_source == "none"
    single = ctx("/generate", {"text": "q"})
    no_count = {"text": "r", "meta_info": {"routed_experts": rows(1, 2)}}  # no prompt_tokens
    resolver.observe_decode(single, "a", None, no_count)
    resolver.observe_decode(single, "a", None, [{"text": "r"}])
    assert (await resolver.resolve(ctx("/generate", {"text": "qr"}))).signature_source == "none"

"""Prefix cache of the emulated workers (SGLang's RadixCache in miniature).

Unit tests of `loadtest.emulator.prefix_cache.PrefixCache`, the prefill engine's match/commit
hooks, worker-level behaviour over HTTP (regular and PD), and the wire contract: where
`cached_tokens` appears, pinned to sglang 0.5.23's sources. The last group reads the sglang
wheel when one is available (`tests/emulator/sglang_source.py` says where it is looked for) and
is skipped otherwise; the expectations of the other tests cite the same lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from loadtest.emulator.cluster import Cluster, ClusterConfig, run_cluster
from loadtest.emulator.config import EngineOptions
from loadtest.emulator.costmodel import CostModel
from loadtest.emulator.engine import PrefillEngine
from loadtest.emulator.prefix_cache import PrefixCache
from loadtest.emulator.worker import KV_TOKENS_PER_SLOT
from tests.emulator.sglang_source import SourceReader, sglang_reader
from tests.emulator.workers import worker
from zones.geometry import geometry_by_name

PROMPT = ("the court reads the contract and the lawyer explains every clause of the contract "
          "to the judge while the clerk writes the minutes of the hearing")


# ------------------------------------------------------------------ the tree itself

def test_match_and_insert_at_token_granularity() -> None:
    c = PrefixCache(100)
    assert c.match([1, 2, 3]) == 0
    assert c.insert([1, 2, 3, 4]) == 4
    assert c.match([1, 2, 3, 4, 5]) == 4
    assert c.match([1, 2, 9]) == 2          # page_size 1: a match may end mid-edge
    assert c.match([7]) == 0
    assert c.insert([1, 2, 9, 9]) == 2      # splits the edge after [1, 2]
    assert c.size == 6
    assert c.match([1, 2, 9, 9]) == 4 and c.match([1, 2, 3, 4]) == 4
    assert c.insert([1, 2]) == 0            # already cached: nothing added
    assert c.size == 6


def test_lru_evicts_least_recently_used_leaf_under_capacity() -> None:
    c = PrefixCache(10)
    c.insert([1, 1, 1, 1, 1])
    c.insert([2, 2, 2, 2, 2])
    assert c.match([1, 1, 1, 1, 1]) == 5    # refresh A: B is now least recently used
    c.insert([3, 3, 3, 3, 3])
    assert c.size == 10 and c.evicted_tokens == 5
    assert c.match([2, 2, 2, 2, 2]) == 0
    assert c.match([1, 1, 1, 1, 1]) == 5 and c.match([3, 3, 3, 3, 3]) == 5


def test_eviction_removes_whole_leaves_then_their_parents() -> None:
    c = PrefixCache(8)
    c.insert([5, 6, 7, 8])       # becomes [5, 6] -> {[7, 8], [9, 9]}
    c.insert([5, 6, 9, 9])
    assert c.size == 6
    c.insert([1, 2, 3, 4, 5, 6, 7, 8])  # needs everything else gone
    assert c.size == 8 and c.evicted_tokens == 6
    assert c.match([5, 6]) == 0
    assert c.match([1, 2, 3, 4, 5, 6, 7, 8]) == 8


def test_insert_never_evicts_its_own_path_and_is_truncated_to_capacity() -> None:
    c = PrefixCache(4)
    c.insert([1, 2, 3])
    # The new path shares [1, 2] with the old leaf; the old suffix [3] must go, not [1, 2].
    c.insert([1, 2, 8, 8])
    assert c.size == 4 and c.match([1, 2, 8, 8]) == 4 and c.match([1, 2, 3]) == 2
    assert c.insert(list(range(10, 20))) == 4   # only the first 4 tokens fit
    assert c.size == 4 and c.match(list(range(10, 20))) == 4
    zero = PrefixCache(0)
    assert zero.insert([1, 2]) == 0 and zero.match([1, 2]) == 0


def test_match_equals_longest_common_prefix_without_eviction() -> None:
    rng = random.Random(7)
    c = PrefixCache(10**9)
    seqs: list[list[int]] = []
    for _ in range(300):
        if seqs and rng.random() < 0.6:   # extend or branch off an earlier sequence
            base = rng.choice(seqs)
            seq = base[:rng.randint(0, len(base))] + [rng.randint(0, 5) for _ in range(
                rng.randint(0, 8))]
        else:
            seq = [rng.randint(0, 5) for _ in range(rng.randint(0, 12))]
        query = seq[:rng.randint(0, len(seq))] + [rng.randint(0, 5) for _ in range(3)]

        def lcp(a: list[int], b: list[int]) -> int:
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            return n
        assert c.match(query) == max((lcp(query, s) for s in seqs), default=0)
        c.insert(seq)
        seqs.append(seq)
    assert c.size == len({tuple(s[:i + 1]) for s in seqs for i in range(len(s))})


def test_size_never_exceeds_capacity_under_random_load() -> None:
    rng = random.Random(3)
    c = PrefixCache(50)
    for _ in range(500):
        seq = [rng.randint(0, 3) for _ in range(rng.randint(1, 30))]
        c.insert(seq)
        assert c.size <= 50
        assert c.match(seq) == len(seq)   # what was just inserted is cached


def test_reset_and_invalid_capacity() -> None:
    c = PrefixCache(10)
    c.insert([1, 2, 3])
    c.reset()
    assert c.size == 0 and c.match([1, 2, 3]) == 0
    with pytest.raises(ValueError):
        PrefixCache(-1)


# ------------------------------------------------------------------ prefill engine

async def test_prefill_engine_matches_when_the_turn_comes_and_charges_uncached_only() -> None:
    per_token = 1e-3
    engine = PrefillEngine(CostModel.fixed(0.0, geometry_by_name("Qwen3-30B-A3B"),
                                           prefill_seconds_per_token=per_token))
    cache = PrefixCache(1000)
    ids = list(range(2, 42))

    async def one() -> int:
        return await engine.run(len(ids), match=lambda: min(cache.match(ids), len(ids) - 1),
                                commit=lambda: cache.insert(ids))
    # Both queue at once: the second matches only after the first has committed.
    first, second = await asyncio.gather(one(), one())
    assert (first, second) == (0, len(ids) - 1)
    stats = engine.stats()
    assert stats.tokens == len(ids) + 1 and stats.cached_tokens == len(ids) - 1
    assert stats.seconds_sum == pytest.approx((len(ids) + 1) * per_token)


# ------------------------------------------------------------------ workers over HTTP

async def generate(session: aiohttp.ClientSession, url: str, body: dict[str, Any]
                   ) -> dict[str, Any]:
    async with session.post(url + "/generate", json=body) as resp:
        assert resp.status == 200, await resp.text()
        out: dict[str, Any] = await resp.json()
        return out


def text_body(**extra: Any) -> dict[str, Any]:
    return {"text": PROMPT, "sampling_params": {"max_new_tokens": 4, "ignore_eos": True},
            **extra}


async def test_repeated_prompt_reports_cached_tokens_and_prefills_faster(
        session: aiohttp.ClientSession) -> None:
    # A real (non-instant) cost model, so the prefill takes modelled time.
    async with worker(instant=False, time_scale=1.0) as w:
        engine = w.worker.prefill_engine
        first = await generate(session, w.url, text_body())
        t_first = engine.stats().seconds_sum
        second = await generate(session, w.url, text_body())
        t_second = engine.stats().seconds_sum - t_first
        n = first["meta_info"]["prompt_tokens"]
        assert first["meta_info"]["cached_tokens"] == 0
        # schedule_batch.py _compute_max_prefix_len: at most input_len - 1 tokens cached.
        assert second["meta_info"]["cached_tokens"] == n - 1
        cost = w.worker.cost_model
        assert t_first == pytest.approx(cost.prefill_seconds(n))
        assert t_second == pytest.approx(cost.prefill_seconds(1))
        assert t_second < t_first
        async with session.get(w.url + "/emulator/stats") as resp:
            pc = (await resp.json())["prefix_cache"]
        assert pc["enabled"] and pc["capacity_tokens"] == w.worker.max_total_num_tokens
        assert (pc["prefills"], pc["prompt_tokens"], pc["cached_tokens"]) == (2, 2 * n, n - 1)
        async with session.get(w.url + "/v1/loads") as resp:
            load = (await resp.json())["loads"][0]
        assert load["cache_hit_rate"] == pytest.approx((n - 1) / n)
        assert load["total_prefill_uncached_tokens"] == n + 1


async def test_regular_worker_caches_prompt_and_output_after_finishing(
        session: aiohttp.ClientSession) -> None:
    async with worker() as w:
        prompt = list(range(100, 140))
        out = await generate(session, w.url, {"input_ids": prompt, "sampling_params": {
            "max_new_tokens": 5, "ignore_eos": True}})
        # mem_cache/common.py release_kv_cache: prompt + outputs but the last (never forwarded).
        follow = prompt + out["output_ids"] + [7, 8, 9]
        again = await generate(session, w.url, {"input_ids": follow, "sampling_params": {
            "max_new_tokens": 2, "ignore_eos": True}})
        assert again["meta_info"]["cached_tokens"] == len(prompt) + len(out["output_ids"]) - 1


async def test_streaming_chunks_carry_cached_tokens(session: aiohttp.ClientSession) -> None:
    async with worker() as w:
        await generate(session, w.url, text_body())
        async with session.post(w.url + "/generate", json=text_body(stream=True)) as resp:
            raw = (await resp.read()).decode()
    chunks = [e[len("data: "):] for e in raw.split("\n\n") if e.startswith("data: {")]
    assert len(chunks) >= 2
    values = {orjson.loads(c)["meta_info"]["cached_tokens"] for c in chunks}
    assert len(values) == 1 and values.pop() > 0


async def test_capacity_follows_max_total_num_tokens_and_evicts_lru(
        session: aiohttp.ClientSession) -> None:
    # max_batch_size 1: max_total_num_tokens = KV_TOKENS_PER_SLOT tokens of prefix cache.
    async with worker(max_batch_size=1) as w:
        cap = w.worker.max_total_num_tokens
        assert cap == KV_TOKENS_PER_SLOT and w.worker.prefix_cache is not None
        assert w.worker.prefix_cache.capacity_tokens == cap
        n = cap * 3 // 4
        a = [2 + (i % 1000) for i in range(n)]
        b = [3000 + (i % 1000) for i in range(n)]
        body = {"sampling_params": {"max_new_tokens": 1, "ignore_eos": True}}
        await generate(session, w.url, {"input_ids": a, **body})
        await generate(session, w.url, {"input_ids": b, **body})   # evicts a (LRU)
        assert w.worker.prefix_cache.size <= cap
        out_a = await generate(session, w.url, {"input_ids": a, **body})
        assert out_a["meta_info"]["cached_tokens"] == 0


async def test_disable_radix_cache_and_flush_cache(session: aiohttp.ClientSession) -> None:
    async with worker(disable_radix_cache=True) as w:
        await generate(session, w.url, text_body())
        again = await generate(session, w.url, text_body())
        assert again["meta_info"]["cached_tokens"] == 0
        async with session.get(w.url + "/server_info") as resp:
            assert (await resp.json())["disable_radix_cache"] is True
    async with worker() as w:
        await generate(session, w.url, text_body())
        async with session.post(w.url + "/flush_cache") as resp:
            assert resp.status == 200
        again = await generate(session, w.url, text_body())
        assert again["meta_info"]["cached_tokens"] == 0


async def test_flush_cache_refused_while_busy(session: aiohttp.ClientSession) -> None:
    # scheduler.py flush_cache: not fully idle -> no flush; http_server answers 400.
    async with worker(instant=False, time_scale=1.0) as w:
        body = text_body()
        body["sampling_params"]["max_new_tokens"] = 200
        task = asyncio.ensure_future(generate(session, w.url, body))
        try:
            for _ in range(200):
                if not w.worker.is_idle():
                    break
                await asyncio.sleep(0.005)
            async with session.post(w.url + "/flush_cache") as resp:
                assert resp.status == 400
                assert await resp.text() == "Flush cache failed.\n"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await task


@contextlib.asynccontextmanager
async def pd_cluster(**engine: Any) -> AsyncIterator[Cluster]:
    opts = EngineOptions(**{"instant": True, **engine})
    async with run_cluster(ClusterConfig(prefill=1, decode=1, engine=opts)) as c:
        yield c


async def test_pd_decode_reports_the_prefills_cached_tokens(
        session: aiohttp.ClientSession) -> None:
    async with pd_cluster() as c:
        outs = []
        for room in (21, 22):
            body = text_body(bootstrap_host="127.0.0.1",
                             bootstrap_port=c.prefill[0].bootstrap_port, bootstrap_room=room)
            outs.append(await asyncio.gather(generate(session, c.prefill_urls[0], body),
                                             generate(session, c.decode_urls[0], body)))
        decode_worker = c.decode[0].worker
        assert decode_worker.prefix_cache is None   # no radix cache on a PD decode
    (p1, d1), (p2, d2) = outs
    n = p1["meta_info"]["prompt_tokens"]
    assert p1["meta_info"]["cached_tokens"] == d1["meta_info"]["cached_tokens"] == 0
    # disaggregation/decode.py _commit_transfer_to_req: req.cached_tokens = cached_tokens[0],
    # the prefill's figure, shipped in the metadata buffer.
    assert p2["meta_info"]["cached_tokens"] == d2["meta_info"]["cached_tokens"] == n - 1


async def test_openai_usage_reports_cached_tokens_only_with_cache_report(
        session: aiohttp.ClientSession) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3}
    for report in (False, True):
        async with worker(enable_cache_report=report) as w:
            for _ in range(2):
                async with session.post(w.url + "/v1/chat/completions", json=body) as resp:
                    usage = (await resp.json())["usage"]
            stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
            async with session.post(w.url + "/v1/chat/completions", json=stream_body) as resp:
                raw = (await resp.read()).decode()
        last_usage = [orjson.loads(e[len("data: "):])["usage"] for e in raw.split("\n\n")
                      if e.startswith("data: {") and '"usage":{' in e][-1]
        if report:
            cached = usage["prompt_tokens"] - 1
            assert usage["prompt_tokens_details"] == {"cached_tokens": cached}
            assert last_usage["prompt_tokens_details"] == {"cached_tokens": cached}
        else:
            assert usage["prompt_tokens_details"] is None
            assert last_usage["prompt_tokens_details"] is None


# ------------------------------------------------------------------ pinned to sglang 0.5.23

@pytest.fixture(scope="module")
def sglang_source() -> Iterator[SourceReader]:
    with sglang_reader() as read:
        yield read


def test_contract_cached_tokens_location_matches_sglang(sglang_source: SourceReader) -> None:
    read = sglang_source
    # meta_info["cached_tokens"] is req.cached_tokens (tokenizer_manager._handle_batch_output).
    assert '"cached_tokens": recv_obj.cached_tokens[i],' in read(
        "managers/tokenizer_manager.py")
    # OpenAI: usage.prompt_tokens_details.cached_tokens from meta_info, only with
    # --enable-cache-report (default False).
    usage = read("entrypoints/openai/usage_processor.py")
    assert "if enable_cache_report:" in usage
    assert 'responses[i]["meta_info"].get("cached_tokens", 0)' in usage
    assert "cached_details = PromptTokensDetails(cached_tokens=cached_total)" in usage
    assert re.search(r"enable_cache_report: A\[\s*bool,[^\]]*\]\s*=\s*False",
                     read("arg_groups/fields/serving.py"))
    protocol = read("entrypoints/openai/protocol.py")
    assert re.search(r"class PromptTokensDetails\(BaseModel\):.*?cached_tokens: int = 0",
                     protocol, re.S)


def test_contract_pd_decode_reports_prefill_hit(sglang_source: SourceReader) -> None:
    read = sglang_source
    assert "decode_req.req.cached_tokens = cached_tokens[0].item()" in read(
        "disaggregation/decode.py")
    assert "self.cached_tokens[req.metadata_buffer_index][0] = req.cached_tokens" in read(
        "disaggregation/utils.py")
    # Decode mode: radix cache off unless --disaggregation-decode-enable-radix-cache (False).
    hook = read("arg_groups/pd_disaggregation_hook.py")
    assert re.search(r'cfg\.disaggregation_mode == "decode":\s*\n\s*if '
                     r"cfg\.disaggregation_decode_enable_radix_cache:.*?else:.*?"
                     r"disable_radix_cache=True", hook, re.S)
    assert re.search(r"disaggregation_decode_enable_radix_cache: A\[[^\]]*\]\s*=\s*False",
                     read("arg_groups/fields/disagg.py"), re.S)


def test_contract_radix_cache_shape(sglang_source: SourceReader) -> None:
    read = sglang_source
    # page_size resolves to 1 on CUDA: token-granularity matching.
    overrides = read("arg_groups/overrides.py")
    default = overrides[overrides.index("def _page_size_default"):]
    default = default[:default.index("@register_post_process")]
    assert 'if not get_platform().is_musa:\n        return {"page_size": 1}' in default
    # At most input_len - 1 tokens come from the cache.
    assert "max_prefix_len = input_len - 1" in read("managers/schedule_batch.py")
    memory = read("arg_groups/fields/memory.py")
    assert re.search(r"disable_radix_cache: A\[[^\]]*\]\s*=\s*False", memory, re.S)
    assert re.search(r"radix_eviction_policy: A\[.*?\]\s*=\s*\"lru\"", memory, re.S)
    assert re.search(r"class LRUStrategy\(EvictionStrategy\):\s*\n\s*def get_priority.*?\n"
                     r"\s*return node\.last_access_time", read("mem_cache/evict_policy.py"))
    # Eviction pops leaves and pushes a parent once it has no children left.
    evict = read("mem_cache/radix_cache.py")
    evict = evict[evict.index("    def evict(self, params: EvictParams)"):]
    assert "leaves = list(self.evictable_leaves)" in evict
    assert "if len(x.parent.children) == 0 and x.parent.lock_ref == 0:" in evict

"""DP attention ranks on an emulated worker (`--dp-size N`), pinned to sglang 0.5.23.

What is emulated, and where SGLang does it (paths under `sglang/srt/`):

- `routed_dp_rank` (and its deprecated alias `data_parallel_rank`) picks the rank
  (`managers/io_struct.py` GenerateReqInput, `managers/data_parallel_controller.py`
  `maybe_external_dp_rank_routing`); outside [0, num_dp_ranks) it is a 400 raised by
  `managers/tokenizer_manager.py` `generate_request` (rank 0 on a one-rank server is ignored).
- Without it the worker picks the rank as `--load-balance-method auto` resolves
  (`arg_groups/serving_hook.py`): round robin on regular/decode workers, `bootstrap_room %
  dp_size` on a PD prefill (`follow_bootstrap_room_scheduler`).
- `/v1/loads` lists one entry per rank with its `dp_rank` and filters on `?dp_rank=`
  (`entrypoints/v1_loads.py`, `managers/tokenizer_control_mixin.py` `get_loads`).
- `/server_info` reports the ranks as SGLang resolves `--dp-size N --enable-dp-attention`:
  `attn_dp_size` N, `dp_size` 1, `enable_dp_attention` true (`arg_groups/parallel_hook.py`,
  `server_args.py` `resolved_dict`).
- One decode step serves every rank: the slowest rank's attention plus the MoE over the union
  of all ranks' experts (`CostModel.dp_decode_step_seconds`, docs/emulator-cost-model.md s. 9).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from loadtest.emulator.config import ConfigError, EngineOptions, WorkerConfig
from loadtest.emulator.costmodel import CostModel
from loadtest.emulator.engine import DecodeEngine
from loadtest.emulator.server import WorkerServer
from tests.emulator.sglang_source import SourceReader, sglang_reader
from tests.emulator.workers import wait_until, worker
from zones.geometry import geometry_by_name

PROMPT = "the court reads the contract and the lawyer explains every clause to the judge"




async def loads(session: aiohttp.ClientSession, url: str, query: str = "") -> list[Any]:
    async with session.get(url + "/v1/loads" + query) as resp:
        assert resp.status == 200
        return list((await resp.json())["loads"])


def body(**extra: Any) -> dict[str, Any]:
    return {"text": PROMPT, "sampling_params": {"max_new_tokens": 4, "ignore_eos": True},
            **extra}


# ------------------------------------------------------------------ rank selection over HTTP

@contextlib.asynccontextmanager
async def slow_worker(**engine: Any) -> AsyncIterator[WorkerServer]:
    """A worker whose first decode step lasts seconds, so a request stays visibly running.

    DeepSeek-V2-Lite routes cheaply; time_scale 1000 makes its ~8 ms step ~8 s.
    """
    opts = EngineOptions(model="DeepSeek-V2-Lite", time_scale=1000.0, **engine)
    async with WorkerServer(WorkerConfig(role="regular", engine=opts)) as server:
        yield server


async def _running_per_rank(session: aiohttp.ClientSession, url: str) -> list[int]:
    return [entry["num_running_reqs"] for entry in await loads(session, url)]


@pytest.mark.parametrize("field", ["routed_dp_rank", "data_parallel_rank"])
async def test_routed_dp_rank_lands_on_that_rank(session: aiohttp.ClientSession,
                                                 field: str) -> None:
    async with slow_worker(dp_size=3) as w:
        task = asyncio.ensure_future(session.post(w.url + "/generate", json=body(**{field: 2})))
        try:
            await wait_until(lambda: w.worker.decode_engine.load().num_running_reqs == 1)
            assert await _running_per_rank(session, w.url) == [0, 0, 1]
            only = await loads(session, w.url, "?dp_rank=2")
            assert [e["dp_rank"] for e in only] == [2] and only[0]["num_running_reqs"] == 1
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_round_robin_without_a_rank(session: aiohttp.ClientSession) -> None:
    async with slow_worker(dp_size=2) as w:
        tasks = [asyncio.ensure_future(session.post(w.url + "/generate", json=body()))
                 for _ in range(4)]
        try:
            await wait_until(lambda: w.worker.decode_engine.load().num_running_reqs == 4)
            assert await _running_per_rank(session, w.url) == [2, 2]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_per_rank_batch_limit_is_max_batch_size_split_over_ranks(
        session: aiohttp.ClientSession) -> None:
    # max(1, max_running_requests // attn_dp_size) per rank: 3 // 2 = 1.
    async with slow_worker(dp_size=2, max_batch_size=3) as w:
        assert w.worker.max_running_requests_per_rank == 1
        tasks = [asyncio.ensure_future(
            session.post(w.url + "/generate", json=body(routed_dp_rank=0))) for _ in range(2)]
        try:
            await wait_until(lambda: w.worker.decode_engine.load().num_waiting_reqs == 1
                             and w.worker.decode_engine.load().num_running_reqs == 1)
            rank0, rank1 = await loads(session, w.url)
            assert (rank0["num_running_reqs"], rank0["num_waiting_reqs"]) == (1, 1)
            assert (rank1["num_running_reqs"], rank1["num_waiting_reqs"]) == (0, 0)
            assert rank0["max_running_requests"] == 1
            assert rank0["max_total_num_tokens"] == w.worker.max_total_num_tokens
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_prefill_follows_bootstrap_room(session: aiohttp.ClientSession) -> None:
    """A PD prefill waits in its bootstrap queue for the decode; the queue is per rank."""
    async with worker("prefill", dp_size=4) as w:
        req = body(bootstrap_host="127.0.0.1", bootstrap_port=w.bootstrap_port,
                   bootstrap_room=4 * 1000 + 3)
        task = asyncio.ensure_future(session.post(w.url + "/generate", json=req))
        try:
            await wait_until(lambda: w.worker.bootstrap_queue == 1)
            entries = await loads(session, w.url)
            queued = [e["disaggregation"]["prefill_bootstrap_queue_reqs"] for e in entries]
            assert queued == [0, 0, 0, 1]
            assert [e["num_waiting_reqs"] for e in entries] == [0, 0, 0, 1]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_prefill_rank_conflicting_with_room_fails_as_sglang(
        session: aiohttp.ClientSession) -> None:
    """routed_dp_rank != room % dp_size without disagg_prefill_dp_rank: the KV sender refuses
    it (disaggregation/common/conn.py), the prefill answers 500."""
    async with worker("prefill", dp_size=2) as w:
        req = body(bootstrap_host="127.0.0.1", bootstrap_port=w.bootstrap_port,
                   bootstrap_room=7, routed_dp_rank=0, rid="conflict")
        async with session.post(w.url + "/generate", json=req) as resp:
            assert resp.status == 500
            message = (await resp.json())["message"]
        assert message == (
            "Prefill bootstrap failed for request rank=0 req.rid='conflict' "
            "req.bootstrap_room=7 with exception KVTransferError(bootstrap_room=7): "
            "follow_bootstrap_room conflict: dispatched to dp_rank 0 but bootstrap_room 7 "
            "implies dp_rank 1. Set SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_DP_RANK=1 to "
            "allow mixed routing.")
        # With the hint the decode knows where the KV is: no conflict (prefill_first answers
        # without waiting for a decode).
        req.update(disagg_prefill_dp_rank=0, prefill_first=True)
        async with session.post(w.url + "/generate", json=req) as resp:
            assert resp.status == 200, await resp.text()


# ------------------------------------------------------------------ validation

@pytest.mark.parametrize(("dp_size", "rank"), [(2, 2), (2, -1), (1, 1), (4, 4)])
async def test_out_of_range_rank_is_sglangs_400(session: aiohttp.ClientSession, dp_size: int,
                                                rank: int) -> None:
    async with worker(dp_size=dp_size) as w:
        async with session.post(w.url + "/generate", json=body(routed_dp_rank=rank)) as resp:
            assert resp.status == 400
            assert await resp.json() == {"error": {
                "message": f"routed_dp_rank={rank} out of range [0, {dp_size})"}}
        # Streaming: one error event, then [DONE] (http_server.py stream_results).
        async with session.post(w.url + "/generate",
                                json=body(routed_dp_rank=rank, stream=True)) as resp:
            assert resp.status == 200
            raw = (await resp.read()).decode()
        events = [e[len("data: "):] for e in raw.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        assert orjson.loads(events[0]) == {"error": {
            "message": f"routed_dp_rank={rank} out of range [0, {dp_size})",
            "type": "invalid_request_error", "code": 400, "retryable": False}}


async def test_rank_zero_on_one_rank_server_is_ignored(session: aiohttp.ClientSession) -> None:
    async with worker() as w, \
            session.post(w.url + "/generate", json=body(routed_dp_rank=0)) as resp:
        assert resp.status == 200


async def test_non_integer_rank_is_rejected(session: aiohttp.ClientSession) -> None:
    async with worker(dp_size=2) as w, \
            session.post(w.url + "/generate", json=body(routed_dp_rank="1")) as resp:
        assert resp.status == 400
        assert "routed_dp_rank" in (await resp.json())["error"]["message"]


def test_dp_size_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="dp_size"):
        EngineOptions(dp_size=0)


# ------------------------------------------------------------------ reported shape

async def test_loads_and_server_info_shape(session: aiohttp.ClientSession) -> None:
    async with worker("decode", dp_size=2) as w:
        entries = await loads(session, w.url)
        assert [e["dp_rank"] for e in entries] == [0, 1]
        assert all("disaggregation" in e for e in entries)
        assert await loads(session, w.url, "?dp_rank=5") == []
        async with session.get(w.url + "/v1/loads?dp_rank=x") as resp:
            assert resp.status == 422
        async with session.get(w.url + "/get_load") as resp:
            assert [e["dp_rank"] for e in await resp.json()] == [0, 1]
        async with session.get(w.url + "/server_info") as resp:
            info = await resp.json()
        assert (info["dp_size"], info["attn_dp_size"], info["enable_dp_attention"],
                info["tp_size"]) == (1, 2, True, 2)
        assert info["load_balance_method"] == "round_robin"
        assert len(info["internal_states"]) == 2
        async with session.get(w.url + "/metrics") as resp:
            assert resp.status == 200


async def test_dp_size_one_reports_one_rank(session: aiohttp.ClientSession) -> None:
    async with worker() as w:
        entries = await loads(session, w.url)
        assert [e["dp_rank"] for e in entries] == [0]
        assert entries[0]["max_running_requests"] == 64
        assert entries[0]["max_total_num_tokens"] == w.worker.max_total_num_tokens == 64 * 4096
        async with session.get(w.url + "/server_info") as resp:
            info = await resp.json()
        assert (info["dp_size"], info["attn_dp_size"], info["enable_dp_attention"],
                info["tp_size"]) == (1, 1, False, 1)


# ------------------------------------------------------------------ the step cost

QWEN3 = geometry_by_name("Qwen3-30B-A3B")


def _rows(experts: list[int]) -> np.ndarray:
    """One token's [layers, top_k] expert ids: the same experts in every layer."""
    return np.tile(np.asarray(experts, dtype=np.int32), (QWEN3.num_layers, 1))


def _hand_step(cm: CostModel, batch: int, distinct_per_layer: int, kv_max: int) -> float:
    # docs/emulator-cost-model.md s. 9: L * (f + B * p) + sum_l n_l * x + D + max_r(kv_r) * k.
    # Qwen3-30B-A3B has no sliding-window layers, so a rank's attention reads all its KV.
    L = QWEN3.num_layers
    return (L * (cm.moe_layer_fixed_seconds + batch * cm.token_layer_seconds)
            + L * distinct_per_layer * cm.expert_seconds
            + cm.dense_seconds + kv_max * cm.kv_seconds_per_token)


def test_union_of_disjoint_experts_costs_more_than_identical_ones() -> None:
    cm = CostModel.for_geometry(QWEN3)
    engine = DecodeEngine(cm, QWEN3, dp_size=2)
    same = engine.distinct_experts(np.stack([_rows(list(range(8))), _rows(list(range(8)))]))
    disjoint = engine.distinct_experts(
        np.stack([_rows(list(range(8))), _rows(list(range(8, 16)))]))
    assert set(same.tolist()) == {8} and set(disjoint.tolist()) == {16}
    ranks = [(1, 1000), (1, 3000)]
    t_same = cm.dp_decode_step_seconds(ranks, same)
    t_disjoint = cm.dp_decode_step_seconds(ranks, disjoint)
    assert t_same == pytest.approx(_hand_step(cm, 2, 8, 3000), rel=1e-12)
    assert t_disjoint == pytest.approx(_hand_step(cm, 2, 16, 3000), rel=1e-12)
    # The extra cost is exactly streaming 8 more experts in each of the 48 layers.
    assert t_disjoint - t_same == pytest.approx(48 * 8 * cm.expert_seconds, rel=1e-9)
    # Attention is per rank in parallel: the slower rank sets it, not the sum of both.
    assert cm.dp_decode_step_seconds([(1, 1000), (1, 3000)], same) == \
        cm.dp_decode_step_seconds([(1, 3000), (1, 0)], same)


def test_idle_step_costs_nothing_and_idle_ranks_do_not_add() -> None:
    cm = CostModel.for_geometry(QWEN3)
    experts = np.full(QWEN3.num_layers, 8)
    assert cm.dp_decode_step_seconds([(0, 0), (0, 0)], experts) == 0.0
    assert cm.dp_decode_step_seconds([(1, 500), (0, 0), (0, 0)], experts) == \
        cm.decode_step_seconds(1, experts, 500)


def _fixed_source(rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    while True:
        yield 7, rows


async def test_engine_step_uses_union_and_slowest_rank() -> None:
    """Two ranks, one request each, three steps: the engine charges the hand-computed cost."""
    cm = CostModel.for_geometry(QWEN3, time_scale=0.01)
    for second, distinct in ((list(range(8)), 8), (list(range(8, 16)), 16)):
        engine = DecodeEngine(cm, QWEN3, dp_size=2)
        await engine.start()
        try:
            a = engine.submit("a", 100, 3, _fixed_source(_rows(list(range(8)))), dp_rank=0)
            b = engine.submit("b", 900, 3, _fixed_source(_rows(second)), dp_rank=1)
            for handle in (a, b):
                assert len([e async for e in handle]) == 3
            stats = engine.stats()
        finally:
            await engine.stop()
        assert stats.steps == 3 and stats.batch_size_sum == 6
        # Step i reads rank 1's KV: 900 prompt tokens + i generated ones.
        expected = sum(_hand_step(cm, 2, distinct, 900 + i) for i in range(3))
        assert stats.step_seconds_sum == pytest.approx(expected, rel=1e-12)
        assert stats.distinct_experts_sum == pytest.approx(3 * distinct)


def test_one_rank_is_exactly_the_single_rank_formula() -> None:
    """dp_size 1 keeps every step time bit for bit (the pre-DP formula, written out)."""
    rng = np.random.default_rng(0)
    for name in ("Qwen3-30B-A3B", "GPT-OSS-120B", "DeepSeek-V2-Lite"):
        g = geometry_by_name(name)
        cm = CostModel.for_geometry(g, time_scale=3.0)
        for _ in range(50):
            batch = int(rng.integers(1, 129))
            kv = int(rng.integers(0, 200_000))
            distinct = rng.integers(g.top_k, g.num_experts + 1, g.num_layers)
            moe = (distinct.size * (cm.moe_layer_fixed_seconds + batch * cm.token_layer_seconds)
                   + float(distinct.astype(np.float64).sum()) * cm.expert_seconds)
            before = moe + cm.dense_seconds + cm.kv_read_seconds(batch, kv)
            assert cm.decode_step_seconds(batch, distinct, kv) == before
            assert cm.dp_decode_step_seconds([(batch, kv)], distinct) == before


async def test_engine_rejects_rank_outside_its_ranks() -> None:
    engine = DecodeEngine(CostModel.instant(), QWEN3, dp_size=2, experts_required=False)
    with pytest.raises(ValueError, match="dp_rank"):
        engine.submit("x", 1, 1, iter(()), dp_rank=2)


# ------------------------------------------------------------------ pinned to sglang 0.5.23

@pytest.fixture(scope="module")
def sglang_source() -> Iterator[SourceReader]:
    with sglang_reader() as read:
        yield read


def _flat(text: str) -> str:
    """Whitespace-insensitive view of source text (black wraps lines differently)."""
    return re.sub(r"\s+", " ", text)


def test_contract_request_fields(sglang_source: SourceReader) -> None:
    io = sglang_source("managers/io_struct.py")
    assert "    routed_dp_rank: Optional[int] = None\n" in io
    assert "    data_parallel_rank: Optional[int] = None\n" in io
    assert "    disagg_prefill_dp_rank: Optional[int] = None\n" in io
    # The deprecated alias fills routed_dp_rank when that is unset.
    assert ("if self.routed_dp_rank is None: self.routed_dp_rank = self.data_parallel_rank"
            in _flat(io))
    # One scalar for the whole batch: every item gets the same rank.
    assert "routed_dp_rank=self.routed_dp_rank," in io
    proto = sglang_source("entrypoints/openai/protocol.py")
    assert "routed_dp_rank: Optional[int] = None" in proto
    assert "disagg_prefill_dp_rank: Optional[int] = None" in proto


def test_contract_out_of_range_error(sglang_source: SourceReader) -> None:
    tm = _flat(sglang_source("managers/tokenizer_manager.py"))
    assert "self.elastic_worker_count = parallel.num_dp_ranks" in tm
    assert "if num_dp_ranks <= 1 and obj.routed_dp_rank == 0:" in tm
    assert ("elif obj.routed_dp_rank < 0 or obj.routed_dp_rank >= num_dp_ranks: raise "
            "ValueError( f\"routed_dp_rank={obj.routed_dp_rank} out of range "
            "[0, {num_dp_ranks})\" )") in tm
    http = _flat(sglang_source("entrypoints/http_server.py"))
    # Non-stream: {"error": {"message": str(e)}} with status 400; stream: one error event.
    assert '{"error": {"message": str(e)}}, status_code=getattr(e, "status_code", ' \
           'HTTPStatus.BAD_REQUEST)' in http
    assert '"type": "invalid_request_error", "code": getattr(e, "status_code", 400), ' \
           '"retryable": False,' in http


def test_contract_default_rank_choice(sglang_source: SourceReader) -> None:
    fields = _flat(sglang_source("arg_groups/fields/parallel.py"))
    assert re.search(r'load_balance_method: A\[ str, Arg\( help="The load balancing strategy '
                     r'for data parallelism\.", choices=\[[^\]]*\], \), \] = "auto"', fields)
    hook = _flat(sglang_source("arg_groups/serving_hook.py"))
    assert ('load_balance_method=( "follow_bootstrap_room" if cfg.disaggregation_mode == '
            '"prefill" else "round_robin" ),') in hook
    dpc = _flat(sglang_source("managers/data_parallel_controller.py"))
    assert "if req.routed_dp_rank is not None: rank = req.routed_dp_rank" in dpc
    assert ("self.round_robin_counter = (self.round_robin_counter + 1) % len(active)" in dpc)
    assert "target_rank = req.bootstrap_room % len(self.workers)" in dpc


def test_contract_prefill_rank_conflict(sglang_source: SourceReader) -> None:
    conn = _flat(sglang_source("disaggregation/common/conn.py"))
    assert ('f"follow_bootstrap_room conflict: dispatched to dp_rank " '
            'f"{self.kv_mgr.attn_dp_rank} but bootstrap_room " '
            'f"{self.bootstrap_room} implies dp_rank " '
            'f"{self.bootstrap_room % get_parallel().num_dp_ranks}. " '
            'f"Set SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_DP_RANK=1 " '
            'f"to allow mixed routing.",') in conn
    assert "if get_parallel().num_dp_ranks > 1 and not req_has_disagg_prefill_dp_rank:" in conn
    assert ('return f"KVTransferError(bootstrap_room={self.bootstrap_room}): '
            '{self.failure_reason}"') in conn
    decode = _flat(sglang_source("disaggregation/decode.py"))
    assert ("if req.disagg_prefill_dp_rank is not None: return req.disagg_prefill_dp_rank"
            in decode)
    assert "return req.bootstrap_room % prefill_info.dp_size" in decode


def test_contract_loads_per_rank(sglang_source: SourceReader) -> None:
    v1 = _flat(sglang_source("entrypoints/v1_loads.py"))
    assert "dp_rank: Optional[int] = None," in v1
    assert '"loads": loads,' in v1
    assert ("if parallel.attn_dp_enabled: num_accelerators //= parallel.num_dp_ranks" in v1)
    mixin = _flat(sglang_source("managers/tokenizer_control_mixin.py"))
    assert ("if dp_rank is not None and ( dp_rank < 0 or dp_rank >= self.elastic_worker_count "
            "): return []") in mixin
    snap = sglang_source("managers/load_snapshot.py")
    assert "    dp_rank: int = 0\n" in snap


def test_contract_decode_waiting_counts_requests_awaiting_kv(
        sglang_source: SourceReader) -> None:
    # A PD decode's num_waiting_reqs includes its prealloc and transfer queues (KV not yet
    # arrived), which the emulator's load snapshot adds as its transfer queue.
    inquirer = sglang_source("managers/scheduler_components/load_inquirer.py")
    assert "waiting_queues.append(decode_prealloc_queue)" in inquirer
    assert "waiting_queues.append(decode_transfer_queue)" in inquirer
    assert "num_waiting_reqs = sum(len(queue) for queue in waiting_queues)" in inquirer


def test_contract_server_info_and_capacity(sglang_source: SourceReader) -> None:
    hook = _flat(sglang_source("arg_groups/parallel_hook.py"))
    assert "attn_dp_size=cfg.dp_size, dp_size=1," in hook
    args = sglang_source("server_args.py")
    assert 'resolved["enable_dp_attention"] = resolving_view(self).attn_dp_size > 1' in args
    ctx = sglang_source("runtime_context.py")
    assert "return cfg.dp_size * cfg.attn_dp_size" in ctx
    pool = sglang_source("model_executor/pool_configurator.py")
    assert "num_reqs = max(1, max_running_requests // attn_dp_size)" in pool


def test_contract_one_step_over_all_ranks(sglang_source: SourceReader) -> None:
    """Every rank joins each MoE step; an empty rank runs an IDLE batch."""
    dp_attn = _flat(sglang_source("managers/scheduler_components/dp_attn.py"))
    assert "need_idle_batch = max(mlp_sync_info.global_num_tokens) > 0" in dp_attn
    assert "batch_to_gather = local_batch = get_idle_batch()" in dp_attn

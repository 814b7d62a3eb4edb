"""One emulated SGLang worker: the engines plus the per-request PD logic, no HTTP.

`Worker.generate(item)` yields SGLang `/generate` output dicts (sglang 0.5.23
`srt/managers/tokenizer_manager.py` `_handle_batch_output`: `text`, `output_ids`, `meta_info`;
streaming chunks are cumulative because `incremental_streaming_output` defaults to False).
Failures raise `GenerationError` carrying SGLang's status code and message; the HTTP layer
(`server.py`) turns them into SGLang's error shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import zlib
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

from loadtest.emulator.config import WorkerConfig
from loadtest.emulator.costmodel import CostModel
from loadtest.emulator.engine import DecodeEngine, PrefillEngine
from loadtest.emulator.generate_input import GenerateItem
from loadtest.emulator.metrics import WorkerMetrics
from loadtest.emulator.pd import (
    FAKE_BOOTSTRAP_HOST,
    BootstrapRegistry,
    HandshakeError,
    KvPayload,
    LocalBootstraps,
    fetch_kv,
)
from loadtest.emulator.prefix_cache import PrefixCache
from loadtest.emulator.routing import BigramWalk, RoutingSource, make_routing_source
from loadtest.emulator.tokenizer import Tokenizer
from zones.geometry import ModelGeometry, geometry_by_name
from zones.routed_experts import counts_from_expert_ids, encode_counts, encode_routed_experts

log = logging.getLogger(__name__)

# The emulator's KV capacity per worker, for token_usage / max_total_num_tokens, and the prefix
# cache's capacity (SGLang's radix tree lives in the same KV pool). Not an SGLang constant:
# SGLang sizes the pool from free GPU memory. 4096 tokens per batch slot keeps token_usage
# meaningful (0..1) for the prompt lengths our workloads use (docs/emulator-cost-model.md
# section 8).
KV_TOKENS_PER_SLOT = 4096
# sglang ServerArgs.disaggregation_bootstrap_port default.
SGLANG_DEFAULT_BOOTSTRAP_PORT = 8998


class GenerationError(Exception):
    """A request failed the way SGLang fails it: HTTP status + SGLang's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class InvalidRequestError(GenerationError):
    """A ValueError SGLang's tokenizer manager raises before scheduling (400).

    Non-streaming it is the usual 400 body; a stream gets one `{"error": {...}}` event instead
    of an abort chunk (http_server.py generate_request.stream_results `except ValueError`).
    """

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


@dataclass
class _Prompt:
    ids: list[int]
    text: str | None


TokenStream = Iterator[tuple[int, np.ndarray | None]]


@dataclass
class PrefixCacheCounters:
    """Cumulative prefix-cache figures of one worker's prefill passes (`/emulator/stats`)."""

    prefills: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cached_share_sum: float = 0.0  # sum over passes of cached / prompt tokens
    last_hit_rate: float = 0.0     # the last pass's cached / prompt (SGLang's cache_hit_rate
                                   # is per logged prefill batch)

    def record(self, prompt_tokens: int, cached_tokens: int) -> None:
        share = cached_tokens / prompt_tokens if prompt_tokens else 0.0
        self.prefills += 1
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens
        self.cached_share_sum += share
        self.last_hit_rate = share


class _TextStream:
    """Incremental detokenisation: O(1) per token instead of re-decoding the whole output.

    Relies on the emulator tokenizer's rule that the separator before a word depends only on
    that word and the previous non-special word, so decode([prev, t]) = decode([prev]) + piece.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._parts: list[str] = []
        self._prev: int | None = None
        self._value: str | None = ""

    def append(self, token_id: int) -> None:
        decode = self._tokenizer.decode
        piece = decode([token_id]) if self._prev is None else \
            decode([self._prev, token_id])[len(decode([self._prev])):]
        if piece:
            self._parts.append(piece)
            self._prev = token_id
            self._value = None

    @property
    def value(self) -> str:
        if self._value is None:
            self._value = "".join(self._parts)
        return self._value


class Worker:
    """Engines, routing source and bootstrap registry of one worker; start() before use."""

    def __init__(self, config: WorkerConfig, *,
                 local_bootstraps: LocalBootstraps | None = None) -> None:
        self.config = config
        self.local_bootstraps = local_bootstraps
        opts = config.engine
        self.tokenizer = Tokenizer()
        self.routing: RoutingSource = make_routing_source(
            opts.routing, geometry_by_name(opts.model), self.tokenizer, seed=opts.seed,
            trace_path=opts.trace_path)
        self.geometry: ModelGeometry = self.routing.geometry
        self.cost_model = (CostModel.instant() if opts.instant else
                           CostModel.for_geometry(self.geometry, time_scale=opts.time_scale))
        # An instant cost model never reads expert ids, so requests that do not report them
        # skip routing entirely (see _needs_experts).
        self.instant = opts.instant
        # DP attention ranks. SGLang splits --max-running-requests over them
        # (model_executor/pool_configurator.py: max(1, max_running_requests // attn_dp_size));
        # each rank's KV pool is its own, so the capacity below is per rank.
        self.dp_size = opts.dp_size
        self.max_running_requests_per_rank = max(1, opts.max_batch_size // self.dp_size)
        self.decode_engine = DecodeEngine(self.cost_model, self.geometry,
                                          max_batch_size=self.max_running_requests_per_rank,
                                          experts_required=not opts.instant,
                                          dp_size=self.dp_size)
        self.prefill_engine = PrefillEngine(self.cost_model)
        self.registry = BootstrapRegistry()
        self.metrics = WorkerMetrics(self)
        self.max_total_num_tokens = self.max_running_requests_per_rank * KV_TOKENS_PER_SLOT
        # Prefix cache (sglang RadixCache): on prefill and regular workers unless
        # --disable-radix-cache; a PD decode has none (sglang 0.5.23
        # arg_groups/pd_disaggregation_hook.py: disable_radix_cache=True in decode mode unless
        # --disaggregation-decode-enable-radix-cache) and reports the prefill's hit instead.
        # One tree per DP rank: each rank's scheduler owns its tree in its own KV pool.
        self.prefix_caches: list[PrefixCache | None] = [
            None if opts.disable_radix_cache or self.role == "decode"
            else PrefixCache(self.max_total_num_tokens) for _ in range(self.dp_size)]
        self.prefix_cache = self.prefix_caches[0]
        self.prefix_stats = PrefixCacheCounters()
        self.rank_hit_rate = [0.0] * self.dp_size  # each rank's last prefill hit ratio
        self.bootstrap_queue = 0  # prefills waiting for their decode (sglang bootstrap queue)
        self.transfer_queue = 0  # decodes waiting for KV (sglang decode transfer queue)
        self.rank_bootstrap_queue = [0] * self.dp_size
        self.rank_transfer_queue = [0] * self.dp_size
        self.prefill_tokens_total = 0
        self.prefill_busy_s = 0.0
        self.rank_prefill_tokens = [0] * self.dp_size
        self.rank_prefill_busy_s = [0.0] * self.dp_size
        # SGLang's DataParallelController.round_robin_counter (load_balance_method "auto"
        # resolves to round_robin on regular and decode workers).
        self._round_robin = 0
        self.flushes = 0
        self._session: aiohttp.ClientSession | None = None
        self.started_at = time.time()

    @property
    def role(self) -> str:
        return self.config.role

    async def start(self) -> None:
        await self.decode_engine.start()
        self._session = aiohttp.ClientSession()

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.decode_engine.stop()

    # ------------------------------------------------------------------ requests

    def _prompt(self, item: GenerateItem) -> _Prompt:
        if item.input_ids is not None:
            ids = list(item.input_ids)
            vocab = self.tokenizer.vocab_size
            if max(ids) >= vocab:
                # sglang SamplingParams.verify / tokenizer_manager: ids beyond the vocab are 400s.
                raise GenerationError(400, f"The input_ids contain token id {max(ids)} which is "
                                           f"out of the vocabulary range [0, {vocab}).")
            return _Prompt(ids, None)
        assert item.text is not None
        ids = self.tokenizer.encode(item.text)
        if not ids:
            raise GenerationError(400, "'text' tokenizes to zero tokens")
        return _Prompt(ids, item.text)

    def _seed(self, item: GenerateItem) -> int:
        # Both halves of a PD pair must continue the same text: key it on the shared room.
        if item.bootstrap_room is not None:
            return item.bootstrap_room & 0xFFFFFFFF
        return zlib.crc32(item.rid.encode())

    async def generate(self, item: GenerateItem) -> AsyncGenerator[dict[str, Any], None]:
        """Yield cumulative output dicts; the last one has a finish_reason."""
        arrival = time.perf_counter()
        self._check_routed_dp_rank(item)
        prompt = self._prompt(item)
        rank = self._select_dp_rank(item)
        if item.routed_experts_start_len > len(prompt.ids):
            # sglang 0.5.23 scheduler.py handle_generate_request, same wording.
            raise GenerationError(
                400, f"recv_req.routed_experts_start_len={item.routed_experts_start_len} is "
                     f"higher than the number of input tokens len(req.origin_input_ids)="
                     f"{len(prompt.ids)}. Please use a smaller routed_experts_start_len.")
        if self.role != "regular" and item.bootstrap_room is None:
            # sglang 0.5.23 scheduler.py handle_generate_request: PD requests need a room
            # (the "fake" transfer backend auto-assigns one; we emulate the real backends).
            raise GenerationError(
                400, f"Invalid request: Disaggregated request received without bootstrap "
                     f"room id. req.rid={item.rid!r}")
        # prefill_first only changes the prefill's behaviour; a decode (or regular) worker
        # ignores it, so a gateway may send the same body to both halves.
        if item.prefill_first and self.role == "prefill" and \
                not self.config.engine.prefill_first:
            raise GenerationError(400, "'prefill_first' is disabled on this worker "
                                       "(started with --no-prefill-first)")
        self.metrics.on_arrival(len(prompt.ids), item.stream)
        if self.role == "prefill":
            out = await self._prefill(item, prompt, arrival, rank)
            yield out
            return
        async for out in self._decode(item, prompt, arrival, rank):
            yield out

    def _check_routed_dp_rank(self, item: GenerateItem) -> None:
        """sglang 0.5.23 tokenizer_manager.py generate_request: rank 0 on a single-rank server
        is ignored, anything outside [0, num_dp_ranks) is a ValueError (400)."""
        rank = item.routed_dp_rank
        if rank is None or (self.dp_size <= 1 and rank == 0):
            return
        if rank < 0 or rank >= self.dp_size:
            raise InvalidRequestError(f"routed_dp_rank={rank} out of range [0, {self.dp_size})")

    def _select_dp_rank(self, item: GenerateItem) -> int:
        """The DP rank that serves `item`, as sglang 0.5.23's DataParallelController picks it.

        A valid `routed_dp_rank` wins (`maybe_external_dp_rank_routing`). Otherwise the
        default `--load-balance-method auto` (arg_groups/serving_hook.py
        handle_load_balance_method) resolves to `follow_bootstrap_room` on a PD prefill
        (rank = bootstrap_room % dp_size, so a decode can find the KV without asking) and to
        `round_robin` elsewhere (`round_robin_scheduler`: one counter over the ranks).
        """
        if item.routed_dp_rank is not None:
            return item.routed_dp_rank
        if self.dp_size == 1:
            return 0
        if self.role == "prefill":
            return (item.bootstrap_room or 0) % self.dp_size
        rank = self._round_robin % self.dp_size
        self._round_robin = (self._round_robin + 1) % self.dp_size
        return rank

    async def complete(self, item: GenerateItem) -> dict[str, Any]:
        """Drive one item to its final output dict (closing the generator on cancel)."""
        last: dict[str, Any] | None = None
        async with contextlib.aclosing(self.generate(item)) as outs:
            async for out in outs:
                last = out
        assert last is not None
        return last

    async def _run_prefill(self, ids: list[int], rank: int = 0) -> int:
        """One prefill forward pass of `ids`; returns the cached tokens it did not compute.

        With a prefix cache the pass matches it when its turn comes, forwards only the
        uncached tokens, and inserts the prompt right after (sglang 0.5.23 checkpoints a
        request's prompt into the tree after its prefill forward: disaggregation/prefill.py
        `checkpoint_disagg_prefill`, and for a regular worker
        scheduler_components/batch_result_processor.py -> mem_cache/common.py
        `checkpoint_kv_cache`).
        """
        cache = self.prefix_caches[rank]
        n = len(ids)
        start = time.perf_counter()
        if cache is None:
            cached = await self.prefill_engine.run(n, dp_rank=rank)
        else:
            def match() -> int:
                # schedule_batch.py _compute_max_prefix_len: at most input_len - 1 tokens.
                return min(cache.match(ids), max(n - 1, 0))

            def commit() -> None:
                cache.insert(ids)
            cached = await self.prefill_engine.run(n, match=match, commit=commit, dp_rank=rank)
        busy = time.perf_counter() - start
        self.prefill_busy_s += busy
        self.prefill_tokens_total += n - cached
        self.rank_prefill_busy_s[rank] += busy
        self.rank_prefill_tokens[rank] += n - cached
        if cache is not None:
            self.prefix_stats.record(n, cached)
            self.rank_hit_rate[rank] = self.prefix_stats.last_hit_rate
        return cached

    async def _prefill(self, item: GenerateItem, prompt: _Prompt, arrival: float, rank: int
                       ) -> dict[str, Any]:
        room = item.bootstrap_room
        assert room is not None
        fake = item.bootstrap_host == FAKE_BOOTSTRAP_HOST
        if (not fake and self.dp_size > 1 and item.routed_dp_rank is not None
                and item.disagg_prefill_dp_rank is None and rank != room % self.dp_size):
            # A decode that was not told the prefill's rank looks for the KV on rank
            # room % dp_size (decode.py _resolve_prefill_dp_rank), so SGLang's sender refuses
            # a room routed elsewhere (disaggregation/common/conn.py CommonKVSender.__init__,
            # failure text verbatim; prefill.py handle_bootstrap_failure wraps it).
            self.metrics.bootstrap_failed()
            raise GenerationError(
                500, f"Prefill bootstrap failed for request rank={rank} req.rid={item.rid!r} "
                     f"req.bootstrap_room={room} with exception KVTransferError("
                     f"bootstrap_room={room}): follow_bootstrap_room conflict: dispatched to "
                     f"dp_rank {rank} but bootstrap_room {room} implies dp_rank "
                     f"{room % self.dp_size}. Set SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_"
                     f"DP_RANK=1 to allow mixed routing.")
        published = False
        try:
            if not fake and not item.prefill_first:
                self.bootstrap_queue += 1
                self.rank_bootstrap_queue[rank] += 1
                try:
                    await self.registry.wait_for_decode(
                        room, self.config.engine.bootstrap_timeout_secs)
                except HandshakeError as exc:
                    self.metrics.bootstrap_failed()
                    # sglang 0.5.23 prefill.py handle_bootstrap_failure: 500 with this message.
                    # rank= is the scheduler's tp_rank: one GPU per DP attention rank here.
                    raise GenerationError(
                        500, f"Prefill bootstrap failed for request rank={rank} "
                             f"req.rid={item.rid!r} req.bootstrap_room={room} "
                             f"with exception {exc}") from None
                finally:
                    self.bootstrap_queue -= 1
                    self.rank_bootstrap_queue[rank] -= 1
            cached = await self._run_prefill(prompt.ids, rank)
            first_token = self._first_output_token(prompt, self._seed(item))
            if not fake:
                hold = None
                if item.prefill_first:
                    hold = (item.prefill_first_hold_secs
                            or self.config.engine.prefill_first_hold_secs)
                try:
                    self.registry.publish(room, KvPayload(first_token, len(prompt.ids), cached),
                                          hold_secs=hold)
                    published = True
                except HandshakeError as exc:
                    self.metrics.transfer_failed()
                    # sglang 0.5.23 prefill.py handle_inflight_transfer_failure.
                    raise GenerationError(
                        500, f"Prefill transfer failed for request rank={rank} "
                             f"req.rid={item.rid!r} req.bootstrap_room={room} "
                             f"with exception {exc}") from None
        except asyncio.CancelledError:
            if not fake and not published:
                self.registry.fail(room, f"prefill for bootstrap_room {room} was aborted")
            raise
        meta = self._meta(item, prompt, [first_token],
                          # sglang 0.5.23 prefill.py process_disagg_prefill_inflight_queue:
                          # a finished prefill reports FINISH_LENGTH(length=0).
                          {"type": "length", "length": 0}, arrival, cached)
        if item.return_logprob:
            meta["input_token_logprobs"] = self._logprobs(prompt.ids, first_is_none=True)
            meta["output_token_logprobs"] = self._logprobs([first_token])
        prompt_rows = None
        if item.prefill_first or item.return_routed_experts:
            prompt_rows = await self._route_prompt(prompt)
        if item.return_routed_experts and prompt_rows is not None:
            # The prefill forwarded the prompt only: rows [start_len, prompt_len)
            # (sglang 0.5.23 prefill.py collects routed experts once the transfer is done).
            meta["routed_experts"] = encode_routed_experts(
                prompt_rows[item.routed_experts_start_len:])
        if item.prefill_first and prompt_rows is not None:
            meta["prompt_expert_counts"] = encode_counts(
                counts_from_expert_ids(prompt_rows, self.geometry))
            meta["expert_geometry"] = self.geometry.to_dict()
        self.metrics.on_finish(item.stream, arrival, 1, None, None, cached)
        return {"text": self.tokenizer.decode([first_token]), "output_ids": [first_token],
                "meta_info": meta}

    def _needs_experts(self, item: GenerateItem) -> bool:
        """Whether this request's tokens must be routed: always for a real cost model (step
        times depend on the experts), else only when the response reports routed experts."""
        return not self.instant or item.return_routed_experts

    async def _first_token(self, item: GenerateItem, prompt: _Prompt, rank: int
                           ) -> tuple[TokenStream, int, int]:
        """The token stream for the engine, the prompt length and the cached prompt tokens,
        after prefill or KV fetch."""
        room = item.bootstrap_room
        seed = self._seed(item)
        routed = self._needs_experts(item)
        if self.role == "regular" or item.bootstrap_host == FAKE_BOOTSTRAP_HOST:
            # A decode with the fake backend prefills itself, without a cache (decode mode).
            cached = await self._run_prefill(prompt.ids, rank)
            if not routed:
                return self._unrouted_stream(prompt, seed), len(prompt.ids), cached
            first, stream = await self._open_stream(prompt, seed)
            return itertools.chain([first], stream), len(prompt.ids), cached
        assert room is not None and self._session is not None
        if item.bootstrap_host is None:
            # A decode cannot reach a prefill without its bootstrap address.
            raise GenerationError(
                400, f"Invalid request: 'bootstrap_host' is required on a decode worker. "
                     f"req.rid={item.rid!r}")
        # scheduler.py handle_generate_request: a null bootstrap_port means the server's
        # --disaggregation-bootstrap-port (default 8998).
        port = item.bootstrap_port if item.bootstrap_port is not None else \
            SGLANG_DEFAULT_BOOTSTRAP_PORT
        # Routing the prompt overlaps the wait for the KV.
        opening = asyncio.ensure_future(self._open_stream(prompt, seed)) if routed else None
        self.transfer_queue += 1
        self.rank_transfer_queue[rank] += 1
        try:
            opts = self.config.engine
            timeout = opts.bootstrap_timeout_secs + opts.waiting_timeout_secs
            local = (self.local_bootstraps.lookup(item.bootstrap_host, port)
                     if self.local_bootstraps is not None else None)
            if local is not None:   # the prefill runs in this process: no HTTP round trip
                assert self.local_bootstraps is not None
                kv = await self.local_bootstraps.collect(local, room, timeout)
            else:
                kv = await fetch_kv(self._session, item.bootstrap_host, port, room, timeout)
        except BaseException as exc:
            if opening is not None:
                opening.cancel()
            if not isinstance(exc, HandshakeError):
                raise
            self.metrics.bootstrap_failed()
            # sglang 0.5.23 decode.py DecodePreallocQueue._update_handshake_waiters.
            raise GenerationError(
                500, f"Decode handshake failed for request rank={rank} req.rid={item.rid!r} "
                     f"req.bootstrap_room={room} with exception {exc}") from None
        finally:
            self.transfer_queue -= 1
            self.rank_transfer_queue[rank] -= 1
        if opening is None:
            stream = self._unrouted_stream(prompt, seed)
            own_token, experts = next(stream)
        else:
            (own_token, experts), stream = await opening
        if own_token != kv.first_token_id:
            log.warning("room %s: prefill sampled %s, decode continuation has %s",
                        room, kv.first_token_id, own_token)
        # SGLang transfers the prefill's sampled token with the KV; it is output token 0. The
        # prefill's prefix-cache hit comes with it and is what this decode reports
        # (disaggregation/decode.py _commit_transfer_to_req: req.cached_tokens = cached_tokens[0];
        # no decode-side radix cache, so nothing is added to it).
        return (itertools.chain([(kv.first_token_id, experts)], stream), kv.prompt_len,
                kv.cached_tokens)

    def _first_output_token(self, prompt: _Prompt, seed: int) -> int:
        """The token the prefill samples: the first token of the request's continuation.

        Every routing source draws its tokens from this same walk (routing.BigramWalk, same
        prompt, seed and EOS), so this equals the first token of `routing.continuation`
        without routing anything (tests/emulator/test_engine_instant.py checks this).
        """
        return BigramWalk(prompt.ids, seed, self.tokenizer.eos_token_id).next_token()

    def _unrouted_stream(self, prompt: _Prompt, seed: int) -> TokenStream:
        """The continuation's tokens without expert ids (instant cost model only)."""
        walk = BigramWalk(prompt.ids, seed, self.tokenizer.eos_token_id)
        return ((walk.next_token(), None) for _ in itertools.count())

    async def _open_stream(self, prompt: _Prompt, seed: int
                           ) -> tuple[tuple[int, np.ndarray | None], TokenStream]:
        """Start the continuation and compute its first element off the event loop.

        Routing a prompt costs tens of ms of CPU (token-hash over 48 x 128 experts); on the loop
        it would stall every other worker's decode steps in this process for that long.
        """
        def work() -> tuple[tuple[int, np.ndarray | None], TokenStream]:
            stream = iter(self.routing.continuation(prompt.ids, prompt.text, seed))
            return next(stream), stream
        return await asyncio.to_thread(work)

    async def _route_prompt(self, prompt: _Prompt) -> np.ndarray:
        return await asyncio.to_thread(self.routing.route_prompt, prompt.ids, prompt.text)

    async def _decode(self, item: GenerateItem, prompt: _Prompt, arrival: float, rank: int
                      ) -> AsyncGenerator[dict[str, Any], None]:
        tokens, prompt_len, cached = await self._first_token(item, prompt, rank)
        output_ids: list[int] = []
        text = _TextStream(self.tokenizer)
        rows: list[np.ndarray] = []
        finish: dict[str, Any] | None = None
        first_at: float | None = None
        last_at: float | None = None
        if item.max_new_tokens == 0:
            finish = {"type": "length", "length": 0}
        else:
            handle = self.decode_engine.submit(
                item.rid, prompt_len, item.max_new_tokens, tokens,
                eos_token_id=None if item.ignore_eos else self.tokenizer.eos_token_id,
                dp_rank=rank)
            try:
                async for event in handle:
                    now = time.perf_counter()
                    if first_at is None:
                        first_at = now
                        self.metrics.on_first_token(item.stream, now - arrival)
                    else:
                        assert last_at is not None
                        self.metrics.on_inter_token(now - last_at)
                    last_at = now
                    output_ids.append(int(event.token_id))
                    text.append(int(event.token_id))
                    if item.return_routed_experts:
                        rows.append(np.asarray(event.expert_ids, dtype=np.int32))
                    # The chunk carrying the last token also carries finish_reason (SGLang
                    # streams no separate closing chunk), so decide finality here.
                    eos_hit = (not item.ignore_eos
                               and event.token_id == self.tokenizer.eos_token_id)
                    if eos_hit or len(output_ids) >= item.max_new_tokens:
                        break
                    if item.stream:
                        meta = self._meta(item, prompt, output_ids, None, arrival, cached)
                        yield {"text": text.value, "output_ids": list(output_ids),
                               "meta_info": meta}
            finally:
                if handle.finish_reason is None:
                    handle.cancel()
            reason = handle.finish_reason
            if output_ids and not item.ignore_eos and \
                    output_ids[-1] == self.tokenizer.eos_token_id:
                reason = "stop"
            elif len(output_ids) >= item.max_new_tokens:
                reason = "length"
            if reason == "stop":
                finish = {"type": "stop", "matched": self.tokenizer.eos_token_id}
            elif reason == "abort":
                finish = {"type": "abort", "message": "Aborted", "status_code": None,
                          "err_type": None}
            else:
                finish = {"type": "length", "length": len(output_ids)}
            cache = self.prefix_caches[rank]
            if self.role == "regular" and cache is not None and output_ids:
                # A finished request's KV goes into the tree: prompt + every output token but
                # the last, which was never forwarded (mem_cache/common.py release_kv_cache ->
                # tree_cache.checkpoint(req, up_to=owned_kv_len)).
                cache.insert(prompt.ids + output_ids[:-1])
        meta = self._meta(item, prompt, output_ids, finish, arrival, cached)
        if item.return_logprob:
            meta["input_token_logprobs"] = (
                [] if self.role == "decode" else self._logprobs(prompt.ids, first_is_none=True))
            meta["output_token_logprobs"] = self._logprobs(output_ids)
        if item.return_routed_experts:
            prompt_rows = None if self.role == "decode" else await self._route_prompt(prompt)
            meta["routed_experts"] = encode_routed_experts(
                self._routed_rows(item, prompt_rows, prompt_len, rows))
        self.metrics.on_finish(item.stream, arrival, len(output_ids), first_at, last_at, cached,
                               dp_rank=rank)
        yield {"text": text.value, "output_ids": output_ids, "meta_info": meta}

    def _routed_rows(self, item: GenerateItem, prompt_rows: np.ndarray | None, prompt_len: int,
                     output_rows: list[np.ndarray]) -> np.ndarray:
        """Rows for positions [start_len, seqlen - 1), as SGLang's capturer returns them."""
        g = self.geometry
        out = (np.stack(output_rows[:-1]) if len(output_rows) > 1
               else np.zeros((0, g.num_layers, g.top_k), dtype=np.int32))
        if prompt_rows is None:
            # PD decode: prompt positions were never forwarded here (their KV arrived by
            # transfer), so their rows carry no routing; SGLang leaves them unset. We fill
            # zeros; clients must skip the first (prompt_tokens - start_len) rows.
            prompt_part = np.zeros((prompt_len, g.num_layers, g.top_k), dtype=np.int32)
        else:
            prompt_part = prompt_rows.astype(np.int32)
        return np.concatenate([prompt_part, out])[item.routed_experts_start_len:]

    def _meta(self, item: GenerateItem, prompt: _Prompt, output_ids: list[int],
              finish: dict[str, Any] | None, arrival: float, cached_tokens: int
              ) -> dict[str, Any]:
        # Key order and names: sglang 0.5.23 tokenizer_manager._handle_batch_output.
        meta: dict[str, Any] = {
            "id": item.rid,
            "finish_reason": finish,
            "prompt_tokens": len(prompt.ids),
            "weight_version": "default",
            "num_retractions": 0,
            "reasoning_tokens": 0,
            "completion_tokens": len(output_ids),
            # req.cached_tokens: prompt tokens served from the prefix cache (on a PD decode,
            # the prefill's figure; see _first_token).
            "cached_tokens": cached_tokens,
        }
        if finish is not None:
            meta["e2e_latency"] = time.perf_counter() - arrival
        return meta

    def _logprobs(self, ids: list[int], *, first_is_none: bool = False) -> list[list[Any]]:
        # [logprob, token_id, text] triples (tokenizer_manager.detokenize_logprob_tokens with
        # return_text_in_logprobs=False). No model, so every token gets the uniform-vocabulary
        # log-probability; the first prompt token has None, as in SGLang.
        lp = -math.log(self.tokenizer.vocab_size)
        return [[None if (first_is_none and i == 0) else lp, t, None] for i, t in enumerate(ids)]

    # ------------------------------------------------------------------ prefix cache

    def is_idle(self) -> bool:
        """No request running, queued, or waiting for its PD peer (scheduler is_fully_idle)."""
        d = self.decode_engine.load()
        p = self.prefill_engine.load()
        return not (d.num_running_reqs or d.num_waiting_reqs or p.num_running_reqs
                    or p.num_waiting_reqs or self.bootstrap_queue or self.transfer_queue)

    def flush_cache(self) -> bool:
        """`/flush_cache`: drop the prefix cache if idle; whether it was flushed."""
        if not self.is_idle():
            return False
        self.flushes += 1
        for cache in self.prefix_caches:
            if cache is not None:
                cache.reset()
        return True

    def prefix_cache_stats(self) -> dict[str, Any]:
        """Cumulative prefix-cache figures for `/emulator/stats` (cache fields 0 without one)."""
        caches = [c for c in self.prefix_caches if c is not None]   # summed over DP ranks
        s = self.prefix_stats
        return {
            "enabled": bool(caches),
            "capacity_tokens": sum(c.capacity_tokens for c in caches),
            "size_tokens": sum(c.size for c in caches),
            "inserted_tokens": sum(c.inserted_tokens for c in caches),
            "evicted_tokens": sum(c.evicted_tokens for c in caches),
            "prefills": s.prefills,
            "prompt_tokens": s.prompt_tokens,
            "cached_tokens": s.cached_tokens,
            "cached_share_sum": s.cached_share_sum,
        }

    # ------------------------------------------------------------------ load

    def load_snapshots(self) -> list[dict[str, Any]]:
        """Every DP rank's load, in rank order (what `/v1/loads` lists)."""
        return [self.load_snapshot(rank) for rank in range(self.dp_size)]

    def load_snapshot(self, rank: int = 0) -> dict[str, Any]:
        """One DP rank's load, fields of sglang 0.5.23 `srt/managers/load_snapshot.py`."""
        if self.dp_size == 1:
            # The single rank is the whole worker.
            d = self.decode_engine.load()
            p = self.prefill_engine.load()
            bootstrap, transfer = self.bootstrap_queue, self.transfer_queue
            prefill_tokens, prefill_busy = self.prefill_tokens_total, self.prefill_busy_s
            hit_rate = self.prefix_stats.last_hit_rate
        else:
            d = self.decode_engine.load(rank)
            p = self.prefill_engine.load(rank)
            bootstrap, transfer = self.rank_bootstrap_queue[rank], self.rank_transfer_queue[rank]
            prefill_tokens = self.rank_prefill_tokens[rank]
            prefill_busy = self.rank_prefill_busy_s[rank]
            hit_rate = self.rank_hit_rate[rank]
        running = d.num_running_reqs + p.num_running_reqs
        # sglang 0.5.23 scheduler_components/load_inquirer.py: a prefill's waiting requests
        # include its bootstrap queue, a decode's its prealloc and transfer queues (requests
        # whose KV has not arrived yet).
        waiting = d.num_waiting_reqs + p.num_waiting_reqs + bootstrap + transfer
        total = d.num_total_tokens + p.num_total_tokens
        usage = total / self.max_total_num_tokens
        snap: dict[str, Any] = {
            "timestamp": time.time(),
            "dp_rank": rank,
            "num_running_reqs": running,
            "num_waiting_reqs": waiting,
            "num_waiting_uncached_tokens": p.num_total_tokens if p.num_waiting_reqs else 0,
            "num_used_tokens": total,
            "num_total_tokens": total,
            "num_active_tokens": total,
            "num_prealloc_ready_tokens": 0,
            "max_total_num_tokens": self.max_total_num_tokens,
            "max_running_requests": self.max_running_requests_per_rank,
            "token_usage": usage,
            "gen_throughput": self.metrics.gen_throughput(None if self.dp_size == 1 else rank),
            "cache_hit_rate": hit_rate,
            "utilization": usage,
            "total_prefill_uncached_tokens": prefill_tokens,
            "total_prefill_busy_us": int(prefill_busy * 1e6),
            "decode_moments": None,
        }
        if self.role != "regular":
            snap["disaggregation"] = {
                "mode": self.role,
                "prefill_bootstrap_queue_reqs": bootstrap,
                "prefill_inflight_queue_reqs": 0,
                "decode_prealloc_queue_reqs": transfer,
                "decode_transfer_queue_reqs": 0,
                "decode_retracted_queue_reqs": 0,
                "kv_transfer_speed_gb_s": 0.0,
                "kv_transfer_latency_ms": 0.0,
            }
        snap["queues"] = {"waiting": waiting, "grammar": 0, "paused": 0, "retracted": 0,
                          "prealloc_ready": 0}
        return snap


WORKER_KEY: web.AppKey[Worker] = web.AppKey("worker", Worker)

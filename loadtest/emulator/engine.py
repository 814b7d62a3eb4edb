"""The emulated GPU: a continuous-batching decode loop and a FIFO prefill queue.

Decode (SGLang's scheduler in miniature): requests join the running batch only at step
boundaries, up to `max_batch_size` (the rest wait, reported as `num_waiting_reqs`). Each step
takes every running request's next token, counts the distinct experts the batch touches in each
MoE layer, sleeps the cost model's step time on the real clock, then emits one token to every
request in the batch. The Python work of the step counts against the step's time (we sleep
until `step start + modelled time`), so clients see the modelled GPU time; when the host cannot
keep up, the overrun is recorded as host lag so experiments can tell a CPU bottleneck from a
modelled effect. An idle engine awaits an event and costs no CPU.

The first token a PD decode emits is the one the prefill sampled (SGLang ships it with the KV);
the engine emits it at the end of the first step after the request joins.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from loadtest.emulator.costmodel import CostModel
from loadtest.emulator.stats import (
    BATCH_SIZE_BUCKETS,
    Histogram,
    HistogramSnapshot,
    distinct_expert_buckets,
)
from zones.geometry import ModelGeometry

IntArray = npt.NDArray[np.int32]
# (token id, its [num_layers, top_k] expert ids). The expert ids may be None only on an engine
# built with experts_required=False (an instant cost model that never reads them).
TokenSource = Iterator[tuple[int, IntArray | None]]

log = logging.getLogger(__name__)

FINISH_LENGTH = "length"
FINISH_STOP = "stop"
FINISH_ABORT = "abort"
# A step whose wall time overran its modelled time by more than this counts as a lagged step.
# asyncio timers fire up to ~1 ms late by design (loop granularity), which is not a CPU problem.
LAG_TOLERANCE_SECONDS = 0.002


class EngineStoppedError(RuntimeError):
    """Work was submitted to an engine that is stopped or has failed."""


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token_id: int
    expert_ids: IntArray | None   # [num_layers, top_k] experts this token used when forwarded
                                  # (None: the source skipped routing, see experts_required)
    index: int                # 0 = first output token


@dataclass(frozen=True, slots=True)
class EngineLoad:
    num_running_reqs: int
    num_waiting_reqs: int
    # As SGLang's load_publisher: KV tokens in use plus queued request tokens.
    num_total_tokens: int


@dataclass(frozen=True, slots=True)
class EngineStats:
    steps: int
    routed_steps: int                    # steps whose batch carried expert ids (distinct_* cover
                                         # only these; == steps unless experts_required=False)
    tokens: int
    batch_size_sum: int
    distinct_experts_sum: float          # sum over steps of the mean over layers
    step_seconds_sum: float              # modelled (what clients should see)
    wall_seconds_sum: float              # measured wall time of the same steps
    host_lag_seconds_sum: float          # sum of max(0, wall - modelled) per step
    host_lag_max_seconds: float
    lagged_steps: int                    # steps that overran by more than LAG_TOLERANCE_SECONDS
    requests_finished: int
    requests_aborted: int
    distinct_experts_per_layer: HistogramSnapshot   # one observation per layer per step
    batch_size: HistogramSnapshot                   # one observation per step
    step_seconds: HistogramSnapshot                 # modelled step time, one per step


# Step-time buckets in seconds: modelled H100 steps are ~5-30 ms, times --time-scale up to ~100.
STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5,
                        1.0, 2.5, 5.0)


class DecodeHandle:
    """One decode request: an async iterator of its TokenEvents, cancellable at any time."""

    def __init__(self, rid: str, prompt_len: int, max_new_tokens: int, tokens: TokenSource,
                 eos_token_id: int | None, wake: asyncio.Event, dp_rank: int = 0) -> None:
        self.rid = rid
        self.dp_rank = dp_rank
        self.prompt_len = prompt_len
        self.max_new_tokens = max_new_tokens
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.completion_tokens = 0
        self._tokens = tokens
        self._eos = eos_token_id
        self._wake = wake
        self._cancelled = False
        self._queue: asyncio.Queue[TokenEvent | None] = asyncio.Queue()

    @property
    def kv_tokens(self) -> int:
        return self.prompt_len + self.completion_tokens

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Free the batch slot at the next step boundary; the iterator then ends ("abort")."""
        if self.finish_reason is None and not self._cancelled:
            self._cancelled = True
            self._wake.set()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while True:
            event = await self._queue.get()
            if event is None:
                return
            yield event

    def _emit(self, event: TokenEvent) -> None:
        self.completion_tokens += 1
        self._queue.put_nowait(event)

    def _finish(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.error = error
            self._queue.put_nowait(None)


class DecodeEngine:
    """Continuous batching on the real clock (module docstring).

    `experts_required=False` lets token sources yield `None` instead of expert ids: for an
    instant cost model, whose step time does not depend on them, so a request that does not
    report its routed experts need not be routed at all. Distinct-expert statistics then cover
    only the requests that did carry expert ids (`routed_steps` counts the steps that had any).

    `dp_size` > 1 models SGLang's DP attention: each rank has its own FIFO queue and up to
    `max_batch_size` running requests (a per-rank limit), and one step serves every rank's
    batch at once (`CostModel.dp_decode_step_seconds`: the slowest rank's attention plus the
    MoE over the union of all ranks' experts).
    """

    def __init__(self, cost_model: CostModel, geometry: ModelGeometry, *,
                 max_batch_size: int = 64, experts_required: bool = True,
                 dp_size: int = 1) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        if not isinstance(dp_size, int) or dp_size < 1:
            raise ValueError(f"dp_size must be a positive integer, got {dp_size!r}")
        self.cost_model = cost_model
        self.experts_required = experts_required
        self.geometry = geometry
        self.max_batch_size = max_batch_size
        self.dp_size = dp_size
        # One FIFO per DP rank; with dp_size 1, `_waiting` is the only queue and everything
        # below behaves as before DP ranks existed.
        self._queues: list[collections.deque[DecodeHandle]] = [
            collections.deque() for _ in range(dp_size)]
        self._waiting = self._queues[0]
        self._running: list[DecodeHandle] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._failure: str | None = None
        self._row_shape = (geometry.num_layers, geometry.top_k)
        self._layer_offsets = (np.arange(geometry.num_layers, dtype=np.int64)
                               * geometry.num_experts)[:, None]
        self._no_experts = np.zeros(geometry.num_layers, dtype=np.int32)
        # Cumulative statistics.
        self._steps = 0
        self._routed_steps = 0
        self._tokens = 0
        self._batch_size_sum = 0
        self._distinct_sum = 0.0
        self._step_seconds_sum = 0.0
        self._wall_seconds_sum = 0.0
        self._lag_sum = 0.0
        self._lag_max = 0.0
        self._lagged_steps = 0
        self._finished = 0
        self._aborted = 0
        self._distinct_hist = Histogram(distinct_expert_buckets(geometry.num_experts))
        self._batch_hist = Histogram(BATCH_SIZE_BUCKETS)
        self._step_hist = Histogram(STEP_SECONDS_BUCKETS)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._stopped:
            raise EngineStoppedError("a stopped DecodeEngine cannot be restarted")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="decode-engine")

    async def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for handle in (*self._running, *self._queued()):
            self._close(handle, FINISH_ABORT, "engine stopped")
        self._running.clear()
        for queue in self._queues:
            queue.clear()

    def _queued(self) -> Iterator[DecodeHandle]:
        for queue in self._queues:
            yield from queue

    # -- requests ----------------------------------------------------------------------------
    def submit(self, rid: str, prompt_len: int, max_new_tokens: int, tokens: TokenSource, *,
               eos_token_id: int | None = None, dp_rank: int = 0) -> DecodeHandle:
        """Queue a request on DP rank `dp_rank` (0 <= dp_rank < dp_size)."""
        if self._stopped or self._failure is not None:
            raise EngineStoppedError(f"decode engine is stopped{self._failure or ''}")
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < self.dp_size:
            raise ValueError(f"dp_rank must be in [0, {self.dp_size}), got {dp_rank!r}")
        if not isinstance(prompt_len, int) or prompt_len < 0:
            raise ValueError(f"prompt_len must be a non-negative integer, got {prompt_len!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(
                f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        handle = DecodeHandle(rid, prompt_len, max_new_tokens, tokens, eos_token_id, self._wake,
                              dp_rank)
        if max_new_tokens == 0:
            handle._finish(FINISH_LENGTH)
            return handle
        self._queues[dp_rank].append(handle)
        self._wake.set()
        return handle

    def load(self, dp_rank: int | None = None) -> EngineLoad:
        """The whole engine's load, or one DP rank's."""
        if dp_rank is None:
            running = self._running
            waiting: list[DecodeHandle] = list(self._queued())
        else:
            running = [h for h in self._running if h.dp_rank == dp_rank]
            waiting = list(self._queues[dp_rank])
        return EngineLoad(
            num_running_reqs=len(running),
            num_waiting_reqs=len(waiting),
            num_total_tokens=sum(h.kv_tokens for h in running)
            + sum(h.prompt_len for h in waiting),
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            steps=self._steps,
            routed_steps=self._routed_steps,
            tokens=self._tokens,
            batch_size_sum=self._batch_size_sum,
            distinct_experts_sum=self._distinct_sum,
            step_seconds_sum=self._step_seconds_sum,
            wall_seconds_sum=self._wall_seconds_sum,
            host_lag_seconds_sum=self._lag_sum,
            host_lag_max_seconds=self._lag_max,
            lagged_steps=self._lagged_steps,
            requests_finished=self._finished,
            requests_aborted=self._aborted,
            distinct_experts_per_layer=self._distinct_hist.snapshot(),
            batch_size=self._batch_hist.snapshot(),
            step_seconds=self._step_hist.snapshot(),
        )

    # -- the loop ----------------------------------------------------------------------------
    def distinct_experts(self, expert_ids: npt.NDArray[np.integer]) -> IntArray:
        """Distinct experts per layer over a batch's `[batch, layers, top_k]` expert ids.

        One boolean scatter on layer * E + expert. `benchmarks/emulator_engine_overhead.py
        --distinct-variants` times the alternatives at batch 64 on Qwen3's 48 x 128: a bincount
        on the same index and a per-layer sort + count-changes cost the same (50-80 us on this
        machine), np.unique per layer ~10x more; this is a few % of a token-hash decode step.
        """
        g = self.geometry
        used = np.zeros(g.num_layers * g.num_experts, dtype=bool)
        flat = self._layer_offsets[None, :, :] + np.asarray(expert_ids, dtype=np.int64)
        used[flat.ravel()] = True
        return used.reshape(g.num_layers, g.num_experts).sum(axis=1).astype(np.int32)

    async def _run(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug in the step must not leave clients waiting forever: fail every request and
            # refuse new ones, loudly.
            log.exception("decode engine failed")
            self._failure = f" (failed: {exc!r})"
            for handle in (*self._running, *self._queued()):
                self._close(handle, FINISH_ABORT, f"decode engine failed: {exc!r}")
            self._running.clear()
            for queue in self._queues:
                queue.clear()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._admit()
            if not self._running:
                self._wake.clear()
                await self._wake.wait()
                continue
            start = loop.time()
            batch, picks, ids = self._next_tokens()
            if not batch:
                continue
            # With DP ranks the stacked ids span every rank, so this is the union of experts
            # the MoE layers serve in this step.
            distinct = self.distinct_experts(ids) if ids is not None else None
            experts = self._no_experts if distinct is None else distinct
            if self.dp_size == 1:
                kv_tokens = sum(h.kv_tokens for h in batch)
                modelled = self.cost_model.decode_step_seconds(len(batch), experts, kv_tokens)
            else:
                modelled = self.cost_model.dp_decode_step_seconds(self._rank_loads(batch),
                                                                  experts)
            deadline = start + modelled
            delay = deadline - loop.time()
            # sleep(0) still yields, so an instant cost model cannot starve the event loop.
            await asyncio.sleep(max(0.0, delay))
            end = loop.time()
            self._record_step(len(batch), distinct, modelled, end - start, max(0.0, end - deadline))
            self._emit(batch, picks)

    def _rank_loads(self, batch: list[DecodeHandle]) -> list[tuple[int, int]]:
        """(batch size, KV tokens) of each DP rank in this step (idle ranks: (0, 0))."""
        loads = [[0, 0] for _ in range(self.dp_size)]
        for h in batch:
            load = loads[h.dp_rank]
            load[0] += 1
            load[1] += h.kv_tokens
        return [(b, kv) for b, kv in loads]

    def _admit(self) -> None:
        """Step boundary: drop cancelled requests, then fill free slots from the queue (FIFO)."""
        for handle in [h for h in self._running if h.cancelled]:
            self._running.remove(handle)
            self._close(handle, FINISH_ABORT)
        for queue in self._queues:
            while queue and queue[0].cancelled:
                self._close(queue.popleft(), FINISH_ABORT)
            if any(h.cancelled for h in queue):
                for handle in [h for h in queue if h.cancelled]:
                    queue.remove(handle)
                    self._close(handle, FINISH_ABORT)
        if self.dp_size == 1:
            while self._waiting and len(self._running) < self.max_batch_size:
                self._running.append(self._waiting.popleft())
            return
        # Each rank admits up to its own limit (a rank's batch slots and KV are its own).
        running = [0] * self.dp_size
        for h in self._running:
            running[h.dp_rank] += 1
        for rank, queue in enumerate(self._queues):
            while queue and running[rank] < self.max_batch_size:
                self._running.append(queue.popleft())
                running[rank] += 1

    def _next_tokens(self) -> tuple[list[DecodeHandle], list[tuple[int, IntArray | None]],
                                    IntArray | None]:
        """Pull each running request's next (token, experts); a broken source aborts only it.

        Returns the batch, its picks, and the stacked `[n, layers, top_k]` expert ids of the
        picks that carry them (None when none does). The ids are validated once per batch (one
        min/max over the stack, not two reductions per request); only a batch that fails is
        checked row by row, to abort just the requests whose source misbehaved.
        """
        batch: list[DecodeHandle] = []
        picks: list[tuple[int, IntArray | None]] = []
        for handle in list(self._running):
            try:
                token, experts = next(handle._tokens)
                if experts is None and self.experts_required:
                    raise ValueError("no expert ids (this engine's cost model needs them)")
            except StopIteration:
                self._running.remove(handle)
                self._close(handle, FINISH_STOP)
                continue
            except Exception as exc:  # a token source bug must not kill the other requests
                self._abort_source(handle, exc)
                continue
            batch.append(handle)
            picks.append((int(token), experts))
        rows = [experts for _, experts in picks if experts is not None]
        if not rows:
            return batch, picks, None
        try:
            ids = np.stack(rows)
            ok = (ids.shape[1:] == self._row_shape and np.issubdtype(ids.dtype, np.integer)
                  and int(ids.min()) >= 0 and int(ids.max()) < self.geometry.num_experts)
        except (ValueError, TypeError):   # rows of different shapes or not numbers
            ok = False
        if ok:
            return batch, picks, ids.astype(np.int32, copy=False)
        kept_batch: list[DecodeHandle] = []
        kept_picks: list[tuple[int, IntArray | None]] = []
        for handle, (token, experts) in zip(batch, picks, strict=True):
            if experts is not None:
                try:
                    experts = self._checked(experts)
                except (ValueError, TypeError) as exc:
                    self._abort_source(handle, exc)
                    continue
            kept_batch.append(handle)
            kept_picks.append((token, experts))
        rows = [experts for _, experts in kept_picks if experts is not None]
        return kept_batch, kept_picks, (np.stack(rows) if rows else None)

    def _checked(self, experts: npt.ArrayLike) -> IntArray:
        g = self.geometry
        arr = np.asarray(experts)
        if arr.shape != self._row_shape:
            raise ValueError(f"expert_ids shaped {arr.shape}, expected "
                             f"[{g.num_layers}, {g.top_k}]")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"expert_ids must be integers, got {arr.dtype}")
        if arr.min() < 0 or arr.max() >= g.num_experts:
            raise ValueError(f"expert_ids outside [0, {g.num_experts})")
        return arr.astype(np.int32, copy=False)

    def _abort_source(self, handle: DecodeHandle, exc: Exception) -> None:
        log.warning("decode %s: token source failed: %s", handle.rid, exc)
        self._running.remove(handle)
        self._close(handle, FINISH_ABORT, f"token source failed: {exc}")

    def _emit(self, batch: list[DecodeHandle], picks: list[tuple[int, IntArray | None]]
              ) -> None:
        for handle, (token, experts) in zip(batch, picks, strict=True):
            if handle.finish_reason is not None:
                continue
            if handle.cancelled:
                continue   # removed at the next boundary; a cancelled stream gets no more tokens
            handle._emit(TokenEvent(token, experts, handle.completion_tokens))
            self._tokens += 1
            if handle._eos is not None and token == handle._eos:
                reason: str | None = FINISH_STOP
            elif handle.completion_tokens >= handle.max_new_tokens:
                reason = FINISH_LENGTH
            else:
                reason = None
            if reason is not None:
                self._running.remove(handle)
                self._close(handle, reason)

    def _record_step(self, batch_size: int, distinct: IntArray | None, modelled: float,
                     wall: float, lag: float) -> None:
        self._steps += 1
        self._batch_size_sum += batch_size
        if distinct is not None:
            self._routed_steps += 1
            self._distinct_sum += float(distinct.mean())
            self._distinct_hist.observe_many(distinct)
        self._step_seconds_sum += modelled
        self._wall_seconds_sum += wall
        self._lag_sum += lag
        self._lag_max = max(self._lag_max, lag)
        if lag > LAG_TOLERANCE_SECONDS:
            self._lagged_steps += 1
        self._batch_hist.observe(batch_size)
        self._step_hist.observe(modelled)

    def _close(self, handle: DecodeHandle, reason: str, error: str | None = None) -> None:
        if handle.finish_reason is not None:
            return
        if reason == FINISH_ABORT:
            self._aborted += 1
        else:
            self._finished += 1
        handle._finish(reason, error)


@dataclass(frozen=True, slots=True)
class PrefillStats:
    requests: int
    tokens: int             # tokens forwarded (prompt tokens minus cached ones)
    seconds_sum: float
    cached_tokens: int = 0  # prompt tokens served from the prefix cache instead


class PrefillEngine:
    """One forward pass at a time, first come first served (asyncio.Lock wakes waiters FIFO).

    A pass may skip a cached prefix: `run(n, match=..., commit=...)` calls `match()` when the
    request's turn comes (SGLang matches the radix cache when it schedules the request, not
    when it arrives), forwards only the `n - match()` uncached tokens, and calls `commit()`
    (e.g. insert into the cache) before the next queued pass can start and match.

    A DP-attention worker keeps one engine for all ranks (`run(..., dp_rank=r)` only tags the
    pass for per-rank load reporting): prefill is compute bound in the cost model, and the
    model is one device's compute, so splitting the tokens over ranks does not make the
    passes faster (docs/emulator-cost-model.md section 9).
    """

    def __init__(self, cost_model: CostModel) -> None:
        self.cost_model = cost_model
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._waiting_tokens = 0
        self._running = 0
        self._running_tokens = 0
        self._requests = 0
        self._tokens = 0
        self._cached_tokens = 0
        self._seconds = 0.0
        # Per DP rank: [waiting, waiting tokens, running, running tokens].
        self._by_rank: collections.defaultdict[int, list[int]] = collections.defaultdict(
            lambda: [0, 0, 0, 0])

    async def run(self, num_tokens: int, *, match: Callable[[], int] | None = None,
                  commit: Callable[[], object] | None = None, dp_rank: int = 0) -> int:
        """Wait for the turn, then occupy the engine for `prefill_seconds(uncached tokens)`.

        Returns the number of cached tokens (0 without `match`).
        """
        if not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be a non-negative integer, got {num_tokens!r}")
        if self.cost_model.prefill_seconds(num_tokens) == 0.0 and not self._lock.locked():
            # Instant model and nobody queued: the pass takes no time, so skip the lock and the
            # event-loop round trip (order is still FIFO: nothing is waiting to be overtaken).
            return self._forward(num_tokens, match, commit)[0]
        rank = self._by_rank[dp_rank]
        self._waiting += 1
        self._waiting_tokens += num_tokens
        rank[0] += 1
        rank[1] += num_tokens
        queued = True
        try:
            async with self._lock:
                self._waiting -= 1
                self._waiting_tokens -= num_tokens
                rank[0] -= 1
                rank[1] -= num_tokens
                queued = False
                self._running += 1
                self._running_tokens += num_tokens
                rank[2] += 1
                rank[3] += num_tokens
                try:
                    cached, seconds = self._match(num_tokens, match)
                    await asyncio.sleep(seconds)
                    self._record(num_tokens, cached, seconds, commit)
                    return cached
                finally:
                    self._running -= 1
                    self._running_tokens -= num_tokens
                    rank[2] -= 1
                    rank[3] -= num_tokens
        finally:
            if queued:   # cancelled while waiting for the turn
                self._waiting -= 1
                self._waiting_tokens -= num_tokens
                rank[0] -= 1
                rank[1] -= num_tokens

    def _match(self, num_tokens: int, match: Callable[[], int] | None) -> tuple[int, float]:
        cached = match() if match is not None else 0
        if not 0 <= cached <= num_tokens:
            raise ValueError(f"cached prefix {cached} outside [0, {num_tokens}]")
        return cached, self.cost_model.prefill_seconds(num_tokens - cached)

    def _forward(self, num_tokens: int, match: Callable[[], int] | None,
                 commit: Callable[[], object] | None) -> tuple[int, float]:
        cached, seconds = self._match(num_tokens, match)
        self._record(num_tokens, cached, seconds, commit)
        return cached, seconds

    def _record(self, num_tokens: int, cached: int, seconds: float,
                commit: Callable[[], object] | None) -> None:
        if commit is not None:
            commit()
        self._requests += 1
        self._tokens += num_tokens - cached
        self._cached_tokens += cached
        self._seconds += seconds

    def load(self, dp_rank: int | None = None) -> EngineLoad:
        """The whole engine's load, or that of the passes tagged with one DP rank."""
        if dp_rank is None:
            return EngineLoad(self._running, self._waiting,
                              self._running_tokens + self._waiting_tokens)
        waiting, waiting_tokens, running, running_tokens = self._by_rank.get(dp_rank,
                                                                             [0, 0, 0, 0])
        return EngineLoad(running, waiting, running_tokens + waiting_tokens)

    def stats(self) -> PrefillStats:
        return PrefillStats(self._requests, self._tokens, self._seconds, self._cached_tokens)

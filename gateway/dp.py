"""`--dp-aware`: route to a worker's DP attention ranks instead of letting it balance them.

As smg does it (smg-project/smg `model_gateway/src/workflow/steps/local/discover_dp.rs`,
`worker/builder.rs`, `routers/http/pd_router.rs`): read the worker's rank count from
`/server_info`, register one worker per rank under the id `url@rank` (same URL, same bootstrap
port), and inject the chosen rank into the request body. In PD the prefill leg gets
`routed_dp_rank` = the prefill's rank, the decode leg `routed_dp_rank` = the decode's rank and
`disagg_prefill_dp_rank` = the prefill's rank (so the decode knows which prefill rank holds the
KV).

Two deliberate differences from smg, both to match sglang 0.5.23 (paths under `sglang/srt/`):

- The rank count is `dp_size * attn_dp_size` (`runtime_context.py` `num_dp_ranks_of`). smg
  reads `dp_size` alone, but 0.5.23 resolves `--dp-size N --enable-dp-attention` to
  `attn_dp_size = N, dp_size = 1` (`arg_groups/parallel_hook.py`), so smg sees one rank.
- The bootstrap room of a DP-routed prefill is drawn congruent to its rank (room % ranks ==
  rank). A 0.5.23 prefill's default `--load-balance-method` is `follow_bootstrap_room`, and its
  KV sender fails a room routed to another rank unless the request carries
  `disagg_prefill_dp_rank` (`disaggregation/common/conn.py` CommonKVSender.__init__:
  "follow_bootstrap_room conflict"); smg draws rooms at random, which fails (ranks - 1) / ranks
  of its requests on such a prefill.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp

from gateway.bootstrap import MAX_ROOM
from gateway.workers import Worker, WorkerRegistry

log = logging.getLogger(__name__)


def rank_count(server_info: Any) -> int | None:
    """The DP ranks a `/server_info` answer describes; None if it does not say."""
    if not isinstance(server_info, dict):
        return None
    dp = _positive_int(server_info.get("dp_size"))
    # Older servers (and smg's test fixtures) have no attn_dp_size: one group.
    attn = _positive_int(server_info.get("attn_dp_size", 1))
    if dp is None or attn is None:
        return None
    return dp * attn


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return None


async def fetch_rank_count(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                           timeout: float) -> int | None:
    """Ask `url` for its DP ranks: `/server_info`, then the deprecated `/get_server_info`."""
    for path in ("/server_info", "/get_server_info"):
        try:
            async with session.get(url + path, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                if resp.status != 200:
                    continue
                count = rank_count(await resp.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("DP discovery %s%s failed: %s", url, path, exc)
            continue
        if count is not None:
            return count
    return None


async def expand(registry: WorkerRegistry, worker: Worker, session: aiohttp.ClientSession,
                 headers: dict[str, str], timeout: float) -> list[Worker]:
    """Replace `worker` by one worker per DP rank; unchanged (one worker, no rank) when the
    server has one rank or cannot say, so requests still reach it and it balances itself."""
    count = await fetch_rank_count(session, worker.url, headers, timeout)
    if count is None:
        log.warning("--dp-aware: %s did not report its DP size; routing to it without a rank",
                    worker.worker_id)
        return [worker]
    if count == 1:
        return [worker]
    registry.remove(worker.worker_id)
    ranks = [registry.add(worker.url, worker.role, worker.bootstrap_port,
                          f"{worker.worker_id}@{rank}", dp_rank=rank, dp_size=count)
             for rank in range(count)]
    for rank_worker in ranks:
        rank_worker.healthy = worker.healthy
    log.info("--dp-aware: %s has %d DP ranks", worker.worker_id, count)
    return ranks


def room_for(room: int, prefill: Worker) -> int:
    """A random `room` in [0, MAX_ROOM] moved within its block of `ranks` values to the one the
    prefill's rank owns under `follow_bootstrap_room` (room % ranks == rank); still uniform
    over that rank's rooms. Unchanged for a worker without a rank."""
    if prefill.dp_rank is None or not prefill.dp_size:
        return room
    moved = room - room % prefill.dp_size + prefill.dp_rank
    return moved if moved <= MAX_ROOM else moved - prefill.dp_size


def rooms_for(rooms: int | list[int], prefill: Worker) -> int | list[int]:
    if isinstance(rooms, list):
        return [room_for(r, prefill) for r in rooms]
    return room_for(rooms, prefill)


def with_ranks(body: dict[str, Any], worker: Worker,
               prefill: Worker | None = None) -> dict[str, Any]:
    """`body` for `worker`: with its `routed_dp_rank`, and on a decode leg the prefill's rank as
    `disagg_prefill_dp_rank`. The same object when there is nothing to add."""
    prefill_rank = prefill.dp_rank if prefill is not None else None
    if worker.dp_rank is None and prefill_rank is None:
        return body
    out = dict(body)
    if worker.dp_rank is not None:
        out["routed_dp_rank"] = worker.dp_rank
    if prefill_rank is not None:
        out["disagg_prefill_dp_rank"] = prefill_rank
    return out

"""Passthrough: every request to the first available worker (smg 1.13 `PassthroughPolicy`).

Meant for a gateway in front of one backend, where balancing buys nothing. With several
workers smg sends everything to the first healthy one in registration order and warns once;
so does this policy, so that a command line copied from smg behaves the same here. The
candidates arrive in registration order (gateway/workers.py), so a worker leaving rotation hands
its traffic to the next one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from gateway.routing import RoutingInput, Selection, WorkerView

log = logging.getLogger(__name__)


class PassthroughPolicy:
    name = "passthrough"
    needs_signature = False
    needs_request = False

    def __init__(self) -> None:
        self._warned = False

    def select(self, candidates: Sequence[WorkerView], routing: RoutingInput) -> Selection:
        if len(candidates) > 1 and not self._warned:
            self._warned = True
            log.warning("passthrough policy is meant for one backend but %d workers are "
                        "available; only the first receives traffic", len(candidates))
        return Selection(worker=candidates[0])

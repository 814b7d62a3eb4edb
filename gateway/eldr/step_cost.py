"""Step-cost decode decision (`--eldr-decision step-cost`): pure numpy, no I/O.

The band (gateway.eldr.band) approximates the physics with a proxy: send a request to a worker
whose zone is similar. This decision uses the physics directly. A decode step is memory-bandwidth
bound and streams, per MoE layer, the weights of every distinct expert the batch activates
(../shared/DESIGN.md, "Why expert locality matters"), so a worker's step time is modelled as

    step(w) = fixed + expert x distinct(w) + token x n(w)

with `distinct(w)` the expected number of distinct (MoE layer, expert) pairs one step of w's
batch activates and `n(w)` its in-flight decode requests. If request x joins w, every step of
w grows by `delta(w, x) = expert x added(w, x) + token`; the n(w) requests already there each
pay it per output token, and x itself pays the new step time. The decision picks the candidate
minimising the total time added per output token,

    cost(w, x) = n(w) x delta(w, x) + step(w) + delta(w, x)

(ties: fewer in flight, then candidate order). `fixed` is the same for every candidate, so it
never changes the choice; only the ratio expert : token does. Load balance is built in: cost
grows with n(w) both through `token x n(w)` and through `n(w) x delta`.

Expected distinct experts. A signature is `normalise(counts[mask] * idf[mask])` (zones.signature),
so dividing by the IDF weights recovers the masked layers' prompt counts up to scale; per layer
they give the request's expert mass `q[l, e]` (summing to 1). One decode step of the request
routes a token to top_k experts per layer, so it activates expert e with probability
`a[l, e] = 1 - (1 - q[l, e])^top_k` (independent draws: an approximation that keeps
`sum_e a <= top_k`). The prompt's routing stands for the decode's, ELDR's premise. For a worker
holding requests r, the probability that (l, e) is still idle is `P_w[l, e] = prod_r (1 - a_r)`,
so `distinct(w) = sum(1 - P_w)` and adding x activates `added(w, x) = P_w . a_x` new pairs in
expectation: one matrix-vector product over the workers, like the band's similarities. Masked
layers are a sample of the MoE layers, so both are scaled by `num_layers / masked layers`.

Experts with IDF 0 (used by every calibration request) carry no signature mass and are left
out; they are active on every busy worker anyway, so they hardly tell candidates apart.
In-flight requests the tracker has not seen (no signature, or admitted under an earlier table)
add to `n(w)` but not to `distinct(w)`, so right after a reload the estimate leans on load.

State: `InFlightExperts` keeps, per decode worker, `sum_r log(1 - a_r)` in float64 (adding and
removing a request are exact inverses, so the sums do not drift) and `P_w` in float32 for the
product. Dispatch admits a request when it sends the decode and releases it when the decode
ends (`Selection.release`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from gateway.eldr.band import Candidate
from zones.signature import SignatureSpec

if TYPE_CHECKING:  # attributes only: gateway.config is the one home of the defaults
    from gateway.config import Settings

FloatArray = npt.NDArray[np.float32]
# a <= 1 - EPS keeps log(1 - a) finite; an expert a request certainly uses is then "idle" with
# probability 1e-6, which changes nothing measurable.
EPS = 1e-6
_INITIAL_ROWS = 8


@dataclass(frozen=True, slots=True)
class StepCostModel:
    """Decode step time model, in seconds: `fixed + expert x distinct + token x batch`."""

    fixed: float  # per step, whatever the batch (dense weights, launches); never decides
    expert: float  # per distinct (MoE layer, expert) pair streamed in a step
    token: float  # per request in the batch (its attention KV reads and compute)

    @classmethod
    def from_settings(cls, settings: Settings) -> StepCostModel:
        """`--eldr-step-fixed-ms`, `--eldr-step-expert-us`, `--eldr-step-token-us`."""
        return cls(settings.eldr_step_fixed_ms * 1e-3, settings.eldr_step_expert_us * 1e-6,
                   settings.eldr_step_token_us * 1e-6)

    def __post_init__(self) -> None:
        for name in ("fixed", "expert", "token"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"step cost {name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class StepCostChoice:
    position: int  # index of the chosen worker in the candidate list
    cost: float  # seconds added per output token, summed over the worker's requests
    added: float  # expected distinct (MoE layer, expert) pairs the request adds there


class InFlightExperts:
    """Per decode worker, the expected expert usage of the requests in flight there, in one
    table's signature space (a new table gets a new tracker)."""

    __slots__ = ("_free", "_idle", "_inv_weights", "_layers", "_log", "_rows", "_scale",
                 "_top_k", "_tracked", "_width", "dim")

    def __init__(self, spec: SignatureSpec) -> None:
        weights = np.asarray(spec.idf, dtype=np.float32)[spec.layer_mask].ravel()
        # 1 / idf where the weight is positive; zero-weight experts carry no mass (docstring).
        self._inv_weights: FloatArray = np.divide(
            1.0, weights, out=np.zeros_like(weights), where=weights > 0).astype(np.float32)
        self._layers = int(np.count_nonzero(spec.layer_mask))
        self._width = spec.geometry.num_experts
        self._top_k = spec.geometry.top_k
        self._scale = spec.geometry.num_layers / self._layers
        self.dim = int(weights.size)
        self._rows: dict[str, int] = {}
        self._log = np.zeros((_INITIAL_ROWS, self.dim), dtype=np.float64)
        self._free: FloatArray = np.ones((_INITIAL_ROWS, self.dim), dtype=np.float32)
        # sum(P_w) per row, kept on admit/release so a decision does not re-read every row.
        self._idle = [float(self.dim)] * _INITIAL_ROWS
        self._tracked = [0] * _INITIAL_ROWS

    # --- per request -----------------------------------------------------------------------
    def activation(self, signature: FloatArray) -> FloatArray:
        """`a[l, e]`, flattened like the signature: the probability that one decode step of
        the request activates each masked (layer, expert) pair."""
        counts = (np.asarray(signature, dtype=np.float32) * self._inv_weights).reshape(
            self._layers, self._width)
        np.maximum(counts, 0.0, out=counts)
        totals = counts.sum(axis=1, keepdims=True)
        np.divide(counts, totals, out=counts, where=totals > 0)  # a massless layer stays 0
        # a = 1 - (1 - q)^k, clipped below 1 so that log(1 - a) stays finite.
        act: FloatArray = (1.0 - np.power(1.0 - counts, self._top_k)).astype(np.float32)
        np.clip(act, 0.0, 1.0 - EPS, out=act)
        return act.ravel()

    def admit(self, worker_id: str, act: FloatArray) -> Callable[[], None]:
        """Count a request with activation `act` on `worker_id`; returns its release (call it
        once when the decode ends; later calls do nothing)."""
        row = self._row(worker_id)
        delta = np.log1p(-act.astype(np.float64))
        self._apply(row, delta, +1)
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                self._apply(row, delta, -1)

        return release

    # --- per decision ----------------------------------------------------------------------
    def choose(
        self, model: StepCostModel, candidates: Sequence[Candidate], act: FloatArray
    ) -> StepCostChoice:
        """The candidate minimising the time added per output token (module docstring)."""
        rows = [self._row(c.worker_id) for c in candidates]
        used = len(self._rows)
        added = self._free[:used] @ act  # P_w . a_x for every known worker: one sgemv
        idle = self._idle
        scale = self._scale
        best = -1
        best_key = (np.inf, 0)
        best_cost = 0.0
        best_added = 0.0
        for position, (row, candidate) in enumerate(zip(rows, candidates, strict=True)):
            n = candidate.in_flight
            distinct = scale * (self.dim - idle[row])
            extra = scale * float(added[row])
            step = model.fixed + model.expert * distinct + model.token * n
            delta = model.expert * extra + model.token
            cost = (n + 1) * delta + step
            key = (cost, n)
            if key < best_key:  # strict: ties keep the earlier candidate
                best, best_key, best_cost, best_added = position, key, cost, extra
        return StepCostChoice(best, best_cost, best_added)

    # --- inspection --------------------------------------------------------------------------
    def distinct(self, worker_id: str) -> float:
        """Expected distinct (MoE layer, expert) pairs one step of the worker's tracked batch
        activates (scaled to all MoE layers)."""
        row = self._rows.get(worker_id)
        if row is None:
            return 0.0
        return self._scale * (self.dim - self._idle[row])

    def tracked(self, worker_id: str) -> int:
        """Requests admitted on the worker and not yet released."""
        row = self._rows.get(worker_id)
        return 0 if row is None else self._tracked[row]

    # --- internals ---------------------------------------------------------------------------
    def _row(self, worker_id: str) -> int:
        row = self._rows.get(worker_id)
        if row is None:
            row = len(self._rows)
            if row == len(self._log):  # grow by doubling: workers join rarely
                self._log = np.vstack([self._log, np.zeros_like(self._log)])
                self._free = np.vstack([self._free, np.ones_like(self._free)])
                self._idle.extend([float(self.dim)] * row)
                self._tracked.extend([0] * row)
            self._rows[worker_id] = row
        return row

    def _apply(self, row: int, delta: npt.NDArray[np.float64], sign: int) -> None:
        log = self._log[row]
        if sign > 0:
            log += delta
        else:
            log -= delta
        self._tracked[row] += sign
        if self._tracked[row] == 0:
            log[:] = 0.0  # an empty worker is exactly idle, whatever rounding accumulated
        free = self._free[row]
        np.exp(log, out=free, casting="same_kind")
        self._idle[row] = float(free.sum(dtype=np.float64))

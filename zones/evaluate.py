"""Held-out evaluation: does zone batching shrink the experts a decode step must stream?

The mechanism (DESIGN.md, "the physics"): a decode step streams the weights of every distinct
expert any request in the batch activates, per MoE layer. So the figure of merit is the
expected number of distinct experts per layer per decode step for a batch of B requests.

Simulation (seeded Monte Carlo, all numpy):

- `zone` batching: a decode worker serves the requests of its zone. A step picks a zone
  (uniformly: balanced zones see equal traffic), draws B of its held-out requests (with
  replacement: a zone usually has fewer held-out requests than B, and in production a worker's
  batch is many concurrent requests *like* its zone's), and one random decode token of each.
- `random` batching: random dispatch gives each worker a random subset of requests; a step
  draws a random subset of the same size as the zone drawn for it, then B requests from that
  subset the same way. Matching the population size matters: sampling with replacement from
  a small population repeats requests, and a repeated request shares experts with itself, so
  comparing zones against batches from the whole pool would credit zones with that effect.
  Round-robin and random dispatch form the same batch distribution when arrivals are
  exchangeable, so this one baseline stands for both.

Each held-out request's zone is the most similar centroid to its signature (the pure locality
limit of the band rule; load-driven band choices only move requests toward `random`). Sources
of that signature: `exact` (its prompt counts) and `predictor` (prompt text / ids only).

Decode tokens: exact per-token rows when the input has them (traces, routed_experts); for
count-only inputs, each step draws top_k distinct experts per layer with probability
proportional to the request's decode counts (Gumbel top-k), an approximation that ignores
within-token correlation across layers; the summary says which was used.

Uncertainty: `reduction +- 1.96 sd` of half-sampling replicates (random halves of the held-out
requests, simulation redone); it covers which requests were held out, not which were used to
fit (tests/zones/test_esft.py repeats whole train/test splits for that).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zones.inputs import CalibrationSet
from zones.signature import signature_rho
from zones.table import ZoneTable


class EvaluationError(ValueError):
    """The held-out set cannot be evaluated against the table."""


@dataclass(frozen=True)
class BatchResult:
    batch_size: int
    random: float  # mean distinct experts per layer per step, random batching
    zone: dict[str, float]  # source -> same, zone batching
    reduction: dict[str, float]  # source -> 1 - zone/random
    ci: dict[str, tuple[float, float]]  # source -> ~95% interval of reduction (half-sampling)


@dataclass
class Evaluation:
    num_requests: int
    num_zones: int
    rho: float | None
    zone_sizes: dict[str, list[int]]  # source -> held-out requests per zone
    predictor_accuracy: float | None  # predicted zone == exact zone
    chance_accuracy: float | None  # always guessing the largest exact zone
    token_rows: str  # "exact" or "sampled-from-counts"
    batches: list[BatchResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_requests": self.num_requests,
            "num_zones": self.num_zones,
            "rho": self.rho,
            "zone_sizes": self.zone_sizes,
            "predictor_accuracy": self.predictor_accuracy,
            "chance_accuracy": self.chance_accuracy,
            "token_rows": self.token_rows,
            "batches": [
                {
                    "batch_size": b.batch_size,
                    "random": b.random,
                    "zone": b.zone,
                    "reduction": b.reduction,
                    "ci95": {k: list(v) for k, v in b.ci.items()},
                }
                for b in self.batches
            ],
            "notes": self.notes,
        }


class TokenSampler:
    """Draws one decode token's `[L, top_k]` expert rows for given requests."""

    def __init__(self, calib: CalibrationSet) -> None:
        g = calib.geometry
        self.num_layers, self.num_experts, self.top_k = g.num_layers, g.num_experts, g.top_k
        self.rows: np.ndarray | None = None  # all requests' decode rows, concatenated
        if calib.decode_tokens is not None and all(len(t) for t in calib.decode_tokens):
            self.rows = np.concatenate(calib.decode_tokens).astype(np.int16)
            self.lengths = np.array([len(t) for t in calib.decode_tokens], dtype=np.int64)
            self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
            self.kind = "exact"
        elif calib.decode_counts is not None and np.all(calib.decode_counts.sum(axis=(1, 2)) > 0):
            with np.errstate(divide="ignore"):
                self.log_p = np.log(calib.decode_counts.astype(np.float64))  # [N, L, E]
            self.kind = "sampled-from-counts"
        else:
            raise EvaluationError(
                "held-out requests need decode usage (token rows or non-empty decode/output counts)"
            )

    def draw(self, requests: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """requests [S, B] -> expert ids [S, B, L, top_k]."""
        if self.rows is not None:
            pos = (rng.random(requests.shape) * self.lengths[requests]).astype(np.int64)
            return self.rows[self.starts[requests] + pos]
        gumbel = rng.gumbel(size=(*requests.shape, self.num_layers, self.num_experts))
        keys = self.log_p[requests] + gumbel
        return np.argpartition(-keys, self.top_k - 1, axis=-1)[..., : self.top_k]


def distinct_per_step(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """experts [S, B, L, k] -> distinct experts per layer, averaged over layers: [S]."""
    s, _, num_layers, _ = experts.shape
    seen = np.zeros((s, num_layers, num_experts), dtype=bool)
    step = np.arange(s)[:, None, None, None]
    layer = np.arange(num_layers)[None, None, :, None]
    seen[step, layer, experts] = True
    return seen.sum(axis=2).mean(axis=1)


def _simulate(
    zones: np.ndarray,
    pool: np.ndarray,
    sampler: TokenSampler,
    num_zones: int,
    batch_size: int,
    steps: int,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """(random, zone) mean distinct experts per layer per step over `pool` request indices."""
    members = [pool[zones[pool] == z] for z in range(num_zones)]
    nonempty = [m for m in members if len(m)]
    which = rng.integers(0, len(nonempty), size=steps)
    zone_req = np.empty((steps, batch_size), dtype=np.int64)
    for z, m in enumerate(nonempty):
        sel = which == z
        zone_req[sel] = m[rng.integers(0, len(m), size=(int(sel.sum()), batch_size))]
    # Random dispatch: the worker's population is a random subset of the same size as the zone
    # drawn for that step, sampled the same way, so both arms repeat requests equally often.
    rand_req = np.empty((steps, batch_size), dtype=np.int64)
    for s in range(steps):
        population = rng.choice(pool, size=len(nonempty[which[s]]), replace=False)
        rand_req[s] = population[rng.integers(0, len(population), size=batch_size)]
    n_exp = sampler.num_experts
    rand = distinct_per_step(sampler.draw(rand_req, rng), n_exp).mean()
    zone = distinct_per_step(sampler.draw(zone_req, rng), n_exp).mean()
    return float(rand), float(zone)


def evaluate(
    table: ZoneTable,
    heldout: CalibrationSet,
    *,
    batch_sizes: Sequence[int] = (8, 16, 32, 64),
    steps: int = 2000,
    bootstrap: int = 100,
    bootstrap_steps: int = 400,
    seed: int = 0,
) -> Evaluation:
    g, tg = heldout.geometry, table.geometry
    if (g.num_layers, g.num_experts, g.top_k) != (tg.num_layers, tg.num_experts, tg.top_k):
        raise EvaluationError(f"held-out geometry {g} differs from the table's {tg}")
    if any(b < 1 for b in batch_sizes):
        raise EvaluationError("batch sizes must be >= 1")
    sigs, valid = table.spec.build_many(heldout.signature_counts)
    if int(valid.sum()) < 2:
        raise EvaluationError("fewer than 2 held-out requests have a non-empty signature")
    sampler = TokenSampler(heldout)
    k = table.num_zones
    exact_zone = np.argmax(sigs @ table.centroids.T, axis=1)
    sources: dict[str, np.ndarray] = {"exact": exact_zone}
    pools: dict[str, np.ndarray] = {"exact": np.flatnonzero(valid)}
    notes = [f"signatures from {heldout.signature_from} counts"]
    if heldout.signature_from != "prompt":
        notes.append(
            "exact zones of output-count rows use each request's own decode usage: an upper "
            "bound for any routing decided before decode (the predictor rows are the real test)"
        )
    accuracy = chance = None
    if table.predictor is not None and heldout.has_prompts:
        texts = heldout.texts or [None] * len(heldout)
        ids = heldout.input_ids or [None] * len(heldout)
        pred_zone = np.full(len(heldout), -1, dtype=np.int64)
        for i in range(len(heldout)):
            p = table.predictor.predict(texts[i], ids[i])
            if p is not None:
                pred_zone[i] = int(np.argmax(table.centroids @ p))
        both = valid & (pred_zone >= 0)
        if both.sum() >= 2:
            sources["predictor"] = pred_zone
            pools["predictor"] = np.flatnonzero(both)
            accuracy = float(np.mean(pred_zone[both] == exact_zone[both]))
            chance = float(np.bincount(exact_zone[both], minlength=k).max() / both.sum())
    elif table.predictor is None:
        notes.append("table has no predictor")
    else:
        notes.append("held-out set has no prompts: predictor not evaluated")
    rho = None
    idx = np.intersect1d(np.flatnonzero(valid), heldout.independent_rows())
    if heldout.decode_counts is not None and len(idx) >= 2:
        rho = signature_rho(table.spec, sigs[idx], heldout.decode_counts[idx], seed=seed)
    elif heldout.decode_counts is not None:
        notes.append("rho not reported: signatures are built from the decode's own output counts")
    ev = Evaluation(
        num_requests=len(heldout),
        num_zones=k,
        rho=rho,
        zone_sizes={s: np.bincount(z[pools[s]], minlength=k).tolist() for s, z in sources.items()},
        predictor_accuracy=accuracy,
        chance_accuracy=chance,
        token_rows=sampler.kind,
        notes=notes,
    )
    rng = np.random.default_rng(seed)
    for b in batch_sizes:
        rand_ref = None
        zone_mean: dict[str, float] = {}
        red: dict[str, float] = {}
        ci: dict[str, tuple[float, float]] = {}
        for name, zones in sources.items():
            pool = pools[name]
            r, z = _simulate(zones, pool, sampler, k, b, steps, rng)
            rand_ref = r if name == "exact" else rand_ref
            zone_mean[name] = z
            red[name] = 1.0 - z / r
            # Half-sampling replicates (half the requests, without replacement): their spread
            # approximates the full-sample estimator's (var of a half-sample mean with the
            # finite-population correction is var/n), and unlike a with-replacement bootstrap
            # they never duplicate a request, which would fake locality.
            reps = []
            half = max(k, len(pool) // 2)
            for _ in range(bootstrap if half < len(pool) else 0):
                sample = np.sort(rng.choice(pool, size=half, replace=False))
                rb, zb = _simulate(zones, sample, sampler, k, b, bootstrap_steps, rng)
                reps.append(1.0 - zb / rb)
            if len(reps) >= 2:
                spread = 1.96 * float(np.std(reps, ddof=1))
                ci[name] = (red[name] - spread, red[name] + spread)
        assert rand_ref is not None
        ev.batches.append(BatchResult(b, rand_ref, zone_mean, red, ci))
    return ev


def summary(ev: Evaluation) -> str:
    lines = [
        f"held-out requests {ev.num_requests}, zones {ev.num_zones}, "
        f"decode token rows: {ev.token_rows}",
        "rho (signature vs decode usage, Spearman) = "
        + ("n/a (no decode usage)" if ev.rho is None else f"{ev.rho:.3f}"),
    ]
    for src, sizes in ev.zone_sizes.items():
        lines.append(f"held-out zone sizes ({src}): {sizes}")
    if ev.predictor_accuracy is not None:
        lines.append(
            f"predictor zone accuracy {ev.predictor_accuracy:.3f} "
            f"(chance = largest zone share {ev.chance_accuracy:.3f}, "
            f"uniform {1 / ev.num_zones:.3f})"
        )
    lines.append("distinct experts per layer per decode step (lower is better):")
    header = f"{'batch':>6} {'random':>8}"
    sources = list(ev.batches[0].zone) if ev.batches else []
    for s in sources:
        header += f" {'zone/' + s:>14} {'reduction [95% CI]':>26}"
    lines.append(header)
    for b in ev.batches:
        row = f"{b.batch_size:>6} {b.random:>8.2f}"
        for s in sources:
            lo, hi = b.ci.get(s, (float("nan"), float("nan")))
            row += f" {b.zone[s]:>14.2f} {b.reduction[s]:>+9.1%} [{lo:+.1%}, {hi:+.1%}]"
        lines.append(row)
    lines.extend(f"note: {n}" for n in ev.notes)
    return "\n".join(lines)


def plot(ev: Evaluation, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [b.batch_size for b in ev.batches]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(xs, [b.random for b in ev.batches], "o-", label="random / round-robin")
    for s in ev.batches[0].zone if ev.batches else []:
        ax.plot(xs, [b.zone[s] for b in ev.batches], "s-", label=f"zone ({s} signature)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("decode batch size")
    ax.set_ylabel("distinct experts per layer per step")
    ax.set_title(title or f"{ev.num_zones} zones, {ev.num_requests} held-out requests")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

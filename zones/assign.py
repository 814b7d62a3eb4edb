"""Balanced assignment of N points to K zones: sizes N//K or N//K + 1, maximum total similarity.

Balance is the point (DESIGN.md: unbalanced k-means regressed tail TPOT by up to 17.4% in the
ELDR paper), so the constraint is hard: exactly `N % K` zones get `N//K + 1` members and the
rest get `N//K`. Which zones get the extra member is part of the optimisation.

Two solvers over a similarity matrix `S [N, K]` (cosine: higher is better):

- `exact_assign`: optimal, via `scipy.optimize.linear_sum_assignment` on the slot-expanded
  matrix (each zone repeated as N//K mandatory slots plus one optional slot). Memory N x N and
  roughly cubic time, so only for a few thousand points (the paper's fit used this O(N^3) kind).
- `scalable_assign`: near-linear. Dual prices (a few rounds of price ascent so that argmax of
  `S - price` is roughly balanced), a capacity-respecting greedy in order of regret, then
  pairwise swap and single-move improvement passes. Its optimality gap against `exact_assign`
  is measured in tests/zones/test_assign.py and printed by benchmarks/zones_fit.py.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]


class AssignmentError(ValueError):
    """The assignment problem is malformed (shape, NaN, K > N)."""


def balanced_sizes(n: int, k: int) -> tuple[int, int]:
    """(floor size, number of zones that get one extra member)."""
    return n // k, n % k


def _check(sim: np.ndarray) -> tuple[int, int]:
    if sim.ndim != 2:
        raise AssignmentError(f"similarities must be [N, K], got {sim.shape}")
    n, k = sim.shape
    if k < 1 or n < k:
        raise AssignmentError(f"need at least one point per zone: N={n}, K={k}")
    if not np.all(np.isfinite(sim)):
        raise AssignmentError("similarities hold NaN or infinite values")
    return n, k


def is_balanced(labels: npt.ArrayLike, k: int) -> bool:
    sizes = np.bincount(np.asarray(labels), minlength=k)
    return len(sizes) == k and int(sizes.max() - sizes.min()) <= 1


def total_similarity(sim: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    s = np.asarray(sim)
    lab = np.asarray(labels)
    return float(s[np.arange(len(lab)), lab].astype(np.float64).sum())


def exact_assign(sim: npt.ArrayLike) -> IntArray:
    """Optimal balanced assignment (maximises total similarity)."""
    from scipy.optimize import linear_sum_assignment

    s = np.asarray(sim, dtype=np.float64)
    n, k = _check(s)
    floor, extra = balanced_sizes(n, k)
    # Mandatory slots get a bonus larger than any possible cost difference (similarities lie in
    # [-1, 1], so any single swap changes the cost by at most 2): the optimum then fills every
    # mandatory slot, i.e. every zone reaches N//K, and the `extra` leftover points go to the
    # optional slots of whichever zones suit them best.
    bonus = 4.0 + 2.0 * float(np.abs(s).max())
    cols = [np.repeat(s, floor, axis=1) + bonus]  # zone-major: zone z owns columns z*floor..
    owner = [np.repeat(np.arange(k), floor)]
    if extra:
        cols.append(s)
        owner.append(np.arange(k))
    cost = -np.concatenate(cols, axis=1)
    owners = np.concatenate(owner)
    rows, picked = linear_sum_assignment(cost)
    labels = np.empty(n, dtype=np.int64)
    labels[rows] = owners[picked]
    return labels


def _price_ascent(sim: np.ndarray, cap: float, rounds: int) -> np.ndarray:
    """Zone prices such that argmax(S - price) is close to balanced (Lagrangian dual ascent)."""
    k = sim.shape[1]
    price = np.zeros(k, dtype=sim.dtype)
    spread = float(sim.max() - sim.min()) or 1.0
    step = spread / 4
    for _ in range(rounds):
        counts = np.bincount(np.argmax(sim - price, axis=1), minlength=k)
        over = (counts - cap) / cap
        if np.all(np.abs(over) < 0.02):
            break
        price += (step * np.clip(over, -1.0, 1.0)).astype(sim.dtype)
        step *= 0.8
    return price


def _greedy(sim: np.ndarray, price: np.ndarray, floor: int, extra: int) -> IntArray:
    """Capacity-respecting greedy: points with the most to lose go first."""
    n, k = sim.shape
    adj = sim - price
    # Preference lists; for large K only the top few are needed almost always.
    top = min(k, 8)
    part = (
        np.argpartition(-adj, top - 1, axis=1)[:, :top]
        if top < k
        else np.tile(np.arange(k), (n, 1))
    )
    order_in_row = np.argsort(-np.take_along_axis(adj, part, axis=1), axis=1)
    prefs = np.take_along_axis(part, order_in_row, axis=1)
    best = np.take_along_axis(adj, prefs[:, :1], axis=1)[:, 0]
    second = np.take_along_axis(adj, prefs[:, 1:2], axis=1)[:, 0] if k > 1 else best
    order = np.argsort(-(best - second), kind="stable")
    sizes = np.zeros(k, dtype=np.int64)
    cap = np.full(k, floor + (1 if extra else 0), dtype=np.int64)
    full_extra = 0
    labels = np.full(n, -1, dtype=np.int64)
    prefs_list = prefs.tolist()
    leftovers = []
    for i in order.tolist():
        for z in prefs_list[i]:
            if sizes[z] < cap[z]:
                labels[i] = z
                sizes[z] += 1
                if extra and sizes[z] == floor + 1:
                    full_extra += 1
                    if full_extra == extra:  # every other zone now stops at floor
                        cap = np.where(sizes > floor, cap, floor)
                break
        else:
            leftovers.append(i)
    for i in leftovers:  # all top preferences were full: best zone with room
        room = np.flatnonzero(sizes < cap)
        z = int(room[np.argmax(adj[i, room])])
        labels[i] = z
        sizes[z] += 1
        if extra and sizes[z] == floor + 1:
            full_extra += 1
            if full_extra == extra:
                cap = np.where(sizes > floor, cap, floor)
    return labels


def _improve(sim: np.ndarray, labels: IntArray, floor: int, passes: int) -> IntArray:
    """Local search: swap pairs between zones, and move points from big to small zones."""
    n, k = sim.shape
    labels = labels.copy()
    for _ in range(passes):
        changed = 0
        current = sim[np.arange(n), labels]
        order = np.argsort(labels, kind="stable")
        sizes = np.bincount(labels, minlength=k)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        members = [order[s : s + c] for s, c in zip(starts.tolist(), sizes.tolist(), strict=True)]
        # best_move[a, b]: the most any member of zone a gains by moving to zone b. A swap
        # between a and b can only pay if best_move[a, b] + best_move[b, a] > 0, which after
        # the greedy holds for few pairs: only those are searched (values from the pass start;
        # pairs that become profitable mid-pass are caught by the next pass).
        gain = sim - current[:, None]
        best_move = np.maximum.reduceat(gain[order], starts, axis=0)
        worth = best_move + best_move.T > 1e-9
        for a, b in zip(*np.nonzero(np.triu(worth, k=1)), strict=True):
            a, b = int(a), int(b)
            ma, mb = members[a], members[b]
            if not len(ma) or not len(mb):
                continue
            gain_a = sim[ma, b] - current[ma]  # moving a-members to b
            gain_b = sim[mb, a] - current[mb]
            oa = np.argsort(-gain_a)
            ob = np.argsort(-gain_b)
            m = min(len(oa), len(ob))
            pair_gain = gain_a[oa[:m]] + gain_b[ob[:m]]
            good = int(np.count_nonzero(pair_gain > 1e-9))  # sorted, so a prefix
            if good:
                ia, ib = ma[oa[:good]], mb[ob[:good]]
                labels[ia], labels[ib] = b, a
                current[ia], current[ib] = sim[ia, b], sim[ib, a]
                keep_a = np.ones(len(ma), dtype=bool)
                keep_a[oa[:good]] = False
                keep_b = np.ones(len(mb), dtype=bool)
                keep_b[ob[:good]] = False
                members[a] = np.concatenate([ma[keep_a], ib])
                members[b] = np.concatenate([mb[keep_b], ia])
                changed += good
        # Moves from a zone of size floor+1 to one of size floor keep the size multiset.
        sizes = np.array([len(m) for m in members])
        big = np.flatnonzero(sizes > floor)
        small = np.flatnonzero(sizes == floor)
        if len(big) and len(small):
            for a in big.tolist():
                ma = members[a]
                gains = sim[ma][:, small] - current[ma][:, None]
                i, j = np.unravel_index(int(np.argmax(gains)), gains.shape)
                if gains[i, j] > 1e-9:
                    b = int(small[j])
                    p = int(ma[i])
                    labels[p] = b
                    current[p] = sim[p, b]
                    members[a] = np.delete(ma, i)
                    members[b] = np.append(members[b], p)
                    small = np.setdiff1d(small, [b])
                    changed += 1
                    if not len(small):
                        break
        if not changed:
            break
    return labels


def scalable_assign(sim: npt.ArrayLike, *, price_rounds: int = 30, passes: int = 6) -> IntArray:
    """Near-optimal balanced assignment in roughly O(N K log K + passes x N K)."""
    s = np.asarray(sim, dtype=np.float32)
    n, k = _check(s)
    floor, extra = balanced_sizes(n, k)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    price = _price_ascent(s, n / k, price_rounds)
    labels = _greedy(s, price, floor, extra)
    return _improve(s, labels, floor, passes)

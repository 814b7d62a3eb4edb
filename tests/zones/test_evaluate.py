"""Evaluation mechanics: distinct-expert counting and a fair random baseline."""

from __future__ import annotations

import numpy as np

from zones.evaluate import TokenSampler, _simulate, distinct_per_step
from zones.geometry import ModelGeometry
from zones.inputs import CalibrationSet


def test_distinct_per_step_counts_union_per_layer() -> None:
    # One step, batch of 2, 2 layers, top-2: layer 0 uses {1,2} and {2,3} -> 3 distinct;
    # layer 1 uses {0,1} twice -> 2 distinct; mean over layers 2.5.
    experts = np.array([[[[1, 2], [0, 1]], [[2, 3], [1, 0]]]])
    assert distinct_per_step(experts, num_experts=4).tolist() == [2.5]


def _grouped_tokens(n: int, groups: int, seed: int) -> tuple[CalibrationSet, np.ndarray]:
    """Decode tokens whose experts depend on the request's group."""
    g = ModelGeometry("toy", num_layers=3, num_experts=32, top_k=2)
    rng = np.random.default_rng(seed)
    group = rng.integers(0, groups, size=n)
    rows = []
    for i in range(n):
        pool = np.arange(8) + 8 * group[i]
        tokens = np.stack(
            [np.stack([rng.choice(pool, 2, replace=False) for _ in range(3)]) for _ in range(20)]
        )
        rows.append(tokens)
    counts = np.zeros((n, 3, 32), np.int32)
    return CalibrationSet(g, counts + 1, counts + 1, decode_tokens=rows), group


def test_random_zones_show_no_reduction_and_true_groups_do() -> None:
    calib, group = _grouped_tokens(80, groups=4, seed=0)
    sampler = TokenSampler(calib)
    pool = np.arange(80)
    rng = np.random.default_rng(1)
    # Zones unrelated to routing: the size-matched baseline must not credit them.
    shuffled = rng.permutation(np.repeat(np.arange(4), 20))
    r, z = _simulate(shuffled, pool, sampler, 4, 16, 3000, rng)
    assert abs(1 - z / r) < 0.02
    # Zones equal to the routing groups: a large reduction.
    r, z = _simulate(group, pool, sampler, 4, 16, 3000, rng)
    assert 1 - z / r > 0.3
    # Tiny zones repeat requests; the baseline repeats them equally, so still no credit.
    tiny = rng.permutation(np.arange(80) % 20)
    r, z = _simulate(tiny, pool, sampler, 20, 16, 3000, rng)
    assert abs(1 - z / r) < 0.02

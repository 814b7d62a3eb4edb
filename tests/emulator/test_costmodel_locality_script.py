"""benchmarks/emulator_locality.py runs end to end and reports the locality effect it measures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_locality_script_sees_disjoint_domains_as_local(tmp_path):
    # Two synthetic domains on disjoint halves of the 64 experts: a same-domain batch can touch
    # at most 32 experts per layer, a mixed one up to 64, so the printed ratio must exceed 1.
    rng = np.random.default_rng(1)
    rows, offsets, domains = [], [0], []
    for i in range(16):
        base = 0 if i % 2 == 0 else 32
        n = 12
        for _ in range(n):
            rows.append([base + rng.choice(32, 6, replace=False) for _ in range(26)])
        offsets.append(offsets[-1] + n)
        domains.append("even" if i % 2 == 0 else "odd")
    path = tmp_path / "trace.npz"
    np.savez(path, expert_ids=np.array(rows, dtype=np.int8), seq_offsets=np.array(offsets),
             domain=np.array(domains), num_layers=26, num_experts=64, top_k=6)
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "emulator_locality.py"), "--source", "trace",
         "--trace-path", str(path), "--trace-batch", "4", "--steps", "4", "--trials", "2"],
        capture_output=True, text=True, timeout=120, check=True, cwd=REPO,
    ).stdout
    match = re.search(r"RATIO mixed / same\s+([\d.]+)x\s+([\d.]+)x", out)
    assert match, out
    assert float(match.group(1)) > 1.2 and float(match.group(2)) > 1.0
    assert "decode finds own prefill" in out


# The trace's mixed / same-domain distinct experts per layer at decode batch 16 in this script
# (aligned decode steps): 1.228x. token-hash used to be calibrated to it on the script's
# offline corpora (topic weight 0.7: 1.229x). Since the refit on the trace's routing statistics
# (benchmarks/routing_stats.py, docs/emulator-cost-model.md section 4) its same-domain locality
# comes mostly from a shared opening (a task's instruction): on templated workload prompts it
# matches the trace (tests/emulator/test_routing_stats.py), while random chunks of the corpora,
# which share no opening, are barely local (measured 1.028-1.030x, seeds 0-1).
TRACE_RATIO_BATCH16 = 1.228
UNTEMPLATED_RATIO_RANGE = (1.0, 1.12)


def _text_domains_available() -> bool:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from emulator_locality import domain_texts
    finally:
        sys.path.pop(0)
    return len(domain_texts()) == 4


def _token_hash_ratio(model: str, batch: int, seed: int, steps: int, trials: int) -> float:
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "emulator_locality.py"), "--source",
         "token-hash", "--model", model, "--batch", str(batch), "--steps", str(steps),
         "--trials", str(trials), "--seed", str(seed), "--corr-decode-tokens", str(steps)],
        capture_output=True, text=True, timeout=300, check=True, cwd=REPO,
    ).stdout
    match = re.search(r"RATIO mixed / same\s+([\d.]+)x", out)
    assert match, out
    return float(match.group(1))


@pytest.mark.slow
def test_token_hash_on_untemplated_corpora_is_only_slightly_local_on_the_trace_geometry():
    if not _text_domains_available():
        pytest.skip("the 4 offline text domains are not on this machine")
    ratios = [_token_hash_ratio("DeepSeek-V2-Lite", 16, seed, steps=32, trials=5)
              for seed in (0, 1)]
    low, high = UNTEMPLATED_RATIO_RANGE
    assert low < float(np.mean(ratios)) < min(high, TRACE_RATIO_BATCH16), ratios


@pytest.mark.slow
def test_token_hash_same_domain_batches_are_local_on_qwen3():
    # Not tuned on this geometry: the fitted weights are applied as is. On the untemplated
    # corpora the effect is small (1.016-1.023x, seeds 0-2); templated prompts:
    # test_routing_stats.py::test_fitted_weights_carry_over_to_the_other_geometries.
    if not _text_domains_available():
        pytest.skip("the 4 offline text domains are not on this machine")
    assert _token_hash_ratio("Qwen3-30B-A3B", 64, 0, steps=8, trials=2) > 1.0

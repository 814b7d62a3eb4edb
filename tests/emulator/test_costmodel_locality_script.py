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

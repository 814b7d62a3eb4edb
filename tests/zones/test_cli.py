"""`python -m zones` end to end in subprocesses: fit, validate, evaluate, refit, predictor-eval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zones.calibration import CalibrationRecord, write_calibration
from zones.table import load_table

from .helpers import SMALL, clustered_counts

pytestmark = pytest.mark.slow


def _zones(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zones", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def log(tmp_path: Path) -> Path:
    """A calibration log with prompt text whose words follow the request's group."""
    prompt, decode, group = clustered_counts(160, groups=4, seed=0)
    rng = np.random.default_rng(0)
    records = []
    for i in range(len(group)):
        words = [f"g{group[i]}w{j}" for j in rng.integers(0, 30, size=25)]
        words += [f"shared{j}" for j in rng.integers(0, 30, size=25)]
        records.append(
            CalibrationRecord(
                SMALL,
                1_700_000_000.0 + i,
                text=" ".join(words),
                prompt_counts=prompt[i],
                output_counts=decode[i],
            )
        )
    path = tmp_path / "calib.jsonl"
    write_calibration(path, records)
    return path


def test_fit_is_deterministic_and_validates(tmp_path: Path, log: Path) -> None:
    common = [
        "fit",
        "-i",
        str(log),
        "--split",
        "train",
        "--num-workers",
        "4",
        "--seed",
        "3",
        "--created-at",
        "none",
        "--no-progress",
    ]
    a = _zones(*common, "-o", "a.json", cwd=tmp_path)
    b = _zones(*common, "-o", "b.json", cwd=tmp_path)
    assert a.returncode == 0, a.stderr
    assert b.returncode == 0, b.stderr
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    table = load_table(tmp_path / "a.json")
    assert table.predictor is not None and table.workers == tuple(f"decode-{i}" for i in range(4))
    assert "created_at" not in table.provenance
    assert table.provenance["inputs"][0]["split"] == "train"
    ok = _zones("validate", "a.json", cwd=tmp_path)
    assert ok.returncode == 0 and "OK" in ok.stdout and "K=4" in ok.stdout
    doc = json.loads((tmp_path / "a.json").read_text())
    doc["workers"][1] = doc["workers"][0]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    bad = _zones("validate", "bad.json", cwd=tmp_path)
    assert bad.returncode == 1 and "checksum: mismatch" in bad.stderr
    stamped = _zones(
        "fit",
        "-i",
        str(log),
        "--workers",
        "http://d0,http://d1",
        "-o",
        "c.json",
        "--created-at",
        "2026-01-01T00:00:00+00:00",
        "--no-progress",
        cwd=tmp_path,
    )
    assert stamped.returncode == 0, stamped.stderr
    assert load_table(tmp_path / "c.json").provenance["created_at"] == "2026-01-01T00:00:00+00:00"


def test_evaluate_refit_and_predictor_eval(tmp_path: Path, log: Path) -> None:
    fit = _zones(
        "fit",
        "-i",
        str(log),
        "--split",
        "train",
        "--num-workers",
        "4",
        "-o",
        "t.json",
        "--no-progress",
        cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr
    ev = _zones(
        "evaluate",
        "-t",
        "t.json",
        "-i",
        str(log),
        "--split",
        "test",
        "--batch-sizes",
        "4,16",
        "--steps",
        "300",
        "--bootstrap",
        "20",
        "--worker-counts",
        "2",
        "--plot",
        "ev.png",
        "--json",
        "ev.json",
        cwd=tmp_path,
    )
    assert ev.returncode == 0, ev.stderr
    assert "reduction" in ev.stdout and "predictor zone accuracy" in ev.stdout
    assert (tmp_path / "ev.png").stat().st_size > 1000
    assert (tmp_path / "ev_k2.png").is_file()
    result = json.loads((tmp_path / "ev.json").read_text())
    batches = result["table_eval"]["batches"]
    assert [b["batch_size"] for b in batches] == [4, 16]
    assert set(batches[0]["zone"]) == {"exact", "predictor"}
    assert "2" in result["worker_counts"]

    pe = _zones("predictor-eval", "-t", "t.json", "-i", str(log), "--split", "test", cwd=tmp_path)
    assert pe.returncode == 0, pe.stderr
    assert "predictor zone accuracy" in pe.stdout and "latency per predict" in pe.stdout

    rf = _zones(
        "refit",
        "--old",
        "t.json",
        "-i",
        str(log),
        "--workers",
        "decode-0,decode-1,decode-2,decode-3,decode-4",
        "-o",
        "r.json",
        "--no-progress",
        cwd=tmp_path,
    )
    assert rf.returncode == 0, rf.stderr
    assert load_table(tmp_path / "r.json").workers[-1] == "decode-4"
    assert "added ['decode-4']" in rf.stdout


def test_errors_exit_nonzero_with_a_message(tmp_path: Path, log: Path) -> None:
    missing = _zones("validate", "nope.json", cwd=tmp_path)
    assert missing.returncode == 1 and "error: file: cannot read" in missing.stderr
    too_many = _zones(
        "fit", "-i", str(log), "--num-workers", "500", "-o", "x.json", "--no-progress", cwd=tmp_path
    )
    assert too_many.returncode == 1 and "K=500" in too_many.stderr
    usage = _zones("fit", "-i", str(log), "-o", "x.json", cwd=tmp_path)
    assert usage.returncode == 2

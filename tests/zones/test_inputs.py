"""Input loaders: traces, count matrices, SGLang routed_experts dumps, calibration logs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from zones.calibration import CalibrationRecord, write_calibration
from zones.inputs import InputError, load_inputs, split_indices, split_prefill
from zones.routed_experts import counts_from_expert_ids, encode_routed_experts

from .helpers import SMALL, random_counts


def _expert_ids(tokens: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = np.stack(
        [
            np.stack([rng.choice(SMALL.num_experts, SMALL.top_k, replace=False) for _ in range(4)])
            for _ in range(tokens)
        ]
    )
    return ids.astype(np.int32)


def test_trace_npz_split_by_prefill_fraction(tmp_path: Path) -> None:
    reqs = [_expert_ids(10, 0), _expert_ids(4, 1), _expert_ids(2, 2)]
    path = tmp_path / "trace.npz"
    np.savez(
        path,
        expert_ids=np.concatenate(reqs).astype(np.int8),
        seq_offsets=np.array([0, 10, 14, 16]),
        num_layers=4,
        num_experts=8,
        top_k=2,
    )
    calib = load_inputs([path], prefill_fraction=0.3)
    assert len(calib) == 3 and calib.geometry.top_k == 2
    cut = split_prefill(10, 0.3)
    assert cut == 3
    np.testing.assert_array_equal(
        calib.signature_counts[0], counts_from_expert_ids(reqs[0][:3], SMALL)
    )
    assert calib.decode_counts is not None and calib.decode_tokens is not None
    np.testing.assert_array_equal(
        calib.decode_counts[0], counts_from_expert_ids(reqs[0][3:], SMALL)
    )
    assert len(calib.decode_tokens[2]) == 1  # 2 tokens: one prompt, one decode
    assert calib.sources[0]["sha256"].startswith("sha256:")


def test_routed_experts_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "dump.jsonl"
    ids = _expert_ids(7, 3)
    line = {
        "routed_experts": encode_routed_experts(ids),
        "num_prompt_tokens": 5,
        "geometry": SMALL.to_dict(),
        "text": "hello world",
    }
    path.write_text(json.dumps(line) + "\n" + json.dumps(line) + "\n")
    calib = load_inputs([path])
    assert len(calib) == 2 and calib.texts == ["hello world", "hello world"]
    np.testing.assert_array_equal(calib.signature_counts[0], counts_from_expert_ids(ids[:5], SMALL))
    bad = dict(line, num_prompt_tokens=99)
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(InputError, match=r"dump.jsonl:1: num_prompt_tokens"):
        load_inputs([path])
    bad = dict(line, routed_experts=str(line["routed_experts"])[:-4])
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(InputError, match="routed_experts:"):
        load_inputs([path])


def test_counts_npz_and_npy(tmp_path: Path) -> None:
    counts = random_counts(5)
    npz = tmp_path / "c.npz"
    np.savez(
        npz, prompt_counts=counts, decode_counts=counts[::-1], num_layers=4, num_experts=8, top_k=2
    )
    calib = load_inputs([npz])
    assert calib.decode_counts is not None and len(calib) == 5
    npy = tmp_path / "c.npy"
    np.save(npy, counts)
    with pytest.raises(InputError, match="cannot record geometry"):
        load_inputs([npy])
    assert len(load_inputs([npy], geometry=SMALL)) == 5
    np.save(npy, -counts - 1)
    with pytest.raises(InputError, match="non-negative integer counts"):
        load_inputs([npy], geometry=SMALL)


def test_calibration_log_uses_prompt_else_output(tmp_path: Path) -> None:
    counts = random_counts(4)
    path = tmp_path / "log.jsonl"
    write_calibration(
        path,
        [
            CalibrationRecord(
                SMALL, 1.0, text="a", prompt_counts=counts[0], output_counts=counts[1]
            ),
            CalibrationRecord(SMALL, 2.0, text="b", output_counts=counts[2]),
            CalibrationRecord(SMALL, 3.0, text="no counts at all"),
        ],
    )
    calib = load_inputs([path])
    assert len(calib) == 2 and calib.signature_from == "mixed"
    np.testing.assert_array_equal(calib.signature_counts[1], counts[2])
    assert calib.sources[0]["without_counts"] == 1


def test_format_detection_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"hello": 1}\n')
    with pytest.raises(InputError, match="cannot tell the format"):
        load_inputs([path])
    with pytest.raises(InputError, match="no such file"):
        load_inputs([tmp_path / "missing.npz"])


def test_split_indices() -> None:
    train, test = split_indices(10, 0.3, seed=0)
    assert len(test) == 3 and len(train) == 7
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(10))
    again = split_indices(10, 0.3, seed=0)
    np.testing.assert_array_equal(again[1], test)
    with pytest.raises(InputError, match="test_fraction"):
        split_indices(10, 1.0, seed=0)


def test_output_only_log_fits_without_circular_rho(tmp_path: Path) -> None:
    """Stock SGLang PD logs only output counts: fit works, but rho is not claimed."""
    from zones.evaluate import evaluate
    from zones.fit import FitOptions, fit_zones

    from .helpers import clustered_counts

    _, decode, _ = clustered_counts(60, groups=3, seed=0)
    path = tmp_path / "stock.jsonl"
    write_calibration(
        path,
        [
            CalibrationRecord(SMALL, float(i), text=f"p{i}", output_counts=decode[i])
            for i in range(60)
        ],
    )
    calib = load_inputs([path])
    assert calib.signature_from == "output" and len(calib.independent_rows()) == 0
    table, _ = fit_zones(calib, ["a", "b", "c"], FitOptions())
    assert "rho" not in table.fit_stats and "not measured" in table.fit_stats["rho_note"]
    assert table.spec.layer_mask.all()
    ev = evaluate(table, calib, batch_sizes=(4,), steps=100, bootstrap=0)
    assert ev.rho is None
    assert any("upper bound" in n for n in ev.notes)


def test_unreadable_files_give_input_errors(tmp_path: Path) -> None:
    corrupt = tmp_path / "bad.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match=r"bad\.npz: cannot read"):
        load_inputs([corrupt])
    other = tmp_path / "other.npz"
    np.savez(other, something=np.zeros(3), num_layers=4, num_experts=8, top_k=2)
    with pytest.raises(InputError, match="missing array"):
        load_inputs([other], fmt="trace")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(InputError, match=r"bin\.jsonl"):
        load_inputs([binary])

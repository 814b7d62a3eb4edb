"""Zone-table schema 2 (compact arrays): round trip, checksum over decoded content, v1 still
read and written, malformed encoded arrays rejected naming the field, and the ConfigMap budget:
a 64-zone x 6,144-dim table with a default-sized predictor stays under 1 MiB."""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from zones.geometry import KNOWN_GEOMETRIES
from zones.predictor import Predictor, train_predictor
from zones.signature import SignatureSpec
from zones.table import (
    COMPACT_SCHEMA_VERSION,
    SCHEMA_VERSION,
    ZoneTable,
    ZoneTableError,
    convert,
    load_table,
    make_table,
    parse_table,
    save_table,
    table_to_json,
)

from .helpers import small_table

CONFIGMAP_LIMIT = 1 << 20  # bytes of data a Kubernetes ConfigMap may hold


def _with_predictor() -> ZoneTable:
    base = small_table()
    sigs = np.repeat(base.centroids, 4, axis=0)
    texts = [f"topic{i % 3} word{i}" for i in range(len(sigs))]
    pred = train_predictor(texts, None, sigs, num_buckets=64, rank=2)
    return make_table(base.spec, base.centroids, base.workers, predictor=pred,
                      fit_stats={"zone_sizes": [4, 4, 4]}, provenance={"seed": 1})


def test_compact_round_trip_is_exact_and_re_saves_identically(tmp_path: Path) -> None:
    full = _with_predictor()
    compact = convert(full, COMPACT_SCHEMA_VERSION)
    assert compact.schema_version == 2 and compact.checksum != full.checksum
    path = tmp_path / "zones.json"
    save_table(compact, path)
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == 2
    assert doc["centroids"]["encoding"] == "q8" and doc["centroids"]["compression"] == "zlib"
    assert doc["predictor"]["basis"]["encoding"] == "q8"
    back = load_table(path)
    # The in-memory compact table already holds what every replica will load.
    assert back.checksum == compact.checksum
    np.testing.assert_array_equal(back.centroids, compact.centroids)
    np.testing.assert_array_equal(back.spec.idf, full.spec.idf)  # IDF is kept exact
    assert back.predictor is not None and compact.predictor is not None
    np.testing.assert_array_equal(back.predictor.basis, compact.predictor.basis)
    np.testing.assert_array_equal(back.predictor.weights, compact.predictor.weights)
    save_table(back, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()
    # Lossy, but close, and the same decisions on the table's own zones.
    assert np.abs(back.centroids - full.centroids).max() < 2e-3
    for k in range(full.num_zones):
        assert back.zone_of(full.centroids[k]) == k


def test_version_1_is_still_read_written_and_checksummed_as_before(tmp_path: Path) -> None:
    full = _with_predictor()
    v1 = table_to_json(full)
    doc = json.loads(v1)
    assert doc["schema_version"] == SCHEMA_VERSION
    assert all("encoding" not in doc[k] for k in ("centroids",))
    assert parse_table(v1).checksum == full.checksum
    # Compact -> version 1 is exact: the same decoded arrays, written as float32.
    compact = convert(full, COMPACT_SCHEMA_VERSION)
    back = parse_table(table_to_json(convert(compact, SCHEMA_VERSION)))
    assert back.schema_version == 1
    np.testing.assert_array_equal(back.centroids, compact.centroids)


def test_checksum_covers_decoded_content_not_the_compressed_bytes() -> None:
    compact = convert(_with_predictor(), COMPACT_SCHEMA_VERSION)
    doc = json.loads(table_to_json(compact))
    blob = zlib.decompress(base64.b64decode(doc["centroids"]["data"]))
    # Another zlib level (or build) emits other bytes for the same content: still the same table.
    doc["centroids"]["data"] = base64.b64encode(zlib.compress(blob, 1)).decode()
    assert parse_table(json.dumps(doc)).checksum == compact.checksum
    # A valid stream of other content is caught by the checksum.
    changed = bytearray(blob)
    changed[-1] ^= 0x01
    doc["centroids"]["data"] = base64.b64encode(zlib.compress(bytes(changed))).decode()
    with pytest.raises(ZoneTableError, match="checksum: mismatch"):
        parse_table(json.dumps(doc))


Mutation = Callable[[dict[str, Any]], None]


def _raw(obj: dict[str, Any]) -> bytes:
    return base64.b64decode(obj["data"])


def _put(obj: dict[str, Any], raw: bytes) -> None:
    obj["data"] = base64.b64encode(raw).decode()


def _truncate(path: tuple[str, ...]) -> Mutation:
    def f(d: dict[str, Any]) -> None:
        obj = _at(d, path)
        _put(obj, _raw(obj)[: len(_raw(obj)) // 2])

    return f


def _corrupt(path: tuple[str, ...]) -> Mutation:
    def f(d: dict[str, Any]) -> None:
        obj = _at(d, path)
        raw = bytearray(_raw(obj))
        for i in range(len(raw) // 2, len(raw) // 2 + 4):
            raw[i] ^= 0xA5
        _put(obj, bytes(raw))

    return f


def _set(path: tuple[str, ...], key: str, value: Any) -> Mutation:
    return lambda d: _at(d, path).__setitem__(key, value)


def _at(d: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for key in path:
        d = d[key]
    return d


def _as_v1(d: dict[str, Any]) -> None:
    d["schema_version"] = 1


CASES: list[tuple[str, Mutation, str]] = [
    ("truncated centroids", _truncate(("centroids",)), "centroids: data is a truncated zlib"),
    ("corrupt centroids", _corrupt(("centroids",)), "centroids: data is not a valid zlib"),
    ("wrong dtype", _set(("centroids",), "dtype", "float64"), "centroids: dtype must be float32"),
    ("int32 dtype", _set(("centroids",), "dtype", "int32"), "centroids: dtype must be float32"),
    ("unknown encoding", _set(("centroids",), "encoding", "q4"), "centroids: encoding must be"),
    ("bad base64", _set(("centroids",), "data", "%%%"), "centroids: data is not valid base64"),
    ("truncated idf", _truncate(("signature", "idf")), "signature.idf: data is a truncated"),
    ("encoded mask", _set(("signature", "layer_mask"), "encoding", "q8"),
     "signature.layer_mask: encoding 'q8' applies to float32"),
    ("corrupt basis", _corrupt(("predictor", "basis")), "predictor.basis: data is not a valid"),
    ("truncated weights", _truncate(("predictor", "weights")),
     "predictor.weights: data is a truncated"),
    ("encoded arrays in schema 1", _as_v1, "signature.idf: encoded arrays need schema_version 2"),
]


@pytest.mark.parametrize(("name", "mutate", "message"), CASES, ids=[c[0] for c in CASES])
def test_malformed_compact_table_is_rejected_naming_the_field(
    name: str, mutate: Mutation, message: str
) -> None:
    doc = json.loads(table_to_json(convert(_with_predictor(), COMPACT_SCHEMA_VERSION)))
    mutate(doc)
    # No resealing needed: encoded arrays are decoded (and fail) before the checksum is checked.
    with pytest.raises(ZoneTableError, match=message.replace("(", r"\(")):
        parse_table(json.dumps(doc))


def test_truncated_compact_file_is_rejected() -> None:
    data = table_to_json(convert(_with_predictor(), COMPACT_SCHEMA_VERSION))
    with pytest.raises(ZoneTableError, match="document: not valid JSON"):
        parse_table(data[: len(data) - 200])


def _configmap_sized_table(rng: np.random.Generator) -> ZoneTable:
    """64 zones x 6,144 dims (Qwen3-30B-A3B, 48 x 128, every layer kept) with a predictor of
    `zones fit`'s default size (2,048 buckets, rank 32). Uniform random values do not compress,
    so this is the worst case for size: fitted tables come out ~15% smaller."""
    g = KNOWN_GEOMETRIES["Qwen3-30B-A3B"]
    spec = SignatureSpec(
        g, rng.uniform(0.1, 5.0, (g.num_layers, g.num_experts)).astype(np.float32),
        np.ones(g.num_layers, dtype=bool),
    )
    assert spec.dim == 6144
    centroids = rng.random((64, spec.dim)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    basis = np.linalg.qr(rng.normal(size=(spec.dim, 32)))[0].T.astype(np.float32)
    predictor = Predictor(2048, 128, rng.normal(0, 0.05, (2048, 32)).astype(np.float32),
                          rng.normal(0, 0.05, 32).astype(np.float32), basis)
    workers = [f"http://sglang-decode-{k}.sglang-decode.llm.svc.cluster.local:30000"
               for k in range(64)]
    return make_table(spec, centroids, workers, predictor=predictor,
                      fit_stats={"zone_sizes": [1000] * 64, "rho": 0.61, "inertia": 0.2},
                      provenance={"tool": "zones", "seed": 0,
                                  "created_at": "2026-12-03T00:00:00+00:00"})


def test_a_64_zone_6144_dim_table_with_predictor_fits_a_configmap() -> None:
    rng = np.random.default_rng(0)
    full = _configmap_sized_table(rng)
    v1 = table_to_json(full)
    assert len(v1) > 3 * CONFIGMAP_LIMIT  # why schema 2 exists
    data = table_to_json(convert(full, COMPACT_SCHEMA_VERSION))
    assert len(data) < CONFIGMAP_LIMIT, f"{len(data):,} bytes"
    back = parse_table(data)
    assert back.num_zones == 64 and back.spec.dim == 6144 and back.predictor is not None
    # Decisions on random unit signatures match the float32 table.
    sigs = rng.random((2000, 6144)).astype(np.float32) ** 8  # sparse-ish, like real routing
    sigs /= np.linalg.norm(sigs, axis=1, keepdims=True)
    same = np.mean(np.argmax(sigs @ full.centroids.T, 1) == np.argmax(sigs @ back.centroids.T, 1))
    assert same > 0.98


def test_zones_fit_writes_the_compact_form_unless_asked_for_version_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from zones.calibration import CalibrationRecord, write_calibration
    from zones.cli import main

    from .helpers import SMALL, clustered_counts

    prompt, decode, group = clustered_counts(60, groups=3, seed=0)
    records = [
        CalibrationRecord(SMALL, 1_700_000_000.0 + i, text=f"group{group[i]} words here",
                          prompt_counts=prompt[i], output_counts=decode[i])
        for i in range(len(group))
    ]
    write_calibration(tmp_path / "calib.jsonl", records)
    common = ["fit", "-i", str(tmp_path / "calib.jsonl"), "--num-workers", "3",
              "--created-at", "none", "--no-progress", "-o"]
    assert main([*common, str(tmp_path / "compact.json")]) == 0
    out = capsys.readouterr().out
    compact = load_table(tmp_path / "compact.json")
    assert compact.schema_version == 2 and compact.checksum in out  # describes what it wrote
    assert json.loads((tmp_path / "compact.json").read_text())["centroids"]["encoding"] == "q8"
    assert main([*common, str(tmp_path / "full.json"), "--table-format", "1"]) == 0
    full = load_table(tmp_path / "full.json")
    assert full.schema_version == 1
    assert "encoding" not in json.loads((tmp_path / "full.json").read_text())["centroids"]
    # Same fit, same decisions; the compact one is the quantised float32 one.
    assert np.abs(full.centroids - compact.centroids).max() < 2e-3
    np.testing.assert_array_equal(convert(full, COMPACT_SCHEMA_VERSION).centroids,
                                  compact.centroids)


def test_zones_convert_and_validate_report_the_configmap_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from zones.cli import main

    full = _with_predictor()
    save_table(full, tmp_path / "v1.json")
    assert main(["convert", str(tmp_path / "v1.json"), "-o", str(tmp_path / "v2.json")]) == 0
    compact = load_table(tmp_path / "v2.json")
    assert compact.schema_version == 2
    assert compact.checksum == convert(full, COMPACT_SCHEMA_VERSION).checksum
    capsys.readouterr()
    assert main(["validate", str(tmp_path / "v2.json")]) == 0
    assert "fits a Kubernetes ConfigMap" in capsys.readouterr().out
    # And back: version 1 of the compact table is exact.
    assert main(["convert", str(tmp_path / "v2.json"), "-o", str(tmp_path / "back.json"),
                 "--table-format", "1"]) == 0
    np.testing.assert_array_equal(load_table(tmp_path / "back.json").centroids,
                                  compact.centroids)


def test_a_version_2_file_loads_exactly_what_it_holds_whatever_its_encodings() -> None:
    # Raw float32 arrays are valid in schema 2 (a future writer may choose other encodings):
    # the loader keeps the file's values as they are, and a re-save is self-consistent.
    full = _with_predictor()
    doc = json.loads(table_to_json(full))
    doc["schema_version"] = 2
    body = {k: v for k, v in doc.items() if k != "checksum"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    doc["checksum"] = "sha256:" + hashlib.sha256(canon.encode()).hexdigest()
    loaded = parse_table(json.dumps(doc))
    np.testing.assert_array_equal(loaded.centroids, full.centroids)  # not quantised on load
    again = parse_table(table_to_json(loaded))  # written with this writer's encodings
    assert again.checksum == convert(full, COMPACT_SCHEMA_VERSION).checksum

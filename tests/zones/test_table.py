"""Zone-table format: round trip, determinism, and every malformed case rejected by name."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from zones.predictor import train_predictor
from zones.table import (
    ZoneTable,
    ZoneTableError,
    load_table,
    make_table,
    parse_table,
    save_table,
    table_to_json,
)

from .helpers import small_table


def _doc(table: ZoneTable) -> dict[str, Any]:
    return json.loads(table_to_json(table))


def _reseal(doc: dict[str, Any]) -> bytes:
    """Recompute the checksum so the loader gets past it to the check under test."""
    body = {k: v for k, v in doc.items() if k != "checksum"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    doc["checksum"] = "sha256:" + hashlib.sha256(canon.encode()).hexdigest()
    return json.dumps(doc).encode()


def _set_array(doc: dict[str, Any], path: tuple[str, ...], arr: np.ndarray, dtype: str) -> None:
    target = doc
    for key in path[:-1]:
        target = target[key]
    raw = np.ascontiguousarray(arr).astype("<f4" if dtype == "float32" else "|b1").tobytes()
    target[path[-1]] = {
        "dtype": dtype,
        "shape": list(arr.shape),
        "data": base64.b64encode(raw).decode(),
    }


def _centroids(doc: dict[str, Any]) -> np.ndarray:
    c = doc["centroids"]
    return np.frombuffer(base64.b64decode(c["data"]), "<f4").reshape(c["shape"]).copy()


def test_round_trip_preserves_everything(tmp_path: Path) -> None:
    table = small_table(fit_stats={"zone_sizes": [3, 3, 2]}, provenance={"seed": 1})
    path = tmp_path / "t.json"
    save_table(table, path)
    back = load_table(path)
    assert back.checksum == table.checksum
    assert back.workers == table.workers
    np.testing.assert_array_equal(back.centroids, table.centroids)
    np.testing.assert_array_equal(back.spec.idf, table.spec.idf)
    np.testing.assert_array_equal(back.spec.layer_mask, table.spec.layer_mask)
    assert back.fit_stats == {"zone_sizes": [3, 3, 2]}
    assert back.tau == pytest.approx(0.1) and back.min_candidates == 2
    # Saving the loaded table gives identical bytes.
    save_table(back, tmp_path / "u.json")
    assert (tmp_path / "u.json").read_bytes() == path.read_bytes()


def test_round_trip_with_predictor() -> None:
    base = small_table()
    sigs = np.repeat(base.centroids, 4, axis=0)
    texts = [f"topic{i % 3} word{i}" for i in range(len(sigs))]
    pred = train_predictor(texts, None, sigs, num_buckets=64, rank=2)
    table = make_table(base.spec, base.centroids, base.workers, predictor=pred)
    back = parse_table(table_to_json(table))
    assert back.predictor is not None
    a = back.predictor.predict("topic1 word7", None)
    b = pred.predict("topic1 word7", None)
    assert a is not None and b is not None
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_similarity_helpers() -> None:
    table = small_table()
    assert table.zone_of(table.centroids[2]) == 2
    assert table.similarities(table.centroids[0])[0] == pytest.approx(1.0, abs=1e-6)


Mutation = Callable[[dict[str, Any]], None]


def _drop(key: str) -> Mutation:
    return lambda d: d.pop(key)


def _assign(key: str, value: Any) -> Mutation:
    def f(d: dict[str, Any]) -> None:
        d[key] = value

    return f


def _nan_centroid(d: dict[str, Any]) -> None:
    c = _centroids(d)
    c[0, 0] = np.nan
    _set_array(d, ("centroids",), c, "float32")


def _scaled_centroid(d: dict[str, Any]) -> None:
    c = _centroids(d)
    c[1] *= 1.5
    _set_array(d, ("centroids",), c, "float32")


def _wrong_dim(d: dict[str, Any]) -> None:
    c = _centroids(d)[:, :-1]
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    _set_array(d, ("centroids",), c, "float32")


def _short_mask(d: dict[str, Any]) -> None:
    _set_array(d, ("signature", "layer_mask"), np.array([True, True, True]), "bool")


def _idf_vs_geometry(d: dict[str, Any]) -> None:
    _set_array(d, ("signature", "idf"), np.ones((4, 7), np.float32), "float32")


def _idf_inf(d: dict[str, Any]) -> None:
    idf = np.ones((4, 8), np.float32)
    idf[2, 3] = np.inf
    _set_array(d, ("signature", "idf"), idf, "float32")


def _mask_none(d: dict[str, Any]) -> None:
    _set_array(d, ("signature", "layer_mask"), np.zeros(4, bool), "bool")


def _truncated_data(d: dict[str, Any]) -> None:
    d["centroids"]["data"] = d["centroids"]["data"][:-8]


def _bad_base64(d: dict[str, Any]) -> None:
    d["centroids"]["data"] = "!!!" + d["centroids"]["data"]


def _wrong_dtype(d: dict[str, Any]) -> None:
    d["centroids"]["dtype"] = "float64"


def _bad_predictor(d: dict[str, Any]) -> None:
    d["predictor"] = {"kind": "hashed-ngram-ridge", "num_buckets": 16, "max_words": 8}


def _bad_geometry(d: dict[str, Any]) -> None:
    d["geometry"]["top_k"] = 0


CASES: list[tuple[str, Mutation, str]] = [
    ("unknown schema version", _assign("schema_version", 3), "schema_version"),
    ("missing workers", _drop("workers"), "workers: missing"),
    ("unknown top-level field", _assign("extra", 1), "extra: unknown field"),
    ("NaN centroid", _nan_centroid, "centroids: hold NaN"),
    ("non-unit centroid", _scaled_centroid, "centroids: row 1 has norm"),
    ("centroid width vs mask", _wrong_dim, "centroids: shape"),
    ("duplicate workers", _assign("workers", ["a", "b", "a"]), "workers: duplicate worker 'a'"),
    ("too few workers", _assign("workers", ["a", "b"]), "workers: 2 entries for 3 zones"),
    ("empty worker id", _assign("workers", ["a", "", "c"]), "workers: must be a list"),
    ("workers not a list", _assign("workers", "a,b,c"), "workers: must be a list"),
    ("negative tau", _assign("tau", -0.1), "tau:"),
    ("tau not a number", _assign("tau", "0.1"), "tau:"),
    ("min_candidates zero", _assign("min_candidates", 0), "min_candidates:"),
    ("layer mask vs geometry", _short_mask, "signature.layer_mask: shape"),
    ("idf vs geometry", _idf_vs_geometry, "signature.idf: shape"),
    ("idf infinite", _idf_inf, "signature.idf: holds NaN or infinite"),
    ("mask selects nothing", _mask_none, "signature: layer_mask selects no layer"),
    ("truncated array data", _truncated_data, "centroids: data has"),
    ("array data not base64", _bad_base64, "centroids: data is not valid base64"),
    ("wrong dtype", _wrong_dtype, "centroids: dtype must be float32"),
    ("malformed predictor", _bad_predictor, "predictor: predictor.weights"),
    ("bad geometry", _bad_geometry, "geometry:"),
]


@pytest.mark.parametrize(("name", "mutate", "message"), CASES, ids=[c[0] for c in CASES])
def test_malformed_table_is_rejected_naming_the_field(
    name: str, mutate: Mutation, message: str
) -> None:
    doc = _doc(small_table())
    mutate(doc)
    with pytest.raises(ZoneTableError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_table(_reseal(doc))


def test_checksum_mismatch_is_rejected() -> None:
    doc = _doc(small_table())
    doc["tau"] = 0.2  # edited without resealing
    with pytest.raises(ZoneTableError, match="checksum: mismatch"):
        parse_table(json.dumps(doc))


def test_truncated_file_is_rejected(tmp_path: Path) -> None:
    data = table_to_json(small_table())
    with pytest.raises(ZoneTableError, match="document: not valid JSON"):
        parse_table(data[: len(data) // 2])
    path = tmp_path / "gone.json"
    with pytest.raises(ZoneTableError, match="file: cannot read"):
        load_table(path)


def test_non_object_document_is_rejected() -> None:
    with pytest.raises(ZoneTableError, match="document: must be a JSON object"):
        parse_table(b"[1, 2]")


def test_make_table_validates_too() -> None:
    table = small_table()
    with pytest.raises(ZoneTableError, match="workers: duplicate"):
        make_table(table.spec, table.centroids, ["a", "a", "b"])
    with pytest.raises(ZoneTableError, match="centroids: row 0"):
        make_table(table.spec, table.centroids * 2, ["a", "b", "c"])


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "zones.json"
    save_table(small_table(seed=1), path)
    save_table(small_table(seed=2), path)  # replace in place
    assert load_table(path).checksum == small_table(seed=2).checksum
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zones.json"]

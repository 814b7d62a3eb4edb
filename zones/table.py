"""The zone table: what `zones fit` writes and the gateway loads (and hot-reloads).

One JSON document, so it ships as a single Kubernetes ConfigMap key and can be swapped
atomically (write a temp file, rename). Arrays are `{"dtype","shape","data"}` objects with
base64 little-endian bytes (`zones.arrays`). Layout, schema version 1:

    schema_version   1
    geometry         {name, num_layers, num_experts, top_k}
    signature        {idf: float32 [L,E], layer_mask: bool [L]}
    centroids        float32 [K, D] unit rows, D = masked layers x E
    workers          [K] unique non-empty strings; zone k is served by decode worker workers[k]
    tau              locality band width in [0, 2] (cosine similarities lie in [-1, 1])
    min_candidates   1..K, band widened to this many most-similar zones (paper: 2)
    load_bound       optional integer >= 0: zones whose worker has more than this many
                     in-flight requests over the least-loaded worker leave the band
                     (gateway.eldr.band); absent = off. Written only when set, so tables
                     without it keep their bytes and checksum.
    predictor        null or an embedded `zones.predictor.Predictor`
    fit_stats        object (zone sizes, rho, inertia, ...): informational
    provenance       object (inputs + sha256, seed, tool version, created_at): informational
    checksum         "sha256:<hex>" of the canonical serialisation of everything else

Canonical serialisation: `json.dumps(doc_without_checksum, sort_keys=True,
separators=(",", ":"), ensure_ascii=True, allow_nan=False)` encoded as UTF-8.

Schema version 2 (compact, what `zones fit` writes) has the same fields; its float32 arrays
may carry `encoding` ("f16", "q8") and `compression` ("zlib") keys (`zones.arrays`, per field
in `COMPACT_ARRAYS`), which brings a 64-zone x 6,144-dim table with a predictor from ~3.4 MiB
to well under the 1 MiB a Kubernetes ConfigMap holds. A schema-2 table made by `convert`
holds the *decoded* values (what every replica will load), never the pre-quantisation ones.
Version 1 stays readable and writable (`convert`); a loader that only knows version 1 refuses
version 2 by its schema_version instead of misreading its arrays.

The checksum of a version-2 table is taken over the canonical serialisation of its *decoded*
content: the document with every array rewritten in the raw version-1 form (base64 of
little-endian float32/bool). Not over the encoded bytes, because compressed bytes are not a
function of the content: zlib builds (zlib, zlib-ng) emit different streams for equal input,
so the same table would get a different checksum, and the gateway a different table version,
depending on the machine that wrote it. Hashing the decoded arrays makes the checksum name
exactly what routes requests. Corruption of the encoded bytes is still caught: zlib's own
adler32 and length checks fail naming the field, and bytes that decode to other values fail
the checksum. For version 1 the two serialisations coincide, so old checksums are unchanged.

Every malformed input raises `ZoneTableError` whose message starts with the offending field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from zones.arrays import (
    ArrayCodecError,
    Compression,
    Encoding,
    decode_array,
    encode_array,
    quantize,
)
from zones.geometry import GeometryError, ModelGeometry
from zones.predictor import Predictor, PredictorError
from zones.signature import SignatureError, SignatureSpec

SCHEMA_VERSION = 1  # full-precision float32 arrays
COMPACT_SCHEMA_VERSION = 2  # encoded arrays, see the module docstring
SCHEMA_VERSIONS = (SCHEMA_VERSION, COMPACT_SCHEMA_VERSION)


class ArrayCodec(NamedTuple):
    """How one array is written in a version-2 table (`zones.arrays`)."""

    encoding: Encoding
    compression: Compression
    per_layer: bool = False  # q8 segments = one layer's experts (block = num_experts)


# benchmarks/zone_table_size.py measures the alternatives (size, load time, decision agreement
# with the float32 table). IDF stays exact: it weights every signature the gateway builds and
# is 1% of the bytes. Centroids decide the band, so they get 8-bit segments of one layer (half
# the error of whole rows for 6% more bytes); the predictor is approximate by nature, so its
# basis and weights get 8-bit rows, which left its predicted zone unchanged in the benchmark.
COMPACT_ARRAYS: dict[str, ArrayCodec] = {
    "signature.idf": ArrayCodec("raw", "zlib"),
    "centroids": ArrayCodec("q8", "zlib", per_layer=True),
    "predictor.weights": ArrayCodec("q8", "zlib"),
    "predictor.bias": ArrayCodec("raw", None),
    "predictor.basis": ArrayCodec("q8", "zlib"),
}
_RAW = ArrayCodec("raw", None)
# (parent, key, dtype, ndim) of every array a table holds; the predictor's sit under "predictor".
_ARRAY_FIELDS: tuple[tuple[str | None, str, str, int], ...] = (
    ("signature", "idf", "float32", 2),
    ("signature", "layer_mask", "bool", 1),
    (None, "centroids", "float32", 2),
    ("predictor", "weights", "float32", 2),
    ("predictor", "bias", "float32", 1),
    ("predictor", "basis", "float32", 2),
)
DEFAULT_TAU = 0.1  # ELDR paper default band width
DEFAULT_MIN_CANDIDATES = 2  # the paper's "min-2" recipe
# Centroids are stored as float32 unit vectors; after a float32 round trip the norm error is
# ~1e-7 x sqrt(D), so 1e-3 rejects real corruption without flagging rounding.
UNIT_TOLERANCE = 1e-3
_TOP_LEVEL = (
    "schema_version",
    "geometry",
    "signature",
    "centroids",
    "workers",
    "tau",
    "min_candidates",
    "predictor",
    "fit_stats",
    "provenance",
    "checksum",
)
_OPTIONAL = ("load_bound",)  # may be absent; absent means None


class ZoneTableError(ValueError):
    """A zone table is malformed; the message names the field."""


@dataclass(frozen=True, eq=False)
class ZoneTable:
    """A validated zone table. Build new ones with `make_table` (it fills the checksum)."""

    schema_version: int
    spec: SignatureSpec
    centroids: npt.NDArray[np.float32]
    workers: tuple[str, ...]
    tau: float
    min_candidates: int
    predictor: Predictor | None
    fit_stats: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    checksum: str = ""
    load_bound: int | None = None

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def num_zones(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def geometry(self) -> ModelGeometry:
        return self.spec.geometry

    def similarities(self, signature: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Cosine similarity of a unit signature to every zone centroid (float32 [K])."""
        return np.asarray(self.centroids @ np.asarray(signature, dtype=np.float32))

    def zone_of(self, signature: npt.ArrayLike) -> int:
        """Most similar zone (ties: lowest index)."""
        return int(np.argmax(self.similarities(signature)))


def _validate(t: ZoneTable) -> None:
    if t.schema_version not in SCHEMA_VERSIONS or isinstance(t.schema_version, bool):
        raise ZoneTableError(
            f"schema_version: unsupported {t.schema_version!r}, expected one of "
            f"{list(SCHEMA_VERSIONS)}"
        )
    if not isinstance(t.spec, SignatureSpec):
        raise ZoneTableError("signature: not a SignatureSpec")
    c = np.asarray(t.centroids)
    dim = t.spec.dim
    if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] != dim:
        raise ZoneTableError(
            f"centroids: shape {c.shape}, expected [K>=1, D={dim}] (masked layers x experts)"
        )
    if not np.all(np.isfinite(c)):
        raise ZoneTableError("centroids: hold NaN or infinite values")
    norms = np.sqrt(np.einsum("kd,kd->k", c.astype(np.float64), c.astype(np.float64)))
    bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_TOLERANCE)
    if bad.size:
        raise ZoneTableError(
            f"centroids: row {int(bad[0])} has norm {norms[bad[0]]:.6f}, rows must be unit vectors "
            f"(tolerance {UNIT_TOLERANCE})"
        )
    c = np.ascontiguousarray(c, dtype=np.float32)
    c.setflags(write=False)
    object.__setattr__(t, "centroids", c)
    workers = t.workers
    if not isinstance(workers, tuple) or not all(isinstance(w, str) and w.strip() for w in workers):
        raise ZoneTableError("workers: must be a list of non-empty strings")
    if len(workers) != c.shape[0]:
        raise ZoneTableError(
            f"workers: {len(workers)} entries for {c.shape[0]} zones (one per zone)"
        )
    seen: set[str] = set()
    for w in workers:
        if w in seen:
            raise ZoneTableError(f"workers: duplicate worker {w!r}")
        seen.add(w)
    if (
        not isinstance(t.tau, (int, float))
        or isinstance(t.tau, bool)
        or not math.isfinite(t.tau)
        or not 0.0 <= t.tau <= 2.0
    ):
        raise ZoneTableError(f"tau: must be a finite number in [0, 2], got {t.tau!r}")
    if (
        not isinstance(t.min_candidates, int)
        or isinstance(t.min_candidates, bool)
        or t.min_candidates < 1
    ):
        raise ZoneTableError(f"min_candidates: must be an integer >= 1, got {t.min_candidates!r}")
    if t.load_bound is not None and (
        not isinstance(t.load_bound, int) or isinstance(t.load_bound, bool) or t.load_bound < 0
    ):
        raise ZoneTableError(f"load_bound: must be an integer >= 0 or absent, got {t.load_bound!r}")
    if t.predictor is not None:
        if not isinstance(t.predictor, Predictor):
            raise ZoneTableError("predictor: not a Predictor")
        if t.predictor.dim != dim:
            raise ZoneTableError(
                f"predictor: predicts D={t.predictor.dim}, table signatures have D={dim}"
            )
    for name in ("fit_stats", "provenance"):
        if not isinstance(getattr(t, name), dict):
            raise ZoneTableError(f"{name}: must be an object")


def _block(codec: ArrayCodec, geometry: ModelGeometry) -> int | None:
    return geometry.num_experts if codec.per_layer and codec.encoding == "q8" else None


def _compact(name: str, arr: np.ndarray, geometry: ModelGeometry) -> np.ndarray:
    """`arr` as a version-2 file stores it (the same object when it already is)."""
    codec = COMPACT_ARRAYS.get(name, _RAW)
    q = quantize(arr, codec.encoding, block=_block(codec, geometry))
    return arr if np.array_equal(q, arr) else q


def _as_written(table: ZoneTable) -> ZoneTable:
    """`table` with the values a file written now would decode to: itself for version 1, and
    for version 2 its arrays passed through `COMPACT_ARRAYS`' encodings. Quantisation is
    idempotent (`zones.arrays`), so a table made by `convert` or loaded from a file written
    with these encodings comes back as the same object. Loaded tables are never quantised in
    place: they hold exactly what their file decodes to, whichever encodings it used."""
    if table.schema_version != COMPACT_SCHEMA_VERSION:
        return table
    t = replace(table)
    g = t.spec.geometry
    idf = _compact("signature.idf", t.spec.idf, g)
    if idf is not t.spec.idf:
        object.__setattr__(t, "spec", SignatureSpec(t.spec.geometry, idf, t.spec.layer_mask))
    centroids = _compact("centroids", t.centroids, g)
    if centroids is not t.centroids:
        c = np.ascontiguousarray(centroids, dtype=np.float32)
        c.setflags(write=False)
        object.__setattr__(t, "centroids", c)
    p = t.predictor
    if p is not None:
        arrays = {
            k: _compact(f"predictor.{k}", getattr(p, k), g) for k in ("weights", "bias", "basis")
        }
        if any(arrays[k] is not getattr(p, k) for k in arrays):
            object.__setattr__(t, "predictor", Predictor(p.num_buckets, p.max_words, **arrays))
    same = (
        t.spec is table.spec and t.centroids is table.centroids and t.predictor is table.predictor
    )
    return table if same else t


def make_table(
    spec: SignatureSpec,
    centroids: npt.ArrayLike,
    workers: list[str] | tuple[str, ...],
    *,
    tau: float = DEFAULT_TAU,
    min_candidates: int = DEFAULT_MIN_CANDIDATES,
    predictor: Predictor | None = None,
    fit_stats: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    load_bound: int | None = None,
) -> ZoneTable:
    """Validated table with its checksum filled in."""
    table = ZoneTable(
        SCHEMA_VERSION,
        spec,
        np.asarray(centroids, dtype=np.float32),
        tuple(workers),
        float(tau),
        min_candidates,
        predictor,
        dict(fit_stats or {}),
        dict(provenance or {}),
        load_bound=load_bound,
    )
    doc = _body(table, encoded=False)
    object.__setattr__(table, "checksum", _checksum(doc))
    return table


def convert(table: ZoneTable, schema_version: int) -> ZoneTable:
    """The table in another schema version, checksum recomputed. To version 2 the arrays are
    quantised (lossy, see `COMPACT_ARRAYS`); back to version 1 is exact."""
    out = _as_written(replace(table, schema_version=schema_version, checksum=""))
    object.__setattr__(out, "checksum", _checksum(_body(out, encoded=False)))
    return out


def _body(t: ZoneTable, *, encoded: bool = True) -> dict[str, Any]:
    """The document without its checksum; `encoded=False` gives every array in raw form (what
    the checksum covers, module docstring)."""
    compact = encoded and t.schema_version == COMPACT_SCHEMA_VERSION

    def enc(name: str, arr: np.ndarray) -> dict[str, Any]:
        codec = COMPACT_ARRAYS.get(name, _RAW) if compact else _RAW
        return encode_array(
            arr,
            encoding=codec.encoding,
            compression=codec.compression,
            block=_block(codec, t.spec.geometry),
        )

    return {
        "schema_version": t.schema_version,
        "geometry": t.spec.geometry.to_dict(),
        "signature": {
            "idf": enc("signature.idf", t.spec.idf),
            "layer_mask": enc("signature.layer_mask", t.spec.layer_mask),
        },
        "centroids": enc("centroids", t.centroids),
        "workers": list(t.workers),
        "tau": t.tau,
        "min_candidates": t.min_candidates,
        "predictor": None
        if t.predictor is None
        else t.predictor.to_dict(lambda name, arr: enc(f"predictor.{name}", arr)),
        "fit_stats": t.fit_stats,
        "provenance": t.provenance,
    } | ({} if t.load_bound is None else {"load_bound": t.load_bound})


def _canonical(doc: dict[str, Any]) -> bytes:
    try:
        text = json.dumps(
            doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise ZoneTableError(f"fit_stats/provenance: not JSON-serialisable ({exc})") from exc
    return text.encode("utf-8")


def _checksum(doc: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(_canonical(doc)).hexdigest()


def table_to_json(table: ZoneTable) -> bytes:
    """The file bytes: the body plus a freshly computed checksum, deterministic for equal tables."""
    # The checksum is of the values the encoded arrays decode to (module docstring).
    written = _as_written(table)
    doc = _body(written)
    doc["checksum"] = _checksum(_body(written, encoded=False))
    return (
        json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n"
    ).encode()


def save_table(table: ZoneTable, path: str | os.PathLike[str]) -> None:
    """Write atomically (temp file in the same directory + rename) so readers never see half."""
    target = Path(path)
    data = table_to_json(table)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_table(path: str | os.PathLike[str]) -> ZoneTable:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ZoneTableError(f"file: cannot read {path}: {exc.strerror or exc}") from exc
    return parse_table(data)


def _array(doc: dict[str, Any], parent: str | None, key: str, dtype: str, ndim: int) -> np.ndarray:
    obj = doc.get(key) if parent is None else doc[parent].get(key)
    name = key if parent is None else f"{parent}.{key}"
    if obj is None:
        raise ZoneTableError(f"{name}: missing")
    try:
        return decode_array(obj, dtype=dtype, ndim=ndim)
    except ArrayCodecError as exc:
        raise ZoneTableError(f"{name}: {exc}") from exc


def _decode_encoded_arrays(doc: dict[str, Any], version: int) -> None:
    """Rewrite every encoded array of `doc` in place into its raw form (schema version 2 only);
    raises naming the field when one is corrupt, truncated or of the wrong dtype."""
    for parent, key, dtype, ndim in _ARRAY_FIELDS:
        holder = doc if parent is None else doc.get(parent)
        if not isinstance(holder, dict):
            continue  # reported with its field name by the checks after the checksum
        obj = holder.get(key)
        if not isinstance(obj, dict) or not ({"encoding", "compression"} & set(obj)):
            continue
        name = key if parent is None else f"{parent}.{key}"
        if version != COMPACT_SCHEMA_VERSION:
            raise ZoneTableError(
                f"{name}: encoded arrays need schema_version {COMPACT_SCHEMA_VERSION}, "
                f"the document says {version}"
            )
        try:
            holder[key] = encode_array(decode_array(obj, dtype=dtype, ndim=ndim))
        except ArrayCodecError as exc:
            raise ZoneTableError(f"{name}: {exc}") from exc


def parse_table(data: bytes | str) -> ZoneTable:
    """Parse and fully validate table bytes (checksum included)."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ZoneTableError(f"document: not valid JSON (truncated or corrupt?): {exc}") from exc
    if not isinstance(doc, dict):
        raise ZoneTableError("document: must be a JSON object")
    if "schema_version" not in doc:
        raise ZoneTableError("schema_version: missing")
    version = doc["schema_version"]
    if version not in SCHEMA_VERSIONS or isinstance(version, bool):
        raise ZoneTableError(
            f"schema_version: unsupported {version!r}, this loader reads "
            f"{' and '.join(map(str, SCHEMA_VERSIONS))}"
        )
    missing = [k for k in _TOP_LEVEL if k not in doc]
    if missing:
        raise ZoneTableError(f"{missing[0]}: missing")
    unknown = sorted(set(doc) - set(_TOP_LEVEL) - set(_OPTIONAL))
    if unknown:
        raise ZoneTableError(f"{unknown[0]}: unknown field for schema_version {version}")
    checksum = doc.pop("checksum")
    # Decode encoded arrays first: the checksum covers the decoded content (module docstring).
    _decode_encoded_arrays(doc, version)
    if not isinstance(checksum, str) or not checksum.startswith("sha256:"):
        raise ZoneTableError("checksum: must be a 'sha256:<hex>' string")
    try:
        actual = _checksum(doc)
    except ZoneTableError:
        raise ZoneTableError(
            "document: holds values that cannot be serialised canonically"
        ) from None
    if actual != checksum:
        raise ZoneTableError(
            f"checksum: mismatch (file says {checksum}, content hashes to {actual})"
        )
    try:
        geometry = ModelGeometry.from_dict(doc["geometry"])
    except GeometryError as exc:
        raise ZoneTableError(f"geometry: {exc}") from exc
    if not isinstance(doc["signature"], dict):
        raise ZoneTableError("signature: must be an object with idf and layer_mask")
    idf = _array(doc, "signature", "idf", "float32", 2)
    mask = _array(doc, "signature", "layer_mask", "bool", 1)
    if idf.shape != (geometry.num_layers, geometry.num_experts):
        raise ZoneTableError(
            f"signature.idf: shape {list(idf.shape)} disagrees with geometry "
            f"[{geometry.num_layers}, {geometry.num_experts}]"
        )
    if mask.shape != (geometry.num_layers,):
        raise ZoneTableError(
            f"signature.layer_mask: shape {list(mask.shape)} disagrees with geometry "
            f"[{geometry.num_layers}]"
        )
    if not np.all(np.isfinite(idf)):
        raise ZoneTableError("signature.idf: holds NaN or infinite values")
    try:
        spec = SignatureSpec(geometry, idf, mask)
    except SignatureError as exc:
        raise ZoneTableError(f"signature: {exc}") from exc
    centroids = _array(doc, None, "centroids", "float32", 2)
    workers = doc["workers"]
    if not isinstance(workers, list):
        raise ZoneTableError("workers: must be a list of non-empty strings")
    predictor = None
    if doc["predictor"] is not None:
        try:
            predictor = Predictor.from_dict(doc["predictor"])
        except PredictorError as exc:
            raise ZoneTableError(f"predictor: {exc}") from exc
    return ZoneTable(
        version,
        spec,
        centroids,
        tuple(workers),
        doc["tau"],
        doc["min_candidates"],
        predictor,
        doc["fit_stats"],
        doc["provenance"],
        checksum,
        doc.get("load_bound"),
    )


def describe(table: ZoneTable) -> str:
    """Human summary printed by `zones validate`."""
    g = table.geometry
    layers = np.flatnonzero(table.spec.layer_mask).tolist()
    lines = [
        f"zone table schema {table.schema_version}  {table.checksum}",
        f"geometry   {g.name}: {g.num_layers} layers x {g.num_experts} experts, top-{g.top_k}",
        f"signature  D={table.spec.dim}, {len(layers)} of {g.num_layers} layers: {layers}",
        f"zones      K={table.num_zones}, tau={table.tau}, min_candidates={table.min_candidates}"
        + ("" if table.load_bound is None else f", load_bound={table.load_bound}"),
    ]
    sizes = table.fit_stats.get("zone_sizes")
    for k, worker in enumerate(table.workers):
        size = (
            f"  ({sizes[k]} calibration requests)"
            if isinstance(sizes, list) and k < len(sizes)
            else ""
        )
        lines.append(f"  zone {k:>3} -> {worker}{size}")
    if table.predictor is None:
        lines.append("predictor  none")
    else:
        p = table.predictor
        lines.append(
            f"predictor  {p.num_buckets} buckets, rank {p.weights.shape[1]}, "
            f"max_words {p.max_words}"
        )
    for key in ("rho", "inertia", "num_requests"):
        if key in table.fit_stats:
            lines.append(f"fit        {key} = {table.fit_stats[key]}")
    if "created_at" in table.provenance:
        lines.append(f"created    {table.provenance['created_at']}")
    return "\n".join(lines)

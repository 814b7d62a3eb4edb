"""JSON-safe numpy arrays: `{"dtype", "shape", "data"}` with base64 of little-endian bytes.

Used by the zone table and the embedded predictor. Only the dtypes those need are allowed, so
a table can never smuggle in object arrays, and byte order is fixed so that a table written on
one machine loads bit-identically on any other.

Compact forms (zone table schema 2) add optional keys; `dtype` stays the dtype the reader gets
back, so callers check it exactly as before:

    encoding     "raw" (default: the dtype's own bytes), or for float32 arrays
                 "f16": IEEE half precision, or
                 "q8":  8-bit affine per segment: the values in C order are cut into S
                        segments of `block` values (optional key; default the last axis, i.e.
                        one segment per row); the blob is lo float32 [S] + hi float32 [S] +
                        q uint8 [values], and value = float32(lo + (hi - lo) * (q / 255))
    block        q8 only: segment length, must divide the last axis
    compression  absent, or "zlib" (deflate of the encoded blob; level 9)

Why these: a 64-zone x 6,144-dim table with a predictor is ~3.5 MB as float32 base64, over
the 1 MiB ConfigMap limit; `q8` stores one byte per value, and min/max (not symmetric) scaling
keeps non-negative centroid rows at the full 256 levels; segments of one layer's experts
(`block` = experts per layer) halve the error again for 6% more bytes, because expert-count
scales differ between layers. `quantize` returns exactly what a round trip yields, and
encoding its output again reproduces it, so a compact table can be held in memory with the
values the gateway will load, and re-saved byte-identically.
"""

from __future__ import annotations

import base64
import binascii
import math
import zlib
from typing import Any, Literal

import numpy as np

# Name in the file -> little-endian numpy dtype.
_DTYPES: dict[str, str] = {"float32": "<f4", "float64": "<f8", "int32": "<i4", "bool": "|b1"}
Encoding = Literal["raw", "f16", "q8"]
Compression = Literal["zlib"] | None
ENCODINGS: tuple[Encoding, ...] = ("raw", "f16", "q8")
COMPRESSIONS: tuple[str, ...] = ("zlib",)
# A zlib stream can expand ~1000x; an array is never allowed to decode past this, so a corrupt
# or hostile shape cannot make the loader allocate gigabytes (a 1,024-zone x 6,144-dim float32
# table is 25 MB).
MAX_DECODED_BYTES = 256 << 20
_Q8_LEVELS = 255


class ArrayCodecError(ValueError):
    """An encoded array is malformed; the message says what is wrong (callers prefix the field)."""


def _block(shape: tuple[int, ...] | list[int], block: int | None) -> int:
    """Segment length for q8: `block`, else the last axis (1 for a 0-D array)."""
    last = int(shape[-1]) if len(shape) else 1
    if block is None:
        return last
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ArrayCodecError(f"block must be a positive integer, got {block!r}")
    if last % block:
        raise ArrayCodecError(f"block {block} does not divide the last axis ({last})")
    return block


def _segments(x: np.ndarray, block: int) -> np.ndarray:
    """[S, block] view of the values in C order; empty arrays give [0, 0]."""
    return x.reshape(-1, block) if x.size and block else x.reshape(0, 0)


def _q8_encode(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = _segments(x, block).astype(np.float64)
    if rows.size == 0:
        empty = np.zeros(0, np.float32)
        return empty, empty, np.zeros(0, np.uint8)
    lo = rows.min(axis=1).astype(np.float32)
    hi = rows.max(axis=1).astype(np.float32)
    span = hi.astype(np.float64) - lo.astype(np.float64)
    safe = np.where(span > 0, span, 1.0)
    q = np.rint((rows - lo[:, None]) * (_Q8_LEVELS / safe[:, None]))
    return lo, hi, np.clip(q, 0, _Q8_LEVELS).astype(np.uint8).ravel()


def _q8_decode(
    lo: np.ndarray, hi: np.ndarray, q: np.ndarray, shape: tuple[int, ...] | list[int]
) -> np.ndarray:
    if q.size == 0:
        return np.zeros(shape, np.float32)
    q = q.reshape(lo.size, -1)
    lo64 = lo.astype(np.float64)[:, None]
    span = hi.astype(np.float64)[:, None] - lo64
    # q / 255 is exactly 1.0 at q = 255, and the float64 difference of two float32 bounds is
    # exact unless their magnitudes differ by more than 2^29, so a segment's maximum decodes to
    # `hi` itself and its minimum to `lo`: encoding the decoded values again finds the same lo,
    # hi and q (idempotent re-saves).
    values = lo64 + span * (q.astype(np.float64) / _Q8_LEVELS)
    return values.astype(np.float32).reshape(shape)


def quantize(arr: np.ndarray, encoding: Encoding, *, block: int | None = None) -> np.ndarray:
    """The float32 values an `encoding` round trip yields (identity for "raw")."""
    if encoding == "raw":
        return np.asarray(arr)
    x = np.ascontiguousarray(arr, dtype=np.float32)
    if encoding == "f16":
        return x.astype("<f2").astype(np.float32)
    if encoding == "q8":
        lo, hi, q = _q8_encode(x, _block(x.shape, block))
        return _q8_decode(lo, hi, q, x.shape)
    raise ArrayCodecError(f"encoding must be one of {list(ENCODINGS)}, got {encoding!r}")


def encode_array(
    arr: np.ndarray,
    *,
    encoding: Encoding = "raw",
    compression: Compression = None,
    block: int | None = None,
) -> dict[str, Any]:
    name = str(arr.dtype) if arr.dtype != np.bool_ else "bool"
    if name not in _DTYPES:
        raise ArrayCodecError(f"dtype {arr.dtype} is not encodable; allowed: {sorted(_DTYPES)}")
    if encoding not in ENCODINGS:
        raise ArrayCodecError(f"encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
    if encoding != "raw" and name != "float32":
        raise ArrayCodecError(f"encoding {encoding!r} applies to float32 arrays, not {name}")
    if compression is not None and compression not in COMPRESSIONS:
        raise ArrayCodecError(f"compression must be one of {list(COMPRESSIONS)} or none")
    if block is not None and encoding != "q8":
        raise ArrayCodecError(f"block applies to q8 arrays, not {encoding!r}")
    if encoding == "f16":
        with np.errstate(over="ignore"):  # reported below, naming the cause
            half = np.ascontiguousarray(arr, dtype="<f2")
        if not np.array_equal(np.isfinite(half), np.isfinite(arr)):
            raise ArrayCodecError("values exceed the float16 range (|x| > 65504)")
        raw = half.tobytes()
    elif encoding == "q8":
        size = _block(arr.shape, block)
        lo, hi, q = _q8_encode(np.ascontiguousarray(arr, dtype=np.float32), size)
        raw = lo.astype("<f4").tobytes() + hi.astype("<f4").tobytes() + q.tobytes()
    else:
        raw = np.ascontiguousarray(arr, dtype=_DTYPES[name]).tobytes()
    obj: dict[str, Any] = {"dtype": name, "shape": list(arr.shape)}
    # Keys are only written when not the default, so "raw" arrays keep the schema-1 form.
    if encoding != "raw":
        obj["encoding"] = encoding
    if encoding == "q8" and block is not None:
        obj["block"] = block
    if compression == "zlib":
        obj["compression"] = "zlib"
        raw = zlib.compress(raw, 9)
    obj["data"] = base64.b64encode(raw).decode("ascii")
    return obj


def _inflate(raw: bytes, expected: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(raw, expected + 1)
    except zlib.error as exc:
        raise ArrayCodecError(f"data is not a valid zlib stream (corrupt?): {exc}") from exc
    if not inflater.eof:
        if len(out) > expected:
            raise ArrayCodecError(f"data inflates past the {expected} bytes its shape needs")
        raise ArrayCodecError("data is a truncated zlib stream")
    if inflater.unused_data:
        raise ArrayCodecError("data has bytes after the end of its zlib stream")
    return out


def decode_array(obj: Any, *, dtype: str, ndim: int) -> np.ndarray:
    """Decode and check dtype and rank; shape against the geometry is the caller's job."""
    if not isinstance(obj, dict):
        raise ArrayCodecError("must be an object with dtype, shape and data")
    missing = [k for k in ("dtype", "shape", "data") if k not in obj]
    if missing:
        raise ArrayCodecError(f"is missing {', '.join(missing)}")
    unknown = sorted(set(obj) - {"dtype", "shape", "data", "encoding", "compression", "block"})
    if unknown:
        raise ArrayCodecError(f"has unknown key {unknown[0]!r}")
    if obj["dtype"] != dtype:
        raise ArrayCodecError(f"dtype must be {dtype}, got {obj['dtype']!r}")
    encoding = obj.get("encoding", "raw")
    if encoding not in ENCODINGS:
        raise ArrayCodecError(f"encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
    if encoding != "raw" and dtype != "float32":
        raise ArrayCodecError(f"encoding {encoding!r} applies to float32 arrays, not {dtype}")
    if "block" in obj and encoding != "q8":
        raise ArrayCodecError(f"block applies to q8 arrays, not {encoding!r}")
    compression = obj.get("compression")
    if compression is not None and compression not in COMPRESSIONS:
        raise ArrayCodecError(
            f"compression must be one of {list(COMPRESSIONS)} or absent, got {compression!r}"
        )
    shape = obj["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != ndim
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise ArrayCodecError(
            f"shape must be a list of {ndim} non-negative integers, got {shape!r}"
        )
    if not isinstance(obj["data"], str):
        raise ArrayCodecError("data must be a base64 string")
    try:
        raw = base64.b64decode(obj["data"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ArrayCodecError(f"data is not valid base64 ({exc})") from exc
    np_dtype = np.dtype(_DTYPES[dtype])
    count = math.prod(shape)  # Python ints: a hostile shape cannot wrap around to a small size
    if encoding == "f16":
        expected = count * 2
    elif encoding == "q8":
        block = _block(shape, obj.get("block"))
        rows = count // block if block else 0  # segments
        expected = rows * 8 + count
    else:
        expected = count * np_dtype.itemsize
    if expected > MAX_DECODED_BYTES:
        raise ArrayCodecError(
            f"shape {shape} needs {expected} bytes, over the {MAX_DECODED_BYTES} allowed"
        )
    if compression == "zlib":
        raw = _inflate(raw, expected)
    if len(raw) != expected:
        what = f"{dtype} ({encoding})" if encoding != "raw" else dtype
        stage = "inflated data" if compression else "data"
        raise ArrayCodecError(
            f"{stage} has {len(raw)} bytes, shape {shape} {what} needs {expected}"
        )
    if dtype == "bool" and raw.translate(None, b"\x00\x01"):
        raise ArrayCodecError("bool data holds bytes other than 0 and 1")
    if encoding == "f16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(shape)
    if encoding == "q8":
        lo = np.frombuffer(raw, dtype="<f4", count=rows)
        hi = np.frombuffer(raw, dtype="<f4", count=rows, offset=rows * 4)
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo <= hi)):
            raise ArrayCodecError(
                "q8 segment ranges hold NaN, infinite or inverted (lo > hi) bounds"
            )
        q = np.frombuffer(raw, dtype=np.uint8, offset=rows * 8)
        return _q8_decode(lo, hi, q, shape)
    arr = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
    native = arr.astype(np_dtype.newbyteorder("="), copy=True)
    return native

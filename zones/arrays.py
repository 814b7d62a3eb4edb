"""JSON-safe numpy arrays: `{"dtype", "shape", "data"}` with base64 of little-endian bytes.

Used by the zone table and the embedded predictor. Only the dtypes those need are allowed, so
a table can never smuggle in object arrays, and byte order is fixed so that a table written on
one machine loads bit-identically on any other.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

# Name in the file -> little-endian numpy dtype.
_DTYPES: dict[str, str] = {"float32": "<f4", "float64": "<f8", "int32": "<i4", "bool": "|b1"}


class ArrayCodecError(ValueError):
    """An encoded array is malformed; the message says what is wrong (callers prefix the field)."""


def encode_array(arr: np.ndarray) -> dict[str, Any]:
    name = str(arr.dtype) if arr.dtype != np.bool_ else "bool"
    if name not in _DTYPES:
        raise ArrayCodecError(f"dtype {arr.dtype} is not encodable; allowed: {sorted(_DTYPES)}")
    raw = np.ascontiguousarray(arr, dtype=_DTYPES[name]).tobytes()
    return {"dtype": name, "shape": list(arr.shape), "data": base64.b64encode(raw).decode("ascii")}


def decode_array(obj: Any, *, dtype: str, ndim: int) -> np.ndarray:
    """Decode and check dtype and rank; shape against the geometry is the caller's job."""
    if not isinstance(obj, dict):
        raise ArrayCodecError("must be an object with dtype, shape and data")
    missing = [k for k in ("dtype", "shape", "data") if k not in obj]
    if missing:
        raise ArrayCodecError(f"is missing {', '.join(missing)}")
    if obj["dtype"] != dtype:
        raise ArrayCodecError(f"dtype must be {dtype}, got {obj['dtype']!r}")
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
    expected = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    if len(raw) != expected:
        raise ArrayCodecError(f"data has {len(raw)} bytes, shape {shape} {dtype} needs {expected}")
    if dtype == "bool" and raw.translate(None, b"\x00\x01"):
        raise ArrayCodecError("bool data holds bytes other than 0 and 1")
    arr = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
    native = arr.astype(np_dtype.newbyteorder("="), copy=True)
    return native

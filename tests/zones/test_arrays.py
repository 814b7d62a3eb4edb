"""Array codec: every encoding round-trips, quantisation is idempotent (re-saving a loaded
compact table reproduces it), and malformed compact arrays are rejected with a clear reason."""

from __future__ import annotations

import base64
import zlib
from typing import Any

import numpy as np
import pytest

from zones.arrays import (
    MAX_DECODED_BYTES,
    ArrayCodecError,
    Compression,
    Encoding,
    decode_array,
    encode_array,
    quantize,
)

CODECS: list[tuple[Encoding, Compression, int | None]] = [
    ("raw", None, None),
    ("raw", "zlib", None),
    ("f16", None, None),
    ("f16", "zlib", None),
    ("q8", None, None),
    ("q8", "zlib", None),
    ("q8", "zlib", 4),
]


def _sample() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 16)).astype(np.float32)
    x[1] = 0.0  # all-zero row
    x[2] = 0.25  # constant row
    x[3] = np.abs(x[3])  # non-negative, like centroid rows
    x[4, 5] = 1e-30  # a tiny value next to ordinary ones
    return x


@pytest.mark.parametrize(("encoding", "compression", "block"), CODECS)
def test_round_trip_matches_quantize_and_is_idempotent(
    encoding: Encoding, compression: Compression, block: int | None
) -> None:
    x = _sample()
    obj = encode_array(x, encoding=encoding, compression=compression, block=block)
    back = decode_array(obj, dtype="float32", ndim=2)
    assert back.dtype == np.float32 and back.shape == x.shape
    np.testing.assert_array_equal(back, quantize(x, encoding, block=block))
    # Encoding the decoded values again gives the same bytes: compact tables re-save identically.
    again = encode_array(back, encoding=encoding, compression=compression, block=block)
    assert again == obj
    np.testing.assert_array_equal(quantize(back, encoding, block=block), back)


def test_raw_arrays_keep_the_schema_1_form() -> None:
    obj = encode_array(np.ones((2, 3), np.float32))
    assert set(obj) == {"dtype", "shape", "data"}


def test_quantisation_error_is_bounded() -> None:
    x = _sample()
    span = x.max(axis=1) - x.min(axis=1)
    err = np.abs(quantize(x, "q8") - x).max(axis=1)
    assert np.all(err <= span / 255 / 2 * (1 + 1e-5) + 1e-12)
    # Row extremes decode exactly, so zero stays zero in a non-negative row.
    q = quantize(x, "q8")
    np.testing.assert_array_equal(q.min(axis=1), x.min(axis=1))
    np.testing.assert_array_equal(q.max(axis=1), x.max(axis=1))
    np.testing.assert_array_equal(q[1], 0.0)
    np.testing.assert_array_equal(q[2], 0.25)
    assert np.abs(quantize(x, "f16") - x).max() <= np.abs(x).max() * 2**-11


def test_segments_are_finer_than_rows() -> None:
    rng = np.random.default_rng(1)
    # Two "layers" of very different scale in one row: per-row steps are set by the larger.
    x = np.concatenate([rng.random((4, 8)), 0.01 * rng.random((4, 8))], axis=1).astype(np.float32)
    row = np.abs(quantize(x, "q8") - x)[:, 8:].max()
    seg = np.abs(quantize(x, "q8", block=8) - x)[:, 8:].max()
    assert seg < row / 10


def test_empty_and_one_dimensional_arrays() -> None:
    for x in (np.zeros((0, 5), np.float32), np.zeros((3, 0), np.float32), np.arange(5.0)):
        x = x.astype(np.float32)
        obj = encode_array(x, encoding="q8", compression="zlib")
        back = decode_array(obj, dtype="float32", ndim=x.ndim)
        assert back.shape == x.shape
        np.testing.assert_array_equal(back, quantize(x, "q8"))


def _mutated(**changes: Any) -> dict[str, Any]:
    obj = encode_array(_sample(), encoding="q8", compression="zlib")
    obj.update(changes)
    return obj


def _blob(payload: bytes) -> str:
    return base64.b64encode(payload).decode()


def _inflated() -> bytes:
    return zlib.decompress(base64.b64decode(_mutated()["data"]))


def _flip_middle(data: str) -> str:
    raw = bytearray(base64.b64decode(data))
    raw[len(raw) // 2] ^= 0xFF
    return _blob(bytes(raw))


BAD: list[tuple[str, dict[str, Any], str, str]] = [
    ("wrong dtype", _mutated(dtype="float64"), "float32", "dtype must be float32"),
    ("unknown encoding", _mutated(encoding="q4"), "float32", "encoding must be one of"),
    ("unknown compression", _mutated(compression="zstd"), "float32", "compression must be"),
    ("encoding on bool", _mutated(dtype="bool"), "bool", "applies to float32 arrays"),
    ("unknown key", _mutated(scale=1.0), "float32", "unknown key 'scale'"),
    ("block without q8", {**encode_array(_sample()), "block": 4}, "float32", "block applies"),
    ("block not dividing", _mutated(block=5), "float32", "block 5 does not divide"),
    ("corrupt zlib", _mutated(data=_flip_middle(_mutated()["data"])), "float32",
     "not a valid zlib stream"),
    ("truncated zlib", _mutated(data=_blob(base64.b64decode(_mutated()["data"])[:-20])),
     "float32", "truncated zlib stream"),
    ("trailing bytes", _mutated(data=_blob(base64.b64decode(_mutated()["data"]) + b"x")),
     "float32", "after the end of its zlib stream"),
    ("inflates past shape", _mutated(shape=[3, 16]), "float32", "inflates past"),
    ("short blob", _mutated(data=_blob(zlib.compress(_inflated()[:-1]))), "float32",
     "inflated data has"),
    ("inverted bounds", _mutated(data=_blob(zlib.compress(
        np.float32(1).tobytes() + _inflated()[4:24] + np.float32(0).tobytes()
        + _inflated()[28:]))), "float32", "inverted"),
    ("NaN bounds", _mutated(data=_blob(zlib.compress(
        np.float32(np.nan).tobytes() + _inflated()[4:]))), "float32", "NaN"),
    ("huge shape", _mutated(shape=[1 << 40, 1 << 40]), "float32", "over the"),
]


@pytest.mark.parametrize(("name", "obj", "dtype", "message"), BAD, ids=[b[0] for b in BAD])
def test_malformed_compact_arrays_are_rejected(
    name: str, obj: dict[str, Any], dtype: str, message: str
) -> None:
    with pytest.raises(ArrayCodecError, match=message):
        decode_array(obj, dtype=dtype, ndim=2)


def test_decoded_size_is_capped_before_inflating() -> None:
    # A zlib bomb: a few KiB that would inflate past the cap are refused from the shape alone.
    side = int(np.sqrt(MAX_DECODED_BYTES)) + 16
    bomb = {"dtype": "float32", "shape": [side, side], "encoding": "q8", "compression": "zlib",
            "data": _blob(zlib.compress(bytes(side * side)))}
    with pytest.raises(ArrayCodecError, match="over the"):
        decode_array(bomb, dtype="float32", ndim=2)


def test_encoder_refuses_what_it_cannot_represent() -> None:
    with pytest.raises(ArrayCodecError, match="float16 range"):
        encode_array(np.array([1e6], np.float32), encoding="f16")
    with pytest.raises(ArrayCodecError, match="applies to float32"):
        encode_array(np.ones(3, bool), encoding="q8")
    with pytest.raises(ArrayCodecError, match="block applies"):
        encode_array(np.ones(4, np.float32), encoding="f16", block=2)

"""Prompt -> predicted signature, for stock SGLang where no prompt routing is known before decode.

In the `dual` flow (DESIGN.md) the gateway must choose the decode worker before prefill runs, so
the only per-request evidence is the prompt itself. The predictor maps hashed word unigrams and
bigrams (or token-id unigrams and bigrams) to a point in signature space:

    x = l2-normalised bag of hashed n-grams          (sparse, `num_buckets` wide)
    y = bias + x @ weights                            (R coordinates)
    signature = normalise(y @ basis)                  (basis: R orthonormal rows in table space)

`basis` is the top-R right singular vectors of the training signatures, so the stored model is
`num_buckets x R + R x D` floats (small enough to embed in a ConfigMap-sized table) and the
prediction lands in the table's signature space, so the gateway's band logic applies unchanged.
The weights are a ridge regression fitted in closed form (`train_predictor`).

Cost per request: a split of a bounded text prefix, one crc32 per word (bigram hashes combine
neighbouring word hashes), a gather of the weight rows of the buckets present, and for the full
signature an R x D product. Measured median 60-100 us at D = 6,144 on the shared 2-core dev
machine (`python benchmarks/zones_fit.py`, part 3; `python -m zones predictor-eval` times it on
real prompts), dominated by the R x D product and the Python-level word hashing.

`coords` stops before the R x D product: it returns `y`, with `|y @ basis|^2 = y @ gram @ y`
(`gram = basis @ basis.T`, R x R, kept with the model). Anything linear in the signature can then
be taken in R dimensions: the gateway ranks zones by `(centroids @ basis.T) @ y / |y @ basis|`,
which touches K x R floats instead of the R x D basis and the K x D centroids.
"""

from __future__ import annotations

import string
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from zones.arrays import ArrayCodecError, decode_array, encode_array

FloatArray = npt.NDArray[np.float32]

PREDICTOR_KIND = "hashed-ngram-ridge"
# Characters scanned per wanted word: English averages ~6 per word with its space, so 12
# leaves room for long tokens (code identifiers) without scanning a huge prompt to its end.
_CHARS_PER_WORD = 12
_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})
# Odd 32-bit multipliers (Knuth's multiplicative hashing) to spread token ids over buckets.
_MUL_A = np.uint64(2654435761)
_MUL_B = np.uint64(2246822519)


class PredictorError(ValueError):
    """A predictor payload or training input is malformed; the message names the field."""


@dataclass(frozen=True, eq=False)
class Predictor:
    """Hashed n-gram ridge regression onto a low-rank basis of signature space."""

    num_buckets: int
    max_words: int
    weights: FloatArray  # float32 [num_buckets, R]
    bias: FloatArray  # float32 [R]
    basis: FloatArray  # float32 [R, D]

    def __post_init__(self) -> None:
        if not isinstance(self.num_buckets, int) or self.num_buckets <= 0:
            raise PredictorError(
                f"predictor.num_buckets must be a positive integer, got {self.num_buckets!r}"
            )
        if not isinstance(self.max_words, int) or self.max_words <= 0:
            raise PredictorError(
                f"predictor.max_words must be a positive integer, got {self.max_words!r}"
            )
        w, b, basis = (np.asarray(a) for a in (self.weights, self.bias, self.basis))
        if w.ndim != 2 or w.shape[0] != self.num_buckets:
            raise PredictorError(
                f"predictor.weights must be [num_buckets={self.num_buckets}, R], got {w.shape}"
            )
        rank = w.shape[1]
        if b.shape != (rank,):
            raise PredictorError(f"predictor.bias must be [R={rank}], got {b.shape}")
        if basis.ndim != 2 or basis.shape[0] != rank or basis.shape[1] == 0:
            raise PredictorError(f"predictor.basis must be [R={rank}, D], got {basis.shape}")
        for name, arr in (("weights", w), ("bias", b), ("basis", basis)):
            if not np.all(np.isfinite(arr)):
                raise PredictorError(f"predictor.{name} holds NaN or infinite values")
        for name, arr in (("weights", w), ("bias", b), ("basis", basis)):
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        gram = np.ascontiguousarray(self.basis @ self.basis.T, dtype=np.float32)
        gram.setflags(write=False)
        object.__setattr__(self, "gram", gram)

    gram: FloatArray = field(init=False, repr=False)  # float32 [R, R] = basis @ basis.T

    @property
    def dim(self) -> int:
        return int(self.basis.shape[1])

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    def coords(self, text: str | None, input_ids: Sequence[int] | None) -> FloatArray | None:
        """`y` (float32 [R]) with `predict(...) == normalise(y @ basis)`; None when the prompt
        has no features or the prediction is zero or not finite."""
        idx = self._buckets(text, input_ids)
        if idx is None or len(idx) == 0:
            return None
        # Only the buckets present: a gather of a few weight rows instead of a dense
        # num_buckets-wide product (256 KiB of weights at F = 2,048, R = 32).
        counts = np.bincount(idx, minlength=self.num_buckets)
        buckets = np.flatnonzero(counts)  # ascending, like np.unique, at a fifth of its cost
        tf = counts[buckets].astype(np.float32)
        tf /= np.float32(np.sqrt(np.dot(tf, tf)))
        y = self.bias + tf @ self.weights[buckets]
        norm2 = float(y @ self.gram @ y)
        if not np.isfinite(norm2) or norm2 <= 0.0:
            return None
        return y

    def features(self, text: str | None, input_ids: Sequence[int] | None) -> FloatArray | None:
        """Sparse features as (bucket indices, values) packed in one dense row; None if empty."""
        idx = self._buckets(text, input_ids)
        if idx is None:
            return None
        x = np.bincount(idx, minlength=self.num_buckets).astype(np.float32)
        x /= np.float32(np.sqrt(np.dot(x, x)))
        return x

    def _buckets(self, text: str | None, input_ids: Sequence[int] | None) -> np.ndarray | None:
        # Token ids when given (they are what the model routes on); else words of the text.
        if input_ids is not None and len(input_ids) > 0:
            uni = np.asarray(input_ids[: self.max_words], dtype=np.int64).astype(np.uint64)
            uni = uni * _MUL_A
        elif text:
            # str.translate + split is ~5x faster than a regex over the same prefix, and the
            # prefix bound keeps per-request cost flat for huge prompts.
            head = text[: self.max_words * _CHARS_PER_WORD].translate(_PUNCT_TO_SPACE)
            words = head.lower().split()[: self.max_words]
            if not words:
                return None
            # map() over C functions: ~2x faster than a generator expression here.
            uni = np.array(list(map(zlib.crc32, map(str.encode, words))), dtype=np.uint64)
        else:
            return None
        # Bigrams combine neighbouring unigram hashes (no second string hash per pair).
        bi = (uni[:-1] * _MUL_B) ^ (uni[1:] >> np.uint64(3)) ^ np.uint64(0x9E3779B9)
        h = np.concatenate([uni, bi]) >> np.uint64(5)
        return (h % np.uint64(self.num_buckets)).astype(np.intp)

    def predict(self, text: str | None, input_ids: Sequence[int] | None) -> FloatArray | None:
        """Predicted unit signature (float32 [D]) or None when the prompt has no features."""
        y = self.coords(text, input_ids)
        if y is None:
            return None
        vec = y @ self.basis
        norm = float(np.sqrt(np.dot(vec, vec)))
        if not np.isfinite(norm) or norm == 0.0:
            return None
        vec /= np.float32(norm)
        return vec

    def to_dict(
        self, encode: Callable[[str, FloatArray], dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """JSON form; `encode(name, array)` writes each array (weights, bias, basis), so the
        zone table can choose compact encodings (`zones.arrays`); default raw float32."""
        enc = encode or (lambda _name, arr: encode_array(arr))
        return {
            "kind": PREDICTOR_KIND,
            "num_buckets": self.num_buckets,
            "max_words": self.max_words,
            "weights": enc("weights", self.weights),
            "bias": enc("bias", self.bias),
            "basis": enc("basis", self.basis),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Predictor:
        if not isinstance(data, dict):
            raise PredictorError("predictor must be an object")
        if data.get("kind") != PREDICTOR_KIND:
            raise PredictorError(
                f"predictor.kind must be {PREDICTOR_KIND!r}, got {data.get('kind')!r}"
            )
        for key in ("num_buckets", "max_words"):
            if not isinstance(data.get(key), int) or isinstance(data.get(key), bool):
                raise PredictorError(f"predictor.{key} must be an integer")
        arrays = {}
        for key, ndim in (("weights", 2), ("bias", 1), ("basis", 2)):
            try:
                arrays[key] = decode_array(data.get(key), dtype="float32", ndim=ndim)
            except ArrayCodecError as exc:
                raise PredictorError(f"predictor.{key} {exc}") from exc
        return cls(data["num_buckets"], data["max_words"], **arrays)


def train_predictor(
    texts: Sequence[str | None],
    input_ids: Sequence[Sequence[int] | None] | None,
    signatures: npt.ArrayLike,
    *,
    num_buckets: int = 2048,
    max_words: int = 128,
    rank: int = 32,
    ridge: float = 1.0,
) -> Predictor:
    """Fit the predictor on (prompt, exact signature) pairs by closed-form ridge regression."""
    sig = np.asarray(signatures, dtype=np.float32)
    n = len(texts)
    if sig.ndim != 2 or sig.shape[0] != n:
        raise PredictorError(f"signatures must be [N={n}, D], got {sig.shape}")
    if input_ids is not None and len(input_ids) != n:
        raise PredictorError(f"input_ids has {len(input_ids)} entries, texts has {n}")
    if ridge <= 0:
        raise PredictorError("ridge must be positive")
    # Basis: top right singular vectors of the signatures (uncentred: signatures are directions).
    rank = max(1, min(rank, n, sig.shape[1]))
    _, _, vt = np.linalg.svd(sig.astype(np.float64), full_matrices=False)
    basis = vt[:rank].astype(np.float32)
    y = sig.astype(np.float64) @ basis.T.astype(np.float64)  # [N, R]

    probe = Predictor(
        num_buckets,
        max_words,
        np.zeros((num_buckets, rank), np.float32),
        np.zeros(rank, np.float32),
        basis,
    )
    rows = []
    for i in range(n):
        ids = None if input_ids is None else input_ids[i]
        x = probe.features(texts[i], ids)
        rows.append(np.zeros(num_buckets, np.float32) if x is None else x)
    x_mat = np.stack(rows).astype(np.float64) if rows else np.zeros((0, num_buckets))
    has = np.any(x_mat != 0, axis=1)
    if not has.any():
        raise PredictorError("no training prompt has any text or input_ids")
    bias = y[has].mean(axis=0)
    yc = y[has] - bias
    xm = x_mat[has]
    # Dual form: N x N system, cheaper than F x F while calibration sets are below num_buckets.
    if xm.shape[0] <= num_buckets:
        gram = xm @ xm.T + ridge * np.eye(xm.shape[0])
        weights = xm.T @ np.linalg.solve(gram, yc)
    else:
        gram = xm.T @ xm + ridge * np.eye(num_buckets)
        weights = np.linalg.solve(gram, xm.T @ yc)
    return Predictor(
        num_buckets, max_words, weights.astype(np.float32), bias.astype(np.float32), basis
    )

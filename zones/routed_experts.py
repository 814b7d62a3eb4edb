"""SGLang's `routed_experts` wire encoding and expert count matrices.

SGLang (checked against sglang 0.5.23: `srt/managers/detokenizer_manager.py`
`_b64_encode_per_request`, `srt/state_capturer/routed_experts.py`
`extract_routed_experts_from_meta_info`) returns `meta_info.routed_experts` as base64 of the raw
bytes of an int32 tensor shaped `[tokens, num_layers, top_k]` (little-endian on every platform
SGLang runs on). The rows cover positions `[routed_experts_start_len, seqlen - 1)`: the last
sampled token was never forwarded, so it has no routing row.

Count matrices are int32 `[num_layers, num_experts]`: how many tokens each (layer, expert)
received. They travel base64-encoded the same way, shaped `[num_layers, num_experts]`.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np
import numpy.typing as npt

from zones.geometry import ModelGeometry

IntArray = npt.NDArray[np.int32]


class RoutedExpertsError(ValueError):
    """A routed-experts or counts payload cannot be decoded for the given geometry."""


def encode_routed_experts(expert_ids: npt.ArrayLike) -> str:
    """Encode `[tokens, layers, top_k]` expert ids exactly as SGLang does."""
    arr = np.ascontiguousarray(np.asarray(expert_ids), dtype="<i4")
    if arr.ndim != 3:
        raise RoutedExpertsError(
            f"routed_experts must be 3-D [tokens, layers, top_k], got {arr.shape}"
        )
    return base64.b64encode(arr.tobytes()).decode("ascii")


def decode_routed_experts(payload: str, geometry: ModelGeometry) -> IntArray:
    """Decode SGLang's base64 `routed_experts` into int32 `[tokens, layers, top_k]`."""
    raw = _b64decode(payload, "routed_experts")
    row = geometry.num_layers * geometry.top_k * 4
    if len(raw) % row:
        raise RoutedExpertsError(
            f"routed_experts has {len(raw)} bytes, not a multiple of one token row "
            f"({geometry.num_layers} layers x top_k {geometry.top_k} x 4 bytes)"
        )
    ids = np.frombuffer(raw, dtype="<i4").astype(np.int32)
    ids = ids.reshape(-1, geometry.num_layers, geometry.top_k)
    if ids.size and (ids.min() < 0 or ids.max() >= geometry.num_experts):
        raise RoutedExpertsError(
            f"routed_experts holds expert ids outside [0, {geometry.num_experts})"
        )
    return ids


def counts_from_expert_ids(expert_ids: npt.ArrayLike, geometry: ModelGeometry) -> IntArray:
    """Per-(layer, expert) token counts from `[tokens, layers, top_k]` expert ids."""
    ids = np.asarray(expert_ids)
    if ids.ndim != 3 or ids.shape[1:] != (geometry.num_layers, geometry.top_k):
        raise RoutedExpertsError(
            f"expert ids shaped {ids.shape} do not match geometry "
            f"[tokens, {geometry.num_layers}, {geometry.top_k}]"
        )
    layer = np.broadcast_to(np.arange(geometry.num_layers)[None, :, None], ids.shape)
    flat = layer.astype(np.int64) * geometry.num_experts + ids.astype(np.int64)
    counts = np.bincount(flat.ravel(), minlength=geometry.signature_dim)
    return counts.reshape(geometry.num_layers, geometry.num_experts).astype(np.int32)


def encode_counts(counts: npt.ArrayLike) -> str:
    """Encode an int32 `[layers, experts]` count matrix as base64 (same byte layout as SGLang)."""
    arr = np.ascontiguousarray(np.asarray(counts), dtype="<i4")
    if arr.ndim != 2:
        raise RoutedExpertsError(f"counts must be 2-D [layers, experts], got {arr.shape}")
    return base64.b64encode(arr.tobytes()).decode("ascii")


def decode_counts(payload: str, geometry: ModelGeometry) -> IntArray:
    """Decode a base64 int32 `[layers, experts]` count matrix, checking it fits the geometry."""
    raw = _b64decode(payload, "counts")
    expected = geometry.signature_dim * 4
    if len(raw) != expected:
        raise RoutedExpertsError(
            f"counts has {len(raw)} bytes, expected {expected} for "
            f"[{geometry.num_layers}, {geometry.num_experts}] int32"
        )
    counts = np.frombuffer(raw, dtype="<i4").astype(np.int32)
    if counts.min() < 0:
        raise RoutedExpertsError("counts holds negative values")
    return counts.reshape(geometry.num_layers, geometry.num_experts)


def _b64decode(payload: str, field: str) -> bytes:
    if not isinstance(payload, str):
        raise RoutedExpertsError(f"{field} must be a base64 string, got {type(payload).__name__}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RoutedExpertsError(f"{field} is not valid base64: {exc}") from exc

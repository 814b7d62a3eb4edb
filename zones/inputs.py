"""Calibration inputs -> one `CalibrationSet` (count matrices + optional prompts and token rows).

Formats (chosen with `--format`, or detected from the file):

- `trace` (.npz with `expert_ids [tokens, L, top_k]` and `seq_offsets [N+1]`, like
  ../shared/data/esft_routing_shared.npz). Those prompts were teacher-forced with their answers,
  so there is no prefill/decode boundary: the leading `prefill_fraction` of each request's tokens
  is treated as the prompt (signature source) and the rest as decode (usage target).
- `counts` (.npy `[N, L, E]` or .npz with `prompt_counts` and optionally `decode_counts`).
  A bare .npy cannot say its top_k, so the geometry must be named (`--model` or `--top-k`).
- `routed-experts` (JSON lines, one SGLang response each): `routed_experts` (base64 int32
  `[tokens, L, top_k]`, SGLang `meta_info.routed_experts`), `num_prompt_tokens` (rows before it
  are prompt tokens), `geometry`, and optional `text` / `input_ids`. Only valid from a non-PD
  SGLang (in PD mode the decode's prompt rows are not valid, see DESIGN.md).
- `calibration` (the gateway's JSON-lines log, `zones.calibration`): signature counts are
  `prompt_counts` when present, else `output_counts` (stock SGLang PD only yields the latter);
  decode usage is `output_counts`.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from zones.calibration import CalibrationError, ReadStats, read_calibration
from zones.geometry import KNOWN_GEOMETRIES, GeometryError, ModelGeometry, geometry_by_name
from zones.routed_experts import RoutedExpertsError, counts_from_expert_ids, decode_routed_experts

IntArray = npt.NDArray[np.int32]
FORMATS = ("trace", "counts", "routed-experts", "calibration")
DEFAULT_PREFILL_FRACTION = 0.5


class InputError(ValueError):
    """An input file cannot be read as calibration data; the message names file and field."""


@dataclass
class CalibrationSet:
    """N requests of one geometry. `signature_counts` build signatures; `decode_counts` is the
    decode-time usage rho is measured against (None when the input has no decode side)."""

    geometry: ModelGeometry
    signature_counts: IntArray  # [N, L, E]
    decode_counts: IntArray | None  # [N, L, E]
    texts: list[str | None] | None = None
    input_ids: list[tuple[int, ...] | None] | None = None
    # Per-request decode token rows [T_i, L, top_k] (token-level evaluation), when known.
    decode_tokens: list[np.ndarray] | None = None
    labels: list[str] | None = None  # e.g. task domain, reported only, never used to fit
    signature_from: str = "prompt"  # "prompt", "output" or "mixed"
    # bool [N]: rows whose signature counts come from the prompt (None: all of them). Rows
    # built from output counts ARE the decode usage, so rho on them would be circular.
    prompt_rows: np.ndarray | None = None
    sources: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.signature_counts.shape[0])

    @property
    def has_prompts(self) -> bool:
        return (self.texts is not None and any(t is not None for t in self.texts)) or (
            self.input_ids is not None and any(i is not None for i in self.input_ids)
        )

    def independent_rows(self) -> np.ndarray:
        """Indices whose signature is independent of their decode usage (prompt-based)."""
        if self.prompt_rows is None:
            return np.arange(len(self))
        return np.flatnonzero(self.prompt_rows)

    def subset(self, index: npt.ArrayLike) -> CalibrationSet:
        idx = np.asarray(index, dtype=np.int64)
        pick = idx.tolist()
        return CalibrationSet(
            geometry=self.geometry,
            signature_counts=self.signature_counts[idx],
            decode_counts=None if self.decode_counts is None else self.decode_counts[idx],
            texts=None if self.texts is None else [self.texts[i] for i in pick],
            input_ids=None if self.input_ids is None else [self.input_ids[i] for i in pick],
            decode_tokens=None
            if self.decode_tokens is None
            else [self.decode_tokens[i] for i in pick],
            labels=None if self.labels is None else [self.labels[i] for i in pick],
            signature_from=self.signature_from,
            prompt_rows=None if self.prompt_rows is None else self.prompt_rows[idx],
            sources=self.sources,
        )


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random (train, test) index split; both sorted, both non-empty."""
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if n < 2:
        raise InputError(f"need at least 2 requests to split, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return "counts"
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "expert_ids" in data.files and "seq_offsets" in data.files:
                return "trace"
            if "prompt_counts" in data.files:
                return "counts"
        raise InputError(f"{path}: .npz has neither expert_ids+seq_offsets nor prompt_counts")
    with path.open("rb") as fh:
        for raw in fh:
            if raw.strip():
                try:
                    doc = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:1: not JSON lines ({exc})") from exc
                if isinstance(doc, dict) and "schema_version" in doc:
                    return "calibration"
                if isinstance(doc, dict) and "routed_experts" in doc:
                    return "routed-experts"
                break
    raise InputError(f"{path}: cannot tell the format; pass --format ({', '.join(FORMATS)})")


def _geometry_from(data: Any, override: ModelGeometry | None, where: str) -> ModelGeometry:
    if override is not None:
        return override
    try:
        if "model" not in data and "geometry_name" not in data:
            # Unnamed shape: name it after the one known model with exactly this geometry.
            dims = (int(data["num_layers"]), int(data["num_experts"]), int(data["top_k"]))
            named = [
                g
                for g in KNOWN_GEOMETRIES.values()
                if (g.num_layers, g.num_experts, g.top_k) == dims
            ]
            if len(named) == 1:
                return named[0]
        if "geometry_name" in data:
            return geometry_by_name(str(data["geometry_name"]))
        return ModelGeometry(
            name=str(data["model"]) if "model" in data else "unknown",
            num_layers=int(data["num_layers"]),
            num_experts=int(data["num_experts"]),
            top_k=int(data["top_k"]),
        )
    except KeyError as exc:
        raise InputError(
            f"{where}: geometry not recorded (missing {exc}); pass --model or --num-experts/--top-k"
        ) from exc
    except GeometryError as exc:
        raise InputError(f"{where}: {exc}") from exc


def split_prefill(num_tokens: int, prefill_fraction: float) -> int:
    """Prompt length for a teacher-forced trace: at least 1 prompt and 1 decode token."""
    if num_tokens < 2:
        return num_tokens
    return min(num_tokens - 1, max(1, round(num_tokens * prefill_fraction)))


def load_trace(
    path: Path, geometry: ModelGeometry | None, prefill_fraction: float
) -> CalibrationSet:
    if not 0.0 < prefill_fraction < 1.0:
        raise InputError(f"prefill_fraction must be in (0, 1), got {prefill_fraction}")
    with np.load(path, allow_pickle=False) as data:
        geo = _geometry_from(data, geometry, str(path))
        ids = data["expert_ids"]
        offsets = data["seq_offsets"].astype(np.int64)
        labels = [str(x) for x in data["domain"]] if "domain" in data.files else None
    if ids.ndim != 3 or ids.shape[1:] != (geo.num_layers, geo.top_k):
        raise InputError(f"{path}: expert_ids {ids.shape} do not match geometry {geo}")
    if (
        offsets.ndim != 1
        or offsets[0] != 0
        or offsets[-1] != len(ids)
        or np.any(np.diff(offsets) < 0)
    ):
        raise InputError(f"{path}: seq_offsets must rise from 0 to {len(ids)}")
    n = len(offsets) - 1
    prompt = np.zeros((n, geo.num_layers, geo.num_experts), np.int32)
    decode = np.zeros_like(prompt)
    tokens: list[np.ndarray] = []
    for i in range(n):
        rows = ids[offsets[i] : offsets[i + 1]].astype(np.int32)
        cut = split_prefill(len(rows), prefill_fraction)
        try:
            prompt[i] = counts_from_expert_ids(rows[:cut], geo)
            decode[i] = counts_from_expert_ids(rows[cut:], geo)
        except RoutedExpertsError as exc:
            raise InputError(f"{path}: request {i}: {exc}") from exc
        tokens.append(rows[cut:])
    if labels is not None and len(labels) != n:
        labels = None
    return CalibrationSet(
        geo,
        prompt,
        decode,
        decode_tokens=tokens,
        labels=labels,
        sources=[{"path": str(path), "format": "trace", "prefill_fraction": prefill_fraction}],
    )


def load_counts(path: Path, geometry: ModelGeometry | None) -> CalibrationSet:
    decode = None
    if path.suffix.lower() == ".npy":
        prompt = np.load(path, allow_pickle=False)
        if geometry is None:
            raise InputError(f"{path}: a .npy cannot record geometry; pass --model or --top-k")
        geo = geometry
    else:
        with np.load(path, allow_pickle=False) as data:
            geo = _geometry_from(data, geometry, str(path))
            prompt = data["prompt_counts"]
            decode = data["decode_counts"] if "decode_counts" in data.files else None
    for name, arr in (("prompt_counts", prompt), ("decode_counts", decode)):
        if arr is None:
            continue
        if arr.ndim != 3 or arr.shape[1:] != (geo.num_layers, geo.num_experts):
            raise InputError(
                f"{path}: {name} shaped {arr.shape}, "
                f"expected [N, {geo.num_layers}, {geo.num_experts}]"
            )
        if not np.issubdtype(arr.dtype, np.integer) or (arr.size and arr.min() < 0):
            raise InputError(f"{path}: {name} must hold non-negative integer counts")
    if decode is not None and decode.shape != prompt.shape:
        raise InputError(
            f"{path}: decode_counts {decode.shape} and prompt_counts {prompt.shape} differ"
        )
    return CalibrationSet(
        geo,
        prompt.astype(np.int32),
        None if decode is None else decode.astype(np.int32),
        sources=[{"path": str(path), "format": "counts"}],
    )


def load_routed_experts(path: Path, geometry: ModelGeometry | None) -> CalibrationSet:
    geo: ModelGeometry | None = geometry
    prompts, decodes, texts, ids_list, tokens = [], [], [], [], []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                doc = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not valid JSON ({exc})") from exc
            if not isinstance(doc, dict) or "routed_experts" not in doc:
                raise InputError(f"{where}: routed_experts: missing")
            if geo is None:
                if "geometry" not in doc:
                    raise InputError(f"{where}: geometry: missing (or pass --model)")
                try:
                    geo = ModelGeometry.from_dict(doc["geometry"])
                except GeometryError as exc:
                    raise InputError(f"{where}: geometry: {exc}") from exc
            try:
                rows = decode_routed_experts(doc["routed_experts"], geo)
            except RoutedExpertsError as exc:
                raise InputError(f"{where}: routed_experts: {exc}") from exc
            cut = doc.get("num_prompt_tokens")
            if not isinstance(cut, int) or isinstance(cut, bool) or not 0 < cut <= len(rows):
                raise InputError(
                    f"{where}: num_prompt_tokens: must be an integer in [1, {len(rows)}]"
                )
            prompts.append(counts_from_expert_ids(rows[:cut], geo))
            decodes.append(counts_from_expert_ids(rows[cut:], geo))
            tokens.append(rows[cut:])
            text = doc.get("text")
            texts.append(text if isinstance(text, str) else None)
            ids = doc.get("input_ids")
            ids_list.append(tuple(int(i) for i in ids) if isinstance(ids, list) else None)
    if geo is None or not prompts:
        raise InputError(f"{path}: no records")
    return CalibrationSet(
        geo,
        np.stack(prompts),
        np.stack(decodes),
        texts=texts,
        input_ids=ids_list,
        decode_tokens=tokens,
        sources=[{"path": str(path), "format": "routed-experts"}],
    )


def load_calibration_log(path: Path, geometry: ModelGeometry | None) -> CalibrationSet:
    stats = ReadStats()
    try:
        records = list(read_calibration(path, skip_invalid=True, stats=stats))
    except (OSError, CalibrationError) as exc:
        raise InputError(f"{path}: {exc}") from exc
    usable = [r for r in records if r.signature_counts() is not None]
    if not usable:
        detail = f" (first error: {stats.first_error})" if stats.first_error else ""
        raise InputError(f"{path}: no record with prompt_counts or output_counts{detail}")
    geo = usable[0].geometry
    if geometry is not None and geometry != geo:
        raise InputError(f"{path}: geometry {geo} differs from the requested {geometry}")
    from_prompt = [r.prompt_counts is not None for r in usable]
    sig = np.stack([r.signature_counts() for r in usable])  # type: ignore[misc]
    have_decode = all(r.output_counts is not None for r in usable)
    decode = np.stack([r.output_counts for r in usable]) if have_decode else None  # type: ignore[misc]
    return CalibrationSet(
        geo,
        sig.astype(np.int32),
        None if decode is None else decode.astype(np.int32),
        texts=[r.text for r in usable],
        input_ids=[r.input_ids for r in usable],
        prompt_rows=np.array(from_prompt, dtype=bool),
        signature_from="prompt"
        if all(from_prompt)
        else "output"
        if not any(from_prompt)
        else "mixed",
        sources=[
            {
                "path": str(path),
                "format": "calibration",
                "records": stats.records,
                "skipped_invalid": stats.skipped,
                "without_counts": len(records) - len(usable),
            }
        ],
    )


def load_inputs(
    paths: Sequence[str | Path],
    *,
    fmt: str | None = None,
    geometry: ModelGeometry | None = None,
    prefill_fraction: float = DEFAULT_PREFILL_FRACTION,
) -> CalibrationSet:
    """Load and concatenate inputs (all of one geometry). Sources get their sha256."""
    if not paths:
        raise InputError("no input files given")
    parts: list[CalibrationSet] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        try:
            kind = fmt or detect_format(path)
            if kind == "trace":
                part = load_trace(path, geometry, prefill_fraction)
            elif kind == "counts":
                part = load_counts(path, geometry)
            elif kind == "routed-experts":
                part = load_routed_experts(path, geometry)
            elif kind == "calibration":
                part = load_calibration_log(path, geometry)
            else:
                raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {kind!r}")
        except InputError:
            raise
        except KeyError as exc:  # an .npz without the array the format needs
            raise InputError(f"{path}: missing array {exc} for format {fmt or 'detected'}") from exc
        except (ValueError, OSError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc
        part.sources[0]["sha256"] = file_digest(path)
        parts.append(part)
    return concat(parts)


def concat(parts: Sequence[CalibrationSet]) -> CalibrationSet:
    geo = parts[0].geometry
    for p in parts[1:]:
        if (p.geometry.num_layers, p.geometry.num_experts, p.geometry.top_k) != (
            geo.num_layers,
            geo.num_experts,
            geo.top_k,
        ):
            raise InputError(f"inputs disagree on geometry: {geo} vs {p.geometry}")
    if len(parts) == 1:
        return parts[0]

    def join(attr: str) -> list[Any] | None:
        values = [getattr(p, attr) for p in parts]
        if all(v is None for v in values):
            return None
        out: list[Any] = []
        for p, v in zip(parts, values, strict=True):
            out.extend(v if v is not None else [None] * len(p))
        return out

    decodes = [p.decode_counts for p in parts]
    kinds = {p.signature_from for p in parts}
    tokens = [p.decode_tokens for p in parts]
    return CalibrationSet(
        geometry=geo,
        signature_counts=np.concatenate([p.signature_counts for p in parts]),
        decode_counts=None if any(d is None for d in decodes) else np.concatenate(decodes),  # type: ignore[arg-type]
        texts=join("texts"),
        input_ids=join("input_ids"),
        decode_tokens=None if any(t is None for t in tokens) else [r for t in tokens for r in t],  # type: ignore[union-attr]
        labels=join("labels"),
        signature_from=kinds.pop() if len(kinds) == 1 else "mixed",
        prompt_rows=None
        if all(p.prompt_rows is None for p in parts)
        else np.concatenate(
            [np.ones(len(p), bool) if p.prompt_rows is None else p.prompt_rows for p in parts]
        ),
        sources=[s for p in parts for s in p.sources],
    )

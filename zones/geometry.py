"""MoE model geometry: the shape of routing data. Recorded with every artefact, never assumed."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


class GeometryError(ValueError):
    """A geometry is malformed or does not match the data it describes."""


@dataclass(frozen=True, slots=True)
class ModelGeometry:
    """Routing shape of an MoE model: per token, `top_k` of `num_experts` in each MoE layer."""

    name: str
    num_layers: int
    num_experts: int
    top_k: int

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_experts", "top_k"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise GeometryError(f"geometry.{field} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise GeometryError(
                f"geometry.top_k ({self.top_k}) exceeds geometry.num_experts ({self.num_experts})"
            )

    @property
    def signature_dim(self) -> int:
        """Length of an unmasked signature vector (layers x experts)."""
        return self.num_layers * self.num_experts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ModelGeometry:
        if not isinstance(data, dict):
            raise GeometryError("geometry must be an object")
        missing = [k for k in ("num_layers", "num_experts", "top_k") if k not in data]
        if missing:
            raise GeometryError(f"geometry is missing field(s): {', '.join(missing)}")
        return cls(
            name=str(data.get("name", "unknown")),
            num_layers=data["num_layers"],
            num_experts=data["num_experts"],
            top_k=data["top_k"],
        )


# Routed-expert geometry from each model's published config.json (num_hidden_layers that are
# MoE, n_routed_experts / num_experts, num_experts_per_tok). DeepSeek-V2-Lite has 27 layers of
# which the first is dense (first_k_dense_replace=1), hence 26 MoE layers.
KNOWN_GEOMETRIES: dict[str, ModelGeometry] = {
    g.name: g
    for g in (
        ModelGeometry("Qwen3-30B-A3B", num_layers=48, num_experts=128, top_k=8),
        ModelGeometry("GPT-OSS-120B", num_layers=36, num_experts=128, top_k=4),
        ModelGeometry("DeepSeek-V2-Lite", num_layers=26, num_experts=64, top_k=6),
    )
}


def geometry_by_name(name: str) -> ModelGeometry:
    """Look up a known geometry case-insensitively; the error lists the known names."""
    for key, geometry in KNOWN_GEOMETRIES.items():
        if key.lower() == name.lower():
            return geometry
    known = ", ".join(sorted(KNOWN_GEOMETRIES))
    raise GeometryError(f"unknown model {name!r}; known geometries: {known}")


def parse_geometry(spec: str) -> ModelGeometry:
    """A geometry from a known model name or `LAYERSxEXPERTSxTOP_K` (e.g. `26x64x6`)."""
    parts = spec.lower().split("x")
    if len(parts) == 3 and all(p.strip().isdigit() for p in parts):
        layers, experts, top_k = (int(p) for p in parts)
        return ModelGeometry(spec, num_layers=layers, num_experts=experts, top_k=top_k)
    try:
        return geometry_by_name(spec)
    except GeometryError as exc:
        raise GeometryError(f"{exc}; or give LAYERSxEXPERTSxTOP_K, e.g. 26x64x6") from None


def describe(geometry: ModelGeometry) -> str:
    """`DeepSeek-V2-Lite (26 layers x 64 experts, top_k 6)`: for error messages."""
    return (f"{geometry.name} ({geometry.num_layers} layers x {geometry.num_experts} experts, "
            f"top_k {geometry.top_k})")


def same_shape(a: ModelGeometry, b: ModelGeometry) -> bool:
    """Equal routing shape; names are labels and may differ (`26x64x6` vs `DeepSeek-V2-Lite`)."""
    return (a.num_layers, a.num_experts, a.top_k) == (b.num_layers, b.num_experts, b.top_k)

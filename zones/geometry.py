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

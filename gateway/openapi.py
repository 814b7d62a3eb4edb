"""Load the gateway's OpenAPI document (gateway/openapi.json, shipped as package data).

JSON rather than YAML so serving it needs no YAML parser at runtime.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import orjson


def load_openapi() -> dict[str, Any]:
    data = resources.files("gateway").joinpath("openapi.json").read_bytes()
    doc: dict[str, Any] = orjson.loads(data)
    return doc

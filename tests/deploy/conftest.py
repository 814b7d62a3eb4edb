"""Shared helpers for the deploy/ validation tests (pure file checks, no Docker or cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def load_yaml_docs(path: Path) -> list[Any]:
    """Every document of a (possibly multi-document) YAML file, empty documents dropped."""
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO

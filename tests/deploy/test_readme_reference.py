"""README.md's configuration and metrics tables match the code they describe."""

from __future__ import annotations

import importlib.util

import pytest

from tests.deploy import readme_reference as ref


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"pending: {module} not written yet")


def test_config_reference_matches_settings() -> None:
    _require("gateway.config")
    text = ref.README.read_text()
    assert ref.current(text, "CONFIG") == ref.render_config(), (
        "README configuration reference is stale: run `python -m tests.deploy.readme_reference`"
    )


def test_metrics_reference_matches_the_metric_modules() -> None:
    for module in ref.METRIC_MODULES:
        _require(module)
    text = ref.README.read_text()
    assert ref.current(text, "METRICS") == ref.render_metrics(), (
        "README metrics reference is stale: run `python -m tests.deploy.readme_reference`"
    )


def test_splice_refuses_a_readme_without_markers() -> None:
    with pytest.raises(ValueError, match="CONFIG markers"):
        ref.splice("no markers here", "CONFIG", "x")

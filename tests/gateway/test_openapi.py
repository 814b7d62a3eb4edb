"""The OpenAPI document matches the routes the app really has, both ways."""

from __future__ import annotations

import re

from gateway.app import create_app
from gateway.config import Settings
from gateway.openapi import load_openapi


def _app_routes(settings: Settings) -> set[tuple[str, str]]:
    app = create_app(settings, serve_metrics=False)
    routes = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue  # aiohttp adds HEAD for every GET
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        path = re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", path)
        routes.add((route.method.lower(), path))
    return routes


def _doc_routes(include_zone_routes: bool) -> set[tuple[str, str]]:
    doc = load_openapi()
    out = set()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            if op.get("x-requires") == "zones" and not include_zone_routes:
                continue
            out.add((method, path))
    return out


def test_every_route_documented_and_every_documented_route_exists():
    assert _app_routes(Settings()) == _doc_routes(include_zone_routes=False)


def test_zone_routes_documented_when_zones_enabled(tmp_path):
    settings = Settings(zones=str(tmp_path / "zones.json"))  # not loaded until startup
    assert _app_routes(settings) == _doc_routes(include_zone_routes=True)


def test_document_is_openapi3_with_refs_resolvable():
    doc = load_openapi()
    assert doc["openapi"].startswith("3.")
    text = str(doc)
    for ref in set(re.findall(r"#/components/schemas/(\w+)", text)):
        assert ref in doc["components"]["schemas"], ref

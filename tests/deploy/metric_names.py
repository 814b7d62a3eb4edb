"""Metric names the gateway exposes, read from its own metric modules (no running server):
every facade class whose constructor takes just a registry is built on a fresh registry."""

from __future__ import annotations

import importlib
import inspect
import re

from prometheus_client import CollectorRegistry

GATEWAY_METRIC_MODULES = ("gateway.metrics", "gateway.eldr.metrics")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}
METRIC_TOKEN = re.compile(r"(?<![\w:])((?:eldr_|sglang:)[A-Za-z0-9_:]*)")


def gateway_series() -> tuple[dict[str, set[str]], list[str]]:
    """Exposed sample name -> label names, from every metrics facade class in the gateway's
    metric modules instantiated on a fresh registry; and the modules that could not be imported."""
    series: dict[str, set[str]] = {}
    missing: list[str] = []
    for mod_name in GATEWAY_METRIC_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            missing.append(mod_name)
            continue
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ != mod_name:
                continue
            params = list(inspect.signature(cls).parameters)
            if params != ["registry"]:
                continue
            registry = CollectorRegistry()
            facade = cls(registry)
            for metric in vars(facade).values():
                describe = getattr(metric, "describe", None)
                if describe is None or metric is registry:
                    continue
                labels = set(getattr(metric, "_labelnames", ()))
                for family in describe():
                    for suffix in SUFFIXES[family.type]:
                        series[family.name + suffix] = labels | (
                            {"le"} if family.type == "histogram" else set()
                        )
    return series, missing

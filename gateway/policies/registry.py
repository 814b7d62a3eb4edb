"""Policy registry: `make_policy(name, settings, **deps)`.

"eldr" is the registration point for the expert-locality policy (gateway/policies/eldr.py): it is
imported lazily so the baseline policies work without a zone table, and it receives its
dependencies (the zone-table runtime, passed by the app as `zone_runtime=`) through `**deps`.
"""

from __future__ import annotations

import importlib
import random
from typing import Any

from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.policies.base import Policy
from gateway.policies.least_load import LeastLoadPolicy
from gateway.policies.power_of_two import PowerOfTwoPolicy
from gateway.policies.random import RandomPolicy
from gateway.policies.round_robin import RoundRobinPolicy


def _make_eldr(settings: Settings, **deps: Any) -> Policy:
    module = importlib.import_module("gateway.policies.eldr")
    factory = getattr(module, "make_eldr_policy", None)
    if factory is None:
        raise ConfigError(
            "gateway.policies.eldr does not define make_eldr_policy(settings, **deps)"
        )
    return typing_cast_policy(factory(settings, **deps))


def typing_cast_policy(obj: Any) -> Policy:
    if not isinstance(obj, Policy):
        raise ConfigError(f"{obj!r} does not implement the Policy protocol")
    return obj


def make_policy(name: str, settings: Settings, **deps: Any) -> Policy:
    """Build a fresh policy instance (each role gets its own: round-robin counters are per role)."""
    rng = deps.get("rng")
    rng = rng if isinstance(rng, random.Random) else None
    if name == "random":
        return RandomPolicy(rng)
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "least_load":
        return LeastLoadPolicy()
    if name == "power_of_two":
        return PowerOfTwoPolicy(rng)
    if name == "eldr":
        return _make_eldr(settings, **deps)
    raise ConfigError(f"unknown policy {name!r}")

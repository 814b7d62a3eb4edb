"""Policy registry: `make_policy(name, settings, rng=..., locality=...)`.

Every role gets a fresh instance (round-robin counters, prefix trees and sticky keys are per
role). `eldr` needs the app's `Locality` (gateway/eldr/locality.py, built when `--zones` is set)
and wraps a fresh instance of its load-only fallback policy (`--eldr-fallback-policy`).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.policies.cache_aware import CacheAwarePolicy
from gateway.policies.consistent_hashing import ConsistentHashingPolicy
from gateway.policies.expected_wait import ExpectedWaitPolicy
from gateway.policies.least_load import LeastLoadPolicy
from gateway.policies.manual import ManualPolicy, StickyPolicy
from gateway.policies.passthrough import PassthroughPolicy
from gateway.policies.power_of_two import PowerOfTwoPolicy
from gateway.policies.prefix_hash import PrefixHashPolicy
from gateway.policies.random import RandomPolicy
from gateway.policies.round_robin import RoundRobinPolicy
from gateway.routing import Policy

if TYPE_CHECKING:
    from gateway.eldr.locality import Locality


def make_policy(name: str, settings: Settings, *, rng: random.Random | None = None,
                locality: Locality | None = None) -> Policy:
    """Build a fresh policy instance for one role (pinned by routing key with
    `--routing-key-override`)."""
    policy = _make(name, settings, rng=rng, locality=locality)
    if settings.routing_key_override and name != "manual":  # manual pins by key already
        return StickyPolicy(policy, max_idle_secs=settings.max_idle_secs,
                            eviction_interval_secs=settings.eviction_interval_secs)
    return policy


def _make(name: str, settings: Settings, *, rng: random.Random | None,
          locality: Locality | None) -> Policy:
    if name == "random":
        return RandomPolicy(rng)
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "least_load":
        if settings.least_load_metric == "expected_wait":
            return ExpectedWaitPolicy.from_settings(settings, rng=rng)
        return LeastLoadPolicy()
    if name == "power_of_two":
        return PowerOfTwoPolicy(rng)
    if name == "passthrough":
        return PassthroughPolicy()
    if name == "cache_aware":
        return CacheAwarePolicy.from_settings(settings, rng=rng)
    if name == "manual":
        return ManualPolicy.from_settings(settings, rng=rng)
    if name == "consistent_hashing":
        return ConsistentHashingPolicy(rng)
    if name == "prefix_hash":
        return PrefixHashPolicy.from_settings(settings)
    if name == "eldr":
        if locality is None:
            raise ConfigError("decode_policy eldr needs a zone table (--zones PATH)")
        fallback = _make(settings.eldr_fallback_policy, settings, rng=rng, locality=None)
        return locality.policy(settings, fallback)
    raise ConfigError(f"unknown policy {name!r}")

"""Every expert-locality knob is a `Settings` field, settable by flag and by `GATEWAY_*`
environment variable, and each one changes what the locality stack built from it does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from gateway.cli import settings_from_args
from gateway.config import Settings
from gateway.eldr.locality import Locality, start_locality
from gateway.eldr.prompts import Prompt
from gateway.errors import ConfigError
from gateway.policies.registry import make_policy
from gateway.routing import RoutingInput
from tests.eldr.helpers import table, view
from zones.predictor import train_predictor
from zones.table import make_table, save_table

PD = ["--pd-disaggregation", "--prefill", "http://p:1", "--decode", "http://w0:1"]
WORKERS = ["w0", "w1", "w2"]
CENTROIDS = [[1, 0, 0], [0.8, 0.6, 0], [0, 0, 1]]


@pytest.mark.parametrize(
    ("flags", "env", "field", "value"),
    [
        (["--eldr-tau", "0.4"], {"GATEWAY_ELDR_TAU": "0.4"}, "eldr_tau", 0.4),
        (["--eldr-min-candidates", "3"], {"GATEWAY_ELDR_MIN_CANDIDATES": "3"},
         "eldr_min_candidates", 3),
        (["--eldr-load-bound", "0"], {"GATEWAY_ELDR_LOAD_BOUND": "0"}, "eldr_load_bound", 0),
        (["--eldr-decision", "step-cost"], {"GATEWAY_ELDR_DECISION": "step-cost"},
         "eldr_decision", "step-cost"),
        (["--eldr-step-fixed-ms", "1.5"], {"GATEWAY_ELDR_STEP_FIXED_MS": "1.5"},
         "eldr_step_fixed_ms", 1.5),
        (["--eldr-step-expert-us", "3.5"], {"GATEWAY_ELDR_STEP_EXPERT_US": "3.5"},
         "eldr_step_expert_us", 3.5),
        (["--eldr-step-token-us", "100"], {"GATEWAY_ELDR_STEP_TOKEN_US": "100"},
         "eldr_step_token_us", 100.0),
        (["--eldr-fallback-policy", "round_robin"],
         {"GATEWAY_ELDR_FALLBACK_POLICY": "round_robin"}, "eldr_fallback_policy", "round_robin"),
        (["--no-signature-cache"], {"GATEWAY_SIGNATURE_CACHE": "false"}, "signature_cache",
         False),
        (["--no-signature-predictor"], {"GATEWAY_SIGNATURE_PREDICTOR": "0"},
         "signature_predictor", False),
        (["--signature-cache-max-entries", "7"], {"GATEWAY_SIGNATURE_CACHE_MAX_ENTRIES": "7"},
         "signature_cache_max_entries", 7),
        (["--signature-cache-max-bytes", "4096"], {"GATEWAY_SIGNATURE_CACHE_MAX_BYTES": "4096"},
         "signature_cache_max_bytes", 4096),
        (["--signature-cache-block-tokens", "16"],
         {"GATEWAY_SIGNATURE_CACHE_BLOCK_TOKENS": "16"}, "signature_cache_block_tokens", 16),
        (["--signature-cache-block-bytes", "32"], {"GATEWAY_SIGNATURE_CACHE_BLOCK_BYTES": "32"},
         "signature_cache_block_bytes", 32),
    ],
)
def test_flag_and_environment_set_the_field(
    flags: list[str], env: dict[str, str], field: str, value: object
) -> None:
    default = getattr(Settings(), field)
    assert value != default
    assert getattr(settings_from_args(PD, env={}), field) == default
    assert getattr(settings_from_args([*PD, *flags], env={}), field) == value
    assert getattr(settings_from_args(PD, env=env), field) == value


def test_cache_switch_turns_back_on_from_the_flag() -> None:
    off = {"GATEWAY_SIGNATURE_CACHE": "false"}
    assert settings_from_args([*PD, "--signature-cache"], env=off).signature_cache is True


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        (["--eldr-tau", "2.5"], "eldr_tau"),
        (["--eldr-min-candidates", "0"], "eldr_min_candidates"),
        (["--eldr-load-bound", "-2"], "eldr_load_bound"),
        (["--eldr-step-expert-us", "-1"], "eldr_step_expert_us"),
        (["--eldr-step-token-us", "inf"], "eldr_step_token_us"),
        (["--signature-cache-max-entries", "0"], "signature_cache_max_entries"),
        (["--signature-cache-block-bytes", "0"], "signature_cache_block_bytes"),
    ],
)
def test_bad_values_name_the_key(flags: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        settings_from_args([*PD, *flags], env={})


def test_bad_fallback_policy_is_rejected_by_name() -> None:
    with pytest.raises(ConfigError, match="eldr_fallback_policy"):
        Settings(eldr_fallback_policy="eldr").validate()


# --- behaviour -----------------------------------------------------------------------------------


def _zones_file(tmp_path: Path) -> Path:
    base = table(CENTROIDS, WORKERS)
    texts = ["alpha apple", "alpha ant", "beta bear", "beta bee", "gamma goat", "gamma gnu"]
    sigs = np.array([[1, 0, 0]] * 2 + [[0.8, 0.6, 0]] * 2 + [[0, 0, 1]] * 2, dtype=np.float32)
    sigs /= np.linalg.norm(sigs, axis=1, keepdims=True)
    predictor = train_predictor(texts, None, sigs, num_buckets=64, rank=3, ridge=0.01)
    path = tmp_path / "zones.json"
    save_table(make_table(base.spec, base.centroids, WORKERS, predictor=predictor), path)
    return path


async def _locality(
    tmp_path: Path, *flags: str, env: dict[str, str] | None = None
) -> tuple[Settings, Locality]:
    settings = settings_from_args(
        [*PD, "--zones", str(_zones_file(tmp_path)), "--decode-policy", "eldr", *flags],
        env=env or {})
    return settings, await start_locality(settings, CollectorRegistry())


def _learn_then_resolve(locality: Locality, learned: list[Prompt], asked: Prompt) -> str:
    core = locality.resolver.core
    for prompt in learned:
        core.learn_prefill(prompt, np.array([[0, 0, 5]], np.int32))
    return core.resolve(asked).signature_source


async def test_signature_cache_switch(tmp_path: Path) -> None:
    prompt = Prompt("generate", text="alpha apple")
    _, on = await _locality(tmp_path)
    _, off = await _locality(tmp_path, "--no-signature-cache")
    assert _learn_then_resolve(on, [prompt], prompt) == "cache"
    assert _learn_then_resolve(off, [prompt], prompt) == "predictor"


async def test_signature_predictor_switch(tmp_path: Path) -> None:
    prompt = Prompt("generate", text="gamma goat")
    _, on = await _locality(tmp_path)
    _, off = await _locality(tmp_path, "--no-signature-predictor")
    assert on.resolver.core.resolve(prompt).signature_source == "predictor"
    assert off.resolver.core.resolve(prompt).signature_source == "none"


async def test_signature_cache_size_limits(tmp_path: Path) -> None:
    first, second = Prompt("generate", text="one prompt"), Prompt("generate", text="another")
    _, roomy = await _locality(tmp_path)
    _, one_entry = await _locality(tmp_path, "--signature-cache-max-entries", "1")
    _, tiny_bytes = await _locality(tmp_path, "--signature-cache-max-bytes", "1")
    assert _learn_then_resolve(roomy, [first, second], first) == "cache"
    assert _learn_then_resolve(one_entry, [first, second], first) != "cache"  # evicted
    assert _learn_then_resolve(one_entry, [first, second], second) == "cache"
    assert _learn_then_resolve(tiny_bytes, [first], first) != "cache"  # never fits


async def test_signature_cache_block_lengths(tmp_path: Path) -> None:
    # Block lengths set where prefixes are anchored: they trade lookup cost against memory, and
    # a hit is found either way (tests/eldr/test_signature_cache.py), so what the settings
    # change is the cache the resolver builds.
    geometry = table(CENTROIDS, WORKERS).geometry
    _, default = await _locality(tmp_path)
    _, small = await _locality(tmp_path, "--signature-cache-block-bytes", "8",
                               "--signature-cache-block-tokens", "2")
    built = [loc.resolver.core.cache_for(geometry) for loc in (default, small)]
    assert [c._block for c in built if c is not None] == [
        {"ids": 64, "text": 256}, {"ids": 2, "text": 8}]
    learned = Prompt("generate", text="alpha apple")
    asked = Prompt("generate", text="alpha apple and more")
    for loc in (default, small):
        assert _learn_then_resolve(loc, [learned], asked) == "cache"


async def test_band_overrides_and_fallback_policy(tmp_path: Path) -> None:
    cands = [view("w0", 4), view("w1", 0), view("w2", 0)]
    sig = np.array([1, 0, 0], np.float32)
    decisions = {}
    for flags in ([], ["--eldr-tau", "0", "--eldr-min-candidates", "1"], ["--eldr-tau", "1"]):
        settings, locality = await _locality(tmp_path, *flags)
        policy = make_policy("eldr", settings, locality=locality)
        routing = RoutingInput(sig, "cache", locality.runtime.active)
        decisions[" ".join(flags)] = policy.select(cands, routing).worker.worker_id
    # table tau 0.1 + min-2: band {w0, w1}, w1 idle; tau 0 + min 1: w0 alone despite its load;
    # tau 1: every zone, ties on load go to the more similar zone (w1, 0.8 > 0).
    assert decisions == {"": "w1", "--eldr-tau 0 --eldr-min-candidates 1": "w0",
                         "--eldr-tau 1": "w1"}
    settings, locality = await _locality(tmp_path, "--eldr-fallback-policy", "round_robin")
    policy = make_policy("eldr", settings, locality=locality)
    no_sig = RoutingInput(None, "none", locality.runtime.active)
    assert [policy.select(cands, no_sig).worker.worker_id for _ in range(3)] == WORKERS
    settings, locality = await _locality(tmp_path)
    policy = make_policy("eldr", settings, locality=locality)
    assert {policy.select(cands, no_sig).worker.worker_id for _ in range(3)} == {"w1"}


async def test_load_bound_by_flag_and_environment(tmp_path: Path) -> None:
    # Pure locality (tau 0, min 1) sends s = (1,0,0) to w0 however busy it is. A bound of 2
    # over the idle w1/w2 excludes w0 (4 > 0 + 2): the band re-forms at w1 (0.8). A bound of 4
    # keeps w0. The environment variable does what the flag does, and the flag wins.
    cands = [view("w0", 4), view("w1", 0), view("w2", 0)]
    sig = np.array([1, 0, 0], np.float32)
    local = ("--eldr-tau", "0", "--eldr-min-candidates", "1")
    cases = [((), {}, "w0"), (("--eldr-load-bound", "2"), {}, "w1"),
             ((), {"GATEWAY_ELDR_LOAD_BOUND": "2"}, "w1"),
             (("--eldr-load-bound", "4"), {"GATEWAY_ELDR_LOAD_BOUND": "2"}, "w0")]
    for flags, env, expected in cases:
        settings, locality = await _locality(tmp_path, *local, *flags, env=env)
        policy = make_policy("eldr", settings, locality=locality)
        routing = RoutingInput(sig, "cache", locality.runtime.active)
        assert policy.select(cands, routing).worker.worker_id == expected, (flags, env)


def test_bad_decision_is_rejected_by_name() -> None:
    with pytest.raises(ConfigError, match="eldr_decision"):
        Settings(eldr_decision="fastest").validate()


async def _two_decisions(tmp_path: Path, *flags: str,
                         env: dict[str, str] | None = None) -> list[str]:
    """Where an expert-2 request, then an expert-0 request, go (nothing released between)."""
    settings, locality = await _locality(tmp_path, *flags, env=env)
    policy = make_policy("eldr", settings, locality=locality)
    cands = [view("w0", 4), view("w1", 0), view("w2", 0)]
    chosen = []
    for sig in ([0, 0, 1], [1, 0, 0]):
        routing = RoutingInput(np.array(sig, np.float32), "cache", locality.runtime.active)
        chosen.append(policy.select(cands, routing).worker.worker_id)
    return chosen


async def test_decision_by_flag_and_environment(tmp_path: Path) -> None:
    # band: (0,0,1) -> its zone's idle w2; (1,0,0) -> band {w0} + min-2 {w1}, w1 idle.
    assert await _two_decisions(tmp_path) == ["w2", "w1"]
    # step-cost: (0,0,1) -> w1 (idle, first of the equal idle costs); then (1,0,0) avoids w1,
    # whose step now streams expert 2, for the idle w2.
    step = ["w1", "w2"]
    assert await _two_decisions(tmp_path, "--eldr-decision", "step-cost") == step
    assert await _two_decisions(tmp_path, env={"GATEWAY_ELDR_DECISION": "step-cost"}) == step


async def test_step_cost_constants_change_the_choice(tmp_path: Path) -> None:
    # w0 streams expert 0 for one request, w1 expert 2 for three; an expert-2 request joins.
    # Fixed time left out (the same for both). Default constants (expert 6.4 us, token 25 us):
    # w1 costs 4 x 25 + (6.4 + 75) = 181.4 us
    # against w0's 2 x 31.4 + (6.4 + 25) = 94.2: w0. Expert time 100 us: w1 = 4 x 25 + 175 =
    # 275 against w0 = 2 x 125 + 125 = 375: w1, the worker already streaming expert 2.
    chosen = {}
    for flags, env in (((), {}), (("--eldr-step-expert-us", "100"), {}),
                       ((), {"GATEWAY_ELDR_STEP_EXPERT_US": "100"})):
        settings, locality = await _locality(tmp_path, "--eldr-decision", "step-cost", *flags,
                                             env=env)
        policy = make_policy("eldr", settings, locality=locality)
        active = locality.runtime.active
        warm = [([1, 0, 0], [view("w0")]), *[([0, 0, 1], [view("w1")])] * 3]
        for sig, only in warm:
            policy.select(only, RoutingInput(np.array(sig, np.float32), "cache", active))
        routing = RoutingInput(np.array([0, 0, 1], np.float32), "cache", active)
        key = " ".join(flags) or next(iter(env), "default")
        chosen[key] = policy.select([view("w0", 1), view("w1", 3)], routing).worker.worker_id
    assert chosen == {"default": "w0", "--eldr-step-expert-us 100": "w1",
                      "GATEWAY_ELDR_STEP_EXPERT_US": "w1"}

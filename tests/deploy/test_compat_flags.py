"""Every flag of smg 1.13 and sglang-router 0.3.2, read from their own `--help`, is either ours
(a `Settings` field or alias) or listed in `gateway/compat.py` as accepted or rejected; and
docs/gateway.md's compatibility table is the one the code generates."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import build_parser, parse_command_line
from gateway.compat import FOREIGN_FLAGS, classify, markdown_table
from gateway.errors import ConfigError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "gateway.md"
ROUTERS = ("smg.launch_router", "sglang_router.launch_router")
PD = ["--pd-disaggregation", "--prefill", "http://p:1", "8998", "--decode", "http://d:1"]


def help_flags(module: str) -> set[str]:
    """Option strings of an argparse `--help`: option lines start with two spaces and a dash;
    the invocation (flags and metavars) ends at the first run of two spaces."""
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    flags: set[str] = set()
    for line in out.splitlines():
        if re.match(r"^  -", line):
            head = re.split(r"\s{2,}", line.strip())[0]
            flags.update(re.findall(r"--[a-z0-9][a-z0-9-]*", head))
    return flags


def our_flags() -> set[str]:
    return {o for action in build_parser()._actions for o in action.option_strings}


@pytest.mark.parametrize("module", ROUTERS)
def test_every_router_flag_is_ours_or_classified(module: str) -> None:
    flags = help_flags(module)
    assert len(flags) > 80, f"{module} --help parsed to only {len(flags)} flags"
    ours = our_flags()
    missing = sorted(f for f in flags if f not in ours and classify(f) is None)
    assert missing == [], f"{module} flags neither implemented nor listed in gateway/compat.py"


def test_no_listed_flag_shadows_one_of_ours() -> None:
    ours = our_flags()
    shadowed = [n for entry in FOREIGN_FLAGS for n in entry.names
                if not n.endswith("-") and n in ours]
    assert shadowed == []


def test_accepted_flags_parse_with_their_values_and_are_reported() -> None:
    settings, accepted = parse_command_line(
        [*PD, "--model-path", "Qwen/Qwen3-30B-A3B", "--log-json", "--tokenizer-cache-enable-l0",
         "--worker-warmup-secs=5", "--port", "31000"], env={})
    assert settings.port == 31000 and settings.decode == ["http://d:1"]
    assert accepted == {"--model-path": ["Qwen/Qwen3-30B-A3B"], "--log-json": [],
                        "--tokenizer-cache-enable-l0": [], "--worker-warmup-secs": ["5"]}


@pytest.mark.parametrize("argv,message", [
    (["--discovery-provider", "file"], "--prefill/--decode"),
    (["--jwt-issuer", "https://idp"], "authenticating proxy"),
    (["--history-backend", "oracle"], "/v1/chat/completions"),
    (["--backend", "openai"], "only sglang workers"),
    (["--model", "x", "--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_rejected_flags_name_the_alternative(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_command_line([*PD, *argv], env={})


def test_aliases_as_the_routers_spell_them() -> None:
    settings, _ = parse_command_line([*PD, "--spill-abs-threshold", "7",
                                      "--cache-match-threshold", "0.6",
                                      "--load-monitor-interval", "3",
                                      "--idle-connection-timeout-secs", "9"], env={})
    assert (settings.balance_abs_threshold, settings.cache_threshold) == (7, 0.6)
    assert (settings.load_poll_interval_secs, settings.client_idle_timeout_secs) == (3, 9)


def test_docs_table_is_generated() -> None:
    assert markdown_table() in DOCS.read_text(), \
        "docs/gateway.md is stale: paste `python -m gateway.compat` into its Compatibility section"

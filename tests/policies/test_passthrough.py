"""`passthrough` (smg 1.13 PassthroughPolicy): the first available worker, one warning when
there are several; accepted as prefill and decode policy from the command line."""

from __future__ import annotations

import logging

import pytest

from gateway.cli import settings_from_args
from gateway.config import Settings
from gateway.policies.registry import make_policy
from tests.policies.helpers import text_input, views


def test_first_available_worker_and_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    policy = make_policy("passthrough", Settings())
    with caplog.at_level(logging.WARNING, logger="gateway.policies.passthrough"):
        # loads do not matter: the first candidate in registration order always wins
        picks = [policy.select(views(9, 0, 0), text_input("x")).worker.worker_id
                 for _ in range(5)]
        # the first worker left rotation: its traffic moves to the next one
        after = policy.select(views(0, 0)[1:], text_input()).worker.worker_id
    assert picks == ["w0"] * 5 and after == "w1"
    warnings = [r for r in caplog.records if "passthrough" in r.getMessage()]
    assert len(warnings) == 1 and "3 workers" in warnings[0].getMessage()


def test_one_worker_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    policy = make_policy("passthrough", Settings())
    with caplog.at_level(logging.WARNING, logger="gateway.policies.passthrough"):
        assert policy.select(views(3), text_input()).worker.worker_id == "w0"
    assert not caplog.records


def test_accepted_as_every_role_as_smg_does() -> None:
    s = settings_from_args(["--pd-disaggregation", "--prefill", "http://p:1", "--decode",
                            "http://d:1", "--prefill-policy", "passthrough", "--decode-policy",
                            "passthrough"], env={})
    assert (s.effective_prefill_policy, s.effective_decode_policy) == ("passthrough",
                                                                       "passthrough")

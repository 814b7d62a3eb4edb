"""smg 1.13's least_load score (`--least-load-metric expected_wait`), by hand."""

from __future__ import annotations

import random

import pytest

from gateway.cli import settings_from_args
from gateway.loads import parse_load_report
from gateway.policies.expected_wait import ExpectedWaitPolicy
from gateway.policies.least_load import LeastLoadPolicy
from gateway.policies.registry import make_policy
from gateway.routing import NO_ROUTING_INPUT, LoadReport, WorkerView


def policy(**kw: float) -> ExpectedWaitPolicy:
    args: dict[str, float] = dict(kv_pressure_weight=0.15, default_throughput=2000.0,
                                  mean_prefill_tokens=1024, max_waiting_requests=0)
    args.update(kw)
    return ExpectedWaitPolicy(**args, rng=random.Random(0))  # type: ignore[arg-type]


def report(waiting: int = 0, tokens: int = 0, tp: float = 1000.0, usage: float = 0.0,
           seq: int = 1) -> LoadReport:
    return LoadReport(waiting, tokens, tp, usage, seq)


def view(wid: str, in_flight: int = 0, rep: LoadReport | None = None) -> WorkerView:
    return WorkerView(wid, f"http://{wid}", in_flight, None, rep)


def pick(p: ExpectedWaitPolicy, views: list[WorkerView]) -> str:
    return p.select(views, NO_ROUTING_INPUT).worker.worker_id


def test_score_is_queued_work_over_throughput_plus_the_kv_barrier() -> None:
    p = policy()
    # 2,000 reported uncached tokens at 1,000 tok/s: 2 s; KV half full: + 0.15 * 0.5 / 0.5.
    a = view("a", rep=report(tokens=2000, usage=0.5))
    assert p.score(a, 1000.0, True) == pytest.approx(2.0 + 0.15)
    # No token count but 3 waiting requests: 3 x 1,024 tokens; no throughput: 2,000 tok/s.
    b = view("b", rep=report(waiting=3, tp=0.0))
    assert p.score(b, 1000.0, True) == pytest.approx(3 * 1024 / 2000)
    # Usage clamped at 0.999: the barrier stays finite.
    c = view("c", rep=report(usage=1.0))
    assert p.score(c, 1000.0, True) == pytest.approx(0.15 * 0.999 / 0.001)
    # No report while peers report: in-flight at the nominal throughput; none report: in-flight.
    d = view("d", in_flight=2)
    assert p.score(d, 500.0, True) == pytest.approx(2 * 1024 / 500)
    assert p.score(d, 500.0, False) == 2.0
    assert pick(p, [a, b]) == "b"


def test_dispatches_since_the_report_water_fill_and_a_new_report_resets_them() -> None:
    p = policy()
    views = [view("a", rep=report()), view("b", rep=report())]
    first = pick(p, views)
    second = pick(p, views)  # the first got 1,024 tokens of credit: the other one now
    assert {first, second} == {"a", "b"}
    third = pick(p, views)
    fourth = pick(p, views)
    assert {third, fourth} == {"a", "b"}  # 2 each: never herding between polls
    # A fresh report of `a` (seq 2) says it is idle: its tally restarts at 0, so it wins
    # against `b`, which still carries 2 dispatches since its report.
    views = [view("a", rep=report(seq=2)), view("b", rep=report())]
    assert pick(p, views) == "a"


def test_without_any_report_it_is_join_shortest_queue() -> None:
    p = policy()
    assert pick(p, [view("a", 3), view("b", 1), view("c", 2)]) == "b"


def test_ties_are_spread_uniformly() -> None:
    p = policy()
    seen = {pick(p, [view(w, rep=report(seq=i)) for w in "abcd"]) for i in range(40)}
    assert seen == set("abcd")  # a fresh report each time: every choice is a 4-way tie


def test_waiting_request_cap_vetoes_full_workers_unless_all_are_full() -> None:
    p = policy(max_waiting_requests=2)
    full = view("a", rep=report(waiting=2))   # at the cap, though its score is lowest
    other = view("b", rep=report(waiting=0, tokens=5000))
    assert p.score(full, 1000.0, True) < p.score(other, 1000.0, True)
    assert pick(p, [full, other]) == "b"
    assert pick(policy(max_waiting_requests=2), [full]) == "a"  # nothing else: not refused


def test_parse_load_report_sums_ranks_and_averages_usage() -> None:
    payload = {"loads": [
        {"dp_rank": 0, "num_waiting_reqs": 2, "num_waiting_uncached_tokens": 100,
         "gen_throughput": 50.0, "token_usage": 0.2},
        {"dp_rank": 1, "num_waiting_reqs": 1, "num_waiting_uncached_tokens": 0,
         "gen_throughput": 30.0, "token_usage": 0.4}]}
    assert parse_load_report(payload, 7) == LoadReport(3, 100, 80.0, pytest.approx(0.3), 7)
    assert parse_load_report(payload, 7, dp_rank=1) == LoadReport(1, 0, 30.0, 0.4, 7)
    assert parse_load_report({"loads": []}, 1) is None
    assert parse_load_report(None, 1) is None


def test_smg_flags_select_and_tune_it() -> None:
    s = settings_from_args(["--least-load-metric", "expected_wait",
                            "--least-load-kv-pressure-weight", "0.3",
                            "--least-load-max-waiting-requests", "4"], env={})
    p = make_policy("least_load", s)
    assert isinstance(p, ExpectedWaitPolicy)
    assert p.score(view("a", rep=report(usage=0.5)), 1000.0, True) == pytest.approx(0.3)
    assert isinstance(make_policy("least_load", settings_from_args([], env={})), LeastLoadPolicy)

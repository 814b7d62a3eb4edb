"""Workloads: determinism, calibration/evaluation disjointness, multi-turn, trace markers."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest

from loadtest.driver import arrival_offsets
from loadtest.workloads import (
    DEFAULT_TRACES,
    Conversation,
    TraceIndex,
    WorkloadError,
    WorkloadSpec,
    build_workload,
    document_splits,
    load_corpus,
    load_workload,
    parse_mix,
    save_workload,
    trace_splits,
)

CORPUS = load_corpus()


def _build(**kw: object) -> list[Conversation]:
    return build_workload(WorkloadSpec(**kw), CORPUS)  # type: ignore[arg-type]


def test_corpus_is_small_and_covers_every_domain() -> None:
    domains = {d.domain for d in CORPUS}
    assert domains == {"code", "legal", "language"}
    assert {d.language for d in CORPUS if d.domain == "language"} >= {"de", "fr", "ja", "ru"}
    size = sum(len(d.text.encode()) for d in CORPUS)
    assert 100_000 < size < 500_000
    assert len({d.doc_id for d in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("kind", ["task", "language"])
def test_same_seed_same_workload_other_seed_differs(kind: str) -> None:
    a = _build(kind=kind, num_conversations=40, seed=5)
    b = _build(kind=kind, num_conversations=40, seed=5)
    c = _build(kind=kind, num_conversations=40, seed=6)
    assert a == b
    assert [x.turns for x in a] != [x.turns for x in c]


@pytest.mark.parametrize("kind", ["task", "language"])
def test_calibration_and_evaluation_share_no_document(kind: str) -> None:
    cal = _build(kind=kind, split="calibration", num_conversations=200, seed=1)
    ev = _build(kind=kind, split="evaluation", num_conversations=200, seed=2)
    cal_docs = {c.doc_id for c in cal}
    ev_docs = {c.doc_id for c in ev}
    assert cal_docs and ev_docs
    assert not cal_docs & ev_docs
    assert {c.split for c in cal} == {"calibration"}
    # Every domain of the mix is present in both splits.
    assert {c.domain for c in cal} == {c.domain for c in ev}


def test_split_depends_only_on_document_ids() -> None:
    base = document_splits(CORPUS, 0.3)
    assert document_splits(list(reversed(CORPUS)), 0.3) == base
    groups: dict[tuple[str, str], set[str]] = {}
    for d in CORPUS:
        groups.setdefault((d.domain, d.language), set()).add(base[d.doc_id])
    assert all(v == {"calibration", "evaluation"} for v in groups.values())


def test_task_prompts_fit_their_domain_and_caps() -> None:
    convs = _build(
        kind="task", num_conversations=60, seed=0, max_output_tokens=50, min_output_tokens=10
    )
    by_domain = {c.domain for c in convs}
    assert by_domain == {"code", "legal", "translation"}
    for c in convs:
        assert 10 <= c.turns[0].max_tokens <= 50
        if c.domain == "code":
            assert "```python" in c.turns[0].text and c.doc_id.startswith("code/")
        if c.domain == "translation":
            assert c.turns[0].text.startswith("Translate")


def test_mix_weights_restrict_domains() -> None:
    convs = _build(kind="language", num_conversations=30, mix={"ja": 1.0, "de": 0.0})
    assert {c.domain for c in convs} == {"ja"}
    with pytest.raises(WorkloadError, match="unknown domain"):
        _build(kind="language", num_conversations=3, mix={"xx": 1.0})
    assert parse_mix("code=2, legal=1") == {"code": 2.0, "legal": 1.0}
    with pytest.raises(WorkloadError, match="DOMAIN=WEIGHT"):
        parse_mix("code")


def test_multi_turn_conversations_stay_on_one_document() -> None:
    convs = _build(kind="task", num_conversations=10, turns=3)
    for c in convs:
        assert len(c.turns) == 3
        assert c.turns[0].text != c.turns[1].text


@pytest.mark.skipif(not DEFAULT_TRACES.is_file(), reason="routing traces not present")
def test_trace_workload_markers_and_disjoint_requests() -> None:
    cal = _build(kind="trace", split="calibration", num_conversations=100, seed=0)
    ev = _build(kind="trace", split="evaluation", num_conversations=100, seed=0)
    trace = TraceIndex.load(DEFAULT_TRACES)
    for c in cal + ev:
        m = re.match(r"\[trace:(\d+)\] ", c.turns[0].text)
        assert m and int(m.group(1)) == c.trace_index
        assert trace.domains[c.trace_index] == c.domain
    assert not {c.trace_index for c in cal} & {c.trace_index for c in ev}
    splits = trace_splits(trace, 0.3)
    assert len(splits) == len(trace.domains)


def test_bad_specs_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="kind"):
        WorkloadSpec(kind="nope")
    with pytest.raises(WorkloadError, match="max_output_tokens"):
        WorkloadSpec(min_output_tokens=10, max_output_tokens=5)
    bad = tmp_path / "w.jsonl"
    bad.write_text(
        '{"conversation_id": "a", "kind": "task", "domain": "code", "doc_id": "d",'
        ' "split": "evaluation", "turns": [{"text": "hi", "max_tokens": 0}]}\n'
    )
    with pytest.raises(WorkloadError, match=r"turns\[0\]\.max_tokens"):
        load_workload(bad)


def test_workload_file_round_trip(tmp_path: Path) -> None:
    convs = _build(kind="task", num_conversations=5, turns=2)
    path = tmp_path / "w.jsonl"
    save_workload(convs, path)
    assert load_workload(path) == convs


def test_poisson_arrivals_are_seeded_and_have_the_right_rate() -> None:
    a = arrival_offsets(2000, 4.0, seed=11)
    assert a == arrival_offsets(2000, 4.0, seed=11)
    assert a != arrival_offsets(2000, 4.0, seed=12)
    assert a[0] == 0.0 and all(x <= y for x, y in itertools.pairwise(a))
    gaps = np.diff(a)
    assert np.mean(gaps) == pytest.approx(0.25, rel=0.1)
    # Exponential gaps: coefficient of variation near 1 (a fixed-interval bug would give 0).
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, rel=0.15)
    assert arrival_offsets(3, math.inf, seed=0) == [0.0, 0.0, 0.0]
